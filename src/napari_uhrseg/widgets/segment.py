"""Segment dock: run a method over the whole image, the current view or a drawn box, in a worker.

The dock gathers choices and drives ``napari_uhrseg.engine.segment.iter_segment`` in a napari
``thread_worker`` (``UHRSEG_SYNC=1`` runs it on the GUI thread, for tests). Each finished window refreshes
``"<image> labels"`` (the engine's label store, placed on the image with the working level's scale) and
``"<image> PPN patches"`` (rectangles in the image's level-0 data coordinates, edge colour by PPN
probability). MagNet and MagNet-Fast runs also fill ``"<image> MagNet uncertainty"`` (``widgets.uncertainty``:
heat map, contrast [0, 1], placed on the image at any working level). Cancel stops between windows and keeps
the finished ones. Errors become napari notifications.
"""
from __future__ import annotations

import os
import threading
import time

import napari
import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_uhrseg.engine.segment import DEFAULT_OVERLAP, DEFAULT_WINDOW
from napari_uhrseg.widgets import _layers
from napari_uhrseg.widgets._common import (
    LayerCombo,
    QueuedProgressBar,
    freeze_long_lived_objects,
    hold_full_collections,
    notify_error,
)
from napari_uhrseg.widgets.state import get_state

REGIONS = ("Whole image", "Current view", "Drawn box")
# GRNet's "Refine patches" choices: {} keeps the checkpoint's rule (the fast preset's: the 4 patches where the
# G-branch is least sure; docs/methods/grnet.md), the others set mode / scorer / rule (cli.segment.set_selection).
PATCH_RULES: dict[str, dict] = {
    "checkpoint's rule": {},
    "4 most doubtful (G-branch)": {"scorer": "uncertainty", "top_k": 4},
    "4 most probable (PPN)": {"scorer": "ppn", "top_k": 4},
    "PPN p ≥ 0.5 (paper)": {"scorer": "ppn", "threshold": 0.5},
    "all patches": {"mode": "all"},
    "none (G-branch only)": {"mode": "global"},
}

# The PPN patch layer is brought up to date at most this often during a run, at most PATCHES_PER_TURN rectangles
# per turn of the event loop: each update of a napari Shapes layer costs the GUI thread its Python work (~1 ms a
# rectangle) and a redraw in which vispy rebuilds the shapes' shaders (60-100 ms with software OpenGL).
PATCHES_REFRESH_S = 4.0
PATCHES_PER_TURN = 16


def _sync_requested() -> bool:
    return os.environ.get("UHRSEG_SYNC", "") not in ("", "0")


