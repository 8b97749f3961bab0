"""CascadePSP (Cheng et al., CVPR 2020): class-agnostic boundary refinement at any resolution.

Reads like the paper (``../shared/seeds/004_25783e9055fd5786.txt``):

* §3.1 the **refinement module** — the image plus three mask channels (6 channels) through an output-stride-8
  dilated backbone, pyramid pooling (bins 1, 2, 3, 6), upsampling blocks with skips from strides 4 and 2 and from
  the image, outputs at 1/8, 1/4 and full resolution;
* §3.1 the **3-level cascade** in one forward pass with shared weights: masks live in [-1, 1]; level 1 sees the
  input mask three times, level 2 the input plus the upsampled 1/8 output, level 3 the input plus the 1/8 and 1/4
  outputs of level 2;
* §3.2 **global step** (long side resized to ``L`` = 900) then **local step** (L×L crops, stride L/2 − 32, 16 px
  trimmed from interior edges, crops that are almost all foreground or background skipped, overlaps averaged);
* §4.3 **multi-class refinement** for scene parsing (per class and connected component, ROI with 25 % padding,
  modified argmax with a 0.5 floor);
* §3.3 **training** on perturbed ground truth (``napari_uhrseg.engine.perturb``) with the six-output loss
  (BCE, L1+L2, Sobel-gradient L1).

Presets are data (``PRESETS``): ``paper`` is the published ResNet-50 network; ``fast`` is EfficientNet-Lite0
with narrower pooling/decoder widths so that a 2448² tile refines in seconds on a laptop CPU and the checkpoint
stays a few MB. All coordinates in this module are pixels of the array it is given (the working level).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_uhrseg.errors import CheckpointError, UhrsegError
from napari_uhrseg.methods.base import (Method, Prediction, check_checkpoint_output, load_checkpoint, register_method,
                                       save_checkpoint)

# --------------------------------------------------------------------------------------------- published numbers
GLOBAL_L = 900  # §3.2: the global step resizes the long side to L
CROP_TRIM = 16  # §3.2: pixels chipped from interior crop edges
STRIDE_MARGIN = 32  # §3.2: local stride = L/2 - 32
SKIP_FG_HIGH, SKIP_FG_LOW = 0.9, 0.1  # authors' code: crops that are (almost) uniform are not refined
# Ours: full mode on an image at most this many L on its long side runs one global pass at the image's own
# resolution instead of global (at L) + local crops; see ``refine_mask``.
NATIVE_MAX_FACTOR = 2.0
PSP_BINS = (1, 2, 3, 6)
MULTICLASS_DILATE = 10  # authors' scene-parsing code: dilate each class mask by 10 px before components
MULTICLASS_MIN_AREA = 32 * 32  # components of at most 32² px are left as they are
MULTICLASS_PAD = 0.25  # §4.3: ROIs with 25 % padding
MERGE_FLOOR = 0.5  # §4.3: below this confidence for every class, keep the input label
LOSS_BCE_W = (0.0, 1.0, 0.5, 1.0, 1.0, 0.5)  # [full, 1/8 it1, 1/4 it2, 1/8 it2, 1/8 it3, 1/4 it3]
LOSS_L1L2_W = (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
LOSS_GRAD_W = 5.0
LEARNING_RATE = 2.25e-4
WEIGHT_DECAY = 1e-4
TRAIN_CROP = 224


@dataclass(frozen=True)
class Preset:
    """Network widths. ``num_stages`` backbone stages are used (strides 2, 4, 8, 16, 32, the deep ones dilated
    to output stride 8); ``psp_branch`` is the 1×1 width of each pooled branch (the paper keeps 2048);
    ``backbone_blocks`` (EfficientNet-Lite0 only) how many MBConv blocks are kept.

    The ``fast`` preset is ours, sized for a CPU: EfficientNet-Lite0 up to its 80-channel stage (blocks 0–7; that
    stage's stride 2 turned into dilation 2, so the backbone stays at output stride 8), pooling branches of 32
    and decoder widths 32 / 16 / 8. At output stride 8 the 112-channel stage (672-channel 5×5 depthwise convs
    at 1/8) cost more than the rest of the backbone together and the 320-channel one 16× its usual cost; the
    pyramid pooling supplies the global context they would add. The decoder runs at 1/4, 1/2 and full resolution,
    where each channel costs the most; the ``paper`` preset keeps the published widths."""

    backbone: str
    num_stages: int
    psp_branch: int
    psp_out: int
    up1: int
    up2: int
    up3: int
    head: int = 32
    backbone_blocks: int | None = None  # EfficientNet-Lite0: MBConv blocks kept (None: up to the last stage used)


PRESETS = {
    "paper": Preset("resnet50", 5, psp_branch=2048, psp_out=1024, up1=512, up2=256, up3=32),
    "fast": Preset("efficientnet_lite0", 4, psp_branch=32, psp_out=64, up1=32, up2=16, up3=8, head=16,
                   backbone_blocks=8),
}
# Earlier widths under the same preset name, so that checkpoints saved before a preset changed still load.
LEGACY_PRESETS = {
    "fast": (Preset("efficientnet_lite0", 4, psp_branch=64, psp_out=128, up1=48, up2=24, up3=12, head=16),),
}
STARTER_CHECKPOINT = Path(__file__).resolve().parent.parent / "starters" / "cascadepsp_fast.pt"


def reuse_freed_memory() -> bool:
    """Every activation of a 900² pass is a fresh tensor of tens of MB; with glibc's defaults each is mapped
    afresh and page-faulted again (a ReLU on a 12 × 904² tensor: 72 ms fresh, 9 ms reused; the whole cascade
    2.2× faster with reuse). The process-wide policy lives in ``napari_uhrseg.memory``."""
    from napari_uhrseg.memory import tune_native_heap

    return tune_native_heap()


# --------------------------------------------------------------------------------------------- network
class _ResBlock(nn.Module):
    """Pre-activation residual block: [BN-ReLU-conv3×3]×2 plus a 1×1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=False), nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.body(x) + self.shortcut(x)

    def fold_batchnorm(self) -> None:
        """Inference only: merge the second BatchNorm into the conv before it (the first one acts on the block's
        input, which the shortcut also reads, so it stays)."""
        from napari_uhrseg.nn.fuse import fold_conv_bn

        if isinstance(self.body[3], nn.BatchNorm2d):
            self.body[2] = fold_conv_bn(self.body[2], self.body[3])
            self.body[3] = nn.Identity()


