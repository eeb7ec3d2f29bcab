"""What an experiment is, and how the harness finds one.

An experiment is data, not a branch in the harness: ``EXPERIMENT = Experiment(...)`` in a module of
the ``experiments`` package (found by its file name), in a module of your own (a dotted path), or in
a file of your own (``path/to/my_experiment.py``). Adding one is writing that file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import pkgutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import ExperimentCodeError, UsageError, described, did_you_mean
from .loop import MetricsFn
from .hyperparameter import TYPES, Hyperparameter  # noqa: F401 (experiments import it from here)
from . import registry, schema

MAX_FILE_BYTES = 1 << 20  # an experiment is one small file; anything larger is not one


@dataclass(frozen=True)
class Data:
    """Full tensors, as the reference notebook has them; optionally a validation part, which a search
    selects on (without one, a search holds out a share of the training part: ``valid_fraction``)."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    X_valid: torch.Tensor | None = None
    y_valid: torch.Tensor | None = None

    def __post_init__(self):
        if (self.X_valid is None) != (self.y_valid is None):
            raise ValueError("Data: give both X_valid and y_valid, or neither")

    def to(self, device: str) -> "Data":
        return Data(*(t.to(device) if t is not None else None for t in (self.X_train, self.y_train, self.X_test,
                                                                      self.y_test, self.X_valid, self.y_valid)))

    @property
    def n_train(self) -> int:
        return len(self.X_train)

    @property
    def has_valid(self) -> bool:
        return self.X_valid is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X_test.shape[1:])

    def held_out(self, fraction: float) -> "Data":
        """A validation part carved from the training part: the last ``fraction`` of a permutation
        drawn from a generator of its own, so it is the same whatever seed a run trains with."""
        keep, out = _split(len(self.X_train), fraction)
        return replace(self, X_train=self.X_train[keep], y_train=self.y_train[keep],
                       X_valid=self.X_train[out], y_valid=self.y_train[out])


