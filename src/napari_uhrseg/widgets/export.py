"""Export dock: write a Labels layer as pyramidal OME-TIFF, OME-Zarr, PNG or GeoJSON (QuPath), in a worker.

The dock only gathers choices (layer, format, path, classes, pixel size) and calls
``napari_uhrseg.io.export.export_labels``, which writes atomically: a failed or cancelled export leaves any
previous file untouched. Pixel size is the level-0 pixel size of the image layer (its ``scale``); when the
labels layer is coarser than the image (labels at a working level), ``downsample`` says by how much.
"""
from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

from napari_uhrseg.widgets._common import LayerCombo, level0_data, notify_error
from napari_uhrseg.widgets.autosave import autosave_for
from napari_uhrseg.widgets.state import get_state, read_classes

# format key -> (label in the combo, file suffix)
FORMATS = {
    "ome-tiff": ("Pyramidal OME-TIFF", ".ome.tif"),
    "ome-zarr": ("OME-Zarr", ".ome.zarr"),
    "png": ("PNG (small images)", ".png"),
    "geojson": ("GeoJSON polygons (QuPath)", ".geojson"),
}


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int)


class ExportWidget(QWidget):
    """Export the labels being edited. ``finished`` is emitted with the written path, or the exception."""

    finished = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self._worker = None
        self._pbar = None
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)

        self.labels_combo = LayerCombo(napari_viewer, napari.layers.Labels, self)
        self.image_combo = LayerCombo(napari_viewer, napari.layers.Image, self, allow_none=True)
        self.format_combo = QComboBox(self)
        for key, (label, _) in FORMATS.items():
            self.format_combo.addItem(label, key)
        self.path_edit = QLineEdit(self)
        self.path_edit.setPlaceholderText("where to write the labels")
        browse = QPushButton("Browse…", self)
        browse.clicked.connect(self._browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit)
        path_row.addWidget(browse)
        self.classes_edit = QLineEdit(self)
        self.classes_edit.setToolTip("Class names, comma separated, label 0 first")
        self.pixel_edit = QLineEdit(self)
        self.pixel_edit.setToolTip("Level-0 pixel size 'y, x' (empty: unknown)")
        self.unit_edit = QLineEdit(self)
        self.unit_edit.setPlaceholderText("µm, m, …")
        self.export_button = QPushButton("Export", self)
        self.export_button.clicked.connect(self.start_export)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        self.restore_row = self._build_restore_row()

        form = QFormLayout(self)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Image (pixel size)", self.image_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("File", path_row)
        form.addRow("Classes", self.classes_edit)
        form.addRow("Pixel size", self.pixel_edit)
        form.addRow("Unit", self.unit_edit)
        form.addRow(self.export_button)
        form.addRow(self.status)
        form.addRow(self.restore_row)

        self.labels_combo.currentIndexChanged.connect(self._fill_from_layers)
        self.image_combo.currentIndexChanged.connect(self._fill_from_layers)
        self.format_combo.currentIndexChanged.connect(self._fix_suffix)
        self.state.events.labels_layer.connect(self.labels_combo.set_layer)
        self.state.events.image_layer.connect(self.image_combo.set_layer)
        self.state.events.class_names.connect(lambda *_: self._fill_classes())
        self.labels_combo.set_layer(self.state.labels_layer)
        self.image_combo.set_layer(self.state.image_layer)
        # a choice here is the tool's choice (autosave follows the state's labels layer)
        self.labels_combo.currentIndexChanged.connect(lambda *_: setattr(self.state, "labels_layer", self._labels()))
        self._fill_from_layers()
        self.autosave = autosave_for(napari_viewer)
        self.autosave.restore_available.connect(self._offer_restore)
        self._offer_restore(self.autosave.pending)

    # ------------------------------------------------------------------------------------ autosave
    def _build_restore_row(self) -> QWidget:
        row = QWidget(self)
        lay = QHBoxLayout(row)
        lay.setContentsMargins(0, 0, 0, 0)
        self.restore_label = QLabel("", row)
        self.restore_label.setWordWrap(True)
        restore_button = QPushButton("Restore autosave", row)
        restore_button.clicked.connect(lambda: self._resolve_autosave(restore=True))
        discard_button = QPushButton("Discard", row)
        discard_button.clicked.connect(lambda: self._resolve_autosave(restore=False))
        for w in (self.restore_label, restore_button, discard_button):
            lay.addWidget(w)
        row.setVisible(False)
        return row

    def _offer_restore(self, info) -> None:
        self.restore_row.setVisible(info is not None)
        if info is not None:
            self.restore_label.setText(info.describe())

    def _resolve_autosave(self, *, restore: bool) -> None:
        try:
            self.autosave.restore() if restore else self.autosave.discard()
        except Exception as exc:
            notify_error(exc, "Restoring the autosave")
        self._offer_restore(self.autosave.pending)

    def _labels(self):
        return self.labels_combo.layer()

    # ------------------------------------------------------------------------------------ choices
    @property
    def format(self) -> str:
        return self.format_combo.currentData()

    def set_format(self, key: str) -> None:
        self.format_combo.setCurrentIndex(self.format_combo.findData(key))

    def _browse(self) -> None:
        label, suffix = FORMATS[self.format]
        path, _ = QFileDialog.getSaveFileName(self, "Export labels", self.path_edit.text(), f"{label} (*{suffix})")
        if path:
            self.path_edit.setText(path)
            self._fix_suffix()

    def _fix_suffix(self) -> None:
        text = self.path_edit.text().strip()
        if not text:
            return
        known = sorted({s for _, s in FORMATS.values()} | {".ome.tiff", ".tif", ".tiff", ".zarr", ".json"},
                       key=len, reverse=True)  # longest first: ".ome.tif" before ".tif"
        old = next((s for s in known if text.lower().endswith(s)), "")
        self.path_edit.setText(text[: len(text) - len(old)] + FORMATS[self.format][1])

    def _fill_from_layers(self, *_) -> None:
        self._fill_classes()
        image = self.image_combo.layer()
        if image is None and self.labels_combo.layer() is not None:
            image = self._image_for(self.labels_combo.layer())
        if image is not None:
            sy, sx = (float(v) for v in image.scale[-2:])
            unit = _unit_of(image)
            self.pixel_edit.setText("" if (sy, sx) == (1.0, 1.0) and not unit else f"{sy:g}, {sx:g}")
            self.unit_edit.setText(unit or "")
        labels = self.labels_combo.layer()
        if labels is not None and not self.path_edit.text().strip():
            self.path_edit.setText(str(Path.home() / (labels.name.replace(" ", "_") + FORMATS[self.format][1])))

    def _fill_classes(self) -> None:
        labels = self.labels_combo.layer()
        if self.state.class_names and labels is self.state.labels_layer:
            names = self.state.class_names
        elif labels is not None:
            names = read_classes(labels)[0]
        else:
            return
        self.classes_edit.setText(", ".join(names))

    def _image_for(self, labels):
        """The image a labels layer belongs to: the shared state's, else one named like ``"<image> labels"``."""
        if self.state.image_layer is not None and labels is self.state.labels_layer:
            return self.state.image_layer
        stem = labels.name[: -len(" labels")] if labels.name.endswith(" labels") else None
        return next((lay for lay in self.image_combo.layers() if lay.name == stem), None)

    def export_arguments(self) -> dict:
        """Everything ``export_labels`` needs, read from the dock (raises ``ExportError`` on a bad entry)."""
        from napari_uhrseg.errors import ExportError

        labels = self.labels_combo.layer()
        if labels is None:
            raise ExportError("Choose a Labels layer to export (add or paint one first).")
        path = self.path_edit.text().strip()
        if not path:
            raise ExportError("Choose a file to export to.")
        names = [n.strip() for n in self.classes_edit.text().split(",") if n.strip()]
        n_classes = max(len(names), 2)
        colors = None
        if names:
            if labels is self.state.labels_layer and len(self.state.class_colors) == len(names):
                colors = [tuple(c) for c in self.state.class_colors]
            else:
                colors = list(read_classes(labels, num_classes=n_classes)[1])
        pixel_size = _parse_pixel_size(self.pixel_edit.text())
        image = self.image_combo.layer() or self._image_for(labels)
        downsample = 1.0
        if image is not None:
            downsample = float(labels.scale[-1]) / float(image.scale[-1])
        elif pixel_size is None and tuple(labels.scale[-2:]) != (1.0, 1.0):
            pixel_size = tuple(float(v) for v in labels.scale[-2:])
        if colors is not None:  # export_labels takes 0..255 RGB triples
            colors = [[int(round(255 * float(v))) for v in c[:3]] for c in colors]
        data = level0_data(labels)
        if image is not None:  # labels of a segmented region: exported where they lie, the rest unlabelled
            from napari_uhrseg.widgets._layers import labels_in_frame

            data = labels_in_frame(data, labels, image)
        return {
            "labels": data,
            "path": Path(path).expanduser(),
            "format": self.format,
            "class_names": names or None,
            "class_colors": colors,
            "pixel_size": pixel_size,
            "pixel_unit": self.unit_edit.text().strip() or None,
            "downsample": downsample,
        }

    # ------------------------------------------------------------------------------------- running
    def start_export(self) -> None:
        """Start the export in a worker thread (the button does this)."""
        from napari.utils import progress
        from superqt.utils import create_worker  # napari's would also relay errors as raw tracebacks

        try:
            kwargs = self.export_arguments()
        except Exception as exc:
            self._done(exc)
            return
        labels = kwargs.pop("labels")
        self.export_button.setEnabled(False)
        self.status.setText(f"Exporting to {kwargs['path']} …")
        self._pbar = progress(total=0, desc=f"Export {kwargs['path'].name}")
        self._worker = create_worker(
            _export, labels, kwargs, self._relay.progressed.emit,
            _connect={"returned": self._done, "errored": self._done},
        )

    def _on_progress(self, done: int, total: int) -> None:
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.n = done
            self._pbar.refresh()

    def _done(self, result) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.export_button.setEnabled(True)
        self._worker = None
        if isinstance(result, BaseException):
            self.status.setText(f"Export failed: {result}")
            notify_error(result, "Export")
        else:
            from napari.utils.notifications import show_info

            self.status.setText(f"Exported {result}")
            show_info(f"Labels exported to {result}")
        self.finished.emit(result)


