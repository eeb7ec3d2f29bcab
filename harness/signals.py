"""Ctrl-C and SIGTERM held off while a record is being closed, so that a second one cannot cut it short;
and, for a run that writes checkpoints, asked to stop training at its next batch boundary."""
from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading

HELD = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_acted = [0]  # how many of _received an interruptible block has already raised for
_held_from: list[int | None] = [None]  # len(_received) when the outermost deferred block began, while it runs


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
    seen_before = _held_from[0] = len(_received)
    for s in HELD:
        signal.signal(s, _hold)
    try:
        yield
    finally:
        _held_from[0] = None
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


# A preemption stops at the next batch boundary; one that no boundary answers within this many
# seconds (a batch that hangs, a step far longer than the grace a scheduler gives) stops at once.
GRACE_SECONDS = 20.0


class Preemption:
    """Whether a SIGINT or SIGTERM arrived in this process since this object was made, for training
    to stop at its next batch boundary; on a worker thread, since the main thread began holding
    signals (a search's trial that waited for its turn to train, while another stopped, stops too).
    ``reached()`` says the boundary came: the grace stops counting."""

    def __init__(self):
        held_from = _held_from[0]
        on_worker = threading.current_thread() is not threading.main_thread()
        self.seen = held_from if on_worker and held_from is not None else len(_received)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._over = False

    def requested(self) -> bool:
        return len(_received) > self.seen

    def reached(self) -> None:
        with self._lock:
            self._over = True
            if self._timer is not None:
                self._timer.cancel()
        if threading.current_thread() is threading.main_thread():  # acted on, as an interrupt raised is
            _acted[0] = len(_received)

    def _start_grace(self, seconds: float) -> None:
        with self._lock:
            if self._timer is None and not self._over:
                self._timer = threading.Timer(seconds, self._expired)
                self._timer.daemon = True
                self._timer.start()

    def _expired(self) -> None:
        with self._lock:
            if not self._over:  # no boundary came: stop the main thread at once, as a second signal would
                self._over = True
                _thread.interrupt_main(signal.SIGINT)


@contextlib.contextmanager
def preemptible():
    """Yields a Preemption. In the main thread the block's first SIGINT or SIGTERM only asks
    training to stop at its next batch boundary (``requested()``); a second one, or no boundary
    within GRACE_SECONDS, raises KeyboardInterrupt at once. Elsewhere the handlers stay as they are
    (the main thread holds or acts on the signal; ``requested()`` still sees it)."""
    preemption = Preemption()
    if threading.current_thread() is not threading.main_thread():
        yield preemption
        return
    previous = {s: signal.getsignal(s) for s in HELD}

    def request(signum, frame) -> None:
        asked = preemption.requested()
        _received.append(signum)
        if asked or preemption._over:
            _acted[0] = len(_received)
            raise KeyboardInterrupt(f"signal {signum}")
        print(f"harness: stopping at the next batch, after a checkpoint (within {GRACE_SECONDS:g} s; "
              "again to stop at once)", file=sys.stderr, flush=True)
        preemption._start_grace(GRACE_SECONDS)

    for s in HELD:
        signal.signal(s, request)
    try:
        yield preemption
    finally:
        with preemption._lock:
            preemption._over = True
            if preemption._timer is not None:
                preemption._timer.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    _acted[0] = len(_received)
    raise KeyboardInterrupt(f"signal {signum}")


def _hold(signum, frame) -> None:
    _received.append(signum)
    print("harness: interrupt received; finishing the record first, then stopping", file=sys.stderr, flush=True)
