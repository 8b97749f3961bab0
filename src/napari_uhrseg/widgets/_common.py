"""Small Qt pieces the docks share: a layer chooser that follows the viewer, and error reporting."""
from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QProgressBar


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type (by name), kept up to date as layers come and go."""

    def __init__(self, viewer, layer_type: type, parent=None, *, allow_none: bool = False):
        super().__init__(parent)
        self._viewer = viewer
        self._type = layer_type
        self._allow_none = allow_none
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._on_layers_changed)
        self.destroyed.connect(lambda *_: self._disconnect(events))
        self.refresh()

    def _disconnect(self, events) -> None:
        for ev in (events.inserted, events.removed, events.moved):
            ev.disconnect(self._on_layers_changed)

    def _on_layers_changed(self, event=None) -> None:
        layer = getattr(event, "value", None)
        if isinstance(layer, self._type) and event.type == "inserted":
            layer.events.name.connect(lambda *_: self.refresh())
        self.refresh()

    def layers(self) -> list:
        return [lay for lay in self._viewer.layers if isinstance(lay, self._type)]

    def refresh(self) -> None:
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self._allow_none:
            self.addItem("")
        self.addItems([lay.name for lay in self.layers()])
        idx = self.findText(current)
        self.blockSignals(False)
        if idx >= 0:
            self.setCurrentIndex(idx)
        elif self.count():
            self.setCurrentIndex(self.count() - 1 if not self._allow_none else 0)
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any:
        """The chosen layer, or None."""
        name = self.currentText()
        return next((lay for lay in self.layers() if lay.name == name), None)

    def set_layer(self, layer) -> None:
        if layer is not None and layer in self.layers():
            self.setCurrentIndex(self.findText(layer.name))


class QueuedProgressBar(QProgressBar):
    """A progress bar whose changes are painted on a later turn of the event loop.

    ``QProgressBar.setValue`` repaints at once, and a repaint of a widget inside napari's window also
    composites the window with its OpenGL canvas: 45-80 ms of the GUI thread per window of a run with software
    OpenGL (measured by tests/test_heartbeat.py). Here the change is only scheduled (``update``), like any other
    widget's, and Qt paints it with everything else that is due."""

    def _queued(self, change, *args) -> None:
        if not self.updatesEnabled():
            change(*args)
            return
        self.setUpdatesEnabled(False)  # repaint() is then a no-op ...
        try:
            change(*args)
        finally:
            self.setUpdatesEnabled(True)  # ... and this schedules the paint
        self.update()

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt's name
        self._queued(super().setValue, value)

    def setRange(self, minimum: int, maximum: int) -> None:  # noqa: N802
        self._queued(super().setRange, minimum, maximum)


def notify_error(exc: BaseException, what: str) -> None:
    """Show an error in napari: the message as is for our errors (they say what to do), else with its type."""
    from napari.utils.notifications import show_error

    from napari_uhrseg.errors import UhrsegError

    msg = str(exc) if isinstance(exc, UhrsegError) else f"{what} failed: {type(exc).__name__}: {exc}"
    show_error(msg)


def level0_data(layer):
    """The full-resolution array of a (possibly multiscale) layer."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


_FROZEN = False


def freeze_long_lived_objects() -> None:
    """Exclude the objects alive now (napari, Qt wrappers, modules) from Python's full garbage collections.

    A full collection holds the GIL while it walks every tracked object: in a viewer process that is hundreds
    of thousands of objects and 0.3-1 s, during which the event loop cannot run — a worker that allocates a
    lot (building a model) triggers such collections. ``gc.freeze()`` moves what exists to a permanent
    generation once, so later collections only walk what was created since. Called when a dock starts its first
    long job (by then the viewer is built).
    """
    global _FROZEN
    if not _FROZEN:
        import gc

        gc.freeze()
        _FROZEN = True


_HELD = 0
_SAVED_THRESHOLD: tuple[int, int, int] | None = None
_SAVED_SWITCH: float | None = None
#: CPython's GIL switch interval while a worker job runs (its default is 5 ms).
JOB_SWITCH_INTERVAL_S = 0.0005


def hold_full_collections(hold: bool) -> None:
    """While a worker job runs (``hold=True`` at its start, ``False`` at its end), skip Python's *full*
    (generation-2) collections and hand the GIL over faster.

    Collections: young-generation collections go on, so short-lived cycles are still freed; but even after
    ``freeze_long_lived_objects`` a full collection walks everything created since, with the GIL held — a few
    hundred ms on a busy machine, a visible freeze. The next full collection runs as usual once the job ends.

    GIL: the GUI thread gives the GIL up at each call into Qt or OpenGL and then waits for it; while the worker
    runs Python (building a model, reading, stitching) it gets it back only at CPython's switch interval. Each
    of the hundreds of such calls a redraw makes then costs up to 5 ms (the convoy effect: 100 calls of 0.2 ms
    took 1.0 s next to a busy Python thread at the default 5 ms, 0.25 s at 0.5 ms). The interval is lowered to
    ``JOB_SWITCH_INTERVAL_S`` while a job runs; a worker that waits for nobody is not slowed.

    Jobs nest (a count); the settings come back when the last one ends.
    """
    import gc
    import sys

    global _HELD, _SAVED_THRESHOLD, _SAVED_SWITCH
    if hold:
        if _HELD == 0:
            _SAVED_THRESHOLD = gc.get_threshold()
            gc.set_threshold(_SAVED_THRESHOLD[0], _SAVED_THRESHOLD[1], 2**31 - 1)
            _SAVED_SWITCH = sys.getswitchinterval()
            sys.setswitchinterval(min(_SAVED_SWITCH, JOB_SWITCH_INTERVAL_S))
        _HELD += 1
    elif _HELD > 0:
        _HELD -= 1
        if _HELD == 0:
            if _SAVED_THRESHOLD is not None:
                gc.set_threshold(*_SAVED_THRESHOLD)
            if _SAVED_SWITCH is not None:
                sys.setswitchinterval(_SAVED_SWITCH)


_WARM = False


def warm_up_torch() -> None:
    """Run torch's one-time initialisation now, on the GUI thread (about 0.1 s, once per process).

    The first convolution, batch norm and backward pass of a process initialise torch internals while holding
    the GIL; done first inside a worker, that froze the viewer for 250-450 ms in the heartbeat measurements.
    Docks call this when they open, so the cost is paid then, not in the middle of a run.
    """
    global _WARM
    if _WARM:
        return
    import torch
    from torch import nn

    layer = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    layer(torch.zeros(1, 3, 8, 8)).sum().backward()
    _WARM = True