@dataclass(frozen=True)
class Datasets:
    """Map-style torch Datasets of (input, target) pairs; the loop reads them in mini-batches."""

    train: Dataset
    test: Dataset
    valid: Dataset | None = None

    def to(self, device: str) -> "Datasets":
        return self  # batches move to the device one at a time

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def has_valid(self) -> bool:
        return self.valid is not None

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample's input; None when a sample is not (input tensor, target) (a dict of
        several inputs, for an experiment with its own step)."""
        sample = self.test[0]
        if not isinstance(sample, (tuple, list)) or not isinstance(sample[0], (torch.Tensor, float, int)):
            return None
        return tuple(torch.as_tensor(sample[0]).shape)

    def held_out(self, fraction: float) -> "Datasets":
        keep, out = _split(len(self.train), fraction)
        return replace(self, train=Subset(self.train, keep.tolist()), valid=Subset(self.train, out.tolist()))


VALID_SPLIT_SEED = 20240607  # the held-out validation part's own generator (not the run's seed)


def _split(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_valid = int(round(fraction * n))
    if not 1 <= n_valid < n:
        raise UsageError(f"valid_fraction {fraction} of {n} training samples holds out {n_valid}; it must leave at "
                         "least one sample on each side")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALID_SPLIT_SEED))
    return order[:n - n_valid].sort().values, order[n - n_valid:].sort().values


# What the harness itself offers every experiment, beside lr and epochs; then the settings of
# torch's optimizers, losses and schedules (harness.registry).
HARNESS_HYPERPARAMETERS = (
    Hyperparameter("batch_size", "int", None, help="mini-batch size; unset = the whole training set (full batch)"),
    Hyperparameter("weight_decay", "float", 0.0, low=1e-6, high=1e-2, log=True, optimizers=registry.WITH_WEIGHT_DECAY,
                   help="the optimizer's weight_decay (L2 penalty)"),
    Hyperparameter("momentum", "float", 0.0, low=0.0, high=0.99, optimizers=registry.WITH_MOMENTUM,
                   help="the optimizer's momentum"),
    Hyperparameter("scheduler", "categorical", "none", choices=registry.SCHEDULERS,
                   help="the learning-rate schedule (an experiment may add its own by name)"),
    Hyperparameter("grad_clip_norm", "float", None, low=1e-3, high=1e3, log=True,
                   help="clip the gradients' total norm to this before each step; unset = no clipping"),
    Hyperparameter("grad_clip_value", "float", None, low=1e-4, high=1e3, log=True,
                   help="clip each gradient element to [-v, v] before each step; unset = no clipping"),
    Hyperparameter("patience", "int", None, low=1, high=1000,
                   help="early stopping: epochs without an improvement of the selection metric; unset = off"),
    Hyperparameter("min_delta", "float", 0.0, low=0.0, high=1e6,
                   help="early stopping: the least change of the selection metric that counts as an improvement"),
)
# The harness's config keys that are hyperparameters: no experiment may declare one of these names.
HARNESS_NAMES = tuple(h.name for h in HARNESS_HYPERPARAMETERS)
# Optimizers and losses an experiment searches when it names none (its default loss when it names no losses).
DEFAULT_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


def _no_scalars(model: nn.Module) -> dict[str, float]:
    return {}


@dataclass(frozen=True)
class Experiment:
    name: str
    # Data (tensors) or Datasets; called once per process and shared by every trial of a search.
    make_data: Callable[[], Data | Datasets]
    # Called right after torch.manual_seed(seed), with the experiment's hyperparameters as keyword
    # arguments, so initial weights follow from the seed.
    make_model: Callable[..., nn.Module]
    # Values for any config key (optimizer, loss, lr, epochs, batch_size, a hyperparameter...).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # The optimizers and losses the default search space pairs: names of torch's (harness.registry),
    # or {name: factory} for the experiment's own, which any config may then name too:
    # an optimizer factory is called as factory(params, cfg), a loss factory as factory(cfg).
    # No losses: the experiment's default loss alone.
    optimizers: tuple[str, ...] | Mapping[str, Callable] = DEFAULT_OPTIMIZERS
    losses: tuple[str, ...] | Mapping[str, Callable] | None = None
    # The experiment's own learning-rate schedules: {name: factory(optimizer, cfg, steps_per_epoch)},
    # stepped after every epoch (OneCycleLR and CyclicLR after every batch, as torch documents them;
    # ReduceLROnPlateau with the selection metric).
    schedulers: Mapping[str, Callable] = field(default_factory=dict)
    # The experiment's own hyperparameters: passed to make_model, logged, searchable.
    hyperparameters: tuple[Hyperparameter, ...] = ()
    # Scalars read off the trained model and logged as final metrics (the reference: weight, bias).
    scalars: Callable[[nn.Module], dict[str, float]] = _no_scalars
    # Known true values of some scalars: each run also logs <scalar>_error = |scalar - truth|.
    truth: Mapping[str, float] = field(default_factory=dict)
    # Extra per-epoch metrics from (predictions, targets), logged as train_<name> and test_<name>.
    # With mini-batches they are averaged over batches weighted by batch size: make them per-sample means.
    metrics: MetricsFn | None = None
    # The experiment's own step, for a batch that is not one (inputs, targets) pair (a tuple or dict of
    # inputs) or a loss that is not loss_fn(model(inputs), targets) (mixup, an auxiliary loss):
    # step(model, batch, loss_fn, cfg) -> loss, or (loss, {name: value}) with each value a batch mean,
    # logged as train_<name>. Validation and test batches go through eval_step (default: step) in eval
    # mode without gradients (model.training says which). The harness still zeroes the gradients,
    # runs backward, clips, updates and schedules, in that order. With a step, per-batch values come
    # from it (metrics is not used), and make_model gets only the hyperparameters it names, so the
    # step can read the others from cfg.hparams.
    step: Callable[..., Any] | None = None
    eval_step: Callable[..., Any] | None = None
    # Draws the data and the model's test predictions on a matplotlib Axes.
    plot_predictions: Callable[[Any, Any, torch.Tensor], None] | None = None
    # The default search space: see harness.search.space.
    search_space: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # Set by the harness when it loads the experiment: how it was found, and the file's sha256.
    reference: str = ""
    sha256: str = ""

    def __post_init__(self):
        for kind, given in (("optimizers", self.optimizers), ("losses", self.losses)):
            if isinstance(given, str) or not isinstance(given, (tuple, list, Mapping, type(None))):
                raise ValueError(f"experiment {self.name!r}: {kind} must be a tuple of names or a mapping "
                                 f"{{name: factory}}, got {given!r}")
            if isinstance(given, Mapping) and not all(callable(f) for f in given.values()):
                raise ValueError(f"experiment {self.name!r}: every value of {kind} must be a factory (callable)")
        for kind in ("step", "eval_step", "metrics"):
            if getattr(self, kind) is not None and not callable(getattr(self, kind)):
                raise ValueError(f"experiment {self.name!r}: {kind} must be a function")
        if self.eval_step is not None and self.step is None:
            raise ValueError(f"experiment {self.name!r}: eval_step without step; give step (eval_step defaults to it)")
        if self.step is not None and self.metrics is not None:
            raise ValueError(f"experiment {self.name!r}: with its own step, return per-batch values from the step as "
                             "(loss, {name: value}); metrics is not used")
        clash = sorted(set(self.schedulers) & set(registry.SCHEDULERS))
        if clash:
            raise ValueError(f"experiment {self.name!r}: its own scheduler {clash[0]!r} is one of the harness's")
        # A run logs its config and these params of its own under the same names: a hyperparameter
        # of one of them would be overwritten in the run (torch_threads) or break the search's space
        # (optimizer_loss).
        taken = set(HARNESS_NAMES) | set(CONFIG_KEYS) | schema.names()["params"] | schema.names()["trial params"]
        seen = set()
        for hp in self.hyperparameters:
            if hp.name in taken or hp.name in seen:
                raise ValueError(f"experiment {self.name!r}: hyperparameter {hp.name!r} is declared twice "
                                 "or shadows a name the harness logs (a config key or a run's own param)")
            seen.add(hp.name)

    def load_data(self) -> Data | Datasets:
        """``make_data()``, with a failure in it (the experiment's own code) made one clear line."""
        try:
            data = self.make_data()
        except Exception as exc:
            raise UsageError(f"experiment {self.name!r}: make_data() failed: {described(exc)}") from None
        if not isinstance(data, (Data, Datasets)):
            raise UsageError(f"experiment {self.name!r}: make_data() returned a {type(data).__name__}, "
                             "not harness.experiment.Data or Datasets")
        try:
            sizes = data.n_train, len(data.test) if isinstance(data, Datasets) else len(data.X_test)
            n_valid = (len(data.valid) if isinstance(data, Datasets) else len(data.X_valid)) if data.has_valid else None
        except Exception as exc:
            raise UsageError(f"experiment {self.name!r}: its data has no length: {described(exc)}") from None
        if min(sizes) < 1 or n_valid == 0:
            valid = "" if n_valid is None else f", {n_valid} validation"
            raise UsageError(f"experiment {self.name!r}: make_data() gave {sizes[0]} training{valid} and {sizes[1]} "
                             "test samples; each part given must hold at least 1")
        return data

    def all_hyperparameters(self) -> tuple[Hyperparameter, ...]:
        """The harness's, torch's settings (an experiment's own of the same name wins), the experiment's."""
        own = {h.name for h in self.hyperparameters}
        settings = tuple(s for s in registry.SETTINGS if s.name not in own)
        return HARNESS_HYPERPARAMETERS + settings + tuple(self.hyperparameters)

    @property
    def own_optimizers(self) -> Mapping[str, Callable]:
        return self.optimizers if isinstance(self.optimizers, Mapping) else {}

    @property
    def own_losses(self) -> Mapping[str, Callable]:
        return self.losses if isinstance(self.losses, Mapping) else {}

    def optimizer_names(self) -> tuple[str, ...]:
        """Every optimizer a config of this experiment may name: torch's and its own."""
        return registry.optimizer_names(self.own_optimizers)

    def loss_names(self) -> tuple[str, ...]:
        return registry.loss_names(self.own_losses)

    def scheduler_names(self) -> tuple[str, ...]:
        return registry.SCHEDULERS + tuple(self.schedulers)

    def default_pairs(self) -> list[str]:
        """optimizer+loss pairs of the default search space: each listed optimizer with each listed loss."""
        losses = tuple(self.losses) if self.losses is not None else (self.defaults.get("loss", "l1"),)
        return [f"{o}+{loss}" for o in tuple(self.optimizers) for loss in losses]

    def model_arguments(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """What make_model is called with: every hyperparameter; with the experiment's own step or
        factories, which read cfg.hparams, only those make_model names (all if it takes **kwargs)."""
        if self.step is None and not self.own_optimizers and not self.own_losses and not self.schedulers:
            return dict(hparams)
        try:
            parameters = inspect.signature(self.make_model).parameters.values()
        except (TypeError, ValueError):
            return dict(hparams)
        if any(p.kind is p.VAR_KEYWORD for p in parameters):
            return dict(hparams)
        named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {k: v for k, v in hparams.items() if k in named}

    def hyperparameter(self, name: str) -> Hyperparameter | None:
        return next((h for h in self.all_hyperparameters() if h.name == name), None)

    def final_values(self, model: nn.Module) -> dict[str, float]:
        """What a run reads off its trained model: the experiment's scalars and their errors."""
        try:
            scalars = self.scalars(model)
        except Exception as exc:  # after the training loop, whose handling made the others one line
            raise ExperimentCodeError(f"scalars() raised {described(exc)}") from None
        if not isinstance(scalars, Mapping):
            raise ExperimentCodeError(f"scalars() must return a dict of names to numbers, got {type(scalars).__name__}")
        numbers = {}
        for name, value in scalars.items():
            try:
                numbers[name] = float(value)
            except (TypeError, ValueError, OverflowError, RuntimeError):  # RuntimeError: a tensor of many values
                raise ExperimentCodeError(f"scalars() gave {name!r} = {repr(value)[:60]}, not a number a float "
                                          "holds") from None
        errors = self.errors(numbers)
        clash = next((name for name in errors if name in numbers), None)
        if clash is not None:  # one value would silently replace the other
            raise ExperimentCodeError(f"scalars() gave {clash[:60]!r}, the name of the error the run computes "
                                      f"from the experiment's truth for {clash[:-len('_error')][:60]!r}; rename it")
        return {**numbers, **errors}

    def errors(self, scalars: Mapping[str, float]) -> dict[str, float]:
        """``<name>_error`` for each scalar whose true value the experiment declares."""
        return {f"{k}_error": abs(scalars[k] - v) for k, v in self.truth.items()
                if k in scalars and math.isfinite(scalars[k])}


# The config's own keys (harness.config.TrainConfig): no hyperparameter may take one of these names.
CONFIG_KEYS = ("experiment", "optimizer", "loss", "lr", "epochs", "seed", "device")
PACKAGE = "experiments"


def names() -> list[str]:
    package = importlib.import_module(PACKAGE)
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and hasattr(importlib.import_module(f"{PACKAGE}.{info.name}"), "EXPERIMENT"):
            found.append(info.name)
    return sorted(found)


def is_builtin(reference: str) -> bool:
    """An experiment of the ``experiments`` package, by its plain name (a top-level module of the
    same shape on the Python path is not one: a run's record may name only these)."""
    return reference.isidentifier() and importlib.util.find_spec(f"{PACKAGE}.{reference}") is not None


def is_file(reference: str) -> bool:
    return reference.endswith(".py") or os.sep in reference or "/" in reference


def load(reference: str) -> Experiment:
    """An experiment by name (``experiments/``), dotted module path, or file path (``.py``)."""
    reference = str(reference)
    if is_file(reference):
        return _load_file(reference)
    module_name = reference if "." in reference else f"{PACKAGE}.{reference}"
    if "." not in reference and reference.isidentifier() and importlib.util.find_spec(module_name) is None \
            and importlib.util.find_spec(reference) is not None:
        module_name = reference  # a top-level module of the user's (on PYTHONPATH); ours come first
    if not all(part.isidentifier() for part in module_name.split(".")):
        raise UsageError(f"unknown experiment {reference!r}; allowed: {', '.join(names())} "
                         f"(or a module path or a .py file defining EXPERIMENT){did_you_mean(reference, names())}")
    try:
        module = _importing(module_name, lambda: importlib.import_module(module_name))
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module_name.startswith(exc.name):
            raise UsageError(f"experiment module {module_name!r} failed to import: {described(exc)}") from None
        raise UsageError(f"unknown experiment {reference!r}; allowed: {', '.join(names())} "
                         f"(or a module path or a .py file defining EXPERIMENT){did_you_mean(reference, names())}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: the user's module does not end the harness
        raise UsageError(f"experiment module {module_name!r} raised on import: {described(exc)}") from None
    digest = ""
    if not is_builtin(reference.removeprefix(f"{PACKAGE}.")) and getattr(module, "__file__", None):
        # A user's module: its own package (or, for a top-level module, its folder) is its code.
        try:
            file = Path(module.__file__).resolve()
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError:
            pass
        else:
            depth = module_name.count(".") + (file.name == "__init__.py")
            folder = file.parents[depth - 1] if depth else file.parent
            digest = _with_local_imports(digest, module, folder, folder.parent if depth else folder)
    return _found(module, module_name, reference, digest)


def _load_file(reference: str) -> Experiment:
    try:
        path = Path(reference).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise UsageError(f"experiment file {reference!r} cannot be resolved: {described(exc)}") from None
    if not path.exists():
        raise UsageError(f"experiment file {reference!r} does not exist")
    if not path.is_file():
        raise UsageError(f"experiment file {reference!r} is not a regular file")
    if path.suffix != ".py":
        raise UsageError(f"experiment file {reference!r} must be a .py file")
    try:
        str(path).encode("utf-8")  # its path is logged with every run: MLflow and Optuna store UTF-8
    except UnicodeEncodeError:
        raise UsageError(f"experiment file {ascii(str(path))} has a path that is not UTF-8 text; "
                         "MLflow and Optuna store it with every run: rename its file or folder") from None
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read experiment file {reference!r}: {exc.strerror}") from None
    if len(content) > MAX_FILE_BYTES:
        raise UsageError(f"experiment file {reference!r} is {len(content)} bytes; at most {MAX_FILE_BYTES} allowed")
    digest = hashlib.sha256(content).hexdigest()
    module_name = f"harness_experiment_{path.stem if path.stem.isidentifier() else 'file'}_{digest[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up there
        try:
            _importing(module_name, lambda: spec.loader.exec_module(module))
        except BaseException as exc:
            del sys.modules[module_name]
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise UsageError(f"experiment file {reference!r} raised on import: {described(exc)}") from None
    return _found(module, str(path), str(path), _with_local_imports(digest, module, path.parent, path.parent))


def _found(module, where: str, reference: str, digest: str) -> Experiment:
    experiment = getattr(module, "EXPERIMENT", None)
    if experiment is None:
        raise UsageError(f"{where} defines no EXPERIMENT (it must set EXPERIMENT = harness.experiment.Experiment(...))")
    if not isinstance(experiment, Experiment):
        raise UsageError(f"{where}: EXPERIMENT is a {type(experiment).__name__}, not a harness Experiment")
    if not digest and getattr(module, "__file__", None):
        try:
            digest = hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
        except OSError:
            digest = ""
    if reference.startswith(f"{PACKAGE}.") and is_builtin(reference[len(PACKAGE) + 1:]):
        reference = reference[len(PACKAGE) + 1:]  # the plain name finds it again
    return replace(experiment, reference=reference, sha256=digest)


MAX_LOCAL_MODULES = 100  # files of the user's own code an experiment's identity covers
# Module name -> the names of the modules that importing it first loaded (see _importing).
_LOADED_WITH: dict[str, tuple[str, ...]] = {}


def _importing(name: str, load: Callable[[], Any]):
    """``load()`` (which imports module ``name``), remembering which modules it loaded: a helper the
    experiment imports under a computed name is found there, and only there."""
    before = set(sys.modules)
    try:
        return load()
    finally:
        if name in sys.modules and name not in _LOADED_WITH:
            _LOADED_WITH[name] = tuple(sorted(set(sys.modules) - before - {name}))


def _with_local_imports(digest: str, module, folder: Path, root: Path) -> str:
    """The experiment's identity: the sha256 of its file, and, where it loads modules of its own
    ``folder`` (a helper with the data or the model), of those files too: followed import by import,
    absolute (found under ``root``, where its imports start) and relative, ``import_module("name")``
    with a literal name, and whatever its import loaded from the folder under a computed name. An
    edited helper is another experiment (a study resumed with it is refused) as an edited file is;
    a file that loads none keeps the sha256 of the file alone."""
    import ast

    folder, root = folder.resolve(), root.resolve()
    own = Path(__file__).resolve().parent  # the harness's own modules are not the experiment's
    top = Path(module.__file__).resolve()
    seen: dict[Path, str] = {}
    todo = [top]
    loaded = [getattr(sys.modules.get(n), "__file__", None) for n in _LOADED_WITH.get(module.__name__, ())]
    todo += [Path(f).resolve() for f in loaded if f]
    while todo and len(seen) < MAX_LOCAL_MODULES:
        path = todo.pop()
        if path in seen or path.suffix != ".py" or not path.is_relative_to(folder) or path.is_relative_to(own):
            continue
        try:
            content = path.read_bytes()
            tree = ast.parse(content)
        except (OSError, SyntaxError, ValueError):
            continue
        seen[path] = f"{path.relative_to(folder)}:{hashlib.sha256(content).hexdigest()}"
        package = _package_of(path, root)
        for name in _imported_names(tree, package):
            todo += _module_files(name, root)
            where = getattr(sys.modules.get(name), "__file__", None)  # found through sys.path, elsewhere
            if where:
                todo.append(Path(where).resolve())
    seen.pop(top, None)
    if not seen:
        return digest
    return hashlib.sha256("\n".join([digest, *sorted(seen.values())]).encode()).hexdigest()


def _package_of(path: Path, root: Path) -> str:
    """The package a file under ``root`` belongs to, as its relative imports resolve ('' at the top)."""
    try:
        parts = list(path.relative_to(root).with_suffix("").parts)
    except ValueError:
        return ""
    return ".".join(parts[:-1])


def _imported_names(tree, package: str) -> list[str]:
    """Every module a file's code names to import: import statements anywhere (in a function too),
    relative ones resolved against ``package``, and calls of import_module or __import__ with a literal."""
    import ast

    def resolved(name: str) -> str | None:
        try:
            return importlib.util.resolve_name(name, package) if name.startswith(".") else name
        except (ImportError, ValueError):
            return None

    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolved("." * node.level + (node.module or ""))
            if base:  # `from a import b` imports a, and b too when b is a module of a
                names += [base, *(f"{base}.{a.name}" for a in node.names if a.name != "*")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) \
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__"):
            names.append(resolved(node.args[0].value))
    return [n for n in names if n]


def _module_files(name: str, root: Path) -> list[Path]:
    """The files under ``root`` that importing ``name`` runs: each package's __init__.py and the module's."""
    parts, found = name.split("."), []
    for i in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:i])
        found += [f for f in (base / "__init__.py", base.with_suffix(".py")) if f.is_file()]
    return found


def file_sha256(reference: str) -> str | None:
    """The sha256 of an experiment file as it is now; None when it is gone."""
    try:
        return hashlib.sha256(Path(reference).read_bytes()).hexdigest()
    except OSError:
        return None


