"""Reading logged runs back: a run by id, its config, its model, its curves."""
from __future__ import annotations

import json
import posixpath
import shlex
import stat
import struct
import sys
import tempfile
import warnings
from pathlib import Path

from . import config, training
from .config import MAX_CONFIG_BYTES

MAX_STATE_DICT_BYTES = 1 << 31  # a run's artifact is untrusted input: its size is bounded
from .errors import HarnessError, UsageError, described, first_line
from .experiment import is_builtin, load
from .schema import CONFIG, EXPERIMENT_SHA_PARAM, STATE_DICT
from .urls import redact


def get_run(client, run_id: str):
    from .store_files import run_id_refused
    from .tracking import missing

    refused = run_id_refused(run_id)
    if refused:
        raise UsageError(refused)
    errors = getattr(client, "ERRORS", None)  # a fast reader's own (harness.fast): mlflow stays unimported
    if errors is None:
        from mlflow.exceptions import MlflowException as errors
    try:
        return client.get_run(run_id)
    except errors as exc:
        if not missing(exc):  # the store failed (a corrupted page, say), not the lookup
            raise HarnessError(f"cannot read run {run_id} from the MLflow store {redact(client.tracking_uri)}: "
                               f"{described(exc)}") from None
        raise UsageError(f"run {run_id!r} does not exist in the MLflow store {redact(client.tracking_uri)}") from None


def logged_config(client, run_id: str, device: str | None = None, experiment: str | None = None):
    """The run's resolved config (from its config.json), re-validated; returns (config, experiment).

    A run's record never chooses code to import: an experiment of the ``experiments`` package is
    found by its name, any other (a module or a file of the user's) only when the caller names it
    in ``experiment``. A file whose sha256 differs from the run's gets a warning on stderr.
    """
    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        try:
            logged = json.loads(fetch_artifact(client, run_id, CONFIG, MAX_CONFIG_BYTES, tmp).read_text())
            if not isinstance(logged, dict):
                raise ValueError("not a mapping")
        except Exception as exc:
            raise HarnessError(f"run {run_id} has no readable {CONFIG} ({type(exc).__name__}): "
                               "was it logged by the harness?") from None
    recorded = str(logged.get("experiment", "linear_regression"))
    if experiment is None and not is_builtin(recorded):
        shown = shlex.quote(recorded) if recorded.isprintable() else repr(recorded)
        raise UsageError(f"run {run_id}'s experiment comes from {recorded!r}; a run's record never chooses code "
                         f"to import: name it yourself with --experiment {shown} (Python: experiment=...)")
    found = load(experiment or recorded)
    was = logged.get(EXPERIMENT_SHA_PARAM)
    if experiment is not None and was and found.sha256 and was != found.sha256:
        what = (f"experiment {found.reference!r} has changed since run {run_id} was logged"
                if found.reference == recorded else
                f"run {run_id} was logged with experiment {recorded!r}, not {found.reference!r}")
        print(f"harness: warning: {what} (sha256 {found.sha256[:12]}, was {str(was)[:12]})", file=sys.stderr)
    fields = {k: v for k, v in logged.items() if k in config.allowed_keys(found)}
    fields["experiment"] = found.reference
    if device:
        fields["device"] = device
    return config.resolve(fields, experiment=found)


def load_state_dict(client, run_id: str) -> dict:
    """The run's state_dict.pt, loaded with weights_only=True: a pickle that is not plain tensors is refused."""
    import torch

    try:
        state = read_archive(client, run_id, STATE_DICT, MAX_STATE_DICT_BYTES)
    except ArtifactRefused as exc:
        raise HarnessError(f"refused {STATE_DICT} of run {run_id}: {exc}") from None
    except Exception as exc:  # MLflow raises several kinds for an absent artifact
        raise HarnessError(f"run {run_id} has no readable {STATE_DICT} ({described(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise HarnessError(f"refused {STATE_DICT} of run {run_id}: a {type(state).__name__}, not a state_dict "
                           "(a mapping of names to tensors)")
    return state


