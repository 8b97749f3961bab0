"""The Train dock's other methods, without a viewer: the MagNet refiner and CascadePSP fine-tuning on strokes.

Each: the loss goes down on a tiny run, the checkpoint loads in the method (and dock) that uses it, and a wrong
method or wrong classes is a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.engine.scribbles import TrainingSettings, labelled_item, start_session, trainable_methods
from napari_uhrseg.errors import CheckpointError, UhrsegError
from napari_uhrseg.io.pyramid import open_pyramid


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scene_item():
    image, scribbles = scribbled_scene()
    return image, scribbles, labelled_item(open_pyramid(image, name="scene"), scribbles)


@pytest.fixture(scope="module")
def grnet_checkpoint(tmp_path_factory, scene_item):
    """A GRNet trained on the strokes (what the Train dock makes first): MagNet's backbone."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("grnet") / "scene-grnet.pt"
    settings = TrainingSettings(iterations=20, crop=128, val_share=0.25, seed=0, val_every=10)
    session = start_session("grnet", [scene_item[2]], NAMES, settings=settings, out=out)
    list(session.events())
    return out


def _mean(values):
    return float(np.mean(values))


def test_the_dock_lists_the_three_trainable_methods():
    assert {"grnet", "magnet", "cascadepsp"} <= set(trainable_methods())
    assert "magnet-fast" not in trainable_methods()  # it shares MagNet's checkpoints


def test_magnet_refiner_learns_from_strokes_on_a_grnet_backbone(tmp_path, scene_item, grnet_checkpoint):
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.methods.magnet import MagNet, MagNetFast

    image, _, item = scene_item
    settings = TrainingSettings(iterations=30, crop=128, val_share=0.25, seed=0, val_every=15,
                                init=str(grnet_checkpoint), crop_pool=8)
    session = start_session("magnet", [item], NAMES, settings=settings, out=tmp_path / "scene-magnet.pt")
    trainer = session.trainer
    backbone = {k: v.clone() for k, v in trainer.net.backbone.state_dict().items()}
    events = list(session.events())
    assert {e.phase for e in events} == {"refiner"}  # the GRNet G-branch is the (frozen) backbone
    losses = [e.losses["L"] for e in events]
    assert _mean(losses[-8:]) < _mean(losses[:8])
    after = trainer.net.backbone.state_dict()
    assert all(torch.equal(backbone[k], after[k]) for k in backbone)
    assert 0 < trainer.pool_size <= 8  # cached mode: a pool of (coarse, fine, target) triples
    _, meta = load_checkpoint(tmp_path / "scene-magnet.pt", method="magnet", class_names=NAMES)
    assert meta["window"] == 4 * 128 and meta["input_ratio"] == 1.0 and meta["started_from"] == grnet_checkpoint.name
    for cls in (MagNet, MagNetFast):  # the Segment dock's two MagNet entries read the same checkpoint
        pred = cls.from_checkpoint(tmp_path / "scene-magnet.pt").predict(image[:128, :128])
        assert pred.probabilities.shape == (4, 128, 128) and pred.artefacts["uncertainty"].shape == (128, 128)
        assert set(np.unique(pred.labels)) <= {1, 2, 3}


def test_magnet_without_a_backbone_trains_it_first_then_the_refiner(tmp_path, scene_item):
    _, _, item = scene_item
    settings = TrainingSettings(iterations=6, crop=64, val_share=0.25, seed=0, val_every=3, crop_pool=4)
    session = start_session("magnet", [item], NAMES, settings=settings, out=tmp_path / "m.pt")
    trunk = {k: v.clone() for k, v in session.trainer.net.backbone.branch.backbone.state_dict().items()}
    head = session.trainer.net.backbone.branch.classify.weight.detach().clone()
    phases = [e.phase for e in session.events(stop=lambda: False)]
    assert phases[0] == "backbone" and phases[-1] == "refiner"
    net = session.trainer.net
    assert all(torch.equal(trunk[k], v) for k, v in net.backbone.branch.backbone.state_dict().items())
    assert not torch.equal(head, net.backbone.branch.classify.weight)
    assert session.trainer.feature_cache is not None and session.trainer.feature_cache.stats.hits > 0


def test_magnet_wrong_start_or_classes_is_a_clear_message(tmp_path, scene_item, grnet_checkpoint):
    from napari_uhrseg.methods.cascadepsp import STARTER_CHECKPOINT

    _, _, item = scene_item
    base = dict(iterations=2, crop=128, val_share=0.25)
    with pytest.raises(CheckpointError, match="MagNet starts from a GRNet checkpoint"):
        start_session("magnet", [item], NAMES, settings=TrainingSettings(**base, init=str(STARTER_CHECKPOINT)),
                      out=tmp_path / "x.pt")
    other = ["unlabelled", "water", "forest", "town"]
    with pytest.raises(CheckpointError, match="predicts classes"):
        start_session("magnet", [item], other, settings=TrainingSettings(**base, init=str(grnet_checkpoint)),
                      out=tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="was trained for method 'grnet', not 'magnet'"):
        start_session("magnet", [item], NAMES, settings=TrainingSettings(**base), out=tmp_path / "x.pt",
                      resume=grnet_checkpoint)


