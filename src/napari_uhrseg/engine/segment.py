"""Run any ``Method`` over a whole image, window by window, with memory bounded by the window.

Frames: a run works on one pyramid level, the *working level*; windows, tiles and the label store are in
working-level pixels; regions given by callers and every overlay record are in *level-0 pixels*, converted
with ``napari_uhrseg.io.coords``.

How it goes (see ``windows.py`` for the grid):

1. the region is cut into overlapping windows in raster order; a one-slot reader thread reads window i+1
   while the method computes window i;
2. each window's class probabilities are weighted by linear ramps across its overlaps;
3. the window's *tile* (the part no later window touches) is summed with the pending contributions of earlier
   windows, turned into labels (argmax of the weighted sum, which is the argmax of the weighted mean) and
   written to the label store at once; the window's parts that later tiles need are kept pending — in memory,
   or spilled to a temporary folder on disk when the region is wide enough for them to matter — so that peak
   memory depends on the window, never on the image;
4. the method's artefacts become overlay records in level-0 pixels (PPN patches with probability and
   selected flag);
5. cancel is checked between windows; on cancel or error the pending parts of finished windows are written
   too, so every finished window stays in the store.

``iter_segment`` is the generator the napari worker drives (it yields one ``WindowEvent`` per window and
returns the ``SegmentResult``); ``segment_image`` runs it to the end.
"""
from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from napari_uhrseg.engine.stitch import (  # noqa: F401 - argmax_classes is part of this module's API
    Pending,
    TileIndex,
    argmax_classes,
    flush_pending,
    pending_peak_estimate,
    stitch_window,
)
from napari_uhrseg.engine.windows import Window, window_grid
from napari_uhrseg.errors import UhrsegError

DEFAULT_WINDOW = 2448  # px at the working level: the DeepGlobe tile size the methods are trained on
DEFAULT_OVERLAP = 128  # px: wide enough for a smooth cross-fade, small enough to cost ~10 % extra compute
# Pending overlap strips above this many bytes go to a temporary folder instead of RAM. At the defaults
# (7 classes, 128 px overlap) a region ~9,000 px wide reaches it; narrower regions stay in memory.
DEFAULT_SPILL_BYTES = 32 * 2**20

Box = tuple[int, int, int, int]


@dataclass
class WindowEvent:
    """What a finished window reports.

    index, total: this window and the number of windows. box: the window (y0, x0, y1, x1) in working-level
    pixels; box_level0: the same in level-0 pixels. tile: the part now final (working-level pixels);
    tile_labels: its labels, written to the store at ``store_offset`` (row, col in store pixels).
    store, downsample, store_origin: the label store being filled and where it sits (see ``SegmentResult``).
    overlays: records in level-0 pixels (see ``overlay_records``). artefacts: the method's raw artefacts,
    in pixels of ``read_box`` (the working-level box the method saw, which may exceed ``box`` for context).
    seconds: wait for the read, predict, stitch (blend + write) and total, in seconds.
    """

    index: int
    total: int
    box: Box
    box_level0: tuple[float, float, float, float]
    tile: Box
    tile_labels: np.ndarray
    store_offset: tuple[int, int]
    overlays: list[dict]
    artefacts: dict
    read_box: Box
    seconds: dict[str, float]
    oom_retries: int = 0
    # Where the labels go, so a viewer can show the store from the first window on.
    store: Any = None
    downsample: tuple[float, float] = (1.0, 1.0)
    store_origin: tuple[int, int] = (0, 0)


