"""Where a run came from beyond its config: the code's git commit and uncommitted changes, the
installed packages, the data, the machine. Worked out once per process (a search's trials share
it), as plain tags and artifacts; the tracking side logs them. Neither mlflow nor optuna here.
"""
from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.metadata
import importlib.util
import platform
import re
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from . import schema

GIT_SECONDS = 5.0  # a git that hangs (a network file system, a lock) never holds a run up longer
MAX_DIFF_BYTES = 1 << 20  # an uncommitted diff past this is cut, and says so
NOT_GIT = "not a git checkout"
NO_GPU = "none used"  # a run on the CPU: CUDA is never started just to name a GPU it does not use


@dataclass(frozen=True)
class Code:
    """A folder's git state: its commit (or NOT_GIT), whether it has uncommitted changes, and those."""
    commit: str
    dirty: str  # "true", "false", or NOT_GIT
    diff: bytes = b""


def _git(folder, *args: str) -> bytes | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=GIT_SECONDS,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def code(folder: Path) -> Code:
    """The git state of the checkout holding ``folder``; NOT_GIT where git is absent or it is none."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    return _checkout(top.decode().strip()) if top else Code(NOT_GIT, NOT_GIT)


@functools.lru_cache(maxsize=None)
def _checkout(folder: str) -> Code:
    """code() of a checkout's top folder: the experiment's and the harness's often share one."""
    commit = _git(folder, "rev-parse", "--verify", "HEAD")
    status = _git(folder, "status", "--porcelain") if commit else None
    if not commit or status is None:
        return Code(NOT_GIT, NOT_GIT)
    if not status.strip():
        return Code(commit.decode().strip(), "false")
    diff = _git(folder, "diff", "HEAD", "--no-color", "--no-ext-diff") or b""
    untracked = [line[3:] for line in status.decode(errors="replace").splitlines() if line.startswith("??")]
    if untracked:  # not in the diff: named, so that the record says the commit does not hold them
        diff += ("".join(f"# untracked: {name}\n" for name in untracked)).encode()
    if len(diff) > MAX_DIFF_BYTES:
        diff = diff[:MAX_DIFF_BYTES] + f"\n# diff cut here: {len(diff)} bytes in all\n".encode()
    return Code(commit.decode().strip(), "true", diff)


def experiment_source(experiment) -> str:
    """The experiment's file (what MLflow's source name shows): a file of the user's, or its module's;
    its reference where neither is found."""
    reference = experiment.reference
    if reference.endswith(".py"):
        return reference
    try:
        spec = importlib.util.find_spec(reference if "." in reference else f"experiments.{reference}")
    except (ImportError, ValueError):
        spec = None
    return spec.origin if spec is not None and spec.origin else reference


def experiment_folder(experiment) -> Path:
    """The folder of the experiment's code; the working folder where its file is not found."""
    source = experiment_source(experiment)
    return Path(source).parent if source.endswith(".py") else Path.cwd()


@functools.lru_cache(maxsize=1)
def requirements() -> bytes:
    """The installed distributions, one sorted ``name==version`` line each (importlib.metadata: no pip)."""
    found = set()
    for dist in importlib.metadata.distributions():
        # Each ``dist.metadata`` (``dist.version`` too) parses the distribution's METADATA file anew:
        # read once, this takes two thirds of the time it did (a parent run's provenance starts every search).
        meta = dist.metadata
        name = meta["Name"] if meta else None
        if name:
            found.add(f"{name}=={meta['Version']}")
    return "".join(f"{line}\n" for line in sorted(found, key=str.lower)).encode()


def parse_requirements(text: str) -> dict[str, str]:
    """``name==version`` lines as {lower-case name: version}."""
    pairs = (line.split("==", 1) for line in text.splitlines() if "==" in line)
    return {name.strip().lower(): version.strip() for name, version in pairs}


@functools.lru_cache(maxsize=None)
def machine(device: str) -> dict[str, str]:
    """Host, CPU, GPU and driver (only where the run uses CUDA), torch's CUDA, Python."""
    import torch

    tags = {schema.HOST_TAG: socket.gethostname(), schema.CPU_TAG: cpu_model(),
            schema.PYTHON_TAG: platform.python_version(), schema.CUDA_TAG: torch.version.cuda or "none"}
    if device.startswith("cuda"):  # CUDA is started for the run anyway
        tags[schema.GPU_TAG] = torch.cuda.get_device_name(torch.device(device))
        tags[schema.GPU_DRIVER_TAG] = nvidia_driver()
    else:
        tags[schema.GPU_TAG] = f"{NO_GPU} (device {device})"
    return tags


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    found = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.M)
    return found.group(1).strip() if found else (platform.processor() or platform.machine() or "unknown")


