"""Deterministic high-resolution scenes with exact ground truth, lazily at any size (up to 100k × 100k and beyond).

Design (see docs/data.md):

* **Layout** — each class owns a smooth random field (value noise, four octaves with periods
  ``region_size``, ``region_size/4``, ``/16`` and ``/48``); a pixel belongs to the class whose field is highest.
  Regions are therefore about ``region_size`` across, with boundaries that wiggle at the scale of 8–25 pixels
  (so boundary refinement has something to do).
* **Texture** — every class has the SAME mean colour; classes differ only by a zero-mean texture of period 2–4 px
  (horizontal stripes, a 2-px checker, balanced random speckle, 45° stripes, hairlines). Each texture averages to
  exactly zero over any 4 × 4 block aligned to the pixel grid, so after ×4 (or coarser) area downsampling the
  classes are indistinguishable: a global-only model sees one flat colour and only full-resolution local
  refinement can tell them apart. A small luminance noise common to all classes keeps the image from being flat.
* **Laziness** — every tile is computed from ``(seed, tile position)`` alone: the random values come from an
  integer hash of the absolute lattice coordinates, never from a shared random state, so any window of any
  scene can be rendered on its own, in any order, on any worker.

Coordinates are level-0 pixels ``(y, x)``; images are RGB uint8 ``(H, W, 3)``, labels uint8 ``(H, W)``.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from napari_uhrseg.errors import UhrsegError

__all__ = ["SyntheticScene", "CLASS_LIBRARY", "MEAN_COLOR", "write_pyramid_tiff", "SCENE_PIXEL_SIZE_UM"]

#: All classes share this mean colour (RGB).
MEAN_COLOR = (168, 122, 172)
#: Texture amplitude per RGB channel (an integer mean ± these values never hits 0 or 255 and rounds symmetrically).
_AMPLITUDE = np.array([38.0, 30.0, 42.0], dtype=np.float32)
#: Luminance noise common to all classes: uniform integers in [-_NOISE, _NOISE].
_NOISE = 2
#: Nominal pixel size written into the OME-TIFF (µm), like a 20× slide.
SCENE_PIXEL_SIZE_UM = 0.5

#: (name, display colour of the ground-truth label) in class order; a scene uses the first ``num_classes``.
CLASS_LIBRARY = [
    ("background", (128, 128, 128)),
    ("stripes", (230, 25, 75)),
    ("checker", (60, 180, 75)),
    ("speckle", (255, 225, 25)),
    ("diagonal", (0, 130, 200)),
    ("hairline", (245, 130, 48)),
]


# ---------------------------------------------------------------------------------------------------------
# Counter-based randomness: a value for every integer lattice point, from (seed, salt, y, x) only
# ---------------------------------------------------------------------------------------------------------
def _hash(seed: int, salt: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """uint32 hash of integer coordinates (any broadcastable int64 arrays), a murmur3-style finaliser."""
    with np.errstate(over="ignore"):
        h = (np.asarray(y, np.int64) * 0x1F123BB5 + np.asarray(x, np.int64) * 0x5F356495).astype(np.uint32)
        h ^= np.uint32((seed * 0x9E3779B1 + salt * 0x85EBCA77) & 0xFFFFFFFF)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    return h


def _value_noise(seed: int, salt: int, y0: int, x0: int, h: int, w: int, period: float) -> np.ndarray:
    """Value noise in [-1, 1] on the pixel window (y0, x0, h, w), lattice spacing ``period`` px, float32 (h, w).

    Random values live on the integer lattice ``(floor(y / period), floor(x / period))`` and are blended with a
    smoothstep. Only the few lattice points covering the window are hashed; the blend is separable, so it is done
    along x on the lattice rows first (a small array), then along y per pixel row. Each pixel's value comes from
    the same elementwise operations whatever the window, so tiles agree bit for bit at their seams.
    """
    ty, ry, ly = _interpolation(y0, h, period)
    tx, rx, lx = _interpolation(x0, w, period)
    lattice = _lattice_values(seed, salt, ly, lx)
    along_x = lattice[:, rx] * (1 - tx) + lattice[:, rx + 1] * tx  # (lattice rows, w)
    return along_x[ry] * (1 - ty)[:, None] + along_x[ry + 1] * ty[:, None]


def _lattice_values(seed: int, salt: int, ly: np.ndarray, lx: np.ndarray) -> np.ndarray:
    """Random values in [-1, 1) at the lattice points ``ly × lx``, float32."""
    return (_hash(seed, salt, ly[:, None], lx[None, :]) >> np.uint32(8)).astype(np.float32) / np.float32(2**23) - 1


def _interpolation(start: int, n: int, period: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixels start..start+n-1: smoothstep weight of the next lattice point (float32 (n,)), index of the
    previous lattice point into ``points`` (int (n,)), and the lattice points covering them (int64 (m,))."""
    f = (np.arange(start, start + n, dtype=np.float64) + 0.5) / period
    cell = np.floor(f).astype(np.int64)
    t = (f - cell).astype(np.float32)
    points = np.arange(cell[0], cell[-1] + 2)
    return t * t * (3 - 2 * t), cell - points[0], points


