"""Stitching a run's windows into labels with memory bounded by the window (see ``segment.py``).

Frames: working-level pixels throughout. Each window owns a *tile* (``windows.py``); when the window is done,
its tile's labels are the argmax of its own weighted probabilities plus the *pending* parts that earlier
windows left for that tile; the window's own parts that later tiles need become pending in turn.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from napari_uhrseg.engine.windows import Window, apply_blend_weights, intersect

Box = tuple[int, int, int, int]


def argmax_classes(scores: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """``np.argmax(scores, axis=0)`` for (C, H, W) scores, as ``dtype``, ties to the lower class.

    numpy's argmax over the first axis copies the whole array to put that axis last; comparing one class
    plane at a time needs one (H, W) buffer instead."""
    best = scores[0].copy()
    labels = np.zeros(scores.shape[1:], dtype=dtype)
    for c in range(1, scores.shape[0]):
        better = scores[c] > best
        labels[better] = c
        np.maximum(best, scores[c], out=best)
    return labels


class TileIndex:
    """Where the tiles of a grid are: tile rows/columns as (start, stop) in working-level pixels."""

    def __init__(self, grid: list[Window]):
        self.rows = sorted({(w.tile[0], w.tile[2]) for w in grid})
        self.cols = sorted({(w.tile[1], w.tile[3]) for w in grid})

    def box(self, r: int, c: int) -> Box:
        return (self.rows[r][0], self.cols[c][0], self.rows[r][1], self.cols[c][1])

    def later_tiles(self, win: Window):
        """Tiles other than ``win``'s own that ``win`` overlaps (all come later in raster order)."""
        for r in range(win.row, len(self.rows)):
            if self.rows[r][0] >= win.y1:
                break
            for c in range(win.col, len(self.cols)):
                if self.cols[c][0] >= win.x1:
                    break
                if (r, c) != (win.row, win.col):
                    part = intersect(win.box, self.box(r, c))
                    if part is not None:
                        yield (r, c), part


def pending_peak_estimate(grid: list[Window], tiles: TileIndex, num_classes: int) -> int:
    """Upper bound of the bytes pending at once: the strips of one grid row plus those of the next window."""
    per_row: dict[int, int] = {}
    for win in grid:
        area = sum((p[2] - p[0]) * (p[3] - p[1]) for _, p in tiles.later_tiles(win))
        per_row[win.row] = per_row.get(win.row, 0) + area
    worst = max(per_row.values()) + max(per_row.values()) // max(1, len(tiles.cols))
    return worst * num_classes * 4


class Pending:
    """Weighted probabilities of finished windows that later tiles still need, keyed by tile (row, col).

    In RAM, or with ``spill`` in a temporary folder. Spilled parts are written and read back in blocks of rows
    (raw float32, rows outermost), so neither writing nor adding them back ever holds more than a few MB
    beyond the tile being finished; the file data sit in the page cache, not in this process's memory."""

    _ROWS = 64  # rows per block when spilling / reading back

    def __init__(self, spill: bool, num_classes: int):
        self.num_classes = num_classes
        self._parts: dict[tuple[int, int], list[tuple[Box, Any]]] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="uhrseg-pending-")) if spill else None
        self._count = 0
        self.bytes = 0
        self.peak_bytes = 0

    def add(self, key: tuple[int, int], box: Box, part: np.ndarray) -> None:
        """Keep ``part`` (C, h, w), the weighted probabilities over ``box``, for tile ``key``."""
        if self._dir is not None:
            path = self._dir / f"{key[0]}_{key[1]}_{self._count}.f32"
            self._count += 1
            with open(path, "wb") as f:
                for r0 in range(0, part.shape[1], self._ROWS):
                    np.ascontiguousarray(part[:, r0:r0 + self._ROWS].transpose(1, 0, 2), np.float32).tofile(f)
            item: Any = path
        else:
            item = np.array(part, dtype=np.float32, copy=True)
            self.bytes += item.nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        self._parts.setdefault(key, []).append((box, item))

    def accumulate(self, key: tuple[int, int], acc: np.ndarray, origin: tuple[int, int]) -> list[Box]:
        """Add every part kept for tile ``key`` into ``acc`` (C, H, W), whose pixel (0, 0) is working-level
        pixel ``origin``; forget them; return their boxes."""
        boxes = []
        for box, item in self._parts.pop(key, []):
            target = acc[:, box[0] - origin[0]:box[2] - origin[0], box[1] - origin[1]:box[3] - origin[1]]
            if isinstance(item, Path):
                self._add_file(item, target)
                item.unlink()
            else:
                target += item
                self.bytes -= item.nbytes
            boxes.append(box)
        return boxes

    def _add_file(self, path: Path, target: np.ndarray) -> None:
        c, h, w = target.shape
        with open(path, "rb") as f:
            for r0 in range(0, h, self._ROWS):
                n = min(self._ROWS, h - r0)
                block = np.fromfile(f, dtype=np.float32, count=n * c * w).reshape(n, c, w)
                target[:, r0:r0 + n] += block.transpose(1, 0, 2)

    def keys(self) -> list[tuple[int, int]]:
        return list(self._parts)

    def close(self) -> None:
        self._parts.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def stitch_window(win: Window, probs: np.ndarray, tiles: TileIndex, pending: Pending, dtype) -> np.ndarray:
    """Weight ``probs`` (C, h, w over ``win``), keep the parts later tiles need, and return the labels of
    ``win``'s own tile: argmax over the sum of this window's and the pending weighted probabilities."""
    apply_blend_weights(probs, win)
    for key, part in tiles.later_tiles(win):
        pending.add(key, part, probs[:, part[0] - win.y0:part[2] - win.y0, part[1] - win.x0:part[3] - win.x0])
    ty0, tx0, ty1, tx1 = win.tile
    acc = probs[:, ty0 - win.y0:ty1 - win.y0, tx0 - win.x0:tx1 - win.x0]
    pending.accumulate((win.row, win.col), acc, (ty0, tx0))
    return argmax_classes(acc, dtype)


def flush_pending(pending: Pending, tiles: TileIndex, store, origin, dtype) -> None:
    """Write what finished windows contributed to tiles that no window finalised (after cancel or error)."""
    for key in sorted(pending.keys()):
        tile = tiles.box(*key)
        acc = np.zeros((pending.num_classes, tile[2] - tile[0], tile[3] - tile[1]), np.float32)
        boxes = pending.accumulate(key, acc, (tile[0], tile[1]))
        labels = argmax_classes(acc, dtype)
        for box in boxes:  # only the pixels a finished window covered
            sub = labels[box[0] - tile[0]:box[2] - tile[0], box[1] - tile[1]:box[3] - tile[1]]
            store.write_window(box[0] - origin[0], box[1] - origin[1], np.ascontiguousarray(sub))
