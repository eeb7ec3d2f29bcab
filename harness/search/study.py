"""Opening a study: storage from a URL, sampler and pruner by name, and the checks on resuming one."""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import optuna

from ..errors import UsageError
from ..numbers import natural
from ..store_files import empty_file
from ..tracking import default_tracking_uri
from ..urls import check_credentials, engine_url, redact, scrub, sqlite_path, sqlite_unreadable, sqlite_unwritable
from .space import SearchSpace
from .experimental import experimental_ok

DEFAULT_STORAGE = "journal:optuna_journal.log"
HEARTBEAT_S = 10
MAX_HEARTBEAT_S = 3600  # a trial silent for 3 hours is stale; Python's timers refuse much larger waits
CONNECT_TIMEOUT_S = 10
# Optuna replays a journal whole, into memory: about 1.5x its size for plain studies, 4.4x measured
# for one whose categorical has 60,000 choices (each trial's line repeats them, ~900 KB). So the bound
# is the machine's memory, not a fixed size that a wide categorical reaches in ~3,000 trials; 2 GiB,
# what every machine took before, stays allowed.
JOURNAL_REPLAY_FACTOR = 5
MIN_JOURNAL_LIMIT = 1 << 31
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
SAMPLERS = ("tpe", "random", "grid", "qmc", "cmaes", "gp", "nsga2")
PRUNERS = ("median", "percentile", "hyperband", "sha", "wilcoxon", "none")
# The settings each pruner takes from --pruner-args KEY=VALUE: Optuna's own argument names, each
# with its kind and lowest (and highest) value; what is not given keeps Optuna's default.
_STARTUP = {"n_startup_trials": ("int", 0), "n_warmup_steps": ("int", 0), "interval_steps": ("int", 1),
            "n_min_trials": ("int", 1)}
PRUNER_SETTINGS = {
    "median": _STARTUP,
    "percentile": {"percentile": ("float", 0, 100), **_STARTUP},
    "hyperband": {"min_resource": ("int", 1), "max_resource": ("int or auto", 1), "reduction_factor": ("int", 2),
                  "bootstrap_count": ("int", 0)},
    # A rung needs min_resource * reduction_factor ** (min_early_stopping_rate + rung) steps: past 63
    # no step reaches one (2 ** 63), while Optuna works out that power, as large, at every check.
    "sha": {"min_resource": ("int or auto", 1), "reduction_factor": ("int", 2),
            "min_early_stopping_rate": ("int", 0, 63), "bootstrap_count": ("int", 0)},
    "wilcoxon": {"p_threshold": ("float", 0, 1), "n_startup_steps": ("int", 0)},
    "none": {},
}
PERCENTILE = 25.0  # PercentilePruner's percentile when none is given (Optuna requires one): the top quarter goes on
_PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
            "sha": "SuccessiveHalvingPruner", "wilcoxon": "WilcoxonPruner", "none": "NopPruner"}
DIRECTIONS = ("minimize", "maximize")
from ..schema import (EXPERIMENT_CHANGES_ATTR, EXPERIMENT_SHA_PARAM, OBJECTIVES_ATTR, PAIR_TRIAL_PARAM, SPACE_ATTR,
                      STUDY_EXPERIMENT_ATTR as EXPERIMENT_ATTR, STUDY_EXPERIMENT_SHA_ATTR as SOURCE_ATTR)
from . import objectives as objectives_module


def storage_scheme(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0] if ":" in url else ""
    if scheme not in (*RDB_SCHEMES, "journal"):
        raise UsageError(f"unknown storage scheme in {redact(url)!r}; allowed: "
                         "journal:PATH, sqlite:///PATH, postgresql://..., mysql://...")
    return scheme


