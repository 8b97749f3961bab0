"""Overlay records of a run (PPN patches in level-0 pixels) as GeoJSON or JSON files.

A record is ``{"kind": "ppn_patch", "box": (y0, x0, y1, x1), "probability", "selected", "window", "level"}``
with the box in level-0 pixels (pixel-corner convention). GeoJSON wants (x, y) order: each record becomes a
rectangle Polygon in level-0 pixel coordinates that QuPath imports as an annotation, its class telling
whether PPN selected the patch for refinement.
"""
from __future__ import annotations

import json
from pathlib import Path

SELECTED_COLOR = [255, 128, 0]
SKIPPED_COLOR = [90, 160, 255]


def overlays_to_geojson(records: list[dict]) -> dict:
    """A GeoJSON FeatureCollection of rectangles (level-0 pixels, x then y)."""
    features = []
    for rec in records:
        y0, x0, y1, x1 = (float(v) for v in rec["box"])
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        selected = bool(rec.get("selected", False))
        props = {k: v for k, v in rec.items() if k != "box"}
        props.update({
            "objectType": "annotation",
            "name": f"{rec.get('kind', 'overlay')} w{rec.get('window', '?')} p={rec.get('probability', float('nan')):.2f}",
            "classification": {"name": "PPN selected" if selected else "PPN not selected",
                               "color": SELECTED_COLOR if selected else SKIPPED_COLOR},
            "measurements": {"probability": float(rec.get("probability", float("nan")))},
        })
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": props})
    return {"type": "FeatureCollection", "features": features}


def write_overlays(records: list[dict], path: str | Path) -> Path:
    """Write ``records`` atomically: GeoJSON for ``.geojson``, a plain JSON list for anything else."""
    from napari_uhrseg.io.atomic import atomic_path

    path = Path(path)
    if path.suffix.lower() == ".geojson":
        payload = overlays_to_geojson(records)
    else:
        payload = [{**r, "box": [float(v) for v in r["box"]]} for r in records]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=1, allow_nan=True))
    return path


def read_overlays(path: str | Path) -> list[dict]:
    """Records back from a file written by ``write_overlays`` (GeoJSON or JSON)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return [{**r, "box": tuple(r["box"])} for r in data]
    out = []
    for feat in data.get("features", []):
        ring = feat["geometry"]["coordinates"][0]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        props = {k: v for k, v in feat["properties"].items()
                 if k not in ("objectType", "name", "classification", "measurements")}
        out.append({**props, "box": (min(ys), min(xs), max(ys), max(xs))})
    return out
