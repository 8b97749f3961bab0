"""Export labels to pyramidal OME-TIFF, OME-Zarr, PNG and GeoJSON — atomically, with bounded memory.

Every exporter reads the labels in horizontal strips (a few tens of MB) and never holds the whole image, except
PNG, which is refused above :data:`PNG_MAX_PIXELS`. Lower pyramid levels are built by nearest-neighbour
subsampling (every second row and column: labels are never averaged) from the level above, strip by strip; for
OME-TIFF the level being built is staged in a temporary zarr store beside the target.

Everything is written to a temporary sibling of the target and moved into place when complete
(:mod:`napari_uhrseg.io.atomic`): an interrupted export leaves the previous file as it was. OS errors (disk full,
no permission) become :class:`~napari_uhrseg.errors.ExportError` with a message that says what to do.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from napari_uhrseg.errors import ExportError, UhrsegError
from napari_uhrseg.io.atomic import atomic_path, describe_os_error
from napari_uhrseg.io.labels import LabelStore, default_colors, default_names

FORMATS = ("ome-tiff", "ome-zarr", "png", "geojson")
#: PNG is encoded whole in memory: refuse anything larger (16384 x 16384).
PNG_MAX_PIXELS = 2**28
#: Most bytes of labels held at once while streaming (one strip).
STRIP_BYTES = 64 * 2**20
TILE = 256
#: Pyramids stop when the longer side of a level is at most this.
COARSEST_SIDE = 512
_SUFFIXES = {".ome.tif": "ome-tiff", ".ome.tiff": "ome-tiff", ".tif": "ome-tiff", ".tiff": "ome-tiff",
             ".ome.zarr": "ome-zarr", ".zarr": "ome-zarr", ".png": "png", ".geojson": "geojson", ".json": "geojson"}


def guess_format(path) -> str:
    name = Path(path).name.lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    raise ExportError(
        f"Cannot tell the export format from {Path(path).name!r}: use .ome.tif, .ome.zarr, .png or .geojson, "
        "or pass format=."
    )


def export_labels(labels, path, *, format: str | None = None, class_names=None, class_colors=None,
                  pixel_size=None, pixel_unit=None, downsample=1.0,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write labels to ``path`` atomically; returns the path.

    Parameters
    ----------
    labels : 2-D integer labels (0 = unlabelled): numpy, dask or zarr array, a LabelStore, or a path that
        :func:`~napari_uhrseg.io.labels.open_label_store` reads.
    format : 'ome-tiff', 'ome-zarr', 'png' or 'geojson'; guessed from the suffix when None.
    class_names, class_colors : one name / RGB triple per label value, 0 included; defaults come from the store,
        else "unlabelled", "class 1", ... and a fixed palette.
    pixel_size, pixel_unit : size (y, x) of a *level-0* image pixel and its unit (e.g. µm); the label pixel is
        ``pixel_size * downsample``.
    downsample : level-0 pixels per label pixel (the working level of the run); GeoJSON coordinates are
        multiplied by it so they are level-0 pixels.
    progress : called as ``progress(done, total)`` in strips.
    """
    fmt = (format or guess_format(path)).lower()
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    source = _as_source(labels)
    scale = _pair(downsample)
    label_pixel = None if pixel_size is None else (float(_pair(pixel_size)[0]) * scale[0], float(_pair(pixel_size)[1]) * scale[1])
    meta = dict(class_names=_or(class_names, source.class_names), class_colors=_or(class_colors, source.class_colors),
                pixel_size=label_pixel, pixel_unit=pixel_unit or ("µm" if label_pixel else None), scale=scale)
    path = Path(path)
    writer = {"ome-tiff": write_ome_tiff, "ome-zarr": write_ome_zarr, "png": write_png, "geojson": write_geojson}[fmt]
    try:
        with atomic_path(path) as tmp:
            writer(source.array, tmp, meta, progress or (lambda done, total: None))
    except (UhrsegError, MemoryError):
        raise
    except OSError as exc:
        raise ExportError(describe_os_error(exc, path)) from exc
    return path


