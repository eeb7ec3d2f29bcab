"""Which torch device a run uses."""
from __future__ import annotations

import torch

CHOICES = ("auto", "cpu", "cuda", "mps")


def available() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve(name: str) -> str:
    """'auto' picks the best device present; an explicit name must be present."""
    present = available()
    if name == "auto":
        return present[-1] if len(present) > 1 else "cpu"
    return name if name in present else ""
