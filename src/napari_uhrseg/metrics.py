"""Segmentation metrics and timing/memory probes.

* **mIoU** from a pooled confusion matrix (the GLNet / MagNet / ISDNet protocol): intersections and unions are
  summed over every pixel of every image first, and IoU is taken per class at the end. Pixels whose ground truth
  is ``ignore_index`` are not counted at all; classes in ``exclude`` are reported but not averaged (DeepGlobe:
  mIoU over classes 1–6, class 0 "unknown" ignored and excluded). A class absent from both prediction and ground
  truth has IoU NaN and is left out of the mean.
* **mBA** (mean boundary accuracy) exactly as CascadePSP defines it: for an image of W × H pixels,
  R = (W + H) / 300 and five radii r_i = 1 + int((R − 1) / 5 · i), i = 0..4; the band at radius r is the
  morphological gradient (dilation − erosion) of the ground truth with an elliptic kernel of size 2r + 1; the
  accuracy is the fraction of band pixels predicted right; mBA is the mean over the five radii, then over images.
  Multi-class: the band is the union of the per-class gradients, class 0 and void skipped, void pixels excluded.
* ``Timer``, ``peak_rss_mb``, ``current_rss_mb`` and ``RssSampler`` for the benchmarks.

All functions take label images as 2-D integer arrays in the same pixel frame (whatever level they were made at).
The confusion-matrix accumulator also takes lazily read arrays (zarr, dask, tifffile stores): it reads them window
by window so that a 100k × 100k pair never has to fit in memory.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np

from napari_uhrseg.errors import UhrsegError

__all__ = [
    "MetricInputError",
    "ConfusionMatrix",
    "confusion_matrix",
    "miou_from_confusion",
    "mba_radii",
    "boundary_band",
    "boundary_accuracy",
    "mean_boundary_accuracy",
    "windowed_boundary_accuracy",
    "evaluate",
    "Timer",
    "peak_rss_mb",
    "current_rss_mb",
    "RssSampler",
]


class MetricInputError(UhrsegError, ValueError):
    """Prediction and ground truth cannot be compared (shape, dtype or class range)."""


# ---------------------------------------------------------------------------------------------------------
# Confusion matrix and mIoU
# ---------------------------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise MetricInputError(
            f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}; "
            "compare labels made at the same pyramid level (resize the prediction with nearest-neighbour first)."
        )
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise MetricInputError(f"the {name} has dtype {a.dtype}; label images must hold integer class indices.")


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Confusion matrix of one label image pair.

    Parameters
    ----------
    pred, gt : array-like of int, same 2-D (or any) shape
        Predicted and true class index per pixel.
    num_classes : int
        Classes are ``0 .. num_classes-1``.
    ignore_index : int, optional
        Pixels whose *ground truth* equals this value are not counted (their prediction does not matter).

    Returns
    -------
    np.ndarray of int64, shape (num_classes, num_classes)
        ``cm[t, p]`` = number of pixels of true class ``t`` predicted as ``p``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    _check_pair(pred, gt)
    pred = pred.ravel().astype(np.int64, copy=False)
    gt = gt.ravel().astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    for name, a in (("prediction", pred), ("ground truth", gt)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise MetricInputError(
                f"the {name} holds class {int(a.max() if a.max() >= num_classes else a.min())}, outside "
                f"0..{num_classes - 1}; pass the right number of classes (or --num-classes) or an ignore index."
            )
    # One bincount over t*n + p counts every (true, predicted) pair in a single pass.
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a pooled confusion matrix over many images or windows.

    >>> cm = ConfusionMatrix(7, ignore_index=0)
    >>> for pred, gt in pairs:           # doctest: +SKIP
    ...     cm.update(pred, gt)
    >>> cm.miou(exclude=(0,))            # doctest: +SKIP
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        if num_classes < 1:
            raise MetricInputError(f"num_classes must be at least 1, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, gt) -> ConfusionMatrix:
        """Add one image (or window) pair held in memory."""
        self.matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        return self

    def update_windows(self, pred, gt, window: int = 4096) -> ConfusionMatrix:
        """Add a pair of large lazily-read 2-D arrays (zarr, dask, memmap), reading ``window``² pixels at a time.

        Peak memory is a few ``window``² int64 buffers whatever the image size.
        """
        if tuple(pred.shape) != tuple(gt.shape):
            raise MetricInputError(
                f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}; "
                "compare labels made at the same pyramid level."
            )
        for ys, xs in _windows(gt.shape, window):
            self.update(np.asarray(pred[ys, xs]), np.asarray(gt[ys, xs]))
        return self

    def miou(self, exclude: Iterable[int] = ()) -> tuple[float, np.ndarray]:
        """``(miou, per_class_iou)``; see :func:`miou_from_confusion`. ``ignore_index`` is excluded too."""
        exclude = set(exclude)
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            exclude.add(self.ignore_index)
        return miou_from_confusion(self.matrix, exclude=exclude)


def _windows(shape: Sequence[int], window: int):
    h, w = int(shape[0]), int(shape[1])
    for y0 in range(0, h, window):
        for x0 in range(0, w, window):
            yield slice(y0, min(y0 + window, h)), slice(x0, min(x0 + window, w))


def miou_from_confusion(cm: np.ndarray, exclude: Iterable[int] = ()) -> tuple[float, np.ndarray]:
    """Per-class IoU and their mean from a pooled confusion matrix.

    IoU_c = TP / (TP + FP + FN) = cm[c, c] / (row_c + col_c − cm[c, c]). A class with an empty union (absent from
    both prediction and ground truth) gets NaN and is not averaged; classes in ``exclude`` are reported but not
    averaged. The mean is NaN when no class is left.

    Returns
    -------
    (float, np.ndarray of float64, shape (num_classes,))
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    averaged = np.ones(len(iou), dtype=bool)
    for c in exclude:
        if 0 <= c < len(iou):
            averaged[c] = False
    values = iou[averaged & ~np.isnan(iou)]
    miou = float(values.mean()) if values.size else float("nan")
    return miou, iou


