"""npe2 writers for Labels layers: pyramidal OME-TIFF, OME-Zarr, PNG and GeoJSON (QuPath).

The layer's ``metadata`` may carry ``class_names``, ``class_colors``, ``pixel_size`` / ``pixel_unit`` (of a
level-0 image pixel) and ``downsample`` (level-0 pixels per label pixel; the Segment dock's layers carry it as
``uhrseg_downsample``; for a region, ``uhrseg_frame``: its level's shape and the region's origin there, so
that it is written where it lies on the image). Class names not in the metadata come from the layer's
``features`` table (what the docks write, see ``widgets.state.write_classes``) and their colours from its
colormap; without a pixel size, the layer
``scale`` is taken as the label pixel size when a unit is known (the metadata's, or the layer's ``units``).
"""
from __future__ import annotations

from pathlib import Path

# napari/pint spell units in words; the exporters write symbols.
_UNIT_SYMBOLS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m",
                 "kilometer": "km", "foot": "ft", "degree": "degree"}


def _export(path: str, data, attributes: dict, fmt: str) -> list[str]:
    from napari_uhrseg.io.export import export_labels

    labels = data[0] if isinstance(data, (list, tuple)) else data  # multiscale labels: the finest level
    meta = dict(attributes.get("metadata") or {})
    downsample = meta.get("downsample", meta.get("uhrseg_downsample", 1.0))
    pixel_size = meta.get("pixel_size")
    pixel_unit = meta.get("pixel_unit") or _layer_unit(attributes)
    if pixel_size is None and pixel_unit and attributes.get("scale") is not None:
        scale = attributes["scale"][-2:]
        dy, dx = (downsample, downsample) if not isinstance(downsample, (list, tuple)) else downsample
        pixel_size = (float(scale[0]) / float(dy), float(scale[1]) / float(dx))
    names, colors = _classes(attributes, meta)
    frame = meta.get("uhrseg_frame")
    if frame:  # a Segment dock layer of a region: written where it lies on the image, the rest unlabelled
        from napari_uhrseg.engine.refine import FramedLabels

        labels = FramedLabels(labels, frame["shape"], frame["origin"])
    out = export_labels(labels, path, format=fmt, class_names=names, class_colors=colors, pixel_size=pixel_size,
                        pixel_unit=pixel_unit, downsample=downsample)
    return [str(Path(out))]


def _layer_unit(attributes: dict) -> str | None:
    units = attributes.get("units")
    if not units:
        return None
    unit = str(units[-1])
    return None if unit in ("pixel", "pixels", "px", "") else _UNIT_SYMBOLS.get(unit, unit)


def _classes(attributes: dict, meta: dict):
    """(class names, 0..255 RGB colours) from the metadata, else the features table and the colormap."""
    import numpy as np

    from napari_uhrseg.widgets.state import NAME_COLUMNS

    names, colors = meta.get("class_names"), meta.get("class_colors")
    feats = attributes.get("features")
    if names is None and feats is not None and len(feats):
        col = next((c for c in NAME_COLUMNS if c in feats.columns), None)
        if col is not None:
            index = feats["index"] if "index" in feats.columns else range(len(feats))
            by_value = {int(i): str(n) for i, n in zip(index, feats[col])}
            names = [by_value.get(i, "unlabelled" if i == 0 else f"class {i}") for i in range(max(by_value) + 1)]
    cmap = attributes.get("colormap")
    if names is not None and colors is None and hasattr(cmap, "map"):
        rgba = np.asarray(cmap.map(np.arange(len(names))), dtype=float).reshape(len(names), -1)
        colors = [[int(round(255 * v)) for v in c[:3]] for c in rgba]
    return names, colors


def write_ome_tiff(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "ome-tiff")


def write_ome_zarr(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "ome-zarr")


def write_png(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "png")


def write_geojson(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "geojson")
