"""CascadePSP: the network and cascade, global/local steps, multi-class merge, loss, checkpoints, training."""
import numpy as np
import pytest
import torch

from napari_uhrseg.errors import CheckpointError, UhrsegError
from napari_uhrseg.methods import cascadepsp as C
from napari_uhrseg.metrics import boundary_accuracy

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return C.RefinementModule("fast", pretrained=False).eval()


class MaskEcho(torch.nn.Module):
    """Test double of the network: every output repeats the input mask (×gain) — isolates the inference logic."""

    def __init__(self, gain=10.0, bias=0.0):
        super().__init__()
        self.gain, self.bias = gain, bias

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = seg * self.gain + self.bias
        return {k: out for k in ("s8_2", "s4_2", "s8_3", "s4_3", "full")}


def test_cascade_outputs_all_levels_at_full_resolution(net):
    image, seg = torch.rand(2, 3, 64, 48), torch.rand(2, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        out = net(image, seg)
    assert set(out) == {"s8_1", "s8_2", "s4_2", "s8_3", "s4_3", "full"}
    assert all(v.shape == (2, 1, 64, 48) for v in out.values())
    with torch.no_grad():  # local step: levels 2-3 only
        assert "s8_1" not in net(image, seg, inter_s8=seg)


def test_the_mask_channels_start_at_zero_but_matter_after_training_init(net):
    stem = net.backbone.trunk._conv_stem.weight
    assert stem.shape[1] == 6
    fresh = C.RefinementModule("fast", pretrained=True)
    assert torch.count_nonzero(fresh.backbone.trunk._conv_stem.weight[:, 3:]) == 0
    assert torch.count_nonzero(fresh.backbone.trunk._conv_stem.weight[:, :3]) > 0


def test_odd_sizes_are_padded_to_multiples_of_8_and_cropped_back(net):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    mask = np.zeros((37, 53), np.float32)
    mask[10:30, 10:40] = 1
    prob = C.refine_mask(net, image, mask, fast=True)
    assert prob.shape == (37, 53) and prob.dtype == np.float32
    assert 0 <= prob.min() and prob.max() <= 1


def test_local_crop_grid_uses_published_stride():
    assert C.crop_starts(2448, 900) == [0, 418, 836, 1254, 1548]  # stride 900/2 - 32 = 418
    assert C.crop_starts(900, 900) == [0]
    starts = C.crop_starts(5000, 900)
    assert starts[-1] == 4100 and all(b - a <= 418 for a, b in zip(starts, starts[1:]))


def test_local_step_skips_uniform_crops_and_falls_back_to_global():
    image = np.zeros((1000, 1000, 3), np.uint8)
    coarse = {"full": np.full((1000, 1000), 0.8, np.float32), "s4": np.full((1000, 1000), 0.8, np.float32)}
    prob, n = C.local_step(MaskEcho(), image, coarse, L=900)
    assert n == 0 and np.all(prob == 1.0)  # all crops > 90 % foreground: binarised global result


def test_local_step_trims_interior_edges_and_averages():
    image = np.zeros((1000, 1000, 3), np.uint8)
    full = np.zeros((1000, 1000), np.float32)
    full[:, :500] = 1
    prob, n = C.local_step(MaskEcho(gain=0.0), image, {"full": full, "s4": full}, L=900)
    assert n == 4  # 2×2 crops (starts 0 and 100), each half foreground
    assert np.allclose(prob, 0.5)  # echo with gain 0 → sigmoid 0.5 wherever a crop reached, i.e. everywhere


def test_refine_skips_local_step_in_fast_mode_and_below_L(net):
    image = np.zeros((120, 100, 3), np.uint8)
    mask = np.zeros((120, 100), bool)
    mask[30:90, 20:80] = True
    _, steps = C.refine_mask(MaskEcho(), image, mask, return_steps=True)
    assert steps["crops_refined"] == 0 and "local" not in steps


class SizeRecorder(MaskEcho):
    """MaskEcho that records the (H, W) of every pass and whether it was a local one (``inter_s8`` given)."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        self.passes.append((tuple(image.shape[-2:]), inter_s8 is not None))
        return super().forward(image, seg, inter_s8, inter_s4)


def _half_mask(h, w):
    mask = np.zeros((h, w), bool)
    mask[:, : w // 2] = True
    return np.zeros((h, w, 3), np.uint8), mask


def test_full_mode_up_to_2L_is_one_pass_at_the_images_own_resolution():
    rec = SizeRecorder()
    _, steps = C.refine_mask(rec, *_half_mask(1200, 1000), L=900, return_steps=True)
    assert steps["native"] and steps["crops_refined"] == 0 and "local" not in steps
    assert len(rec.passes) == 1 and not rec.passes[0][1]
    assert rec.passes[0][0][0] >= 1200 and rec.passes[0][0][1] >= 1000  # not shrunk to L (padded to 8 at most)
    rec = SizeRecorder()  # fast mode still shrinks the long side to L
    C.refine_mask(rec, *_half_mask(1200, 1000), L=900, fast=True)
    assert len(rec.passes) == 1 and max(rec.passes[0][0]) <= 904


def test_full_mode_above_2L_runs_the_papers_global_and_local_steps():
    rec = SizeRecorder()
    _, steps = C.refine_mask(rec, *_half_mask(1900, 1000), L=900, return_steps=True)
    assert not steps["native"] and steps["crops_refined"] > 0
    assert max(rec.passes[0][0]) <= 904 and not rec.passes[0][1]  # the global step at L
    assert all(local for _, local in rec.passes[1:]) and len(rec.passes) == 1 + steps["crops_refined"]


def _two_class_labels():
    labels = np.zeros((200, 200), np.uint8)
    labels[20:120, 20:120] = 1
    labels[100:180, 100:190] = 2
    labels[5:10, 180:185] = 2  # 25 px: at most 32² px, left as it is
    return labels


def test_class_components_skip_small_and_pad_by_a_quarter():
    boxes = C.class_components(_two_class_labels(), 2)
    assert len(boxes) == 1
    y0, x0, y1, x1 = boxes[0]
    # component 100..180 × 100..190 dilated by 10 px → 90..190 × 90..200, padded 25 %
    assert y0 == 90 - 25 and x0 == 90 - 28 and y1 == 200 and x1 == 200


def test_multiclass_merge_keeps_confident_classes():
    labels = _two_class_labels()
    out = C.refine_labels(MaskEcho(), np.zeros((200, 200, 3), np.uint8), labels)
    assert np.array_equal(out, labels)


def test_multiclass_merge_floor_lost_objects_become_unlabelled():
    labels = _two_class_labels()
    out = C.refine_labels(MaskEcho(gain=0.0, bias=-10.0), np.zeros((200, 200, 3), np.uint8), labels)
    assert not np.any(out[20:90, 20:90])  # every refined class fell below 0.5: back to unlabelled
    assert out[7, 182] == 2  # the tiny component was never refined
    dense = labels.copy()
    dense[dense == 0] = 3  # no unlabelled pixels: the floor keeps the input label
    assert np.array_equal(C.refine_labels(MaskEcho(gain=0.0, bias=-10.0), np.zeros((200, 200, 3), np.uint8), dense), dense)


def test_image_conversion_and_bad_images():
    gray = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    rgb = C.as_rgb_uint8(gray)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 and rgb.max() > 200
    assert C.as_rgb_uint8(np.zeros((3, 20, 30))).shape == (20, 30, 3)
    with pytest.raises(UhrsegError, match="shape"):
        C.as_rgb_uint8(np.zeros((4, 5, 6, 7)))
    with pytest.raises(UhrsegError, match="finite"):
        C.as_rgb_uint8(np.full((8, 8), np.nan))
    with pytest.raises(UhrsegError, match="same size"):
        C.refine_mask(MaskEcho(), np.zeros((10, 10, 3), np.uint8), np.zeros((11, 10)))


def test_loss_has_six_terms_and_training_reduces_it():
    torch.manual_seed(0)
    model = C.RefinementModule("fast", pretrained=True)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (80, 80, 3), dtype=np.uint8), np.full((80, 80, 3), 128, np.uint8)]
    data = C.RefinementData(48, photos=photos, seed=0)
    image, gt, seg = data.batch(2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):  # one batch, over-fitted: the loss must fall
        loss = C.cascade_loss(model(image, seg), gt)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(float(loss["total"]))
    assert set(loss) == {"total", "bce", "l1l2", "grad"}
    assert losses[-1] < losses[0]


def test_checkpoint_round_trip_half_and_wrong_method(tmp_path, net):
    path = C.save_refiner(tmp_path / "r.pt", net, "fast", half=True)
    method = C.CascadePSP.from_checkpoint(path)
    image, seg = torch.rand(1, 3, 32, 32), torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = net(image, seg)["full"], method.model(image, seg)["full"]
    assert torch.allclose(a, b, atol=0.05)
    from napari_uhrseg.methods.base import save_checkpoint

    other = save_checkpoint(tmp_path / "o.pt", {}, {"method": "grnet", "preset": "fast", "class_names": ["a"],
                                                    "normalisation": {}})
    with pytest.raises(CheckpointError, match="grnet"):
        C.CascadePSP.from_checkpoint(other)


def test_predict_interface(net):
    method = C.CascadePSP(net)
    window = np.zeros((48, 48, 3), np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[10:30, 10:30] = True
    pred = method.predict(window, context={"mask": mask})
    assert pred.probabilities.shape == (2, 48, 48)
    assert np.allclose(pred.probabilities.sum(0), 1, atol=1e-5)
    with pytest.raises(UhrsegError, match="mask"):
        method.predict(window)


def test_train_main_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "c.pt"
    rc = C.train_main(["-o", str(out), "--max-steps", "1", "--batch-size", "1", "--crop", "48", "--deepglobe",
                       "none", "--monuseg", "none", "--minutes", "2", "--half"])
    assert rc == 0
    assert C.CascadePSP.from_checkpoint(out).preset == "fast"


def _own_folders(tmp_path, masks: dict):
    import cv2

    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    rng = np.random.default_rng(0)
    for name, mask in masks.items():
        cv2.imwrite(str(tmp_path / "img" / f"{name}.png"), rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / "lab" / f"{name}.png"), mask)
    return str(tmp_path / "img"), str(tmp_path / "lab")


def test_user_tiles_renumber_classes_and_merge_instances(tmp_path):
    classes = np.zeros((80, 90), np.uint16)
    classes[:40] = 7
    classes[40:, :30] = 300
    instances = np.zeros((80, 90), np.uint16)
    instances.flat[::23] = np.arange(1, instances.size // 23 + 2)[: instances.flat[::23].size]  # ~300 ids
    images, masks = _own_folders(tmp_path, {"a": classes, "b": instances})
    (a_rgb, a, a_scales), (_, b, _) = C._user_tiles(images, masks)
    assert a_rgb.shape == (80, 90, 3) and a_scales == (1.0, 3.0)
    assert set(np.unique(a)) == {1, 2, C.UNKNOWN_LABEL}  # 7 → 1, 300 → 2, background never the object
    assert np.array_equal(a == 1, classes == 7) and np.array_equal(a == 2, classes == 300)
    assert set(np.unique(b)) == {1, C.UNKNOWN_LABEL} and np.array_equal(b == 1, instances > 0)


def test_train_main_on_the_users_own_pairs(tmp_path, capsys):
    from napari_uhrseg.methods.base import read_checkpoint_meta

    mask = np.zeros((96, 96), np.uint8)
    mask[20:70, 30:80] = 2
    images, masks = _own_folders(tmp_path, {"field": mask})
    out = tmp_path / "own.pt"
    common = ["--max-steps", "1", "--batch-size", "1", "--crop", "48", "--minutes", "2", "--photo-fraction", "0"]
    assert C.train_main(["-o", str(out), "--images", images, "--masks", masks, *common]) == 0
    said = capsys.readouterr().out
    assert "on 1 real tiles (1 of yours)" in said  # DeepGlobe and MoNuSeg are left out unless asked for
    meta = read_checkpoint_meta(out)
    training = meta["training"]
    assert training["images"] == 1 and training["deepglobe"] == [] and training["monuseg"] == []
    for args, message in ((["--images", images], "go together"),
                          (["--images", images, "--masks", str(tmp_path / "nope")], "is not a folder"),
                          (["--images", str(tmp_path), "--masks", masks], "has a label image")):
        bad = tmp_path / "bad.pt"
        assert C.train_main(["-o", str(bad), *args, *common]) == 2
        assert message in capsys.readouterr().err and not bad.exists()
    import cv2

    cv2.imwrite(str(tmp_path / "lab" / "field.png"), mask[:50])  # a label image of another size
    assert C.train_main(["-o", str(tmp_path / "bad.pt"), "--images", images, "--masks", masks, *common]) == 2
    assert "export the labels at the image's size" in capsys.readouterr().err


def test_the_paper_preset_trains_from_imagenet_resnet50_or_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    # It used to start from random weights without a word; the paper's backbone is ImageNet-pretrained.
    monkeypatch.setenv("UHRSEG_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))  # and no torch hub cache
    common = ["--preset", "paper", "--max-steps", "1", "--batch-size", "1", "--crop", "48", "--deepglobe", "none",
              "--monuseg", "none", "--minutes", "2"]
    out = tmp_path / "p.pt"
    assert C.train_main(["-o", str(out), *common]) == 2
    err = capsys.readouterr().err
    assert "No ImageNet weights for resnet50" in err and "--no-pretrained" in err and not out.exists()
    assert C.train_main(["-o", str(out), "--no-pretrained", *common]) == 0 and out.exists()


def test_continued_training_records_what_it_started_from(tmp_path):
    from napari_uhrseg.methods.base import read_checkpoint_meta

    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["--batch-size", "1", "--crop", "48", "--deepglobe", "none", "--monuseg", "none", "--minutes", "2"]
    assert C.train_main(["-o", str(first), "--max-steps", "2", *common]) == 0
    assert C.train_main(["-o", str(second), "--init", str(first), "--max-steps", "1", "--lr-drops", "0.8,0.95",
                         *common]) == 0  # fmt: skip
    meta = read_checkpoint_meta(second)
    assert meta["steps"] == 1 and meta["training"]["init"]["steps"] == 2
    assert "--lr-drops 0.8,0.95" in meta["training"]["command"]
    assert meta["training"]["init"]["training"]["command"].endswith("--minutes 2")


@pytest.mark.skipif(not C.STARTER_CHECKPOINT.exists(), reason="starter checkpoint not built")
def test_shipped_refiner_improves_perturbed_boundaries():
    """Held-out composites (seeds never used in training): IoU goes up, boundary accuracy does not go down."""
    from napari_uhrseg.engine.perturb import mask_iou, perturb_mask

    method = C.CascadePSP.from_checkpoint(None)
    photos = C.load_photos()
    rng = np.random.default_rng(12345)
    before, after, iou_before, iou_after = [], [], [], []
    for i in range(4):
        image, gt = C.composite_sample(photos, 192, rng)
        seg = perturb_mask(gt, iou_range=(0.8, 0.9), rng=100 + i)
        prob = method.refine(image, seg, fast=True)
        before.append(boundary_accuracy(seg, gt))
        after.append(boundary_accuracy((prob > 0.5).astype(np.uint8), gt))
        iou_before.append(mask_iou(seg, gt))
        iou_after.append(mask_iou(prob > 0.5, gt))
    assert np.mean(iou_after) > np.mean(iou_before) + 0.03, (iou_before, iou_after)
    assert np.mean(after) >= np.mean(before), (before, after)


def _with_running_stats(model, seed=0):
    """Give every BatchNorm non-trivial running statistics and affine weights (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def test_inference_copy_folds_batchnorm_and_computes_the_same():
    torch.manual_seed(1)
    model = _with_running_stats(C.RefinementModule("fast", pretrained=False))
    net = C.inference_net(model)
    assert net is not model and C.inference_net(model) is net  # cached
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(net) < n_bn(model) / 2  # backbone pairs and the second BN of each residual block folded
    image, seg = torch.rand(1, 3, 64, 56), torch.rand(1, 1, 64, 56) * 2 - 1
    with torch.no_grad():
        a, b = model(image, seg), net(image, seg)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert any(m.training is False for m in [model]) and n_bn(model) > 0  # the original is untouched


def test_inference_copy_follows_weight_updates():
    model = C.RefinementModule("fast", pretrained=False).eval()
    net = C.inference_net(model)
    with torch.no_grad():
        model.guess_gain.add_(1.0)  # an in-place update, as an optimiser step does
    assert C.inference_net(model) is not net
    assert torch.equal(C.inference_net(model).guess_gain, model.guess_gain)


def test_fold_batchnorm_covers_resnet_blocks():
    from napari_uhrseg.nn.backbones import build_backbone
    from napari_uhrseg.nn.fuse import fold_batchnorm

    bb = _with_running_stats(build_backbone("resnet18", pretrained=False, num_stages=3))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = bb(x)
        import copy

        fused = copy.deepcopy(bb)
        assert fold_batchnorm(fused) == 1 + 4 * 2 * 2 + 3  # stem; 4 layers × 2 blocks × 2 convs; 3 downsamples
        out = fused(x)
    assert all(torch.allclose(r, o, atol=1e-4) for r, o in zip(ref, out))


def test_checkpoints_record_their_widths_and_older_ones_still_load(tmp_path):
    old = C.LEGACY_PRESETS["fast"][0]
    legacy = C.RefinementModule(old, pretrained=False)
    path = C.save_refiner(tmp_path / "old.pt", legacy, "fast")
    from napari_uhrseg.methods.base import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(path, method="cascadepsp")
    assert meta["architecture"]["up3"] == old.up3
    meta.pop("architecture")  # as saved before the widths were recorded
    bare = save_checkpoint(tmp_path / "bare.pt", state, meta)
    assert C.CascadePSP.from_checkpoint(bare).model.preset == old
    assert C.CascadePSP.from_checkpoint(path).model.preset == old
    current = C.save_refiner(tmp_path / "new.pt", C.RefinementModule("fast", pretrained=False), "fast")
    assert C.CascadePSP.from_checkpoint(current).model.preset == C.PRESETS["fast"]
