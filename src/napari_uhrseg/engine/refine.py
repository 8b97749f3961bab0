"""Brushed-region refinement: CascadePSP inside the pixels a user brushed, nowhere else.

Frames: ``labels`` and ``region`` share one pixel frame, the *labels frame* — level 0 of the image, or any
pyramid level whose shape they have (the factor is read from the shapes with ``io.coords.level_scale``). The
refiner runs at the *working level* ``level`` of the image pyramid. The result is a window of the labels frame
(``RefineEdit.box``) with the labels before and after, which a caller writes back in one step (one undo step in
napari).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.io import coords

DEFAULT_MARGIN = 64  # working-level px around the brushed box: context for the refiner on every side
MAX_REGION_SIDE = 4096  # working-level px; a larger brushed box is refused (minutes of CPU, GBs of memory)
MIN_BRUSHED_PIXELS = 4  # fewer brushed pixels is almost surely a stray click
L_RANGE = (64, 4096)  # the global-step size L the Refine dock offers (the paper's: 900)


@dataclass
class RefineEdit:
    """One refinement, ready to be written back.

    box: ``(y0, x0, y1, x1)`` in the labels frame; before/after: the labels inside ``box``; ``after`` differs
    from ``before`` only at brushed pixels. changed: number of pixels whose label changed.
    """

    box: tuple[int, int, int, int]
    before: np.ndarray
    after: np.ndarray
    changed: int
    seconds: float = 0.0
    note: str = ""  # anything the user should know about how the edit was made (shown by the dock)

    def apply(self, labels) -> None:
        """Write ``after`` into ``labels`` (numpy or zarr) at ``box``."""
        y0, x0, y1, x1 = self.box
        labels[y0:y1, x0:x1] = self.after


@functools.lru_cache(maxsize=4)
def default_refiner(device: str = "cpu"):
    """The shipped class-agnostic ``fast`` CascadePSP (loaded once per device)."""
    from napari_uhrseg.methods.cascadepsp import CascadePSP

    return CascadePSP.from_checkpoint(None, device=device)


def _as_pyramid(image):
    from napari_uhrseg.io.pyramid import open_pyramid

    return open_pyramid(image)


def brushed_box(region) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, x0, y1, x1)`` of the non-zero pixels of ``region`` (numpy, zarr or dask), or None."""
    if isinstance(region, FramedLabels):
        return region.bounding_box()
    if hasattr(region, "chunks") and not isinstance(region, np.ndarray):
        import dask.array as da

        arr = da.from_array(region) if not isinstance(region, da.Array) else region
        rows = np.flatnonzero(np.asarray((arr != 0).any(axis=1)))
        cols = np.flatnonzero(np.asarray((arr != 0).any(axis=0)))
    else:
        region = np.asarray(region)
        rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


class FramedLabels:
    """Labels that cover part of their frame: ``data`` (h, w) sits at ``origin`` of a frame of ``shape`` (level 0
    of the image or one of its levels); reading outside ``data`` gives 0. It is what a Labels layer segmented for
    a region (the Segment dock's region or box) is to ``refine_region`` and ``click_segment``, which work in
    whole frames. ``local(edit)`` is that edit cut to ``data``'s own pixels."""

    ndim = 2

    def __init__(self, data, shape, origin):
        self.data = data
        self.shape = (int(shape[0]), int(shape[1]))
        self.origin = (int(origin[0]), int(origin[1]))
        self.dtype = np.dtype(data.dtype)
        h, w = data.shape[:2]
        oy, ox = self.origin
        if oy < 0 or ox < 0 or oy + h > self.shape[0] or ox + w > self.shape[1]:
            raise UhrsegError(f"Labels of {h}×{w} px at {self.origin} do not fit their "
                              f"{self.shape[0]}×{self.shape[1]} px frame: the layer's scale or translate was "
                              "changed; segment the region again.")

    def _intersect(self, y0, x0, y1, x1):
        oy, ox = self.origin
        h, w = self.data.shape[:2]
        return max(y0, oy), max(x0, ox), min(y1, oy + h), min(x1, ox + w)

    def __getitem__(self, key):
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), self.dtype)
        iy0, ix0, iy1, ix1 = self._intersect(y0, x0, y1, x1)
        if iy1 > iy0 and ix1 > ix0:
            oy, ox = self.origin
            inside = self.data[iy0 - oy : iy1 - oy, ix0 - ox : ix1 - ox]
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = np.asarray(inside)
        return out

    def bounding_box(self):
        """``brushed_box`` of the data, in frame pixels (None when nothing is set)."""
        box = brushed_box(self.data)
        if box is None:
            return None
        oy, ox = self.origin
        return box[0] + oy, box[1] + ox, box[2] + oy, box[3] + ox

    def local(self, edit: RefineEdit) -> RefineEdit | None:
        """``edit`` (frame pixels) cut to the data and moved into its pixels; None when none of it is inside."""
        y0, x0, y1, x1 = edit.box
        iy0, ix0, iy1, ix1 = self._intersect(y0, x0, y1, x1)
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        sl = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
        before, after = edit.before[sl], edit.after[sl]
        oy, ox = self.origin
        return RefineEdit((iy0 - oy, ix0 - ox, iy1 - oy, ix1 - ox), before, after,
                          int(np.count_nonzero(after != before)), edit.seconds, note=edit.note)


