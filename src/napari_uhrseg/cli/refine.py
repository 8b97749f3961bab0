"""``uhrseg refine IMAGE --mask LABELS -o OUT [--region MASK] [--fast] [--L 900]``: CascadePSP boundary refinement.

Without ``--region`` the whole label image is refined (refused above ``--max-side`` px at the working level:
give a region or a coarser level); with it, only the region's non-zero pixels change. LABELS, MASK and OUT are
label images (PNG, TIFF/OME-TIFF, zarr/OME-Zarr) in the same pixel frame (level 0, or the working level).
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("refine", help="refine label boundaries with CascadePSP (whole image or a brushed region)")
    p.add_argument("image", help="the image (any format `uhrseg` opens)")
    p.add_argument("--mask", required=True, help="labels to refine (0 = unlabelled)")
    p.add_argument("-o", "--output", required=True, help="refined labels (.png, .ome.tif, .ome.zarr, .geojson)")
    p.add_argument("--region", default=None, help="brush mask: only its non-zero pixels change")
    p.add_argument("--fast", action="store_true", help="global step only (a preview; about 10× faster)")
    p.add_argument("--L", type=int, default=900, help="global-step size, 64–4096 px (paper: 900)")
    p.add_argument("--level", type=int, default=0, help="working level of the image pyramid")
    p.add_argument("--margin", type=int, default=64, help="context around the region, working-level px")
    p.add_argument("--max-side", type=int, default=4096, help="largest box refined at once, working-level px")
    p.add_argument("--checkpoint", default=None, help="CascadePSP checkpoint (default: the shipped fast refiner)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from napari_uhrseg.device import select_device
    from napari_uhrseg.engine.refine import FramedLabels, refine_region
    from napari_uhrseg.errors import UhrsegError
    from napari_uhrseg.io.atomic import check_output_folder
    from napari_uhrseg.io.export import export_labels, guess_format
    from napari_uhrseg.io.labels import open_label_store, recorded_downsample
    from napari_uhrseg.io.pyramid import open_pyramid
    from napari_uhrseg.methods.cascadepsp import CascadePSP

    try:
        guess_format(args.output)  # an unknown suffix or a missing folder: said before the work, not after
        check_output_folder(args.output)
        pyramid = open_pyramid(args.image)
        store = open_label_store(args.mask, writable=False)
        labels = np.array(store.array)
        frame, origin = _in_frame(labels, store.info, pyramid)
        region = (origin[0], origin[1], origin[0] + labels.shape[0], origin[1] + labels.shape[1])
        if args.region:
            region = np.asarray(open_label_store(args.region, writable=False).array)
            if frame is not labels and region.shape == labels.shape:  # a brush made for the region's labels
                region = FramedLabels(region, frame.shape, origin)
        device = select_device(args.device).device
        refiner = CascadePSP.from_checkpoint(args.checkpoint, device=device)
        edit = refine_region(pyramid, frame, region, level=args.level, fast=args.fast, L=args.L,
                             margin=args.margin, refiner=refiner, max_side=args.max_side)  # fmt: skip
        if frame is not labels:
            edit = frame.local(edit)
        edit.apply(labels)
        out = labels if frame is labels else FramedLabels(labels, (origin[0] + labels.shape[0],
                                                                   origin[1] + labels.shape[1]), origin)
        path = export_labels(out, args.output, class_names=store.class_names, class_colors=store.class_colors,
                             downsample=recorded_downsample(store.info) or 1.0)
    except UhrsegError as exc:
        print(f"uhrseg refine: {exc}", file=sys.stderr)
        return 2
    print(f"refined {edit.changed} px in box {edit.box} in {edit.seconds:.2f} s -> {path}")
    return 0


def _in_frame(labels, info: dict, pyramid):
    """(labels as ``refine_region`` takes them, the region's origin): a store ``uhrseg segment --region`` wrote
    covers a region of its level; it is placed in that level's frame."""
    from napari_uhrseg.engine.refine import FramedLabels
    from napari_uhrseg.errors import UhrsegError

    origin = tuple(int(v) for v in info.get("origin") or (0, 0))
    if not any(origin):
        return labels, origin
    level = int(info.get("level") or 0)
    if not 0 <= level < len(pyramid.levels):
        raise UhrsegError(f"The labels were segmented at level {level}, which {pyramid.name} does not have: "
                          "give the image they were made for.")
    return FramedLabels(labels, pyramid.level_shape(level), origin), origin
