"""``uhrseg export LABELS -o OUT``: convert saved labels to OME-TIFF, OME-Zarr, PNG or GeoJSON (QuPath)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="export labels (zarr store, TIFF, PNG) to OME-TIFF, OME-Zarr, PNG or GeoJSON")
    p.add_argument("labels", help="label file: a zarr store, an (OME-)TIFF or a PNG of integer labels")
    p.add_argument("-o", "--output", required=True, help="output path (.ome.tif, .ome.zarr, .png, .geojson)")
    p.add_argument("--format", choices=["ome-tiff", "ome-zarr", "png", "geojson"], default=None,
                   help="output format (default: from the output suffix)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names for label values 0, 1, 2, ... (default: from the input)")
    p.add_argument("--pixel-size", default=None,
                   help="size of a level-0 image pixel: one number or 'Y,X' (default: from the input)")
    p.add_argument("--unit", default=None, help="unit of --pixel-size (default: µm)")
    p.add_argument("--downsample", type=float, default=None,
                   help="level-0 pixels per label pixel, for labels made at a coarser level (default: the store's, "
                        "as `uhrseg segment --level` records it, else 1)")
    p.set_defaults(func=run)


def _pixel_size(text: str | None):
    if text is None:
        return None
    from napari_uhrseg.errors import UhrsegError

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise UhrsegError(f"--pixel-size {text!r} is not a number or 'Y,X' pair.") from exc
    if len(values) not in (1, 2) or min(values) <= 0:
        raise UhrsegError(f"--pixel-size {text!r} must be one positive number or a 'Y,X' pair.")
    return (values[0], values[-1])


def run(args) -> int:
    from napari_uhrseg.io.export import export_labels
    from napari_uhrseg.io.labels import open_label_store, recorded_downsample

    store = open_label_store(args.labels, writable=False)
    info = store.info
    names = [n.strip() for n in args.classes.split(",")] if args.classes else None
    recorded = recorded_downsample(info)  # what `uhrseg segment -o OUT.zarr` records: level, downsample, origin
    downsample = args.downsample if args.downsample is not None else (recorded or 1.0)
    dy, dx = (downsample, downsample) if not isinstance(downsample, tuple) else (downsample[0], downsample[-1])
    pixel_size = _pixel_size(args.pixel_size)
    unit = args.unit
    if pixel_size is None and info.get("pixel_size") is not None:
        pixel_size, unit = tuple(info["pixel_size"]), unit or info.get("pixel_unit")
        if not recorded:  # a label image's own pixel size is per label pixel; our stores record level 0's
            pixel_size = (pixel_size[0] / dy, pixel_size[1] / dx)
    source = store
    origin = [int(v) for v in info.get("origin") or (0, 0)]
    if any(origin):  # the labels of a region: exported where they lie on the image (zeros above and left)
        from napari_uhrseg.engine.refine import FramedLabels

        h, w = store.shape
        source = FramedLabels(store.array, (origin[0] + h, origin[1] + w), origin)
        names = names or store.class_names

    def progress(done, total):
        print(f"\rexport: {100 * done // max(total, 1):3d}%", end="", file=sys.stderr, flush=True)

    colors = store.class_colors if source is not store else None
    out = export_labels(source, args.output, format=args.format, class_names=names, class_colors=colors,
                        pixel_size=pixel_size, pixel_unit=unit, downsample=downsample, progress=progress)
    print(file=sys.stderr)
    print(out)
    return 0
