"""``uhrseg synth -o OUT [--size N] [--seed S]``: write a synthetic scene and its exact ground truth.

The scene is rendered tile by tile (memory stays at a few tiles whatever the size) into
``OUT/<name>.ome.tif`` (pyramidal RGB), ``OUT/<name>_labels.ome.tif`` (pyramidal labels with the class table)
and ``OUT/<name>.json``; ``--format zarr`` writes OME-Zarr folders instead.
"""
from __future__ import annotations

import json
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic high-resolution scene with exact ground truth")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--size", type=int, nargs="+", default=[40000], metavar="N",
                   help="level-0 size in pixels: one number (square) or H W (default 40000)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same scene (default 0)")
    p.add_argument("--classes", type=int, default=5, help="number of classes, 2..6 (default 5)")
    p.add_argument("--region-size", type=float, default=384.0, help="typical region size in pixels (default 384)")
    p.add_argument("--format", choices=["ome-tiff", "zarr"], default="ome-tiff")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile / zarr chunk size (default 512)")
    p.add_argument("--name", default="scene", help="file name stem (default 'scene')")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_uhrseg.errors import UhrsegError
    from napari_uhrseg.synthetic import SyntheticScene

    if len(args.size) not in (1, 2):
        raise UhrsegError("--size takes one number (square) or two (height width).")
    size = tuple(args.size) * (2 if len(args.size) == 1 else 1)
    scene = SyntheticScene(size, seed=args.seed, num_classes=args.classes, region_size=args.region_size)
    start = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 2 or done == total:
            last[0] = now
            print(f"\rtiles {done}/{total} ({now - start:.0f} s)", end="", file=sys.stderr, flush=True)

    paths = scene.write(args.output, name=args.name, format=args.format, tile=args.tile, progress=progress)
    print(file=sys.stderr)
    print(json.dumps({k: str(v) for k, v in paths.items()} | {"seconds": round(time.perf_counter() - start, 1)},
                     indent=2))
    return 0