def test_masked_cascade_loss_is_the_papers_loss_when_everything_is_painted_and_ignores_unpainted_pixels():
    from napari_uhrseg.engine.scribble_trainers import masked_cascade_loss
    from napari_uhrseg.methods.cascadepsp import cascade_loss

    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(2, 1, 32, 32, generator=g) for k in ("full", "s8_1", "s4_2", "s8_2", "s8_3", "s4_3")}
    gt = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    full = masked_cascade_loss(out, gt, torch.ones_like(gt))
    ref = cascade_loss(out, gt)
    for k in ("total", "bce", "l1l2", "grad"):
        torch.testing.assert_close(full[k], ref[k], rtol=1e-5, atol=1e-6)
    valid = torch.zeros_like(gt)
    valid[..., :16, :] = 1
    part = masked_cascade_loss(out, gt, valid)
    wrong = gt.clone()
    wrong[..., 16:, :] = 1 - wrong[..., 16:, :]  # changing unpainted pixels' truth changes nothing ...
    torch.testing.assert_close(masked_cascade_loss(out, wrong, valid)["bce"], part["bce"])
    torch.testing.assert_close(masked_cascade_loss(out, wrong, valid)["l1l2"], part["l1l2"])
    flipped = gt.clone()
    flipped[..., :8, :] = 1 - flipped[..., :8, :]  # ... changing painted ones does
    assert float(masked_cascade_loss(out, flipped, valid)["bce"]) != pytest.approx(float(part["bce"]))


def test_cascadepsp_fine_tunes_on_strokes_and_the_refine_dock_can_load_it(tmp_path, scene_item):
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.methods.cascadepsp import CascadePSP

    image, scribbles, item = scene_item
    settings = TrainingSettings(iterations=10, crop=96, val_share=0.25, seed=0, val_every=10, batch_size=2,
                                crop_pool=3)
    session = start_session("cascadepsp", [item], NAMES, settings=settings, out=tmp_path / "scene-cascadepsp.pt")
    data = session.trainer.data
    img, gt, seg, painted = data.sample()
    assert img.shape == (96, 96, 3) and gt.shape == seg.shape == painted.shape == (96, 96)
    assert 0 < painted.mean() < 1  # scribbles: most pixels unpainted, and they are left out of the loss
    before = {k: v.clone() for k, v in session.trainer.model.backbone.state_dict().items()}
    events = list(session.events())
    losses = [e.losses["L"] for e in events]
    assert _mean(losses[-3:]) < _mean(losses[:3])
    assert all(torch.equal(before[k], v) for k, v in session.trainer.model.backbone.state_dict().items())
    assert session.trainer.feature_cache.stats.hits > 0 and session.trainer.feature_cache.stats.passes > 0
    state, meta = load_checkpoint(tmp_path / "scene-cascadepsp.pt", method="cascadepsp")
    assert meta["class_names"] == ["background", "object"] and meta["painted_classes"] == NAMES
    refiner = CascadePSP.from_checkpoint(tmp_path / "scene-cascadepsp.pt")
    mask = scribbles > 0
    prob = refiner.refine(image, mask, fast=True)
    assert prob.shape == mask.shape and 0 <= prob.min() and prob.max() <= 1
    refined, given = session.trainer.scores()
    assert 0 <= refined <= 1 and 0 <= given <= 1
    resumed = start_session("cascadepsp", [item], NAMES, settings=settings, out=tmp_path / "scene-cascadepsp.pt",
                            resume=tmp_path / "scene-cascadepsp.last.pt")
    assert resumed.start == 10 and resumed.total == 20
    assert all(torch.equal(v, resumed.trainer.model.state_dict()[k])
               for k, v in session.trainer.model.state_dict().items())


def test_cascadepsp_wrong_start_or_too_few_classes_is_a_clear_message(tmp_path, scene_item, grnet_checkpoint):
    image, scribbles, item = scene_item
    with pytest.raises(CheckpointError, match="was trained for method 'grnet', not 'cascadepsp'"):
        start_session("cascadepsp", [item], NAMES, out=tmp_path / "x.pt",
                      settings=TrainingSettings(iterations=2, init=str(grnet_checkpoint)))
    one = np.where(scribbles == 2, 2, 0).astype(np.uint8)
    single = labelled_item(open_pyramid(image, name="scene"), one)
    with pytest.raises(UhrsegError, match="paint at least two classes"):
        start_session("cascadepsp", [single], NAMES, out=tmp_path / "x.pt", settings=TrainingSettings(iterations=2))


def test_cascadepsp_samples_fully_painted_crops_as_the_paper_and_strokes_with_unknown_pixels():
    from napari_uhrseg.engine.scribble_trainers import ScribbleRefinementData
    from napari_uhrseg.engine.train import LabelledImage

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    dense = np.ones((200, 200), np.uint8)
    dense[:, 100:] = 2  # two classes, every pixel painted
    data = ScribbleRefinementData([LabelledImage(image, dense)], 64, seed=0, scale_range=(1.0, 1.0))
    for _ in range(5):
        img, gt, seg, painted = data.sample()
        assert painted.all()  # the paper's case: the loss sees every pixel
        assert set(np.unique(gt)) <= {0, 1} and set(np.unique(seg)) <= {0, 1}
    strokes = np.zeros_like(dense)
    strokes[::10] = dense[::10]
    data = ScribbleRefinementData([LabelledImage(image, strokes)], 64, seed=0, scale_range=(1.0, 1.0))
    img, gt, seg, painted = data.sample()
    assert 0 < painted.mean() < 0.2
    # the object's painted pixels are 1 and the other class's 0; unpainted ones only complete the degraded mask
    assert set(np.unique(gt[painted])) == {0, 1}