NVIDIA_VERSION = Path("/proc/driver/nvidia/version")  # the loaded driver's own words: no nvidia-smi process


def nvidia_driver() -> str:
    try:
        text = NVIDIA_VERSION.read_text(errors="replace")
    except OSError:
        return "unknown"
    found = re.search(r"Kernel Module\s+(\S+)", text)
    return found.group(1) if found else "unknown"


def digest(value, sha=None):
    """The sha256 of data as an experiment returns it: tensors by dtype, shape and bytes; datasets
    sample by sample; containers item by item."""
    import torch

    sha = sha or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        sha.update(f"tensor {tensor.dtype} {list(tensor.shape)}\n".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, (list, tuple)):
        sha.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            digest(item, sha)
    elif isinstance(value, dict):
        sha.update(f"dict {len(value)}\n".encode())
        for key in sorted(value, key=str):
            sha.update(f"{key!s}\n".encode())
            digest(value[key], sha)
    elif hasattr(value, "__len__") and hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
        sha.update(f"dataset {len(value)}\n".encode())  # a map-style torch Dataset
        for i in range(len(value)):
            digest(value[i], sha)
    else:
        sha.update(f"{type(value).__name__} {value!r}\n".encode())
    return sha


# id(data) -> (data, its tags): the data kept alive, so that its id is not another's; the latest few only.
_data: dict[int, tuple[object, dict[str, str]]] = {}
KEPT_DATA = 4
_data_lock = threading.Lock()


def data_tags(data) -> dict[str, str]:
    """The sha256 of each split (train, valid, test) as the experiment returned it; once per data."""
    known = _data.get(id(data))
    if known is not None and known[0] is data:
        return known[1]
    if hasattr(data, "X_train"):
        splits = {"train": (data.X_train, data.y_train), "test": (data.X_test, data.y_test),
                  "valid": (data.X_valid, data.y_valid) if data.X_valid is not None else None}
    else:
        splits = {"train": data.train, "test": data.test, "valid": data.valid}
    tags = {schema.data_tag(split): _hashed(value) for split, value in splits.items() if value is not None}
    with _data_lock:  # a search's --n-jobs threads start their trials together
        _data[id(data)] = (data, tags)
        while len(_data) > KEPT_DATA:
            del _data[next(iter(_data))]
    return tags


def _hashed(value) -> str:
    try:
        return digest(value).hexdigest()
    except Exception as exc:  # a dataset's own code: provenance never fails the run
        return f"not hashed: {type(exc).__name__}"


@functools.lru_cache(maxsize=None)
def held_out_tag(n: int, fraction: float) -> dict[str, str]:
    """The samples ``valid_fraction`` holds out of ``n`` (its own generator: torch may draw it otherwise)."""
    from .experiment import _split

    _, out = _split(n, fraction)
    return {schema.data_tag("held_out"): digest(out).hexdigest()}


def artifact_name(template: str, content: bytes) -> str:
    return template.format(sha=hashlib.sha256(content).hexdigest()[:16])


def requirements_artifact(packages_sha256: str) -> str | None:
    """The artifact a run's packages tag points to; None for a tag that is no sha256 (it is untrusted)."""
    if not re.fullmatch(r"[0-9a-f]{64}", packages_sha256 or ""):
        return None
    return schema.REQUIREMENTS_ARTIFACT.format(sha=packages_sha256[:16])


@functools.lru_cache(maxsize=1)
def _harness_code() -> Code:
    return code(Path(__file__).resolve().parent)


def code_tags(experiment) -> dict[str, str]:
    """The experiment's code and the harness's: commit, dirty flag, and the diff's artifact name."""
    tags = {}
    for (commit_tag, dirty_tag, diff_tag), found in (
            ((schema.GIT_COMMIT_TAG, schema.SOURCE_DIRTY_TAG, schema.SOURCE_DIFF_TAG),
             code(experiment_folder(experiment).resolve())),
            ((schema.HARNESS_COMMIT_TAG, schema.HARNESS_DIRTY_TAG, schema.HARNESS_DIFF_TAG), _harness_code())):
        tags[commit_tag], tags[dirty_tag] = found.commit, found.dirty
        if found.diff:
            tags[diff_tag] = artifact_name(schema.DIFF_ARTIFACT, found.diff)
    return tags


def run_tags(experiment, data, device: str, valid_fraction: float | None = None) -> dict[str, str]:
    """Every provenance tag of one run (each part worked out once per process)."""
    packages = requirements()
    tags = {schema.SOURCE_NAME_TAG: experiment_source(experiment), schema.SOURCE_TYPE_TAG: "LOCAL",
            schema.USER_TAG: _user(), **code_tags(experiment),
            schema.PACKAGES_TAG: hashlib.sha256(packages).hexdigest(), **machine(device), **data_tags(data)}
    if valid_fraction and not data.has_valid:
        tags.update(held_out_tag(data.n_train, float(valid_fraction)))
    return tags


