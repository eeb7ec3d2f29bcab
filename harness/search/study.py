"""Opening a study: storage from a URL, sampler and pruner by name, and the checks on resuming one."""
from __future__ import annotations

import json

import optuna

from ..errors import UsageError
from .space import SearchSpace

DEFAULT_STORAGE = "journal:optuna_journal.log"
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


def open_storage(url: str):
    """An Optuna storage. ``journal:PATH`` is Optuna's journal file, safe for several processes."""
    if storage_scheme(url) == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.split(":", 1)[1]))
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def redact(url: str) -> str:
    """The URL with any password removed, fit for tags, params and output."""
    if "://" not in url or "@" not in url.split("://", 1)[1]:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).set(password=None).render_as_string(hide_password=False)
    except Exception:  # not a URL SQLAlchemy can read: drop everything before the host
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.rsplit('@', 1)[1]}"


def make_sampler(name: str, seed: int | None, space: SearchSpace) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner() if name == "median" else optuna.pruners.NopPruner()


def open_study(name: str, storage, *, direction: str, sampler, pruner, space: SearchSpace,
               experiment: str) -> optuna.Study:
    """Create the study, or load it and refuse a different direction, experiment or space."""
    try:
        existing = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
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
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    study.set_user_attr(EXPERIMENT_ATTR, experiment)
    study.set_user_attr(SPACE_ATTR, space.to_dict())
    return study
