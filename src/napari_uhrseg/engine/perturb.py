"""Perturbed masks for training and benchmarking CascadePSP (paper §3.3, "Perturbed segmentation").

CascadePSP never trains on the outputs of a segmenter (that would fit that segmenter's mistakes); it degrades
the ground truth instead, in two steps, as the authors' code does:

1. ``subsample_contours``: each contour with at least 10 vertices loses one contiguous run of 10 % of its
   vertices (where the cut is short, so the shape is not torn apart), keeps a random 10 % of the rest, and is
   redrawn filled — a coarse polygonal mask like the output of a low-resolution segmenter.
2. ``random_dilate_erode``: up to 250 rounds of 4 random rectangles, each dilated (p = 0.5) or eroded with a
   random kernel (rectangle, ellipse or half ellipse, size 3–9); with p = 0.25 the rectangle's centre pixel is
   first set to a random value so holes and islands appear. It stops as soon as the IoU with the ground truth
   falls below a target drawn from U(0.8, 1).

All masks here are 2-D ``uint8`` arrays with values 0 / 1 in the same pixel frame as the input.

The recipe's numbers are pixels (kernels of 3–9 px, a vertex kept every ~10 px), tuned for the salient objects of
the paper's 224² training crops, which span a large part of the crop. On small objects (MoNuSeg nuclei are
~20 px across) one eroded rectangle wipes out every nucleus it covers and the IoU overshoots far below its target
(0.5 instead of 0.8–0.9). ``perturb_at_scale`` therefore applies the same recipe to a copy resized so that the
median object (by area) is at least ``MIN_OBJECT_DIAMETER`` px across (at most ``MAX_UPSCALE``×) and resizes the result
back — the same errors, relative to the object, as the recipe makes on the paper's objects.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# Published numbers (authors' code): contour sub-sampling rates, kernel sizes, rounds, IoU target range.
MIN_CONTOUR_VERTICES = 10
REGIONAL_REMOVE_RATE = 0.1
KEEP_RATE = 0.1
KERNEL_MIN, KERNEL_MAX = 3, 10
MAX_ROUNDS = 250
RECTS_PER_ROUND = 4
IOU_RANGE = (0.8, 1.0)
MIN_OBJECT_DIAMETER = 64  # px: below this (median over the objects) the recipe runs on an enlarged copy
MAX_UPSCALE = 4.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks; 1.0 when both are empty."""
    a = a > 0
    b = b > 0
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def subsample_contours(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Redraw every contour of ``mask`` from a sparse, partly removed subset of its vertices (step 1)."""
    binary = (mask > 0).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(binary)
    redrawn = []
    for contour in contours:
        n = contour.shape[0]
        if n < MIN_CONTOUR_VERTICES:
            redrawn.append(contour)  # too small to sub-sample: keep as is
            continue
        n_remove = int(n * REGIONAL_REMOVE_RATE)
        if n_remove > 0:
            # Cut where the chord is short among the candidates (shortest 10 %): removes a bump, not half the shape.
            gaps = np.sum((contour[: n - n_remove, 0] - contour[n_remove:, 0]) ** 2, axis=1)
            candidates = np.argsort(gaps, kind="stable")[: max(1, math.ceil(0.1 * len(gaps)))]
            start = int(rng.choice(candidates))
            contour = np.concatenate([contour[:start], contour[start + n_remove :]], axis=0)
        n = contour.shape[0]
        keep = np.sort(rng.choice(n, size=max(3, int(n * KEEP_RATE)), replace=False))
        redrawn.append(contour[keep])
    if redrawn:
        cv2.drawContours(out, redrawn, -1, 1, thickness=-1)
    return out


def _random_kernel(rng: np.random.Generator) -> np.ndarray:
    size = int(rng.integers(KERNEL_MIN, KERNEL_MAX))
    kind = int(rng.integers(1, 5))
    if kind == 1:
        return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    if kind == 3:
        kernel[: size // 2] = 0  # lower half ellipse
    elif kind == 4:
        kernel[size // 2 + 1 :] = 0  # upper half ellipse
    return kernel


def random_dilate_erode(
    mask: np.ndarray, gt: np.ndarray, iou_target: float, rng: np.random.Generator
) -> np.ndarray:
    """Dilate/erode random rectangles of ``mask`` until its IoU with ``gt`` drops below ``iou_target`` (step 2)."""
    seg = (mask > 0).astype(np.uint8)
    h, w = seg.shape
    if h <= 2 or w <= 2:
        return seg
    for _ in range(MAX_ROUNDS):
        for _ in range(RECTS_PER_ROUND):
            x0, y0 = int(rng.integers(w)), int(rng.integers(h))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            if rng.random() < 0.25:
                seg[(y0 + y1) // 2, (x0 + x1) // 2] = int(rng.integers(2))
            op = cv2.dilate if rng.random() < 0.5 else cv2.erode
            seg[y0:y1, x0:x1] = op(np.ascontiguousarray(seg[y0:y1, x0:x1]), _random_kernel(rng))
        if mask_iou(seg, gt) < iou_target:
            break
    return seg


def perturb_mask(
    gt: np.ndarray,
    *,
    iou_range: tuple[float, float] = IOU_RANGE,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """A degraded copy of the binary mask ``gt`` (uint8 0/1), IoU with ``gt`` near a target from U(*iou_range).

    The contour step alone may already fall below the target on thin shapes; that is kept (as in the paper's
    training data, such masks are part of the distribution).
    """
    rng = np.random.default_rng(rng)
    gt = (np.asarray(gt) > 0).astype(np.uint8)
    target = float(rng.uniform(*iou_range))
    seg = subsample_contours(gt, rng)
    if mask_iou(seg, gt) < target:
        return seg
    return random_dilate_erode(seg, gt, target, rng)


def median_object_diameter(gt: np.ndarray) -> float:
    """Equivalent diameter (px) of the object the median foreground pixel belongs to (an area-weighted median over
    the connected components of ``gt``, so that specks do not count for more than their pixels); inf if empty."""
    n, _, stats, _ = cv2.connectedComponentsWithStats((np.asarray(gt) > 0).astype(np.uint8), connectivity=8)
    if n <= 1:
        return math.inf
    areas = np.sort(stats[1:, cv2.CC_STAT_AREA].astype(np.float64))
    median_area = areas[np.searchsorted(np.cumsum(areas), areas.sum() / 2)]
    return float(2 * np.sqrt(median_area / np.pi))


def object_scale(gt: np.ndarray, *, min_diameter: float = MIN_OBJECT_DIAMETER, max_up: float = MAX_UPSCALE) -> float:
    """Enlargement (≥ 1) at which the median object of ``gt`` is ``min_diameter`` px across, capped at ``max_up``."""
    d = median_object_diameter(gt)
    return 1.0 if not math.isfinite(d) or d >= min_diameter else float(min(max_up, min_diameter / max(d, 1.0)))


def perturb_at_scale(
    gt: np.ndarray,
    scale: float | None = None,
    *,
    iou_range: tuple[float, float] = IOU_RANGE,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """``perturb_mask`` run on ``gt`` resized by ``scale`` (default: ``object_scale(gt)``), resized back.

    ``scale`` < 1 perturbs a reduced copy (coarser errors, like a segmenter run at lower resolution); > 1 an
    enlarged one (finer errors, for small objects). Area-averaged down, linear up, thresholded at 0.5.
    """
    gt = (np.asarray(gt) > 0).astype(np.uint8)
    scale = object_scale(gt) if scale is None else float(scale)
    h, w = gt.shape
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    if abs(scale - 1.0) < 1e-6 or min(h, w) < 8:
        return perturb_mask(gt, iou_range=iou_range, rng=rng)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    work = (cv2.resize(gt.astype(np.float32), size, interpolation=interp) > 0.5).astype(np.uint8)
    seg = perturb_mask(work, iou_range=iou_range, rng=rng)
    back = cv2.INTER_LINEAR if scale < 1 else cv2.INTER_AREA
    return (cv2.resize(seg.astype(np.float32), (w, h), interpolation=back) > 0.5).astype(np.uint8)
