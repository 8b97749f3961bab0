"""Training from scribbles without a viewer: the painted region, the frozen backbone, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.engine.scribbles import (
    TrainingSettings,
    labelled_box,
    labelled_item,
    start_session,
    trainable_methods,
)
from napari_uhrseg.errors import CheckpointError, UhrsegError
from napari_uhrseg.io.pyramid import open_pyramid



@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the suite shares two cores, and oversubscribed threads make training crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_labelled_box_and_item_read_only_the_painted_area():
    labels = np.zeros((300, 400), np.uint8)
    assert labelled_box(labels) is None
    labels[100:110, 200:260] = 2
    assert labelled_box(labels) == (100, 200, 110, 260)
    assert labelled_box(labels, margin=150) == (0, 50, 260, 400)
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    item = labelled_item(open_pyramid(image, name="img"), labels, margin=20)
    assert item.image.shape == (50, 100, 3) and item.labels.shape == (50, 100)
    np.testing.assert_array_equal(item.image, image[80:130, 180:280])
    with pytest.raises(UhrsegError, match="Nothing is painted on img"):
        labelled_item(open_pyramid(image, name="img"), np.zeros((300, 400), np.uint8))
    with pytest.raises(UhrsegError, match="paint on a labels layer made for this image"):
        labelled_item(open_pyramid(image, name="img"), np.zeros((30, 40), np.uint8))


def test_labels_of_a_region_train_on_the_pixels_they_cover():
    # A region-sized labels layer (placed by the dock with FramedLabels): the training item is read where the
    # strokes lie on the image, not at the image's corner.
    from napari_uhrseg.engine.refine import FramedLabels

    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    region = np.zeros((120, 150), np.uint8)
    region[20:30, 40:100] = 2  # image rows 120–130, columns 240–300
    framed = FramedLabels(region, (300, 400), (100, 200))
    assert labelled_box(framed) == (120, 240, 130, 300) and labelled_box(framed, margin=20) == (100, 220, 150, 320)
    item = labelled_item(open_pyramid(image, name="img"), framed, margin=20)
    np.testing.assert_array_equal(item.image, image[100:150, 220:320])
    assert item.labels.shape == (50, 100) and (item.labels == 2).sum() == 600 and item.labels[20, 20] == 2


def test_place_in_frame_takes_the_readers_level_shape():
    from napari_uhrseg.widgets._layers import place_in_frame

    data = np.ones((40, 50), np.uint8)
    frame = {"downsample": (2.0, 2.0), "origin": (10.0, 20.0), "level0": (301, 401)}
    assert place_in_frame(data, frame).shape == (151, 201)  # rounded up without the reader's levels
    assert place_in_frame(data, frame, level_shapes=[(301, 401), (150, 200), (75, 100)]).shape == (150, 200)
    assert place_in_frame(data, {**frame, "origin": (0.2, -0.3)}) is data  # at the corner: as it is


def test_frozen_backbone_stays_fixed_heads_learn_and_resume_continues(tmp_path):
    assert "grnet" in trainable_methods()
    image, scribbles = scribbled_scene()
    item = labelled_item(open_pyramid(image, name="scene"), scribbles)
    settings = TrainingSettings(iterations=4, crop=128, val_share=0.25, seed=1)
    session = start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / "run.pt")
    model = session.trainer.model
    backbone = model.global_branch.backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    head_before = model.global_branch.classify.weight.detach().clone()
    steps = []
    for ev in session.events(stop=lambda: len(steps) >= 1):  # asked after each step: stops after step 2
        steps.append(ev.step)
    assert steps == [1, 2] and (tmp_path / "run.pt").exists() and (tmp_path / "run.last.pt").exists()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats untouched
    assert not torch.equal(head_before, model.global_branch.classify.weight)

    resumed = start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / "run.pt",
                            resume=tmp_path / "run.last.pt")
    assert resumed.start == 2 and resumed.total == 4
    assert [ev.step for ev in resumed.events()] == [3, 4]
    method = resumed.method()
    pred = method.predict(image[:128, :128])
    assert pred.probabilities.shape == (4, 128, 128) and set(np.unique(pred.labels)) <= {1, 2, 3}
    with pytest.raises(CheckpointError, match="holds no training state"):
        start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / "x.pt", resume=tmp_path / "run.pt")
    (tmp_path / "folder.pt").mkdir()  # a folder where the checkpoint goes: refused before any step
    with pytest.raises(CheckpointError, match="is a folder"):
        start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / "folder.pt")


def test_learning_rate_of_a_round_frozen_default_chosen_and_fine_tuning(tmp_path):
    from napari_uhrseg.engine.scribbles import FROZEN_LR
    from napari_uhrseg.methods.presets import grnet_preset

    image, scribbles = scribbled_scene()
    item = labelled_item(open_pyramid(image, name="scene"), scribbles)

    def lr_of(**kw):
        settings = TrainingSettings(iterations=2, crop=128, val_share=0.25, seed=1, **kw)
        session = start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / "lr.pt")
        return {g["lr"] for g in session.trainer.opt_main.param_groups}

    assert lr_of() == {FROZEN_LR}  # frozen backbones, nothing chosen: the round's rate
    assert lr_of(lr=5e-5) == {5e-5}  # the user's choice wins
    assert lr_of(frozen_backbone=False, feature_cache=False) == {grnet_preset("fast")["lr"]}  # the paper's 1e-4
