"""`harness <command>`: argument parsing and the one place where errors become exit statuses."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from .commands import Parser
from .errors import ExperimentCodeError, HarnessError, UsageError, asked_to_stop, first_line
from .user_cache import user_cache

COMMANDS = ("train", "search", "compare", "predict", "register", "reproduce", "audit", "cluster")


NETWORK_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                    # `train` prints its run's URL itself, once; MLflow would add two more lines.
                    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def build_parser() -> Parser:
    parser = Parser(prog="harness", description="Tracked, searchable PyTorch training runs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from .commands import audit, cluster, compare, predict, register, reproduce, search, train

    for command in (train, search, compare, predict, register, reproduce, audit, cluster):
        command.add_parser(sub)
    parser.commands = sub.choices
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _store_error(exc: BaseException) -> str | None:
    """One line for an error of a store or the file system (a corrupted or read-only database, a
    file that cannot be written), where nothing was lost; None for anything else."""
    kinds: list[type] = [OSError]
    for module, name in (("sqlite3", "Error"), ("sqlalchemy.exc", "SQLAlchemyError"),
                         ("mlflow.exceptions", "MlflowException")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    if not isinstance(exc, tuple(kinds)):
        return None
    from .urls import scrub

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    first = first_line(exc)
    return f"{type(exc).__name__}: {scrub(first, uri) if uri else first}"


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a name that is not UTF-8: Python hands it over with lone surrogates
        return False
    return True


def _shown(value: str) -> str:
    return ascii(value) if len(value) <= 80 else f"{ascii(value[:60])}... ({len(value)} characters)"


@contextlib.contextmanager
def _asked_to_stop(command: str):
    """The harness calls no ``sys.exit()``: a BaseException out of a command that is no error and no
    interrupt is the experiment's code asking to stop, wherever the command called it (predict's
    model, register's trace, reproduce's data): one line, exit 1, as train and search say it once
    they have failed their run."""
    try:
        yield
    except BaseException as exc:
        stop = asked_to_stop(exc, f"{command} stopped: the experiment's code raised")
        if stop is None:
            raise
        raise stop from None


def _check_text(argv: list[str]) -> None:
    """Every argument is text that can be stored: MLflow and Optuna keep names, paths and values as
    UTF-8, and a file name that is not would be accepted here and then fail every write."""
    for arg in argv:
        if not _utf8(str(arg)):
            raise UsageError(f"argument {_shown(arg)} is not UTF-8 text; MLflow and Optuna store every name, path "
                             "and value as UTF-8: rename the file or folder")


# What the harness reads from the environment as a path or a name that ends up in a store (the
# tracking store's path, an experiment, a run, the lease folder a worker record names).
ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
               "XDG_CACHE_HOME", "PGPASSFILE")


def _check_environment() -> None:
    """The environment's paths and names are UTF-8 text, checked before anything is made: one that
    is not was used to make the store and the cache folders, and then failed the first write."""
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        # ~ would name another folder in each working directory: the cache (leases, the store
        # template) and MLflow's ~/.config made there, and a worker's lease not found by the next.
        raise UsageError(f"environment variable HOME={_shown(home)} is not an absolute path; the harness keeps "
                         "what outlives a command under ~/.cache: set HOME to your home folder's absolute path")
    named = [(name, os.environ[name]) for name in ENVIRONMENT if name in os.environ]
    cache = user_cache()
    if cache is not None and not os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")):
        named.append(("HOME", str(cache.parent)))  # the cache folder is ~/.cache
    for name, value in named:
        if not _utf8(value):
            raise UsageError(f"environment variable {name}={_shown(value)} is not UTF-8 text; MLflow and Optuna "
                             f"store every name and path as UTF-8: set {name} to a UTF-8 value or unset it")


def main(argv: list[str] | None = None) -> int:
    # MLflow draws a progress bar for every artifact it downloads: noise around a one-line answer.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow retries an unreachable server for minutes by default; a command line should give up in
    # seconds and say so. Users who want patience set these themselves.
    for name, value in NETWORK_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # A store error becomes one line below; MLflow would also log it with a traceback.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # SIGTERM ends a command the way Ctrl-C does: runs are closed, nothing is left RUNNING.
    signal.signal(signal.SIGTERM, _interrupt)
    # A shell starts a script's background job with SIGINT ignored, and Python keeps it so: `kill -INT`
    # of a harness started that way (a CI job, `nohup harness cluster ... &`) would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_text(sys.argv[1:] if argv is None else argv)
        _check_environment()
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's own parser, which knows its flags
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        with _asked_to_stop(args.command):
            return args.handler(args)
    except UsageError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2
    except HarnessError as exc:
        print(f"harness: {exc}", file=sys.stderr)
        return 1
    except ExperimentCodeError as exc:  # where no command closes a run with it (reproduce trains before it logs)
        print(f"harness: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `harness compare | head`: the reader has what it wanted. Python's own exit would flush
        # stdout into the closed pipe again and print an error; it gets /dev/null instead.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor: nothing to flush later
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a process a closed pipe ends
    except Exception as exc:
        line = _store_error(exc)
        if line is None:
            raise  # a bug: its traceback is what a report needs
        print(f"harness: {line}", file=sys.stderr)
        return 1
    finally:
        # The command's record is complete: a signal from here on only ends the process, it no
        # longer interrupts anything (a KeyboardInterrupt now would print a traceback on exit).
        for held in (signal.SIGINT, signal.SIGTERM):
            signal.signal(held, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
