"""MagNet's uncertainty in napari: a heat-map layer over the image, a stage selector, and the annotator's queue
("next most uncertain region not yet visited").

Frames: whole-image maps are arrays at a coarse level, ``downsample`` level-0 pixels per map pixel; regions are
``(y0, x0, y1, x1)`` boxes in level-0 pixels (pixel edges). The maps are assembled from the engine's
``WindowEvent``s with :class:`napari_uhrseg.methods.magnet.UncertaintyMap`.

The Segment dock (``widgets.segment``) feeds a MagNet run's windows here with one call per window::

    uncertainty.on_window_event(viewer, image_layer, event, level_downsample)

and the dock widget :class:`UncertaintyWidget` (npe2 command ``napari-uhrseg.uncertainty_dock``) shows them.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget

from napari_uhrseg.methods.magnet import coarse_downsample
from napari_uhrseg.widgets import _layers

LAYER_SUFFIX = "MagNet uncertainty"
FINAL = "final"
COLORMAP = "inferno"
OPACITY = 0.5
class StageMaps:
    """One image's whole-image maps: ``"final"`` (1 − certainty of the labels) and ``"stage i"`` (the query map
    of stage i; stage 0 is the backbone's own uncertainty)."""

    def __init__(self, shape0: tuple[int, int], downsample: float):
        self.shape0 = tuple(int(v) for v in shape0)
        self.downsample = float(downsample)
        self._maps: dict = {}

    def _map(self, key: str):
        from napari_uhrseg.methods.magnet import UncertaintyMap

        if key not in self._maps:
            self._maps[key] = UncertaintyMap(self.shape0, self.downsample)
        return self._maps[key]

    def add_event(self, event, level_downsample: float) -> bool:
        """Add a window's ``uncertainty`` and per-stage ``query_map`` artefacts; False when it has none."""
        art = getattr(event, "artefacts", None) or {}
        final = art.get("uncertainty")
        if final is None or np.ndim(final) != 2:
            return False
        window_shape = np.shape(final)
        self._map(FINAL).add_window(final, event.read_box, level_downsample)
        for stage in art.get("stages", ()) or ():
            self._map(f"stage {stage['stage']}").add_window(
                stage["query_map"], event.read_box, level_downsample, window_shape=window_shape
            )
        return True

    @property
    def names(self) -> list[str]:
        stages = sorted((k for k in self._maps if k != FINAL), key=lambda k: int(k.split()[-1]))
        return ([FINAL] if FINAL in self._maps else []) + stages

    def map(self, name: str = FINAL):
        """The :class:`~napari_uhrseg.methods.magnet.UncertaintyMap` of ``name`` (e.g. to save it)."""
        return self._maps[name]

    def array(self, name: str = FINAL) -> np.ndarray:
        return self._maps[name].array

    def covered(self, name: str = FINAL) -> np.ndarray:
        """Map pixels some window was added over."""
        return self._maps[name].covered


