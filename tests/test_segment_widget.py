"""The Segment dock with a real viewer: labels and PPN patch layers equal the engine's output and sit on the
image at a non-zero working level; region choices; Cancel in the worker; errors become notifications."""
from __future__ import annotations

import numpy as np
import pytest

from _segment_helpers import channel_scene, write_channel_checkpoint
from napari_uhrseg.engine.segment import segment_image
from napari_uhrseg.io.pyramid import open_pyramid

pytestmark = pytest.mark.gui

SCALE, TRANSLATE = (0.5, 0.5), (10.0, 20.0)


@pytest.fixture
def setup(make_napari_viewer, tmp_path):
    from napari_uhrseg.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    image, truth = channel_scene((600, 700), seed=21)
    pyr = open_pyramid(image)
    levels = [np.asarray(lv) for lv in pyr.levels]
    layer = viewer.add_image(levels, multiscale=True, rgb=True, name="scene", scale=SCALE, translate=TRANSLATE)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.image_combo.set_layer(layer)
    widget.method_combo.setCurrentText("test-channels")
    widget.set_checkpoint(str(write_channel_checkpoint(tmp_path / "channels.pt")))
    widget.window_spin.setValue(128)
    return viewer, widget, layer, pyr, truth


def test_segment_dock_layers_match_the_engine_and_align_at_level1(setup, tmp_path):
    from _segment_helpers import ChannelMethod

    viewer, widget, layer, pyr, _ = setup
    widget.level_spin.setValue(1)
    result = widget.segment(sync=True)
    assert result is not None and not result.cancelled and result.windows_done == result.windows_total > 1
    expected = segment_image(pyr, ChannelMethod(), level=1, window=128, overlap=32)

    labels = viewer.layers["scene labels"]
    np.testing.assert_array_equal(np.asarray(labels.data), np.asarray(expected.store.array))
    assert labels.data.shape == pyr.level_shape(1)
    # A label pixel's centre in the world is the centre of the 2 x 2 level-0 pixels it covers.
    d = pyr.downsamples[1]
    for iy, ix in [(0, 0), (3, 5), (150, 170)]:
        centre0 = (iy * d + (d - 1) / 2, ix * d + (d - 1) / 2)
        np.testing.assert_allclose(labels.data_to_world((iy, ix)), layer.data_to_world(centre0), atol=1e-9)
    assert list(labels.features["class_name"]) == ChannelMethod.class_names

    shapes = viewer.layers["scene PPN patches"]
    assert len(shapes.data) == len(result.overlays) == 4 * result.windows_total
    assert set(shapes.features.columns) >= {"probability", "selected", "window"}
    np.testing.assert_allclose(shapes.features["probability"], [r["probability"] for r in result.overlays])
    for verts, rec in zip(shapes.data[:5], result.overlays[:5]):
        y0, x0, y1, x1 = rec["box"]
        # the rectangle's top-left vertex is the level-0 pixel corner (y0, x0) of the image
        np.testing.assert_allclose(shapes.data_to_world(verts.min(axis=0)),
                                   layer.data_to_world((y0 - 0.5, x0 - 0.5)), atol=1e-9)
        np.testing.assert_allclose(shapes.data_to_world(verts.max(axis=0)),
                                   layer.data_to_world((y1 - 0.5, x1 - 0.5)), atol=1e-9)
    colours = np.asarray(shapes.edge_color)
    assert len(np.unique(colours.round(3), axis=0)) > 1  # coloured by probability

    viewer.window.show()
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4 and shot[..., :3].std() > 0
    from skimage.io import imsave

    imsave(tmp_path / "segment_dock.png", shot)


def test_drawn_box_region(setup):
    viewer, widget, layer, pyr, truth = setup
    # a rectangle over level-0 pixels [100, 300) x [200, 420), drawn in world coordinates
    corners0 = np.array([[100, 200], [300, 420]], float) - 0.5
    world = np.array([layer.data_to_world(c) for c in corners0])
    boxes = viewer.add_shapes([np.array([world[0], [world[0][0], world[1][1]], world[1], [world[1][0], world[0][1]]])],
                              shape_type="rectangle", name="box")
    widget.region_combo.setCurrentText("Drawn box")
    widget.box_combo.set_layer(boxes)
    result = widget.segment(sync=True)
    assert result.region_level0 == pytest.approx((100, 200, 300, 420))
    labels = viewer.layers["scene labels"]
    np.testing.assert_array_equal(np.asarray(labels.data), truth[100:300, 200:420])
    # the labels' first pixel lands on level-0 pixel (100, 200) of the image
    np.testing.assert_allclose(labels.data_to_world((0, 0)), layer.data_to_world((100, 200)), atol=1e-9)


def test_worker_cancel_keeps_finished_windows(setup, qtbot, monkeypatch):
    import time

    from _segment_helpers import ChannelMethod

    viewer, widget, layer, pyr, truth = setup
    original = ChannelMethod.predict

    def slow_predict(self, window, *, context=None):  # slow enough for the GUI to see the first window
        time.sleep(0.3)
        return original(self, window, context=context)

    monkeypatch.setattr(ChannelMethod, "predict", slow_predict)
    widget.window_spin.setValue(256)
    with qtbot.waitSignal(widget.finished, timeout=60000) as blocker:
        worker = widget.segment(sync=False)
        worker.yielded.connect(lambda ev: widget.cancel())
    result = blocker.args[0]
    assert result.cancelled and 1 <= result.windows_done < result.windows_total
    labels = np.asarray(viewer.layers["scene labels"].data)
    assert (labels > 0).any() and (labels == 0).any()
    first = widget.result.timings["windows"][0]["window"]
    assert first == 0 and widget.segment_button.isEnabled()


