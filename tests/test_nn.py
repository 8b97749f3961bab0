"""Building blocks: backbone shapes and strides, torchvision key names, the shipped Lite0 ImageNet weights,
FPN, losses."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uhrseg.errors import CheckpointError
from napari_uhrseg.nn.backbones import build_backbone
from napari_uhrseg.nn.efficientnet_lite import EfficientNetLite0, lite0_weights_path
from napari_uhrseg.nn.fpn import FPN, merge_levels
from napari_uhrseg.nn.losses import focal_loss, ohem_cross_entropy
from napari_uhrseg.nn.resnet import ResNet

torch.set_num_threads(1)


def torchvision_resnet18_keys() -> set[str]:
    """The state-dict keys of torchvision.models.resnet18() as documented by torchvision's layout:
    conv1/bn1, layer1..4 with two BasicBlocks each (conv1, bn1, conv2, bn2), downsample.0 (conv) and
    downsample.1 (BN) in the first block of layer2..4, and fc."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{b}" for b in bn), "fc.weight", "fc.bias"}
    for layer in range(1, 5):
        for block in range(2):
            pre = f"layer{layer}.{block}"
            keys |= {f"{pre}.conv1.weight", f"{pre}.conv2.weight"}
            keys |= {f"{pre}.bn1.{b}" for b in bn} | {f"{pre}.bn2.{b}" for b in bn}
        if layer > 1:
            keys |= {f"layer{layer}.0.downsample.0.weight"} | {f"layer{layer}.0.downsample.1.{b}" for b in bn}
    return keys


def test_resnet18_has_torchvision_keys_and_loads_a_pth(tmp_path):
    sd = ResNet("resnet18").state_dict()
    assert set(sd) == torchvision_resnet18_keys()
    assert len(sd) == 122  # 62 parameter tensors + 60 BN buffers
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 11689512
    # a torchvision-format file loads strictly and its weights arrive
    torch.manual_seed(0)
    src = ResNet("resnet18").state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(src, path)
    bb = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(bb.trunk.layer3[1].conv2.weight,
                       src["layer3.1.conv2.weight"])
    # a file of another architecture is refused with a message naming it
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="bad.pth"):
        build_backbone("resnet18", pretrained=str(bad))


def test_resnet50_key_count():
    sd = ResNet("resnet50").state_dict()
    assert len(sd) == 320 and "layer4.2.conv3.weight" in sd and "layer1.0.downsample.1.running_var" in sd


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_lite0"])
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_backbone_strides(name, output_stride):
    bb = build_backbone(name, pretrained=False, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == bb.out_channels
    assert bb.strides == [min(s, output_stride) for s in (2, 4, 8, 16, 32)]
    for f, s in zip(feats, bb.strides):
        assert f.shape[-2:] == (64 // s, 96 // s)


def test_truncated_and_extra_channels():
    bb = build_backbone("efficientnet_lite0", num_stages=4, in_channels=5)
    assert bb.out_channels == [16, 24, 40, 112] and len(bb.input_mean) == 5
    # extra input channels start at zero: the pretrained response to RGB is unchanged
    w = bb.trunk._conv_stem.weight
    assert w.shape[1] == 5 and torch.count_nonzero(w[:, 3:]) == 0 and torch.count_nonzero(w[:, :3]) > 0
    assert not hasattr(bb.trunk, "_fc")
    r = build_backbone("resnet18", pretrained=False, num_stages=4)
    with torch.no_grad():
        assert len(r(torch.zeros(1, 3, 32, 32))) == 4


def test_resnet_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="pretrained="):
        build_backbone("resnet50", pretrained=True)


def _imagenet_top1(model, image):
    from skimage.transform import resize

    x = resize(image, (224, 224), anti_aliasing=True).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None] * 2 - 1  # [-1, 1]: mean 0.5, std 0.5
    with torch.no_grad():
        return int(model(t).argmax())


def test_lite0_shipped_weights_classify_imagenet_photos():
    import skimage.data

    model = EfficientNetLite0()
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    assert _imagenet_top1(model, skimage.data.chelsea()) == 285  # Egyptian cat
    assert _imagenet_top1(model, skimage.data.coffee()) == 967  # espresso


def test_fpn_shapes_and_merge():
    fpn = FPN([24, 40, 112, 320], out_channels=32)
    feats = [torch.randn(2, c, 64 // s, 48 // s) for c, s in zip([24, 40, 112, 320], [1, 2, 4, 8])]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 64 // s, 48 // s) for s in (1, 2, 4, 8)]
    assert merge_levels(outs).shape == (2, 32, 64, 48)
    with pytest.raises(ValueError):
        fpn(feats[:3])


def test_focal_loss_matches_cross_entropy_at_gamma0_and_ignores():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :4] = 255
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(focal_loss(logits, target, gamma=0, ignore_index=255), ce, atol=1e-6)
    fl = focal_loss(logits, target, gamma=3, ignore_index=255)
    assert 0 < fl < ce  # easy pixels are down-weighted
    empty = focal_loss(logits, torch.full_like(target, 255), ignore_index=255)
    empty.backward()
    assert float(empty.detach()) == 0.0


def test_ohem_keeps_hard_pixels():
    logits = torch.zeros(1, 2, 10, 10)
    logits[0, 0] = 5.0  # confident class 0 everywhere
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :2] = 1  # 20 hard pixels
    hard_only = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0, :2].mean()
    assert torch.allclose(ohem_cross_entropy(logits, target, thresh=0.7, min_kept=10), hard_only)
    # min_kept above the hard count: the hardest min_kept pixels
    loss50 = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=50)
    assert hard_only > loss50 > 0
