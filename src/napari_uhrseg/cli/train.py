"""``uhrseg train --method NAME [options]``: each method owns its training options and schedule.

The method's module exposes ``train_main(argv) -> int`` (its own argparse, progress, resume, checkpoints);
this command only finds it, so methods stay independent of one another.
"""
from __future__ import annotations

import argparse
import importlib


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a method (see `uhrseg train --method NAME --help` for its options)",
        add_help=False,
    )
    p.add_argument("--method", required=False, help="grnet, magnet, cascadepsp, ...")
    p.add_argument("-h", "--help", action="store_true")
    p.set_defaults(func=run, _raw=True)


def run(args, rest: list[str] | None = None) -> int:
    from napari_uhrseg.methods import available_methods, get_method

    rest = list(rest if rest is not None else getattr(args, "_rest", []))
    if not args.method:
        print("usage: uhrseg train --method {" + ",".join(available_methods()) + "} [options]")
        return 0 if args.help else 2
    cls = get_method(args.method)
    module = importlib.import_module(cls.__module__)
    if args.help:
        rest.append("--help")
    return int(module.train_main(rest, method=args.method) or 0)
