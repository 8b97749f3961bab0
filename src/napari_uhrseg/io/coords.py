"""The one place where coordinates move between pyramid levels.

Conventions (used everywhere in the project):

* Coordinates are ``(y, x)``, in pixels, with the *pixel-corner* convention: pixel ``(r, c)`` covers
  ``[r, r + 1) x [c, c + 1)``; its centre is ``(r + 0.5, c + 0.5)``.
* A *downsample* is level-0 pixels per level pixel: a scalar (same on both axes) or a ``(dy, dx)`` pair.
  Pyramid levels of odd-sized images have factors such as ``40001 / 10000 = 4.0001``, so factors are floats and
  may differ per axis; :func:`level_scale` gives the exact per-axis pair from the level shapes.
* A *box* is ``(y0, x0, y1, x1)`` with ``y0 <= y1`` and ``x0 <= x1`` (corner coordinates, end exclusive).

Converting a point or box is a multiplication (``to_level0``) or division (``from_level0``); converting a box to
the integer pixel window that covers it at a level rounds outwards (:func:`box_to_window`), so that a window
always contains the whole box.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _factors(downsample) -> np.ndarray:
    """(dy, dx) as a float array from a scalar or a pair; refuses non-positive factors."""
    f = np.asarray(downsample, dtype=np.float64).reshape(-1)
    if f.size == 1:
        f = np.repeat(f, 2)
    if f.size != 2 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise ValueError(f"A downsample must be a positive number or a (dy, dx) pair, got {downsample!r}.")
    return f


def _scale(yx_or_boxes, factors: np.ndarray) -> np.ndarray:
    a = np.asarray(yx_or_boxes, dtype=np.float64)
    if a.ndim == 0 or a.shape[-1] not in (2, 4):
        raise ValueError(f"Expected (..., 2) points (y, x) or (..., 4) boxes (y0, x0, y1, x1), got shape {a.shape}.")
    per_coord = np.tile(factors, a.shape[-1] // 2)
    return a * per_coord


def to_level0(yx_or_boxes, level_downsample) -> np.ndarray:
    """Level-``k`` points ``(..., 2)`` or boxes ``(..., 4)`` to level-0 coordinates (floats)."""
    return _scale(yx_or_boxes, _factors(level_downsample))


def from_level0(yx_or_boxes, level_downsample) -> np.ndarray:
    """Level-0 points ``(..., 2)`` or boxes ``(..., 4)`` to level-``k`` coordinates (floats)."""
    return _scale(yx_or_boxes, 1.0 / _factors(level_downsample))


def between_levels(yx_or_boxes, from_downsample, to_downsample) -> np.ndarray:
    """Points or boxes at one level to another level, through level 0."""
    return from_level0(to_level0(yx_or_boxes, from_downsample), to_downsample)


def level_scale(level0_shape: Sequence[int], level_shape: Sequence[int]) -> tuple[float, float]:
    """The exact ``(dy, dx)`` downsample of a level from the two shapes (level-0 pixels per level pixel)."""
    return (float(level0_shape[0]) / float(level_shape[0]), float(level0_shape[1]) / float(level_shape[1]))


def clip_box(box, shape: Sequence[int]) -> tuple:
    """Clip ``(y0, x0, y1, x1)`` to an image of ``shape`` (Y, X); an empty result has ``y0 == y1`` or ``x0 == x1``."""
    y0, x0, y1, x1 = (float(v) for v in box)
    h, w = float(shape[0]), float(shape[1])
    y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
    x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
    return (y0, x0, max(y0, y1), max(x0, x1))


def box_to_window(box, shape: Sequence[int] | None = None) -> tuple[int, int, int, int]:
    """The integer pixel window ``(y0, x0, y1, x1)`` covering a float box (floor the start, ceil the end),
    clipped to ``shape`` when given. A tiny epsilon keeps ``3.0000000001`` from growing the window by a pixel."""
    eps = 1e-6
    y0, x0, y1, x1 = (float(v) for v in box)
    win = (int(np.floor(y0 + eps)), int(np.floor(x0 + eps)), int(np.ceil(y1 - eps)), int(np.ceil(x1 - eps)))
    win = (win[0], win[1], max(win[0], win[2]), max(win[1], win[3]))
    if shape is not None:
        win = tuple(int(v) for v in clip_box(win, shape))
    return win


def level0_box_to_level_window(box_level0, level_downsample, level_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """A level-0 box (e.g. the part of the image on screen) to the clipped integer window covering it at a level."""
    return box_to_window(from_level0(box_level0, level_downsample), level_shape)


def view_region(corner_min, corner_max, level_downsample, level_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """The level window covering a view whose corners are given in level-0 (world) pixels, e.g. napari's
    ``layer.corner_pixels`` mapped to level 0. Corners may be in any order and outside the image."""
    lo = np.minimum(np.asarray(corner_min, float), np.asarray(corner_max, float))
    hi = np.maximum(np.asarray(corner_min, float), np.asarray(corner_max, float))
    return level0_box_to_level_window((lo[0], lo[1], hi[0], hi[1]), level_downsample, level_shape)


def best_level_for_downsample(pyramid_or_downsamples, factor: float, *, tolerance: float = 1e-3) -> int:
    """The coarsest level whose downsample does not exceed ``factor`` (level-0 px per output px).

    Reading at that level and resizing by the remaining factor never invents detail. ``tolerance`` lets a
    level at 4.0003 count as 4. Accepts a :class:`~napari_uhrseg.io.pyramid.Pyramid` or a list of factors.
    """
    downsamples = getattr(pyramid_or_downsamples, "downsamples", pyramid_or_downsamples)
    if factor <= 0:
        raise ValueError(f"A downsample factor must be positive, got {factor}.")
    best = 0
    for i, d in enumerate(downsamples):
        if float(np.max(_factors(d))) <= factor * (1 + tolerance):
            best = i if float(np.max(_factors(d))) >= float(np.max(_factors(downsamples[best]))) else best
    return best


def level_for_pixel_size(pyramid, target_pixel_size: float, *, tolerance: float = 1e-3) -> int:
    """The coarsest level whose pixel size is at most ``target_pixel_size`` (same unit as ``pyramid.pixel_unit``).

    A pyramid without a known pixel size has no answer: a ValueError says so.
    """
    if pyramid.pixel_size is None:
        raise ValueError(f"{pyramid.name} has no known pixel size: choose the level by downsample instead.")
    base = float(max(pyramid.pixel_size))
    return best_level_for_downsample(pyramid, target_pixel_size / base, tolerance=tolerance)
