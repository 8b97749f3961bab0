"""Train dock: learn from strokes painted on Labels layers (0 = unlabelled), live.

The dock gathers (image, labels) pairs, class names, the method and a few numbers, then drives
``napari_uhrseg.engine.scribbles`` in a worker thread: one ``TrainEvent`` per step feeds the progress bar and
the loss / validation-mIoU curves; the best checkpoint goes to the user checkpoint folder (validation mIoU
decides, ``engine.train.run_training`` writes it); Stop ends after the current step and keeps it; Resume goes on
from the ``.last.pt`` state. With "Live update", the end of the round (and validations on the way, while the
previews take at most ``LIVE_SHARE`` of the time) is followed — in the same worker, so the model is never used by
two threads — by a segmentation of the part of the image on screen, shown as ``"<image> live prediction"``.
"""
from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_uhrseg.engine.scribbles import TrainingSettings
from napari_uhrseg.widgets._common import (
    LayerCombo,
    freeze_long_lived_objects,
    hold_full_collections,
    level0_data,
    notify_error,
    warm_up_torch,
)
from napari_uhrseg.widgets._curves import CurvesWidget
from napari_uhrseg.widgets.autosave import autosave_for
from napari_uhrseg.widgets.state import get_state, read_classes, write_classes

LIVE_MAX_SIDE = 2048  # level pixels: the live preview segments at most this much of the view, around its centre
LIVE_METHODS = ("grnet", "magnet", "magnet-fast")  # segmenters; CascadePSP only refines a mask: no live preview
LIVE_SHARE = 0.25  # previews during a round take at most this share of its time (the final one always runs)