# ---------------------------------------------------------------------------------------------------------
# Mean boundary accuracy (CascadePSP)
# ---------------------------------------------------------------------------------------------------------
def mba_radii(height: int, width: int, num_steps: int = 5) -> list[int]:
    """The CascadePSP band radii for an image of ``height`` × ``width`` pixels (2448² → [1, 4, 7, 10, 13]).

    ``int`` truncates toward zero as in the authors' code, so images under 300 px a side get radius 1 throughout.
    """
    max_radius = (width + height) / 300
    return [1 + int((max_radius - 1) / num_steps * i) for i in range(num_steps)]


def _ellipse(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def boundary_band(gt: np.ndarray, radius: int, *, void: int | None = None) -> np.ndarray:
    """Boolean band of ``radius`` pixels around the class boundaries of ``gt``.

    CascadePSP's definition: the union over the classes present (class 0 and ``void`` skipped) of the
    morphological gradient of that class's mask with a ``2·radius+1`` ellipse. For a binary 0/1 mask this is the
    gradient of the mask. Image borders are not boundaries (OpenCV ignores out-of-image neighbours).

    Computed without the per-class loop: a pixel is in some class's gradient exactly when its ellipse
    neighbourhood holds two different labels (grey dilation ≠ grey erosion of the label image) and at least one
    label that is neither 0 nor void — three morphological passes instead of two per class.
    """
    import cv2

    kernel = _ellipse(radius)
    labels = _as_cv_labels(gt)
    if labels is None:  # labels beyond uint16: the literal per-class union
        band = np.zeros(gt.shape, dtype=bool)
        for c in np.unique(gt):
            if c != 0 and (void is None or c != void):
                class_mask = (gt == c).astype(np.uint8)
                band |= cv2.morphologyEx(class_mask, cv2.MORPH_GRADIENT, kernel) > 0
        return band
    mixed = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    real = gt != 0
    if void is not None:
        real &= gt != void
    return mixed & (cv2.dilate(real.astype(np.uint8), kernel) > 0)


def _as_cv_labels(gt: np.ndarray) -> np.ndarray | None:
    """``gt`` as uint8/uint16 for OpenCV's morphology, or None when its values do not fit."""
    if gt.dtype in (np.uint8, np.uint16):
        return gt
    if gt.dtype == bool:
        return gt.astype(np.uint8)
    if gt.size and (gt.min() < 0 or gt.max() > 65535):
        return None
    return gt.astype(np.uint16)


def boundary_accuracy(pred, gt, *, void: int | None = None, num_steps: int = 5) -> float:
    """Mean boundary accuracy (mBA) of one image, CascadePSP definition.

    Parameters
    ----------
    pred, gt : 2-D int arrays, same shape
        Class indices. For binary masks pass 0/1 (or 0/255, binarise first: ``mask > 127``).
    void : int, optional
        Ground-truth value that is neither a class nor a boundary (DeepGlobe "unknown" = 0, ADE20K void = 0):
        its pixels are removed from the band. Class 0 never spawns a band of its own, as in the authors' code.
    num_steps : int
        Number of radii (5 in the paper).

    Returns
    -------
    float
        Accuracy inside the band averaged over the radii, in [0, 1]; NaN when the image has no boundary at all
        (such images are skipped by :func:`mean_boundary_accuracy`).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    _check_pair(pred, gt)
    if gt.ndim != 2:
        raise MetricInputError(f"mBA needs 2-D label images, got shape {gt.shape}.")
    accuracies = []
    for radius in mba_radii(gt.shape[0], gt.shape[1], num_steps):
        band = boundary_band(gt, radius, void=void)
        if void is not None:
            band &= gt != void
        n = int(band.sum())
        if n == 0:
            return float("nan")
        accuracies.append(int((pred[band] == gt[band]).sum()) / n)
    return float(sum(accuracies) / num_steps)


def mean_boundary_accuracy(per_image: Iterable[float]) -> float:
    """Dataset mBA: the mean of per-image values, images without any boundary (NaN) left out."""
    values = [v for v in per_image if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def windowed_boundary_accuracy(pred, gt, *, window: int = 2448, void: int | None = None) -> float:
    """mBA of a large image cut into ``window``-sized tiles, each one an "image" in the papers' sense.

    The band radii grow with the image size, so whole-slide mBA would measure a band tens of pixels wide; cutting
    into DeepGlobe-sized windows keeps the measure comparable to the papers'. The last window of a row or column
    is shifted back inside the image (as CascadePSP shifts its crops), so every window is full-sized.
    """
    h, w = gt.shape[:2]
    values = []
    for y0 in _covering_starts(h, window):
        for x0 in _covering_starts(w, window):
            ys, xs = slice(y0, y0 + window), slice(x0, x0 + window)
            values.append(boundary_accuracy(np.asarray(pred[ys, xs]), np.asarray(gt[ys, xs]), void=void))
    return mean_boundary_accuracy(values)


def _covering_starts(length: int, window: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window, window))
    return starts + [length - window]


def evaluate(
    pred,
    gt,
    num_classes: int,
    ignore_index: int | None = None,
    exclude: Iterable[int] = (),
    mba_window: int | None = None,
) -> dict:
    """mIoU, per-class IoU and mBA of one image pair (or a list of pairs: pooled IoU, mean of per-image mBA).

    ``ignore_index`` is not counted in the confusion matrix, not averaged, and is void for mBA.
    ``mba_window``: cut images larger than this into windows for mBA (see :func:`windowed_boundary_accuracy`).

    Returns
    -------
    dict with ``miou`` (float), ``per_class_iou`` (list of float, NaN for absent classes), ``mba`` (float),
    ``num_images`` (int).
    """
    pairs = list(zip(pred, gt)) if isinstance(pred, (list, tuple)) else [(pred, gt)]
    cm = ConfusionMatrix(num_classes, ignore_index)
    mbas = []
    for p, g in pairs:
        cm.update_windows(p, g)
        if mba_window and max(g.shape[:2]) > mba_window:
            mbas.append(windowed_boundary_accuracy(p, g, window=mba_window, void=ignore_index))
        else:
            mbas.append(boundary_accuracy(np.asarray(p), np.asarray(g), void=ignore_index))
    miou, per_class = cm.miou(exclude=exclude)
    return {
        "miou": miou,
        "per_class_iou": [float(v) for v in per_class],
        "mba": mean_boundary_accuracy(mbas),
        "num_images": len(pairs),
    }


# ---------------------------------------------------------------------------------------------------------
# Timing and memory probes
# ---------------------------------------------------------------------------------------------------------
class Timer:
    """Wall-clock timer: ``with Timer() as t: ...`` then ``t.elapsed`` (seconds, ``time.perf_counter``)."""

    def __init__(self):
        self.start = None
        self.elapsed = float("nan")

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed = time.perf_counter() - self.start


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MiB (``getrusage``; kB on Linux, B on macOS).

    The kernel never resets it: to measure one step in isolation run it in a fresh process, or use
    :class:`RssSampler`.
    """
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set instead
        import psutil

        return psutil.Process(os.getpid()).memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return peak * scale / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0: ``5`` into ``/proc/self/clear_refs``
    resets ``VmHWM``). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _kernel_peak_rss_mb() is not None
    except OSError:
        return False


def _kernel_peak_rss_mb() -> float | None:
    """``VmHWM`` of ``/proc/self/status`` in MiB, or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RssSampler:
    """Peak RSS of this process over one block of code; ``.peak_mb`` after the block.

    On Linux the kernel's own high-water mark is reset on entry and read on exit: exact, and no thread runs
    beside the code being timed (a sampling thread slowed the MagNet benchmark by 3–5 %). Elsewhere a thread
    samples the RSS every ``interval`` seconds, which can miss short spikes. Only one block at a time should
    use it: the reset is process-wide.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_mb = 0.0
        self.kernel = False  # True when the kernel's high-water mark is used
        self._stop = threading.Event()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak_mb = current_rss_mb()
        self.kernel = _reset_peak_rss()
        if not self.kernel:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = _kernel_peak_rss_mb() if self.kernel else None
        self.peak_mb = max(self.peak_mb, current_rss_mb(), peak or 0.0)
