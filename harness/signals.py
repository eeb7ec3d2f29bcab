"""Ctrl-C and SIGTERM held off while a record is being closed, so that a second one cannot cut it short."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

HELD = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_acted = [0]  # how many of _received an interruptible block has already raised for


def interrupted() -> bool:
    """Whether a held signal arrived in this process (the command then ends as interrupted)."""
    return bool(_received)


@contextlib.contextmanager
def deferred(on_signal=None):
    """Run the block with SIGINT and SIGTERM held; one that arrived is acted on when it ends:
    ``on_signal()`` if given, else KeyboardInterrupt. Outside the main thread (where Python
    delivers signals) this does nothing. Nested blocks hold until the outermost ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HELD}
    if any(handler is _hold for handler in previous.values()):  # inside another deferred block
        yield
        return
    seen_before = len(_received)
    for s in HELD:
        signal.signal(s, _hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if len(_received) > seen_before:
        if on_signal is None:
            raise KeyboardInterrupt(f"signal {_received[-1]}")
        on_signal()


def pending() -> bool:
    """Whether a held signal has not been acted on by an interruptible block yet."""
    return len(_received) > _acted[0]


@contextlib.contextmanager
def interruptible():
    """Inside a deferred block, let SIGINT and SIGTERM interrupt again (KeyboardInterrupt): for
    training, where stopping at once is what an interrupt means. One that arrived while held, and
    was not acted on yet, raises on entry. Outside a deferred block (or the main thread): nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            not all(signal.getsignal(s) is _hold for s in HELD):
        yield
        return
    if pending():
        _acted[0] = len(_received)
        raise KeyboardInterrupt(f"signal {_received[-1]}")
    for s in HELD:
        signal.signal(s, _interrupt)
    try:
        yield
    finally:
        for s in HELD:
            signal.signal(s, _hold)


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    _acted[0] = len(_received)
    raise KeyboardInterrupt(f"signal {signum}")


def _hold(signum, frame) -> None:
    _received.append(signum)
    print("harness: interrupt received; finishing the record first, then stopping", file=sys.stderr, flush=True)
