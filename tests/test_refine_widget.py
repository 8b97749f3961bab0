"""Refine dock in a real viewer: Refine changes only brushed pixels as ONE undo step; click mode paints/undoes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_uhrseg.methods.cascadepsp import CascadePSP

pytestmark = pytest.mark.gui


class GrowDouble(torch.nn.Module):
    """Test double of the network: the refined mask is the input dilated by 4 px."""

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = F.max_pool2d(seg, 9, stride=1, padding=4) * 10
        return {k: out for k in ("s8_1", "s8_2", "s4_2", "s8_3", "s4_3", "full")}


@pytest.fixture
def dock(make_napari_viewer, qtbot):
    from napari_uhrseg.widgets.refine import BRUSH_NAME, RefineWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    viewer.add_image(image, name="img", rgb=True)
    labels = np.zeros((256, 256), np.uint8)
    labels[80:160, 80:160] = 1
    viewer.add_labels(labels, name="img labels")
    widget = RefineWidget(viewer)
    qtbot.addWidget(widget)
    widget.synchronous = True
    widget.refiner = CascadePSP(GrowDouble())
    return viewer, widget, BRUSH_NAME


def test_refine_is_one_undo_step_inside_the_brush(dock):
    viewer, widget, brush_name = dock
    assert widget.image_combo.currentText() == "img" and widget.labels_combo.currentText() == "img labels"
    brush = widget.add_brush_layer()
    assert brush.name == brush_name and brush.data.shape == (256, 256)
    brush.data[100:140, 150:175] = 1
    labels = viewer.layers["img labels"]
    before = labels.data.copy()
    widget.refine()
    changed = labels.data != before
    assert changed.any(), widget.status.text()
    outside = np.ones_like(changed)
    outside[100:140, 150:175] = False
    assert not changed[outside].any()
    assert not brush.data.any()  # the brush is cleared for the next stroke
    labels.undo()
    assert np.array_equal(labels.data, before)  # one undo step restores everything


def test_refine_without_brush_says_what_to_do(dock):
    viewer, widget, _ = dock
    widget.add_brush_layer()
    before = viewer.layers["img labels"].data.copy()
    widget.refine()
    assert "Nothing is brushed" in widget.status.text()
    assert np.array_equal(viewer.layers["img labels"].data, before)


def test_click_mode_paints_and_escape_leaves(dock):
    viewer, widget, _ = dock
    labels = viewer.layers["img labels"]
    labels.selected_label = 2
    widget.click_button.setChecked(True)
    assert widget._on_click in viewer.mouse_drag_callbacks
    before = labels.data.copy()
    widget.click_at((120.0, 120.0))  # on the labelled square: the grown seed is snapped and painted
    assert (labels.data == 2).any(), widget.status.text()
    labels.undo()
    assert np.array_equal(labels.data, before)
    widget._escape()
    assert widget._on_click not in viewer.mouse_drag_callbacks and not widget.click_button.isChecked()
