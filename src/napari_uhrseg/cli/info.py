"""``uhrseg info``: the device that would be used, and the methods available."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show the device, threads and available methods")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_uhrseg import __version__
    from napari_uhrseg.device import select_device

    choice = select_device(args.device)
    out = {"version": __version__, "device": choice.device, "device_name": choice.name, "threads": choice.threads}
    try:
        from napari_uhrseg.methods import available_methods

        out["methods"] = available_methods()
    except ImportError:
        pass
    print(json.dumps(out, indent=2))
    return 0
