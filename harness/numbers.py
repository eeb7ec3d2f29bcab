"""Numbers read back from names and records the harness did not necessarily write itself."""
from __future__ import annotations

import re

# ASCII digits only, and few enough for any pid, port, count or epoch: str.isdigit() also takes '²'
# (which int() refuses) and '٣' (which int() reads as 3), and int() refuses 4300 digits and more.
_NATURAL = re.compile(r"[0-9]{1,18}")


def natural(text) -> int | None:
    """``text`` as a non-negative int where it is 1 to 18 ASCII digits and nothing else; else None."""
    return int(text) if isinstance(text, str) and _NATURAL.fullmatch(text) else None
