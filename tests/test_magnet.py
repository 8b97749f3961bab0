"""MagNet / MagNet-Fast: the paper's pieces and the public code's bugs we fixed.

Most tests use a tiny pixel-wise backbone (a 1×1 conv) so they run in milliseconds; the real FPN backbones
are exercised by the checkpoint round trip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_uhrseg.methods import magnet as mg
from napari_uhrseg.methods import magnet_train as mt
from napari_uhrseg.methods.base import load_checkpoint

torch.set_num_threads(1)


class PixelBackbone(nn.Module):
    """Logits from a 1×1 conv: deterministic, any input size."""

    def __init__(self, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


def tiny_net(num_classes: int = 3) -> mg.MagNetNet:
    return mg.MagNetNet(PixelBackbone(num_classes), num_classes).eval()


def probs_const(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, *shape).clone()


# ------------------------------------------------------------------------------------------- parts
def test_certainty_is_top1_minus_top2():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    np.testing.assert_allclose(mg.certainty(p)[0, 0].numpy(), [0.5, 0.0, 1.0], atol=1e-6)


def test_refinement_module_matches_the_paper():
    m = mg.RefinementModule(7)
    assert m.input_bn.num_features == 14
    convs = [c for c in m.convs.modules() if isinstance(c, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(14, 64, (3, 3)), (64, 64, (3, 3))]
    assert m.bottlenecks[0].downsample is not None and m.bottlenecks[1].downsample is None
    assert m.bottlenecks[1].conv3.out_channels == 128
    assert m.classify.in_channels == 128 and m.classify.out_channels == 7 and m.classify.bias is None
    assert all(b.momentum == 0.01 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    out = m(torch.rand(2, 7, 20, 24), torch.rand(2, 7, 20, 24))
    assert out.shape == (2, 7, 20, 24)


@pytest.mark.parametrize("size,crop", [(2448, 612), (1224, 612), (612, 612), (100, 30), (50, 64), (1000, 333)])
def test_patch_starts_cover_the_scale(size, crop):
    starts = mg.patch_starts(size, crop)
    c = min(crop, size)
    assert starts[0] == 0 and starts[-1] + c == size
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + c] = True
    assert covered.all() and len(starts) == -(-size // c)


def test_deepglobe_grid_is_1_4_16_patches_without_overlap():
    schedule = mg.SCHEDULES["deepglobe"]
    scales = mg._scale_shapes((2448, 2448), schedule)
    assert scales == [(612, 612), (1224, 1224), (2448, 2448)]
    assert mg._input_shape(scales[0], schedule) == (508, 508)
    counts = [len(mg.patch_boxes(s, scales[0])) for s in scales]
    assert counts == [1, 4, 16]
    boxes = mg.patch_boxes(scales[2], scales[0])
    assert sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes) == 2448 * 2448


def test_presets_hold_the_papers_numbers():
    dg, cs = mg.get_schedule("deepglobe"), mg.get_schedule("cityscapes")
    assert (dg.n_points, dg.median_kernel, dg.n_patches) == (0.75, 11, -1)
    assert (cs.n_points, cs.median_kernel, len(cs.scale_fractions)) == (32768, 5, 4)
    fast = mg.get_schedule("deepglobe", fast=True)
    assert (fast.n_patches, fast.n_points) == (3, 0.9)
    with pytest.raises(ValueError):
        mg.Schedule("bad", (0.5, 1.0), 1.0, median_kernel=4)


def test_points_to_replace():
    assert mg.points_to_replace(0.75, 1224 * 1224, 4, 4) == int(1224 * 1224 * 0.75)
    assert mg.points_to_replace(0.9, 1224 * 1224, 3, 4) == int(1224 * 1224 * 0.9 * 3 / 4)
    assert mg.points_to_replace(32768, 512 * 256, 16, 16) == 32768
    assert mg.points_to_replace(32768, 256 * 128, 1, 1) == 256 * 128


def test_query_score_prefers_sure_refinement_over_unsure_coarse():
    shape = (15, 15)
    coarse = probs_const([0.5, 0.5, 0.0], shape)  # a tie: uncertain everywhere
    refined = probs_const([0.5, 0.5, 0.0], shape)
    refined[:, :, 7:] = probs_const([1.0, 0.0, 0.0], (15, 8))  # sure on the right
    q = mg.query_score(refined[None], coarse[None], kernel=3)[0]
    assert q[:, :6].max() < 0.01 and q[:, 9:].min() > 0.99
    coarse_sure = probs_const([1.0, 0.0, 0.0], shape)
    assert mg.query_score(refined[None], coarse_sure[None], kernel=3).max() < 0.01


def test_median_blur_removes_an_isolated_spike():
    m = torch.zeros(1, 21, 21)
    m[0, 10, 10] = 1.0
    assert mg.median_blur(m, 11)[0, 10, 10] < 0.01
    block = torch.zeros(1, 21, 21)
    block[0, :, 8:] = 1.0  # a wide region survives
    assert mg.median_blur(block, 11)[0, 10, 15] > 0.99


# ------------------------------------------------------------------------------------------- public-code bugs
class RecordingNet(mg.MagNetNet):
    """Records the (coarse, fine) tensors the refinement module receives."""

    def __init__(self, num_classes: int):
        super().__init__(PixelBackbone(num_classes), num_classes)
        self.calls = []
        original = self.refiner.forward

        def spy(coarse, fine):
            self.calls.append((coarse.detach().clone(), fine.detach().clone()))
            return original(coarse, fine)

        self.refiner.forward = spy


class PlainSGD:
    """A bare SGD step (torch.optim's first use imports torch._dynamo: tens of seconds on a busy CPU)."""

    def __init__(self, params, lr: float = 1e-3):
        self.params, self.lr = list(params), lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p -= self.lr * p.grad


def test_one_concat_order_for_training_and_inference():
    """Training and inference must hand the previous/whole-window prediction as ``coarse`` and the backbone's
    patch prediction as ``fine`` (the public code trains [coarse, fine] but tests [fine, coarse])."""
    net = RecordingNet(3)
    schedule = mg.Schedule("t", (0.25, 0.5, 1.0), 1.0, median_kernel=3)
    norm = {"mean": [0.5] * 3, "std": [0.5] * 3}
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (64, 64), dtype=np.uint8)
    marker = probs_const([0.123, 0.3, 0.577], (16, 16))  # a "whole-window" prediction no backbone makes

    batch = mt.refiner_batch(net, [(image, labels)], [marker], schedule, rng, batch_size=2)
    mt.refiner_training_step(net, batch, PlainSGD(net.refiner.parameters()), ignore_index=-100)
    coarse_t, fine_t = net.calls[-1]
    assert torch.allclose(coarse_t[:, 0], torch.full_like(coarse_t[:, 0], 0.123), atol=1e-4)
    assert not torch.allclose(fine_t[:, 0], torch.full_like(fine_t[:, 0], 0.123), atol=1e-2)

    net.calls.clear()
    net.eval()
    window = mg.WindowPixels(image)  # 64² window; the scale is 32², the previous canvas 16², crops 16²
    previous = probs_const([0.123, 0.3, 0.577], (16, 16))
    with torch.no_grad():
        mg.refine_scale(net, window, previous, (32, 32), schedule, (16, 16))
    coarse_i, fine_i = net.calls[-1]
    assert torch.allclose(coarse_i[:, 0], torch.full_like(coarse_i[:, 0], 0.123), atol=1e-4)
    with torch.no_grad():  # the last patch of the 2×2 grid (window pixels 32..64), predicted by the backbone itself
        expected_fine = net.segment(mg._resize(mg.to_tensor(image)[None, :, 32:, 32:], (16, 16)))
    assert coarse_i.shape[0] == 4 and torch.allclose(fine_i[-1:], expected_fine, atol=3e-3)