def check_storage(url: str, writes: bool = True, tracking_uri: str | None = None) -> str:
    """The URL's scheme, once the URL is known to name a storage that can hold a study (and, where
    ``writes``, be written to) apart from the MLflow store at ``tracking_uri`` (default: the one
    commands and ``Objective`` use); else UsageError, before anything is made: SQLAlchemy creates an
    SQLite file on connecting, and the harness a lock file beside it, even where SQLite then opens
    the database read-only or not at all."""
    from .durable.own_files import check_apart

    scheme = storage_scheme(url)
    check_credentials(url, "storage")
    check_apart(url, default_tracking_uri() if tracking_uri is None else tracking_uri)
    if scheme == "journal":
        path = journal_path(url)
        if writes:
            check_journal_writable(path)
    elif scheme == "sqlite":
        database = sqlite_path(url)
        if database is None:
            raise UsageError(f"malformed storage URL {redact(url)!r}; a SQLite storage is sqlite:///PATH")
        unkept = sqlite_unwritable(url) if writes else sqlite_unreadable(url)
        if unkept:
            raise UsageError(f"storage {redact(url)} is {unkept}; use sqlite:///PATH (a file) or journal:PATH")
        if Path(database).exists() and not Path(database).is_file():
            raise UsageError(f"SQLite storage {database!r} is not a regular file")
        if not Path(database).parent.is_dir():
            raise UsageError(f"SQLite storage {database!r}: folder {str(Path(database).parent)!r} does not exist")
    return scheme


def holds_no_study(url: str, tables: bool | None = None) -> bool:
    """Whether a file storage holds nothing yet: a journal that is not there, an SQLite database
    that is not there, empty, or without Optuna's tables. Opening one makes them. ``tables``:
    ``tables_of(url)``, where the caller looked already."""
    scheme = storage_scheme(url)
    if scheme == "journal":
        return not Path(_journal_file(url)).exists()
    return scheme == "sqlite" and (tables_of(url) if tables is None else tables) is False


def tables_of(url: str) -> bool | None:
    """Whether an SQLite storage's database holds Optuna's tables (False for a file that is not
    there or is empty, which is not opened); None for another storage, or a file that is no
    database (opening it says why)."""
    if storage_scheme(url) != "sqlite":
        return None
    try:
        return _optuna_tables(url)
    except Exception:
        return None


