"""Issue 27's done-when, measured: following the search command's ``args`` through the code (every
harness function that is handed ``args``, or the options parsed from them, in the order called) makes
at most ~30 stays with at most ~15 returns to a module already left. A stay is a run of such calls in
one module; a return is a stay in a module the walk had left before. The reviewer's walk of e32b817
counted 61 stays and 45 returns; one more module that needs ``args`` beside the options door, or
options re-parsed on the way, shows here."""
import argparse
import dataclasses
import sys
import threading

import pytest

MAX_STAYS, MAX_RETURNS = 30, 15
SEARCH = "harness.search."


def _is_args(value) -> bool:
    return isinstance(value, argparse.Namespace) and getattr(value, "handler", None) is not None


def _derived(options, found: set[int]) -> set[int]:
    """The ids of ``options`` and of the search layer's values it carries (space, objectives, trial
    options), not the experiment: that is the user's code and data, not the command line."""
    if id(options) not in found and dataclasses.is_dataclass(options) and type(options).__module__.startswith(SEARCH):
        found.add(id(options))
        for field in dataclasses.fields(options):
            _derived(getattr(options, field.name, None), found)  # None: still in its __init__
    return found


def walk(argv: list[str]) -> list[tuple[str, list[str]]]:
    """The stays of ``harness ARGV``'s args: (module, functions called there in that stay)."""
    from harness.cli import main

    calls: list[tuple[str, str]] = []
    watched: set[int] = set()

    def trace(frame, event, arg):
        # A global trace function is called at each Python call only (a profile function at every
        # return and C call too, which made this test's search ~1.5x slower); returning None traces no lines.
        if event != "call" or not frame.f_globals.get("__name__", "").startswith("harness"):
            return
        # At a call, a frame's locals are its arguments: the function was handed the options.
        values = frame.f_locals.values()
        for value in values:
            if type(value).__name__ == "SearchOptions" and hasattr(value, "trials"):  # built, not being built
                watched.discard(id(value))
                _derived(value, watched)
        if any(_is_args(v) or id(v) in watched for v in values):
            calls.append((frame.f_globals["__name__"], frame.f_code.co_name))

    sys.settrace(trace)
    threading.settrace(trace)
    try:
        status = main(argv)
    finally:
        sys.settrace(None)
        threading.settrace(None)
    assert status == 0
    stays: list[tuple[str, list[str]]] = []
    for module, function in calls:
        if stays and stays[-1][0] == module:
            stays[-1][1].append(function)
        else:
            stays.append((module, [function]))
    return stays


def returns(stays) -> int:
    seen, count = set(), 0
    for module, _ in stays:
        count += module in seen
        seen.add(module)
    return count


@pytest.mark.usefixtures("in_workdir")
@pytest.mark.slow  # a whole search under a trace function (~10 s)
def test_the_search_args_walk_is_short():
    stays = walk(["search", "--n-trials", "1", "--epochs-range", "5", "6", "--no-progress"])
    shown = "\n".join(f"{module}: {', '.join(dict.fromkeys(functions))}" for module, functions in stays)
    assert stays[0][0] == "harness.commands.search" and any(m == SEARCH + "options" for m, _ in stays), shown
    assert len(stays) <= MAX_STAYS and returns(stays) <= MAX_RETURNS, \
        f"{len(stays)} stays, {returns(stays)} returns:\n{shown}"