def test_fast_mode_keeps_the_most_uncertain_patches():
    shape, crop = (32, 32), (16, 16)
    previous = probs_const([0.98, 0.01, 0.01], shape)
    previous[:, 16:, :16] = probs_const([0.4, 0.35, 0.25], (16, 16))  # patch 2: most uncertain
    previous[:, :16, 16:] = probs_const([0.6, 0.3, 0.1], (16, 16))  # patch 1: second
    scores = mg.patch_scores(previous, mg.patch_boxes(shape, crop), shape)
    assert mg.select_patches(scores, n_patches=2) == [1, 2]
    assert scores[2] > scores[1] > scores[0] == pytest.approx(scores[3])
    # ranked on the previous stage's (here 2× smaller) canvas: the same order
    small = mg._resize(previous[None], (16, 16))[0]
    assert mg.select_patches(mg.patch_scores(small, mg.patch_boxes(shape, crop), shape), 2) == [1, 2]

    net = tiny_net()
    schedule = mg.Schedule("t", (0.5, 1.0), 1.0, n_patches=1, n_points=1.0, median_kernel=1)
    window = mg.WindowPixels(np.zeros((*shape, 3), np.uint8))
    with torch.no_grad():
        new, record = mg.refine_scale(net, window, previous, shape, schedule, crop)
    selected = [p["box"] for p in record["patches"] if p["selected"]]
    assert selected == [(16, 0, 32, 16)]
    assert record["replaced"][:16].sum() == 0 and record["replaced"][:, 16:].sum() == 0
    assert torch.equal(new[:, :16], previous[:, :16])  # patches not refined keep the previous prediction