class RegionQueue:
    """The annotator's queue: square regions of about ``region`` level-0 pixels, most uncertain first (mean of
    the map over the region), each offered once. ``next()`` returns a level-0 box or None when all are visited.

    A region is a whole number of map pixels (``region`` rounded to the map's grid), so the box the view goes to
    is the block that was scored. ``covered``: map pixels some window was segmented over (``UncertaintyMap``'s
    ``covered``); regions with none are not queued — after a run on a box, the rest of the slide has no map,
    not a certain one."""

    def __init__(self, umap: np.ndarray, downsample: float, region: float, shape0: tuple[int, int] | None = None,
                 covered: np.ndarray | None = None):
        self.downsample = float(downsample)
        umap = np.asarray(umap, dtype=np.float32)
        self.step = max(1, int(round(float(region) / self.downsample)))  # map pixels per region side
        self.region = self.step * self.downsample
        self.shape0 = shape0 or (umap.shape[0] * downsample, umap.shape[1] * downsample)
        self.visited: set[tuple[int, int]] = set()
        self.scores = self._block_scores(umap)
        self.queued = np.ones(self.scores.shape, bool)
        if covered is not None:  # a region's score is the mean over its segmented pixels only
            share = self._block_scores(np.asarray(covered, bool).astype(np.float32))
            self.queued = share > 0
            self.scores = np.where(self.queued, self._block_scores(umap * covered) / np.maximum(share, 1e-12), 0)
        for cell in zip(*np.nonzero(~self.queued)):
            self.visited.add((int(cell[0]), int(cell[1])))

    def _block_scores(self, umap: np.ndarray) -> np.ndarray:
        step = self.step
        rows, cols = math.ceil(umap.shape[0] / step), math.ceil(umap.shape[1] / step)
        scores = np.zeros((rows, cols), np.float32)
        for r in range(rows):
            for c in range(cols):
                scores[r, c] = umap[r * step : (r + 1) * step, c * step : (c + 1) * step].mean()
        return scores

    def box(self, cell: tuple[int, int]) -> tuple[float, float, float, float]:
        r, c = cell
        y0, x0 = r * self.region, c * self.region
        return (y0, x0, min(y0 + self.region, float(self.shape0[0])), min(x0 + self.region, float(self.shape0[1])))

    def mark_visited(self, box0: tuple[float, float, float, float]) -> None:
        """Mark every region whose centre lies inside ``box0`` (e.g. the view the user has looked at)."""
        for r in range(self.scores.shape[0]):
            for c in range(self.scores.shape[1]):
                y0, x0, y1, x1 = self.box((r, c))
                if box0[0] <= (y0 + y1) / 2 < box0[2] and box0[1] <= (x0 + x1) / 2 < box0[3]:
                    self.visited.add((r, c))

    def next(self) -> tuple[float, float, float, float] | None:
        order = np.argsort(-self.scores, axis=None, kind="stable")
        for flat in order:
            cell = tuple(int(v) for v in np.unravel_index(flat, self.scores.shape))
            if cell not in self.visited:
                self.visited.add(cell)
                return self.box(cell)
        return None

    @property
    def remaining(self) -> int:
        return self.scores.size - len(self.visited)

    @property
    def total(self) -> int:
        """Regions in the queue at the start (those with a map)."""
        return int(self.queued.sum())


# ------------------------------------------------------------------------------------------------ layers
_MAPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def maps_for(image_layer) -> StageMaps | None:
    """The uncertainty maps assembled for ``image_layer`` (None before a MagNet run)."""
    return _MAPS.get(image_layer)


def layer_name(image_layer) -> str:
    return f"{image_layer.name} {LAYER_SUFFIX}"


def show_uncertainty(viewer, image_layer, umap: np.ndarray, downsample: float, *, stage: str = FINAL):
    """Add or update the ``"<image> MagNet uncertainty"`` layer: ``umap`` (a whole-image map, ``downsample``
    level-0 px per pixel) placed exactly on ``image_layer`` whatever its scale and translate."""
    scale, translate = _layers.labels_geometry(image_layer, downsample, (0, 0))
    name = layer_name(image_layer)
    data = np.asarray(umap, dtype=np.float32)
    if name in viewer.layers:
        layer = viewer.layers[name]
        layer.data = data
        layer.scale, layer.translate = scale, translate
    else:
        layer = viewer.add_image(
            data, name=name, colormap=COLORMAP, opacity=OPACITY, blending="additive",
            contrast_limits=(0.0, 1.0), scale=scale, translate=translate,
        )
    layer.contrast_limits = (0.0, 1.0)
    layer.metadata["uhrseg_uncertainty"] = {"stage": stage, "downsample": float(downsample)}
    return layer


def on_window_event(viewer, image_layer, event, level_downsample: float):
    """Feed one engine ``WindowEvent`` of a MagNet run: the image's maps grow and the layer is refreshed.
    Returns the layer, or None when the window carries no uncertainty (another method)."""
    from napari_uhrseg.widgets._layers import pyramid_for_layer

    maps = _MAPS.get(image_layer)
    if maps is None or event.index == 0:
        shape0 = tuple(int(v) for v in pyramid_for_layer(image_layer).shape[:2])
        maps = StageMaps(shape0, coarse_downsample(shape0, level_downsample))
    if not maps.add_event(event, level_downsample):
        return None
    _MAPS[image_layer] = maps
    return show_uncertainty(viewer, image_layer, maps.array(FINAL), maps.downsample)


