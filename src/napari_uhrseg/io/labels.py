"""Label stores: where a segmentation run puts its labels, window by window.

A :class:`LabelStore` wraps a numpy array (small images, in memory) or a zarr v3 array on disk (large images;
peak memory then depends on the window, never on the image). Labels are integers, 0 = unlabelled. Coordinates
are pixels of the store (the working level of the run that fills it).

Every :meth:`LabelStore.write_window` is all-or-nothing with respect to errors: the window is validated (shape,
dtype, value range, bounds) before anything is touched, and on zarr the chunk-aligned block it covers is read
first and written back if any chunk write fails (disk full, a failing store), so the store never holds half a
window. (A process killed with SIGKILL between two chunk writes can still leave part of one window; each chunk
itself is one file.)

Class names and colours live in the zarr attributes (``attrs["uhrseg"]``) so that a store carries its meaning.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from napari_uhrseg.errors import UhrsegError, UnsupportedImageError

#: Stores up to this many pixels without a path stay in memory (numpy); larger ones go to a temporary zarr.
IN_MEMORY_PIXELS = 64 * 2**20
#: A fixed, readable palette (RGB) for classes 1..; class 0 (unlabelled) is black.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def default_colors(num_classes: int) -> list[list[int]]:
    """RGB colours for classes ``0..num_classes-1``: black for 0, then the palette, cycling."""
    return [[0, 0, 0]] + [list(PALETTE[(k - 1) % len(PALETTE)]) for k in range(1, num_classes)]


def default_names(num_classes: int) -> list[str]:
    return ["unlabelled"] + [f"class {k}" for k in range(1, num_classes)]


def recorded_downsample(info: dict):
    """Level-0 pixels per label pixel that a store records (``uhrseg segment --level`` writes it), a float or a
    (y, x) pair; None when it records none."""
    d = info.get("downsample")
    if not d:
        return None
    return tuple(float(v) for v in d) if isinstance(d, (list, tuple)) else float(d)


class LabelStore:
    """Labels of one image (or region) at one level, in memory or in a zarr array on disk.

    Attributes
    ----------
    array : the numpy or zarr array ``(Y, X)`` (napari can show either as a Labels layer).
    path : the zarr folder, or None for an in-memory store.
    """

    def __init__(self, array, *, path: Path | None = None, writable: bool = True, attrs: dict | None = None):
        self.array = array
        self.path = Path(path) if path is not None else None
        self.writable = writable
        self._attrs = attrs if attrs is not None else {}

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "memory"
        return f"LabelStore(shape={self.shape}, dtype={self.dtype}, at={where})"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def is_zarr(self) -> bool:
        return not isinstance(self.array, np.ndarray)

    # ------------------------------------------------------------------------------------- class metadata
    @property
    def info(self) -> dict:
        info = dict(self._attrs)  # what the file said (TIFF/PNG/OME-Zarr) or the in-memory store's own
        if self.is_zarr and hasattr(self.array, "attrs"):
            info.update(self.array.attrs.get("uhrseg", {}))
        return info

    @property
    def class_names(self) -> list[str] | None:
        return self.info.get("class_names")

    @property
    def class_colors(self) -> list[list[int]] | None:
        return self.info.get("class_colors")

    def set_info(self, **values) -> None:
        """Store metadata (``class_names``, ``class_colors``, ``pixel_size``, ``pixel_unit``, ``downsample``)."""
        info = self.info
        info.update({k: _jsonable(v) for k, v in values.items() if v is not None})
        if self.is_zarr and hasattr(self.array, "attrs") and self.writable:
            self.array.attrs["uhrseg"] = info
        else:
            self._attrs = info

    def set_classes(self, names=None, colors=None) -> None:
        self.set_info(class_names=list(names) if names is not None else None,
                      class_colors=[list(map(int, c[:3])) for c in colors] if colors is not None else None)

    # ------------------------------------------------------------------------------------- pixels
    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Labels ``[y0, y0 + h) x [x0, x0 + w)``; zeros outside the store."""
        out = np.zeros((int(h), int(w)), self.dtype)
        ys0, xs0 = max(y0, 0), max(x0, 0)
        ys1, xs1 = min(y0 + h, self.shape[0]), min(x0 + w, self.shape[1])
        if ys1 > ys0 and xs1 > xs0:
            out[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0] = np.asarray(self.array[ys0:ys1, xs0:xs1])
        return out

    def write_window(self, y0: int, x0: int, labels) -> None:
        """Write ``labels`` (2-D integers) with its top-left corner at store pixel ``(y0, x0)``, all-or-nothing.

        Raises
        ------
        ValueError : wrong shape, non-integer or out-of-range values, or a window outside the store; nothing
            was written.
        UhrsegError : the store is read-only.
        """
        block = self._validated(int(y0), int(x0), labels)
        if not self.is_zarr:
            self.array[y0:y0 + block.shape[0], x0:x0 + block.shape[1]] = block
            return
        _write_zarr_window(self.array, int(y0), int(x0), block)

    def _validated(self, y0: int, x0: int, labels) -> np.ndarray:
        if not self.writable:
            raise UhrsegError(f"The label store {self.path} is read-only: export it or copy it to a zarr store.")
        block = np.asarray(labels)
        if block.ndim != 2:
            raise ValueError(f"A label window must be 2-D (Y, X), got shape {block.shape}.")
        if block.dtype == bool:
            block = block.astype(np.uint8)
        if block.dtype.kind not in "ui":
            raise ValueError(f"Labels must be integers, got {block.dtype}.")
        h, w = block.shape
        if y0 < 0 or x0 < 0 or y0 + h > self.shape[0] or x0 + w > self.shape[1]:
            raise ValueError(
                f"Window ({y0}, {x0}) + {block.shape} does not fit in the label store of shape {self.shape}."
            )
        if block.size:
            lo, hi = int(block.min()), int(block.max())
            limit = np.iinfo(self.dtype).max
            if lo < 0 or hi > limit:
                raise ValueError(f"Label values {lo}..{hi} do not fit in the store's {self.dtype} (0..{limit}).")
        return block.astype(self.dtype, copy=False)