def test_overlapping_patches_are_averaged(monkeypatch):
    """With 3 patches of 16 over 40 px the patches overlap; the pasted prediction is their mean."""
    net = tiny_net(2)
    order = iter(range(100))

    def refine(coarse, fine):
        # each patch gets its own constant class-0 probability: 0.9, 0.7, 0.5, ...
        logits = []
        for _ in range(coarse.shape[0]):
            p0 = 0.9 - 0.2 * next(order)
            logits.append(torch.log(probs_const([p0, 1 - p0], coarse.shape[-2:])))
        return torch.stack(logits)

    monkeypatch.setattr(net, "refine", refine)
    schedule = mg.Schedule("t", (0.4, 1.0), 1.0, n_patches=-1, n_points=1.0, median_kernel=1, border_fraction=0)
    shape, crop = (16, 40), (16, 16)
    assert mg.patch_starts(40, 16) == [0, 12, 24]
    previous = probs_const([0.5, 0.5], shape)
    with torch.no_grad():
        new, record = mg.refine_scale(net, mg.WindowPixels(np.zeros((*shape, 3), np.uint8)), previous, shape,
                                      schedule, crop, batch_size=1)
    assert bool(record["replaced"].all())
    row = new[0, 8].numpy()
    np.testing.assert_allclose(row[:12], 0.9, atol=1e-5)
    np.testing.assert_allclose(row[12:16], (0.9 + 0.7) / 2, atol=1e-5)
    np.testing.assert_allclose(row[16:24], 0.7, atol=1e-5)
    np.testing.assert_allclose(row[24:28], (0.7 + 0.5) / 2, atol=1e-5)
    np.testing.assert_allclose(row[28:], 0.5, atol=1e-5)


def test_patch_borders_are_not_pasted_inside_the_canvas():
    w = mg.paste_weight((0, 16, 16, 32), (32, 48), border=2)
    assert w[:, :2].sum() == 0 and w[:, -2:].sum() == 0 and w[-2:].sum() == 0
    assert w[0, 8] == 1  # the canvas edge keeps its pixels


