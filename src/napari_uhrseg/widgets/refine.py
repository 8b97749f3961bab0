"""Refine dock: brush a ragged border and press Refine; or click on objects to segment them (click mode).

Thin on purpose: it only finds the layers, turns clicks into level-0 points, runs
``engine.refine.refine_region`` / ``engine.click.click_segment`` in a ``thread_worker`` and writes the returned
``RefineEdit`` into the labels layer with ``Labels.data_setitem`` inside ``block_history()`` — one undo step.

Keyboard shortcuts (bound on the viewer while the dock exists; none of them is a napari default, see
``SHORTCUTS``): ``K`` toggles click mode, ``Shift+B`` selects the refine brush layer in paint mode (adding it
if needed), ``Shift+R`` runs Refine, ``Escape`` leaves click mode.
"""
from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox, QComboBox, QFormLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)  # fmt: skip

from napari_uhrseg.errors import UhrsegError

BRUSH_NAME = "refine brush"
NO_PREDICTION = "image colours (no prediction)"

#: The dock's keys → what they do (docs/user-guide.md lists them; tests check napari binds none of them).
SHORTCUTS = {
    "K": "toggle click mode",
    "Shift+B": "refine brush: select the brush layer in paint mode (added if missing)",
    "Shift+R": "Refine the brushed area",
    "Escape": "leave click mode",
}


