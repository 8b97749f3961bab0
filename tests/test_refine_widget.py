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


def _refine_dock(viewer, qtbot):
    """The Refine dock on ``viewer``, running its jobs in the test's thread with the test double."""
    from napari_uhrseg.widgets.refine import RefineWidget

    widget = RefineWidget(viewer)
    qtbot.addWidget(widget)
    widget.synchronous = True
    widget.refiner = CascadePSP(GrowDouble())
    return widget


def _noise_image(viewer):
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    viewer.add_image(image, name="img", rgb=True)
    return image


@pytest.fixture
def dock(make_napari_viewer, qtbot):
    from napari_uhrseg.widgets.refine import BRUSH_NAME

    viewer = make_napari_viewer()
    _noise_image(viewer)
    labels = np.zeros((256, 256), np.uint8)
    labels[80:160, 80:160] = 1
    viewer.add_labels(labels, name="img labels")
    widget = _refine_dock(viewer, qtbot)
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


def test_click_seeds_from_the_segment_output(make_napari_viewer, qtbot):
    """The Segment dock's "<image> labels" is the click's prediction by default: two fields of the same colour
    side by side, told apart only by the prediction — the click paints (into another labels layer) the one under
    it, where a seed grown from the colours would take both."""
    from napari_uhrseg.widgets.refine import NO_PREDICTION, RefineWidget

    viewer = make_napari_viewer()
    rng = np.random.default_rng(2)
    image = np.clip(rng.normal((200, 180, 120), 10, (300, 300, 3)), 0, 255).astype(np.uint8)
    fields = np.zeros((300, 300), bool)
    fields[100:180, 40:260] = True
    image[fields] = np.clip(rng.normal((70, 120, 60), 10, (fields.sum(), 3)), 0, 255).astype(np.uint8)
    prediction = np.ones((300, 300), np.uint8)
    prediction[100:180, 150:260] = 2  # the right-hand field is another class
    viewer.add_image(image, name="img", rgb=True)
    viewer.add_labels(prediction, name="img labels")
    annotations = viewer.add_labels(np.zeros((300, 300), np.uint8), name="annotations")
    widget = _refine_dock(viewer, qtbot)
    widget.labels_combo.setCurrentText("annotations")
    assert widget.prediction_combo.currentText() == "img labels"
    late = RefineWidget(viewer)  # a dock opened before the Segment output exists takes it when it appears
    qtbot.addWidget(late)
    viewer.layers.remove("img labels")
    assert late.prediction_combo.currentText() == NO_PREDICTION
    viewer.add_labels(prediction, name="img labels")
    assert late.prediction_combo.currentText() == "img labels"
    annotations.selected_label = 3
    widget.click_at((140.0, 200.0))
    painted, right = annotations.data == 3, prediction == 2
    assert (painted & right).sum() / (painted | right).sum() > 0.8, widget.status.text()
    viewer.add_labels(np.zeros((10, 10), np.uint8), name="small")
    widget.prediction_combo.setCurrentText("small")
    widget._run = lambda job, done: None  # only the status line before the job matters here
    widget.click_at((140.0, 200.0))
    assert "not the size of the labels" in widget.status.text()
    assert NO_PREDICTION in [widget.prediction_combo.itemText(i) for i in range(widget.prediction_combo.count())]


def test_labels_of_a_segmented_region_refine_and_click_in_place(make_napari_viewer, qtbot):
    """A Segment run on a region gives a labels layer of the region's size, translated onto the image: Refine and
    click work on it in place (before 2026-12-03 its pixels were stretched over the whole image)."""
    from napari_uhrseg.engine.refine import refine_region

    viewer = make_napari_viewer()
    image = _noise_image(viewer)
    whole = np.zeros((256, 256), np.uint8)
    whole[80:160, 80:160] = 1
    region = viewer.add_labels(whole[40:200, 60:230].copy(), name="img labels", translate=(40, 60))
    widget = _refine_dock(viewer, qtbot)
    brush = widget.add_brush_layer()
    assert brush.data.shape == region.data.shape and tuple(brush.translate) == (40, 60)
    brush.data[60:100, 90:115] = 1  # image rows 100–140, columns 150–175: across the square's right edge
    before = region.data.copy()
    widget.refine()
    changed = region.data != before
    assert changed.any(), widget.status.text()
    brushed = np.zeros((256, 256), np.uint8)
    brushed[100:140, 150:175] = 1
    expected = whole.copy()
    refine_region(image, whole, brushed, refiner=CascadePSP(GrowDouble())).apply(expected)
    assert np.array_equal(region.data, expected[40:200, 60:230])  # the same pixels as whole-image labels
    region.undo()
    assert np.array_equal(region.data, before)
    region.selected_label = 2
    widget.click_at((120.0, 120.0))  # world = image pixels: inside the square
    assert region.data[80, 60] == 2, widget.status.text()  # image pixel (120, 120) in the region's own pixels
    region.translate = (200, 200)  # moved by hand past the image's edge: said, nothing changed
    before = region.data.copy()
    widget.refine()
    assert "do not fit" in widget.status.text() and np.array_equal(region.data, before)
    widget.click_at((220.0, 220.0))
    assert "do not fit" in widget.status.text() and np.array_equal(region.data, before)