def open_storage(url: str, must_exist: bool = False, heartbeat: int = HEARTBEAT_S,
                 repair: bool = True, notify=None, checked: bool = False, tables: bool | None = None):
    """An Optuna storage. ``journal:PATH`` is Optuna's journal file, safe for several processes;
    damage a crash left in it is repaired before the first append or ``repair_journal`` (see
    journal.py), unless ``repair`` is False, when a journal that Optuna cannot read raises JournalDamaged.

    RDB storages get Optuna's heartbeat: a trial whose worker stops beating for ``3 * heartbeat``
    seconds is failed and its configuration retried by the next worker that starts a trial.

    ``checked``: ``check_storage(url, writes=repair)`` passed already (a search's options check it
    before anything else), and is not repeated. ``tables``: ``tables_of(url)`` where the caller
    looked already: True is not looked up again (tables once made stay).
    """
    from .durable.retries import Retry
    from .durable.storages import HarnessRDBStorage, schema_lock

    scheme = storage_scheme(url) if checked else check_storage(url, writes=repair)
    path = _journal_file(url) if scheme == "journal" else sqlite_path(url) if scheme == "sqlite" else None
    if must_exist and path is not None and (not Path(path).exists() or (scheme != "journal" and empty_file(path))):
        raise UsageError(f"no Optuna storage at {redact(url)}")
    if scheme == "journal":
        return _open_journal(path, repair, notify)
    engine_kwargs: dict = {"pool_pre_ping": True}  # connections that idled out are replaced, not failed
    if scheme == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    # Optuna creates its tables in any database it opens, holding a lock that is a file beside an
    # SQLite one: taken only where they are yet to be made. A reader makes nothing (no table, no lock
    # file), and a database that holds none is no storage to read; one opened read-only (only a
    # reader gets here with one) has its tables, or is refused by SQLite.
    reader = scheme == "sqlite" and not repair
    started = time.time()
    try:
        made = scheme == "sqlite" and (tables or _optuna_tables(url))
        if reader and not made:
            raise UsageError(f"no Optuna storage at {redact(url)}: its database holds no Optuna tables")
        locked = nullcontext() if made else schema_lock(engine_url(url), engine_kwargs)
        with experimental_ok(), locked:  # heartbeats: experimental since 2.x
            storage = HarnessRDBStorage(
                engine_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=Retry(max_retry=3))
    except UsageError:
        raise
    except ImportError as exc:
        raise UsageError(f"storage {redact(url)} needs a database driver that is not installed "
                         f"({scrub(str(exc), url)}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as exc:  # sqlalchemy's OperationalError and friends
        from ..tracking import unreachable

        raise unreachable("the Optuna storage", url, time.time() - started, exc) from None
    return storage


def _optuna_tables(url: str) -> bool:
    """Whether the SQLite database of ``url`` holds Optuna's tables; a file that is not there (or is
    empty) is not opened, which would make it."""
    from sqlalchemy import create_engine, inspect

    path = sqlite_path(url)
    if path is None or not Path(path).exists() or empty_file(path):
        return False
    engine = create_engine(engine_url(url))
    try:
        return inspect(engine).has_table("studies")
    finally:
        engine.dispose()


def _journal_file(url: str) -> str:
    """The file a ``journal:PATH`` URL names, unchecked (``journal_path`` checks it)."""
    return url.split(":", 1)[1]


def journal_path(url: str) -> str:
    """The file of a ``journal:PATH`` URL, refused unless it is an Optuna journal or a path where a
    regular file can be made (see _journal_file_error and journal.not_a_journal)."""
    from .durable.journal import not_a_journal

    path = _journal_file(url)
    if not path:
        raise UsageError("--storage journal: needs a file path, e.g. journal:optuna_journal.log")
    why = _journal_file_error(path)
    if why:
        raise UsageError(f"Optuna journal {path!r} {why}; a journal is a regular file, or a path in an existing "
                         "folder where one can be made, e.g. journal:optuna_journal.log")
    target = Path(path)
    if not target.exists():
        return path
    if target.stat().st_size > max_journal_bytes():
        raise UsageError(f"Optuna journal {path!r} is {target.stat().st_size} bytes, more than this machine's "
                         f"{memory_bytes()} bytes of memory can replay (Optuna reads it whole, up to "
                         f"{JOURNAL_REPLAY_FACTOR}x its size); studies that large belong in an RDB storage "
                         "(postgresql://...)")
    try:
        why = not_a_journal(path)
    except OSError as exc:
        raise UsageError(f"Optuna journal {path!r} cannot be read ({exc.strerror or exc})") from None
    if why:
        raise UsageError(f"{path!r} is not an Optuna journal: {why}; give journal:PATH a journal file, "
                         "or a new path for a new one (nothing was written)")
    return path


def _journal_file_error(path: str) -> str | None:
    """What makes ``path`` no place for a journal file, whatever its form: a folder (a trailing slash
    too), a device, FIFO or socket, a link to one or to nothing, a link loop; None where it is a
    regular file or can become one."""
    import stat

    if os.path.basename(path) in ("", ".", ".."):
        return "names a folder"
    try:
        linked = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        linked = None
    except OSError as exc:  # a component that is a file, a name too long, no right to look
        return f"cannot be looked up ({exc.strerror or exc})"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if linked:  # Optuna would create the file the link points to, wherever that is
            return f"is a symbolic link to nothing ({os.readlink(path)!r})"
        folder = os.path.dirname(path) or "."
        return None if os.path.isdir(folder) else f"cannot be created: {folder!r} is not a directory"
    except OSError as exc:  # a link loop
        return f"cannot be opened ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a device, FIFO or socket"
        return f"is not a regular file ({kind}{', through a symbolic link' if linked else ''})"
    return None


def memory_bytes() -> int:
    """This process's memory: the machine's, or its container's limit (cgroup v2) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    bound = natural(limit)  # 'max' where the cgroup sets none
    return total if bound is None else min(total, bound)


def max_journal_bytes() -> int:
    return max(MIN_JOURNAL_LIMIT, memory_bytes() // JOURNAL_REPLAY_FACTOR)


def check_journal_writable(path: str) -> None:
    """A journal this process must write, and the folder its lock files go in, writable by it: said
    in one line with what still works, before anything (the MLflow store included) is made, and
    before Optuna's lock fails with a bare OSError or waits forever on something in its place."""
    from ..filelock import LOCK_SUFFIX
    from .durable.journal import TORN_SUFFIX
    from .durable.optuna_private import journal_lock_names

    folder = Path(os.path.dirname(path) or ".")
    for place in (folder, Path(path)):
        if place.exists() and not os.access(place, os.W_OK):
            try:  # the reason: a read-only file system, or the permissions
                readonly = bool(os.statvfs(place).f_flag & os.ST_RDONLY)
            except OSError:
                readonly = False
            why = "on a read-only file system" if readonly else "not writable by this user"
            raise UsageError(f"the Optuna journal {path!r} cannot be written here ({str(place)!r} is {why}): a "
                             "search and `audit --fix` append to it and lock it; `harness audit` without --fix, "
                             "`compare`, `predict` and `reproduce` read it as it is, or copy the folder somewhere "
                             "writable")
    optuna_lock, longest = journal_lock_names(path)
    name_max = os.pathconf(folder, "PC_NAME_MAX")
    made = max(len(os.path.basename(name)) for name in (longest, path + LOCK_SUFFIX, path + TORN_SUFFIX + "x" * 24))
    if made > name_max:
        raise UsageError(f"Optuna journal {path!r}: its name is too long for the lock files made beside it "
                         f"({made} characters, this file system takes {name_max}); use a shorter name")
    # Optuna's lock is a symbolic link (one held, or left by a dead worker, which Optuna breaks after
    # 30 s); anything else there it waits on forever. The harness's is a plain file it opens to append.
    in_the_way = [(optuna_lock, "Optuna's lock, a symbolic link")] if os.path.lexists(optuna_lock) and \
        not os.path.islink(optuna_lock) else []
    harness_lock = Path(path + LOCK_SUFFIX)
    if os.path.lexists(harness_lock) and (harness_lock.is_symlink() or not harness_lock.is_file()):
        in_the_way.append((str(harness_lock), "the harness's lock file"))
    if in_the_way:
        lock, kind = in_the_way[0]
        raise UsageError(f"Optuna journal {path!r}: {lock!r} is in the way of {kind}: remove it")


def _open_journal(path: str, repair: bool, notify):
    from ..errors import HarnessError, described
    from .durable.journal import Journal, JournalDamaged, full_damage
    from .durable.storages import HarnessJournalStorage

    def journal():
        return Journal(path, **({"notify": notify} if notify else {}))

    opened = journal()  # a writer's journal was checked writable with the URL (check_storage)
    try:  # a torn last line is no obstacle: Optuna skips it, and the first append cuts it
        return HarnessJournalStorage(opened)
    except (OSError, MemoryError, HarnessError):  # not the file's content: reading it again would not help
        raise
    except Exception:  # a line Optuna's replay stops at: damage in the middle, or no operation it knows
        damage = full_damage(path)
        if damage is None:
            raise
        if not repair:
            raise JournalDamaged(f"{damage.describe(path)}: Optuna cannot read past it; "
                                 "`harness audit --fix` repairs it (keeping a copy of what it removes)") from None
    owing = journal()  # a fresh backend: the old one's offsets are the damaged file's
    owing.owe_repair(damage)
    try:
        return HarnessJournalStorage(owing)
    except Exception as exc:  # noqa: BLE001 - whatever the replay raises, said in one line; nothing written
        raise HarnessError(f"{damage.describe(path)}, and Optuna cannot read it even without those lines "
                           f"({described(exc)}); nothing was changed") from None


def repair_journal(storage) -> None:
    """Repair now what damage a journal storage was opened with (see journal.Journal.owe_repair): a
    command calls it once every check of its input passed, before it writes; other storages: nothing."""
    from .durable.journal import Journal
    from .durable.optuna_private import journal_log

    log = journal_log(storage)
    if isinstance(log, Journal):  # a plain Optuna backend (a script's own) repairs nothing
        log.repair()


def make_sampler(name: str, seed: int | None, space: SearchSpace) -> optuna.samplers.BaseSampler:
    samplers = optuna.samplers
    with experimental_ok():
        if name == "tpe":
            # Optuna 5's defaults, which are what this search wants: multivariate for one objective
            # (lr and epochs modelled jointly; independent for two, as Optuna picks), and
            # constant_liar: trials running elsewhere (other workers, --n-jobs, the same --batch)
            # count as poor ones, so TPE spreads them instead of proposing one region many times;
            # a lone worker asks with nothing running, where it changes nothing.
            return samplers.TPESampler(seed=seed)
        if name == "random":
            return samplers.RandomSampler(seed=seed)
        if name == "qmc":  # scrambled Sobol points: an even first sweep of the numeric axes
            return samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
        if name == "cmaes":
            return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "gp":
            return samplers.GPSampler(seed=seed)
        if name == "nsga2":  # a genetic algorithm for two objectives (also runs a study of one)
            return samplers.NSGAIISampler(seed=seed)
        return samplers.GridSampler(space.grid(), seed=seed)


def independent_axes(name: str, space: SearchSpace) -> list[str]:
    """The space's categorical axes that sampler ``name`` draws at random, apart from its model
    (Optuna's qmc and cmaes model numeric axes only, and fall back to independent sampling)."""
    if name not in ("qmc", "cmaes"):
        return []
    return [PAIR_TRIAL_PARAM, *(param.name for param in space.params if param.choices is not None)]


def pruner_settings(name: str, items: list[str] | None) -> dict:
    """``--pruner-args KEY=VALUE ...`` checked against the pruner's settings; a one-line UsageError
    names the bad one and what is allowed."""
    from ..errors import did_you_mean

    allowed = PRUNER_SETTINGS[name]
    settings: dict = {}
    given_as: dict[str, str] = {}
    # One item may hold several, space-separated (MLproject's -P pruner_args="a=1 b=2"), or none ("").
    for item in (part for given in items or () for part in given.split()):
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--pruner-args {item!r}: expected KEY=VALUE, e.g. "
                             f"{next(iter(allowed), 'n_startup_trials')}=5")
        if not allowed:
            raise UsageError(f"--pruner-args {item!r}: --pruner {name} takes no settings")
        if key not in allowed:
            raise UsageError(f"--pruner-args: {name} has no setting {key!r}; its settings: "
                             f"{', '.join(allowed)}{did_you_mean(key, allowed)}")
        if key in settings:  # which one was meant is a guess: the last would win silently
            raise UsageError(f"--pruner-args {key} is given twice ({given_as[key]!r} and {text!r}); give each "
                             "setting once")
        settings[key], given_as[key] = _setting(f"--pruner-args {key}", text, *allowed[key]), text
    low, high = settings.get("min_resource"), settings.get("max_resource")
    if isinstance(low, int) and isinstance(high, int) and high < low:  # Optuna would find out only while pruning
        raise UsageError(f"--pruner-args max_resource={high} is below min_resource={low}; "
                         "max_resource must be >= min_resource")
    return settings