def test_bad_checkpoint_is_a_notification_not_a_crash(setup, tmp_path, monkeypatch):
    viewer, widget, layer, pyr, _ = setup
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", lambda msg: shown.append(msg))
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    widget.set_checkpoint(str(bad))
    seen = []
    widget.finished.connect(seen.append)
    assert widget.segment(sync=True) is None
    assert isinstance(seen[0], Exception) and shown and "broken.pt" in shown[0]
    assert "scene labels" not in viewer.layers and widget.segment_button.isEnabled()


def test_a_users_labels_layer_is_never_overwritten_and_reruns_reuse_the_result_layer(setup):
    viewer, widget, layer, pyr, truth = setup
    scribbles = np.zeros(pyr.shape, np.uint8)
    scribbles[10:20, 10:20] = 2
    viewer.add_labels(scribbles, name="scene labels", scale=SCALE, translate=TRANSLATE)
    widget.window_spin.setValue(256)
    widget.segment(sync=True)
    assert (np.asarray(viewer.layers["scene labels"].data) == scribbles).all()
    result_layer = viewer.layers["scene labels [1]"]
    np.testing.assert_array_equal(np.asarray(result_layer.data), truth)
    n_layers = len(viewer.layers)
    widget.segment(sync=True)  # a second run goes into the same result layer
    assert len(viewer.layers) == n_layers and viewer.layers["scene labels [1]"] is result_layer


def test_current_view_maps_napari_corner_pixels_through_the_displayed_level():
    from types import SimpleNamespace

    from napari_uhrseg.widgets._layers import view_box_level0

    # napari shows level 2 (downsample 4) and pixels [10, 20] x [5, 30] of it are on screen (inclusive corners)
    layer = SimpleNamespace(corner_pixels=np.array([[10, 5], [20, 30]]), multiscale=True,
                            downsample_factors=np.array([[1, 1], [2, 2], [4, 4]]), data_level=2)
    assert view_box_level0(layer) == (40.0, 20.0, 84.0, 124.0)
    single = SimpleNamespace(corner_pixels=np.array([[0, 3, 7], [0, 9, 12]]), multiscale=False)
    assert view_box_level0(single) == (3.0, 7.0, 10.0, 13.0)  # leading non-spatial axis ignored


def test_the_dock_follows_the_shared_checkpoint_and_takes_its_window(setup, tmp_path):
    """A checkpoint trained (or loaded) in another dock becomes the Segment dock's choice, and the window spin
    takes the window the checkpoint was made for."""
    import torch

    from napari_uhrseg.methods.base import read_checkpoint_meta, save_checkpoint
    from napari_uhrseg.widgets.state import get_state

    viewer, widget, layer, pyr, truth = setup
    meta = dict(read_checkpoint_meta(write_channel_checkpoint(tmp_path / "base.pt")), window=96)
    trained = save_checkpoint(tmp_path / "trained.pt", {"dummy": torch.zeros(1)}, meta)
    widget.method_combo.setCurrentText("grnet")
    state = get_state(viewer)
    state.method = "test-channels"  # what the Train dock sets when a round ends
    state.checkpoint = str(trained)
    assert widget.method_combo.currentText() == "test-channels"
    assert widget.checkpoint_path() == str(trained) and widget.window_spin.value() == 96
    result = widget.segment(sync=True)
    assert result.windows_total > 1 and max(max(shape) for shape in widget._method.calls) == 96


def test_refine_patches_choice_sets_grnets_rule(setup):
    """The dock's "Refine patches" choice reaches GRNet: the G-branch's 4 most doubtful patches of each window
    are refined (the PPN layer marks them), or none with "none (G-branch only)"; it is greyed out for others."""
    viewer, widget, layer, pyr, _ = setup
    assert not widget.patches_combo.isEnabled()  # test-channels has no patches to choose
    widget.method_combo.setCurrentText("grnet")  # the shipped starter
    assert widget.patches_combo.isEnabled()
    widget.window_spin.setValue(256)
    widget.patches_combo.setCurrentText("4 most doubtful (G-branch)")
    result = widget.segment(sync=True)
    s = widget._method.settings
    assert (s.scorer, s.selection, s.top_k, s.mode) == ("uncertainty", "topk", 4, "ppn")
    per_window = {}
    for r in result.overlays:
        per_window[r["window"]] = per_window.get(r["window"], 0) + r["selected"]
    assert len(per_window) == result.windows_total > 1 and set(per_window.values()) == {4}
    shapes = viewer.layers["scene PPN patches"]
    assert int(np.sum(shapes.features["selected"])) == 4 * result.windows_total
    widget.patches_combo.setCurrentText("none (G-branch only)")
    result = widget.segment(sync=True)
    assert widget._method.settings.mode == "global" and not any(r["selected"] for r in result.overlays)
