"""`harness <command>`: argument parsing and the one place where errors become exit statuses."""
from __future__ import annotations

import argparse
import sys

from .errors import UsageError

COMMANDS = ("train", "search")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage block too; a user wants the one line that says what is wrong.
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(prog="harness", description="Tracked, searchable PyTorch training runs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from .commands import search, train

    train.add_parser(sub)
    search.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
