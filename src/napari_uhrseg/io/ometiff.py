"""Write a pyramidal OME-TIFF of any size from a function that produces tiles (tests, benchmarks, demos).

Nothing larger than one tile is ever in memory: tifffile takes a tile generator per level. Levels are
independent calls of ``tile_fn(level, y0, x0, h, w)``, so the function decides what each level shows (a
procedural image can render any level directly; there is no downsampling pass over level 0).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from napari_uhrseg.io.atomic import atomic_path


def pyramid_shapes(shape, coarsest_side: int = 512) -> list[tuple[int, int]]:
    """Level shapes, halving (rounding up) until the longer side is at most ``coarsest_side``."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > coarsest_side:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return shapes


def write_tiled_pyramid(path, shape, tile_fn: Callable[[int, int, int, int, int], np.ndarray], *, channels: int = 3,
                        dtype=np.uint8, tile: int = 512, compression="zlib", compression_level: int | None = 1,
                        pixel_size=None, pixel_unit: str = "µm", coarsest_side: int = 512) -> Path:
    """Write ``path`` atomically as a tiled pyramidal OME-TIFF (SubIFDs) of ``shape`` (Y, X) level-0 pixels.

    ``tile_fn(level, y0, x0, h, w)`` returns the pixels ``(h, w[, channels])`` of that level (level pixels);
    edge tiles are padded by the writer. ``pixel_size`` is (y, x) of a level-0 pixel.
    """
    import tifffile

    shapes = pyramid_shapes(shape, coarsest_side)
    dtype = np.dtype(dtype)
    samples = () if channels == 1 else (channels,)
    metadata = {"axes": "YXS" if samples else "YX", "Name": Path(path).name}
    if pixel_size is not None:
        metadata.update(PhysicalSizeY=float(pixel_size[0]), PhysicalSizeX=float(pixel_size[1]),
                        PhysicalSizeYUnit=pixel_unit, PhysicalSizeXUnit=pixel_unit)
    args = {"level": compression_level} if compression_level is not None and compression else None

    def tiles(level: int, lshape):
        for y0 in range(0, lshape[0], tile):
            for x0 in range(0, lshape[1], tile):
                h, w = min(tile, lshape[0] - y0), min(tile, lshape[1] - x0)
                block = np.asarray(tile_fn(level, y0, x0, h, w), dtype=dtype)
                if block.shape[:2] != (tile, tile):
                    padded = np.zeros((tile, tile, *samples), dtype)
                    padded[:h, :w] = block
                    block = padded
                yield block

    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            for level, lshape in enumerate(shapes):
                options = dict(shape=(*lshape, *samples), dtype=dtype, tile=(tile, tile), compression=compression,
                               compressionargs=args, photometric="rgb" if channels == 3 else "minisblack")
                if level == 0:
                    tw.write(tiles(level, lshape), subifds=len(shapes) - 1, metadata=metadata, **options)
                else:
                    tw.write(tiles(level, lshape), subfiletype=1, metadata=None, **options)
    return Path(path)


def checker_tile(level: int, y0: int, x0: int, h: int, w: int, *, downsample_of=lambda level: 2**level,
                 period: int = 4096) -> np.ndarray:
    """A cheap procedural RGB image: level-0 blocks of ``period`` px in colours from their block index, the same
    picture at every level (coordinates scaled by the level's downsample)."""
    d = downsample_of(level)
    ys = ((np.arange(y0, y0 + h) * d) // period).astype(np.int64)
    xs = ((np.arange(x0, x0 + w) * d) // period).astype(np.int64)
    index = ys[:, None] * 7919 + xs[None, :] * 104729
    return np.stack([(index * 37) % 251, (index * 61) % 241, (index * 97) % 239], axis=-1).astype(np.uint8)