@dataclass
class SegmentResult:
    """The outcome of a run.

    store: the ``LabelStore`` holding the labels at the working level; its pixel (0, 0) is working-level pixel
    ``store_origin``. overlays: every overlay record (level-0 pixels). timings: per-window seconds and totals.
    region / region_level0: the segmented box at the working level and at level 0.
    """

    store: Any
    overlays: list[dict]
    timings: dict[str, Any]
    device: str
    method: str
    level: int
    downsample: tuple[float, float]  # (dy, dx) level-0 pixels per working-level pixel
    region: Box
    region_level0: tuple[float, float, float, float]
    store_origin: tuple[int, int]
    windows_total: int
    windows_done: int
    cancelled: bool = False
    oom_retries: int = 0
    pending_peak_bytes: int = 0  # largest RAM held by pending overlap strips
    spilled: bool = False  # pending strips went to a temporary folder

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what ``uhrseg segment`` prints)."""
        per_window = [w["total_s"] for w in self.timings["windows"]]
        return {
            "method": self.method,
            "device": self.device,
            "level": self.level,
            "downsample": list(self.downsample),
            "region_level0": list(self.region_level0),
            "labels_shape": list(self.store.shape),
            "windows": self.windows_total,
            "windows_done": self.windows_done,
            "cancelled": self.cancelled,
            "oom_retries": self.oom_retries,
            "patches": sum(1 for r in self.overlays if r.get("kind") == "ppn_patch"),
            "patches_selected": sum(1 for r in self.overlays if r.get("kind") == "ppn_patch" and r["selected"]),
            "seconds_total": round(self.timings["total_s"], 3),
            "seconds_per_window": [round(s, 3) for s in per_window],
        }


# --------------------------------------------------------------------------------------------- public API
def segment_image(pyramid, method, **kwargs) -> SegmentResult:
    """Segment ``pyramid`` with ``method``; the keyword arguments are those of ``iter_segment``."""
    gen = iter_segment(pyramid, method, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def iter_segment(
    pyramid,
    method,
    *,
    level: int = 0,
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_OVERLAP,
    region: tuple[float, float, float, float] | None = None,
    store=None,
    store_path: str | Path | None = None,
    cancel=None,
    progress: Callable[[int, int], None] | None = None,
    pad_small: bool = True,
    spill_bytes: int = DEFAULT_SPILL_BYTES,
    keep_overlays: bool = True,
) -> Generator[WindowEvent, None, SegmentResult]:
    """Segment window by window, yielding a ``WindowEvent`` per finished window; returns a ``SegmentResult``.

    Parameters
    ----------
    pyramid : napari_uhrseg.io.pyramid.Pyramid
    method : napari_uhrseg.methods.Method
    level : working level (0 = full resolution).
    window, overlap : window side and minimum overlap, in working-level pixels.
    region : (y0, x0, y1, x1) in level-0 pixels; None = the whole image.
    store : a ``LabelStore`` to write into, shaped like the working level (written at the region's place) or
        like the region; None = a new one (numpy when small, zarr at ``store_path`` when given or large).
    cancel : a ``threading.Event`` or a callable returning True to stop; checked between windows.
    progress : called as ``progress(windows_done, windows_total)``.
    pad_small : pad an image smaller than a window up to the window (reflected), so the method sees the
        scale it was trained at.
    spill_bytes : pending overlap strips larger than this go to a temporary folder on disk.
    keep_overlays : collect every window's overlay records in ``SegmentResult.overlays``; a caller that takes
        them from the events (and writes them out as they come) passes False, so that memory does not grow
        with the number of windows (16 records a window: ~130 MB of dicts for a 100k² slide). The result's
        ``overlays`` is then empty and ``summary()`` counts no patches: the caller counts them (``OverlaySpool``).
    """
    from napari_uhrseg.io.labels import create_label_store
    from napari_uhrseg.memory import tune_native_heap

    tune_native_heap()  # reuse freed memory without creeping up window after window (see memory.py)
    if not 0 <= level < len(pyramid.levels):
        raise UhrsegError(f"Level {level} does not exist: {pyramid.name} has levels 0..{len(pyramid.levels) - 1}.")
    level_shape = tuple(int(v) for v in pyramid.level_shape(level))
    downsample = downsample_pair(pyramid.downsamples[level])
    work_region = region_at_level(region, downsample, level_shape)
    grid = window_grid(work_region, window, overlap)
    num_classes = len(method.class_names)
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    region_shape = (work_region[2] - work_region[0], work_region[3] - work_region[1])
    if store is None:
        store = create_label_store(region_shape, path=store_path, dtype=dtype, class_names=list(method.class_names))
    origin = _store_origin(store, work_region, level_shape)

    tiles = TileIndex(grid)
    spill = pending_peak_estimate(grid, tiles, num_classes) > spill_bytes
    pending = Pending(spill, num_classes)
    windows_log: list[dict] = []
    overlays: list[dict] = []
    done, cancelled, oom_total = 0, False, 0
    t_start = time.perf_counter()
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uhrseg-read")
    try:
        future = reader.submit(_read_window, pyramid, level, grid[0], window, level_shape, pad_small)
        for i, win in enumerate(grid):
            if _is_cancelled(cancel):
                cancelled = True
                break
            t0 = time.perf_counter()
            pixels, read_box = future.result()
            t_read = time.perf_counter()
            if i + 1 < len(grid):  # read the next window while this one computes
                future = reader.submit(_read_window, pyramid, level, grid[i + 1], window, level_shape, pad_small)
            prediction, retries = _predict(method, pixels, pyramid.name, win)
            t_pred = time.perf_counter()
            probs = _crop_to_window(prediction.probabilities, read_box, win, num_classes)
            labels = stitch_window(win, probs, tiles, pending, dtype)
            del probs
            ty0, tx0 = win.tile[0] - origin[0], win.tile[1] - origin[1]
            store.write_window(ty0, tx0, labels)
            t_end = time.perf_counter()

            records = overlay_records(prediction.artefacts, read_box, win.index, level, downsample, level_shape)
            artefacts = dict(prediction.artefacts)
            del prediction  # the window's probabilities go before the consumer runs and the next window starts
            if keep_overlays:
                overlays.extend(records)
            seconds = {
                "read_wait_s": t_read - t0,
                "predict_s": t_pred - t_read,
                "stitch_s": t_end - t_pred,
                "total_s": t_end - t0,
            }
            windows_log.append({"window": win.index, **seconds})
            done, oom_total = done + 1, oom_total + retries
            if progress is not None:
                progress(done, len(grid))
            yield WindowEvent(
                index=win.index, total=len(grid), box=win.box,
                box_level0=box_to_level0(win.box, downsample), tile=win.tile, tile_labels=labels,
                store_offset=(ty0, tx0), overlays=records,
                artefacts=artefacts,
                read_box=read_box, seconds=seconds, oom_retries=retries,
                store=store, downsample=downsample, store_origin=origin,
            )
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        # Whatever stopped the run, the finished windows' pending parts go to the store too.
        flush_pending(pending, tiles, store, origin, dtype)
        pending.close()

    total = time.perf_counter() - t_start
    per = [w["total_s"] for w in windows_log]
    return SegmentResult(
        store=store,
        overlays=overlays,
        timings={"windows": windows_log, "total_s": total, "mean_window_s": float(np.mean(per)) if per else 0.0},
        device=str(getattr(method, "device", "cpu")),
        method=getattr(method, "name", type(method).__name__),
        level=level,
        downsample=downsample,
        region=work_region,
        region_level0=box_to_level0(work_region, downsample),
        store_origin=origin,
        windows_total=len(grid),
        windows_done=done,
        cancelled=cancelled,
        oom_retries=oom_total,
        pending_peak_bytes=pending.peak_bytes,
        spilled=spill,
    )


# --------------------------------------------------------------------------------------------- coordinates
def downsample_pair(downsample) -> tuple[float, float]:
    """A level's downsample (scalar or (dy, dx)) as a (dy, dx) pair of floats."""
    f = np.asarray(downsample, dtype=np.float64).reshape(-1)
    return (float(f[0]), float(f[-1]))


def box_to_level0(box, downsample) -> tuple[float, float, float, float]:
    """A (y0, x0, y1, x1) box at a level with ``downsample`` → level-0 pixels (pixel-corner convention)."""
    from napari_uhrseg.io.coords import to_level0

    return tuple(float(v) for v in to_level0(np.asarray(box, dtype=np.float64), downsample))


def region_at_level(region, downsample, level_shape: tuple[int, int]) -> Box:
    """A level-0 (y0, x0, y1, x1) region → the working-level window covering it (rounded outwards, clipped)."""
    if region is None:
        return (0, 0, int(level_shape[0]), int(level_shape[1]))
    from napari_uhrseg.io.coords import level0_box_to_level_window

    if len(region) != 4:
        raise UhrsegError(f"A region is (y0, x0, y1, x1) in level-0 pixels; got {region!r}.")
    y0, x0, y1, x1 = level0_box_to_level_window(tuple(float(v) for v in region), downsample, level_shape)
    if y1 <= y0 or x1 <= x0:
        full = box_to_level0((0, 0, *level_shape), downsample)
        raise UhrsegError(
            f"The region {tuple(region)} (level-0 pixels) does not overlap the image "
            f"({full[2]:.0f} x {full[3]:.0f} px at level 0): draw the box over the image or segment the whole image."
        )
    return (int(y0), int(x0), int(y1), int(x1))


def overlay_records(artefacts: dict, read_box: Box, window_index: int, level: int, downsample,
                    level_shape: tuple[int, int]) -> list[dict]:
    """The method's patch artefacts (in pixels of ``read_box``) → records in level-0 pixels.

    Each record: ``{"kind": "ppn_patch", "box": (y0, x0, y1, x1) level-0 px, "probability": float,
    "selected": bool, "window": int, "level": int}``, plus ``"scorer"`` when the method says what ranked the
    patches (GRNet: "ppn", or "uncertainty" when "probability" is the G-branch's doubt). Boxes are clipped to
    the image; patches that lie in the padding of a small image are dropped.
    """
    out = []
    ry0, rx0 = read_box[0], read_box[1]
    for patch in artefacts.get("patches", ()) or ():
        y0, x0, y1, x1 = (float(v) for v in patch["box"])
        box = (max(0.0, ry0 + y0), max(0.0, rx0 + x0),
               min(float(level_shape[0]), ry0 + y1), min(float(level_shape[1]), rx0 + x1))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        out.append({
            "kind": "ppn_patch",
            "box": box_to_level0(box, downsample),
            "probability": float(patch.get("probability", float("nan"))),
            "selected": bool(patch.get("selected", False)),
            "window": int(window_index),
            "level": int(level),
        })
        if patch.get("scorer"):
            out[-1]["scorer"] = str(patch["scorer"])
    return out


# --------------------------------------------------------------------------------------------- internals
def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _store_origin(store, work_region: Box, level_shape) -> tuple[int, int]:
    shape = tuple(int(v) for v in store.shape[:2])
    if shape == tuple(level_shape):
        return (0, 0)
    if shape == (work_region[2] - work_region[0], work_region[3] - work_region[1]):
        return (work_region[0], work_region[1])
    raise UhrsegError(
        f"The label store is {shape[0]} x {shape[1]} px but the working level is {level_shape[0]} x "
        f"{level_shape[1]} and the region {work_region[2] - work_region[0]} x {work_region[3] - work_region[1]}: "
        "pass a store shaped like one of them, or none."
    )


def _read_box(win: Window, window: int, level_shape) -> Box:
    """The box to read for ``win``: the window itself, grown inside the image up to ``window`` px per axis
    when the window is smaller (a small region keeps its real surroundings as context)."""
    out = []
    for start, stop, dim in ((win.y0, win.y1, level_shape[0]), (win.x0, win.x1, level_shape[1])):
        want = min(window, int(dim))
        size = stop - start
        if size < want:
            start = min(max(0, start - (want - size) // 2), int(dim) - want)
            stop = start + want
        out.append((start, stop))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def _read_window(pyramid, level: int, win: Window, window: int, level_shape, pad_small: bool):
    """Read ``win`` (with context) as RGB uint8; pad up to ``window`` when the image is smaller."""
    box = _read_box(win, window, level_shape)
    h, w = box[2] - box[0], box[3] - box[1]
    pixels = np.asarray(pyramid.read_region(level, box[0], box[1], h, w))
    if pad_small and (h < window or w < window):
        pad = ((0, window - h), (0, window - w), (0, 0))
        mode = "reflect" if min(h, w) > 1 else "edge"
        pixels = np.pad(pixels, pad, mode=mode)
    return np.ascontiguousarray(pixels), box


def _oom_error_types() -> tuple[type[BaseException], ...]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return ()
    types = [t for t in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None)) if t]
    return tuple(dict.fromkeys(types))


def _release_gpu_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def _predict(method, pixels: np.ndarray, image_name: str, win: Window):
    """``method.predict`` with one retry after freeing cached GPU memory; returns (prediction, retries).

    Halving a patch batch is the method's own business; this catches what is left after it."""
    oom = _oom_error_types()
    try:
        return method.predict(pixels), 0
    except oom:
        _release_gpu_memory()
    try:
        return method.predict(pixels), 1
    except oom as exc:
        raise UhrsegError(
            f"Out of GPU memory on window {win.index} of {image_name} even after freeing the cache: "
            "use a smaller window (--window), a coarser level, or the CPU (--device cpu). "
            "Finished windows were kept."
        ) from exc


def _crop_to_window(probabilities, read_box: Box, win: Window, num_classes: int) -> np.ndarray:
    """The method's (C, H, W) probabilities over ``read_box`` (plus padding) → float32 over ``win`` only."""
    probs = np.asarray(probabilities)
    if probs.ndim != 3 or probs.shape[0] != num_classes:
        raise UhrsegError(
            f"The method returned probabilities of shape {probs.shape}; expected ({num_classes}, H, W). "
            "The checkpoint and the method disagree on the classes."
        )
    need = (read_box[2] - read_box[0], read_box[3] - read_box[1])
    if probs.shape[1] < need[0] or probs.shape[2] < need[1]:
        raise UhrsegError(f"The method returned {probs.shape[1:]} px for a {need} px window.")
    oy, ox = win.y0 - read_box[0], win.x0 - read_box[1]
    crop = probs[:, oy:oy + win.shape[0], ox:ox + win.shape[1]]
    # The engine owns a prediction's probabilities: they are weighted in place (no window-sized copy) unless
    # they come read-only or in another dtype.
    if crop.dtype != np.float32 or not crop.flags.writeable:
        crop = np.array(crop, dtype=np.float32, copy=True)
    return crop
