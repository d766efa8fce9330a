"""interrupts.py in this process: a signal that lands where Python ignores exceptions."""

from __future__ import annotations

import gc
import signal
import sys

import pytest

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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_jaxs_gc_callback_is_raised_after_it(signum, monkeypatch, own_handlers):
    """Ctrl-C in the first moments of a run printed "Exception ignored in:
    <function _xla_gc_callback>" and a traceback ending "Interrupted: SIGINT", and the
    interrupt was lost until the next check(): the handler had raised inside JAX's
    garbage-collection callback. Now it raises as soon as the callback has returned."""
    import jax._src.lib as jax_lib

    assert jax_lib._xla_gc_callback in gc.callbacks
    monkeypatch.setattr(jax_lib._jax, "collect_garbage", OnceRaising(signum))
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    reached = []
    profiler = sys.getprofile()
    with pytest.raises(interrupts.Interrupted) as raised:
        with interrupts.handled():
            gc.collect()  # the handler runs inside _xla_gc_callback, which calls the stand-in
            reached.append("after the collection")
    assert raised.value.signum == signum and raised.value.exit_status == 128 + signum
    assert ignored == []  # nothing "ignored" (printed and dropped)
    assert reached == []  # raised before the next statement
    assert sys.getprofile() is profiler  # the profile function that raised it is gone


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
