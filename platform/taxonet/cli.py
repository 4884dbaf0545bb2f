"""The ``taxonet`` command line: one verb per stage (prepare, data, train, evaluate, experiment, serve, demo, models).

Each verb lives in ``taxonet.commands.<area>`` with a ``register(subparsers)`` function that only declares
arguments; heavy imports (torch, ray) happen inside the handlers, so ``taxonet --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from taxonet import __version__

#: modules under taxonet.commands that add verbs, in help order
COMMAND_MODULES = ("datasets", "training", "serve", "demo", "models", "review")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taxonet",
        description="Hierarchical insect classification (order → family → species): prepare, train, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"taxonet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"taxonet.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a clear one-line error for expected failures; traceback with -v
        from taxonet.errors import UserFacingError

        if isinstance(exc, UserFacingError) and not args.verbose:
            print(f"taxonet {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
