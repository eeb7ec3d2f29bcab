"""The user's cache folder, where the harness keeps what outlives a command: the MLflow store template
(store_template.py) and the workers' leases (search/durable/workers.py)."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache() -> Path | None:
    """The user's cache folder: $XDG_CACHE_HOME where it is an absolute path (the XDG spec: a relative
    one is ignored: it would name another folder in each working directory), else ~/.cache; None
    where the user has no home (a container's user: Path.home() raises) or only a relative one."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(cache):
        return Path(cache)
    try:
        home = Path.home()
    except RuntimeError:
        return None
    return home / ".cache" if home.is_absolute() else None
