"""Autosave in the viewer: snapshot the shared state's labels layer every minute; offer restore on reopening.

``autosave_for(viewer)`` returns the viewer's one ``AutosaveController`` (created on first call; the Train and
Export docks call it). It follows ``state.labels_layer``: for each labels layer it runs a
``napari_uhrseg.engine.autosave.Autosaver`` keyed by the image (``state.image_layer``'s file path, else
its name) and the labels layer's name, fed with the regions painted (the layer's ``paint`` events). When that
layer already has an autosave that differs from it — or, failing that, a labels layer of the image left one in an
earlier session (a crash, then the image reopened) — ``restore_available`` is emitted and a notification
says so;
``restore()`` and ``discard()`` act on it (the Export dock shows the buttons).
"""
from __future__ import annotations

import weakref

import numpy as np
from qtpy.QtCore import QObject, Signal

from napari_uhrseg.engine.autosave import DEFAULT_INTERVAL_S, Autosaver, discard, find_autosave, image_id_for, restore
from napari_uhrseg.widgets._common import level0_data
from napari_uhrseg.widgets.state import get_state

_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def autosave_for(viewer, *, interval_s: float = DEFAULT_INTERVAL_S, root=None) -> "AutosaveController":
    """The viewer's autosave controller (``interval_s`` and ``root`` apply when it is first created)."""
    ctrl = _CONTROLLERS.get(viewer)
    if ctrl is None:
        ctrl = AutosaveController(viewer, interval_s=interval_s, root=root)
        _CONTROLLERS[viewer] = ctrl
    return ctrl


def image_id_of(image_layer, labels_layer) -> str:
    """The image part of an autosave key: the image file's path when napari knows it, else the image (or
    labels) layer name."""
    if image_layer is not None:
        path = getattr(getattr(image_layer, "source", None), "path", None)
        return image_id_for(path) if path else f"layer:{image_layer.name}"
    return f"layer:{labels_layer.name}"


LAYER_SEP = " | labels: "


def autosave_key(image_layer, labels_layer) -> str:
    """The autosave key of one labels layer of one image: several labels layers of an image (scribbles, the
    Segment dock's output) each keep their own snapshot, and none is offered as a restore for another."""
    return f"{image_id_of(image_layer, labels_layer)}{LAYER_SEP}{labels_layer.name}"


def _differs(info, data) -> bool:
    """Whether a snapshot differs from ``data`` (a large layer is not compared: it is taken to differ)."""
    return data.size > 2**26 or not np.array_equal(restore(info), np.asarray(data))


def _left_by_a_closed_layer(viewer, image_part: str, data, root, own=()) -> "object | None":
    """The newest snapshot of this image that an earlier session left (not one of ``own``, the keys this viewer
    saved), whose labels layer is not open in ``viewer`` and which differs from ``data``: what a crash left
    behind when the image is reopened and its labels layer comes back under another name."""
    from napari_uhrseg.engine.autosave import list_autosaves

    open_names = {lay.name for lay in viewer.layers if lay._type_string == "labels"}
    for info in list_autosaves(root=root):
        head, sep, name = info.image_id.rpartition(LAYER_SEP)
        if (sep and head == image_part and name not in open_names and info.image_id not in own
                and tuple(info.shape) == tuple(data.shape[-2:]) and _differs(info, data)):
            return info
    return None


