"""One module per CLI command: its arguments and what it does; and the parser they share."""
from __future__ import annotations

import argparse

from ..errors import UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage block too; a user wants the one line that says what is wrong.
        raise UsageError(message + _did_you_mean(self, message))


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """A close flag or command for argparse's "unrecognized arguments" and "invalid choice" errors
    (Python 3.14's suggest_on_error does this; 3.11 does not)."""
    import re

    from ..errors import closest

    words = message.partition("unrecognized arguments:")[2].split()
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        words, known = [choice.group(1)], re.findall(r"'?([\w-]+)'?", choice.group(2))
    else:
        known = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    for word in words:
        close = closest(word.split("=")[0], known, cutoff=0.7) if word.startswith("--") or choice else None
        if close:
            return f" (did you mean {close}?)"
    return ""
