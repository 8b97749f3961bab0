"""The window grid of a whole-image run, and the blending weights of each window.

Every coordinate here is in *working-level pixels* (the pyramid level the method runs on); the engine converts
to level 0 with ``napari_uhrseg.io.coords``.

A run cuts the region into overlapping windows in raster order. Windows are spread evenly so that the last one ends at
the region's edge (never padded) when the region is larger than one window; a region smaller than a window is one
window, padded by the engine. Each window also owns one *tile* — the rectangle that becomes final (no later
window touches it) as soon as that window is done: for window (r, c) it is ``[Y_r, Y_r+1) x [X_c, X_c+1)``
(the start of the next window row/column, or the region's end). Tiles partition the region, which is what
lets the engine write labels as it goes and keep only the overlap strips of finished windows pending.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_uhrseg.errors import UhrsegError

# Weights never reach zero, so every covered pixel has a defined blend even where ramps meet.
_MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Window:
    """One window of the grid, in working-level pixels (absolute, not relative to the region).

    ``y0, x0, y1, x1``: the window's extent; ``tile``: the part that is final once this window is done;
    ``row, col``: its place in the grid; ``ramps``: blend ramp lengths (top, bottom, left, right), 0 on a side
    without a neighbour.
    """

    index: int
    row: int
    col: int
    y0: int
    x0: int
    y1: int
    x1: int
    tile: tuple[int, int, int, int]
    ramps: tuple[int, int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.y0, self.x0, self.y1, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.y1 - self.y0, self.x1 - self.x0)


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Window starts along one axis of ``length`` pixels: the fewest windows whose neighbours overlap by at
    least ``overlap``, spread evenly from 0 to ``length - window`` (the last window ends at the edge; the
    slack goes into the overlaps, shared equally, instead of into one near-duplicate last window)."""
    if length <= window:
        return [0]
    stride = window - overlap
    n = -(-(length - window) // stride) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


class WindowSizeError(UhrsegError, ValueError):
    """A window / overlap pair that cannot tile a region."""


def check_window(window: int, overlap: int) -> None:
    """Raise ``WindowSizeError`` (a message for the user) unless ``window`` and ``overlap`` can tile a region."""
    if window < 16:
        raise WindowSizeError(f"A window of {window} px is too small: use at least 16 px (--window).")
    if not 0 <= overlap < window // 2:
        raise WindowSizeError(
            f"An overlap of {overlap} px does not fit a {window} px window: it must be at least 0 and under half "
            f"the window ({window // 2} px). Choose a smaller --overlap or a larger --window."
        )


def window_grid(region: tuple[int, int, int, int], window: int, overlap: int) -> list[Window]:
    """The windows covering ``region = (y0, x0, y1, x1)`` (working-level pixels), in raster order.

    ``window`` is the side in pixels; ``overlap`` the minimum overlap between neighbours (< window / 2).
    In an axis where the region is smaller than ``window`` there is a single window of the region's size.
    """
    ry0, rx0, ry1, rx1 = (int(v) for v in region)
    if ry1 <= ry0 or rx1 <= rx0:
        raise ValueError(f"empty region {region}")
    check_window(window, overlap)
    ys = axis_starts(ry1 - ry0, window, overlap)
    xs = axis_starts(rx1 - rx0, window, overlap)
    hs = min(window, ry1 - ry0)
    ws = min(window, rx1 - rx0)
    tile_ys = [*ys[1:], ry1 - ry0]
    tile_xs = [*xs[1:], rx1 - rx0]
    out = []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            ramps = (
                (ys[r - 1] + hs - y) if r > 0 else 0,
                (y + hs - ys[r + 1]) if r + 1 < len(ys) else 0,
                (xs[c - 1] + ws - x) if c > 0 else 0,
                (x + ws - xs[c + 1]) if c + 1 < len(xs) else 0,
            )
            out.append(
                Window(
                    index=len(out), row=r, col=c,
                    y0=ry0 + y, x0=rx0 + x, y1=ry0 + y + hs, x1=rx0 + x + ws,
                    tile=(ry0 + y, rx0 + x, ry0 + tile_ys[r], rx0 + tile_xs[c]),
                    ramps=ramps,
                )
            )
    return out


def _ramp_1d(n: int, before: int, after: int) -> np.ndarray:
    """Linear ramp up over the first ``before`` pixels and down over the last ``after``; 1 elsewhere.

    Two neighbours ramping over the same overlap sum to 1 pixel by pixel (a linear cross-fade)."""
    w = np.ones(n, np.float32)
    t = np.arange(n, dtype=np.float32) + 0.5
    if before > 0:
        w = np.minimum(w, t / before)
    if after > 0:
        w = np.minimum(w, (n - t) / after)
    return np.maximum(w, _MIN_WEIGHT)


def blend_weights(win: Window) -> np.ndarray:
    """The (H, W) float32 weight of ``win``'s probabilities in the blend: ramps across its overlaps."""
    h, w = win.shape
    top, bottom, left, right = win.ramps
    return np.outer(_ramp_1d(h, top, bottom), _ramp_1d(w, left, right))


def apply_blend_weights(probs: np.ndarray, win: Window) -> np.ndarray:
    """Multiply (C, H, W) ``probs`` by ``blend_weights(win)`` in place, touching only the ramped strips
    (the weight is 1 elsewhere, and the 2-D weight is the product of the row and column ramps)."""
    h, w = win.shape
    top, bottom, left, right = win.ramps
    wy, wx = _ramp_1d(h, top, bottom), _ramp_1d(w, left, right)
    if top:
        probs[:, :top] *= wy[:top, None]
    if bottom:
        probs[:, h - bottom:] *= wy[h - bottom:, None]
    if left:
        probs[:, :, :left] *= wx[:left]
    if right:
        probs[:, :, w - right:] *= wx[w - right:]
    return probs


def intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """Intersection of two (y0, x0, y1, x1) boxes, or None when it is empty."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[2], b[2]), min(a[3], b[3])
    if y1 <= y0 or x1 <= x0:
        return None
    return (y0, x0, y1, x1)