def read_archive(client, run_id: str, name: str, limit: int):
    """The run's ``torch.save`` archive ``name``, checked (``archive_refusal``) and then loaded with
    weights_only=True. Raises ArtifactRefused saying why it is not read; FileNotFoundError (among
    others: MLflow's) when the run has no such artifact, OSError when it cannot be opened."""
    import pickle

    import torch

    with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
        path = fetch_artifact(client, run_id, name, limit, tmp)
        # One open file for the checks and the load: a file swapped under its name after the checks
        # (the store is writable by others) is not what torch reads.
        with open(path, "rb") as handle:
            refused = _not_a_plain_archive(handle, limit)
            if refused:
                raise ArtifactRefused(refused)
            try:
                handle.seek(0)
                with warnings.catch_warnings():  # torch's (deprecations, a pickle protocol) run to several lines
                    warnings.simplefilter("ignore")
                    return torch.load(handle, weights_only=True, map_location="cpu")
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError) as exc:
                raise ArtifactRefused("not a plain tensor file (torch.load weights_only=True: "
                                      f"{first_line(exc)})") from None


class ArtifactRefused(Exception):
    """An artifact that is not a regular file of bounded size: refused before it is read or copied."""


def fetch_artifact(client, run_id: str, name: str, limit: int, tmp: str) -> Path:
    """The run's artifact ``name`` as a local file, checked before anything copies or reads it: a
    sparse file or a FIFO in the store costs nothing to refuse. A run whose artifacts MLflow keeps in
    a local folder is read in place, at the path MLflow itself makes of the run's artifact URI (%xx,
    relative, ``file:`` forms alike): nothing is copied, so the file checked is the file read. Any
    other store's listed size is checked before the download, and the copy after it."""
    path = _in_place(client, run_id, name)
    if path is None:
        listed = {info.path: info for info in client.list_artifacts(run_id, posixpath.dirname(name) or None)}.get(name)
        if listed is None:  # never downloaded unchecked: MLflow may still find what it did not list
            raise FileNotFoundError(f"{name} is not among the artifacts the store lists")
        if listed.is_dir:
            raise ArtifactRefused("a folder, not a file")
        if listed.file_size is not None and listed.file_size > limit:
            raise ArtifactRefused(f"it is {listed.file_size} bytes, at most {limit} allowed")
        path = Path(client.download_artifacts(run_id, name, tmp))
    found = path.stat()  # not opened: a FIFO would block
    if not stat.S_ISREG(found.st_mode):
        raise ArtifactRefused("not a regular file")
    if found.st_size > limit:
        raise ArtifactRefused(f"it is {found.st_size} bytes, at most {limit} allowed")
    return path


def _in_place(client, run_id: str, name: str) -> Path | None:
    """The artifact's own file where the run's artifacts are in a local folder (refused if it is
    not a regular file in that folder), else None."""
    from .store_files import artifact_file

    if hasattr(client, "artifact_in_place"):  # a fast reader (harness.fast) reads nothing but local files
        return client.artifact_in_place(run_id, name)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    # The repository MLflow's own download would use, and the folder it makes of the URI.
    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri)
    if not isinstance(repo, LocalArtifactRepository):
        return None
    return artifact_file(Path(repo.artifact_dir), name, run_id)


# torch.save writes one zip entry per tensor storage and 6 more; the models that fit 2 GiB have a
# few thousand at most (GPT-2 medium: 292 tensors, ResNet-152: 776). An entry of its central
# directory is 46 bytes and the name ("state_dict/data/123"); zipfile makes a ~640-byte object of
# each before any size is known, so both are bounded from the end records before it starts:
# at most 40 MB of them however the bytes are split (24 MB measured for 54,468 one-byte names).
MAX_ARCHIVE_ENTRIES = 20_000
MAX_DIRECTORY_BYTES = 128 * MAX_ARCHIVE_ENTRIES
# The archive's pickle (data.pkl) names each tensor and its storage: ~100-200 bytes a tensor. Unpickling
# costs ~45x its size in memory (a list of lists does), so it is bounded as the directory is: at most
# 256 bytes an entry, ~230 MB of unpickling at worst.
MAX_PICKLE_BYTES = 256 * MAX_ARCHIVE_ENTRIES
_END = struct.Struct("<4s4H2LH")  # end of central directory: 22 bytes, last in the file
_LOCATOR = struct.Struct("<4sLQL")  # zip64 end locator: the 20 bytes before it
_END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end record: the 56 bytes before that


