"""The Checkpoints dock and the autosave controller in a real viewer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uhrseg.checkpoints import CheckpointManager
from napari_uhrseg.methods.base import save_checkpoint
from napari_uhrseg.widgets.state import get_state

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _private_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def _write(path, method="grnet", classes=("bg", "road", "water")):
    meta = {"method": method, "preset": "fast", "class_names": list(classes),
            "normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    return save_checkpoint(path, {"w": torch.ones(2)}, meta)


def test_checkpoints_dock_load_rename_delete_import_export(make_napari_viewer, tmp_path, monkeypatch):
    from napari_uhrseg.widgets import checkpoints as dock_module

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer()
    manager = CheckpointManager(starters_dir=tmp_path / "no-starters")
    _write(manager.folder / "run1.pt")
    dock = dock_module.CheckpointsWidget(viewer, manager=manager)
    assert dock.list_widget.count() == 1

    dock.select("run1")
    info = dock.load_selected()
    state = get_state(viewer)
    assert state.checkpoint == str(info.path) and state.method == "grnet"
    assert state.class_names == ("bg", "road", "water")

    dock.rename_selected("roads v2")
    assert state.checkpoint.endswith("roads v2.pt") and dock.selected().name == "roads v2"

    outside = _write(tmp_path / "other.pt", method="magnet")
    dock.import_file(str(outside))
    assert sorted(i.name for i in manager.list()) == ["other", "roads v2"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert dock.import_file(str(bad)) is None
    assert errors and "damaged" in errors[-1] and str(bad) in errors[-1]

    dock.select("other")
    out = dock.export_selected(str(tmp_path / "exported.pt"))
    assert out.read_bytes() == outside.read_bytes()
    dock.delete_selected()
    assert [i.name for i in manager.list()] == ["roads v2"]


def test_autosave_snapshots_paint_and_offers_restore(make_napari_viewer):
    from napari_uhrseg.widgets.autosave import autosave_for

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((300, 300), np.uint8), name="scene")
    labels = viewer.add_labels(np.zeros((300, 300), np.uint8), name="scene labels")
    state = get_state(viewer)
    state.image_layer = image
    state.labels_layer = labels
    ctrl = autosave_for(viewer)
    assert ctrl.pending is None and ctrl.saver is not None
    labels.paint((100, 120), 2, refresh=False)
    painted = labels.data.copy()
    assert ctrl.save_now() is not None
    offered = []
    ctrl.restore_available.connect(offered.append)

    # another labels layer of the same image (the Segment dock's output, say) while the painted one is open:
    # it gets its own snapshot and is not offered the other's
    other = viewer.add_labels(np.zeros((300, 300), np.uint8), name="scene other")
    state.labels_layer = other
    assert ctrl.pending is None and offered == [] and ctrl.saver is not None
    other.paint((10, 10), 1, refresh=False)
    assert ctrl.save_now() is not None
    state.labels_layer = labels  # back: its own snapshot equals it, nothing to ask
    assert ctrl.pending is None and offered == []
    ctrl.stop()

    # a layer closed in this session is not offered to another one
    viewer.layers.remove(other)
    third = viewer.add_labels(np.zeros((300, 300), np.uint8), name="scene third")
    state.labels_layer = third
    assert ctrl.pending is None and offered == []
    ctrl.stop()

    # "reopen": a new session (another viewer) on the same image, whose fresh labels layer has another name,
    # is offered what the painted layer left
    viewer2 = make_napari_viewer()
    viewer2.add_image(np.zeros((300, 300), np.uint8), name="scene")
    fresh = viewer2.add_labels(np.zeros((300, 300), np.uint8), name="scene labels 2")
    state2 = get_state(viewer2)
    state2.image_layer = viewer2.layers["scene"]
    state2.labels_layer = fresh
    ctrl2 = autosave_for(viewer2)
    assert ctrl2.pending is not None and ctrl2.pending.image_id.endswith("labels: scene labels")
    assert ctrl2.restore()
    np.testing.assert_array_equal(fresh.data, painted)
    ctrl2.stop()
    ctrl = ctrl2
    from napari_uhrseg.engine.autosave import list_autosaves

    names = sorted(i.image_id.rpartition(" | labels: ")[2] for i in list_autosaves(root=ctrl.root))
    assert names == ["scene labels 2", "scene other", "scene third"]  # the restored one moved to the fresh layer's