def _export(labels, kwargs: dict, report) -> Path:
    """Worker body (no Qt): ``report(done, total)`` is called as parts are written."""
    from napari_uhrseg.io.export import export_labels

    return export_labels(labels, progress=report, **kwargs)


def _parse_pixel_size(text: str) -> tuple[float, float] | None:
    from napari_uhrseg.errors import ExportError

    parts = [p for p in text.replace("x", ",").replace(";", ",").split(",") if p.strip()]
    if not parts:
        return None
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ExportError(f"Pixel size {text!r} is not a number: write e.g. '0.25' or '0.25, 0.25'.") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(np.isfinite(values)) or min(values) <= 0:
        raise ExportError(f"Pixel size {text!r} must be one or two positive numbers (y, x).")
    return float(values[0]), float(values[1])


def _unit_of(layer) -> str | None:
    """The layer's spatial unit: napari's ``units`` when set, else what the reader stored in ``metadata``."""
    units = getattr(layer, "units", None)
    if units:
        unit = str(units[-1])
        if unit not in ("pixel", "pixels", "px", ""):
            return {"micrometer": "µm", "millimeter": "mm", "meter": "m", "nanometer": "nm"}.get(unit, unit)
    meta = getattr(layer, "metadata", {}) or {}
    return meta.get("pixel_unit")
