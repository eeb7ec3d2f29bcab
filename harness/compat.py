"""Which MLflow and Optuna the harness's shortcuts through their internals were checked on.

pyproject.toml admits any MLflow 3 from 3.17 and any Optuna 5, so that the harness installs beside
what a user already has. Two things depend on more than their public API:
- the fast paths that write and read MLflow's SQLite tables directly (mlflow_sql, local_store):
  taken only on the MLflow releases tests/test_mlflow_conformance.py compared value for value with
  MLflow's own path, and on the schema revision those releases migrate a store to. On any other
  release MLflow's public client does the same work, slower, and a notice says so once;
- Optuna's private storage methods (search/optuna_private.py): used where they exist; each one's
  behaviour is checked by tests/test_optuna_private.py on the releases in ``OPTUNA_TESTED``.

constraints.txt pins the tested releases for the README's commands and CI. To admit a new release:
run those two test files on it, then add it here and in constraints.txt.

Nothing here imports mlflow or optuna (``harness predict`` reads a store without either).
"""
from __future__ import annotations

import sys
import threading
from functools import lru_cache

MLFLOW_TESTED = ("3.17.2",)
# The revision MLflow 3.17 migrates a new store to: the tables the fast paths use are that revision's.
MLFLOW_SCHEMA_REVISION = "dc11669786a5"
# store_template.fingerprint of that release's empty store (a new store less its Default experiment):
# the only template a new store is copied from.
MLFLOW_EMPTY_STORE_SHA256 = "8c2548b09e3ebdddd31700311fb2f88dc37be27d66f823fa22ce31b8d5b8c264"
OPTUNA_TESTED = ("5.0.0",)

_said: set[str] = set()
_lock = threading.Lock()


@lru_cache(maxsize=None)
def installed(package: str) -> str | None:
    """The installed release of ``package``, read from its metadata (the package is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def mlflow_tested() -> bool:
    """Whether the installed MLflow is one the direct SQLite paths were checked on; the first time
    it is not, a notice on stderr says that MLflow's public API does their work."""
    release = installed("mlflow")
    if release in MLFLOW_TESTED:
        return True
    notice("mlflow", f"harness: MLflow {release} is not a release the harness's direct SQLite paths were "
                     f"checked on ({', '.join(MLFLOW_TESTED)}): runs are written and read through MLflow's "
                     "public API instead (the same records, slower for large studies)")
    return False


def schema_tested(revision) -> bool:
    """Whether a store's alembic revision is the one the direct paths were checked on. Silent: on a
    tested MLflow another revision is a store MLflow itself refuses or migrates, and says so."""
    return revision == MLFLOW_SCHEMA_REVISION


def notice(key: str, line: str) -> None:
    """``line`` on stderr, once per process for each ``key``."""
    with _lock:
        if key in _said:
            return
        _said.add(key)
    print(line, file=sys.stderr)
