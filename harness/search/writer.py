"""MLflow writes in a second process, in submission order, off the training path.

A search spends most of its tracking time in MLflow's store code (Python, holding the GIL), so a
thread would slow training down about as much as writing inline; a process runs on the other core.

The writer is a fresh interpreter (``python -m harness.search.writer``), not a multiprocessing child:
it never re-imports the user's script, it sits in its own session so that Ctrl-C reaches only the
parent (which decides what an interrupt means), and it exits when its stdin closes, so a parent
killed with -9 leaves no orphan behind. Calls and results travel pickled over the two pipes.
"""
from __future__ import annotations

import atexit
import importlib
import os
import pickle
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future

_state: dict = {}
URI_VARIABLE = "HARNESS_WRITER_TRACKING_URI"
SERVER_THREADS = 4


class WriterGone(RuntimeError):
    """The writer process ended before answering."""


class Writer:
    """One writer process; ``close`` waits until everything submitted is in the store."""

    def __init__(self, tracking_uri: str):
        self._uri = tracking_uri
        self._errors: list[BaseException] = []
        self._next = 0
        self._lock = threading.Lock()
        self._respawns = 1  # a writer killed mid-search is replaced once, to write the close-out
        self.closed = False
        self.died: WriterGone | None = None  # set when the process ends before it was told to
        self._start()
        atexit.register(self.close)

    def _start(self) -> None:
        # The URI goes in the environment, not on the command line, which every local user can read.
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env={**os.environ, URI_VARIABLE: self._uri}, start_new_session=True)
        self._futures = {}  # this process's calls: the reader of a killed one fails only its own
        self._reader = threading.Thread(target=self._read, args=(self._proc, self._futures),
                                        name="harness-writer-results", daemon=True)
        self._reader.start()

    def submit(self, fn, *args, urgent: bool = False, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)`` in the writer. Urgent calls (the main process is about to
        wait for them) run beside ordinary ones, not after them; each kind keeps its own order."""
        future: Future = Future()
        with self._lock:
            if self.closed:
                raise WriterGone("the MLflow writer is closed")
            if self._proc.poll() is not None and self._respawns:
                # Killed: what it was writing failed (those futures say so); a new one takes the rest.
                self._respawns -= 1
                self._start()
            call_id, self._next = self._next, self._next + 1
            self._futures[call_id] = future
            try:
                _send(self._proc.stdin, (call_id, urgent, fn.__module__, fn.__qualname__, args, kwargs))
            except (BrokenPipeError, OSError) as exc:
                self._futures.pop(call_id)
                raise WriterGone(f"the MLflow writer process is gone ({exc})") from None
        return future

    def _read(self, proc, futures: dict[int, Future]) -> None:
        while True:
            try:
                call_id, ok, value = _recv(proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                future = futures.pop(call_id)
            if ok:
                future.set_result(value)
            else:
                self._errors.append(value)
                future.set_exception(value)
        status = proc.wait()
        gone = WriterGone(f"the MLflow writer process died (exit status {status})")
        with self._lock:
            pending = list(futures.values())
            futures.clear()
            if not self.closed:
                self.died = self.died or gone
        if pending:
            self._errors.append(gone)
        for future in pending:
            future.set_exception(gone)

    def abort(self) -> None:
        """Stop the process at once; for a writer that was never given anything to write."""
        with self._lock:
            self.closed = True
        self._proc.kill()
        self._proc.wait()
        self._reader.join()

    def close(self) -> list[BaseException]:
        """Drain and stop the process; returns the errors of writes that failed."""
        with self._lock:
            if self.closed:
                return []
            self.closed = True
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._proc.wait()
        self._reader.join()
        return list(self._errors)


def client():
    """The writer's MlflowClient, made on first use: the store is not touched before a call needs it."""
    if "client" not in _state:
        from ..tracking import open_client

        _state["client"] = open_client(_state["tracking_uri"])
    return _state["client"]


def _receive(calls, lanes: tuple, threads: tuple) -> None:
    while True:
        try:
            call_id, urgent, *call = _recv(calls)
        except (EOFError, OSError):
            for lane, n in zip(lanes, threads):
                for _ in range(n):
                    lane.put(None)  # after everything already received: one per thread of the lane
            return
        lanes[0 if urgent else 1].put((call_id, call))


def _work(lane, results, send_lock: threading.Lock) -> None:
    while True:
        item = lane.get()
        if item is None:
            return
        call_id, (module, name, args, kwargs) = item
        try:
            reply = (call_id, True, getattr(importlib.import_module(module), name)(*args, **kwargs))
        except Exception as exc:  # the parent gets the error on the call's future
            reply = (call_id, False, exc if _picklable(exc) else RuntimeError(repr(exc)))
        with send_lock:
            _send(results, reply)


def _serve(tracking_uri: str) -> None:
    from queue import SimpleQueue

    # Results go out on the original stdout; anything a library prints goes to stderr instead.
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _state["tracking_uri"] = tracking_uri
    # With a tracking server MLflow prints two "View run" lines per finished run (and fetches the
    # run again to do it): noise in a worker's log, and a round trip per trial.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Two lanes: urgent calls (the main process is waiting on them) never queue behind a long upload
    # in the ordinary lane. Each call writes whole runs (a trial's run is one call), so calls need no
    # order among themselves. A tracking server takes them several at a time (its round trips
    # overlap: a 100-trial search measured 1.3x faster); a SQLite file takes one writer: one thread.
    lanes = (SimpleQueue(), SimpleQueue())
    threads = (1, SERVER_THREADS if tracking_uri.startswith(("http://", "https://")) else 1)
    send_lock = threading.Lock()
    workers = [threading.Thread(target=_work, args=(lane, results, send_lock))
               for lane, n in zip(lanes, threads) for _ in range(n)]
    # A failed write reaches the main process on its future, which says it in one line; MLflow
    # would also log it here with a traceback.
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Imports the calls need, paid while the parent is still starting up.
    import matplotlib

    matplotlib.use("Agg")
    import mlflow  # noqa: F401

    from . import tracker  # noqa: F401

    for worker in workers:
        worker.start()
    _receive(sys.stdin.buffer, lanes, threads)
    for worker in workers:
        worker.join()


def _send(stream, message) -> None:
    # Length-prefixed frames: pickle.load on a pipe prefetches, and would sit on one message until
    # the next one arrives.
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    # Serve from the importable module, so that the functions called share its state.
    importlib.import_module("harness.search.writer")._serve(os.environ.pop(URI_VARIABLE))