def _setting(name: str, text: str, kind: str, low, high=None):
    from .. import config

    if kind == "int or auto" and text == "auto":
        return "auto"
    if kind.startswith("int"):
        return config.int_in(name, text, low, config.INT_LIMIT if high is None else high)
    return config.float_in(name, text, low, high)


def make_pruner(name: str, settings: dict | None = None) -> optuna.pruners.BasePruner:
    """Pruner ``name`` with ``settings`` (checked by pruner_settings); a value Optuna refuses
    beyond those checks is a one-line UsageError too."""
    settings = dict(settings or {})
    if name == "percentile":
        settings.setdefault("percentile", PERCENTILE)
    if name == "wilcoxon":
        # Trials of different epochs report different steps: the test pairs the steps both have,
        # as documented, and Optuna's warning that it does would come at every pruning check.
        warnings.filterwarnings("ignore", message="WilcoxonPruner finds steps", category=UserWarning)
        # A best trial from a search without a pruner has no reports (none are written then): wilcoxon
        # prunes nothing until a trial that reports is best, and Optuna would say so at every check.
        warnings.filterwarnings("ignore", message="The best trial has no intermediate values", category=UserWarning)
    try:
        with experimental_ok():
            return getattr(optuna.pruners, _PRUNERS[name])(**settings)
    except ValueError as exc:
        shown = " ".join(f"{k}={v}" for k, v in settings.items())
        raise UsageError(f"--pruner {name} --pruner-args {shown}: {str(exc).strip().splitlines()[0]}") from None


