"""Overlay records of a run (PPN patches in level-0 pixels) as GeoJSON or JSON files.

A record is ``{"kind": "ppn_patch", "box": (y0, x0, y1, x1), "probability", "selected", "window", "level"}``
with the box in level-0 pixels (pixel-corner convention). GeoJSON wants (x, y) order: each record becomes a
rectangle Polygon in level-0 pixel coordinates that QuPath imports as an annotation, its class telling
whether PPN selected the patch for refinement ("PPN selected" / "PPN not selected"), or, when the patches were
ranked by the G-branch's doubt (``"scorer": "uncertainty"``), whether it was refined ("Refined" / "Not refined").
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

SELECTED_COLOR = [255, 128, 0]
SKIPPED_COLOR = [90, 160, 255]


def overlay_feature(rec: dict) -> dict:
    """One record as a GeoJSON Feature: a rectangle in level-0 pixels (x then y)."""
    y0, x0, y1, x1 = (float(v) for v in rec["box"])
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    selected = bool(rec.get("selected", False))
    props = {k: v for k, v in rec.items() if k != "box"}
    doubt = rec.get("scorer") == "uncertainty"
    names = ("Refined", "Not refined") if doubt else ("PPN selected", "PPN not selected")
    props.update({
        "objectType": "annotation",
        "name": f"{rec.get('kind', 'overlay')} w{rec.get('window', '?')} {'doubt' if doubt else 'p'}="
                f"{rec.get('probability', float('nan')):.2f}",
        "classification": {"name": names[0] if selected else names[1],
                           "color": SELECTED_COLOR if selected else SKIPPED_COLOR},
        "measurements": {"probability": float(rec.get("probability", float("nan")))},
    })
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def write_overlays(records: Iterable[dict], path: str | Path) -> Path:
    """Write ``records`` atomically: GeoJSON for ``.geojson``, a plain JSON list for anything else.

    Streamed one record at a time: a whole slide's records (16 per window) as one JSON document in memory
    would cost ~70 MB for a 20000² image at the very end of a run, more than the run itself grew."""
    from napari_uhrseg.io.atomic import atomic_path

    path = Path(path)
    geojson = path.suffix.lower() == ".geojson"
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n' if geojson else "[\n")
        for i, rec in enumerate(records):
            item = overlay_feature(rec) if geojson else {**rec, "box": [float(v) for v in rec["box"]]}
            f.write((",\n" if i else "") + json.dumps(item, allow_nan=True))
        f.write("\n]}\n" if geojson else "\n]\n")
    return path


class OverlaySpool:
    """Overlay records kept in a temporary file as they come (one JSON line each) instead of in memory; counts
    PPN patches on the way. ``records()`` reads them back one at a time (for ``write_overlays``)."""

    def __init__(self):
        self._file = tempfile.TemporaryFile("w+", prefix="uhrseg-overlays-", suffix=".jsonl")
        self.patches = self.patches_selected = 0

    def add(self, records: Iterable[dict]) -> None:
        for rec in records:
            self._file.write(json.dumps({**rec, "box": [float(v) for v in rec["box"]]}, allow_nan=True) + "\n")
            if rec.get("kind") == "ppn_patch":
                self.patches += 1
                self.patches_selected += bool(rec.get("selected"))

    def records(self) -> Iterator[dict]:
        self._file.flush()
        self._file.seek(0)
        for line in self._file:
            rec = json.loads(line)
            yield {**rec, "box": tuple(rec["box"])}
        self._file.seek(0, 2)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "OverlaySpool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