class TrainWidget(QWidget):
    """Train a method on painted strokes. ``finished`` is emitted with the checkpoint path, or the exception."""

    finished = Signal(object)
    live_updated = Signal(object)  # the preview Labels layer, after each live re-segmentation
    stepped = Signal(object)  # each TrainEvent, once the dock has shown it

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.autosave = autosave_for(napari_viewer)
        self.pairs: list[tuple] = []  # (image layer, labels layer) added with "Add pair"
        self._worker = None
        self._stop = threading.Event()
        self._pbar = None
        self._last_out: Path | None = None
        self._live_box = None
        self._checkpoints = None  # a CheckpointManager, made when 'Start from' is first filled
        self._build()
        self.state.events.image_layer.connect(self.image_combo.set_layer)
        # a checkpoint just trained (or loaded in the Checkpoints dock) is offered as the next run's start
        self.state.events.checkpoint.connect(self._offer_shared_checkpoint)
        self.state.events.refiner_checkpoint.connect(self._offer_shared_checkpoint)
        self.state.events.labels_layer.connect(self.labels_combo.set_layer)
        self.image_combo.set_layer(self.state.image_layer)
        self.labels_combo.set_layer(self.state.labels_layer)
        # a choice here is the tool's choice (autosave follows the state's labels layer)
        self.image_combo.currentIndexChanged.connect(self._share_choice)
        self.labels_combo.currentIndexChanged.connect(self._share_choice)
        self.viewer.camera.events.center.connect(self._remember_view)
        self.viewer.camera.events.zoom.connect(self._remember_view)
        self._fill_init_choices()
        self._set_running(False)
        # Paid here, on opening the dock, rather than first in the worker, where both hold the GIL long enough to
        # freeze the viewer mid-run: importing dask and the pyramid code, and torch's one-time initialisation.
        import napari_uhrseg.io.pyramid  # noqa: F401

        warm_up_torch()

    def _share_choice(self, *_) -> None:
        self.state.image_layer = self.image_combo.layer()
        self.state.labels_layer = self.labels_combo.layer()

    # ------------------------------------------------------------------------------------------ layout
    def _build(self) -> None:
        self.image_combo = LayerCombo(self.viewer, napari.layers.Image, self)
        self.labels_combo = LayerCombo(self.viewer, napari.layers.Labels, self)
        self.labels_combo.currentIndexChanged.connect(self._classes_from_layer_if_empty)
        self.pairs_list = QListWidget(self)
        self.pairs_list.setMaximumHeight(70)
        add, remove = QPushButton("Add pair", self), QPushButton("Remove", self)
        add.clicked.connect(self.add_current_pair)
        remove.clicked.connect(self._remove_pair)
        pair_row = QHBoxLayout()
        pair_row.addWidget(add)
        pair_row.addWidget(remove)

        self.classes_edit = QLineEdit(self)
        self.classes_edit.setToolTip("Names of label values 0, 1, 2, … comma separated (0 = unlabelled)")
        from_layer = QPushButton("From layer", self)
        from_layer.clicked.connect(self.classes_from_layer)
        classes_row = QHBoxLayout()
        classes_row.addWidget(self.classes_edit)
        classes_row.addWidget(from_layer)

        self.method_combo = QComboBox(self)
        for name in _trainable():
            self.method_combo.addItem(name)
            self.method_combo.setItemData(self.method_combo.count() - 1, _description(name), Qt.ToolTipRole)
        self.init_combo = QComboBox(self)
        self.init_combo.setEditable(True)
        self.init_combo.setToolTip("the checkpoint training starts from (MagNet: a GRNet or MagNet checkpoint giving "
                                   "the backbone; CascadePSP: the refiner to fine-tune, empty = the shipped one)")
        init_browse = QPushButton("Browse…", self)
        init_browse.clicked.connect(self._browse_init)
        init_row = QHBoxLayout()
        init_row.addWidget(self.init_combo, 1)
        init_row.addWidget(init_browse)
        self.method_combo.currentTextChanged.connect(self._fill_init_choices)
        self.iterations = _spin(QSpinBox(self), 1, 100000, TrainingSettings().iterations)
        self.lr = _spin(QDoubleSpinBox(self), 0.0, 1.0, 0.0, decimals=6, step=1e-4)
        self.lr.setSpecialValueText("default")
        self.lr.setToolTip("learning rate; default: 3e-4 for GRNet with frozen backbones, else the preset's")
        self.crop = _spin(QSpinBox(self), 64, 4096, 512, step=64)
        self.val_share = _spin(QDoubleSpinBox(self), 0.0, 0.9, 0.15, decimals=2, step=0.05)
        self.frozen = QCheckBox("Frozen backbone (fast on CPU)", self)
        self.frozen.setChecked(True)
        self.live = QCheckBox("Live update of the view", self)
        self.live.setChecked(True)
        self._live_on = True  # read by the worker thread, which must not call Qt
        self.live.toggled.connect(lambda on: setattr(self, "_live_on", bool(on)))

        self.start_button = QPushButton("Start", self)
        self.stop_button = QPushButton("Stop", self)
        self.resume_button = QPushButton("Resume", self)
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(b)

        self.curves = CurvesWidget(self)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.device_label = QLabel(f"Device: {self.state.device}", self)
        self.state.events.device.connect(lambda d: self.device_label.setText(f"Device: {d}"))

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow(pair_row)
        form.addRow("Pairs", self.pairs_list)
        form.addRow("Classes", classes_row)
        form.addRow("Method", self.method_combo)
        form.addRow("Start from", init_row)
        form.addRow("Iterations", self.iterations)
        form.addRow("Learning rate", self.lr)
        form.addRow("Crop (px)", self.crop)
        form.addRow("Validation share", self.val_share)
        form.addRow(self.frozen)
        form.addRow(self.live)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.curves)
        layout.addWidget(self.status)
        layout.addWidget(self.device_label)

    # ------------------------------------------------------------------------------------------ choices
    def add_current_pair(self) -> None:
        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        if image is None or labels is None or (image, labels) in self.pairs:
            return
        self.pairs.append((image, labels))
        self.pairs_list.addItem(f"{image.name}  ←  {labels.name}")

    def _remove_pair(self) -> None:
        row = self.pairs_list.currentRow()
        if row >= 0:
            self.pairs.pop(row)
            self.pairs_list.takeItem(row)

    def _fill_init_choices(self, *_) -> None:
        """Checkpoints the chosen method can start from: GRNet and MagNet ones for MagNet (the shared one first
        when it is one of those), CascadePSP ones for CascadePSP ("" = the shipped refiner); GRNet starts from
        ImageNet (Resume continues a run)."""
        from napari_uhrseg.checkpoints import CheckpointManager

        method = self.method_combo.currentText()
        sources = {"magnet": ("grnet", "magnet"), "cascadepsp": ("cascadepsp",)}.get(method, ())
        self.init_combo.clear()
        self.init_combo.setEnabled(bool(sources))
        if not sources:
            return
        paths = []
        shared = self.state.refiner_checkpoint if method == "cascadepsp" else self.state.checkpoint
        if shared and (method == "cascadepsp" or self.state.method in sources):
            paths.append(str(shared))
        if self._checkpoints is None:
            self._checkpoints = CheckpointManager()  # kept: it remembers what it read (listing loads each file)
        try:
            infos = [i for i in self._checkpoints.list(include_starters=method != "cascadepsp") if i.ok]
        except Exception:  # noqa: BLE001 - an unreadable folder must not break the dock
            infos = []
        paths += [str(i.path) for i in infos if i.method in sources and str(i.path) not in paths]
        if method == "cascadepsp":
            self.init_combo.addItem("", "")  # the shipped class-agnostic refiner
        for path in paths:
            self.init_combo.addItem(Path(path).name, path)
        self.init_combo.setCurrentIndex(0)

    def _offer_shared_checkpoint(self, *_) -> None:
        """A checkpoint just trained or loaded elsewhere becomes the first choice of 'Start from' when the chosen
        method can start from it (nothing is read: this runs when a run ends, on the GUI thread)."""
        method = self.method_combo.currentText()
        if method == "cascadepsp" and self.state.refiner_checkpoint:
            self.set_init(self.state.refiner_checkpoint)
        elif method == "magnet" and self.state.checkpoint and self.state.method in ("grnet", "magnet"):
            self.set_init(self.state.checkpoint)

    def _browse_init(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self, "Start from checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.set_init(path)

    def set_init(self, path: str | None) -> None:
        """Start the next run from this checkpoint (None or "": the method's default)."""
        path = str(path or "")
        idx = self.init_combo.findData(path)
        if idx < 0:
            self.init_combo.addItem(Path(path).name if path else "", path)
            idx = self.init_combo.count() - 1
        self.init_combo.setCurrentIndex(idx)

    def init_path(self) -> str | None:
        """The chosen start checkpoint (the item's file, or a path typed in), None for the default."""
        if not self.init_combo.isEnabled():
            return None
        data, text = self.init_combo.currentData(), self.init_combo.currentText().strip()
        if data is not None and text == self.init_combo.itemText(self.init_combo.currentIndex()):
            return str(data) or None
        return text or None

    def training_pairs(self) -> list[tuple]:
        """The pairs added, else the (image, labels) chosen in the combo boxes."""
        live = [(i, lab) for i, lab in self.pairs if i in self.viewer.layers and lab in self.viewer.layers]
        if live:
            return live
        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        return [(image, labels)] if image is not None and labels is not None else []

    def classes_from_layer(self) -> None:
        labels = self.labels_combo.layer()
        if labels is None:
            return
        if self.state.class_names and labels is self.state.labels_layer:
            names = self.state.class_names
        else:
            names = read_classes(labels)[0]
        self.classes_edit.setText(", ".join(names))

    def _classes_from_layer_if_empty(self, *_) -> None:
        if not self.classes_edit.text().strip():
            self.classes_from_layer()

    def class_names(self) -> list[str]:
        from napari_uhrseg.errors import UhrsegError

        names = [n.strip() for n in self.classes_edit.text().split(",") if n.strip()]
        if len(names) < 3:
            raise UhrsegError(
                "Name at least two classes after 'unlabelled' (e.g. 'unlabelled, tissue, background'): "
                "label 0 is unlabelled, 1..K are the classes you paint."
            )
        return names

    def settings(self):
        from napari_uhrseg.device import select_device
        from napari_uhrseg.engine.scribbles import TrainingSettings

        # Leave a core to the event loop: torch would otherwise take them all and stall the viewer.
        device = select_device(self.state.device, leave_for_ui=1)
        return TrainingSettings(
            iterations=self.iterations.value(), lr=self.lr.value() or None, crop=self.crop.value(),
            val_share=self.val_share.value(), frozen_backbone=self.frozen.isChecked(), device=device.device,
            init=self.init_path(),
        )

    # ------------------------------------------------------------------------------------------ running
    def start(self, *, resume: bool = False) -> None:
        """Start (or, with ``resume``, continue the last stopped run) in a worker thread."""
        from napari.utils import progress
        from superqt.utils import create_worker  # napari's would also relay errors as raw tracebacks

        if self._worker is not None:
            return
        try:
            job = self._prepare(resume)
        except Exception as exc:
            self._done(exc)
            return
        freeze_long_lived_objects()
        hold_full_collections(True)
        self._stop.clear()
        self.curves.clear()
        if self.live.isChecked() and job["method"] in LIVE_METHODS:
            self._preview_layer(job["image"], job["names"])  # adding a layer is slow GUI work: do it now
        self._pbar = progress(total=job["settings"].iterations, desc="Training")
        self._set_running(True)
        self.status.setText(f"Preparing {job['method']} on {job['description']} …")
        self._worker = create_worker(
            _train_job, job, self._stop, lambda: self._live_box if self._live_on else None,
            _connect={"yielded": self._on_event, "returned": self._done, "errored": self._done},
            _start_thread=False,
        )
        # The worker starts on the next turn of the event loop, once the progress bar and the preview layer made
        # above have been drawn: that first draw (napari's, 0.2-0.5 s with software OpenGL) is the press's GUI
        # work; from the worker's start to its end the viewer must never wait (tests/test_heartbeat.py).
        QTimer.singleShot(0, self._worker.start)

    def _prepare(self, resume: bool) -> dict:
        """Everything the worker needs, gathered on the GUI thread (cheap: no pixels read, no model built)."""
        from napari_uhrseg.checkpoints import CheckpointManager
        from napari_uhrseg.engine.train import last_path
        from napari_uhrseg.errors import UhrsegError

        pairs = self.training_pairs()
        if not pairs:
            raise UhrsegError("Choose an image and the Labels layer painted on it (or add pairs).")
        names = self.class_names()
        method = self.method_combo.currentText()
        if not method:
            raise UhrsegError("No method can be trained from the viewer in this installation.")
        settings = self.settings()
        from napari_uhrseg.widgets._layers import frame_of

        sources, frames = [], {}
        for image, labels in pairs:
            data = level0_data(labels)
            # a copy, so that strokes painted while training do not change the data under the worker
            data = np.array(data) if isinstance(data, np.ndarray) else data
            sources.append((image, data, labels.name))
            frames[labels.name] = frame_of(labels, image)
        resume_from = None
        if resume:
            if self._last_out is None or not last_path(self._last_out).exists():
                raise UhrsegError("There is no stopped run to resume: press Start.")
            out, resume_from = self._last_out, last_path(self._last_out)
        else:
            stem = f"{pairs[0][0].name}-{method}".replace(" ", "_")
            out = CheckpointManager().path_for_new(method, settings.preset, stem=_safe_stem(stem))
            out.parent.mkdir(parents=True, exist_ok=True)
        self._last_out = out
        self._remember_view()
        colors = [[int(round(255 * v)) for v in c[:3]] for c in self._class_colors(names)]
        return {"sources": sources, "frames": frames, "method": method, "names": names, "colors": colors,
                "settings": settings,
                "out": out, "resume": resume_from, "image": pairs[0][0],
                "description": ", ".join(image.name for image, _ in pairs)}

    def _class_colors(self, names):
        from napari_uhrseg.widgets.state import default_colors

        if tuple(names) == tuple(self.state.class_names) and self.state.class_colors:
            return self.state.class_colors
        labels = self.labels_combo.layer()
        return read_classes(labels, num_classes=len(names))[1] if labels is not None else default_colors(len(names))

    def stop(self) -> None:
        """Finish the current step, validate, keep the best checkpoint and the resumable state."""
        if self._worker is not None:
            self._stop.set()
            self.status.setText("Stopping after this step …")

    def _remember_view(self, *_) -> None:
        image = self.image_combo.layer()
        if image is None:
            return
        from napari_uhrseg.widgets._layers import view_box_level0

        try:
            self._live_box = _clip_box(view_box_level0(image), image, LIVE_MAX_SIDE)
        except (AttributeError, IndexError, ValueError):  # not drawn yet
            self._live_box = None

    def _on_event(self, item) -> None:
        kind, payload = item
        if kind == "train":
            ev = payload
            if self._pbar is not None:
                self._pbar.total = ev.total
                self._pbar.n = ev.step
                self._pbar.refresh()
            loss = ev.losses.get("L", next(iter(ev.losses.values()), float("nan")))
            self.curves.add_loss(ev.step, loss)
            if ev.val_miou is not None and np.isfinite(ev.val_miou):
                self.curves.add_miou(ev.step, ev.val_miou)
            best = f", best val mIoU {ev.best_miou:.3f}" if ev.best_miou is not None else ""
            self.status.setText(f"step {ev.step}/{ev.total} ({ev.phase}) loss {loss:.3g}{best}")
            self.stepped.emit(ev)
        elif kind == "live":
            self._show_live(payload)

    def _preview_layer(self, image, names):
        """The ``"<image> live prediction"`` layer (created empty, over the image, if missing)."""
        name = f"{image.name} live prediction"
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        box = self._live_box or (0, 0, 1, 1)  # never an image-sized array: slides are 100k px wide
        layer = self.viewer.add_labels(np.zeros((box[2] - box[0], box[3] - box[1]), np.uint8), name=name,
                                       scale=image.scale[-2:], translate=image.translate[-2:], opacity=0.45)
        write_classes(layer, names, self._class_colors(names))
        return layer

    def _show_live(self, payload) -> None:
        from napari_uhrseg.widgets._layers import labels_geometry

        result, image, names = payload
        if image not in self.viewer.layers:
            return
        layer = self._preview_layer(image, names)
        scale, translate = labels_geometry(image, result.downsample, result.store_origin)
        if not (np.allclose(layer.scale[-2:], scale) and np.allclose(layer.translate[-2:], translate)):
            layer.scale, layer.translate = scale, translate
        new = np.asarray(result.store.array)
        if layer.data.shape == new.shape and layer.data.dtype == new.dtype:
            layer.data[...] = new  # in place: a refresh, without the layer-list work a new array triggers
            layer.refresh()
        else:
            layer.data = new
        if tuple(read_classes(layer, num_classes=len(names))[0]) != tuple(names):
            write_classes(layer, names, self._class_colors(names))
        self.live_updated.emit(layer)

    def _done(self, result) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._worker is not None:
            hold_full_collections(False)
        self._worker = None
        self._set_running(False)
        if isinstance(result, BaseException):
            self.status.setText(f"Training failed: {result}")
            notify_error(result, "Training")
        elif result is not None:
            from napari.utils.notifications import show_info

            path, method, names, best = result
            self.state.set_classes(names, self._class_colors(names))
            if method == "cascadepsp":  # a refiner: the Refine dock's, the segmenter choice stays
                self.state.refiner_checkpoint = str(path)
            else:
                self.state.method = method
                self.state.checkpoint = str(path)
            best_txt = f" (best validation mIoU {best:.3f})" if best is not None else ""
            self.status.setText(f"Checkpoint {Path(path).name}{best_txt}")
            show_info(f"Training finished: {path}{best_txt}")
        self.finished.emit(result)

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.resume_button.setEnabled(not running and self._last_out is not None)


# ---------------------------------------------------------------------------------- worker (no Qt here)
def _train_job(job: dict, stop: threading.Event, live_box):
    """Generator run in the worker: reads the painted regions, builds the trainer, then yields ("train",
    TrainEvent) per step and ("live", ...) after the last step and after validations (within ``LIVE_SHARE``).
    Returns (checkpoint, method, names, best)."""
    from napari_uhrseg.engine.scribbles import labelled_item, start_session
    from napari_uhrseg.engine.segment import segment_image

    from napari_uhrseg.widgets._layers import place_in_frame, pyramid_for_layer

    items, pyramids, levels = [], [], []
    for image, labels, labels_name in job["sources"]:
        pyramids.append(pyramid_for_layer(image))
        frame = job.get("frames", {}).get(labels_name)
        if frame is not None:  # labels of a region: placed in their level's frame of this pyramid
            shapes = [pyramids[-1].level_shape(i) for i in range(len(pyramids[-1].levels))]
            labels = place_in_frame(labels, frame, level_shapes=shapes)
        levels.append(_level_of(pyramids[-1], labels, labels_name))
        items.append(labelled_item(pyramids[-1], labels, level=levels[-1], name=image.name))
    session = start_session(job["method"], items, job["names"], job["colors"], settings=job["settings"],
                            out=job["out"], resume=job["resume"])
    # The model's objects live as long as the run: keep them out of full garbage collections, which hold the
    # GIL (and so the viewer) while they walk every object (see _common.freeze_long_lived_objects).
    gc.freeze()
    best = session.best
    live = session.method_name in LIVE_METHODS
    started, live_s = time.perf_counter(), 0.0
    for ev in session.events(stop=stop.is_set):
        best = ev.best_miou
        yield "train", ev
        box = live_box() if live else None
        # The view is re-segmented when the round ends (or is stopped) and, on the way, after a validation as long
        # as the previews have taken at most LIVE_SHARE of the time: a 2048² view is ~25 windows, and previewing
        # after every validation would cost more than the training itself on a CPU.
        due = ev.done or live_s <= LIVE_SHARE * (time.perf_counter() - started - live_s)
        if ev.val_miou is not None and box is not None and due:
            t0 = time.perf_counter()
            method = session.method()
            window = int(getattr(method, "window_size", None) or job["settings"].crop)  # what the model is made for
            result = segment_image(pyramids[0], method, level=levels[0], window=window,
                                   overlap=max(16, window // 8), region=box)
            live_s += time.perf_counter() - t0
            yield "live", (result, job["image"], job["names"])
    return session.out, session.method_name, job["names"], best


def _description(name: str) -> str:
    from napari_uhrseg.engine.scribbles import DESCRIPTIONS

    return DESCRIPTIONS.get(name, name)


def _trainable() -> list[str]:
    try:
        from napari_uhrseg.engine.scribbles import trainable_methods

        return trainable_methods()
    except ImportError:  # a method module failing to import must not take the dock down
        return []


def _level_of(pyramid, labels, name: str) -> int:
    from napari_uhrseg.errors import UhrsegError

    for level in range(len(pyramid.levels)):
        if tuple(pyramid.level_shape(level)) == tuple(labels.shape[-2:]):
            return level
    raise UhrsegError(
        f"{name} ({labels.shape[-2]} x {labels.shape[-1]}) matches no level of {pyramid.name}: "
        "paint on a labels layer the size of the image (or of one of its levels)."
    )


def _clip_box(box, image, max_side: int):
    """The view box (level-0 px) clipped to the image and to ``max_side`` per side around its centre."""
    y0, x0, y1, x1 = box
    h, w = level0_data(image).shape[:2]  # (Y, X) or (Y, X, C)
    y0, x0, y1, x1 = max(0.0, y0), max(0.0, x0), min(float(h), y1), min(float(w), x1)
    if y1 <= y0 or x1 <= x0:
        return None
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    hy, hx = min(y1 - y0, max_side) / 2, min(x1 - x0, max_side) / 2
    return (int(cy - hy), int(cx - hx), int(np.ceil(cy + hy)), int(np.ceil(cx + hx)))


def _safe_stem(stem: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in stem)[:100]


def _spin(box, lo, hi, value, *, decimals: int | None = None, step=None):
    if decimals is not None:
        box.setDecimals(decimals)
    box.setRange(lo, hi)
    if step is not None:
        box.setSingleStep(step)
    box.setValue(value)
    return box
