"""The ``taxonet`` command line: one verb per stage (prepare, data, train, evaluate, experiment, serve, demo, models).

Each verb lives in ``taxonet.commands.<area>`` with a ``register(subparsers)`` function that only declares
arguments; heavy imports (torch, ray) happen inside the handlers, so ``taxonet --help`` is instant.

Console: the verbs that start Ray (:data:`ROUTED_COMMANDS`) show taxonet's own lines (stage headers, one line per
epoch with an ETA, results) and send Ray's internal lines to a log file whose path is printed first
(:mod:`taxonet.console`). ``-q``/``--quiet``: no progress lines, only warnings and results; ``-v``/``--verbose``:
debug logging and every Ray line on the terminal. Both work before or after the verb (``taxonet train -q``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from taxonet import __version__
from taxonet.console import default_log_path, route_output

#: modules under taxonet.commands that add verbs, in help order
COMMAND_MODULES = ("datasets", "training", "serve", "demo", "models", "review")
#: verbs whose Ray lines go to a log file unless -v
ROUTED_COMMANDS = ("train", "experiment", "demo")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (the console router while Ray's lines are rerouted)."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _add_console_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging; Ray's own lines on the terminal too")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress lines: only warnings, errors and results")
    parser.add_argument("--log-file", default=default, metavar="PATH",
                        help="where Ray's own lines go (default: $TMPDIR/taxonet-logs/VERB-TIME-PID.log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxonet",
        description="Hierarchical insect classification (order → family → species): prepare, train, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"taxonet {__version__}")
    _add_console_flags(parser, None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"taxonet.commands.{name}").register(subparsers)
    for verb in subparsers.choices.values():  # the same flags after the verb; SUPPRESS keeps the ones before it
        _add_console_flags(verb, argparse.SUPPRESS)
    return parser


def configure_logging(verbosity: int) -> None:
    """taxonet's log lines on the current stderr: DEBUG with -v, WARNING with -q, else INFO (other libraries:
    WARNING unless -v)."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbosity > 0
                                           else "%(levelname)s %(name)s: %(message)s"))
    # other libraries' INFO lines (matplotlib, botocore, ...) only with -v
    logging.basicConfig(level=level if verbosity > 0 else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("taxonet").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    verbosity = 1 if args.verbose else -1 if args.quiet else 0
    configure_logging(verbosity)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    log_path = None
    if args.command in ROUTED_COMMANDS and verbosity < 1:
        log_path = Path(args.log_file) if args.log_file else default_log_path(args.command)
        print(f"taxonet {args.command}: Ray's own log lines go to {log_path} (-v shows them here)", flush=True)
    try:
        if log_path is None:
            return int(args.handler(args) or 0)
        with route_output(log_path, verbosity):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a clear one-line error for expected failures; traceback with -v
        from taxonet.errors import UserFacingError

        if log_path is not None:
            print(f"taxonet {args.command}: Ray's log lines are in {log_path}", file=sys.stderr)
        if isinstance(exc, UserFacingError) and not args.verbose:
            print(f"taxonet {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
