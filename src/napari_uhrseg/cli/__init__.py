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


# Options whose value may start with a minus sign (a box reaching past the image's top-left corner): argparse
# takes "-100,..." for an option unless it is written --region=-100,...; this joins them for the user.
_NEGATIVE_VALUE_OPTIONS = ("--region",)


def _join_negative_values(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg in _NEGATIVE_VALUE_OPTIONS and nxt and nxt.startswith("-") and nxt[1:2].isdigit():
            out.append(f"{arg}={nxt}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
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