class RefineWidget(QWidget):
    """Refine / click-to-segment dock. ``synchronous`` (tests) runs jobs on the calling thread."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.synchronous = False
        self.refiner = None  # loaded on first use (the shipped fast CascadePSP)
        self.last_edit = None
        self._busy = False
        self._click_on = False
        self._escape_grab = None  # (layer, its own Escape binding or None) while click mode holds Escape there

        self.image_combo, self.labels_combo, self.prediction_combo = QComboBox(), QComboBox(), QComboBox()
        self.prediction_combo.setToolTip("Labels whose region under a click seeds click-to-segment (e.g. the Segment "
                                         "dock's output); without one, the seed is grown from the image colours")
        self._prediction_picked = False  # set when the user chooses in the combo (not by our refreshes)
        self.prediction_combo.activated.connect(lambda *_: setattr(self, "_prediction_picked", True))
        self.fast_check = QCheckBox("fast mode (global step only)")
        self.L_spin = QSpinBox(minimum=64, maximum=4096, value=900)
        self.level_spin = QSpinBox(minimum=0, maximum=20, value=0)
        self.brush_button = QPushButton("Refine brush (Shift+B)")
        self.refine_button = QPushButton("Refine (Shift+R)")
        self.click_button = QPushButton("Click mode (K)", checkable=True)
        self.brush_button.setToolTip("Select the refine brush layer in paint mode (added if missing)")
        self.refine_button.setToolTip("CascadePSP refines the labels inside the brushed area only")
        self.click_button.setToolTip("A click segments the object under it; Shift-click removes; K or Esc leaves")
        self.status = QLabel("Brush over a border (Shift+B), then Refine (Shift+R). Click mode (K): click adds, "
                             "Shift-click removes, K or Esc leaves.")
        self.status.setWordWrap(True)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("labels", self.labels_combo)
        form.addRow("click seeds from", self.prediction_combo)
        form.addRow("L (global step px)", self.L_spin)
        form.addRow("working level", self.level_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        for w in (self.fast_check, self.brush_button, self.refine_button, self.click_button, self.status):
            layout.addWidget(w)
        layout.addStretch(1)

        self.brush_button.clicked.connect(self.activate_brush)
        self.refine_button.clicked.connect(self.refine)
        self.click_button.toggled.connect(self.set_click_mode)
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._bind_keys()
        self._refresh_layers()

    # ------------------------------------------------------------------------------------- keys
    def _bind_keys(self):
        """Bind ``SHORTCUTS`` on the viewer (active whatever layer is selected); unbound when the dock goes."""
        actions = {"K": self.toggle_click_mode, "Shift+B": self.activate_brush, "Shift+R": self.refine,
                   "Escape": self._escape}
        viewer = self.viewer

        def on_key(action):
            def pressed(_viewer):
                action()  # nothing returned: napari treats a returned generator as a press/release pair

            return pressed

        for key, action in actions.items():
            viewer.bind_key(key, on_key(action), overwrite=True)

        def unbind(*_):
            from napari.utils.key_bindings import coerce_keybinding

            for key in actions:
                viewer.keymap.pop(coerce_keybinding(key), None)
            viewer.layers.selection.events.active.disconnect(self._grab_escape)
            self._click_on = False
            self._grab_escape()  # gives a grabbed Escape back

        self.destroyed.connect(unbind)
        viewer.layers.selection.events.active.connect(self._grab_escape)

    def _grab_escape(self, *_):
        """napari gives the selected layer's keys precedence over the viewer's, and Labels and Shapes layers bind
        Escape themselves (polygon reset, end of drawing: no-ops in the pan/zoom mode click mode puts them in).
        So while click mode is on, Escape is bound on the selected layer too, and given back when it goes off."""
        from napari.utils.key_bindings import coerce_keybinding

        key = coerce_keybinding("Escape")
        if self._escape_grab is not None:
            layer, previous = self._escape_grab
            self._escape_grab = None
            if previous is None:
                layer.keymap.pop(key, None)
            else:
                layer.keymap[key] = previous
        layer = self.viewer.layers.selection.active
        if self._click_on and layer is not None:
            self._escape_grab = (layer, layer.keymap.get(key))
            layer.bind_key("Escape", lambda _layer: self._escape(), overwrite=True)

    # ------------------------------------------------------------------------------------- layers
    def _refresh_layers(self, *_):
        from napari.layers import Image, Labels

        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentText()
            combo.clear()
            combo.addItems([l.name for l in self.viewer.layers if isinstance(l, kind) and l.name != BRUSH_NAME])
            if current:
                combo.setCurrentText(current)
        current = self.prediction_combo.currentText()
        labels = [l.name for l in self.viewer.layers if isinstance(l, Labels) and l.name != BRUSH_NAME]
        self.prediction_combo.clear()
        self.prediction_combo.addItems([NO_PREDICTION, *labels])
        segmented = f"{self.image_combo.currentText()} labels"  # the Segment dock's output for this image
        # The Segment output becomes the default when it appears, unless the user picked something themselves.
        if segmented in labels and not self._prediction_picked:
            self.prediction_combo.setCurrentText(segmented)
        elif current in labels or current == NO_PREDICTION:
            self.prediction_combo.setCurrentText(current)

    def _layer(self, combo):
        name = combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _prediction(self, labels_data, image=None):
        """(the chosen prediction layer's data, "") when it shares the labels' frame, else (None, why not)."""
        name = self.prediction_combo.currentText()
        if name == NO_PREDICTION or name not in self.viewer.layers:
            return None, ""
        layer = self.viewer.layers[name]
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        if image is not None and not getattr(layer, "multiscale", False):
            try:
                data = self._in_frame(data, layer, image)
            except UhrsegError as exc:
                return None, f"{name!r}: {exc} Seeding from the image colours. "
        if tuple(data.shape[-2:]) != tuple(labels_data.shape[-2:]):
            return None, (f"{name!r} ({data.shape[-2]} x {data.shape[-1]} px) is not the size of the labels "
                          f"({labels_data.shape[-2]} x {labels_data.shape[-1]}): seeding from the image colours. ")
        return data, ""

    def _image_data(self, layer):
        """Level 0 of the image layer (a list of levels for multiscale layers)."""
        return layer.data[0] if layer.multiscale else layer.data

    @staticmethod
    def _in_frame(data, layer, image):
        """``data`` of a labels-like ``layer`` as the engine takes it (see ``_layers.labels_in_frame``)."""
        from napari_uhrseg.widgets._layers import labels_in_frame

        return labels_in_frame(data, layer, image)

    def add_brush_layer(self):
        labels = self._layer(self.labels_combo)
        if labels is None:
            return self._say("Choose a labels layer first.")
        if BRUSH_NAME not in self.viewer.layers:
            brush = self.viewer.add_labels(np.zeros(labels.data.shape, np.uint8), name=BRUSH_NAME,
                                           scale=labels.scale, translate=labels.translate, opacity=0.4)  # fmt: skip
            brush.mode = "paint"
            brush.brush_size = 20
            from napari_uhrseg.widgets._layers import same_units

            same_units(brush, labels)
        return self.viewer.layers[BRUSH_NAME]

    def activate_brush(self):
        """The refine brush, ready to paint: added if missing, selected, in paint mode; click mode off."""
        brush = self.add_brush_layer()
        if brush is None:
            return None
        self.set_click_mode(False)
        self.viewer.layers.selection.active = brush
        brush.selected_label = 1
        brush.mode = "paint"
        self._say("Brush over the ragged border, then Refine (Shift+R).")
        return brush

    # ------------------------------------------------------------------------------------- jobs
    def _say(self, text: str):
        self.status.setText(text)

    def _run(self, job, done):
        """Run ``job()`` off the GUI thread; ``done(result)`` applies it. Errors become the status line."""
        from napari_uhrseg.errors import UhrsegError

        def failed(exc):
            self._busy = False
            self._say(str(exc) if isinstance(exc, UhrsegError) else f"{type(exc).__name__}: {exc}")

        def finished(result):
            self._busy = False
            done(result)

        if self._busy:
            return self._say("Still working on the previous edit…")
        self._busy = True
        if self.synchronous:
            try:
                result = job()
            except Exception as exc:  # noqa: BLE001 — shown to the user, labels untouched
                return failed(exc)
            return finished(result)
        from napari.qt.threading import thread_worker

        worker = thread_worker(job)()
        worker.returned.connect(finished)
        worker.errored.connect(failed)
        worker.start()
        return worker

    def _refiner(self):
        """The shared refiner checkpoint (a CascadePSP fine-tuned in the Train dock), else the shipped one."""
        from napari_uhrseg.widgets.state import get_state

        wanted = get_state(self.viewer).refiner_checkpoint
        if self.refiner is None or getattr(self, "_refiner_path", None) != wanted:
            if wanted:
                from napari_uhrseg.methods.cascadepsp import CascadePSP

                self.refiner = CascadePSP.from_checkpoint(wanted)
            else:
                from napari_uhrseg.engine.refine import default_refiner

                self.refiner = default_refiner("cpu")
            self._refiner_path = wanted
        return self.refiner

    def apply_edit(self, labels_layer, edit, frame=None):
        """Write a ``RefineEdit`` into the layer as one undo step (``frame``: the ``FramedLabels`` the edit was
        made on, for a layer that covers a region: the edit is cut to the layer's own pixels)."""
        from napari_uhrseg.engine.refine import FramedLabels

        if isinstance(frame, FramedLabels):
            local = frame.local(edit)
            if local is None:
                return self._say("The edit fell outside the segmented region of the labels: nothing changed.")
            edit = local
        self.last_edit = edit
        y0, x0, _, _ = edit.box
        rows, cols = np.nonzero(edit.after != edit.before)
        if rows.size:
            with labels_layer.block_history():
                labels_layer.data_setitem((rows + y0, cols + x0), edit.after[rows, cols])
        note = f" {edit.note}" if edit.note else ""
        self._say(f"Changed {edit.changed} px in {edit.seconds:.2f} s (Ctrl+Z undoes).{note}")

    def refine(self):
        from napari_uhrseg.engine.refine import refine_region

        image, labels = self._layer(self.image_combo), self._layer(self.labels_combo)
        brush = self.viewer.layers[BRUSH_NAME] if BRUSH_NAME in self.viewer.layers else None
        if image is None or labels is None or brush is None:
            return self._say("Choose an image and a labels layer, add the refine brush and paint over the border.")
        if labels.multiscale:
            return self._say("Multiscale labels cannot be edited in napari: use a single-scale labels layer.")
        data = self._image_data(image)
        try:
            lab, region = self._in_frame(labels.data, labels, image), self._in_frame(brush.data, brush, image)
        except UhrsegError as exc:
            return self._say(str(exc))
        fast, L, level = self.fast_check.isChecked(), self.L_spin.value(), self.level_spin.value()

        def job():
            return refine_region(data, lab, region, level=level, fast=fast, L=L, refiner=self._refiner())

        def done(edit):
            self.apply_edit(labels, edit, lab)
            brush.data = np.zeros_like(brush.data)

        self._say("Refining…")
        return self._run(job, done)

    # ------------------------------------------------------------------------------------- click mode
    def set_click_mode(self, on: bool):
        image = self._layer(self.image_combo)
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
            self._stop_painting()
            self._say("Click mode: click adds, Shift-click removes, K or Esc leaves.")
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)
            self._say("Click mode off.")
        self._click_on = on
        self._grab_escape()
        if self.click_button.isChecked() != on:
            self.click_button.setChecked(on)
        return image

    def toggle_click_mode(self):
        self.set_click_mode(not self._click_on)

    def _stop_painting(self):
        """In click mode a click must not also paint: a Labels layer that is selected leaves its drawing mode."""
        from napari.layers import Labels

        layer = self.viewer.layers.selection.active
        if isinstance(layer, Labels) and str(layer.mode) not in ("pan_zoom", "transform"):
            layer.mode = "pan_zoom"

    def _escape(self, viewer=None):
        self.set_click_mode(False)

    def _on_click(self, viewer, event):
        # A press that is followed by moves is a pan, not a click.
        yield
        moved = False
        while event.type == "mouse_move":
            moved = True
            yield
        if not moved:
            self.click_at(event.position, remove="Shift" in event.modifiers)

    def click_at(self, world_position, *, remove: bool = False):
        """Segment the object at a world position (napari coordinates) of the image layer."""
        from napari_uhrseg.engine.click import click_segment

        image, labels = self._layer(self.image_combo), self._layer(self.labels_combo)
        if image is None or labels is None:
            return self._say("Choose an image and a labels layer for click mode.")
        # Level-0 pixel coordinates of the click: the image layer's data coordinates (level 0 for multiscale).
        point = np.asarray(image.world_to_data(world_position))[-2:]
        data, label_id = self._image_data(image), int(labels.selected_label)
        try:
            lab = self._in_frame(labels.data, labels, image)
        except UhrsegError as exc:
            return self._say(str(exc))
        level = self.level_spin.value()
        prediction, note = self._prediction(lab, image)

        def job():
            return click_segment(data, lab, point, label_id=label_id, remove=remove, level=level,
                                 prediction=prediction, refiner=self._refiner())  # fmt: skip

        self._say(f"{note}Segmenting…")
        return self._run(job, lambda edit: self.apply_edit(labels, edit, lab))