def _directory(handle) -> list[tuple[int, int]]:
    """Each (entries, bytes) the archive's end records declare for its central directory, read from
    its last 98 bytes. Only the records zipfile and torch's reader both take are accepted: the end
    record as the file's last 22 bytes (no comment) and a zip64 one right before its locator."""
    size = handle.seek(0, 2)
    handle.seek(max(0, size - 98))
    tail = handle.read(98)
    if len(tail) < _END.size:
        raise ValueError("too short for a zip end record")
    signature, _, _, _, entries, directory, start, comment = _END.unpack(tail[-22:])
    if signature != b"PK\x05\x06" or comment:
        raise ValueError("its last 22 bytes are not a zip end record without a comment")
    declared = [(entries, directory)]
    if len(tail) == 98 and tail[-42:-38] == b"PK\x06\x07":
        where = _LOCATOR.unpack(tail[-42:-22])[2]
        record = _END64.unpack(tail[:56])
        if record[0] != b"PK\x06\x06" or where != size - 98:
            raise ValueError("its zip64 end record is not where its locator says")
        # zipfile takes the zip64 record's counts; a reader may take the 32-bit ones where they are no marker
        declared = [(record[7] if entries == 0xFFFF else entries,
                     record[8] if directory == 0xFFFFFFFF else directory), (record[7], record[8])]
    elif 0xFFFF == entries or 0xFFFFFFFF in (directory, start):
        raise ValueError("a zip64 end record is missing")
    return declared


def _not_a_plain_archive(handle, limit: int = MAX_STATE_DICT_BYTES) -> str | None:
    return archive_refusal(handle, limit)


def archive_refusal(handle, limit: int) -> str | None:
    """Why the file is not read by torch.load, or None. torch.save has written zip archives since
    torch 1.6, its tensors stored uncompressed; the legacy format (and a bare pickle) allocates
    storages at the sizes it declares, and a compressed entry is inflated whole, so only an archive
    of a bounded directory whose entries declare at most the allowed bytes in all, and whose pickle
    is of a bounded size, is read. ``handle``: the file, open for reading (a path is opened here)."""
    import zipfile

    if isinstance(handle, (str, Path)):
        with open(handle, "rb") as opened:
            return archive_refusal(opened, limit)
    try:
        declared = _directory(handle)
    except (OSError, ValueError) as exc:
        return f"not a zip archive of torch.save ({described(exc)})"
    for entries, directory in declared:
        if entries > MAX_ARCHIVE_ENTRIES or directory > MAX_DIRECTORY_BYTES:
            return (f"its directory declares {entries} entries in {directory} bytes, at most "
                    f"{MAX_ARCHIVE_ENTRIES} entries in {MAX_DIRECTORY_BYTES} bytes allowed")
    try:
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            entries = archive.infolist()
            # torch's zip reader finds "<archive>/data.pkl" whatever the case of its letters
            pickles = [e for e in entries if e.filename.lower().endswith(".pkl")]
            pickled = sum(e.file_size for e in pickles)
            if pickled > MAX_PICKLE_BYTES:
                return (f"its pickle declares {pickled} bytes" if len(pickles) == 1 else
                        f"its {len(pickles)} pickles declare {pickled} bytes in all") + \
                    f", at most {MAX_PICKLE_BYTES} allowed"
            declared = sum(entry.file_size for entry in entries)
            if declared > limit:
                return f"its entries declare {declared} bytes, at most {limit} allowed"
            for entry in pickles:
                try:
                    with archive.open(entry) as opened:
                        data = opened.read(MAX_PICKLE_BYTES + 1)
                except Exception as exc:  # zipfile's, zlib's, lzma's... for a damaged or encrypted entry
                    return f"its pickle cannot be read ({described(exc)})"
                refused = _nesting_refusal(data)
                if refused:
                    return f"its pickle {refused}"
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        return f"not a zip archive of torch.save ({described(exc)})"
    return None


# Hashing a tuple (a dict key: torch's unpickler hashes each) recurses in C: a pickle of a few hundred
# KB nests a key 300,000 tuples deep and takes the process down with SIGSEGV inside torch.load, before
# any exception can be caught; comparing, printing or copying what it built recurses too, into a
# RecursionError past ~950 levels. A state_dict nests 6 deep, a checkpoint (optimizer state, config) 9.
MAX_PICKLE_NESTING = 100
# An object reached twice through the memo is one object, but hashing, comparing or copying what
# holds it visits it each time: 40 levels of (x, x) pairs cost 2**40 visits (a hang, not a crash).
# Counted as if every shared reference were copied out, a state_dict or a checkpoint holds a few
# objects per tensor (~100 thousand for a large model); the pickle's own bound allows ~5 million
# without sharing. Past this many, the pickle is refused.
MAX_PICKLE_OBJECTS = 20_000_000
_REFUSED_FILL = ("fills an object after putting it into another, or puts one into itself: "
                 "torch.save never writes that")