class SegmentWidget(QWidget):
    """The Segment dock. ``finished`` carries the ``SegmentResult`` or the exception of a run."""

    finished = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.result = None
        self._worker = None
        self._cancel = threading.Event()
        self._records: list[dict] = []
        self._unshown: list[dict] = []
        self._shown_at = 0.0
        self._pending: list = []  # windows a worker finished that are not shown yet
        self._patches_due = False
        self._thumbnail_due = False
        self._gui_jobs: list = []  # GUI work of a run, one piece per event-loop turn (``_later``)
        self._labels_layer = None
        self._image_layer = None
        self._method = None
        self._build()
        self._on_image_changed()
        self._on_method_changed()
        self._window_from_checkpoint()
        # A checkpoint trained or loaded in another dock (Train, Checkpoints) becomes this dock's choice.
        self.state.events.method.connect(self._follow_state)
        self.state.events.checkpoint.connect(self._follow_state)

    # ------------------------------------------------------------------------------------------ layout
    def _build(self) -> None:
        from napari_uhrseg.methods import available_methods

        self.image_combo = LayerCombo(self.viewer, napari.layers.Image, self)
        self.method_combo = QComboBox(self)
        self.method_combo.addItems(available_methods())
        if self.state.method and self.method_combo.findText(self.state.method) >= 0:
            self.method_combo.setCurrentText(self.state.method)
        self.checkpoint_combo = QComboBox(self)
        self.checkpoint_combo.setEditable(True)
        # Checkpoint descriptions are long (name, method, classes, date): as wide as the dock allows, not as the
        # longest item, which opened the dock 750 px wide and left the canvas a strip.
        self.checkpoint_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.checkpoint_combo.setMinimumContentsLength(16)
        self.checkpoint_combo.setToolTip("a checkpoint file, or a starter shipped with the plugin")
        browse = QPushButton("Browse…", self)
        browse.clicked.connect(self._browse)
        ckpt_row = QHBoxLayout()
        ckpt_row.addWidget(self.checkpoint_combo, 1)
        ckpt_row.addWidget(browse)
        self.level_spin = QSpinBox(self)
        self.level_info = QLabel("", self)
        level_row = QHBoxLayout()
        level_row.addWidget(self.level_spin)
        level_row.addWidget(self.level_info, 1)
        self.region_combo = QComboBox(self)
        self.region_combo.addItems(REGIONS)
        self.box_combo = LayerCombo(self.viewer, napari.layers.Shapes, self, allow_none=True)
        self.box_combo.setToolTip("the Shapes layer whose last rectangle is the region")
        self.patches_combo = QComboBox(self)
        self.patches_combo.addItems(list(PATCH_RULES))
        self.patches_combo.setToolTip("GRNet: which patches of each window the R-branch refines")
        self.window_spin = QSpinBox(self)
        self.window_spin.setRange(64, 16384)
        self.window_spin.setValue(DEFAULT_WINDOW)
        self.window_spin.setSuffix(" px")
        self.device_label = QLabel(self._describe_device(), self)
        self.segment_button = QPushButton("Segment", self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.progress = QueuedProgressBar(self)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)

        form = QFormLayout(self)
        form.addRow("Image", self.image_combo)
        form.addRow("Method", self.method_combo)
        form.addRow("Checkpoint", ckpt_row)
        form.addRow("Working level", level_row)
        form.addRow("Region", self.region_combo)
        form.addRow("Box layer", self.box_combo)
        form.addRow("Refine patches", self.patches_combo)
        form.addRow("Window", self.window_spin)
        form.addRow("Device", self.device_label)
        buttons = QHBoxLayout()
        buttons.addWidget(self.segment_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.status)

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.method_combo.currentTextChanged.connect(self._on_method_changed)
        self.level_spin.valueChanged.connect(self._show_level)
        self.checkpoint_combo.currentIndexChanged.connect(self._window_from_checkpoint)
        self.segment_button.clicked.connect(lambda: self.segment())
        self.cancel_button.clicked.connect(self.cancel)

    def _describe_device(self) -> str:
        from napari_uhrseg.device import select_device

        try:
            return select_device(self.state.device, leave_for_ui=1).describe()
        except (RuntimeError, ValueError) as exc:
            return f"unavailable: {exc}"

    # ------------------------------------------------------------------------------------------ choices
    def _on_image_changed(self, *_) -> None:
        layer = self.image_combo.layer()
        self._pyramid = None
        if layer is None:
            self.level_spin.setRange(0, 0)
            self.level_info.setText("no image layer")
            return
        try:
            self._pyramid = _layers.pyramid_for_layer(layer)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the dock stays usable
            self.level_info.setText(f"cannot read: {exc}")
            return
        self.level_spin.setRange(0, len(self._pyramid.levels) - 1)
        self._show_level()

    def _show_level(self, *_) -> None:
        if self._pyramid is not None:
            h, w = self._pyramid.level_shape(self.level_spin.value())
            self.level_info.setText(f"{w} x {h} px")

    def _on_method_changed(self, *_) -> None:
        from napari_uhrseg.checkpoints import CheckpointManager

        self.patches_combo.setEnabled(self.method_combo.currentText() == "grnet")
        self.checkpoint_combo.clear()
        try:
            infos = [i for i in CheckpointManager().list(method=self.method_combo.currentText()) if i.ok]
        except Exception:  # noqa: BLE001 - an unreadable folder must not break the dock
            infos = []
        for info in infos:
            self.checkpoint_combo.addItem(info.describe(), str(info.path))
        if self.state.checkpoint and self.state.method == self.method_combo.currentText():
            self.set_checkpoint(self.state.checkpoint)

    def _follow_state(self, *_) -> None:
        """Show the shared method and checkpoint (the one just trained, or loaded in the Checkpoints dock)."""
        method = self.state.method
        if method and self.method_combo.findText(method) >= 0 and method != self.method_combo.currentText():
            self.method_combo.setCurrentText(method)  # lists that method's checkpoints, the shared one chosen
        elif self.state.checkpoint and method == self.method_combo.currentText():
            self.set_checkpoint(self.state.checkpoint)

    def _window_from_checkpoint(self, *_) -> None:
        """Segment with the window the checkpoint was made for (GRNet records it as ``window``), when it says."""
        from napari_uhrseg.cli.segment import starter_checkpoint
        from napari_uhrseg.methods.base import read_checkpoint_meta

        try:
            path = self.checkpoint_path() or starter_checkpoint(self.method_combo.currentText())
            window = read_checkpoint_meta(path).get("window") if path else None
        except Exception:  # noqa: BLE001 - a bad checkpoint is reported when Segment is pressed
            return
        if window:
            self.window_spin.setValue(int(window))

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.set_checkpoint(path)

    def set_checkpoint(self, path: str) -> None:
        idx = self.checkpoint_combo.findData(str(path))
        if idx < 0:
            self.checkpoint_combo.addItem(str(path), str(path))
            idx = self.checkpoint_combo.count() - 1
        self.checkpoint_combo.setCurrentIndex(idx)

    def checkpoint_path(self) -> str | None:
        """The chosen checkpoint: the item's file, or the text typed in; None = the method's starter."""
        data = self.checkpoint_combo.currentData()
        text = self.checkpoint_combo.currentText().strip()
        if data and text == self.checkpoint_combo.itemText(self.checkpoint_combo.currentIndex()):
            return str(data)
        return text or None

    def region_level0(self, image_layer):
        """The region of the run in level-0 pixels, or None for the whole image."""
        choice = self.region_combo.currentText()
        if choice == "Current view":
            return _layers.view_box_level0(image_layer)
        if choice == "Drawn box":
            return _layers.drawn_box_level0(self.box_combo.layer(), image_layer)
        return None

    # ------------------------------------------------------------------------------------------ running
    def segment(self, *, sync: bool | None = None):
        """Start a run with the dock's choices; returns the worker (or the result when synchronous)."""
        image_layer = self.image_combo.layer()
        if image_layer is None or self._pyramid is None:
            notify_error(ValueError("choose an image layer first"), "Segment")
            return None
        try:
            params = dict(
                pyramid=self._pyramid, level=self.level_spin.value(), window=self.window_spin.value(),
                overlap=min(DEFAULT_OVERLAP, self.window_spin.value() // 4), region=self.region_level0(image_layer),
                method=self.method_combo.currentText(), checkpoint=self.checkpoint_path(),
                device=self.state.device, patches=PATCH_RULES[self.patches_combo.currentText()],
            )
        except Exception as exc:  # noqa: BLE001
            self._on_error(exc)
            return None
        self._image_layer, self._labels_layer, self._records, self.result = image_layer, None, [], None
        # overlay records not drawn yet, and when patches last were (the first ones PATCHES_REFRESH_S into the run)
        self._unshown, self._shown_at = [], time.perf_counter()
        self._pending = []
        self._level_downsample = float(self._pyramid.downsamples[params["level"]])
        self._cancel = threading.Event()
        self._set_running(True)
        self.state.image_layer = image_layer
        gen = self._job(params)
        if sync if sync is not None else _sync_requested():
            return self._run_here(gen)
        from napari.qt.threading import create_worker

        # GUI work a run needs, done here rather than while the worker runs, where it stalled the viewer (the
        # first window's new layers: ~0.5 s of layer, control-panel and vispy set-up); and full garbage
        # collections, which hold the GIL for a walk over napari's objects, are held off until the run ends.
        self._placeholders = _prepare_output_layers(self.viewer, image_layer, params["method"],
                                                    _class_names_of(params["method"], params["checkpoint"]),
                                                    geometry=self._store_geometry(image_layer, params))
        freeze_long_lived_objects()
        hold_full_collections(True)
        self._holding_gc = True

        def work():
            return (yield from gen)

        self._worker = create_worker(work, _start_thread=False)
        self._worker.yielded.connect(self._on_event)
        self._worker.returned.connect(self._on_done)
        self._worker.errored.connect(self._on_error)
        # Started on the next turn of the event loop, once the output layers made above have been drawn (their
        # first draw is the press's GUI work, not a stall of the run; tests/test_heartbeat.py measures the run).
        QTimer.singleShot(0, self._worker.start)
        return self._worker

    def _store_geometry(self, image_layer, p):
        """(scale, translate) of the label store a run will fill, as ``iter_segment`` places it: the placeholder
        gets them now, so that the first window only swaps the data in (one change of the layer's extent)."""
        from napari_uhrseg.engine.segment import downsample_pair, region_at_level

        try:
            level_shape = tuple(int(v) for v in self._pyramid.level_shape(p["level"]))
            downsample = downsample_pair(self._pyramid.downsamples[p["level"]])
            box = region_at_level(p["region"], downsample, level_shape)
        except Exception:  # noqa: BLE001 - the run itself reports a bad level or region
            return None
        whole = (box[2] - box[0], box[3] - box[1]) == level_shape
        return _layers.labels_geometry(image_layer, downsample, (0, 0) if whole else box[:2])

    def _run_here(self, gen):
        try:
            while True:
                try:
                    self._on_event(next(gen))
                except StopIteration as stop:
                    self._on_done(stop.value)
                    return stop.value
        except Exception as exc:  # noqa: BLE001 - reported like the worker's errors
            self._on_error(exc)
            return None

    def _job(self, p):
        """The work (any thread): load the method, then the engine's generator; yields events."""
        from napari_uhrseg.cli.segment import build_method
        from napari_uhrseg.device import select_device
        from napari_uhrseg.engine.segment import iter_segment

        device = select_device(p["device"], leave_for_ui=1).device
        method = build_method(p["method"], p["checkpoint"], device)
        if p["method"] == "grnet" and p.get("patches"):
            from napari_uhrseg.cli.segment import set_mode, set_selection

            rule = dict(p["patches"])
            if "top_k" in rule:  # a 2 x 2 grid has 4 patches only
                rule["top_k"] = min(rule["top_k"], method.settings.grid ** 2)
            set_mode(method, rule.pop("mode", "ppn"))
            set_selection(method, **rule)
        self._method = method
        result = yield from iter_segment(p["pyramid"], method, level=p["level"], window=p["window"],
                                         overlap=p["overlap"], region=p["region"], cancel=self._cancel)
        return result

    def cancel(self) -> None:
        """Stop after the current window; finished windows stay."""
        self._cancel.set()
        self.status.setText("Cancelling after this window…")

    # ------------------------------------------------------------------------------------------ results
    def _on_event(self, ev) -> None:
        """A finished window. From a worker, windows that arrive together (the GUI thread was busy) are shown
        together on the next turn of the event loop, so the viewer updates once for all of them and the loop runs
        in between; synchronous runs show each at once."""
        if self._worker is None:
            self._show_window(ev)
            return
        self._pending.append(ev)
        if len(self._pending) == 1:
            self._later(self._show_pending)

    def _later(self, job) -> None:
        """Run ``job`` (GUI work of a run) on a later turn of the event loop, one job per turn: whatever else is
        due (a redraw, the user's input, other timers) runs between two of them. Each job is one timer shot of
        1 ms; a 0 ms single shot would be a posted event, run in the same batch as the worker's queued windows."""
        self._gui_jobs.append(job)
        if len(self._gui_jobs) == 1:
            QTimer.singleShot(1, self._run_gui_job)

    def _run_gui_job(self) -> None:
        if self._gui_jobs:
            self._gui_jobs.pop(0)()
        if self._gui_jobs:
            QTimer.singleShot(1, self._run_gui_job)

    def _show_pending(self) -> None:
        pending, self._pending = self._pending, []
        for i, ev in enumerate(pending):
            self._show_window(ev, refresh=i == len(pending) - 1)

    def _show_window(self, ev, *, refresh: bool = True) -> None:
        if self._labels_layer is None:
            names = list(getattr(self._method, "class_names", []) or [])
            self._labels_layer = _layers.add_or_update_labels(self.viewer, self._image_layer, ev, class_names=names)
            self._labels_layer.metadata.pop("uhrseg_placeholder", None)  # filled: the run's output now
            self.state.labels_layer = self._labels_layer
            self.progress.setRange(0, ev.total)
        elif refresh:
            self._labels_layer.refresh()
        if np.ndim((ev.artefacts or {}).get("uncertainty")) == 2:  # MagNet: the heat map grows window by window
            from napari_uhrseg.widgets import uncertainty

            uncertainty.on_window_event(self.viewer, self._image_layer, ev, self._level_downsample)
        if ev.overlays:
            self._records.extend(ev.overlays)
            self._unshown.extend(ev.overlays)
        if refresh and self._unshown and (ev.index + 1 >= ev.total
                                          or time.perf_counter() - self._shown_at >= PATCHES_REFRESH_S):
            if self._worker is None:
                self._show_patches()
            elif not self._patches_due:  # on a turn of its own: the event loop runs between the two updates
                self._patches_due = True
                self._later(self._show_patches)
        self.progress.setValue(ev.index + 1)
        self.status.setText(f"window {ev.index + 1}/{ev.total}: {ev.seconds['total_s']:.2f} s")

    def _show_patches(self) -> None:
        """Add the patches not drawn yet to ``"<image> PPN patches"`` (see ``PATCHES_REFRESH_S``). From a worker,
        ``PATCHES_PER_TURN`` at a time, the rest on later turns of the event loop; synchronous runs add all."""
        self._patches_due = False
        if not self._unshown or self._image_layer is None:
            return
        chunk = len(self._unshown) if self._worker is None else PATCHES_PER_TURN
        batch, rest = self._unshown[:chunk], self._unshown[chunk:]
        drawn = len(self._records) - len(self._unshown)  # records[:drawn] are on the layer already
        shown = self._records[:drawn + len(batch)]
        patches = _layers.add_or_update_patches(self.viewer, self._image_layer, shown,
                                                new=None if drawn == 0 else list(batch))
        patches.metadata.pop("uhrseg_placeholder", None)
        self._unshown, self._shown_at = rest, time.perf_counter()
        if rest:
            self._patches_due = True
            self._later(self._show_patches)

    def _on_done(self, result) -> None:
        # From a worker, what is left to show goes one piece per event-loop turn (windows not shown yet, then the
        # patches, then the patch layer's thumbnail), so the end of a run is no longer one long wait of the viewer.
        steps = []
        if self._pending:
            steps.append(self._show_pending)
        if self._unshown and self._image_layer is not None and not self._patches_due:
            self._patches_due = True
            steps.append(self._show_patches)
        self._thumbnail_due = True
        if self._worker is None:  # synchronous run: all at once
            for step in steps:
                step()
            self._finish(result)
            return
        for step in steps:
            self._later(step)
        self._later(lambda: self._finish(result))

    def _finish(self, result) -> None:
        if self._worker is not None and (self._pending or self._patches_due):
            self._later(lambda: self._finish(result))  # after the windows and patches still being shown
            return
        if self._thumbnail_due:
            self._refresh_patch_thumbnail()
            if self._worker is not None:  # the thumbnail on a turn of its own
                self._later(lambda: self._finish(result))
                return
        self.result = result
        self._set_running(False)
        if self._labels_layer is not None:
            self._labels_layer.refresh()
        self.state.method = result.method
        self.state.checkpoint = self.checkpoint_path()
        word = "Cancelled" if result.cancelled else "Done"
        selected = sum(1 for r in result.overlays if r.get("selected"))
        self.status.setText(
            f"{word}: {result.windows_done}/{result.windows_total} windows in {result.timings['total_s']:.1f} s "
            f"on {result.device}; {selected} of {len(result.overlays)} patches refined."
        )
        self.finished.emit(result)

    def _refresh_patch_thumbnail(self) -> None:
        self._thumbnail_due = False
        patches = _layers.patches_name(self._image_layer) if self._image_layer is not None else None
        if patches in self.viewer.layers:
            self.viewer.layers[patches].refresh()  # its thumbnail was not redrawn window by window

    def _on_error(self, exc) -> None:
        if self._pending:  # the windows finished before the error stay
            self._show_pending()
        self._set_running(False)
        self.status.setText(f"Failed: {exc}")
        notify_error(exc, "Segment")
        self.finished.emit(exc)

    def _drop_unused_placeholders(self) -> None:
        """Remove the layers made for a run that failed or stopped before its first window."""
        for layer in getattr(self, "_placeholders", []):
            if layer in self.viewer.layers and layer.metadata.get("uhrseg_placeholder"):
                self.viewer.layers.remove(layer)
        self._placeholders = []

    def _set_running(self, running: bool) -> None:
        self.segment_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setRange(0, 0)
            self.status.setText("Loading the method…")
        else:
            self._worker = None
            if getattr(self, "_holding_gc", False):
                hold_full_collections(False)
                self._holding_gc = False
            self._drop_unused_placeholders()


def _class_names_of(method: str, checkpoint: str | None) -> list[str] | None:
    """The class names a run will show (the checkpoint's, or the method's starter's), read without the weights;
    None when unknown (the first window's result then names them)."""
    from napari_uhrseg.cli.segment import starter_checkpoint
    from napari_uhrseg.methods.base import read_checkpoint_meta

    try:
        path = checkpoint or starter_checkpoint(method)
        return [str(n) for n in read_checkpoint_meta(path)["class_names"]] if path else None
    except Exception:  # noqa: BLE001 - the worker reports a bad checkpoint
        return None


def _prepare_output_layers(viewer, image_layer, method: str, class_names=None, geometry=None) -> list:
    """Empty output layers of a run on ``image_layer``, made before it starts (GUI thread): ``"<image> labels"``
    (a 1 x 1 placeholder the first window replaces, with the run's class colours already, so that napari builds
    its colour shader now and not mid-run; a layer of an earlier run is reused as it is) and, for GRNet,
    ``"<image> PPN patches"``. Returns the layers made (placeholders until the first window fills them)."""
    from napari_uhrseg.widgets.state import write_classes

    made = []
    if not any(lay.metadata.get("uhrseg_segment") == image_layer.name for lay in viewer.layers):
        scale, translate = geometry if geometry is not None else _layers.image_geometry(image_layer)
        layer = viewer.add_labels(np.zeros((1, 1), np.uint8), name=f"{image_layer.name} labels", scale=scale,
                                  translate=translate, opacity=_layers.LABELS_OPACITY)
        layer.metadata.update({"uhrseg_segment": image_layer.name, "uhrseg_placeholder": True})
        if class_names:
            write_classes(layer, class_names)
        made.append(layer)
    if method == "grnet" and _layers.patches_name(image_layer) not in viewer.layers:
        layer = _layers.new_patches_layer(viewer, image_layer)
        layer.metadata["uhrseg_placeholder"] = True
        made.append(layer)
    return made
