"""GRNet/PPN: shapes on odd windows, PPN selection really skips the R-branch, fusion leaves unselected patches
unchanged, checkpoints round-trip and refuse the wrong method or classes, CUDA-OOM style retry."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uhrseg.errors import CheckpointError
from napari_uhrseg.methods import get_method
from napari_uhrseg.methods.base import save_checkpoint
from napari_uhrseg.methods.grnet_ppn import (GRNet, GRNetMethod, GRNetSettings, checkpoint_meta, patch_uncertainty,
                                             select_patches)
from napari_uhrseg.methods.presets import GRNET_PRESETS, grnet_preset

torch.set_num_threads(1)
NAMES = ["unlabelled", "a", "b", "c"]


def tiny_cfg(**kw):
    return grnet_preset("fast", global_size=64, refine_size=32, fpn_channels=8, aggregation_channels=8, window=128, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GRNet(tiny_cfg(), num_classes=3, pretrained=False).eval()


def method(model, **settings):
    model.refine_calls = 0
    return GRNetMethod(model, NAMES, ignore_index=0, settings=GRNetSettings(**settings))


def window(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_registered():
    assert get_method("grnet") is GRNetMethod
    assert set(GRNET_PRESETS) == {"paper", "fast"}
    assert GRNET_PRESETS["paper"]["global_backbone"] == "resnet50" and GRNET_PRESETS["paper"]["ppn_stages"] == 4


@pytest.mark.parametrize("shape", [(131, 97), (64, 64), (50, 203)])
def test_predict_shapes_on_odd_windows(model, shape):
    m = method(model, selection="topk", top_k=3)
    pred = m.predict(window(*shape))
    assert pred.probabilities.shape == (4, *shape) and pred.probabilities.dtype == np.float32
    assert np.all(pred.probabilities[0] == 0)  # "unlabelled" is never predicted
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)
    patches = pred.artefacts["patches"]
    for p in patches:
        y0, x0, y1, x1 = p["box"]
        assert 0 <= y0 < y1 <= shape[0] and 0 <= x0 < x1 <= shape[1] and 0 <= p["probability"] <= 1
    assert sum(p["selected"] for p in patches) == 3 == model.refine_calls


def test_ppn_selection_skips_unselected_patches(model):
    win = window(128, 128, 1)
    m = method(model, selection="topk", top_k=5)
    m.predict(win)
    assert model.refine_calls == 5
    m = method(model, mode="global")
    m.predict(win)
    assert model.refine_calls == 0
    m = method(model, mode="all")
    m.predict(win)
    assert model.refine_calls == 16
    m = method(model, grid=8, mode="all")
    assert len(m.predict(win).artefacts["patches"]) == 64 and model.refine_calls == 64
    # threshold rule: with a zeroed FC every patch scores sigmoid(0) = 0.5
    with torch.no_grad():
        model.ppn.fc.weight.zero_()
        model.ppn.fc.bias.zero_()
    m = method(model, selection="threshold", threshold=0.5)
    assert all(p["selected"] for p in m.predict(win).artefacts["patches"]) and model.refine_calls == 16
    m = method(model, selection="threshold", threshold=0.6)
    assert not any(p["selected"] for p in m.predict(win).artefacts["patches"]) and model.refine_calls == 0


def test_unselected_patches_keep_the_global_output(model):
    win = window(128, 128, 2)
    glob = method(model, mode="global").predict(win).probabilities
    pred = method(model, selection="topk", top_k=2).predict(win)
    for p in pred.artefacts["patches"]:
        y0, x0, y1, x1 = p["box"]
        same = np.allclose(pred.probabilities[:, y0:y1, x0:x1], glob[:, y0:y1, x0:x1], atol=1e-6)
        assert same != p["selected"]


def test_select_patches_rules():
    prob = torch.tensor([0.1, 0.7, 0.5, 0.9])
    assert select_patches(prob, "threshold", 0.5).tolist() == [False, True, True, True]
    assert select_patches(prob, "topk", top_k=2).tolist() == [False, True, False, True]
    valid = torch.tensor([True, True, True, False])
    assert select_patches(prob, "topk", top_k=2, valid=valid).tolist() == [False, True, True, False]
    with pytest.raises(ValueError):
        select_patches(prob, "random")


def test_patch_uncertainty_is_the_mean_doubt_of_each_patch():
    logits = torch.zeros(1, 3, 8, 8)
    logits[0, 0] = 10.0  # class 0 certain everywhere ...
    logits[0, :, :4, 4:] = 0.0  # ... except the top-right patch of a 2 x 2 grid: a three-way tie
    logits[0, 1, 4:, :4] = 10.0  # bottom-left: a tie between classes 0 and 1
    u = patch_uncertainty(logits, 2)
    assert u.shape == (4,)
    np.testing.assert_allclose(u.numpy(), [0.0, 1.0, 1.0, 0.0], atol=1e-3)


def test_uncertainty_scorer_refines_the_most_doubtful_patches_without_ppn(model, monkeypatch):
    win = window(128, 128, 3)
    m = method(model, selection="topk", top_k=3, scorer="uncertainty")
    monkeypatch.setattr(model.ppn, "forward", lambda *a, **k: pytest.fail("PPN ran with the uncertainty scorer"))
    pred = m.predict(win)
    assert model.refine_calls == 3
    with torch.inference_mode():
        x = torch.from_numpy(win).permute(2, 0, 1)[None].float() / 255
        (_, logits_g), _ = model.forward_global(x)
    doubt = patch_uncertainty(logits_g, 4)
    patches = pred.artefacts["patches"]
    np.testing.assert_allclose([p["probability"] for p in patches], doubt.numpy(), atol=1e-3)
    chosen = {i for i, p in enumerate(patches) if p["selected"]}
    assert chosen == set(torch.topk(doubt, 3).indices.tolist())
    with pytest.raises(ValueError, match="scorer"):
        GRNetSettings(scorer="random")


def test_the_fast_preset_ranks_by_doubt_and_checkpoints_keep_their_rule(model, tmp_path):
    assert GRNET_PRESETS["fast"]["scorer"] == "uncertainty" and GRNET_PRESETS["paper"]["scorer"] == "ppn"
    cfg = tiny_cfg()
    meta = checkpoint_meta(cfg, NAMES, None, 0, model, GRNetSettings(selection="topk", top_k=2, scorer="uncertainty"))
    path = save_checkpoint(tmp_path / "u.pt", model.state_dict(), meta)
    assert GRNetMethod.from_checkpoint(path).settings.scorer == "uncertainty"
    meta.pop("scorer")  # a checkpoint made before the scorer existed meant PPN
    path = save_checkpoint(tmp_path / "old.pt", model.state_dict(), meta)
    assert GRNetMethod.from_checkpoint(path).settings.scorer == "ppn"


def save(model, path, names=NAMES, method_name="grnet", half=False):
    cfg = tiny_cfg()
    meta = checkpoint_meta(cfg, names, None, 0, model, GRNetSettings(selection="topk", top_k=3))
    meta["method"] = method_name
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return save_checkpoint(path, state, meta)


def test_checkpoint_round_trip_and_errors(model, tmp_path):
    path = save(model, tmp_path / "g.pt")
    loaded = GRNetMethod.from_checkpoint(path)
    assert loaded.class_names == NAMES and loaded.settings.top_k == 3 and loaded.settings.selection == "topk"
    win = window(96, 80, 3)
    ref = method(model, selection="topk", top_k=3).predict(win).probabilities
    np.testing.assert_allclose(loaded.predict(win).probabilities, ref, atol=1e-5)
    half = GRNetMethod.from_checkpoint(save(model, tmp_path / "h.pt", half=True))
    assert np.mean(half.predict(win).labels == loaded.predict(win).labels) > 0.95
    with pytest.raises(CheckpointError, match="magnet"):
        GRNetMethod.from_checkpoint(save(model, tmp_path / "m.pt", method_name="magnet"))
    with pytest.raises(CheckpointError, match="classes"):
        GRNetMethod.from_checkpoint(path, class_names=["unlabelled", "x", "y", "z"])
    bad = save(model, tmp_path / "b.pt", names=["unlabelled", "a"])  # 1 class: the weights have 3
    with pytest.raises(CheckpointError, match="architecture"):
        GRNetMethod.from_checkpoint(bad)


def test_out_of_memory_halves_the_patch_batch(model, monkeypatch):
    m = method(model, mode="all", patch_batch=16)
    real = model.refine
    sizes = []

    def refine(p, fg, lg):
        sizes.append(p.shape[0])
        if p.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(p, fg, lg)

    monkeypatch.setattr(model, "refine", refine)
    pred = m.predict(window(128, 128, 4))
    assert sizes[:3] == [16, 8, 4] and sum(s for s in sizes if s <= 4) == 16
    assert all(p["selected"] for p in pred.artefacts["patches"])


def test_cpu_refines_patches_in_small_batches_with_the_same_result(model, monkeypatch):
    """On the CPU the R-branch takes CPU_PATCH_BATCH patches per call by default (the batch sets a window's peak
    memory); the probabilities equal those of one 16-patch batch."""
    from napari_uhrseg.methods.grnet_ppn import CPU_PATCH_BATCH

    win = window(128, 128, 5)
    one_batch = method(model, mode="all", patch_batch=16).predict(win).probabilities
    real = model.refine
    sizes = []

    def refine(p, fg, lg):
        sizes.append(p.shape[0])
        return real(p, fg, lg)

    monkeypatch.setattr(model, "refine", refine)
    default = method(model, mode="all").predict(win).probabilities
    assert CPU_PATCH_BATCH < 16 and sizes == [CPU_PATCH_BATCH] * (16 // CPU_PATCH_BATCH)
    np.testing.assert_allclose(default, one_batch, atol=1e-5)


def test_residual_aggregation_starts_from_the_global_view():
    """fast preset: before training, refining every patch gives exactly the G-branch's output; after one
    gradient step on the aggregation it no longer does (the correction is live, not a constant)."""
    torch.manual_seed(0)
    cfg = grnet_preset("fast", global_size=64, refine_size=32)
    assert cfg["aggregation_residual"] and not GRNET_PRESETS["paper"]["aggregation_residual"]
    net = GRNet(cfg, 3, pretrained=False)
    method = GRNetMethod(net, ["unknown", "a", "b", "c"], settings=GRNetSettings(grid=2))
    window = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    glob = method.predict(window, context={"mode": "global"}).probabilities
    every = method.predict(window, context={"mode": "all"}).probabilities
    # equal up to resampling: refined cells are upsampled from the R-branch's 1/4 grid, the global from 1/4 of 64
    assert np.abs(glob - every).max() < 0.05
    with torch.no_grad():
        net.aggregation[-1].bias += torch.tensor([3.0, 0.0, 0.0])
    shifted = method.predict(window, context={"mode": "all"}).probabilities
    assert (shifted[1] > glob[1] + 0.2).mean() > 0.9


def test_checkpoints_older_than_residual_aggregation_load_as_plain(tmp_path):
    from napari_uhrseg.methods.presets import checkpoint_architecture

    cfg = grnet_preset("fast", global_size=64, refine_size=32, aggregation_residual=False)
    net = GRNet(cfg, 3, pretrained=False)
    meta = checkpoint_meta(cfg, ["unknown", "a", "b", "c"], None, 0, net, GRNetSettings(grid=2))
    del meta["architecture"]["aggregation_residual"]  # as written before the key existed
    assert checkpoint_architecture(meta)["aggregation_residual"] is False
    path = save_checkpoint(tmp_path / "old.pt", net.state_dict(), meta)
    loaded = GRNetMethod.from_checkpoint(path)
    assert loaded.model.cfg["aggregation_residual"] is False