def _opcode_kinds() -> dict:
    """What each pickle opcode does to the unpickler's stack: (kind, items it takes from above a
    mark, items it takes otherwise). Every opcode is walked, not only those torch reads today: a
    later torch that reads more is still guarded."""
    import pickletools

    kinds = {}
    for op in pickletools.opcodes:
        before = [kind.name for kind in op.stack_before]
        if op.name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
            kind = "fill"  # into the object under what it takes
            before = before[1:]
        elif op.name in ("MARK", "DUP", "POP", "MEMOIZE") or op.name.endswith(("GET", "PUT")):
            kind = op.name.replace("LONG_", "").replace("BIN", "")
        elif op.name.startswith("EMPTY_") and op.name != "EMPTY_TUPLE":
            kind = "container"
        elif not before:
            kind = "leaf" if op.stack_after else "none"  # numbers, strings, globals; PROTO, FRAME
        else:  # a tuple, a list, a call's result... made of what it takes; STOP, POP_MARK: nothing
            kind = "made" if op.stack_after else "dropped"
        kinds[op] = (kind, "mark" in before, len([k for k in before if k not in ("mark", "stackslice")]))
    return kinds


def _nesting_refusal(pickled: bytes) -> str | None:
    """Why a pickle is not unpickled, by what it would build: nesting deeper than MAX_PICKLE_NESTING,
    or None. Its opcodes are walked once, as the unpickler's stack and memo would see them, each
    object an index into ``depth`` (how deeply it nests) and ``inside`` (whether it is already in
    another); numbers, strings and globals share index 0. pickle fills a container before it puts
    it into another (so its depth is final once it is inside one): a pickle that fills one later,
    or puts one into itself, is refused too. Cost, linear in the pickle's size (measured, CPU time):
    3.5 s and 23 MB at most for a 5,120,000-byte pickle (1.7 million 2-tuples; torch's own unpickler
    takes 2.6 s on it), 68 MB for 5 million empty lists; 28 ms for a state_dict of 1,000 tensors
    (torch.load: 150 ms), 96 ms for a checkpoint with Adam's state of them (torch.load: 250 ms)."""
    import io
    import pickletools
    from array import array

    kinds = _opcode_kinds()
    depth, inside, size = array("i", [0]), bytearray(1), array("q", [1])  # size: objects, shared ones copied out
    stack, marks, memo = array("i"), array("i"), {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(pickled)):
            kind, marked, count = kinds[op]
            if kind == "leaf":
                stack.append(0)
            elif kind == "made" or kind == "fill" or kind == "dropped":  # takes objects from the stack
                cut = marks.pop() if marked else len(stack) - count
                if cut < (marks[-1] if marks else 0):
                    raise IndexError("it takes more objects than the stack holds")
                items = stack[cut:]
                del stack[cut:]
                if kind == "dropped":
                    continue
                nested = 1 + max(map(depth.__getitem__, items), default=0)
                if nested > MAX_PICKLE_NESTING:
                    return f"nests objects more than {MAX_PICKLE_NESTING} deep"
                held = sum(map(size.__getitem__, items))
                if held > MAX_PICKLE_OBJECTS:
                    return f"holds more than {MAX_PICKLE_OBJECTS} objects once its shared ones are counted where used"
                if kind == "fill" and stack[-1]:  # index 0 holds nothing: torch refuses to fill it
                    target = stack[-1]
                    if inside[target] or target in items:
                        return _REFUSED_FILL
                    depth[target] = max(depth[target], nested)
                    size[target] = min(size[target] + held, MAX_PICKLE_OBJECTS + 1)
                for item in items:
                    inside[item] = 1
                if kind == "made":
                    stack.append(len(depth))
                    depth.append(nested)
                    inside.append(0)
                    size.append(1 + held)
            elif kind == "MARK":
                marks.append(len(stack))
            elif kind == "GET":
                stack.append(memo[arg])
            elif kind == "PUT" or kind == "MEMOIZE":
                memo[len(memo) if kind == "MEMOIZE" else arg] = stack[-1]
            elif kind == "container":
                stack.append(len(depth))
                depth.append(1)
                inside.append(0)
                size.append(1)
            elif kind == "DUP":
                stack.append(stack[-1])
            elif kind == "POP":
                del stack[marks.pop() if marks and len(stack) == marks[-1] else -1:]
    except (ValueError, IndexError, KeyError) as exc:  # torch's unpickler fails on the same bytes
        return f"cannot be read ({described(exc)})"
    return None


