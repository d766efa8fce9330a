"""Ctrl-C and SIGTERM as a request to stop, honoured where stopping is safe.

Python runs a signal handler between bytecodes of the main thread, so a plain
KeyboardInterrupt can land inside JAX's tracing or dispatch, or inside an Orbax save, and
leave the process to crash on exit (a segmentation fault after Ctrl-C during compilation
was seen). Here the first SIGINT or SIGTERM inside a `deferred()` region (all of fit())
only records the request; the training loop calls `check()` between chunks of steps and
between epochs, where everything finished is on disk, and stops there by raising
`Interrupted`. Outside such regions (data loading, report writing, whose writes are
atomic) the handler raises `Interrupted` at once, except where Python would only print
and drop the exception ("Exception ignored in ..."): inside a garbage-collection callback
(JAX registers one) or a `__del__`. There the signal is put off to the first call or
return outside such frames (a profile function, see _raise_after). A second signal
exits at once, with the same status and no traceback: every file already written is
complete.

With several processes (processes.py), every signal waits for the next check(), and
check() asks every process (an all-gather of the signals received): they all stop at the
same point, even when the signal reached them at different moments or reached only one.

Exit statuses follow the shell's convention: 128 + the signal number (130 for SIGINT,
143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from typing import Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop requested by SIGINT or SIGTERM. A BaseException, as KeyboardInterrupt, so
    an `except Exception` on the way does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


_requested: int | None = None  # the first signal received, if any
_deferring = 0  # depth of nested deferred() regions
# Several processes: `(signal or None) -> the first signal any process received, or None`
_shared_by: Callable[[int | None], int | None] | None = None


def share_with_other_processes(agree: Callable[[int | None], int | None]) -> None:
    """From now on, a signal waits for check(), which stops every process alike (`agree`:
    processes.first_signal)."""
    global _shared_by
    _shared_by = agree


def _handle(signum, frame):
    global _requested
    if _requested is not None:  # the second signal: stop now, without a traceback
        sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting now; the files "
                         f"already written are complete\n")
        sys.stderr.flush()
        os._exit(128 + _requested)
    _requested = signum
    if _deferring or _shared_by is not None:
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after the current chunk "
                         f"of steps or save (again to exit at once)\n")
        sys.stderr.flush()
        return
    if _exceptions_ignored_in(frame):
        _raise_after(signum)
        return
    raise Interrupted(signum)


def _raise_after(signum: int) -> None:
    """Raise Interrupted at the main thread's first Python event (a call, a return, a C
    call) outside the frames where exceptions are ignored: a profile function, removed
    (the previous one put back) as it raises."""
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if _exceptions_ignored_in(frame):
            return
        sys.setprofile(previous)
        if not _deferring:  # else the next check() raises
            raise Interrupted(signum)

    sys.setprofile(profile)


def _exceptions_ignored_in(frame) -> bool:
    """Whether `frame` or a caller is a garbage-collection callback (JAX's
    _xla_gc_callback) or a __del__, where Python prints and drops an exception."""
    callbacks = {getattr(getattr(c, "__func__", c), "__code__", None) for c in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def handled():
    """Install the handlers for SIGINT and SIGTERM (main thread only), restored on exit.
    After a signal the two are ignored instead: the process is about to exit with its
    status, and Python's shutdown would otherwise let another signal kill it (or raise
    KeyboardInterrupt) on the way out."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _requested = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if _requested is None else signal.SIG_IGN)


@contextlib.contextmanager
def deferred():
    """A region where a signal waits for the next check() instead of raising at once."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()  # reached only when the region ended normally


def check() -> None:
    """Raise Interrupted if a stop has been requested (of several processes: by any)."""
    requested = _requested if _shared_by is None else _shared_by(_requested)
    if requested is not None:
        raise Interrupted(requested)
