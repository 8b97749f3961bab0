"""The Refine dock's keyboard shortcuts, pressed as real key events on the canvas of a real viewer: K toggles
click mode, Shift+B readies the refine brush, Shift+R refines, Escape leaves click mode; none clashes with a
napari default, the user guide lists them all, and they go away with the dock."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_uhrseg.methods.cascadepsp import CascadePSP
from napari_uhrseg.widgets.refine import BRUSH_NAME, SHORTCUTS

pytestmark = pytest.mark.gui
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"


class GrowDouble(torch.nn.Module):
    """Test double of the network: the refined mask is the input dilated by 4 px."""

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = F.max_pool2d(seg, 9, stride=1, padding=4) * 10
        return {k: out for k in ("s8_1", "s8_2", "s4_2", "s8_3", "s4_3", "full")}


@pytest.fixture
def dock(make_napari_viewer, qtbot):
    from napari_uhrseg.widgets.refine import RefineWidget

    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), name="img", rgb=True)
    labels = np.zeros((256, 256), np.uint8)
    labels[80:160, 80:160] = 1
    viewer.add_labels(labels, name="img labels")
    widget = RefineWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Refine and click")
    widget.synchronous = True
    widget.refiner = CascadePSP(GrowDouble())
    return viewer, widget


def _press(qtbot, viewer, key: str):
    """A real key press on the canvas, e.g. "K" or "Shift+B"."""
    from qtpy.QtCore import Qt

    *mods, name = key.split("+")
    modifier = Qt.ShiftModifier if "Shift" in mods else Qt.NoModifier
    qt_key = {"Escape": Qt.Key_Escape}.get(name) or getattr(Qt, f"Key_{name.upper()}")
    native = viewer.window._qt_viewer.canvas.native
    native.setFocus()
    qtbot.keyClick(native, qt_key, modifier)


def test_no_shortcut_shadows_a_napari_default():
    from napari.utils.key_bindings import coerce_keybinding
    from napari.utils.shortcuts import default_shortcuts

    napari_keys = {coerce_keybinding(k) for keys in default_shortcuts.values() for k in keys}
    ours = {coerce_keybinding(k) for k in SHORTCUTS if k != "Escape"}  # Escape: napari's are layer-level only
    assert ours and not ours & napari_keys


def test_the_user_guide_lists_every_shortcut():
    text = GUIDE.read_text()
    for key in SHORTCUTS:
        assert f"| `{key}` |" in text, f"{key} is missing from the shortcuts table of {GUIDE.name}"


def test_k_toggles_click_mode_and_stops_painting(qtbot, dock):
    viewer, widget = dock
    labels = viewer.layers["img labels"]
    viewer.layers.selection.active = labels
    labels.mode = "paint"
    _press(qtbot, viewer, "K")
    assert widget.click_button.isChecked() and widget._on_click in viewer.mouse_drag_callbacks
    assert labels.mode == "pan_zoom"  # a click segments; it must not paint a brush dot as well
    _press(qtbot, viewer, "K")
    assert not widget.click_button.isChecked() and widget._on_click not in viewer.mouse_drag_callbacks
    _press(qtbot, viewer, "K")
    viewer.layers.selection.active = labels  # Escape works with a Labels layer selected too
    _press(qtbot, viewer, "Escape")
    assert not widget.click_button.isChecked() and widget._on_click not in viewer.mouse_drag_callbacks


def test_shift_b_readies_the_brush_and_shift_r_refines_inside_it(qtbot, dock):
    viewer, widget = dock
    labels = viewer.layers["img labels"]
    _press(qtbot, viewer, "K")
    _press(qtbot, viewer, "Shift+B")
    assert BRUSH_NAME in viewer.layers
    brush = viewer.layers[BRUSH_NAME]
    assert viewer.layers.selection.active is brush and brush.mode == "paint" and brush.selected_label == 1
    assert not widget.click_button.isChecked()  # brushing and click mode exclude each other
    brush.paint((120, 160), 1)  # what a brush stroke over the square's right border does
    brushed = brush.data > 0
    before = labels.data.copy()
    _press(qtbot, viewer, "Shift+R")
    changed = labels.data != before
    assert changed.any(), widget.status.text()
    assert not changed[~brushed].any()
    assert not brush.data.any()
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    _press(qtbot, viewer, "Shift+B")  # again: the same layer, not a second one
    assert [lay.name for lay in viewer.layers].count(BRUSH_NAME) == 1


def test_keys_go_away_with_the_dock(qtbot, dock):
    from napari.utils.key_bindings import coerce_keybinding

    viewer, widget = dock
    assert all(coerce_keybinding(k) in viewer.keymap for k in SHORTCUTS)
    viewer.window.remove_dock_widget(widget)
    widget.deleteLater()
    qtbot.waitUntil(lambda: not any(coerce_keybinding(k) in viewer.keymap for k in SHORTCUTS), timeout=5000)