class AutosaveController(QObject):
    """Runs the autosave of the labels layer in the shared state. ``restore_available(AutosaveInfo)``."""

    restore_available = Signal(object)

    def __init__(self, viewer, *, interval_s: float = DEFAULT_INTERVAL_S, root=None):
        super().__init__()
        self.viewer = viewer
        self.state = get_state(viewer)
        self.interval_s = interval_s
        self.root = root
        self.saver: Autosaver | None = None
        self.pending = None  # AutosaveInfo offered for restore
        self._layer = None
        self._own_keys: set[str] = set()
        self.state.events.labels_layer.connect(self._follow)
        self.state.events.image_layer.connect(lambda *_: self._follow(self.state.labels_layer))
        self._follow(self.state.labels_layer)
        window = getattr(getattr(viewer, "window", None), "_qt_window", None)  # napari has no public close event
        if window is not None:
            window.destroyed.connect(lambda *_: self.stop())

    def _follow(self, layer) -> None:
        image_id = autosave_key(self.state.image_layer, layer) if layer is not None else None
        if layer is self._layer and self.saver is not None and self.saver.image_id == image_id:
            return  # same layer of the same image: keep saving
        self.stop()
        self._layer = layer
        if layer is None:
            return
        data = level0_data(layer)
        info = find_autosave(image_id, root=self.root)
        if info is None:
            info = _left_by_a_closed_layer(self.viewer, image_id_of(self.state.image_layer, layer), data,
                                           self.root, own=self._own_keys)
        self.pending = None
        if info is not None and tuple(info.shape) == tuple(data.shape[-2:]) and _differs(info, data):
            self.pending = info  # a small layer identical to its snapshot needs no question
        self._own_keys.add(image_id)  # a layer this session closed is not offered to the others
        self.saver = Autosaver(
            image_id, lambda: level0_data(layer), classes=list(self.state.class_names) or None,
            root=self.root, interval_s=self.interval_s,
        )
        layer.events.paint.connect(self._on_paint)
        layer.events.data.connect(self._on_data)
        if self.pending is None or self.pending.image_id != image_id:
            self.saver.start()  # (a closed layer's snapshot is another file: saving this one cannot overwrite it)
        if self.pending is not None:  # same file: saving starts once the user has decided
            from napari.utils.notifications import show_info

            show_info(f"{info.describe()} for {layer.name}: restore or discard it in the Export dock.")
            self.restore_available.emit(info)

    def _on_paint(self, event) -> None:
        if self.saver is None:
            return
        for atom in event.value:
            box = _atom_box(atom)
            if box is None:
                self.saver.mark_dirty()
                return
            self.saver.mark_dirty(*box)

    def _on_data(self, event=None) -> None:
        if self.saver is not None:
            self.saver.mark_dirty()

    def save_now(self):
        """Snapshot now (what the "Save snapshot" action and tests call)."""
        return self.saver.save_now() if self.saver is not None else None

    def restore(self) -> bool:
        """Write the offered snapshot into the labels layer (one undoable-free replacement) and start saving."""
        if self.pending is None or self._layer is None:
            return False
        data = level0_data(self._layer)
        restore(self.pending, out=data)
        self._layer.refresh()
        if self.saver is not None and self.pending.image_id != self.saver.image_id:
            discard(self.pending.image_id, root=self.root)  # moved to this layer's own snapshot
        self.pending = None
        self.saver.mark_dirty()
        self.saver.start()
        return True

    def discard(self) -> bool:
        """Forget the offered snapshot and start saving the layer as it is."""
        if self.pending is None:
            return False
        same = self.saver is not None and self.pending.image_id == self.saver.image_id
        discard(self.pending.image_id, root=self.root)
        self.pending = None
        if same:
            self.saver.generation = 0
            self.saver.mark_dirty()
            self.saver.start()
        return True

    def stop(self) -> None:
        """Stop saving the current layer (one last snapshot unless a restore offer is pending)."""
        if self._layer is not None:
            self._layer.events.paint.disconnect(self._on_paint)
            self._layer.events.data.disconnect(self._on_data)
        if self.saver is not None:
            self.saver.stop(final_save=self.pending is None)
        self.saver, self._layer = None, None


def _atom_box(atom) -> tuple[int, int, int, int] | None:
    """(y0, x0, h, w) in level-0 pixels of one paint-history atom, or None when it cannot be told."""
    try:
        keys = getattr(atom, "slice_key", None)
        if keys is not None:
            sy, sx = keys[-2], keys[-1]
            return int(sy.start), int(sx.start), int(sy.stop - sy.start), int(sx.stop - sx.start)
        ys, xs = (np.asarray(i) for i in atom[0][-2:])
        if ys.size == 0:
            return 0, 0, 0, 0
        return int(ys.min()), int(xs.min()), int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
