"""interrupts.py in this process: a signal that lands where Python ignores exceptions."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import REPO
from mnist_jax import interrupts


class OnceRaising:
    """A stand-in for jaxlib's collect_garbage (C code, as this is: no Python frame of its
    own) that sends `signum` to this process the first time it is called."""

    def __init__(self, signum):
        self.signum, self.sent = signum, False

    def __call__(self):
        if not self.sent:
            self.sent = True
            signal.raise_signal(self.signum)


@pytest.fixture
def own_handlers():
    """interrupts.handled() leaves SIGINT and SIGTERM ignored after a signal (the process
    is about to exit): put pytest's handlers back."""
    previous = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


# Run in a fresh interpreter: what it checks (the garbage collector's callbacks, the
# profile function, the signal handlers) is process state that the tests before it in a
# worker can leave otherwise (it failed, rarely, after other test files in one process).
GC_CALLBACK_CHECK = """
import gc, signal, sys
import jax._src.lib as jax_lib
from mnist_jax import interrupts

signum = int(sys.argv[1])

class OnceRaising:  # a stand-in for jaxlib's collect_garbage (C code: no Python frame)
    sent = False
    def __call__(self):
        if not self.sent:
            self.sent = True
            signal.raise_signal(signum)

assert jax_lib._xla_gc_callback in gc.callbacks
jax_lib._jax.collect_garbage = OnceRaising()
ignored = []
sys.unraisablehook = ignored.append
reached = []
profiler = sys.getprofile()
try:
    with interrupts.handled():
        gc.collect()  # the handler runs inside _xla_gc_callback, which calls the stand-in
        reached.append("after the collection")
    raise SystemExit("not raised")
except interrupts.Interrupted as raised:
    assert raised.signum == signum and raised.exit_status == 128 + signum
assert ignored == [], ignored  # nothing "ignored" (printed and dropped)
assert reached == [], reached  # raised before the next statement
assert sys.getprofile() is profiler  # the profile function that raised it is gone
print("ok")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_jaxs_gc_callback_is_raised_after_it(signum):
    """Ctrl-C in the first moments of a run printed "Exception ignored in:
    <function _xla_gc_callback>" and a traceback ending "Interrupted: SIGINT", and the
    interrupt was lost until the next check(): the handler had raised inside JAX's
    garbage-collection callback. Now it raises as soon as the callback has returned."""
    proc = subprocess.run([sys.executable, "-c", GC_CALLBACK_CHECK, str(int(signum))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_signal_inside_a_del_is_raised_after_it(own_handlers, monkeypatch):
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    class Finalized:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)
            [i for i in range(100)]  # bytecodes, where the handler runs

    with pytest.raises(interrupts.Interrupted):
        with interrupts.handled():
            Finalized()
            [i for i in range(100)]
    assert ignored == []


def test_a_signal_elsewhere_still_raises_at_once(own_handlers):
    reached = []
    with pytest.raises(interrupts.Interrupted):
        with interrupts.handled():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the signal")
    assert reached == []