class _UpBlock(nn.Module):
    """Bilinear upsampling to the skip's size, concatenation, two residual blocks (§3.1, Fig. 3)."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.fuse = _ResBlock(cin + cskip, cout)
        self.refine = _ResBlock(cout, cout)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.refine(self.fuse(torch.cat([x, skip], 1)))


class _PSP(nn.Module):
    """Pyramid pooling: average pools to bins 1, 2, 3, 6, 1×1 convs, upsample, concat with the input, 1×1."""

    def __init__(self, cin: int, branch: int, cout: int, bins=PSP_BINS):
        super().__init__()
        self.bins = bins
        self.branches = nn.ModuleList(nn.Conv2d(cin, branch, 1, bias=False) for _ in bins)
        self.bottleneck = nn.Conv2d(cin + branch * len(bins), cout, 1)

    def forward(self, f):
        size = f.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(f, b)), size=size, mode="bilinear", align_corners=False)
            for b, conv in zip(self.bins, self.branches)
        ]
        return F.relu(self.bottleneck(torch.cat([f, *pooled], 1)))


def _head(cin: int, width: int) -> nn.Sequential:
    """2-layer 1×1 output head giving one logit channel."""
    return nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))


class RefinementModule(nn.Module):
    """The CascadePSP network. ``forward`` runs the 3-level cascade (or its last levels, for the local step).

    Inputs: ``image`` (N, 3, H, W) in [0, 1]; ``seg`` (N, 1, H, W) in [-1, 1]; H and W multiples of 8.
    Returns a dict of full-resolution *logits* (the 1/8 and 1/4 outputs bilinearly upsampled, as the authors'
    loss expects): ``s8_1``, ``s8_2``, ``s4_2``, ``s8_3``, ``s4_3``, ``full`` (levels not run are absent).
    """

    def __init__(self, preset: str | Preset = "fast", *, pretrained: bool | str = False):
        super().__init__()
        from napari_uhrseg.nn.backbones import build_backbone

        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        p = self.preset
        # RGB + seg + two intermediate masks; the extra conv1 channels start at zero (backbone's job).
        self.backbone = build_backbone(
            p.backbone, in_channels=6, pretrained=pretrained, output_stride=8, num_stages=p.num_stages,
            **({"num_blocks": p.backbone_blocks} if p.backbone_blocks else {}),
        )
        c2, c4, c8 = self.backbone.out_channels[0], self.backbone.out_channels[1], self.backbone.out_channels[-1]
        self.register_buffer("mean", torch.tensor(self.backbone.input_mean[:3], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.backbone.input_std[:3], dtype=torch.float32).view(1, 3, 1, 1))
        self.psp = _PSP(c8, p.psp_branch, p.psp_out)
        self.head_s8 = _head(p.psp_out, p.head)
        self.up1 = _UpBlock(p.psp_out, c4, p.up1)
        self.head_s4 = _head(p.up1, p.head)
        self.up2 = _UpBlock(p.up1, c2, p.up2)
        # The image skip also carries the input mask and the level's 1/4 guess (5 channels, not the paper's 3):
        # the full-resolution decoder then sees what it corrects directly, which lets a CPU-budget training run
        # start from "keep the mask" instead of having to carry it through the whole backbone first.
        self.up3 = _UpBlock(p.up2, 5, p.up3)
        self.head_full = _head(p.up3 + 5, p.head)
        # Each output adds its level's input guess, scaled by a learned gain (s8, s4, full): an untrained or
        # briefly trained network then starts from "keep the mask" and learns corrections (not in the paper).
        self.guess_gain = nn.Parameter(torch.full((3,), 2.0))

    def _level(self, im_n, seg, m8, m4, depth: int):
        """One pass of the network; ``depth`` 1 stops after the 1/8 head, 2 after the 1/4 head, 3 goes to full."""
        size = im_n.shape[-2:]
        feats = self.backbone(torch.cat([im_n, seg, m8, m4], 1))
        p = self.psp(feats[-1])
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        g = self.guess_gain
        out = [up(self.head_s8(p)) + g[0] * m8]
        if depth >= 2:
            p = self.up1(p, feats[1])
            out.append(up(self.head_s4(p)) + g[1] * m4)
        if depth >= 3:
            skip = torch.cat([im_n, seg, m4], 1)
            p = self.up3(self.up2(p, feats[0]), skip)
            out.append(self.head_full(torch.cat([p, skip], 1)) + g[2] * m4)
        return out

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        im_n = (image - self.mean) / self.std
        out = {}
        if inter_s8 is None:  # level 1: the input mask everywhere
            (out["s8_1"],) = self._level(im_n, seg, seg, seg, 1)
            inter_s8 = torch.tanh(out["s8_1"])
        if inter_s4 is None:  # level 2: the 1/8 result in both intermediate channels
            out["s8_2"], out["s4_2"] = self._level(im_n, seg, inter_s8, inter_s8, 2)
            inter_s8, inter_s4 = torch.tanh(out["s8_2"]), torch.tanh(out["s4_2"])
        out["s8_3"], out["s4_3"], out["full"] = self._level(im_n, seg, inter_s8, inter_s4, 3)
        return out


# --------------------------------------------------------------------------------------------- loss
def _sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude as in the authors' loss: 3×3 average, Sobel / 4, sqrt(gx² + gy² + 1e-4)."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device) / 4
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    gx = F.conv2d(x, k.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(x, k.t().reshape(1, 1, 3, 3), padding=1)
    return torch.sqrt(gx * gx + gy * gy + 1e-4)


def cascade_loss(out: dict, gt: torch.Tensor) -> dict:
    """Six-output loss of §3.3: BCE on the coarse outputs, L1+L2 on the fine ones, gradient L1 on full res.

    ``gt`` is (N, 1, H, W) in {0, 1}. Returns a dict of scalar tensors with ``total``.
    """
    keys = ("full", "s8_1", "s4_2", "s8_2", "s8_3", "s4_3")
    bce = l1l2 = gt.new_zeros(())
    for key, wb, wl in zip(keys, LOSS_BCE_W, LOSS_L1L2_W):
        logits = out[key]
        if wb:
            bce = bce + wb * F.binary_cross_entropy_with_logits(logits, gt)
        if wl:
            prob = torch.sigmoid(logits)
            l1l2 = l1l2 + wl * (F.l1_loss(prob, gt) + F.mse_loss(prob, gt))
    grad = LOSS_GRAD_W * F.l1_loss(_sobel_magnitude(torch.sigmoid(out["full"])), _sobel_magnitude(gt))
    return {"total": bce + l1l2 + grad, "bce": bce, "l1l2": l1l2, "grad": grad}


# --------------------------------------------------------------------------------------------- inputs
def as_rgb_uint8(image, *, what: str = "image") -> np.ndarray:
    """The image as (H, W, 3) uint8: grayscale is repeated, 16-bit/float rescaled (0.5–99.5 percentiles),
    an alpha channel dropped. Anything else is a ``UhrsegError`` that says what was given."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # channels first → last
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 1:
        raise UhrsegError(
            f"The {what} has shape {image.shape}; CascadePSP needs a 2-D RGB or grayscale image "
            "(H, W), (H, W, 3) or (H, W, 4). Choose the image layer, not a labels or multichannel stack."
        )
    image = image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise UhrsegError(f"The {what} has dtype {image.dtype}; give an 8-bit, 16-bit or float image.")
    data = image.astype(np.float32)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        raise UhrsegError(f"The {what} holds no finite values (all NaN/inf): nothing to refine against.")
    lo, hi = np.percentile(finite[:: max(1, finite.size // 1_000_000)], [0.5, 99.5])
    data = np.nan_to_num((data - lo) / max(float(hi - lo), 1e-6), nan=0.0)
    return (np.clip(data, 0, 1) * 255 + 0.5).astype(np.uint8)


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if mask.shape != image.shape[:2]:
        raise UhrsegError(
            f"The mask is {mask.shape[0]}×{mask.shape[1]} px but the image is {image.shape[0]}×{image.shape[1]} px "
            "at the working level: give a mask of the same size (same pyramid level)."
        )


# --------------------------------------------------------------------------------------------- inference
def _tensor_image(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float().div_(255)


def _tensor_mask(mask: np.ndarray, device) -> torch.Tensor:
    """Probabilities in [0, 1] → a (1, 1, H, W) mask in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32)).to(device)[None, None] * 2 - 1


_INFERENCE_COPIES: "weakref.WeakKeyDictionary[RefinementModule, tuple]" = weakref.WeakKeyDictionary()


def inference_net(model):
    """The network ``model`` as it runs at inference: an eval copy with BatchNorm folded into the convolutions
    and channels-last weights (the same function, fewer passes over memory). ``model`` itself is left as it is,
    trainable; the copy is cached and rebuilt whenever a weight of ``model`` changes (fine-tuning in place).
    Anything that is not a ``RefinementModule`` (test doubles) is returned unchanged."""
    if not isinstance(model, RefinementModule):
        return model
    from napari_uhrseg.nn.fuse import fold_batchnorm

    tensors = [*model.parameters(), *model.buffers()]
    key = tuple((id(t), t._version, t.device) for t in tensors)
    cached = _INFERENCE_COPIES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net)
    for block in net.modules():
        if isinstance(block, _ResBlock):
            block.fold_batchnorm()
    net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    _INFERENCE_COPIES[model] = (key, net)
    return net


@torch.inference_mode()
def _cascade(model, image_t, seg_t, inter_s8=None, keys=("full", "s4_3")) -> dict:
    """Run the cascade on tensors, padded to a multiple of 8 (image with 0, masks with -1) and cropped back.
    Returns sigmoid probabilities (numpy (H, W)) for ``keys`` (default ``full`` and ``s4_3``)."""
    reuse_freed_memory()
    model = inference_net(model)
    h, w = image_t.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        image_t = F.pad(image_t, (0, pw, 0, ph), value=0.0)
        seg_t = F.pad(seg_t, (0, pw, 0, ph), value=-1.0)
        inter_s8 = None if inter_s8 is None else F.pad(inter_s8, (0, pw, 0, ph), value=-1.0)
    cl = (lambda t: t.contiguous(memory_format=torch.channels_last)) if isinstance(model, RefinementModule) \
        else (lambda t: t)  # fmt: skip
    out = model(cl(image_t), cl(seg_t), inter_s8=None if inter_s8 is None else cl(inter_s8))
    return {k: torch.sigmoid(out[k][0, 0, :h, :w]).float().cpu().numpy() for k in keys}


def _resize(a: np.ndarray, size_hw: tuple[int, int], interpolation) -> np.ndarray:
    return cv2.resize(a, (size_hw[1], size_hw[0]), interpolation=interpolation)


def global_step(model, image: np.ndarray, mask: np.ndarray, *, L: int = GLOBAL_L, device="cpu",
                need_s4: bool = True) -> dict:  # fmt: skip
    """§3.2 global step: the whole image with its long side resized to ``L`` (never enlarged), full cascade.

    ``image`` (H, W, 3) uint8, ``mask`` (H, W) in [0, 1]. Returns ``full`` and (with ``need_s4``, what the local
    step starts from) ``s4`` probabilities resized back to (H, W).
    """
    h, w = mask.shape
    scale = min(1.0, L / max(h, w))
    small = (max(1, round(h * scale)), max(1, round(w * scale)))
    im_s, m_s = image, mask.astype(np.float32)
    if scale < 1.0:
        im_s, m_s = _resize(image, small, cv2.INTER_AREA), _resize(m_s, small, cv2.INTER_AREA)
    keys = ("full", "s4_3") if need_s4 else ("full",)
    out = _cascade(model, _tensor_image(im_s, device), _tensor_mask(m_s, device), keys=keys)
    if scale < 1.0:
        out = {k: _resize(v, (h, w), cv2.INTER_LINEAR) for k, v in out.items()}
    return {"full": out["full"], **({"s4": out["s4_3"]} if need_s4 else {})}


def crop_starts(length: int, L: int) -> list[int]:
    """Local-step crop starts along one axis: stride L/2 − 32, the last crop shifted back inside."""
    if length <= L:
        return [0]
    stride = L // 2 - STRIDE_MARGIN
    starts = list(range(0, length - L, stride))
    return starts + [length - L]


def local_step(
    model, image: np.ndarray, coarse: dict, *, L: int = GLOBAL_L, device="cpu",
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """§3.2 local step at the image's own resolution, starting from the global step's outputs ``coarse``.

    Each L×L crop runs cascade levels 2–3 with the binarised global result as the input mask and the global
    1/4 output as the 1/8 guess; 16 px are trimmed from interior edges, overlaps averaged, uncovered pixels
    (skipped crops) keep the binarised global result. Returns ``(probabilities, crops_refined)``.
    """
    h, w = coarse["full"].shape
    seg = (coarse["full"] > 0.5).astype(np.float32)
    total = np.zeros((h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    refined = 0
    for y in crop_starts(h, L):
        for x in crop_starts(w, L):
            if cancel is not None and cancel():
                from napari_uhrseg.errors import Cancelled

                raise Cancelled("Refinement cancelled; the labels were not changed.")
            ys, xs = slice(y, min(y + L, h)), slice(x, min(x + L, w))
            fg = float(seg[ys, xs].mean())
            if fg > SKIP_FG_HIGH or fg < SKIP_FG_LOW:
                continue
            out = _cascade(
                model, _tensor_image(image[ys, xs], device), _tensor_mask(seg[ys, xs], device),
                inter_s8=_tensor_mask(coarse["s4"][ys, xs], device), keys=("full",),
            )["full"]  # fmt: skip
            # Trim interior edges only: crop borders see no context, image borders have none to see.
            t0 = CROP_TRIM if y > 0 else 0
            l0 = CROP_TRIM if x > 0 else 0
            b0 = CROP_TRIM if ys.stop < h else 0
            r0 = CROP_TRIM if xs.stop < w else 0
            oh, ow = out.shape
            total[y + t0 : y + oh - b0, x + l0 : x + ow - r0] += out[t0 : oh - b0, l0 : ow - r0]
            count[y + t0 : y + oh - b0, x + l0 : x + ow - r0] += 1
            refined += 1
    prob = np.where(count > 0, total / np.maximum(count, 1), seg)
    return prob.astype(np.float32), refined


def refine_mask(
    model, image: np.ndarray, mask: np.ndarray, *, fast: bool = False, L: int = GLOBAL_L, device="cpu",
    cancel: Callable[[], bool] | None = None, return_steps: bool = False,
):  # fmt: skip
    """Refine one binary/soft mask: global step, then the local step unless ``fast`` or max(H, W) < ``2 L``.

    Full mode on an image of at most ``NATIVE_MAX_FACTOR`` × L on its long side (L to 2L) is one global pass at
    the image's own resolution instead (``steps["native"]``): the local crops would cover such an image with a
    handful of heavily overlapping crops that refine the global step's own output again at almost its scale,
    and that second pass erodes small objects. Measured 2026-12-02 (docs/methods/cascadepsp.md, "Full mode on
    images of L to 2L px"): on DeepGlobe crops of 1000–1700 px the native pass is within 0.1 IoU of global + local or
    better, on a MoNuSeg 1000² tile +4.2 IoU, and it costs less than the crops. The paper's two steps run above.

    ``image`` (H, W, 3) uint8 (grayscale/16-bit converted), ``mask`` (H, W) bool or values in [0, 1] (or 0/255).
    Returns the refined foreground probability (H, W) float32 (and the per-step outputs with ``return_steps``).
    """
    image = as_rgb_uint8(image)
    mask = np.asarray(mask)
    _check_pair(image, mask)
    mask = mask.astype(np.float32)
    if mask.size and mask.max() > 1:
        mask = mask / 255.0
    side = max(mask.shape)
    local = not fast and side >= L
    native = local and side <= NATIVE_MAX_FACTOR * L
    local = local and not native
    coarse = global_step(model, image, mask, L=side if native else L, device=device, need_s4=local)
    steps = {"global": coarse["full"], "crops_refined": 0, "native": native}
    prob = coarse["full"]
    if local:
        prob, steps["crops_refined"] = local_step(model, image, coarse, L=L, device=device, cancel=cancel)
        steps["local"] = prob
    return (prob, steps) if return_steps else prob


def _padded_box(rows: np.ndarray, cols: np.ndarray, shape, pad: float) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    py, px = int(math.ceil((y1 - y0) * pad)), int(math.ceil((x1 - x0) * pad))
    return max(0, y0 - py), max(0, x0 - px), min(shape[0], y1 + py), min(shape[1], x1 + px)


def class_components(labels: np.ndarray, cls: int, *, dilate: int = MULTICLASS_DILATE,
                     min_area: int = MULTICLASS_MIN_AREA, pad: float = MULTICLASS_PAD):  # fmt: skip
    """Boxes (y0, x0, y1, x1) of the connected components of class ``cls`` after a ``dilate``-px dilation,
    each padded by ``pad`` of its size; components of at most ``min_area`` class pixels are left out."""
    from scipy import ndimage as ndi

    own = labels == cls
    grown = cv2.dilate(own.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1,) * 2))
    comp, n = ndi.label(grown)
    boxes = []
    for i, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None or np.count_nonzero(own[sl] & (comp[sl] == i)) <= min_area:
            continue
        rows, cols = np.array([sl[0].start, sl[0].stop - 1]), np.array([sl[1].start, sl[1].stop - 1])
        boxes.append(_padded_box(rows, cols, labels.shape, pad))
    return boxes


def refine_labels(
    model, image: np.ndarray, labels: np.ndarray, *, classes=None, fast: bool = False, L: int = GLOBAL_L,
    device="cpu", min_area: int = MULTICLASS_MIN_AREA, cancel=None, progress=None,
) -> np.ndarray:  # fmt: skip
    """§4.3 multi-class refinement of a label image (0 = unlabelled); returns new labels, same dtype.

    Every class in ``classes`` (default: all non-zero labels present) is refined per connected component in a
    padded box. Merge per pixel: the class with the highest refined probability if it is ≥ 0.5; otherwise, where
    the pixel's own class was refined and lost (an object shrinking into unlabelled space), 0 if the input has
    unlabelled pixels; otherwise the input label.
    """
    image = as_rgb_uint8(image)
    labels = np.asarray(labels)
    _check_pair(image, labels)
    if classes is None:
        classes = [int(c) for c in np.unique(labels) if c != 0]
    best_prob = np.zeros(labels.shape, np.float32)
    best_cls = labels.copy()
    own_prob = np.full(labels.shape, -1.0, np.float32)  # refined probability of the pixel's input class
    jobs = [(c, box) for c in classes for box in class_components(labels, c, min_area=min_area)]
    for i, (c, (y0, x0, y1, x1)) in enumerate(jobs):
        win_lab = labels[y0:y1, x0:x1]
        p = refine_mask(model, image[y0:y1, x0:x1], win_lab == c, fast=fast, L=L, device=device, cancel=cancel)
        bp, bc, op = best_prob[y0:y1, x0:x1], best_cls[y0:y1, x0:x1], own_prob[y0:y1, x0:x1]
        better = p > bp
        bp[better], bc[better] = p[better], c
        mine = win_lab == c
        op[mine] = np.maximum(op[mine], p[mine])
        if progress is not None:
            progress(i + 1, len(jobs))
    out = labels.copy()
    confident = best_prob >= MERGE_FLOOR
    out[confident] = best_cls[confident]
    if (labels == 0).any():
        lost = ~confident & (own_prob >= 0) & (own_prob < MERGE_FLOOR) & (labels != 0)
        out[lost] = 0
    return out


# --------------------------------------------------------------------------------------------- the method
def _device_name(device) -> str:
    from napari_uhrseg.device import select_device

    return select_device(device).device if device in (None, "auto") else str(device)


@register_method("cascadepsp")
class CascadePSP(Method):
    """Class-agnostic refiner behind the ``Method`` interface.

    ``predict(window, context={"mask": m})`` refines ``m`` on the RGB ``window`` (working-level pixels): a binary
    or soft mask gives probabilities ``(2, H, W)`` = [background, object]; an integer label image gives the
    one-hot of its multi-class refinement. Artefacts: the global-step probability map and the crop count.
    """

    class_names = ["background", "object"]

    def __init__(self, model: RefinementModule, *, preset: str = "fast", device: str = "cpu",
                 fast: bool = False, L: int = GLOBAL_L):  # fmt: skip
        self.model = model.to(device).eval()
        self.preset = preset
        self.device = device
        self.fast = fast
        self.L = int(L)

    @classmethod
    def from_checkpoint(cls, path=None, *, device: str = "cpu", **kwargs) -> "CascadePSP":
        """Load a checkpoint (default: the shipped class-agnostic ``fast`` starter)."""
        path = Path(path) if path is not None else STARTER_CHECKPOINT
        state, meta = load_checkpoint(path, method="cascadepsp")
        preset = meta["preset"]
        if preset not in PRESETS:
            raise CheckpointError(f"Checkpoint {path.name} has unknown CascadePSP preset {preset!r}.")
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        # The widths the checkpoint was made with: stored since the fast preset changed; older checkpoints name a
        # preset only, so the current and the earlier widths of that name are tried in turn.
        arch = meta.get("architecture")
        candidates = [Preset(**arch)] if isinstance(arch, dict) else [PRESETS[preset], *LEGACY_PRESETS.get(preset, ())]
        error = None
        for widths in candidates:
            model = RefinementModule(widths, pretrained=False)
            try:
                model.load_state_dict(state)
                break
            except RuntimeError as exc:
                error = exc
        else:
            raise CheckpointError(
                f"Checkpoint {path.name} does not fit the CascadePSP '{preset}' network ({str(error)[:200]}): "
                "it was made by another version; retrain with `uhrseg train --method cascadepsp`."
            ) from None
        return cls(model, preset=preset, device=_device_name(device), **kwargs)

    def refine(self, image, mask, *, fast=None, L=None, cancel=None, return_steps=False):
        """Refined foreground probability of a binary mask; see :func:`refine_mask`."""
        fast = self.fast if fast is None else fast
        return refine_mask(self.model, image, mask, fast=fast, L=L or self.L, device=self.device,
                           cancel=cancel, return_steps=return_steps)  # fmt: skip

    def refine_labels(self, image, labels, *, fast=None, L=None, **kwargs) -> np.ndarray:
        """Multi-class refinement of a label image; see :func:`refine_labels`."""
        fast = self.fast if fast is None else fast
        return refine_labels(self.model, image, labels, fast=fast, L=L or self.L, device=self.device, **kwargs)

    def predict(self, window, *, context=None) -> Prediction:
        if not context or context.get("mask") is None:
            raise UhrsegError("CascadePSP refines an existing mask: pass context={'mask': labels} for the window.")
        mask = np.asarray(context["mask"])
        if mask.dtype == bool or (np.issubdtype(mask.dtype, np.floating) and mask.max(initial=0) <= 1):
            prob, steps = self.refine(window, mask, return_steps=True)
            return Prediction(np.stack([1 - prob, prob]).astype(np.float32), {"steps": steps})
        labels = self.refine_labels(window, mask)
        n = int(max(labels.max(initial=0), mask.max(initial=0))) + 1
        return Prediction(np.eye(n, dtype=np.float32)[labels].transpose(2, 0, 1), {})


def checkpoint_state(model: RefinementModule, *, half: bool) -> dict:
    """The state dict to store; ``half`` keeps float weights as fp16 (the shipped starter, half the size)."""
    return {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
            for k, v in model.state_dict().items()}  # fmt: skip


def save_refiner(path, model: RefinementModule, preset: str, *, half: bool = False, extra: dict | None = None):
    meta = {
        "method": "cascadepsp", "preset": preset, "class_names": CascadePSP.class_names,
        "normalisation": {"mean": list(model.backbone.input_mean[:3]), "std": list(model.backbone.input_std[:3])},
        "backbone": model.preset.backbone, "architecture": dataclasses.asdict(model.preset), **(extra or {}),
    }  # fmt: skip
    return save_checkpoint(path, checkpoint_state(model, half=half), meta)


# --------------------------------------------------------------------------------------------- training data
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "motorcycle", "brick", "grass",
               "gravel", "retina", "immunohistochemistry", "camera", "coins", "page", "moon", "colorwheel")  # fmt: skip


def load_photos() -> list[np.ndarray]:
    """scikit-image's offline photographs (those that ship with the wheel), as RGB uint8."""
    from skimage import data

    photos = []
    for name in PHOTO_NAMES:
        fn = getattr(data, "stereo_motorcycle" if name == "motorcycle" else name, None)
        try:
            img = fn() if fn is not None else None
        except Exception:  # a file that needs a download: skip it
            img = None
        if isinstance(img, tuple):
            img = img[0]
        if img is not None:
            photos.append(as_rgb_uint8(img))
    return photos


def _random_shape(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random object silhouette: smooth blob, ellipse or polygon, 10–60 % of the crop."""
    kind = rng.integers(3)
    mask = np.zeros((size, size), np.uint8)
    c = rng.uniform(0.3, 0.7, 2) * size
    if kind == 0:
        noise = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / rng.uniform(6, 14))
        yy, xx = np.mgrid[:size, :size]
        falloff = np.hypot(yy - c[0], xx - c[1]) / (size * rng.uniform(0.25, 0.45))
        field = (noise - noise.mean()) / (noise.std() + 1e-6) - 2.5 * falloff
        mask = (field > -1.2).astype(np.uint8)
    elif kind == 1:
        axes = tuple(int(a) for a in rng.uniform(0.12, 0.4, 2) * size)
        cv2.ellipse(mask, (int(c[1]), int(c[0])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    else:
        n = int(rng.integers(5, 12))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.15, 0.42, n) * size
        pts = np.stack([c[1] + rad * np.cos(ang), c[0] + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask


def _photo_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    scale = rng.uniform(0.5, 1.5) * size / min(photo.shape[:2])
    scale = max(scale, (size + 1) / min(photo.shape[:2]))
    img = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y = int(rng.integers(0, img.shape[0] - size + 1))
    x = int(rng.integers(0, img.shape[1] - size + 1))
    return img[y : y + size, x : x + size]


def composite_sample(photos, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic object (a texture from one photo, random silhouette) on another photo, anti-aliased edge."""
    i, j = rng.choice(len(photos), 2, replace=False)
    background, texture = _photo_crop(photos[i], size, rng), _photo_crop(photos[j], size, rng).astype(np.float32)
    texture = np.clip(texture * rng.uniform(0.6, 1.4, 3) + rng.uniform(-40, 40, 3), 0, 255)
    mask = _random_shape(size, rng)
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.7)[..., None]
    image = (background * (1 - alpha) + texture * alpha).astype(np.uint8)
    return image, mask


def _scaled_crop(image, mask, size, rng, scale_range=(1.0, 3.0)):
    """A crop of ``size × s`` px resized to ``size`` — objects seen at the scales inference meets."""
    s = rng.uniform(*scale_range)
    side = min(int(size * s), *mask.shape[:2])
    y = int(rng.integers(0, mask.shape[0] - side + 1))
    x = int(rng.integers(0, mask.shape[1] - side + 1))
    img, msk = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
    if side != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        msk = cv2.resize(msk.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return img, msk


class RefinementData:
    """Endless (image, ground truth, perturbed mask) samples from photos, DeepGlobe classes and MoNuSeg nuclei.

    ``tiles`` holds ``(rgb, label image)`` pairs, or ``(rgb, label image, (s_min, s_max))`` with the range of crop
    sides, in training-crop sides, that are resized to the crop (default ``(1, 3)``: objects at the scales of the
    global step on a 2448² tile and of the local step at full resolution). Each sample picks a class covering
    10–90 % of a random crop and uses it as the binary object (DeepGlobe classes → per-class masks; MoNuSeg nuclei →
    foreground). Masks are perturbed with ``engine.perturb.perturb_at_scale`` (the paper's recipe; small objects
    such as nuclei on an enlarged copy, so that the recipe's pixel-sized kernels do not erase them).
    """

    def __init__(self, size: int = TRAIN_CROP, *, tiles=(), photos=None, photo_fraction: float = 0.5, seed: int = 0):
        self.size = size
        self.tiles = [t if len(t) == 3 else (t[0], t[1], (1.0, 3.0)) for t in tiles]
        self.photos = load_photos() if photos is None else photos
        self.photo_fraction = photo_fraction if self.tiles else 1.0
        self.rng = np.random.default_rng(seed)

    def _tile_sample(self):
        for _ in range(20):
            image, labels, scales = self.tiles[int(self.rng.integers(len(self.tiles)))]
            img, lab = _scaled_crop(image, labels, self.size, self.rng, scales)
            present = [c for c in np.unique(lab) if c != UNKNOWN_LABEL and 0.1 <= np.mean(lab == c) <= 0.9]
            if present:
                c = present[int(self.rng.integers(len(present)))]
                return img, (lab == c).astype(np.uint8)
        return None

    def sample(self):
        from napari_uhrseg.engine.perturb import perturb_at_scale

        item = None
        if self.rng.random() >= self.photo_fraction:
            item = self._tile_sample()
        image, gt = item or composite_sample(self.photos, self.size, self.rng)
        if self.rng.random() < 0.5:
            image, gt = image[:, ::-1], gt[:, ::-1]
        image = np.clip(image * self.rng.uniform(0.8, 1.2) + self.rng.uniform(-20, 20), 0, 255).astype(np.uint8)
        seg = perturb_at_scale(np.ascontiguousarray(gt), rng=self.rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(gt), seg

    def batch(self, n: int):
        items = [self.sample() for _ in range(n)]
        image = torch.from_numpy(np.stack([i[0] for i in items])).permute(0, 3, 1, 2).float() / 255
        gt = torch.from_numpy(np.stack([i[1] for i in items])).float()[:, None]
        seg = torch.from_numpy(np.stack([i[2] for i in items])).float()[:, None] * 2 - 1
        return image, gt, seg


UNKNOWN_LABEL = 255  # DeepGlobe "unknown" in training tiles: never picked as the object
MONUSEG_CROP_SCALES = (1.0, 1.5)  # 1000² tiles at 40×: the global step sees them at 0.9, the local one at 1


MONUSEG_TRAIN = ("TCGA-21-5784-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1")  # the project's MoNuSeg training tiles


def _user_tiles(images, masks) -> list:
    """The user's (image, label image) pairs as training tiles: every label value but 0 (background) is an
    object class, renumbered 1..K; a mask with more values than that holds instances (nuclei, buildings), whose
    union is the object, as for MoNuSeg. Crops of 1–3× the training crop, as for DeepGlobe."""
    from napari_uhrseg import datasets

    tiles = []
    for image, mask in datasets.folder_pairs(images, masks):
        rgb, lab = datasets.read_rgb(image), datasets.read_mask(mask)
        if lab.ndim != 2 or lab.shape != rgb.shape[:2]:
            raise datasets.DatasetError(f"{mask.name} ({lab.shape}) is not a 2-D label image of the size of "
                                        f"{image.name} {rgb.shape[:2]}: export the labels at the image's size.")
        if not lab.any():
            raise datasets.DatasetError(f"{mask.name} has no labels (all 0): label the objects, or leave the "
                                        "pair out.")
        values = np.unique(lab[lab != 0])
        if len(values) >= UNKNOWN_LABEL:  # instance ids: one object class, their union
            compact = (lab != 0).astype(np.uint8)
        else:
            compact = np.searchsorted(values, lab).astype(np.uint8) + 1  # 1..K in the order of the values
        compact[lab == 0] = UNKNOWN_LABEL  # background: never the object, but still "not the class"
        tiles.append((rgb, compact, (1.0, 3.0)))
    return tiles


def _real_tiles(deepglobe_ids, monuseg_names) -> list:
    """DeepGlobe tiles (classes 1–6, 'unknown' 0 never used as object) and MoNuSeg tiles (nuclei = 1), each with
    its crop-scale range (see ``RefinementData``)."""
    from napari_uhrseg import datasets

    root = datasets.shared_data_dir()
    tiles = []
    if root is None:
        return tiles
    for i in deepglobe_ids:
        rgb, lab = datasets.load_deepglobe_tile(i)
        lab = lab.copy()
        lab[lab == 0] = UNKNOWN_LABEL  # unknown: never an object, but still "not the class"
        tiles.append((rgb, lab, (1.0, 3.0)))
    for name in monuseg_names:
        rgb, inst = datasets.load_monuseg_tile(root / "monuseg" / f"{name}.tif")
        tiles.append((rgb, (inst > 0).astype(np.uint8), MONUSEG_CROP_SCALES))
    return tiles


# --------------------------------------------------------------------------------------------- training
LR_DROPS = (0.5, 0.83)  # the paper: ×0.1 at 22.5k and 37.5k of 45k iterations


def train(model: RefinementModule, data: RefinementData, *, minutes: float, batch: int = 8,
          lr: float = LEARNING_RATE, log=print, max_steps: int | None = None, on_checkpoint=None,
          lr_drops: tuple[float, ...] = LR_DROPS) -> list[float]:  # fmt: skip
    """Adam (2.25e-4, wd 1e-4) on the six-output loss; ×0.1 at each fraction in ``lr_drops`` of the run (the
    paper's 50 % and 83 % by default), applied to the *time* budget, since a CPU run is bounded by minutes, not
    iterations. A run a hundredth of the paper's length may drop later (``--lr-drops 0.8,0.95``)."""
    reuse_freed_memory()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    model.train()
    start, losses, step = time.time(), [], 0
    while True:
        frac = (time.time() - start) / (minutes * 60)
        if frac >= 1 or (max_steps is not None and step >= max_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr * 0.1 ** sum(frac > d for d in lr_drops)
        image, gt, seg = data.batch(batch)
        loss = cascade_loss(model(image, seg), gt)
        opt.zero_grad()
        loss["total"].backward()
        opt.step()
        losses.append(float(loss["total"].detach()))
        step += 1
        if step % 5 == 0:
            log(f"step {step} {time.time() - start:.0f}s loss {np.mean(losses[-5:]):.4f} "
                f"(bce {loss['bce'].item():.3f} l1l2 {loss['l1l2'].item():.3f} grad {loss['grad'].item():.3f})")
            if on_checkpoint is not None and step % 25 == 0:
                on_checkpoint(step)
    model.eval()
    return losses


def train_main(argv=None, method: str = "cascadepsp") -> int:
    """``uhrseg train --method cascadepsp``: train a class-agnostic refiner on perturbed masks."""
    from napari_uhrseg.cli._argtypes import count, positive

    ap = argparse.ArgumentParser(prog="uhrseg train --method cascadepsp", description=train_main.__doc__)
    ap.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    ap.add_argument("--minutes", type=positive, default=25.0, help="wall-clock budget")
    ap.add_argument("--max-steps", type=count(1), default=None)
    ap.add_argument("--batch-size", type=count(1), default=8)
    ap.add_argument("--crop", type=count(32), default=TRAIN_CROP, help="training crop side in px (paper: 224)")
    ap.add_argument("--lr", type=positive, default=LEARNING_RATE)
    ap.add_argument("--lr-drops", default=",".join(str(d) for d in LR_DROPS),
                    help="fractions of the time budget where the learning rate drops ×0.1 (paper: 0.5,0.83)")
    ap.add_argument("--deepglobe", default=None,
                    help="'train' (the project's split; the default without --images), 'none', or comma ids")
    ap.add_argument("--monuseg", default=None,
                    help="MoNuSeg tile names to train on, or 'none' (default without --images: "
                         f"{','.join(MONUSEG_TRAIN)})")
    ap.add_argument("--images", default=None, help="your own training images: a folder (with --masks)")
    ap.add_argument("--masks", default=None,
                    help="their label images <stem>.png, every object labelled (0 = background); each label value "
                         "is an object class, refined as a binary mask")
    ap.add_argument("--photo-fraction", type=float, default=0.5, help="share of synthetic photo composites")
    ap.add_argument("--init", default=None, help="start from this CascadePSP checkpoint")
    ap.add_argument("--no-pretrained", action="store_true",
                    help="random backbone weights (default: ImageNet; shipped for 'fast', for 'paper' torchvision's "
                         "resnet50 .pth from $UHRSEG_WEIGHTS_DIR)")
    ap.add_argument("--half", action="store_true", help="store fp16 weights (the shipped starter)")
    ap.add_argument("--threads", type=count(1), default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_checkpoint_output(args.output)  # before the training, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from napari_uhrseg import datasets
    from napari_uhrseg.errors import UhrsegError

    try:
        if bool(args.images) != bool(args.masks):
            raise UhrsegError("--images and --masks go together: a folder of images and one of their label images.")
        own = _user_tiles(args.images, args.masks) if args.images else []
        deepglobe = args.deepglobe or ("none" if args.images else "train")
        monuseg = args.monuseg or ("none" if args.images else ",".join(MONUSEG_TRAIN))
        dg = [] if deepglobe == "none" else (
            datasets.deepglobe_split()["train"] if deepglobe == "train" else deepglobe.split(","))
        mo = [] if monuseg == "none" else monuseg.split(",")
        tiles = own + _real_tiles(dg, mo)
        model = (CascadePSP.from_checkpoint(args.init).model if args.init
                 else RefinementModule(args.preset, pretrained=not args.no_pretrained))
    except UhrsegError as exc:
        print(f"uhrseg train: {exc}", file=sys.stderr)
        return 2
    print(f"training CascadePSP '{args.preset}' on {len(tiles)} real tiles ({len(own)} of yours) + photo composites, "
          f"{args.minutes} min")
    data = RefinementData(args.crop, tiles=tiles, photo_fraction=args.photo_fraction, seed=args.seed)
    extra = {"training": {"command": "uhrseg train --method cascadepsp " + " ".join(argv or []),
                          "deepglobe": dg, "monuseg": mo, "crop": args.crop, "batch": args.batch_size,
                          "images": len(own)}}
    if args.init:  # a continued run records what it started from (its command and steps), so the chain is known
        from napari_uhrseg.methods.base import read_checkpoint_meta

        before = read_checkpoint_meta(args.init)
        extra["training"]["init"] = {"file": Path(args.init).name, "steps": before.get("steps"),
                                     "training": before.get("training")}  # fmt: skip

    def checkpoint(step):
        save_refiner(args.output, model, args.preset, half=args.half, extra={**extra, "steps": step})

    drops = tuple(float(d) for d in args.lr_drops.split(",") if d.strip())
    losses = train(model, data, minutes=args.minutes, batch=args.batch_size, lr=args.lr,
                   max_steps=args.max_steps, on_checkpoint=checkpoint, lr_drops=drops)  # fmt: skip
    checkpoint(len(losses))
    print(f"wrote {args.output} after {len(losses)} steps; last loss {np.mean(losses[-10:]) if losses else float('nan'):.4f}")
    return 0
