"""npe2 writers for Labels layers: pyramidal OME-TIFF, OME-Zarr, PNG and GeoJSON (QuPath).

The layer's ``metadata`` may carry ``class_names``, ``class_colors``, ``pixel_size`` / ``pixel_unit`` (of a
level-0 image pixel) and ``downsample`` (level-0 pixels per label pixel); the segmentation widgets set them.
Without them, the layer ``scale`` is taken as the label pixel size only when a unit is known.
"""
from __future__ import annotations

from pathlib import Path


def _export(path: str, data, attributes: dict, fmt: str) -> list[str]:
    from napari_uhrseg.io.export import export_labels

    labels = data[0] if isinstance(data, (list, tuple)) else data  # multiscale labels: the finest level
    meta = dict(attributes.get("metadata") or {})
    downsample = meta.get("downsample", 1.0)
    pixel_size = meta.get("pixel_size")
    pixel_unit = meta.get("pixel_unit")
    if pixel_size is None and pixel_unit and attributes.get("scale") is not None:
        scale = attributes["scale"][-2:]
        pixel_size = (float(scale[0]) / float(downsample), float(scale[1]) / float(downsample))
    out = export_labels(labels, path, format=fmt, class_names=meta.get("class_names"),
                        class_colors=meta.get("class_colors"), pixel_size=pixel_size, pixel_unit=pixel_unit,
                        downsample=downsample)
    return [str(Path(out))]


def write_ome_tiff(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "ome-tiff")


def write_ome_zarr(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "ome-zarr")


def write_png(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "png")


def write_geojson(path: str, data, attributes: dict) -> list[str]:
    return _export(path, data, attributes, "geojson")