def check_labels_frame(pyramid, labels_shape, what: str = "labels") -> None:
    """Refuse labels that are neither level 0 of the image nor one of its pyramid levels: their pixels cannot
    be placed on the image (a mask of another picture, or one cropped or padded)."""
    shape = tuple(int(v) for v in labels_shape[:2])
    levels = [pyramid.level_shape(i) for i in range(len(pyramid.levels))]
    if shape in levels:
        return
    # Another pyramid of the same image (napari's, the file's: levels rounded up or down) is the same frame:
    # one downsample for both axes, to within the rounding of a level's size.
    (H, W), (h, w) = levels[0], shape
    d = (H / max(h, 1) + W / max(w, 1)) / 2
    if abs(H / d - h) <= 1.5 and abs(W / d - w) <= 1.5:
        return
    sizes = ", ".join(f"{h}×{w}" for h, w in levels)
    raise UhrsegError(
        f"The {what} are {shape[0]}×{shape[1]} px but {pyramid.name} is {levels[0][0]}×{levels[0][1]} px"
        + (f" (its pyramid levels: {sizes})" if len(levels) > 1 else "")
        + f": give {what} made for this image, at its full size or at one of its levels. Nothing was changed."
    )


def _region_in_frame(region, labels_shape) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """``region`` as (mask or None, box) in the labels frame; a box tuple stands for a filled rectangle."""
    if isinstance(region, (tuple, list)) and len(region) == 4:
        raw = tuple(int(round(v)) for v in region)
        box = coords.box_to_window(raw, labels_shape)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise UhrsegError(
                f"The region {raw} lies outside the image ({labels_shape[0]}×{labels_shape[1]} px): "
                "brush over the image itself."
            )
        return None, box
    if tuple(region.shape[:2]) != tuple(labels_shape):
        raise UhrsegError(
            f"The refine brush is {region.shape[0]}×{region.shape[1]} px but the labels are "
            f"{labels_shape[0]}×{labels_shape[1]} px: brush on a layer of the same size (the 'refine brush' layer)."
        )
    box = brushed_box(region)
    if box is None:
        raise UhrsegError("Nothing is brushed: paint over the border to refine with the 'refine brush' layer, then Refine.")
    return region, box