def _or(value, fallback):
    return list(value) if value is not None else (list(fallback) if fallback is not None else None)


def _pair(value) -> tuple[float, float]:
    v = np.asarray(value, dtype=np.float64).reshape(-1)
    return (float(v[0]), float(v[-1]))


def _as_source(labels) -> LabelStore:
    if isinstance(labels, LabelStore):
        store = labels
    elif isinstance(labels, (str, Path)):
        from napari_uhrseg.io.labels import open_label_store

        store = open_label_store(labels, writable=False)
    else:
        if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
            raise ExportError(f"Cannot export {type(labels).__name__}: give a label array, a LabelStore or a path.")
        store = LabelStore(labels, writable=False)
    shape, dtype = tuple(store.array.shape), np.dtype(store.array.dtype)
    if len(shape) != 2 or dtype.kind not in "uib":
        raise ExportError(f"Labels must be a 2-D integer array, got {dtype} of shape {shape}.")
    return store


def _out_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.uint8) if dtype in (np.uint8, np.bool_) else np.dtype(np.uint16)


def iter_strips(array, strip_rows: int | None = None, dtype=None):
    """Yield ``(y0, block)`` horizontal strips of a 2-D array as numpy, checking label values fit ``dtype``."""
    h, w = int(array.shape[0]), int(array.shape[1])
    dtype = np.dtype(dtype or _out_dtype(array.dtype))
    rows = strip_rows or strip_height(w, dtype.itemsize)
    for y0 in range(0, h, rows):
        block = np.asarray(array[y0:min(y0 + rows, h), :])
        if block.dtype != dtype:
            if block.size and (block.min() < 0 or block.max() > np.iinfo(dtype).max):
                raise ExportError(
                    f"Label values {int(block.min())}..{int(block.max())} do not fit in {dtype}: labels must be "
                    f"0..{np.iinfo(dtype).max}."
                )
            block = block.astype(dtype)
        yield y0, block


def strip_height(width: int, itemsize: int, budget: int | None = None) -> int:
    """Rows per strip: a multiple of 2 * TILE (so that halved strips stay tile-aligned) within ``budget``
    bytes (default :data:`STRIP_BYTES`)."""
    budget = STRIP_BYTES if budget is None else budget
    rows = 8 * TILE
    while rows > 2 * TILE and rows * width * itemsize > budget:
        rows //= 2
    return rows


