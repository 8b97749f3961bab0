"""The Train dock in a real viewer: scribbles -> a short GRNet round -> checkpoint, curves, live preview; Stop and
Resume. Small scene and crops so that a round takes seconds on one CPU thread."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.widgets.state import get_state

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("private_folders")]


@pytest.fixture
def dock(make_napari_viewer):
    from napari_uhrseg.widgets.train import TrainWidget

    viewer = make_napari_viewer()
    image, scribbles = scribbled_scene()
    img = viewer.add_image(image, name="scene", rgb=True)
    lab = viewer.add_labels(scribbles, name="scene scribbles")
    state = get_state(viewer)
    state.image_layer, state.labels_layer = img, lab
    w = TrainWidget(viewer)
    w.classes_edit.setText(", ".join(NAMES))
    w.iterations.setValue(6)
    w.crop.setValue(128)
    w.val_share.setValue(0.25)
    return w


def test_a_short_round_saves_a_checkpoint_plots_and_updates_the_view(qtbot, dock):
    from napari_uhrseg.methods.base import load_checkpoint

    assert "grnet" in [dock.method_combo.itemText(i) for i in range(dock.method_combo.count())]
    dock.method_combo.setCurrentText("grnet")
    with qtbot.waitSignal(dock.live_updated, timeout=120000) as live, \
            qtbot.waitSignal(dock.finished, timeout=120000) as done:
        dock.start()
    result = done.args[0]
    assert not isinstance(result, BaseException), result
    path, method, names, best = result
    state_dict, meta = load_checkpoint(path, method="grnet", class_names=NAMES)
    assert meta["frozen_backbone"] is True and meta["window"] == 128 and state_dict
    assert path.parent.name == "checkpoints" and path.name.startswith("scene-grnet")
    assert len(dock.curves.loss) == 6 and all(np.isfinite(v) for _, v in dock.curves.loss)
    assert dock.curves.miou and 0.0 <= dock.curves.miou[-1][1] <= 1.0
    state = get_state(dock.viewer)
    assert state.checkpoint == str(path) and state.method == "grnet" and state.class_names == tuple(NAMES)
    preview = live.args[0]
    assert preview.name == "scene live prediction"
    values = set(np.unique(preview.data).tolist())
    assert values and values <= {1, 2, 3}  # every pixel gets a class, never "unlabelled"
    assert dock.start_button.isEnabled() and not dock.stop_button.isEnabled()
    # the GRNet just trained is what a MagNet refiner would start from (its G-branch as the backbone)
    dock.method_combo.setCurrentText("magnet")
    assert dock.init_path() == str(path)
    dock.method_combo.setCurrentText("grnet")
    assert dock.init_path() is None  # GRNet starts from ImageNet weights


def test_the_method_list_and_a_cascadepsp_round_that_feeds_the_refine_dock(qtbot, dock):
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.widgets.refine import RefineWidget

    methods = [dock.method_combo.itemText(i) for i in range(dock.method_combo.count())]
    assert {"grnet", "magnet", "cascadepsp"} <= set(methods)
    assert "refiner" in dock.method_combo.itemData(methods.index("magnet"), Qt.ToolTipRole)
    dock.method_combo.setCurrentText("cascadepsp")
    assert dock.init_combo.isEnabled() and dock.init_path() is None  # None: the shipped refiner
    dock.iterations.setValue(3)
    dock.crop.setValue(64)
    with qtbot.waitSignal(dock.finished, timeout=120000) as done:
        dock.start()
    result = done.args[0]
    assert not isinstance(result, BaseException), result
    path = result[0]
    state = get_state(dock.viewer)
    assert state.refiner_checkpoint == str(path) and state.method is None  # the segmenter choice is untouched
    assert "scene live prediction" not in dock.viewer.layers  # a refiner segments nothing by itself
    saved, meta = load_checkpoint(path, method="cascadepsp")
    assert meta["trained_on"] == "scribbles in napari" and meta["painted_classes"] == NAMES
    refine = RefineWidget(dock.viewer)
    refiner = refine._refiner()
    weights = refiner.model.state_dict()
    assert all(torch.equal(weights[k].float(), v.float()) for k, v in saved.items())


def test_stop_keeps_a_checkpoint_and_resume_goes_on(qtbot, dock):
    dock.live.setChecked(False)
    dock.iterations.setValue(8)
    steps = []

    def stop_after_two(ev):
        steps.append(ev.step)
        if ev.step == 2:
            dock.stop()

    dock.stepped.connect(stop_after_two)
    with qtbot.waitSignal(dock.finished, timeout=120000) as done:
        dock.start()
    dock.stepped.disconnect(stop_after_two)
    path = done.args[0][0]
    assert path.exists() and path.with_name(path.stem + ".last.pt").exists()
    assert max(steps) < 8 and dock.resume_button.isEnabled()
    stopped_at = max(steps)

    steps.clear()
    dock.stepped.connect(lambda ev: steps.append(ev.step))
    with qtbot.waitSignal(dock.finished, timeout=120000) as done:
        dock.start(resume=True)
    assert done.args[0][0] == path
    assert min(steps) == stopped_at + 1 and max(steps) == 8


def test_bad_input_is_a_clear_message(qtbot, dock, monkeypatch):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    dock.classes_edit.setText("unlabelled, only")
    with qtbot.waitSignal(dock.finished, timeout=30000):
        dock.start()
    assert "at least two classes" in errors[-1]
    dock.classes_edit.setText(", ".join(NAMES))
    dock.labels_combo.layer().data[:] = 0
    with qtbot.waitSignal(dock.finished, timeout=30000):
        dock.start()
    assert "Nothing is painted" in errors[-1]


def test_scribbles_on_a_segmented_region_train_where_they_lie(qtbot, dock, monkeypatch):
    """Strokes painted on a region-sized labels layer (a Segment run on a box) are read with the image pixels
    under them: the job records the layer's frame and the worker places the strokes in it."""
    import threading

    import napari_uhrseg.engine.scribbles as S
    import napari_uhrseg.widgets.train as T

    viewer = dock.viewer
    _, scribbles = scribbled_scene()
    region = viewer.add_labels(scribbles[64:192, 32:224].copy(), name="region strokes", translate=(64, 32))
    dock.labels_combo.set_layer(region)
    job = dock._prepare(False)
    assert job["frames"]["region strokes"]["origin"] == (64.0, 32.0)
    items, real = [], S.labelled_item

    def stop(*a, **k):
        raise RuntimeError("stop after reading the strokes")

    monkeypatch.setattr(S, "labelled_item", lambda *a, **k: items.append(real(*a, **k)) or items[-1])
    monkeypatch.setattr(S, "start_session", stop)
    with pytest.raises(RuntimeError, match="stop after"):
        next(T._train_job(job, threading.Event(), None))
    (item,) = items  # the strokes' box plus a 256 px margin: here the whole 256² scene
    expected = np.zeros_like(scribbles)
    expected[64:192, 32:224] = scribbles[64:192, 32:224]
    np.testing.assert_array_equal(item.labels, expected)