def _store_chunk(zarray, selection, block) -> None:
    """One chunk-aligned write (a seam for tests that simulate a failing disk)."""
    zarray[selection] = block


def _write_zarr_window(zarray, y0: int, x0: int, block: np.ndarray) -> None:
    """Stage the chunk-aligned block around the window, write it chunk by chunk, roll back on any error."""
    ch, cw = zarray.chunks[:2]
    ay0, ax0 = (y0 // ch) * ch, (x0 // cw) * cw
    ay1 = min(-(-(y0 + block.shape[0]) // ch) * ch, zarray.shape[0])
    ax1 = min(-(-(x0 + block.shape[1]) // cw) * cw, zarray.shape[1])
    old = np.asarray(zarray[ay0:ay1, ax0:ax1])
    new = old.copy()
    new[y0 - ay0:y0 - ay0 + block.shape[0], x0 - ax0:x0 - ax0 + block.shape[1]] = block
    touched = []
    try:
        for cy in range(ay0, ay1, ch):
            for cx in range(ax0, ax1, cw):
                sel = (slice(cy, min(cy + ch, ay1)), slice(cx, min(cx + cw, ax1)))
                local = (slice(sel[0].start - ay0, sel[0].stop - ay0), slice(sel[1].start - ax0, sel[1].stop - ax0))
                touched.append((sel, local))
                _store_chunk(zarray, sel, new[local])
    except BaseException:
        for sel, local in touched:  # the failing chunk included: it may be half-written
            zarray[sel] = old[local]
        raise


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def create_label_store(shape, *, path=None, chunks=(1024, 1024), dtype=np.uint8, class_names=None,
                       class_colors=None, overwrite: bool = False) -> LabelStore:
    """A new, all-zero label store of ``shape`` (Y, X).

    In memory (numpy) when ``path`` is None and the store has at most :data:`IN_MEMORY_PIXELS` pixels;
    otherwise a zarr v3 array at ``path`` (or in a temporary folder removed when the store is garbage-collected).
    ``dtype`` is uint8 (up to 256 classes) or uint16.
    """
    shape = (int(shape[0]), int(shape[1]))
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.uint16, np.uint32):
        raise ValueError(f"Label stores hold uint8, uint16 or uint32, not {dtype}.")
    if min(shape) < 1:
        raise ValueError(f"A label store needs a positive shape, got {shape}.")
    if path is None and shape[0] * shape[1] <= IN_MEMORY_PIXELS:
        store = LabelStore(np.zeros(shape, dtype))
    else:
        cleanup = None
        if path is None:
            cleanup = tempfile.mkdtemp(prefix="uhrseg-labels-")
            path = Path(cleanup) / "labels.zarr"
        store = LabelStore(_create_zarr(Path(path), shape, chunks, dtype, overwrite), path=Path(path))
        if cleanup is not None:
            weakref.finalize(store, shutil.rmtree, cleanup, True)
    store.set_classes(class_names, class_colors)
    return store


def _create_zarr(path: Path, shape, chunks, dtype, overwrite: bool):
    import zarr

    if path.exists() and not overwrite:
        raise UhrsegError(f"{path} already exists: choose another path or allow overwriting.")
    chunks = (min(int(chunks[0]), shape[0]), min(int(chunks[1]), shape[1]))
    return zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                             zarr_format=3, overwrite=overwrite)


def open_label_store(path, *, writable: bool = True) -> LabelStore:
    """Open labels saved on disk: a zarr array (our stores), an OME-Zarr labels image, a TIFF/OME-TIFF or a PNG.

    Zarr arrays open for writing unless ``writable`` is False; the other formats open read-only (TIFFs lazily,
    level 0 only; PNGs in memory). Class names and colours come back when the file holds them.
    """
    path = Path(path)
    if not path.exists():
        raise UnsupportedImageError(f"{path} does not exist: check the path.")
    if path.is_dir():
        return _open_zarr_labels(path, writable)
    from napari_uhrseg.io.formats import sniff

    kind = sniff(path) if path.stat().st_size else None
    if kind == "TIFF":
        return _open_tiff_labels(path)
    if kind == "PNG":
        return _open_png_labels(path)
    raise UnsupportedImageError(
        f"{path} is not a label file we can read: use a zarr store, an OME-TIFF/TIFF or a PNG of integer labels."
    )


def _check_label_array(array, path: Path):
    if array.ndim != 2 or np.dtype(array.dtype).kind not in "uib":
        raise UnsupportedImageError(
            f"{path} holds {array.dtype} data of shape {tuple(array.shape)}, not 2-D integer labels: "
            "export labels as a single-channel integer image."
        )


def _open_zarr_labels(path: Path, writable: bool) -> LabelStore:
    import zarr

    try:
        node = zarr.open(str(path), mode="r+" if writable else "r")
    except Exception as exc:
        raise UnsupportedImageError(f"{path} is not a zarr store we can read ({exc}).") from exc
    if hasattr(node, "shape"):
        _check_label_array(node, path)
        return LabelStore(node, path=path, writable=writable)
    attrs = node.attrs.asdict()
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        raise UnsupportedImageError(f"{path} is a zarr group without labels: open the label array inside it.")
    level0 = node[ome["multiscales"][0]["datasets"][0]["path"]]
    array = level0
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    _check_label_array(array, path)
    info = dict(ome.get("uhrseg", {}))
    colors = (ome.get("image-label") or {}).get("colors")
    if colors and "class_colors" not in info:
        info["class_colors"] = {c["label-value"]: c["rgba"][:3] for c in colors}
    return LabelStore(array, path=path, writable=False, attrs=info)


def _open_tiff_labels(path: Path) -> LabelStore:
    import tifffile
    import zarr

    from napari_uhrseg.io.ome import read_class_metadata

    from napari_uhrseg.io.formats import _check_complete, _tifffile_quiet

    try:
        with _tifffile_quiet():
            tif = tifffile.TiffFile(path)
            series = tif.series[0] if tif.series else None
    except Exception as exc:  # noqa: BLE001 - tifffile raises TiffFileError, ValueError, struct.error, ...
        raise UnsupportedImageError(f"{path} is a damaged TIFF ({exc}): re-export the labels.") from None
    if series is None:
        tif.close()
        raise UnsupportedImageError(f"{path} is a damaged TIFF: it contains no image. Re-export the labels.")
    try:
        _check_complete(series, path)  # a truncated copy: said now, not at the first read of its pixels
        node = zarr.open(series.aszarr(level=0), mode="r")
    except UnsupportedImageError:
        tif.close()
        raise
    except Exception as exc:  # noqa: BLE001
        tif.close()
        raise UnsupportedImageError(f"{path} could not be read as a TIFF ({exc}): re-export the labels.") from None
    try:
        _check_label_array(node, path)
    except UnsupportedImageError:
        tif.close()
        raise
    info = read_class_metadata(tif.ome_metadata if tif.is_ome else tif.pages[0].description)
    store = LabelStore(node, path=path, writable=False, attrs=info)
    store._tif = tif  # the zarr array reads through this open file
    return store


def _open_png_labels(path: Path) -> LabelStore:
    import json

    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise UnsupportedImageError(f"{path} is not a readable PNG ({exc}): re-export the labels.") from None
    with im:
        if im.mode not in ("P", "L", "I;16", "I;16B", "I", "1"):
            raise UnsupportedImageError(
                f"{path} is a {im.mode} colour PNG, not a label image: export labels as a palette or 16-bit PNG."
            )
        array = np.asarray(im)
        info = json.loads(im.info.get("uhrseg", "{}"))
    if array.dtype == np.int32:
        array = array.astype(np.uint16)  # PIL reads 16-bit grayscale PNGs as 32-bit
    return LabelStore(np.array(array), path=path, writable=False, attrs=info)