def artifacts(experiment) -> dict[str, bytes]:
    """The big parts, named by their content's hash: the requirements list and each uncommitted diff."""
    packages = requirements()
    found = {artifact_name(schema.REQUIREMENTS_ARTIFACT, packages): packages}
    for one in (code(experiment_folder(experiment).resolve()), _harness_code()):
        if one.diff:
            found[artifact_name(schema.DIFF_ARTIFACT, one.diff)] = one.diff
    return found


@functools.lru_cache(maxsize=1)
def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (a container)
        return "unknown"


MACHINE = ((schema.TORCH_VERSION_PARAM, "torch"), (schema.CUDA_TAG, "CUDA"), (schema.PYTHON_TAG, "Python"),
           (schema.HOST_TAG, "host"), (schema.CPU_TAG, "CPU"), (schema.GPU_TAG, "GPU"),
           (schema.GPU_DRIVER_TAG, "GPU driver"))
CODE = (("the experiment's code", schema.GIT_COMMIT_TAG, schema.SOURCE_DIRTY_TAG, schema.SOURCE_DIFF_TAG),
        ("the harness's code", schema.HARNESS_COMMIT_TAG, schema.HARNESS_DIRTY_TAG, schema.HARNESS_DIFF_TAG))
MAX_NAMED = 10  # changed packages named in one line


def recorded(run_tags: dict[str, str]) -> bool:
    """Whether a run's tags hold its provenance (runs logged before the harness recorded it do not)."""
    return schema.PACKAGES_TAG in run_tags


def differences(then: dict[str, str], now: dict[str, str], then_packages: str | None,
                now_packages: str) -> list[str]:
    """One line per way the re-run's provenance ``now`` differs from the run's ``then`` (tags and
    the torch_version param of each), data first; ``*_packages``: the requirements lists, where known."""
    lines = []
    for key in sorted(k for k in then.keys() | now.keys() if k.startswith(schema.DATA_TAG.split("{")[0])):
        if then.get(key) != now.get(key):
            split = key.rsplit(".", 1)[1]
            lines.append(f"other data: the {split} split's sha256 is {_short(then.get(key))} in the run, "
                         f"{_short(now.get(key))} here")
    if then.get(schema.PACKAGES_TAG) != now.get(schema.PACKAGES_TAG):
        changed = package_changes(then_packages, now_packages) if then_packages is not None else \
            ["the run's list is not among its artifacts or its parent's"]
        lines.append("other packages: " + "; ".join(changed))
    for what, commit, dirty, diff in CODE:
        was, is_ = _code_state(then, commit, dirty, diff), _code_state(now, commit, dirty, diff)
        if was != is_:
            lines.append(f"other commit or changes of {what}: {was} in the run, {is_} here")
    for key, what in MACHINE:
        if then.get(key) != now.get(key):
            lines.append(f"other {what}: {_shown(then.get(key))} in the run, {_shown(now.get(key))} here")
    return lines


def package_changes(then: str, now: str) -> list[str]:
    """The packages two requirements lists differ in: changed, added, removed (at most MAX_NAMED named)."""
    old, new = parse_requirements(then), parse_requirements(now)
    changes = [f"{name} {old[name]} -> {new[name]}" for name in sorted(old.keys() & new.keys())
               if old[name] != new[name]]
    changes += [f"{name} {new[name]} added" for name in sorted(new.keys() - old.keys())]
    changes += [f"{name} {old[name]} removed" for name in sorted(old.keys() - new.keys())]
    if len(changes) > MAX_NAMED:
        changes = changes[:MAX_NAMED] + [f"and {len(changes) - MAX_NAMED} more"]
    return changes or ["the same packages, listed otherwise"]


def _code_state(tags: dict[str, str], commit: str, dirty: str, diff: str) -> str:
    found = tags.get(commit)
    if found is None:
        return "none recorded"
    if found == NOT_GIT:
        return NOT_GIT
    if not re.fullmatch(r"[0-9a-f]{40,64}", found):  # a run's tags are untrusted: shown, never printed raw
        return f"commit {_shown(found)}"
    changes = f"uncommitted changes ({_shown(tags[diff])})" if tags.get(dirty) == "true" and tags.get(diff) else \
        "uncommitted changes" if tags.get(dirty) == "true" else "no uncommitted changes"
    return f"commit {found[:12]} with {changes}"


def _short(value: str | None) -> str:
    return value[:16] if value and re.fullmatch(r"[0-9a-f]{64}", value) else _shown(value)


def _shown(value: str | None) -> str:
    return "none recorded" if value is None else repr(value[:100])
