"""The ``uhrseg`` command. Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; the parser calls ``args.func(args)``, which returns an exit code."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from napari_uhrseg.errors import UhrsegError


def build_parser() -> argparse.ArgumentParser:
    from napari_uhrseg import __version__

    parser = argparse.ArgumentParser(
        prog="uhrseg", description="Segment, refine, train, evaluate and export ultra-high-resolution images."
    )
    parser.add_argument("--version", action="version", version=f"napari-uhrseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` hands its unknown options to the chosen method's own parser.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "_raw", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args._rest = rest
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UhrsegError as exc:
        print(f"uhrseg {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uhrseg {args.command}: interrupted; finished work was kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