def level_shapes(shape, coarsest_side: int = COARSEST_SIDE) -> list[tuple[int, int]]:
    """Shapes of the exported pyramid: each level takes every second row/column of the one above."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > coarsest_side and min(shapes[-1]) > 1:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return shapes


# ----------------------------------------------------------------------------------------------- OME-TIFF


def write_ome_tiff(labels, tmp: Path, meta: dict, progress) -> None:
    """Tiled, zlib-compressed pyramidal OME-TIFF (levels as SubIFDs), class table in the OME-XML."""
    import tifffile
    import zarr

    from napari_uhrseg.io.ome import label_ome_xml

    dtype = _out_dtype(labels.dtype)
    shapes = level_shapes(labels.shape)
    names, colors = _class_table(meta, None)
    xml = label_ome_xml(shapes[0], dtype, class_names=names, class_colors=colors,
                        pixel_size=meta["pixel_size"], pixel_unit=meta["pixel_unit"])
    total = sum(s[0] for s in shapes)
    done = [0]
    # Named after the temporary file, so that a killed export's leftovers are recognised and removed.
    staging = tmp.with_name(tmp.name + "-levels")
    staging.mkdir()
    try:
        source = labels
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            for k, shape in enumerate(shapes):
                nxt = None
                if k + 1 < len(shapes):
                    nxt = zarr.create_array(store=f"{staging}/level{k + 1}", shape=shapes[k + 1], dtype=dtype,
                                            chunks=(TILE, min(shapes[k + 1][1], 4096)), fill_value=0, zarr_format=3)
                tiles = _tiles(source, dtype, nxt, done, total, progress)
                options = dict(shape=shape, dtype=dtype, tile=(TILE, TILE), compression="zlib",
                               photometric="minisblack", metadata=None)
                if k == 0:
                    tw.write(tiles, subifds=len(shapes) - 1, description=xml, **options)
                else:
                    tw.write(tiles, subfiletype=1, **options)
                source = nxt
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _tiles(source, dtype, next_level, done, total, progress):
    """Tiles of one level in TIFF order, padded to full tiles; the halved strips go to ``next_level``."""
    width = int(source.shape[1])
    for y0, block in iter_strips(source, dtype=dtype):
        if next_level is not None:
            half = block[::2, ::2]
            next_level[y0 // 2:y0 // 2 + half.shape[0], :] = half
        for ty in range(0, block.shape[0], TILE):
            rows = block[ty:ty + TILE]
            for tx in range(0, width, TILE):
                tile = np.zeros((TILE, TILE), dtype)
                part = rows[:, tx:tx + TILE]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile
        done[0] += block.shape[0]
        progress(done[0], total)


def _class_table(meta: dict, max_label: int | None):
    names, colors = meta["class_names"], meta["class_colors"]
    n = max(len(names or []), len(colors or []), (max_label + 1) if max_label is not None else 0)
    if n == 0:
        return None, None
    names = list(names or []) + default_names(n)[len(names or []):]
    if isinstance(colors, dict):
        colors = [colors.get(k, colors.get(str(k), [0, 0, 0])) for k in range(n)]
    colors = [list(map(int, c[:3])) for c in (colors or [])] + default_colors(n)[len(colors or []):]
    return names, colors


# ----------------------------------------------------------------------------------------------- OME-Zarr


def write_ome_zarr(labels, tmp: Path, meta: dict, progress) -> None:
    """OME-Zarr (NGFF 0.4, zarr v2 files) multiscale labels with ``image-label`` colours and class names."""
    import zarr

    dtype = _out_dtype(labels.dtype)
    shapes = level_shapes(labels.shape)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
    arrays = [root.create_array(str(k), shape=s, dtype=dtype, chunks=(min(1024, s[0]), min(1024, s[1])),
                                fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}) for k, s in enumerate(shapes)]
    total = sum(s[0] for s in shapes[:-1]) or shapes[0][0]
    done = 0
    max_label = 0
    for k, target in enumerate(arrays):
        source = labels if k == 0 else arrays[k]
        if k == len(arrays) - 1 and k > 0:
            break
        for y0, block in iter_strips(source, dtype=dtype):
            if k == 0:
                target[y0:y0 + block.shape[0], :] = block
                max_label = max(max_label, int(block.max()) if block.size else 0)
            if k + 1 < len(arrays):
                half = block[::2, ::2]
                arrays[k + 1][y0 // 2:y0 // 2 + half.shape[0], :] = half
            done += block.shape[0]
            progress(min(done, total), total)
    names, colors = _class_table(meta, max_label)
    root.attrs.update(_ngff_attrs(shapes, meta, names, colors))


def _ngff_attrs(shapes, meta, names, colors) -> dict:
    sy, sx = meta["pixel_size"] or (1.0, 1.0)
    unit = {"µm": "micrometer", "um": "micrometer", "nm": "nanometer", "mm": "millimeter", "m": "meter"}.get(
        meta["pixel_unit"] or "", None)
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in ("y", "x")]
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [
        sy * shapes[0][0] / s[0], sx * shapes[0][1] / s[1]]}]} for k, s in enumerate(shapes)]
    attrs = {"multiscales": [{"version": "0.4", "name": "labels", "axes": axes, "datasets": datasets,
                              "type": "nearest", "metadata": {"method": "every second row and column"}}]}
    if names:
        attrs["image-label"] = {
            "version": "0.4",
            "colors": [{"label-value": k, "rgba": [*c, 0 if k == 0 else 255]} for k, c in enumerate(colors)],
            "properties": [{"label-value": k, "class": n} for k, n in enumerate(names)],
        }
        attrs["uhrseg"] = {"class_names": names, "class_colors": colors}
    return attrs


# ----------------------------------------------------------------------------------------------- PNG


def write_png(labels, tmp: Path, meta: dict, progress) -> None:
    """Palette PNG (up to 256 classes, shows the class colours) or 16-bit grayscale PNG (up to 65536)."""
    from PIL import Image, PngImagePlugin

    h, w = int(labels.shape[0]), int(labels.shape[1])
    if h * w > PNG_MAX_PIXELS:
        raise ExportError(
            f"{w} x {h} labels are too large for PNG (limit {PNG_MAX_PIXELS:,} pixels, encoded in memory): "
            "export to .ome.tif or .ome.zarr instead."
        )
    array = np.asarray(labels)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ExportError(
            f"Label values up to {int(array.max())} do not fit in a PNG (at most 65536 classes): "
            "export to .ome.tif or .ome.zarr instead."
        )
    max_label = int(array.max()) if array.size else 0
    names, colors = _class_table(meta, max_label)
    info = PngImagePlugin.PngInfo()
    info.add_text("uhrseg", json.dumps({"class_names": names, "class_colors": colors}))
    if max_label <= 255:
        image = Image.fromarray(array.astype(np.uint8), mode="P")
        palette = np.zeros((256, 3), np.uint8)
        palette[: len(colors)] = np.asarray(colors[:256], np.uint8)
        image.putpalette(palette.ravel().tolist())
    else:
        image = Image.fromarray(array.astype(np.uint16))
    if meta["pixel_size"] is not None and meta["pixel_unit"] in ("µm", "um"):
        dpi = (25400.0 / meta["pixel_size"][1], 25400.0 / meta["pixel_size"][0])
        image.save(tmp, format="PNG", pnginfo=info, dpi=dpi)
    else:
        image.save(tmp, format="PNG", pnginfo=info)
    progress(h, h)


# ----------------------------------------------------------------------------------------------- GeoJSON


def write_geojson(labels, tmp: Path, meta: dict, progress) -> None:
    """A FeatureCollection of Polygons, one per connected region, in level-0 pixel coordinates (QuPath)."""
    from napari_uhrseg.io import geojson

    h, w = int(labels.shape[0]), int(labels.shape[1])
    dtype = _out_dtype(labels.dtype)
    collector = geojson.EdgeCollector(w)
    # Edge finding makes several strip-sized temporaries: a quarter of the usual strip keeps them small.
    rows = strip_height(w, dtype.itemsize, budget=STRIP_BYTES // 4)
    for y0, block in iter_strips(labels, rows, dtype=dtype):
        collector.add_strip(y0, block)
        progress(y0 + block.shape[0], h)
    collector.finish(h)
    classes = collector.classes()
    names, colors = _class_table(meta, max(classes) if classes else 0)

    def features():
        for k in classes:
            for polygon in geojson.polygons_of_class(collector.edges_of(k), w):
                yield geojson.feature(polygon, names[k], colors[k], scale=meta["scale"])
            collector.release(k)  # free each class once written

    properties = {"labels_shape": [h, w], "downsample": list(meta["scale"]), "coordinates": "level-0 pixels",
                  "class_names": names}
    if meta["pixel_size"] is not None:
        properties.update(pixel_size=list(meta["pixel_size"]), pixel_unit=meta["pixel_unit"])
    with open(tmp, "w", encoding="utf-8") as fh:
        geojson.write_feature_collection(fh, features(), properties=properties)
