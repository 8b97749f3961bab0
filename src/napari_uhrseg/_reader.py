"""npe2 reader: any image ``open_pyramid`` reads, as one lazy multiscale layer with its pixel size as scale.

``get_reader`` only looks at the name (and, for folders, whether it is a zarr store); it returns None for what
is not ours, so napari can try other readers. A file that is ours but damaged or unsupported raises
:class:`~napari_uhrseg.errors.UnsupportedImageError` from the read function; napari shows its message (which
names the file and says what to do) as a notification and the viewer carries on.
"""
from __future__ import annotations

from pathlib import Path

from napari_uhrseg.io.formats import JPEG_SUFFIXES, PNG_SUFFIXES, TIFF_SUFFIXES

_SUFFIXES = TIFF_SUFFIXES | PNG_SUFFIXES | JPEG_SUFFIXES
# napari/pint spell units in words; OME and slide metadata use symbols.
_UNITS = {"µm": "micrometer", "um": "micrometer", "nm": "nanometer", "mm": "millimeter", "m": "meter",
          "cm": "centimeter", "km": "kilometer", "ft": "foot", "degree": "degree"}


def get_reader(path):
    """The read function for ``path`` when it is one file or folder we read; None otherwise."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, Path)):
        return None
    p = Path(path)
    if p.is_dir():
        is_zarr = any((p / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup", ".zarray"))
        return read_pyramid if is_zarr else None
    return read_pyramid if p.suffix.lower() in _SUFFIXES else None


def read_pyramid(path):
    """``[(levels, kwargs, layer_type)]`` for one image; raises UnsupportedImageError with a clear message."""
    from napari_uhrseg.io.pyramid import open_pyramid

    if isinstance(path, (list, tuple)):
        path = path[0]
    uncertainty = uncertainty_layer_data(path)
    if uncertainty is not None:
        return [uncertainty]
    store = label_store_layer_data(path)
    if store is not None:
        return [store]
    return [layer_data(open_pyramid(path))]


def label_store_layer_data(path) -> tuple | None:
    """A label store ``uhrseg segment -o OUT.zarr`` wrote (a zarr array with our ``uhrseg`` attributes) as a
    Labels layer placed on its image: scale and translate from its level's downsample, the region's origin and
    the image's pixel size, class names in its features. None for any other path."""
    p = Path(path)
    if not p.is_dir() or p.name.lower().endswith(".ome.zarr"):
        return None
    try:
        import zarr

        node = zarr.open(str(p), mode="r")
        info = dict(node.attrs.get("uhrseg", {})) if hasattr(node, "shape") else {}
    except Exception:  # noqa: BLE001 - not a zarr array: open_pyramid says what it is
        return None
    if not info or node.ndim != 2 or node.dtype.kind not in "ui":
        return None
    import dask.array as da
    import numpy as np

    d = np.asarray(info.get("downsample") or (1.0, 1.0), float).reshape(-1)[-2:]
    origin = np.asarray(info.get("origin") or (0, 0), float)
    size = np.asarray(info.get("pixel_size") or (1.0, 1.0), float).reshape(-1)[-2:]
    scale = size * d
    translate = size * (origin * d + (d - 1.0) / 2.0)  # as the Segment dock places its layers
    kwargs = {"name": p.name[: -len(".zarr")] if p.name.lower().endswith(".zarr") else p.name,
              "scale": tuple(float(v) for v in scale), "translate": tuple(float(v) for v in translate),
              "metadata": {"uhrseg_path": str(p), "uhrseg_downsample": tuple(float(v) for v in d)}}
    names = info.get("class_names")
    if names:
        kwargs["features"] = {"index": list(range(len(names))), "class": list(names)}
    unit = _UNITS.get(info.get("pixel_unit") or "")
    if info.get("pixel_size") and unit:
        kwargs["units"] = (unit, unit)
    return (da.from_zarr(node), kwargs, "labels")


def uncertainty_layer_data(path) -> tuple | None:
    """A MagNet uncertainty map written by ``uhrseg segment`` (``<stem>_uncertainty.tif``) as a heat-map layer
    placed on its image (scale and translate from the map's downsample and pixel size); None for other files."""
    from napari_uhrseg.methods.magnet import read_uncertainty, uncertainty_geometry

    found = read_uncertainty(path)
    if found is None:
        return None
    data, meta = found
    scale, translate = uncertainty_geometry(meta)
    kwargs = {"name": f"{Path(path).stem} (MagNet uncertainty)", "scale": scale, "translate": translate,
              "colormap": "inferno", "contrast_limits": [0.0, 1.0], "opacity": 0.5, "blending": "additive",
              "metadata": {"uhrseg_path": str(path), "uhrseg_uncertainty": meta}}
    unit = _UNITS.get(meta.get("pixel_unit") or "")
    if meta.get("pixel_size") and unit:
        kwargs["units"] = (unit, unit)
    return (data, kwargs, "image")


def layer_data(pyramid) -> tuple:
    """napari layer data tuple for a Pyramid: one multiscale image (or labels, for OME-Zarr label images)."""
    scale = tuple(pyramid.pixel_size) if pyramid.pixel_size else (1.0, 1.0)
    metadata = {"uhrseg_path": pyramid.path, "pixel_size": pyramid.pixel_size, "pixel_unit": pyramid.pixel_unit,
                "downsamples": list(pyramid.downsamples), "channel_names": pyramid.channel_names}
    kwargs = {"name": pyramid.name, "multiscale": True, "scale": scale, "metadata": metadata}
    unit = _UNITS.get(pyramid.pixel_unit or "")
    if pyramid.pixel_size and unit:
        kwargs["units"] = (unit, unit)
    image_label = pyramid.metadata.get("image-label")
    if image_label is not None and pyramid.channel_axis is None and pyramid.dtype.kind in "ui":
        return (list(pyramid.levels), kwargs, "labels")
    if pyramid.channel_axis is not None and not pyramid.rgb:
        kwargs["channel_axis"] = pyramid.channel_axis
        names = pyramid.channel_names or [f"channel {i}" for i in range(pyramid.num_channels)]
        kwargs["name"] = [f"{pyramid.name} {n}" for n in names]
        scale_list = [scale] * pyramid.num_channels
        kwargs["scale"] = scale_list
    else:
        kwargs["rgb"] = bool(pyramid.rgb)
    if pyramid.dtype.kind == "f" or pyramid.dtype.itemsize > 1:
        lo, hi = pyramid.intensity_range()  # one estimate from the coarsest level, as read_region uses
        if not kwargs.get("channel_axis"):
            kwargs["contrast_limits"] = [lo, hi]
    return (list(pyramid.levels), kwargs, "image")