def pruner_description(name: str, settings: dict | None = None) -> str:
    """Every setting of the pruner as it runs, Optuna's defaults included: what the parent run logs."""
    import inspect

    cls = getattr(optuna.pruners, _PRUNERS[name])
    given = {**({"percentile": PERCENTILE} if name == "percentile" else {}), **(settings or {})}
    full = {key: given.get(key, param.default) for key, param in inspect.signature(cls).parameters.items()
            if key in PRUNER_SETTINGS[name]}
    return json.dumps(full, sort_keys=True)


def existing_study(name: str, storage, *, direction: str, sampler, pruner, space: SearchSpace,
                   experiment: str, objectives: tuple[str, ...] = objectives_module.DEFAULT,
                   experiment_sha256: str = "", allow_changed_experiment: bool = False) -> optuna.Study | None:
    """The study if it exists, refused if its objectives, direction, experiment (its name, or the
    sha256 of its file, unless ``allow_changed_experiment``) or space differ. Writes nothing."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        return None
    stored_objectives = objectives_module.of_study(existing)
    # Two unnamed objectives are a script's own: their trials' second value may be anything.
    if stored_objectives != tuple(objectives) and (stored_objectives or len(existing.directions) != len(objectives)
                                                   or existing.get_trials(deepcopy=False)):
        shown = " ".join(stored_objectives) if stored_objectives else f"{len(existing.directions)} unnamed ones"
        hint = f"resume it with --objectives {shown}, or use" if objectives_module.known(stored_objectives) else "use"
        raise UsageError(f"study {name!r} has objectives {shown}, not {' '.join(objectives)}; {hint} "
                         "another --study-name")
    if existing.directions[0].name.lower() != direction:
        raise UsageError(f"study {name!r} exists with direction {existing.directions[0].name.lower()}, "
                         f"not {direction}; use another --study-name")
    stored_experiment = existing.user_attrs.get(EXPERIMENT_ATTR, experiment)
    if stored_experiment != experiment:
        raise UsageError(f"study {name!r} searches experiment {stored_experiment!r}, not {experiment!r}; "
                         "use another --study-name")
    check_source(existing, experiment, experiment_sha256, allow_changed_experiment)
    stored = existing.user_attrs.get(SPACE_ATTR)
    if stored is not None and stored != space.to_dict():
        raise UsageError(f"study {name!r} was created with search space {json.dumps(stored)}, "
                         f"incompatible with {json.dumps(space.to_dict())}; use another --study-name")
    return existing


def being_created(name: str, storage) -> bool:
    """Whether the study exists as Optuna makes it, without the harness's own attrs or any trial yet:
    a worker creating it has not written them yet (or a script made it empty)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return False
    written = (EXPERIMENT_ATTR, SPACE_ATTR, OBJECTIVES_ATTR)  # what create_study writes
    return not set(written) <= set(study.user_attrs) and not study.get_trials(deepcopy=False)


