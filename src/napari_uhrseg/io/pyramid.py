"""Lazy image pyramids: every supported image, whatever its size, as a list of dask arrays.

``open_pyramid(path_or_array)`` returns a :class:`Pyramid` whose levels are dask arrays shaped ``(Y, X)`` or
``(Y, X, C)`` (channels last), finest first. Nothing is read at open time beyond headers and metadata: a level is
read chunk by chunk when a chunk is computed (a napari view, a window of a segmentation run). An image stored
without a pyramid (a plain TIFF, a PNG, an array) gets lower levels built lazily by 2 x 2 averaging.

Formats and their readers live in :mod:`napari_uhrseg.io.formats`; this module holds the pyramid itself, the
checks every image goes through (shape, dtype, channels) and :meth:`Pyramid.read_region`, the one way the
methods read pixels (RGB ``uint8``, zero-padded past the edge).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np

from napari_uhrseg.errors import UnsupportedImageError
from napari_uhrseg.io import coords

#: Smallest accepted image side (pixels); anything smaller is not worth a pyramid or a model.
MIN_SIDE = 8
#: More channels than this is almost surely a stack read the wrong way round.
MAX_CHANNELS = 64
#: Lazy lower levels are added until the coarsest level's longer side is at most this (pixels).
COARSEST_SIDE = 512
#: Chunk size (pixels) of lazily built levels and of arrays handed in without chunks.
LAZY_CHUNK = 1024
#: Percentiles giving the intensity range used by ``read_region`` for data that is not 8-bit.
CONTRAST_PERCENTILES = (0.5, 99.5)


@dataclass
class Pyramid:
    """An image as levels of decreasing resolution, level 0 the finest.

    Attributes
    ----------
    levels : dask arrays ``(Y, X)`` or ``(Y, X, C)``, finest first.
    downsamples : level-0 pixels per level pixel (level 0 = 1.0); the mean of the two axes when they differ
        slightly (odd sizes); :meth:`level_scale` gives the exact per-axis pair.
    pixel_size : ``(y, x)`` size of a level-0 pixel in ``pixel_unit`` when the file says it, else None.
    channel_axis : 2 for images with channels, None for single-channel (grayscale) images.
    channel_names : names from the file (OME channels) or None.
    rgb : True when the channels are red, green, blue (alpha already dropped).
    contrast_limits : intensity range mapped to 0..255 by :meth:`read_region`; None means "estimate once
        from the coarsest level" (see :meth:`intensity_range`).
    """

    levels: list
    downsamples: list[float]
    pixel_size: tuple[float, float] | None = None
    pixel_unit: str | None = None
    channel_axis: int | None = None
    channel_names: list[str] | None = None
    rgb: bool = False
    name: str = "image"
    path: str | None = None
    contrast_limits: tuple[float, float] | None = None
    metadata: dict = field(default_factory=dict)
    # Open file handles etc. that must live as long as the dask arrays reading from them.
    _resources: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(Y, X)`` in pixels."""
        return self.level_shape(0)

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def num_channels(self) -> int:
        return 1 if self.channel_axis is None else int(self.levels[0].shape[2])

    def level_shape(self, level: int) -> tuple[int, int]:
        """``(Y, X)`` of a level, in that level's pixels."""
        return (int(self.levels[level].shape[0]), int(self.levels[level].shape[1]))

    def level_scale(self, level: int) -> tuple[float, float]:
        """Exact ``(dy, dx)`` downsample of a level (level-0 pixels per level pixel)."""
        return coords.level_scale(self.shape, self.level_shape(level))

    def intensity_range(self) -> tuple[float, float]:
        """The range mapped to 0..255 by :meth:`read_region`.

        8-bit images: 0..255. Anything else: ``contrast_limits`` when set, otherwise the 0.5th and 99.5th
        percentiles of the coarsest level, computed once and reused, so that every window of a run is scaled
        the same way (per-window percentiles would show seams).
        """
        if self.dtype == np.uint8:
            return (0.0, 255.0)
        if self.contrast_limits is None:
            coarse = np.asarray(self.levels[-1], dtype=np.float64)
            lo, hi = np.nanpercentile(coarse, CONTRAST_PERCENTILES)
            if not hi > lo:
                lo, hi = float(np.nanmin(coarse)), float(np.nanmax(coarse))
            self.contrast_limits = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
        return self.contrast_limits

    def read_region(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y0, y0 + h) x [x0, x0 + w)`` of a level (that level's pixels) as RGB ``uint8`` ``(h, w, 3)``.

        Parts outside the image are zeros. Grayscale is repeated on three channels; images with more than
        three channels give their first three (two channels give ``(c0, c1, c0)``); data other than 8-bit is
        scaled linearly from :meth:`intensity_range` to 0..255 and clipped.
        """
        if not 0 <= level < len(self.levels):
            raise IndexError(f"Level {level} does not exist: {self.name} has levels 0..{len(self.levels) - 1}.")
        out = np.zeros((int(h), int(w), 3), np.uint8)
        ly, lx = self.level_shape(level)
        sy0, sx0, sy1, sx1 = coords.box_to_window((y0, x0, y0 + h, x0 + w), (ly, lx))
        if sy1 <= sy0 or sx1 <= sx0:
            return out
        block = np.asarray(self.levels[level][sy0:sy1, sx0:sx1])
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = self._to_rgb8(block)
        return out

    def _to_rgb8(self, block: np.ndarray) -> np.ndarray:
        if block.ndim == 2:
            block = block[..., None]
        c = block.shape[2]
        block = block[..., [0, 0, 0] if c == 1 else [0, 1, 0] if c == 2 else [0, 1, 2]]
        if block.dtype == np.uint8:
            return block
        lo, hi = self.intensity_range()
        scaled = (block.astype(np.float32) - lo) * (255.0 / (hi - lo))
        return np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- opening


def open_pyramid(path_or_array, *, name: str | None = None) -> Pyramid:
    """Open an image lazily as a :class:`Pyramid`.

    Parameters
    ----------
    path_or_array : a path (pyramidal OME-TIFF, (Big)TIFF, GeoTIFF, SVS/NDPI/other slide TIFF, OME-Zarr or zarr
        folder, PNG, JPEG), a numpy/dask/zarr array ``(Y, X)``, ``(Y, X, C)`` or ``(C, Y, X)``, or a Pyramid.
    name : layer/display name; defaults to the file name.

    Raises
    ------
    UnsupportedImageError : the file is missing, empty, corrupt, of another format than its name says, too
        small, a 3-D stack, or of a dtype/channel layout we cannot show; the message names the file and says
        what to do.
    """
    if isinstance(path_or_array, Pyramid):
        return path_or_array
    if isinstance(path_or_array, (str, os.PathLike)):
        from napari_uhrseg.io import formats

        path = Path(path_or_array)
        source = formats.open_source(path)
        display = name or formats.display_name(path)
        return _build(source, display, str(path))
    if hasattr(path_or_array, "shape") and hasattr(path_or_array, "dtype"):
        source = _array_source(path_or_array)
        return _build(source, name or "image", None)
    raise UnsupportedImageError(
        f"Cannot open {type(path_or_array).__name__} as an image: give a file path or a numpy/dask array."
    )


@dataclass
class Source:
    """What a format reader found: levels in file order with their axes, plus metadata (internal)."""

    levels: list
    axes: str  # letters of the level arrays, e.g. "YXS", "CYX", "TCZYX"; Y and X required
    pixel_size: tuple[float, float] | None = None
    pixel_unit: str | None = None
    channel_names: list[str] | None = None
    rgb_hint: bool | None = None  # the file says the samples are RGB(A)
    resources: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    label: str = "image"  # what to call the input in messages (the file path)


def _array_source(arr) -> Source:
    """Guess the axes of an in-memory array: channels last if the last axis is short, else first."""
    if not isinstance(arr, da.Array):
        chunks = getattr(arr, "chunks", None)
        chunks = chunks if chunks is not None and len(chunks) == arr.ndim and isinstance(chunks[0], int) else None
        chunks = chunks or tuple(min(LAZY_CHUNK, s) if i < 2 else -1 for i, s in enumerate(arr.shape))
        if arr.ndim == 3 and arr.shape[0] <= MAX_CHANNELS < min(arr.shape[1:]):
            chunks = (-1, *[min(LAZY_CHUNK, s) for s in arr.shape[1:]])
        arr = da.from_array(arr, chunks=chunks, asarray=True, lock=False)
    axes = {2: "YX", 3: "YXC"}.get(arr.ndim, "Q" * arr.ndim)
    if arr.ndim == 3 and arr.shape[2] > MAX_CHANNELS and arr.shape[0] <= MAX_CHANNELS:
        axes = "CYX"
    return Source(levels=[arr], axes=axes, label="the array")


def _build(source: Source, name: str, path: str | None) -> Pyramid:
    levels = [to_yxc(level, source.axes, source.label) for level in source.levels]
    levels = [lv for lv in levels if lv.shape[0] >= 1 and lv.shape[1] >= 1]
    level0, rgb, channel_names = _check_pixels(levels[0], source)
    levels = [_same_channels(lv, level0) for lv in levels]
    levels[0] = level0
    levels = _sorted_levels(levels)
    if len(levels) == 1 or max(levels[-1].shape[:2]) > COARSEST_SIDE:
        levels = levels + coarsen_levels(levels[-1])
    downsamples = [float(np.mean(coords.level_scale(levels[0].shape, lv.shape))) for lv in levels]
    return Pyramid(
        levels=levels, downsamples=downsamples, pixel_size=source.pixel_size, pixel_unit=source.pixel_unit,
        channel_axis=2 if levels[0].ndim == 3 else None, channel_names=channel_names, rgb=rgb, name=name,
        path=path, metadata=dict(source.metadata), _resources=list(source.resources),
    )


def to_yxc(arr, axes: str, label: str):
    """Reorder a level to ``(Y, X[, C])``: singleton axes dropped, the channel/sample axis moved last.

    Any other axis longer than 1 (Z, T, a page stack) means a 3-D/time stack, which we refuse.
    """
    axes = axes.upper()
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        raise UnsupportedImageError(
            f"{label} has shape {tuple(arr.shape)}, which is not a 2-D image: save a single 2-D plane "
            "(Y, X), an RGB image (Y, X, 3) or a channel stack (Y, X, C)."
        )
    channel_letters = [a for a in axes if a in "CS" and arr.shape[axes.index(a)] > 1]
    extra = [a for i, a in enumerate(axes) if a not in "YXCS" and arr.shape[i] > 1]
    if extra or len(channel_letters) > 1:
        raise UnsupportedImageError(
            f"{label} is a stack of {' x '.join(str(s) for s in arr.shape)} ({axes}), not one 2-D image: "
            "save or open a single 2-D plane (e.g. one Z slice / time point) and open that."
        )
    order = [axes.index("Y"), axes.index("X")] + [axes.index(a) for a in channel_letters]
    squeeze = [i for i in range(arr.ndim) if i not in order]
    arr = arr.transpose(order + squeeze)
    if squeeze:
        arr = arr.reshape(arr.shape[: len(order)])
    return arr


def _check_pixels(level0, source: Source):
    """Refuse what we cannot show or segment; drop alpha; decide the RGB flag. Returns (level0, rgb, names)."""
    label = source.label
    ny, nx = level0.shape[:2]
    if min(ny, nx) < MIN_SIDE:
        raise UnsupportedImageError(
            f"{label} is only {ny} x {nx} pixels: images must be at least {MIN_SIDE} pixels on each side. "
            "Check that this is the image you meant to open."
        )
    dtype = np.dtype(level0.dtype)
    if dtype == bool:
        level0 = level0.astype(np.uint8) * 255
        dtype = np.dtype(np.uint8)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UnsupportedImageError(
            f"{label} holds {dtype} pixels, which cannot be shown as an image: convert it to 8/16-bit "
            "integers or float32."
        )
    names = source.channel_names
    if level0.ndim == 2:
        return level0, False, (names[:1] if names else None)
    c = level0.shape[2]
    if c == 1:
        return level0[..., 0], False, (names[:1] if names else None)
    if c > MAX_CHANNELS:
        raise UnsupportedImageError(
            f"{label} has {c} channels; at most {MAX_CHANNELS} are supported. If it is a stack of images, "
            "open one plane at a time."
        )
    if dtype.kind == "f" and c not in (3,):
        raise UnsupportedImageError(
            f"{label} has {c} floating-point channels: only grayscale or RGB float images are supported. "
            "Save it as RGB, or as 8/16-bit integer channels."
        )
    if c == 4 and source.rgb_hint is not False:
        level0, c = level0[..., :3], 3  # RGBA: the alpha channel carries no image content
        names = names[:3] if names else None
    if c == 2 and source.rgb_hint:  # grayscale + alpha
        return level0[..., 0], False, (names[:1] if names else None)
    rgb = c == 3 and (source.rgb_hint is not False)
    return level0, rgb, names


def _same_channels(level, level0):
    """Apply level 0's channel handling (alpha drop, single channel squeeze) to a lower level."""
    if level.ndim == 3 and level0.ndim == 3 and level.shape[2] != level0.shape[2]:
        level = level[..., : level0.shape[2]]
    if level.ndim == 3 and level0.ndim == 2:
        level = level[..., 0]
    if level.dtype != level0.dtype:
        level = level.astype(level0.dtype)
    return level


def _sorted_levels(levels: list) -> list:
    """Finest first, dropping levels that are not strictly smaller than the previous one (thumbnails, dupes)."""
    levels = sorted(levels, key=lambda lv: -int(lv.shape[0]) * int(lv.shape[1]))
    kept = [levels[0]]
    for lv in levels[1:]:
        if lv.shape[0] < kept[-1].shape[0] and lv.shape[1] < kept[-1].shape[1]:
            kept.append(lv)
    return kept


def _mean_as(dtype):
    def reduce(block, axis=None):
        out = np.mean(block, axis=axis)
        return np.round(out).astype(dtype) if np.dtype(dtype).kind in "ui" else out.astype(dtype)

    return reduce


def coarsen_levels(level, *, coarsest_side: int = COARSEST_SIDE) -> list:
    """Lazy 2 x 2 mean-downsampled levels below ``level`` until the longer side is at most ``coarsest_side``.

    Odd sizes lose their last row/column at each halving (so a level's downsample is e.g. 1001 / 500).
    Computing a chunk of level k reads the ``2^k x 2^k`` block of the level above it, nothing else.
    """
    out = []
    current = level
    while max(current.shape[:2]) > coarsest_side and min(current.shape[:2]) >= 2 * MIN_SIDE:
        even = current.rechunk({0: _even_chunk(current.chunks[0]), 1: _even_chunk(current.chunks[1])})
        current = da.coarsen(_mean_as(current.dtype), even, {0: 2, 1: 2}, trim_excess=True)
        current = current.rechunk({0: LAZY_CHUNK, 1: LAZY_CHUNK})
        out.append(current)
    return out


def _even_chunk(chunks) -> int:
    size = max(int(chunks[0]), 2)
    return min(LAZY_CHUNK, size + size % 2) if size < LAZY_CHUNK else LAZY_CHUNK