def fitted_model(client, run_id: str, cfg, experiment, state: dict | None = None):
    """The model ``cfg`` builds, with the run's state_dict loaded; a state_dict that does not fit it
    is a one-line HarnessError."""
    state = state if state is not None else load_state_dict(client, run_id)
    model = training.build_model(cfg, experiment)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # keys or shapes that are not this model's: torch says which on its 2nd line
        first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:400]
        raise HarnessError(f"{STATE_DICT} of run {run_id} does not fit the model its config builds: {first}") from None
    return model


def load_model(run_id: str, client=None, experiment: str | None = None):
    """The run's model, rebuilt from its config (hyperparameters included) and loaded from its
    state_dict.pt, in eval mode. ``experiment``: the run's experiment module or file, when it is
    not one of the ``experiments`` package."""
    from . import accelerated

    client = client or accelerated.read_client(run_id)
    return _model_and_experiment(client, run_id, experiment)[0]


def _model_and_experiment(client, run_id: str, experiment: str | None):
    get_run(client, run_id)
    cfg, found = logged_config(client, run_id, device="cpu", experiment=experiment)
    return fitted_model(client, run_id, cfg, found).eval(), found


def predict(run_id: str, values, client=None, experiment: str | None = None, source: str = "--x",
            max_inputs: int | None = None):
    """Inputs shaped like the experiment's data and the model's outputs for them. ``values``: flat
    numbers (a multiple of one input's size), one input of the experiment's shape, or several
    (an array whose first axis counts them); ``source`` names where they came from in a refusal.
    ``max_inputs``: more inputs than this, once shaped, are refused before the model sees them."""
    import torch

    from . import accelerated

    client = client or accelerated.read_client(run_id)
    model, found = _model_and_experiment(client, run_id, experiment)
    data = found.load_data()
    shape = data.input_shape
    if shape is None:
        raise UsageError(f"{source} gives one input tensor per sample, and each sample of this experiment is a "
                         f"{type(data.test[0]).__name__} of several inputs; load the model with "
                         "harness.runs.load_model and call it yourself")
    inputs = shaped(values, tuple(shape), source)
    if max_inputs is not None and len(inputs) > max_inputs:
        raise too_many_inputs(source, len(inputs), max_inputs)
    with torch.inference_mode():
        try:
            return inputs, model(inputs)
        except Exception as exc:  # the experiment's model code
            raise HarnessError(f"the model of run {run_id} failed on inputs of shape {list(inputs.shape)}: "
                               f"{described(exc)}") from None


def too_many_inputs(source: str, count: int, most: int) -> UsageError:
    return UsageError(f"{source} holds {count} inputs, at most {most} allowed: for more, serve the model "
                      "(mlflow models serve) or load it with mlflow.pyfunc")


def shaped(values, shape: tuple[int, ...], source: str = "--x"):
    """``values`` as a batch of inputs of ``shape``: already one (N x shape), one input alone
    (shape), or their numbers flattened, in order."""
    import torch

    array = torch.as_tensor(values, dtype=torch.float32)
    if not array.numel():
        raise UsageError(f"{source} holds no numbers; inputs of shape {list(shape)} are expected")
    if array.dim() == len(shape) + 1 and tuple(array.shape[1:]) == shape:
        return array
    if tuple(array.shape) == shape:
        return array.unsqueeze(0)
    width = int(torch.Size(shape).numel())
    if array.numel() % width:
        given = f" (an array of shape {list(array.shape)})" if array.dim() > 1 else ""
        raise UsageError(f"{source} needs a multiple of {width} numbers for inputs of shape {list(shape)}, "
                         f"got {array.numel()}{given}")
    return array.reshape(-1, *shape)


def curves(client, run_id: str, keys) -> dict[str, list[float]]:
    """Per-epoch metric histories, ordered by step."""
    return {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in keys}