# ---------------------------------------------------------------------------------------------------------
# Textures: zero-mean patterns in {-1, +1}, each averaging to exactly 0 over any grid-aligned 4x4 block
# ---------------------------------------------------------------------------------------------------------
# The six ways to light 2 of the 4 pixels of a 2x2 cell; bit (y%2)*2 + (x%2).
_SPECKLE_PATTERNS = np.array([0b0011, 0b0101, 0b0110, 0b1001, 0b1010, 0b1100], dtype=np.uint8)


def _texture(name: str, seed: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Texture ``name`` at absolute pixel coordinates (int64 arrays broadcasting to the window), float32 ±1."""
    if name == "background":
        t = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), bool)
        return t.astype(np.float32)  # flat: only the common noise
    if name == "stripes":  # horizontal, period 4
        t = (yy % 4) < 2
    elif name == "checker":  # 2-px squares, period 4 both ways
        t = ((yy // 2 + xx // 2) % 2) == 0
    elif name == "diagonal":  # 45° stripes, period 4 along the diagonal
        t = ((yy + xx) % 4) < 2
    elif name == "hairline":  # vertical, period 2
        t = (xx % 2) == 0
    elif name == "speckle":  # random, but exactly 2 of every 2x2 cell lit: zero mean per cell
        pattern = _SPECKLE_PATTERNS[_hash(seed, 7, yy // 2, xx // 2) % np.uint32(6)]
        t = ((pattern >> ((yy % 2) * 2 + (xx % 2)).astype(np.uint8)) & 1).astype(bool)
    else:
        raise ValueError(f"unknown texture {name!r}")
    t = np.broadcast_to(t, np.broadcast_shapes(yy.shape, xx.shape))
    return np.where(t, np.float32(1), np.float32(-1))


class SyntheticScene:
    """A lazily rendered multi-class scene with exact ground truth.

    Parameters
    ----------
    size : (H, W) or int
        Level-0 size in pixels (an int means square).
    seed : int
        Same seed, same scene, whatever the tiling.
    num_classes : int
        2..6; the classes are the first ``num_classes`` of ``CLASS_LIBRARY`` (0 = "background").
    tile : int
        Dask chunk size (pixels) of ``image`` and ``labels``.
    region_size : float
        Typical size of a class region (the coarsest layout period), in pixels.

    Attributes
    ----------
    image : dask.array uint8 (H, W, 3)
    labels : dask.array uint8 (H, W), the exact ground truth
    class_names, class_colors : lists (display colours of the label classes, RGB 0-255)
    pixel_size : (float, float), µm per pixel written to files (nominal)
    """

    def __init__(self, size=(4096, 4096), seed: int = 0, num_classes: int = 5, tile: int = 1024,
                 region_size: float = 384.0):
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        self.shape = (int(size[0]), int(size[1]))
        if min(self.shape) < 1:
            raise UhrsegError(f"a synthetic scene needs a positive size, got {self.shape}.")
        if not 2 <= num_classes <= len(CLASS_LIBRARY):
            raise UhrsegError(f"num_classes must be 2..{len(CLASS_LIBRARY)}, got {num_classes}.")
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.tile = int(tile)
        self.region_size = float(region_size)
        self.class_names = [name for name, _ in CLASS_LIBRARY[:num_classes]]
        self.class_colors = [color for _, color in CLASS_LIBRARY[:num_classes]]
        self.mean_color = MEAN_COLOR
        self.pixel_size = (SCENE_PIXEL_SIZE_UM, SCENE_PIXEL_SIZE_UM)
        self._labels = None
        self._image = None

    # ---- numpy windows --------------------------------------------------------------------------------
    def labels_window(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Ground truth of the level-0 window (y0, x0, h, w) as uint8 (h, w); windows may go past the edge.

        Each class owns a smooth field (octaves of value noise); the pixel goes to the class whose field is highest.
        """
        winner = np.zeros((h, w), np.uint8)
        best = self._class_field(0, y0, x0, h, w)
        for k in range(1, self.num_classes):
            field = self._class_field(k, y0, x0, h, w)
            better = field > best
            winner[better] = k
            np.maximum(best, field, out=best)
        return winner

    #: Layout octaves: (period divisor, weight). The two finest (region_size / 16 and / 48, i.e. 24 and 8 px
    #: at the default size) make boundaries ragged at the scale boundary refinement works on.
    _OCTAVES = ((1, 1.0), (4, 0.35), (16, 0.2), (48, 0.08))

    def _class_field(self, k: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        field = np.zeros((h, w), np.float32)
        for octave, (divisor, weight) in enumerate(self._OCTAVES):
            noise = _value_noise(self.seed, 1000 + 10 * k + octave, y0, x0, h, w, self.region_size / divisor)
            field += np.float32(weight) * noise
        return field

    def image_window(self, y0: int, x0: int, h: int, w: int, labels: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 window; pass its ``labels_window`` to skip recomputing it."""
        if labels is None:
            labels = self.labels_window(y0, x0, h, w)
        yy = np.arange(y0, y0 + h, dtype=np.int64)[:, None]
        xx = np.arange(x0, x0 + w, dtype=np.int64)[None, :]
        texture = np.zeros((h, w), np.float32)
        for k, name in enumerate(self.class_names):
            inside = labels == k
            if name != "background" and inside.any():
                texture = np.where(inside, _texture(name, self.seed, yy, xx), texture)
        noise = (_hash(self.seed, 3, yy, xx) % np.uint32(2 * _NOISE + 1)).astype(np.float32) - _NOISE
        rgb = np.asarray(self.mean_color, np.float32) + texture[..., None] * _AMPLITUDE + noise[..., None]
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    # ---- dask arrays ----------------------------------------------------------------------------------
    @property
    def _token(self) -> str:
        """Everything that decides the dask blocks, so two different scenes never share task names."""
        return f"{self.seed}-{self.shape[0]}x{self.shape[1]}-{self.num_classes}-{self.region_size}-{self.tile}"

    def _chunks(self):
        return tuple(tuple(min(self.tile, n - s) for s in range(0, n, self.tile)) for n in self.shape)

    @property
    def labels(self):
        """Exact ground truth, dask uint8 (H, W), chunks ``tile``²; nothing is computed until asked."""
        if self._labels is None:
            import dask.array as da

            def block(block_info=None):
                (y0, y1), (x0, x1) = block_info[None]["array-location"]
                return self.labels_window(y0, x0, y1 - y0, x1 - x0)

            self._labels = da.map_blocks(block, chunks=self._chunks(), dtype=np.uint8, meta=np.empty((0, 0), np.uint8),
                                         name=f"synthetic-labels-{self._token}")
        return self._labels

    @property
    def image(self):
        """RGB image, dask uint8 (H, W, 3), chunks ``tile``² × 3, rendered from the matching label chunk."""
        if self._image is None:
            import dask.array as da

            def block(labels, block_info=None):
                (y0, y1), (x0, x1) = block_info[0]["array-location"]
                return self.image_window(y0, x0, y1 - y0, x1 - x0, labels=labels)

            self._image = da.map_blocks(block, self.labels, new_axis=2, chunks=self._chunks() + ((3,),),
                                        dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8),
                                        name=f"synthetic-image-{self._token}")
        return self._image

    def metadata(self) -> dict:
        """What a reader needs to know about the scene (written next to it as ``scene.json``)."""
        return {
            "generator": "napari_uhrseg.synthetic.SyntheticScene",
            "size": list(self.shape),
            "seed": self.seed,
            "num_classes": self.num_classes,
            "region_size": self.region_size,
            "class_names": self.class_names,
            "class_colors": [list(c) for c in self.class_colors],
            "mean_color": list(self.mean_color),
            "pixel_size_um": list(self.pixel_size),
        }

    # ---- files ----------------------------------------------------------------------------------------
    def write(self, out_dir, *, name: str = "scene", format: str = "ome-tiff", tile: int = 512,
              compression: str = "zlib", progress: Callable[[int, int], None] | None = None) -> dict[str, Path]:
        """Write ``<name>.ome.tif`` (pyramidal RGB), ``<name>_labels.ome.tif`` (pyramidal ground truth) and
        ``<name>.json`` into ``out_dir``, tile by tile with bounded memory (or ``.ome.zarr`` with ``format="zarr"``).

        Returns the paths written. ``progress(done, total)`` is called after each level-0 tile (labels, then image).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        paths = {}
        if format in ("ome-tiff", "tiff", "tif"):
            paths["image"] = out_dir / f"{name}.ome.tif"
            paths["labels"] = out_dir / f"{name}_labels.ome.tif"
            write_scene_tiffs(self, paths["image"], paths["labels"], tile=tile, compression=compression,
                              progress=progress)
        elif format in ("zarr", "ome-zarr"):
            paths["image"] = out_dir / f"{name}.ome.zarr"
            paths["labels"] = out_dir / f"{name}_labels.ome.zarr"
            write_scene_zarr(self, paths["image"], paths["labels"], tile=tile)
        else:
            raise UhrsegError(f"unknown format {format!r}: use 'ome-tiff' or 'zarr'.")
        paths["metadata"] = out_dir / f"{name}.json"
        meta["files"] = {k: p.name for k, p in paths.items() if k != "metadata"}
        paths["metadata"].write_text(json.dumps(meta, indent=2))
        return paths


# ---------------------------------------------------------------------------------------------------------
# Pyramidal OME-TIFF writing with bounded memory
# ---------------------------------------------------------------------------------------------------------
def _reduce_mean(block: np.ndarray) -> np.ndarray:
    """2× area-mean downsample (odd edges replicate), keeps dtype; for images."""
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)) + ((0, 0),) * (block.ndim - 2), mode="edge")
    acc = block.astype(np.uint16)
    acc = acc[0::2, 0::2] + acc[1::2, 0::2] + acc[0::2, 1::2] + acc[1::2, 1::2]
    return ((acc + 2) // 4).astype(block.dtype)


def _reduce_nearest(block: np.ndarray) -> np.ndarray:
    """2× nearest downsample (top-left of each 2×2 cell); for labels, which must not be averaged."""
    return block[0::2, 0::2]


def _level_shapes(shape: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """Level-0 shape, then halvings (ceil) until the level fits in one tile."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > tile:
        shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
    return shapes


def write_pyramid_tiff(path, read_tile: Callable[[int, int, int, int], np.ndarray], shape: tuple[int, int], *,
                       channels: int | None, dtype, tile: int = 512, reduce: Callable = _reduce_mean,
                       compression: str = "zlib", pixel_size_um: float | None = None,
                       ome_xml: str | None = None, progress: Callable[[int, int], None] | None = None,
                       workers: int | None = None) -> Path:
    """Write a tiled pyramidal OME-TIFF from a tile function, holding only a few tiles in memory.

    ``read_tile(y0, x0, h, w)`` returns level-0 pixels. Level 0 is streamed to the file tile by tile in row-major
    order; each tile's 2× reduction goes into a temporary on-disk zarr, from which the next level is streamed in
    turn (and reduced again). ``workers`` threads render level-0 tiles ahead (default: the CPU count, at most 4;
    numpy releases the GIL), at most ``2 × workers`` tiles in flight. Levels are halved until one fits in a tile
    and stored as SubIFDs, the layout QuPath, tiffslide and tifffile read. The file appears atomically
    (``napari_uhrseg.io.atomic.atomic_path``).
    """
    import tifffile
    import zarr

    from napari_uhrseg.io.atomic import atomic_path

    path = Path(path)
    if tile % 16:
        raise UhrsegError(f"TIFF tiles must be a multiple of 16 pixels, got {tile}.")
    shapes = _level_shapes(shape, tile)
    extra = () if channels is None else (channels,)
    n_tiles0 = sum(1 for _ in _tile_grid(shapes[0], tile))
    done = [0]
    metadata = {"axes": "YXS" if channels else "YX"}
    if pixel_size_um:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeXUnit="µm", PhysicalSizeY=pixel_size_um,
                        PhysicalSizeYUnit="µm")
    if ome_xml:  # a complete OME-XML (e.g. napari_uhrseg.io.ome.label_ome_xml with the class table)
        metadata = None
    codec = {"zlib": ("zlib", 2), "zstd": ("zstd", 2), "lzw": ("lzw", 2), "none": (None, None)}[compression]
    options = dict(tile=(tile, tile), dtype=np.dtype(dtype), compression=codec[0], predictor=codec[1],
                   photometric="rgb" if channels == 3 else "minisblack")
    with tempfile.TemporaryDirectory(prefix=".uhrseg-pyramid-", dir=path.parent) as scratch:
        stores = [zarr.create_array(store=os.path.join(scratch, f"level{k}.zarr"), shape=s + extra,
                                    chunks=(tile // 2, tile // 2) + extra, dtype=np.dtype(dtype))
                  for k, s in enumerate(shapes[1:], start=1)]

        def tiles(level: int) -> Iterator[np.ndarray]:
            grid = list(_tile_grid(shapes[level], tile))
            if level == 0:
                blocks = _prefetched(read_tile, grid, workers)
            else:
                blocks = (np.asarray(stores[level - 1][y0:y0 + h, x0:x0 + w]) for y0, x0, h, w in grid)
            for (y0, x0, h, w), block in zip(grid, blocks):
                if level + 1 < len(shapes):
                    small = reduce(block)
                    stores[level][y0 // 2:y0 // 2 + small.shape[0], x0 // 2:x0 // 2 + small.shape[1]] = small
                if level == 0:
                    done[0] += 1
                    if progress:
                        progress(done[0], n_tiles0)
                if h < tile or w < tile:  # TIFF edge tiles are padded to the full tile size
                    block = np.pad(block, ((0, tile - h), (0, tile - w)) + ((0, 0),) * len(extra))
                yield block

        with atomic_path(path) as tmp_path, tifffile.TiffWriter(tmp_path, bigtiff=True, ome=ome_xml is None) as tif:
            resolution = (1e4 / pixel_size_um, 1e4 / pixel_size_um) if pixel_size_um else None
            tif.write(tiles(0), shape=shapes[0] + extra, subifds=len(shapes) - 1, metadata=metadata,
                      description=ome_xml.encode("utf-8") if ome_xml else None,
                      resolution=resolution, resolutionunit="CENTIMETER" if resolution else None, **options)
            for level in range(1, len(shapes)):
                scale = 2**level
                res = (resolution[0] / scale, resolution[1] / scale) if resolution else None
                tif.write(tiles(level), shape=shapes[level] + extra, subfiletype=1, metadata=None,
                          resolution=res, resolutionunit="CENTIMETER" if res else None, **options)
    return path


def _prefetched(fn: Callable, grid: list, workers: int | None) -> Iterator[np.ndarray]:
    """``fn(*cell)`` for every cell of ``grid``, in order, computed by a thread pool a few cells ahead."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for cell in grid:
            pending.append(pool.submit(fn, *cell))
            if len(pending) > 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _tile_grid(shape: tuple[int, int], tile: int) -> Iterator[tuple[int, int, int, int]]:
    for y0 in range(0, shape[0], tile):
        for x0 in range(0, shape[1], tile):
            yield y0, x0, min(tile, shape[0] - y0), min(tile, shape[1] - x0)


def write_scene_tiffs(scene: SyntheticScene, image_path, labels_path, *, tile: int = 512, compression: str = "zlib",
                      progress: Callable[[int, int], None] | None = None) -> None:
    """Write the scene's image and ground truth as two pyramidal OME-TIFFs (labels reduced by nearest neighbour).

    The labels are rendered once: the image pass reads each tile's labels back from the labels file just
    written (decoding a tile costs far less than rendering it).
    """
    import threading

    import tifffile
    import zarr

    from napari_uhrseg.io.ome import label_ome_xml

    xml = label_ome_xml(scene.shape, "uint8", name=Path(labels_path).name, class_names=scene.class_names,
                        class_colors=scene.class_colors, pixel_size=scene.pixel_size, pixel_unit="µm")
    def half(offset: int):  # labels pass = first half of the progress, image pass = second half
        return (lambda done, total: progress(offset * total + done, 2 * total)) if progress else None

    write_pyramid_tiff(labels_path, scene.labels_window, scene.shape, channels=None, dtype=np.uint8, tile=tile,
                       reduce=_reduce_nearest, compression=compression, pixel_size_um=scene.pixel_size[0],
                       ome_xml=xml, progress=half(0))
    with tifffile.TiffFile(labels_path) as tif:
        written = zarr.open(tif.series[0].aszarr(level=0), mode="r")
        lock = threading.Lock()  # one reader of the TIFF at a time; rendering stays parallel

        def image_tile(y0: int, x0: int, h: int, w: int) -> np.ndarray:
            with lock:
                labels = np.asarray(written[y0:y0 + h, x0:x0 + w])
            return scene.image_window(y0, x0, h, w, labels=labels)

        write_pyramid_tiff(image_path, image_tile, scene.shape, channels=3, dtype=np.uint8, tile=tile,
                           reduce=_reduce_mean, compression=compression, pixel_size_um=scene.pixel_size[0],
                           progress=half(1))


def write_scene_zarr(scene: SyntheticScene, image_path, labels_path, *, tile: int = 512) -> None:
    """Write image and labels as OME-Zarr multiscales (levels by 2× reduction of the level above, read back from
    disk), chunk by chunk through dask; the image is rendered from the labels read back. Each folder appears
    atomically."""
    import dask.array as da
    import zarr

    labels = SyntheticScene(scene.shape, seed=scene.seed, num_classes=scene.num_classes, tile=tile,
                            region_size=scene.region_size).labels
    from napari_uhrseg.io.atomic import atomic_path

    with atomic_path(labels_path) as tmp:
        _write_ome_zarr(tmp, Path(labels_path).name, labels, _reduce_nearest, scene, da)
    written = da.from_zarr(zarr.open_group(str(labels_path), mode="r")["0"])  # render the labels only once

    def image_block(block, block_info=None):
        (y0, y1), (x0, x1) = block_info[0]["array-location"]
        return scene.image_window(y0, x0, y1 - y0, x1 - x0, labels=block)

    image = written.map_blocks(image_block, new_axis=2, chunks=written.chunks + ((3,),), dtype=np.uint8,
                               meta=np.empty((0, 0, 0), np.uint8))
    with atomic_path(image_path) as tmp:
        _write_ome_zarr(tmp, Path(image_path).name, image, _reduce_mean, scene, da)


def _write_ome_zarr(path: Path, name: str, level0, reduce, scene: SyntheticScene, da) -> None:
    """One NGFF 0.5 multiscale group; RGB is stored channel-first (c, y, x) as NGFF requires."""
    import zarr

    rgb = level0.ndim == 3
    tile = level0.chunksize[0]
    group = zarr.open_group(str(path), mode="w")
    datasets = []
    source = level0
    for k, shape in enumerate(_level_shapes(level0.shape[:2], tile)):
        if k:
            prev = da.from_zarr(group[str(k - 1)])
            prev = da.moveaxis(prev, 0, -1) if rgb else prev
            # Every chunk but the last is even-sized, so halving chunk by chunk equals halving the whole level.
            halved = tuple(tuple((c + 1) // 2 for c in ch) for ch in prev.chunks[:2]) + prev.chunks[2:]
            source = prev.map_blocks(reduce, chunks=halved, dtype=prev.dtype)
        stored = da.moveaxis(source, -1, 0) if rgb else source
        chunks = ((3,) if rgb else ()) + (tile, tile)
        arr = group.create_array(str(k), shape=stored.shape, chunks=chunks, dtype=stored.dtype, overwrite=True,
                                 dimension_names=(["c"] if rgb else []) + ["y", "x"])
        da.store(stored.rechunk(chunks), arr, lock=False)
        s = scene.pixel_size[0] * 2**k
        scale = ([1.0] if rgb else []) + [s, s]
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    axes = ([{"name": "c", "type": "channel"}] if rgb else []) + [
        {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    ome = {"version": "0.5", "multiscales": [{"name": name, "axes": axes, "datasets": datasets}]}
    if not rgb:
        ome["image-label"] = {"version": "0.5", "colors": [
            {"label-value": k, "rgba": list(c) + [255]} for k, c in enumerate(scene.class_colors)]}
        classes = {"class_names": scene.class_names, "class_colors": [list(c) for c in scene.class_colors]}
        group.attrs["uhrseg"] = classes
        group["0"].attrs["uhrseg"] = classes  # label stores read the class table from the level-0 array
    group.attrs["ome"] = ome


# ---------------------------------------------------------------------------------------------------------
# The committed sample scene
# ---------------------------------------------------------------------------------------------------------
#: Parameters of the sample in ``sample_data/`` (regenerate: ``uhrseg synth -o sample_data --size 3072 --seed 0``).
SAMPLE_SCENE = {"size": 3072, "seed": 0, "num_classes": 5, "name": "scene"}


def sample_scene_paths(folder=None) -> dict[str, Path]:
    """Paths of the sample scene's files: ``{"image", "labels", "metadata"}``.

    Looks in ``folder``, else in the repository's ``sample_data/`` (source checkout or editable install), else
    in the user cache (``$XDG_CACHE_HOME/napari-uhrseg/sample_data``), where it is generated (~15 s) the first
    time — an installed wheel carries no sample files.
    """
    name = SAMPLE_SCENE["name"]

    def files(d: Path) -> dict[str, Path]:
        return {"image": d / f"{name}.ome.tif", "labels": d / f"{name}_labels.ome.tif", "metadata": d / f"{name}.json"}

    candidates = [Path(folder)] if folder else [Path(__file__).resolve().parents[2] / "sample_data"]
    for d in candidates:
        if all(p.is_file() for p in files(d).values()):
            return files(d)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    target = Path(folder) if folder else cache / "napari-uhrseg" / "sample_data"
    if not all(p.is_file() for p in files(target).values()):
        scene = SyntheticScene(SAMPLE_SCENE["size"], seed=SAMPLE_SCENE["seed"], num_classes=SAMPLE_SCENE["num_classes"])
        scene.write(target, name=name)
    return files(target)