# ------------------------------------------------------------------------------------------- the whole pass
def test_progressive_inference_replaces_top_k_points_per_stage():
    net = tiny_net()
    schedule = mg.Schedule("t", (0.25, 0.5, 1.0), 1.0, n_points=0.5, median_kernel=3)
    rng = np.random.default_rng(1)
    image = mg.to_tensor(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    probs, stages = mg.progressive_inference(net, image, schedule)
    assert probs.shape == (3, 64, 48)
    torch.testing.assert_close(probs.sum(0), torch.ones(64, 48), atol=1e-4, rtol=0)
    assert [s["scale"] for s in stages] == [(16, 12), (32, 24), (64, 48)]
    for st in stages[1:]:
        h, w = st["scale"]
        assert int(st["replaced"].sum()) == int(h * w * 0.5)
        # the replaced points are the highest query scores
        q = st["query_map"].flatten()
        assert q[st["replaced"].flatten()].min() >= q[~st["replaced"].flatten()].max() - 1e-6


def test_method_predict_artefacts_and_fast_is_cheaper(monkeypatch):
    net = tiny_net()
    norm = {"mean": [0.5] * 3, "std": [0.5] * 3}
    window = np.random.default_rng(2).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    full = mg.MagNet(net, ["a", "b", "c"], normalisation=norm)
    fast = mg.MagNetFast(net, ["a", "b", "c"], normalisation=norm)
    calls = {"n": 0}
    original = mg.InferenceNet.refine

    def counting(self, coarse, fine):
        calls["n"] += coarse.shape[0]
        return original(self, coarse, fine)

    monkeypatch.setattr(mg.InferenceNet, "refine", counting)
    pred = full.predict(window)
    n_full, calls["n"] = calls["n"], 0
    pred_fast = fast.predict(window)
    assert (n_full, calls["n"]) == (4 + 16, 3 + 3)
    for p in (pred, pred_fast):
        u = p.artefacts["uncertainty"]
        assert p.probabilities.shape == (3, 96, 96) and u.shape == (96, 96) and u.dtype == np.float32
        assert 0 <= u.min() and u.max() <= 1
        np.testing.assert_allclose(u, 1 - np.diff(np.sort(p.probabilities, 0)[-2:], axis=0)[0], atol=1e-5)
        assert len(p.artefacts["stages"]) == 3
        assert all(s["query_map"].shape == (24, 24) for s in p.artefacts["stages"])
    sel = [q["selected"] for q in pred_fast.artefacts["stages"][2]["patches"]]
    assert sum(sel) == 3 and len(sel) == 16
    assert pred_fast.artefacts["stages"][2]["patches"][-1]["box"] == (72, 72, 96, 96)


# ------------------------------------------------------------------------------------------- whole-image map
def test_uncertainty_map_averages_overlaps_and_drops_padding():
    umap = mg.UncertaintyMap((100, 160), downsample=4)
    assert umap.shape == (25, 40)
    umap.add((0, 0, 100, 80), np.full((50, 40), 0.2, np.float32))  # a working level at downsample 2
    umap.add((0, 80, 100, 160), np.full((100, 80), 0.6, np.float32))
    umap.add((0, 40, 100, 120), np.full((100, 80), 1.0, np.float32))
    a = umap.array
    assert a[5, 5] == pytest.approx(0.2) and a[5, 15] == pytest.approx(0.6)
    assert a[5, 25] == pytest.approx(0.8) and a[5, 35] == pytest.approx(0.6)
    padded = np.zeros((64, 64), np.float32)
    padded[:40, :40] = 0.5  # the method saw a window padded past the image
    small = mg.UncertaintyMap((40, 40), downsample=1)
    small.add_window(padded, (0, 0, 40, 40), level_downsample=1.0)
    assert np.allclose(small.array, 0.5)
    assert mg.uncertainty_path("/x/scene.ome.tif").name == "scene_uncertainty.tif"


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_grnet_backbone_reuse(tmp_path):
    from napari_uhrseg.errors import CheckpointError
    from napari_uhrseg.methods import get_method
    from napari_uhrseg.methods.base import save_checkpoint

    names = ["unknown", "a", "b"]
    net = mg.build_net(3, "fast", pretrained=False).eval()
    meta = {"method": "magnet", "preset": "fast", "schedule": "deepglobe", "class_names": names,
            "normalisation": mg.normalisation_of(net)}
    path = save_checkpoint(tmp_path / "m.pt", net.state_dict(), meta)
    window = np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    for name in ("magnet", "magnet-fast"):
        method = get_method(name).from_checkpoint(path)
        assert method.schedule.input_ratio == pytest.approx(256 / 612)
        assert method.predict(window).probabilities.shape == (3, 128, 128)
    with torch.no_grad():
        expected = net.segment(mg.to_tensor(window)[None])
    loaded = get_method("magnet").from_checkpoint(path)
    torch.testing.assert_close(loaded.net.segment(mg.to_tensor(window)[None]), expected)
    with pytest.raises(CheckpointError, match="magnet"):
        get_method("magnet").from_checkpoint(save_checkpoint(tmp_path / "g.pt", {}, {**meta, "method": "grnet"}))

    # A GRNet G-branch of the same backbone becomes MagNet's backbone unchanged.
    grnet_state = {f"global_branch.{k}": v.half() for k, v in net.backbone.branch.state_dict().items()}
    with torch.no_grad():  # GRNet ignoring label 0 predicts K = 2 channels; make channel 0 of ours negligible
        net.backbone.branch.classify.bias[0] = -20.0
        expected = net.segment(mg.to_tensor(window)[None])
    grnet_state["global_branch.classify.weight"] = grnet_state["global_branch.classify.weight"][1:]
    grnet_state["global_branch.classify.bias"] = grnet_state["global_branch.classify.bias"][1:]
    grnet_meta = {**meta, "method": "grnet",
                  "architecture": {"global_backbone": "efficientnet_lite0", "fpn_channels": 64, "global_stages": 5}}
    gpath = save_checkpoint(tmp_path / "grnet.pt", grnet_state, grnet_meta)
    fresh = mg.build_net(3, "fast", pretrained=False).eval()
    mt.load_grnet_backbone(fresh, gpath, "fast", names)
    with torch.no_grad():
        torch.testing.assert_close(fresh.segment(mg.to_tensor(window)[None]), expected, atol=2e-2, rtol=0)
    with pytest.raises(CheckpointError, match="needs resnet50"):
        mt.load_grnet_backbone(mg.build_net(3, "fast", pretrained=False), gpath, "paper", names)


def test_segment_run_writes_the_uncertainty_map_next_to_the_labels(tmp_path):
    import cv2
    import json

    import tifffile

    from napari_uhrseg.engine.segment import iter_segment
    from napari_uhrseg.io.pyramid import open_pyramid

    image = np.random.default_rng(4).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    method = mg.MagNetFast(tiny_net(), ["a", "b", "c"], normalisation={"mean": [0.5] * 3, "std": [0.5] * 3})
    recorder = mg.UncertaintyRecorder((100, 100), 1.0)
    for event in iter_segment(open_pyramid(image), method, window=128, overlap=16):
        recorder.add_event(event)
    path = recorder.save_next_to(tmp_path / "scene.ome.tif")
    assert path == tmp_path / "scene_uncertainty.tif"
    with tifffile.TiffFile(path) as tif:
        saved = tif.asarray()
        meta = json.loads(tif.pages[0].description)
    assert meta["downsample"] == 4.0 and saved.shape == (25, 25)
    padded = np.pad(image, ((0, 28), (0, 28), (0, 0)), mode="reflect")  # what the engine hands the method
    expected = method.predict(padded).artefacts["uncertainty"][:100, :100]
    np.testing.assert_allclose(saved, cv2.resize(expected, (25, 25), interpolation=cv2.INTER_AREA), atol=1e-5)
    assert mg.UncertaintyRecorder((10, 10), 1.0).save_next_to(tmp_path / "none.png") is None


def test_train_main_writes_a_checkpoint_both_variants_load(tmp_path):
    import cv2

    from napari_uhrseg.methods import get_method

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        labels = np.kron(rng.integers(1, 3, (4, 4)), np.ones((32, 32), int)).astype(np.uint8)
        rgb = np.where(labels[..., None] == 1, 60, 190).astype(np.uint8).repeat(3, -1)
        cv2.imwrite(str(images / f"t{i}.png"), rgb)
        cv2.imwrite(str(masks / f"t{i}.png"), labels)
    out = tmp_path / "m.pt"
    argv = ["--images", str(images), "--masks", str(masks), "--classes", "dark,bright", "--backbone-steps", "2",
            "--refiner-steps", "2", "--batch-size", "2", "--refiner-crop", "32", "--threads", "1", "--half", "-o", str(out)]
    assert mg.train_main(argv, method="magnet-fast") == 0
    state, meta = load_checkpoint(out, method="magnet")
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)  # --half: the starter's size
    assert meta["training"]["half"] and meta["training"]["command"].endswith(" ".join(argv))
    for name in ("magnet", "magnet-fast"):
        method = get_method(name).from_checkpoint(out)
        assert method.class_names == ["unlabelled", "dark", "bright"] and method.window_size == 128
        assert method.predict(np.zeros((128, 128, 3), np.uint8)).probabilities.shape == (3, 128, 128)


def test_refiner_training_stops_when_its_time_budget_is_spent():
    import time

    net = tiny_net()
    schedule = mg.Schedule("t", (0.25, 0.5, 1.0), 1.0, median_kernel=3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (64, 64), dtype=np.uint8)
    before = [p.detach().clone() for p in net.refiner.parameters()]
    done = mt.train_refiner(net, [(image, labels)], schedule, steps=50, lr=1e-2, batch_size=2, ignore_index=-100,
                            rng=rng, optimizer="adam", log=lambda _: None, deadline=time.perf_counter())
    assert done == 1  # the budget was spent before the first step ended
    assert any(not torch.equal(a, b) for a, b in zip(before, net.refiner.parameters()))
    assert mt.train_refiner(net, [(image, labels)], schedule, steps=3, lr=1e-2, batch_size=2, ignore_index=-100,
                            rng=rng, optimizer="adam", log=lambda _: None) == 3
