"""Optuna's journal file, kept readable when a crash or a full disk cuts a write short.

Optuna writes one JSON operation per line and, reading, skips a last line that is cut short. But
the next append lands right after the cut bytes, the damaged line is now in the middle, and from
then on Optuna refuses to read the file: the study is lost. So before every append, under Optuna's
own lock on the file, the harness checks that the file ends in a complete line; if not, it keeps a
copy of the damaged bytes beside the journal (``<journal>.torn-<time>``), cuts them, and says so.

Cutting is what every reader already saw: no process ever applied a line that was cut short, so
trial ids and log numbers stay as every worker knows them. A journal already damaged in the middle
(by an older harness, or plain Optuna appending after a tear) is repaired the same way: each
damaged line is removed, and a complete operation appended after the cut bytes of a line is
salvaged, since its writer did not see them either.

A line that is JSON but not an operation this Optuna replays (an unknown op code, a field missing
or of the wrong type, a value the replay cannot apply) stops Optuna's replay as surely as a torn
one, with a traceback instead of a message: it is damage too, found and removed the same way.

Repair touches only a file that is recognisably an Optuna journal (``not_a_journal``): empty (a
new one), or its first line an operation (or the start of one, cut short), and no bytes that are not
UTF-8 outside a torn tail. Anything else given as a journal (an MLflow store, someone's notes) is
refused as bad input before a byte of it is written. A search or ``audit --fix`` owes the repair
until every check of the command passed: meanwhile Optuna reads what the repair will leave.

A write that fails (no space left, say) is taken back (the file is truncated to where it was)
and raised as ``JournalWriteError``: the journal never holds half an operation of this process.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from optuna.storages.journal import JournalFileBackend

from ...errors import HarnessError, UsageError
from . import optuna_private

TORN_SUFFIX = ".torn-"  # a repair's copy of what it cut: JOURNAL.torn-TIMESTAMP
# Its whole name's end, as repair_journal writes it (a second copy in one second gets .N):
TORN_NAME = re.escape(TORN_SUFFIX) + r"[0-9]{8}T[0-9]{6}Z(\.[0-9]+)?$"
REPAIR_SUFFIX = ".repair-tmp"  # a repaired journal, written whole before it replaces the damaged one
_OP = b'{"op_code":'  # how Optuna starts every operation it writes
_TAIL_CHUNK = 4096  # most operations are a few hundred bytes; longer ones take more reads
Op = optuna_private.journal_operations()


class JournalWriteError(HarnessError):
    """An append to the journal failed; the file was put back as it was before it."""


class JournalDamaged(HarnessError):
    """The journal has damaged lines that a read-only command does not repair."""


class NotAJournal(UsageError):
    """A file given as a journal that no Optuna wrote: it is never repaired, nor written."""


_SQLITE = b"SQLite format 3\x00"


def not_a_journal(path: str) -> str | None:
    """Why the file at ``path`` is not recognisably an Optuna journal; None when it is one (or empty:
    a new one). Reads its first line only; ``full_damage`` checks the rest is text."""
    # O_NONBLOCK: a /proc file that would block (kmsg) answers at once
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        first = bytearray(f.read(_TAIL_CHUNK))
        while first[:1] == b"{" and b"\n" not in first:  # a long first line is read to its end
            more = f.read(1 << 20)
            if not more:
                break
            first += more
    if not first:
        return None
    if os.stat(path).st_size == 0:
        return "its size is 0 while it reads as text: a /proc or /sys file, not one on disk"
    if first.startswith(_SQLITE):
        return "it is a SQLite database (an MLflow store?); an SQLite storage is sqlite:///PATH"
    line, newline, _ = bytes(first).partition(b"\n")
    if not newline:  # the file is one write cut short: the start of an operation, or not a journal
        return None if line[:len(_OP)] == _OP[:len(line)] else "its first line is no Optuna operation"
    why = operation_error(_parse(line))
    if why is None or (line.startswith(_OP) and _salvage(line) is not None):
        return None  # an operation, or one appended after a first write cut short
    return f"its first line is no Optuna operation ({why})"


@dataclass
class Damage:
    """What a repair removes: the first ``keep`` bytes stay as they are, ``rewrite`` replaces the rest."""

    keep: int
    cut: bytes = b""
    lines: int = 0
    salvaged: int = 0
    rewrite: bytes = b""
    first: str = ""  # what is wrong with the first damaged line, when it is more than a cut-short write

    def describe(self, path: str) -> str:
        if self.lines == 1 and not self.rewrite and not self.first:
            return f"the journal {path} ended in a write cut short ({len(self.cut)} bytes: a crash or a full disk)"
        salvaged = f", {self.salvaged} complete operation(s) salvaged from them" if self.salvaged else ""
        first = f"; {self.first}" if self.first else ""
        return f"the journal {path} had {self.lines} damaged line(s) ({len(self.cut)} bytes){salvaged}{first}"


_NUMBER = (int, float)
_NUMBERS = "numbers"  # a list (or dict) of numbers
# What each operation this Optuna replays must hold (journal/_storage.py, JournalStorageReplayResult):
# its required fields, then its optional ones, with their JSON types. DISCARD_TRIALS is skipped on replay.
_OPERATIONS = {
    Op.CREATE_STUDY: ({"study_name": str, "directions": list}, {}),
    Op.DELETE_STUDY: ({"study_id": int}, {}),
    Op.SET_STUDY_USER_ATTR: ({"study_id": int, "user_attr": dict}, {}),
    Op.SET_STUDY_SYSTEM_ATTR: ({"study_id": int, "system_attr": dict}, {}),
    Op.CREATE_TRIAL: ({"study_id": int, "datetime_start": (str, type(None))},
                      {"state": int, "value": (*_NUMBER, type(None)), "values": (_NUMBERS, type(None)),
                       "datetime_complete": str, "distributions": dict, "params": _NUMBERS,
                       "user_attrs": dict, "system_attrs": dict, "intermediate_values": _NUMBERS}),
    Op.SET_TRIAL_PARAM: ({"trial_id": int, "param_name": str, "param_value_internal": _NUMBER,
                          "distribution": str}, {}),
    Op.SET_TRIAL_STATE_VALUES: ({"trial_id": int, "state": int, "values": (_NUMBERS, type(None))},
                                {"datetime_start": str, "datetime_complete": str}),
    Op.SET_TRIAL_INTERMEDIATE_VALUE: ({"trial_id": int, "step": int, "intermediate_value": _NUMBER}, {}),
    Op.SET_TRIAL_USER_ATTR: ({"trial_id": int, "user_attr": dict}, {}),
    Op.SET_TRIAL_SYSTEM_ATTR: ({"trial_id": int, "system_attr": dict}, {}),
    Op.DISCARD_TRIALS: ({}, {}),
}


def _is(value, kinds) -> bool:
    for kind in kinds if isinstance(kinds, tuple) else (kinds,):
        if kind == _NUMBERS:
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
            if items is not None and all(_is(item, _NUMBER) for item in items):
                return True
        elif isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            return True  # JSON's true is no number, and no op code
    return False


def operation_error(log) -> str | None:
    """Why ``log`` is not an operation this Optuna replays; None when it is one."""
    if not isinstance(log, dict):
        return "not a JSON object"
    code = log.get("op_code")
    if not _is(code, int) or code not in _OPERATIONS:
        return f"op_code {code!r} is none of this Optuna's ({min(_OPERATIONS)}..{max(_OPERATIONS)})"
    required, optional = _OPERATIONS[code]
    for name, kinds in {"worker_id": str, **required, **optional}.items():
        if name not in log:
            if name in optional:
                continue
            return f"{Op(code).name} lacks {name!r}"
        if not _is(log[name], kinds):
            return f"{Op(code).name} has {name}={str(log[name])[:40]!r}, of the wrong type"
    for name in ("user_attr", "system_attr"):  # one attribute per operation, as the replay asserts
        if name in required and len(log[name]) != 1:
            return f"{Op(code).name} sets {len(log[name])} attributes, not 1"
    return None


def _parse(line: bytes):
    try:  # UTF-8 only: what Optuna writes, and what json.loads would read as UTF-16 is no journal line
        return json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, digits past int's limit
        return None


def _complete(line: bytes) -> bool:
    return operation_error(_parse(line)) is None


def _salvage(line: bytes) -> bytes | None:
    """A complete operation at the end of a damaged line: one appended after a cut-short write."""
    start = line.rfind(_OP, 1)
    return line[start:] if start > 0 and _complete(line[start:]) else None


def tail_damage(path: str) -> Damage | None:
    """Damage at the end of the file only: reads back to the start of the last line."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        start, before = 0, size - 1  # the last line starts after the last newline before its final byte
        while before > 0:
            step = min(_TAIL_CHUNK, before)
            f.seek(before - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                start = before - step + newline + 1
                break
            before -= step
        f.seek(start)
        last = f.read(size - start)
    if not last.endswith(b"\n"):
        return Damage(keep=start, cut=last, lines=1)
    log = _parse(last)
    why = operation_error(log) if log is not None else None
    if log is not None and why is None:
        return None
    return Damage(keep=start, cut=last, lines=1, first=f"its last line: {why}" if why else "")


def full_damage(path: str) -> Damage | None:
    """Every damaged line of the file (reads it all, and replays it as Optuna would)."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    torn_tail = lines.pop()  # b"" when the file ends in a newline
    try:  # a crash cuts text short; it never writes bytes that are not text before the last newline
        data[:len(data) - len(torn_tail)].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotAJournal(f"{path!r} is not an Optuna journal: byte {exc.start} is not UTF-8 text, which Optuna "
                          "never writes; nothing was changed") from None
    replay = optuna_private.replay_result()
    offset, keep, cut, kept, salvaged, bad, first = 0, None, [], [], 0, 0, ""
    for number, raw in enumerate(lines, start=1):
        line = raw + b"\n"
        why = _replay_error(replay, raw)
        if why is None:
            if keep is not None:
                kept.append(line)
        else:
            bad += 1
            first = first or f"line {number}: {why}"
            if keep is None:
                keep = offset
            rescued = _salvage(raw)
            if rescued is not None and _replay_error(replay, rescued) is None:
                kept.append(rescued + b"\n")
                salvaged += 1
                cut.append(line[: len(line) - len(rescued) - 1])
            else:
                cut.append(line)
        offset += len(line)
    if torn_tail:
        bad += 1
        keep = offset if keep is None else keep
        cut.append(torn_tail)
    if keep is None:
        return None
    return Damage(keep=keep, cut=b"".join(cut), lines=bad, salvaged=salvaged,
                  rewrite=b"".join(kept), first=first)


def _replay_error(replay, line: bytes) -> str | None:
    """Why Optuna's replay cannot apply ``line`` after the lines before it (None: it applied it)."""
    log = _parse(line)
    why = operation_error(log) if log is not None else "not JSON"
    if why is not None:
        return why
    try:  # what the shape allows and the replay still refuses: a date, a distribution, an index
        replay.apply_logs([log])
    except Exception as exc:  # whatever the replay raises: this line is what it cannot read past
        return f"{Op(log['op_code']).name}: Optuna cannot apply it ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def repair(path: str, damage: Damage) -> str:
    """Cut the damage (a copy of it kept first); returns the one line that says what was done."""
    copy = Path(f"{path}{TORN_SUFFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while copy.exists():
        copy, n = Path(f"{path}{TORN_SUFFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{n}"), n + 1
    _write_durably(copy, damage.cut)
    if damage.rewrite or damage.salvaged:
        # The clean prefix is kept byte for byte (other processes' offsets into it stay valid).
        tmp = Path(path + REPAIR_SUFFIX)
        with open(path, "rb") as f:
            prefix = f.read(damage.keep)
        _write_durably(tmp, prefix + damage.rewrite)
        os.replace(tmp, path)
    else:
        os.truncate(path, damage.keep)
    _sync_dir(path)
    return f"{damage.describe(path)}: removed the damaged bytes, kept a copy in {copy}; every complete operation is kept"


def earlier_repairs(path: str) -> list[Path]:
    """The copies that earlier repairs kept."""
    journal = Path(path)
    return sorted(copy for copy in journal.parent.glob(journal.name + TORN_SUFFIX + "*")
                  if re.fullmatch(re.escape(journal.name) + TORN_NAME, copy.name))


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _say(line: str) -> None:
    print(f"harness: {line}", file=sys.stderr)


class Journal(JournalFileBackend):
    """Optuna's journal file backend that never appends after damage and never leaves half a write."""

    def __init__(self, file_path: str, notify=_say) -> None:
        super().__init__(file_path)
        self.path = file_path
        self._notify = notify
        self._clean_size: int | None = None  # the size this process left the file at, known clean
        self._owed: list[dict] | None = None  # damage found, not yet repaired: the logs the repair leaves

    def lock(self):
        return optuna_private.journal_lock(self)

    def owe_repair(self, damage: Damage) -> None:
        """Read the journal as ``damage``'s repair will leave it, and repair it before the first
        append (or ``repair()``): a command refused meanwhile has changed nothing."""
        with open(self.path, "rb") as f:
            kept = f.read(damage.keep) + damage.rewrite
        self._owed = [json.loads(line) for line in kept.splitlines()]

    def read_logs(self, log_number_from: int):
        if self._owed is not None:
            yield from self._owed[log_number_from:]
            return
        for log in super().read_logs(log_number_from):
            why = operation_error(log)
            if why is not None:  # Optuna's replay would stop at it with a traceback: damage
                raise ValueError(f"the journal {self.path} holds a line that is no operation of this Optuna: {why}")
            yield log

    def repair(self, whole: bool = False) -> str | None:
        """Repair the damage now (the tail only, unless ``whole`` or a repair is owed); returns what
        was done, or None."""
        with self.lock():
            return self._repair_locked(whole)

    def _repair_locked(self, whole: bool) -> str | None:
        whole, self._owed = whole or self._owed is not None, None  # the file holds what the view showed
        damage = full_damage(self.path) if whole else tail_damage(self.path)
        if damage is None:
            return None
        try:
            done = repair(self.path, damage)
        except OSError as exc:
            raise JournalWriteError(f"{damage.describe(self.path)}, and it cannot be repaired now "
                                    f"({exc.strerror or exc}); nothing was changed") from None
        self._notify(done)
        return done

    def append_logs(self, logs: list[dict]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        with self.lock():
            # Owed damage, or another process wrote since: a tear it left is cut before this append.
            if self._owed is not None or os.path.getsize(self.path) != self._clean_size:
                self._repair_locked(whole=False)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError as exc:
                    try:
                        os.ftruncate(fd, start)  # freeing space always works: take the partial write back
                    except OSError:
                        pass
                    raise JournalWriteError(f"cannot write the Optuna journal {self.path}: "
                                            f"{exc.strerror or exc}; the journal is left as it was before "
                                            "this write") from None
                self._clean_size = start + len(data)
            finally:
                os.close(fd)