def create_study(name: str, storage, *, direction: str, sampler, pruner, space: SearchSpace,
                 experiment: str, objectives: tuple[str, ...] = objectives_module.DEFAULT,
                 experiment_sha256: str = "", allow_changed_experiment: bool = False) -> optuna.Study:
    """A new study (or the one another worker created a moment ago), with what resuming checks against."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=objectives_module.directions(objectives, direction), load_if_exists=True)
    if EXPERIMENT_ATTR not in study.user_attrs:
        if experiment_sha256:
            study.set_user_attr(SOURCE_ATTR, experiment_sha256)
        study.set_user_attr(EXPERIMENT_ATTR, experiment)
        study.set_user_attr(SPACE_ATTR, space.to_dict())
        objectives_module.name_study(study, objectives)
    else:  # another worker's, with another file of the same experiment name, would mix their trials
        check_source(study, experiment, experiment_sha256, allow_changed_experiment)
        record_source(study, experiment_sha256)
    return study


def check_source(study: optuna.Study, experiment: str, sha256: str, allow_changed: bool = False) -> None:
    """Refuses a study whose experiment file is not the one it was created with: the same name and
    space with other data or another model would resume it silently, and its best trial would then
    compare losses of different code. Writes nothing."""
    stored = study.user_attrs.get(SOURCE_ATTR)
    if stored and sha256 and stored != sha256 and not allow_changed:
        raise UsageError(f"study {study.study_name!r} was created with experiment {experiment!r} from a file of "
                         f"sha256 {stored[:12]}, not this one's {sha256[:12]}: its trials would be compared with "
                         "trials of other code or data; use another --study-name, or --allow-changed-experiment "
                         "to go on with this study (the change is recorded in it)")


def record_source(study: optuna.Study, sha256: str) -> None:
    """The experiment file's sha256 in a study that passed ``check_source``: a study made before it
    was recorded gets it; an accepted change is kept with the first trial it applies to."""
    stored = study.user_attrs.get(SOURCE_ATTR)
    if not sha256 or stored == sha256:
        return
    if stored:
        first = len(study.get_trials(deepcopy=False))
        changes = [*study.user_attrs.get(EXPERIMENT_CHANGES_ATTR, []), {"trial": first, "sha256": sha256, "was": stored}]
        study.set_user_attr(EXPERIMENT_CHANGES_ATTR, changes)
        print(f"harness: study {study.study_name!r} goes on with an experiment file of sha256 {sha256[:12]} (was "
              f"{stored[:12]}) from trial {first} on; each trial's run has its file's sha256 in param "
              f"{EXPERIMENT_SHA_PARAM}", file=sys.stderr)
    study.set_user_attr(SOURCE_ATTR, sha256)
