"""``uhrseg eval PRED GT``: mIoU (pooled confusion matrix), per-class IoU and mBA (CascadePSP) as JSON.

PRED and GT are label images of the same size (PNG, TIFF/OME-TIFF, zarr/OME-Zarr labels) or two folders, in
which files are paired by name (``<stem>``, with ``_mask``/``_pred``/``_labels``/``_gt`` suffixes ignored).
``--format deepglobe`` reads RGB colour masks (DeepGlobe palette; class 0 "unknown" ignored and not averaged).
Large label images are read window by window; mBA is taken on ``--mba-window``-sized windows of images larger
than that (each window one "image" in the papers' sense).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

_SUFFIXES = ("_mask", "_pred", "_prediction", "_labels", "_label", "_gt", "_sat")
_FILE_TYPES = (".png", ".tif", ".tiff", ".zarr")


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare predicted labels with ground truth: mIoU, per-class IoU, mBA (JSON)")
    p.add_argument("pred", help="predicted labels: a file, a zarr folder, or a folder of files")
    p.add_argument("gt", help="ground-truth labels, same layout as PRED")
    p.add_argument("--ignore", type=int, default=None,
                   help="ground-truth value not counted and not averaged (default: 0 for deepglobe, none for index)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of classes (default: 7 for deepglobe, else 1 + the largest label found)")
    p.add_argument("--format", choices=["index", "deepglobe"], default="index",
                   help="index: single-channel class indices; deepglobe: RGB colour masks")
    p.add_argument("--exclude", type=int, nargs="*", default=[], help="classes reported but not averaged")
    p.add_argument("--mba-window", type=int, default=2448, help="window size for mBA on large images (default 2448)")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_uhrseg.datasets import DEEPGLOBE_CLASSES
    from napari_uhrseg.metrics import evaluate

    pairs = _pairs(Path(args.pred), Path(args.gt))
    deepglobe = args.format == "deepglobe"
    ignore = args.ignore if args.ignore is not None else (0 if deepglobe else None)
    preds = [_read_labels(p, args.format) for p, _ in pairs]
    gts = [_read_labels(g, args.format) for _, g in pairs]
    for (p, g), pred, gt in zip(pairs, preds, gts):
        if tuple(pred.shape) != tuple(gt.shape):
            from napari_uhrseg.metrics import MetricInputError

            raise MetricInputError(f"{p} is {tuple(pred.shape)} but {g} is {tuple(gt.shape)}: "
                                   "compare labels of the same image at the same level.")
    num_classes = args.num_classes or (len(DEEPGLOBE_CLASSES) if deepglobe else _max_label(preds + gts) + 1)
    result = evaluate(preds, gts, num_classes, ignore_index=ignore, exclude=args.exclude,
                      mba_window=args.mba_window)
    out = {
        "miou": _json_float(result["miou"]),
        "per_class_iou": [_json_float(v) for v in result["per_class_iou"]],
        "mba": _json_float(result["mba"]),
        "num_images": result["num_images"],
        "num_classes": num_classes,
        "ignore_index": ignore,
        "excluded": sorted(set(args.exclude) | ({ignore} if ignore is not None else set())),
    }
    if deepglobe:
        out["class_names"] = DEEPGLOBE_CLASSES
    print(json.dumps(out, indent=2))
    return 0


def _json_float(value: float):
    return None if math.isnan(value) else round(float(value), 6)


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr", *_FILE_TYPES):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_label_file(path: Path) -> bool:
    return path.name.lower().endswith(_FILE_TYPES)


def _pairs(pred: Path, gt: Path) -> list[tuple[Path, Path]]:
    from napari_uhrseg.errors import UhrsegError

    for path in (pred, gt):
        if not path.exists():
            raise UhrsegError(f"{path} does not exist: check the path.")
    folders = [p.is_dir() and not _is_label_file(p) for p in (pred, gt)]
    if not any(folders):
        return [(pred, gt)]
    if not all(folders):
        raise UhrsegError(f"give two files or two folders, not one of each ({pred}, {gt}).")
    gt_by_stem = {_stem(p): p for p in sorted(gt.iterdir()) if _is_label_file(p)}
    pairs = [(p, gt_by_stem[_stem(p)]) for p in sorted(pred.iterdir()) if _is_label_file(p) and _stem(p) in gt_by_stem]
    if not pairs:
        raise UhrsegError(f"no file in {pred} has a partner of the same name in {gt} (e.g. 119.png and 119_mask.png).")
    return pairs


def _read_labels(path: Path, fmt: str):
    """A 2-D integer array (numpy, or zarr for large stores) of class indices."""
    from napari_uhrseg.datasets import decode_deepglobe_mask, read_mask
    from napari_uhrseg.errors import UhrsegError

    if fmt == "deepglobe" and not path.is_dir():
        return read_mask(path, decode=decode_deepglobe_mask)
    from napari_uhrseg.io.labels import open_label_store

    try:
        return open_label_store(path, writable=False).array
    except UhrsegError as exc:
        if path.is_dir():
            raise
        first = exc
    try:
        mask = read_mask(path)  # e.g. an RGB PNG whose channels are equal
    except Exception:  # noqa: BLE001 - not an image either: the label reader's message says what is wrong
        raise first from None
    if mask.ndim != 2 or mask.size == 0:
        raise UhrsegError(f"{first} (DeepGlobe colour masks: --format deepglobe)") from None
    return mask


def _max_label(arrays) -> int:
    from napari_uhrseg.metrics import _windows

    top = 0
    for a in arrays:
        for ys, xs in _windows(a.shape, 4096):
            block = np.asarray(a[ys, xs])
            if block.size:
                top = max(top, int(block.max()))
    return top
