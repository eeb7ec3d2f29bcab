"""Opening a study: storage from a URL, sampler and pruner by name, and the checks on resuming one."""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import optuna

from ..errors import UsageError
from .space import SearchSpace

DEFAULT_STORAGE = "journal:optuna_journal.log"
HEARTBEAT_S = 10
CONNECT_TIMEOUT_S = 10
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
DIRECTIONS = ("minimize", "maximize")
SPACE_ATTR = "harness.space"
EXPERIMENT_ATTR = "harness.experiment"


def storage_scheme(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0] if ":" in url else ""
    if scheme not in (*RDB_SCHEMES, "journal"):
        raise UsageError(f"unknown storage scheme in {redact(url)!r}; allowed: "
                         "journal:PATH, sqlite:///PATH, postgresql://..., mysql://...")
    return scheme


def missing_journal(url: str) -> bool:
    return storage_scheme(url) == "journal" and not Path(url.split(":", 1)[1]).exists()


def open_storage(url: str, must_exist: bool = False, heartbeat: int = HEARTBEAT_S, max_trials: int | None = None):
    """An Optuna storage. ``journal:PATH`` is Optuna's journal file, safe for several processes.

    RDB storages get Optuna's heartbeat: a trial whose worker stops beating for ``3 * heartbeat``
    seconds is failed and its configuration retried by the next worker that starts a trial.
    ``max_trials`` caps the study's trials across every worker (see storages.py).
    """
    from .storages import CappedJournalStorage, CappedRDBStorage, schema_lock

    scheme = storage_scheme(url)
    path = url.split(":", 1)[1] if scheme == "journal" else url[len("sqlite:///"):] if scheme == "sqlite" else None
    if must_exist and path is not None and not Path(path).exists():
        raise UsageError(f"no Optuna storage at {redact(url)}")
    if scheme == "journal":
        from optuna.storages.journal import JournalFileBackend

        storage = CappedJournalStorage(JournalFileBackend(path))
        storage.max_trials = max_trials
        return storage
    engine_kwargs: dict = {"pool_pre_ping": True}  # connections that idled out are replaced, not failed
    if scheme == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    started = time.time()
    try:
        with warnings.catch_warnings(), schema_lock(engine_url(url), engine_kwargs):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, since 2.x
            storage = CappedRDBStorage(
                engine_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except ImportError as exc:
        raise UsageError(f"storage {redact(url)} needs a database driver that is not installed "
                         f"({scrub(str(exc), url)}); for PostgreSQL: pip install 'psycopg[binary]'") from None
    except Exception as exc:  # sqlalchemy's OperationalError and friends
        from ..tracking import unreachable

        raise unreachable("the Optuna storage", url, time.time() - started, exc) from None
    storage.max_trials = max_trials
    return storage


def engine_url(url: str) -> str:
    """``postgresql://`` pinned to psycopg 3 (the driver the harness installs): SQLAlchemy before 2.1
    reads a bare ``postgresql://`` as psycopg2, from 2.1 on as psycopg."""
    return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def redact(url: str) -> str:
    """The URL with any password removed (user and host kept), fit for tags, params and output."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        credentials, host = netloc.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    return f"{scheme}://{netloc}{slash}{path}"


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password, if it has one, replaced by ***."""
    if "://" in url and "@" in url:
        credentials = url.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in credentials:
            password = credentials.split(":", 1)[1]
            if password:
                text = text.replace(password, "***")
    return text


def make_sampler(name: str, seed: int | None, space: SearchSpace) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def existing_study(name: str, storage, *, direction: str, sampler, pruner, space: SearchSpace,
                   experiment: str) -> optuna.Study | None:
    """The study if it exists, refused if its direction, experiment or space differ. Writes nothing."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        return None
    if existing.direction.name.lower() != direction:
        raise UsageError(f"study {name!r} exists with direction {existing.direction.name.lower()}, "
                         f"not {direction}; use another --study-name")
    stored_experiment = existing.user_attrs.get(EXPERIMENT_ATTR, experiment)
    if stored_experiment != experiment:
        raise UsageError(f"study {name!r} searches experiment {stored_experiment!r}, not {experiment!r}; "
                         "use another --study-name")
    stored = existing.user_attrs.get(SPACE_ATTR)
    if stored is not None and stored != space.to_dict():
        raise UsageError(f"study {name!r} was created with search space {json.dumps(stored)}, "
                         f"incompatible with {json.dumps(space.to_dict())}; use another --study-name")
    return existing


def create_study(name: str, storage, *, direction: str, sampler, pruner, space: SearchSpace,
                 experiment: str) -> optuna.Study:
    """A new study (or the one another worker created a moment ago), with what resuming checks against."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    if EXPERIMENT_ATTR not in study.user_attrs:
        study.set_user_attr(EXPERIMENT_ATTR, experiment)
        study.set_user_attr(SPACE_ATTR, space.to_dict())
    return study