def refine_region(
    image, labels, region, *, level: int = 0, fast: bool = False, L: int = 900, margin: int = DEFAULT_MARGIN,
    refiner=None, device: str = "cpu", max_side: int = MAX_REGION_SIDE, cancel=None, progress=None,
) -> RefineEdit:  # fmt: skip
    """Refine every class present around the brushed pixels; only brushed pixels change.

    Parameters
    ----------
    image : Pyramid or array (H, W[, C]) — level 0 of the image (grayscale/16-bit converted to RGB 8-bit).
    labels : (Y, X) integer array (numpy or zarr), the labels frame; not modified here.
    region : (Y, X) brush mask in the labels frame (non-zero = brushed), or a box ``(y0, x0, y1, x1)`` there.
    level : working level of the pyramid the refiner sees.
    fast, L : CascadePSP global-only mode and its global-step size.
    margin : context around the brushed box, in working-level pixels.
    """
    import time

    t0 = time.perf_counter()
    if not L_RANGE[0] <= int(L) <= L_RANGE[1]:
        raise UhrsegError(f"L = {L} px: the global-step size must be {L_RANGE[0]}–{L_RANGE[1]} px "
                          "(the paper's is 900; smaller is faster and coarser).")
    pyramid = _as_pyramid(image)
    labels_shape = tuple(labels.shape[:2])
    check_labels_frame(pyramid, labels_shape)
    mask, box = _region_in_frame(region, labels_shape)
    brushed = None if mask is None else np.asarray(mask[box[0] : box[2], box[1] : box[3]]) != 0
    if brushed is not None and np.count_nonzero(brushed) < MIN_BRUSHED_PIXELS:
        raise UhrsegError(
            f"Only {np.count_nonzero(brushed)} pixel(s) brushed: brush along the border to refine "
            f"(at least {MIN_BRUSHED_PIXELS} pixels)."
        )
    if not 0 <= level < len(pyramid.levels):
        raise UhrsegError(f"Working level {level} does not exist: {pyramid.name} has levels 0..{len(pyramid.levels) - 1}.")
    labels_ds = coords.level_scale(pyramid.shape, labels_shape)  # level-0 px per labels-frame px
    level_ds = coords.level_scale(pyramid.shape, pyramid.level_shape(level))
    work = coords.box_to_window(coords.between_levels(box, labels_ds, level_ds), pyramid.level_shape(level))
    work = coords.clip_box((work[0] - margin, work[1] - margin, work[2] + margin, work[3] + margin),
                           pyramid.level_shape(level))  # fmt: skip
    wy0, wx0, wy1, wx1 = (int(v) for v in work)
    if max(wy1 - wy0, wx1 - wx0) > max_side:
        raise UhrsegError(
            f"The brushed area is {wy1 - wy0}×{wx1 - wx0} px at working level {level} (at most {max_side}² px is "
            "refined at once): brush a smaller area, or choose a coarser working level."
        )
    # The labels read for context cover the working window, mapped back to the labels frame.
    lab_win = coords.box_to_window(coords.between_levels(work, level_ds, labels_ds), labels_shape)
    ly0, lx0, ly1, lx1 = lab_win
    lab_ctx = np.asarray(labels[ly0:ly1, lx0:lx1])
    if not np.any(lab_ctx):
        raise UhrsegError("There are no labels around the brushed area: paint or segment the object first "
                          "(or use click-to-segment), then brush its border and Refine.")  # fmt: skip
    window = pyramid.read_region(level, wy0, wx0, wy1 - wy0, wx1 - wx0)
    lab_work = cv2.resize(lab_ctx, (wx1 - wx0, wy1 - wy0), interpolation=cv2.INTER_NEAREST) \
        if lab_ctx.shape != window.shape[:2] else lab_ctx  # fmt: skip
    refiner = refiner or default_refiner(device)
    refined = refiner.refine_labels(window, lab_work, fast=fast, L=L, cancel=cancel, progress=progress)
    refined_ctx = cv2.resize(refined, (lx1 - lx0, ly1 - ly0), interpolation=cv2.INTER_NEAREST) \
        if refined.shape != lab_ctx.shape else refined  # fmt: skip
    # Back to the brushed box only (the box lies inside the context window).
    by0, bx0, by1, bx1 = box
    before = lab_ctx[by0 - ly0 : by1 - ly0, bx0 - lx0 : bx1 - lx0].copy()
    after = before.copy()
    new = refined_ctx[by0 - ly0 : by1 - ly0, bx0 - lx0 : bx1 - lx0].astype(before.dtype)
    write = np.ones(before.shape, bool) if brushed is None else brushed
    after[write] = new[write]
    return RefineEdit(box, before, after, int(np.count_nonzero(after != before)), time.perf_counter() - t0)