# ------------------------------------------------------------------------------------------------ the dock
class UncertaintyWidget(QWidget):
    """Choose the image, the stage whose map is shown, and step through the most uncertain regions."""

    visited = Signal(tuple)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        from napari.layers import Image

        from napari_uhrseg.widgets._common import LayerCombo

        self.viewer = napari_viewer
        self._queue: RegionQueue | None = None
        self.image_combo = LayerCombo(napari_viewer, Image, self)
        self.stage_combo = QComboBox(self)
        self.region_spin = QSpinBox(self)
        self.region_spin.setRange(64, 65536)
        self.region_spin.setValue(1024)
        self.region_spin.setSuffix(" px")
        self.region_spin.setToolTip("side of a queue region, in full-resolution pixels")
        self.refresh_button = QPushButton("Refresh", self)
        self.next_button = QPushButton("Next uncertain region", self)
        self.status = QLabel("Run MagNet or MagNet-Fast in the Segment dock.", self)
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        for label, w in (("Image", self.image_combo), ("Stage", self.stage_combo), ("Region", self.region_spin)):
            row = QHBoxLayout()
            row.addWidget(QLabel(label))
            row.addWidget(w, 1)
            lay.addLayout(row)
        lay.addWidget(self.refresh_button)
        lay.addWidget(self.next_button)
        lay.addWidget(self.status)
        lay.addStretch(1)
        self.image_combo.currentIndexChanged.connect(self.refresh)
        self.stage_combo.currentIndexChanged.connect(self._show_stage)
        self.region_spin.valueChanged.connect(self._reset_queue)
        self.refresh_button.clicked.connect(self.refresh)
        self.next_button.clicked.connect(self.next_region)
        napari_viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.refresh()

    def _on_layer_inserted(self, event) -> None:
        """A Segment-dock run just created an uncertainty layer: offer its stages."""
        if str(getattr(event.value, "name", "")).endswith(LAYER_SUFFIX):
            self.refresh()

    def _maps(self) -> StageMaps | None:
        layer = self.image_combo.layer()
        return None if layer is None else maps_for(layer)

    def refresh(self, *_) -> None:
        """Re-read the stages available for the chosen image (after a run)."""
        maps = self._maps()
        current = self.stage_combo.currentText()
        self.stage_combo.blockSignals(True)
        self.stage_combo.clear()
        self.stage_combo.addItems(maps.names if maps else [])
        if current and self.stage_combo.findText(current) >= 0:
            self.stage_combo.setCurrentIndex(self.stage_combo.findText(current))
        self.stage_combo.blockSignals(False)
        self._reset_queue()
        if maps:
            self._show_stage()

    def _reset_queue(self, *_) -> None:
        self._queue = None

    def _show_stage(self, *_) -> None:
        maps, layer = self._maps(), self.image_combo.layer()
        stage = self.stage_combo.currentText()
        if maps is None or not stage:
            return
        show_uncertainty(self.viewer, layer, maps.array(stage), maps.downsample, stage=stage)
        self._reset_queue()
        self.status.setText(f"Showing {stage}: {maps.downsample:g} px per map pixel.")

    def next_region(self) -> tuple | None:
        """Centre the view on the most uncertain region not yet visited; returns its level-0 box."""
        maps, layer = self._maps(), self.image_combo.layer()
        if maps is None:
            self.status.setText("No uncertainty map for this image: run MagNet or MagNet-Fast first.")
            return None
        if self._queue is None:
            stage = self.stage_combo.currentText() or FINAL
            self._queue = RegionQueue(maps.array(stage), maps.downsample, self.region_spin.value(), maps.shape0,
                                      covered=maps.covered(stage))
        box = self._queue.next()
        if box is None:
            self.status.setText("Every region has been visited.")
            return None
        self._go_to(layer, box)
        self.status.setText(f"Region {box[0]:.0f},{box[1]:.0f} (y, x); {self._queue.remaining} left in the queue.")
        self.visited.emit(box)
        return box

    def _go_to(self, layer, box) -> None:
        scale, translate = _layers.image_geometry(layer)
        centre = np.array([(box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5])  # pixel-centre frame
        world = translate + scale * centre
        extent = np.array([box[2] - box[0], box[3] - box[1]]) * scale
        cam = self.viewer.camera
        cam.center = tuple(list(cam.center)[: len(cam.center) - 2]) + (float(world[0]), float(world[1]))
        canvas = np.asarray(getattr(self.viewer, "_canvas_size", (600, 800)), dtype=float)[-2:]
        cam.zoom = float(0.9 * np.min(canvas / np.maximum(extent, 1e-9)))
