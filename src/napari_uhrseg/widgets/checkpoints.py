"""Checkpoints dock: list the user's checkpoints and the starters; load, rename, delete, import, export.

All file work is ``napari_uhrseg.checkpoints.CheckpointManager``; this dock only shows it. "Load" checks the
file (``load_checkpoint``) and, when it is good, makes it the shared state's checkpoint, method and classes,
which the Segment and Train docks follow.
"""
from __future__ import annotations

import napari
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_uhrseg.checkpoints import CheckpointInfo, CheckpointManager
from napari_uhrseg.widgets._common import notify_error
from napari_uhrseg.widgets.state import get_state


class CheckpointsWidget(QWidget):
    """A list of checkpoints with buttons. ``loaded`` is emitted with the ``CheckpointInfo`` made current."""

    loaded = Signal(object)

    def __init__(self, napari_viewer: napari.Viewer, parent=None, *, manager: CheckpointManager | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.manager = manager or CheckpointManager()
        self.list_widget = QListWidget(self)
        self.list_widget.currentItemChanged.connect(self._show_details)
        self.details = QLabel("", self)
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.folder_label = QLabel(f"Folder: {self.manager.folder}", self)
        self.folder_label.setWordWrap(True)

        self.buttons = {}
        grid = QGridLayout()
        for i, (key, text, slot) in enumerate(
            [
                ("load", "Load", self.load_selected),
                ("rename", "Rename…", self._rename_clicked),
                ("delete", "Delete", self._delete_clicked),
                ("import", "Import…", self._import_clicked),
                ("export", "Export…", self._export_clicked),
                ("refresh", "Refresh", self.refresh),
            ]
        ):
            button = QPushButton(text, self)
            button.clicked.connect(lambda *_, s=slot: s())
            grid.addWidget(button, i // 3, i % 3)
            self.buttons[key] = button

        layout = QVBoxLayout(self)
        layout.addWidget(self.folder_label)
        layout.addWidget(self.list_widget)
        layout.addLayout(grid)
        layout.addWidget(self.details)
        self.state.events.checkpoint.connect(lambda *_: self.refresh())
        self.refresh()

    # --------------------------------------------------------------------------------------- listing
    def refresh(self) -> None:
        selected = self.selected()
        self.list_widget.clear()
        for info in self.manager.list():
            item = QListWidgetItem(info.describe())
            item.setData(Qt.ItemDataRole.UserRole, info)
            if not info.ok:
                item.setForeground(Qt.GlobalColor.red)
            if self.state.checkpoint and str(info.path) == self.state.checkpoint:
                font = item.font()
                font.setBold(True)
                item.setFont(font)
            self.list_widget.addItem(item)
            if selected is not None and info.path == selected.path:
                self.list_widget.setCurrentItem(item)
        self._show_details()

    def selected(self) -> CheckpointInfo | None:
        item = self.list_widget.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def select(self, name: str) -> None:
        for i in range(self.list_widget.count()):
            if self.list_widget.item(i).data(Qt.ItemDataRole.UserRole).name == name:
                self.list_widget.setCurrentRow(i)
                return
        raise KeyError(name)

    def _show_details(self, *_) -> None:
        info = self.selected()
        for key in ("rename", "delete"):
            self.buttons[key].setEnabled(info is not None and not info.starter)
        for key in ("load", "export"):
            self.buttons[key].setEnabled(info is not None and (info.ok or key == "export"))
        if info is None:
            self.details.setText("")
        elif not info.ok:
            self.details.setText(info.error)
        else:
            self.details.setText(
                f"{info.path}\nmethod {info.method}, preset {info.preset}\nclasses: {', '.join(info.class_names)}\n"
                f"created {info.created}, {info.size_bytes / 2**20:.1f} MiB"
            )

    # ---------------------------------------------------------------------------------------- actions
    def load_selected(self) -> CheckpointInfo | None:
        """Check the selected checkpoint and make it the shared state's checkpoint, method and classes."""
        info = self.selected()
        if info is None:
            return None
        try:
            _, meta = self.manager.load(info.path)
        except Exception as exc:
            notify_error(exc, "Loading the checkpoint")
            return None
        self.state.method = str(meta["method"])
        self.state.checkpoint = str(info.path)
        if tuple(meta["class_names"]) != tuple(self.state.class_names):
            self.state.set_classes(meta["class_names"], meta.get("class_colors"))
        self.loaded.emit(info)
        return info

    def rename_selected(self, new_name: str) -> None:
        info = self.selected()
        if info is None:
            return
        was_current = self.state.checkpoint == str(info.path)
        new = self._guard(lambda: self.manager.rename(info.name, new_name), "Renaming")
        if new is not None:
            if was_current:
                self.state.checkpoint = str(new.path)
            self.refresh()
            self.select(new.name)

    def delete_selected(self) -> None:
        info = self.selected()
        if info is None:
            return
        self._guard(lambda: self.manager.delete(info.name), "Deleting")
        if self.state.checkpoint == str(info.path):
            self.state.checkpoint = None
        self.refresh()

    def import_file(self, path: str) -> CheckpointInfo | None:
        info = self._guard(lambda: self.manager.import_file(path), "Importing")
        if info is not None:
            self.refresh()
            self.select(info.name)
        return info

    def export_selected(self, destination: str):
        info = self.selected()
        if info is None:
            return None
        out = self._guard(lambda: self.manager.export_file(info.name, destination, overwrite=True), "Exporting")
        if out is not None:
            from napari.utils.notifications import show_info

            show_info(f"Checkpoint {info.name} exported to {out}")
        return out

    def _guard(self, action, what: str):
        try:
            return action()
        except Exception as exc:
            notify_error(exc, what)
            return None

    # ----------------------------------------------------------------------------- dialogs (buttons)
    def _rename_clicked(self) -> None:
        info = self.selected()
        if info is None:
            return
        name, ok = QInputDialog.getText(self, "Rename checkpoint", "New name:", text=info.name)
        if ok and name.strip():
            self.rename_selected(name)

    def _delete_clicked(self) -> None:
        info = self.selected()
        if info is None:
            return
        answer = QMessageBox.question(self, "Delete checkpoint", f"Delete {info.name} for good?")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_selected()

    def _import_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import checkpoint", "", "Checkpoints (*.pt)")
        if path:
            self.import_file(path)

    def _export_clicked(self) -> None:
        info = self.selected()
        if info is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export checkpoint", f"{info.name}.pt", "Checkpoints (*.pt)")
        if path:
            self.export_selected(path)
