"""MagNet and MagNet-Fast: multi-scale progressive refinement (Huynh et al., CVPR 2021, ``seeds/002``).

A segmentation backbone predicts the window at its coarsest scale; then, scale by scale from the coarsest to
the finest, the window is cut into patches, the backbone predicts each patch ("fine", scale-specific), and a
small refinement module fuses that with the previous scale's prediction ("coarse"). The query score

    Q = median_blur(certainty(refined) * (1 - certainty(coarse)))

ranks the pixels; the top-k are replaced by the refined prediction. MagNet-Fast refines only the few most
uncertain patches per scale.

Differences from the authors' public code, on purpose (``reference/seed-implementations.md``): one concat
order ``[coarse, fine]`` for training and inference (``MagNetNet.refine`` is the only place that builds it);
Fast mode keeps the *most* uncertain patches; overlapping patches are accumulated and averaged.
The coarse input of a patch is sampled from the previous prediction the same way in training and at
inference (``crop_probabilities``).

Coordinates: everything in this module is in *window pixels at the working level* (the window the engine
hands to ``predict``), rows then columns; boxes are ``(y0, x0, y1, x1)`` with exclusive ends. The engine
converts artefacts to level-0 pixels.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_uhrseg.methods.base import Method, Prediction, load_checkpoint, register_method

# ----------------------------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Schedule:
    """How inference walks the scales (the paper's numbers are the presets below).

    scale_fractions: each scale's side as a fraction of the window side, coarsest first. The coarsest
        scale is also the patch (crop) size of every later scale.
    input_ratio: model input side / crop side (DeepGlobe: 612 crops resized to 508).
    n_patches: patches refined per scale, the most uncertain first; -1 = all (MagNet), 3 = MagNet-Fast.
    n_points: pixels replaced per scale: <= 1 is a fraction of the refined area, > 1 an absolute count.
    median_kernel: odd kernel of the median blur F in Q, in model-input pixels.
    border_fraction: share of the crop side at a patch's inner borders that is not pasted (padding
        artefacts of the backbone; the public code drops 10 px of 612).
    """

    name: str
    scale_fractions: tuple[float, ...]
    input_ratio: float
    n_patches: int = -1
    n_points: float = 0.75
    median_kernel: int = 11
    border_fraction: float = 10 / 612

    def __post_init__(self):
        if self.median_kernel < 1 or self.median_kernel % 2 == 0:
            raise ValueError(f"median_kernel must be odd and positive, got {self.median_kernel}")
        if list(self.scale_fractions) != sorted(self.scale_fractions):
            raise ValueError("scale_fractions must go from the coarsest to the finest scale")


SCHEDULES: dict[str, Schedule] = {
    # DeepGlobe 2448²: scales 612², 1224², 2448²; 612 crops resized to 508; 0.75 of the points; k = 11.
    "deepglobe": Schedule("deepglobe", (0.25, 0.5, 1.0), 508 / 612, -1, 0.75, 11),
    # Cityscapes 2048×1024: 256×128 … 2048×1024, crop = input = 256×128; 32768 points; k = 5.
    "cityscapes": Schedule("cityscapes", (0.125, 0.25, 0.5, 1.0), 1.0, -1, 32768, 5),
}
# MagNet-Fast: only the most uncertain patches of each scale (3 on DeepGlobe, 4 on Cityscapes), 0.9 of the points.
FAST_OVERRIDES: dict[str, dict] = {
    "deepglobe": {"n_patches": 3, "n_points": 0.9},
    "cityscapes": {"n_patches": 4, "n_points": 0.9},
}
# Backbone presets: `paper` as published (ResNet-50 FPN, GLNet's global FPN; the schedule's input size);
# `fast` for CPUs: EfficientNet-Lite0 with a 64-channel FPN and the 612 px crops read at 256 px instead of
# 508 px — 4× fewer pixels through the backbone and the refiner, which decides the CPU time.
BACKBONE_PRESETS: dict[str, dict] = {
    "fast": {"backbone": "efficientnet_lite0", "fpn_channels": 64, "input_ratio": 256 / 612},
    "paper": {"backbone": "resnet50", "fpn_channels": 256, "input_ratio": None},
}
REFINER_BN_MOMENTUM = 0.01
OHEM_THRESHOLD, OHEM_MIN_KEPT = 0.7, 100_000


def get_schedule(name: str, *, fast: bool = False, preset: str | None = None,
                 input_ratio: float | None = None) -> Schedule:
    """The named schedule, with the MagNet-Fast overrides when ``fast``, and the model input size of
    ``input_ratio`` (what a checkpoint was trained at) or else of the backbone preset (``fast``: 256 px per 612
    crop)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown MagNet schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    schedule = SCHEDULES[name]
    if fast:
        schedule = replace(schedule, **FAST_OVERRIDES[name])
    ratio = input_ratio or (BACKBONE_PRESETS[preset].get("input_ratio") if preset else None)
    return replace(schedule, input_ratio=ratio) if ratio else schedule


# ----------------------------------------------------------------------------------------------- networks


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1, 3×3, 1×1, expansion 4) with an optional 1×1 projection of the shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, momentum: float = REFINER_BN_MOMENTUM):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, momentum=momentum)
        self.downsample = None
        if in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch, momentum=momentum)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _conv_bn_relu(in_ch: int, out_ch: int, momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch, momentum=momentum), nn.ReLU()
    )


class RefinementModule(nn.Module):
    """The paper's refinement module: concat(coarse, fine) (2C) → BN → 3×3 conv 64 → 3×3 conv 64 →
    two bottlenecks (planes 32 → 128 channels) → 1×1 conv to C logits, no bias. BN momentum 0.01.

    ``forward(coarse, fine)`` takes class probabilities ``(N, C, H, W)``; the channel order of the
    concatenation is fixed here, once, for training and inference.
    """

    def __init__(self, num_classes: int, momentum: float = REFINER_BN_MOMENTUM):
        super().__init__()
        self.input_bn = nn.BatchNorm2d(2 * num_classes, momentum=momentum)
        self.convs = nn.Sequential(_conv_bn_relu(2 * num_classes, 64, momentum), _conv_bn_relu(64, 64, momentum))
        self.bottlenecks = nn.Sequential(Bottleneck(64, 32, momentum), Bottleneck(128, 32, momentum))
        self.classify = nn.Conv2d(128, num_classes, 1, bias=False)

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        x = self.input_bn(torch.cat([coarse, fine], dim=1))
        return self.classify(self.bottlenecks(self.convs(x)))


class FPNSegmenter(nn.Module):
    """The backbone "giving full-resolution logits": a GRNet G-branch (trunk, FPN summed at stride 4, 3×3
    feature conv, 1×1 classifier — the same module, so a GRNet checkpoint's G-branch loads as it is), its
    stride-4 logits bilinearly upsampled to the input size. Inputs are images in [0, 1] ``(N, 3, H, W)``, any
    size (padded to a multiple of 32 inside); the branch applies its trunk's normalisation."""

    def __init__(self, backbone: str, num_classes: int, fpn_channels: int = 64, pretrained: Any = True):
        super().__init__()
        from napari_uhrseg.methods.grnet_ppn import SegmentationBranch

        self.branch = SegmentationBranch(backbone, 5, fpn_channels, num_classes, pretrained)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        h, w = x01.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        if ph or pw:
            x01 = F.pad(x01, (0, pw, 0, ph), mode="replicate")
        _, logits = self.branch(x01)
        logits = F.interpolate(logits, size=x01.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


class MagNetNet(nn.Module):
    """Backbone (segmentation network) + refinement module. ``refine`` is the single place where the
    refinement input is put together — training and inference both call it."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.refiner = RefinementModule(num_classes)

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of the backbone at the input size."""
        return torch.softmax(self.backbone(images), dim=1)

    def refine(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """Refinement logits from the previous scale's probabilities (``coarse``) and this scale's (``fine``)."""
        return self.refiner(coarse, fine)


# --------------------------------------------------------------------------------------- inference parts
#
# How the inference does only the work it needs (docs/methods/magnet.md, "Speed"): the window stays uint8 and
# every backbone input (the whole window for stage 0, each refined patch) is resampled from it directly; patches
# are ranked on the previous (4× smaller) canvas; coarse/fine/refined/Q exist only for the refined patches and
# are accumulated inside their boxes; the top-k threshold is one ``kthvalue`` over the covered pixels; canvases
# are upsampled with OpenCV and replaced in place inside the refined boxes. ``tests/test_magnet_inference.py``
# checks that this gives the same labels as a straightforward full-canvas implementation.


def certainty(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Top-1 minus top-2 class probability along ``dim`` (1 = sure, 0 = a tie).

    A running maximum and second maximum over the classes (three elementwise passes per class): the same
    numbers as ``topk(2)``, several times faster over the class axis of a large canvas."""
    p = probabilities.movedim(dim, 0)
    if p.shape[0] < 2:
        return torch.ones_like(p[0])
    first = torch.maximum(p[0], p[1])
    second = torch.minimum(p[0], p[1])
    scratch = torch.empty_like(first)
    for c in range(2, p.shape[0]):
        torch.minimum(first, p[c], out=scratch)
        torch.maximum(second, scratch, out=second)
        torch.maximum(first, p[c], out=first)
    return first.sub_(second)


def certainty_map(probabilities: torch.Tensor, rows: int = 16, *, uncertainty: bool = False) -> torch.Tensor:
    """``certainty`` of ``(C, H, W)`` probabilities → ``(H, W)``, a band of ``rows`` rows at a time (the running
    maxima stay in the cache: 37 → 26 ms on a 7-class 2448² canvas with bands of 16 rows instead of 64, where
    the three running maps of a band no longer fit the core's L2). ``uncertainty=True`` returns 1 − certainty,
    computed band by band too (no further pass over the map). On the CPU the bands go through NumPy, in the
    calling thread: hundreds of small parallel ops are what suffers most when other jobs share the cores.
    (Splitting the bands over two Python threads measured 23 → 29 ms on a 2448² canvas once, with torch's OpenMP
    workers spinning after the network's last op; with them passive, 28 → 23 ms on 2026-12-03: the pass is
    bound by memory, and a pool of threads was not worth 5 ms.)"""
    if probabilities.device.type != "cpu":
        out = torch.empty(probabilities.shape[-2:], device=probabilities.device)
        for r in range(0, probabilities.shape[-2], rows):
            out[r : r + rows] = certainty(probabilities[None, :, r : r + rows])[0]
        return out.neg_().add_(1) if uncertainty else out
    p = probabilities.detach().float().numpy()
    out = np.empty(p.shape[1:], np.float32)
    if p.shape[0] < 2:
        out.fill(0 if uncertainty else 1)
    else:
        _certainty_rows(p, out, rows, uncertainty)
    return torch.from_numpy(out)


def uncertainty_map(probabilities: torch.Tensor) -> torch.Tensor:
    """1 − ``certainty`` of ``(C, H, W)`` probabilities → ``(H, W)``: what the uncertainty overlay shows."""
    return certainty_map(probabilities, uncertainty=True)


def _certainty_rows(p: np.ndarray, out: np.ndarray, rows: int, uncertainty: bool = False) -> None:
    """Top-1 minus top-2 of ``(C, H, W)`` ``p`` into ``out`` ``(H, W)``, ``rows`` rows at a time (or
    1 − that with ``uncertainty``)."""
    c, h, width = p.shape
    first, second = np.empty((rows, width), np.float32), np.empty((rows, width), np.float32)
    scratch = np.empty_like(first)
    for r in range(0, h, rows):
        n = min(rows, h - r)
        f, s, t = first[:n], second[:n], scratch[:n]
        np.maximum(p[0, r : r + n], p[1, r : r + n], out=f)
        np.minimum(p[0, r : r + n], p[1, r : r + n], out=s)
        for k in range(2, c):
            np.minimum(f, p[k, r : r + n], out=t)
            np.maximum(s, t, out=s)
            np.maximum(f, p[k, r : r + n], out=f)
        if uncertainty:  # 1 - (f - s) = (s - f) + 1, while the band is in the cache
            np.subtract(s, f, out=out[r : r + n])
            out[r : r + n] += 1
        else:
            np.subtract(f, s, out=out[r : r + n])


def median_blur(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Median filter of ``(N, H, W)`` maps in [0, 1] with an odd ``kernel`` (reflected borders).

    OpenCV's median filter takes kernels above 5 only for uint8, so the maps are quantised to 1/255 steps;
    the unblurred map is added at 1e-4 weight to order pixels inside a flat plateau.
    """
    import cv2

    if kernel <= 1:
        return maps
    out = []
    for m in maps.detach().cpu().numpy():
        q = np.clip(np.rint(m * 255), 0, 255).astype(np.uint8)
        out.append(cv2.medianBlur(q, kernel).astype(np.float32) / 255 + np.float32(1e-4) * m)
    return torch.from_numpy(np.stack(out)).to(maps.device)


def query_score(refined: torch.Tensor, coarse: torch.Tensor, kernel: int) -> torch.Tensor:
    """The paper's Q = F(Y^u ⊙ (1 − R^u)) = median_blur(certainty(refined) × (1 − certainty(coarse))).

    High where the previous scale was unsure and the refined prediction is sure. ``(N, C, H, W)`` → ``(N, H, W)``.
    """
    return median_blur(certainty(refined) * (1 - certainty(coarse)), kernel)


def patch_starts(size: int, crop: int) -> list[int]:
    """Start offsets of ``ceil(size / crop)`` patches of side ``crop`` covering ``[0, size)``, spread evenly,
    first at 0 and last ending at ``size``; patches overlap when ``crop`` does not divide ``size``.
    (The public code's integer step can leave the last pixels uncovered.)"""
    crop = min(crop, size)
    n = math.ceil(size / crop)
    if n == 1:
        return [0]
    return [round(i * (size - crop) / (n - 1)) for i in range(n)]


def patch_boxes(shape: tuple[int, int], crop: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Patch grid ``(y0, x0, y1, x1)`` over a scale of ``shape`` (pixels of that scale)."""
    ch, cw = min(crop[0], shape[0]), min(crop[1], shape[1])
    return [(y, x, y + ch, x + cw) for y in patch_starts(shape[0], ch) for x in patch_starts(shape[1], cw)]


def points_to_replace(n_points: float, scale_pixels: int, n_selected: int, n_total: int) -> int:
    """How many pixels a scale replaces: ``n_points`` ≤ 1 is a fraction of the refined area
    (DeepGlobe 0.75), > 1 an absolute count capped by that area (Cityscapes 32768)."""
    area = scale_pixels * n_selected / max(n_total, 1)
    if n_points > 1:
        return int(min(n_points, area))
    return int(area * n_points)


def paste_weight(box: tuple[int, int, int, int], shape: tuple[int, int], border: int) -> torch.Tensor:
    """Weight of a patch's pixels on the scale canvas: 1 inside, 0 in a ``border`` at the patch sides that
    are not the canvas edge (their backbone output suffers from padding)."""
    y0, x0, y1, x1 = box
    w = torch.zeros(y1 - y0, x1 - x0)
    iy0, ix0, iy1, ix1 = inner_box(box, shape, border)
    w[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = 1
    return w


def inner_box(box: tuple[int, int, int, int], shape: tuple[int, int], border: int) -> tuple[int, int, int, int]:
    """The part of a patch that is pasted (``paste_weight`` 1): ``box`` less ``border`` px on each side that is
    not the canvas edge; scale pixels."""
    y0, x0, y1, x1 = box
    b = max(0, int(border))
    iy0, ix0 = y0 + (b if y0 > 0 else 0), x0 + (b if x0 > 0 else 0)
    iy1, ix1 = y1 - (b if y1 < shape[0] else 0), x1 - (b if x1 < shape[1] else 0)
    return iy0, ix0, max(iy0, iy1), max(ix0, ix1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)``; antialiased when shrinking (images and probabilities alike)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_maps(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (pixel centres aligned) of stacked 2-D maps ``(..., h, w)`` → ``(..., H, W)`` float32,
    antialiased when shrinking. Upsampling on the CPU goes through OpenCV, channel by channel: the same
    interpolation as ``F.interpolate(align_corners=False)`` (to ~1e-5) at a tenth of the time, which is what
    a 7-class 2448² canvas needs."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if shrink or x.device.type != "cpu":
        lead = x.shape[:-2]
        out = _resize(x.reshape(1, -1, *x.shape[-2:]).float(), size)
        return out.reshape(*lead, *size)
    import cv2

    src = x.detach().float().contiguous().numpy()
    out = np.empty(src.shape[:-2] + size, np.float32)
    flat_src, flat_out = src.reshape(-1, *src.shape[-2:]), out.reshape(-1, *size)
    for i in range(flat_src.shape[0]):
        cv2.resize(flat_src[i], (size[1], size[0]), dst=flat_out[i], interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out)


def _scale_shapes(shape: tuple[int, int], schedule: Schedule) -> list[tuple[int, int]]:
    return [(max(1, round(shape[0] * f)), max(1, round(shape[1] * f))) for f in schedule.scale_fractions]


def _input_shape(crop: tuple[int, int], schedule: Schedule) -> tuple[int, int]:
    return max(1, round(crop[0] * schedule.input_ratio)), max(1, round(crop[1] * schedule.input_ratio))


def map_box(box, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box in pixels of a canvas of ``from_shape`` → the pixels it covers on a canvas of ``to_shape`` (same
    extent, another resolution): rounded, at least one pixel."""
    fy, fx = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
    y0, x0 = min(round(box[0] * fy), to_shape[0] - 1), min(round(box[1] * fx), to_shape[1] - 1)
    return y0, x0, max(y0 + 1, min(round(box[2] * fy), to_shape[0])), max(x0 + 1, min(round(box[3] * fx), to_shape[1]))


class WindowPixels:
    """The window being segmented, read region by region: every backbone input — the whole window at stage 0,
    each refined patch later — is resampled from the window's own pixels, once (antialiased bilinear, as the
    GRNet G-branch was trained), instead of resizing the whole window to every scale and cropping.

    ``source``: RGB uint8 ``(H, W, 3)`` (kept as uint8, channels-last: a view, no copy; uint8 resampling is what
    CPUs do fastest) or a float tensor ``(3, H, W)`` in [0, 1]. ``read(boxes, size)`` → ``(N, 3, *size)`` float
    in [0, 1]; boxes in window pixels."""

    def __init__(self, source, device: str | torch.device = "cpu"):
        if isinstance(source, torch.Tensor):
            if source.ndim != 3 or source.shape[0] != 3:
                raise ValueError(f"a window tensor is (3, H, W) in [0, 1], got {tuple(source.shape)}")
            self.pixels = source[None].float().to(device)
        else:
            rgb = np.asarray(source)
            if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
                raise ValueError(f"MagNet reads RGB uint8 windows (H, W, 3), got {rgb.dtype} {rgb.shape}")
            if not (rgb.flags.c_contiguous and rgb.flags.writeable and rgb.shape[2] == 3):
                rgb = np.array(rgb[..., :3], order="C")  # torch shares only contiguous, writeable arrays
            self.pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device)
        self.shape = (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))

    def read(self, boxes, size: tuple[int, int]) -> torch.Tensor:
        size = (int(size[0]), int(size[1]))
        return torch.cat([self._read(self.pixels[..., y0:y1, x0:x1], size) for y0, x0, y1, x1 in boxes])

    @staticmethod
    def _read(crop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if crop.dtype != torch.uint8:
            return _resize(crop, size)
        if tuple(crop.shape[-2:]) == size:
            return crop.float().div_(255).contiguous()
        shrink = size[0] < crop.shape[-2] or size[1] < crop.shape[-1]
        if crop.device.type == "cpu":
            y = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                              align_corners=False, antialias=shrink)
            return y.float().div_(255).contiguous()
        return _resize(crop.float() / 255, size)


def crop_probabilities(prob: torch.Tensor, box, shape, size) -> torch.Tensor:
    """Bilinear sample of the probabilities ``(C, h, w)`` (any resolution) over ``box``, given in the pixels
    of a canvas of ``shape`` covering the same extent, at ``size``: the coarse input of the refinement
    module, made the same way in training (from the whole-window prediction) and at inference (from the
    previous stage's canvas) — one resampling, straight from the smaller map, edges clamped as in a resize."""
    y0, x0, y1, x1 = box
    H, W = shape
    theta = torch.tensor([[(x1 - x0) / W, 0, (x0 + x1) / W - 1], [0, (y1 - y0) / H, (y0 + y1) / H - 1]],
                         dtype=prob.dtype, device=prob.device)
    grid = F.affine_grid(theta[None], [1, prob.shape[0], size[0], size[1]], align_corners=False)
    return F.grid_sample(prob[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def patch_scores(previous: torch.Tensor, boxes: list, shape: tuple[int, int],
                 uncertainty: torch.Tensor | None = None) -> list[float]:
    """Each patch's mean uncertainty 1 − certainty, read on the previous stage's canvas ``previous``
    ``(C, h', w')`` over the patch's footprint (boxes are in pixels of this scale's ``shape``): the ranking of
    the paper (mean of U over the patch) at a quarter of the pixels. ``uncertainty``: that map, when the
    caller has it already."""
    if uncertainty is None:
        uncertainty = uncertainty_map(previous)
    prev_shape = tuple(previous.shape[-2:])
    scores = []
    for box in boxes:
        y0, x0, y1, x1 = map_box(box, shape, prev_shape)
        scores.append(float(uncertainty[y0:y1, x0:x1].mean()))
    return scores


def select_patches(scores: list[float], n_patches: int) -> list[int]:
    """Indices of the patches refined, in grid order: all (``n_patches`` < 0), or the ``n_patches`` MOST
    uncertain (the public code's ascending sort kept the least uncertain ones); ties keep grid order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return sorted(order if n_patches < 0 else order[:n_patches])


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of the 1-D ``values`` (1 ≤ k ≤ n), as a 0-d tensor: the threshold of a top-k.
    On the CPU through NumPy's introselect (``partition``): the same number as ``kthvalue(n − k + 1)``, ~25×
    faster on the million query scores of a scale (24 ms → 1 ms)."""
    n = values.numel()
    if values.device.type == "cpu":
        return torch.from_numpy(np.partition(values.detach().numpy(), n - k)[n - k : n - k + 1]).reshape(())
    return values.kthvalue(n - k + 1).values


def count_true(mask: torch.Tensor) -> int:
    """Number of True elements; ``sum()`` of a boolean tensor is ~100× slower than NumPy's count on the CPU
    (20 ms for a 2448² mask)."""
    if mask.device.type == "cpu":
        return int(np.count_nonzero(mask.detach().numpy()))
    return int(torch.count_nonzero(mask))


def top_k_mask(query_map: torch.Tensor, covered: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` covered pixels with the highest ``query_map`` as a boolean map; ties at the threshold go in
    raster order (as a stable descending sort would take them). One ``kthvalue`` over the covered pixels
    instead of a ``topk`` over the whole scale. (The whole-canvas form of the rule; ``refine_scale`` applies it
    to the refined patches' own pixels with ``_top_k_in_parts``.)"""
    flat_q, flat_c = query_map.reshape(-1), covered.reshape(-1)
    mask = torch.zeros_like(flat_c)
    values = flat_q[flat_c]
    n = values.numel()
    k = min(int(k), n)
    if k <= 0:
        return mask.view_as(covered)
    if k == n:
        return covered.clone()
    threshold = kth_largest(values, k)
    chosen = values > threshold
    missing = k - count_true(chosen)
    if missing > 0:
        tied = values == threshold
        chosen |= tied & (tied.cumsum(0) <= missing)
    mask[flat_c] = chosen
    return mask.view_as(covered)


def _intersection(a, b):
    y0, x0, y1, x1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None


def _within(box, outer) -> tuple[slice, slice]:
    """Slices of ``box`` in the pixels of ``outer`` (which contains it)."""
    return slice(box[0] - outer[0], box[2] - outer[0]), slice(box[1] - outer[1], box[3] - outer[1])


def _at_scale(refined: torch.Tensor, size: tuple[int, int], sy: slice, sx: slice) -> torch.Tensor:
    """A patch's refined probabilities (model input) resized to its box at the scale and cut to its inner box."""
    return resize_maps(refined, size)[:, sy, sx]


def _average_pasted(inner: dict, pasted: dict) -> list[tuple]:
    """Per refined patch ``i`` (grid order): its inner box, the refined probabilities and query scores averaged
    over every patch pasted on each of its pixels (summed in grid order, so a pixel gets the same numbers in
    every box that covers it), and the mask of its pixels no earlier patch covers (None: all of them).
    ``pasted[i]``: (refined probabilities over the inner box, or a function that makes them; query scores).
    A patch no other overlaps keeps what it was given (the function, called when it is pasted)."""
    order = sorted(inner)
    parts = []
    made = {}

    def refined_of(j):
        if j not in made:
            made[j] = pasted[j][0]() if callable(pasted[j][0]) else pasted[j][0]
        return made[j]

    for i in order:
        box = inner[i]
        others = [(j, _intersection(box, inner[j])) for j in order if j != i]
        others = [(j, r) for j, r in others if r is not None]
        refined, query = pasted[i]
        owned = None
        if others:
            refined = refined_of(i)
            refined_sum, query_sum = torch.zeros_like(refined), torch.zeros_like(query)
            count = torch.zeros_like(query)
            for j in order:
                r = box if j == i else _intersection(box, inner[j])
                if r is None:
                    continue
                (ys, xs), (yj, xj) = _within(r, box), _within(r, inner[j])
                refined_sum[:, ys, xs] += refined_of(j)[:, yj, xj]
                query_sum[ys, xs] += pasted[j][1][yj, xj]
                count[ys, xs] += 1
            refined, query = refined_sum / count, query_sum / count
            owned = torch.ones(query.shape, dtype=torch.bool, device=query.device)
            for j, r in others:
                if j < i:
                    owned[_within(r, box)] = False
        parts.append((box, refined, query, owned))
    return parts


def _top_k_in_parts(parts: list[tuple], k: int, width: int) -> list[torch.Tensor]:
    """``top_k_mask`` over the pixels of the refined patches only: one ``kthvalue`` over their query scores
    (each pixel counted once), ties at the threshold in the scale's raster order. Returns a mask per part."""
    values = [q.reshape(-1) if owned is None else q[owned] for _, _, q, owned in parts]
    values = torch.cat(values) if values else torch.empty(0)
    n = values.numel()
    k = min(int(k), n)
    if k <= 0:
        return [torch.zeros(q.shape, dtype=torch.bool, device=q.device) for _, _, q, _ in parts]
    if k == n:
        return [torch.ones(q.shape, dtype=torch.bool, device=q.device) for _, _, q, _ in parts]
    threshold = kth_largest(values, k)
    missing = k - count_true(values > threshold)
    masks = [q > threshold for _, _, q, _ in parts]
    if missing > 0:  # the first `missing` tied pixels in raster order, wherever they are
        def tied(box, q, owned):
            m = q == threshold if owned is None else (q == threshold) & owned
            ys, xs = torch.nonzero(m, as_tuple=True)
            return ys, xs, (ys + box[0]) * width + (xs + box[1])

        taken = torch.sort(torch.cat([tied(box, q, owned)[2] for box, _, q, owned in parts])).values[:missing]
        for mask, (box, _, q, _) in zip(masks, parts):
            ys, xs, lin = tied(box, q, None)
            hit = torch.isin(lin, taken)
            mask[ys[hit], xs[hit]] = True
    return masks


def refine_scale(
    forward,
    window: WindowPixels,
    previous: torch.Tensor,
    shape: tuple[int, int],
    schedule: Schedule,
    crop: tuple[int, int],
    *,
    batch_size: int = 4,
    full_maps: bool = True,
    previous_uncertainty: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """One stage of the progressive inference at a scale of ``shape`` pixels.

    forward: the network (``segment``, ``refine``); window: the window's pixels; previous: ``(C, h', w')``
    probabilities of the previous stage on its own canvas. The prediction at this scale is the previous one
    upsampled, except at the top-k query points of the refined patches, which take the refined prediction
    (overlapping patches averaged). Returns it ``(C, *shape)`` and the stage record: the patches, the pasted
    ``parts`` (box, query scores, replaced mask, pixels no earlier part covers; this scale's pixels) and, with
    ``full_maps``, the query map and replaced points over the whole scale (``stage_artefacts`` makes its
    coarse maps straight from the parts, so ``predict`` skips those two scale-sized maps). Refined
    probabilities and query scores exist only inside the refined patches. ``previous_uncertainty``: 1 −
    certainty of ``previous`` when the caller has it already.
    """
    shape = (int(shape[0]), int(shape[1]))
    boxes = patch_boxes(shape, crop)
    scores = patch_scores(previous, boxes, shape, previous_uncertainty)
    keep = select_patches(scores, schedule.n_patches)
    canvas = resize_maps(previous, shape)  # the previous prediction at this scale; refined points replace it
    model_input = _input_shape(crop, schedule)
    border = round(schedule.border_fraction * min(crop))
    inner = {i: inner_box(boxes[i], shape, border) for i in keep}
    inner = {i: b for i, b in inner.items() if b[2] > b[0] and b[3] > b[1]}
    pasted = {}
    for start in range(0, len(keep), batch_size):
        chosen = keep[start : start + batch_size]
        fine = forward.segment(window.read([map_box(boxes[i], shape, window.shape) for i in chosen], model_input))
        coarse = torch.stack([crop_probabilities(previous, boxes[i], shape, model_input) for i in chosen])
        refined = torch.softmax(forward.refine(coarse, fine), dim=1)
        query = query_score(refined, coarse, schedule.median_kernel)
        for j, i in enumerate(chosen):
            if i in inner:  # the pasted part: the patch less its inner border, at this scale
                y0, x0, y1, x1 = boxes[i]
                sy, sx = _within(inner[i], boxes[i])
                # The refined probabilities stay at the model input until they are pasted: 16 patches of 7
                # classes at 612² would hold ~170 MB at once, and MagNet's windows then outgrew the heap the
                # process keeps (memory.py), page-faulting ~600 MB again in every window.
                pasted[i] = (functools.partial(_at_scale, refined[j], (y1 - y0, x1 - x0), sy, sx),
                             resize_maps(query[j], (y1 - y0, x1 - x0))[sy, sx])
    # Accumulate and average: overlapping patches must not overwrite each other.
    parts = _average_pasted(inner, pasted)
    k = points_to_replace(schedule.n_points, shape[0] * shape[1], len(keep), len(boxes))
    masks = _top_k_in_parts(parts, k, shape[1])
    for (box, refined, query, _), mask in zip(parts, masks):
        y0, x0, y1, x1 = box
        region = canvas[:, y0:y1, x0:x1]
        refined = refined() if callable(refined) else refined
        if region.device.type == "cpu":  # in place, no temporary canvas-sized copy (~4× faster)
            np.copyto(region.numpy(), refined.numpy(), where=mask.numpy())
        else:
            region.copy_(torch.where(mask, refined, region))
        del refined
    record = {
        "scale": shape,
        "parts": [{"box": box, "query": query, "replaced": mask, "owned": owned}
                  for (box, _, query, owned), mask in zip(parts, masks)],
        "patches": [{"box": b, "score": s, "selected": i in keep} for i, (b, s) in enumerate(zip(boxes, scores))],
    }
    if full_maps:
        query_map = torch.zeros(shape, device=canvas.device)  # 0 where no patch was pasted
        replaced = torch.zeros(shape, dtype=torch.bool, device=canvas.device)
        for part in record["parts"]:
            y0, x0, y1, x1 = part["box"]
            query_map[y0:y1, x0:x1] = part["query"]
            replaced[y0:y1, x0:x1] = part["replaced"]
        record["query_map"], record["replaced"] = query_map, replaced
    return canvas, record


@torch.inference_mode()
def progressive_inference(
    net,
    window,
    schedule: Schedule,
    *,
    batch_size: int = 4,
    cancel: Callable[[], bool] | None = None,
    full_maps: bool = True,
) -> tuple[torch.Tensor, list[dict]]:
    """MagNet on one window: RGB uint8 ``(H, W, 3)`` (or a float ``(3, H, W)`` tensor in [0, 1], or a
    ``WindowPixels``) → ``(C, H, W)`` probabilities and one record per stage (stage 0 = the backbone alone at
    the coarsest scale; then one per finer scale, see ``refine_scale``; ``full_maps=False`` leaves out their
    scale-sized query and replaced maps). ``net``: anything with ``segment`` and ``refine`` — a
    ``MagNetNet`` or its ``InferenceNet``."""
    pinned = getattr(net, "pinned", None)
    with pinned() if pinned is not None else contextlib.nullcontext():
        return _progressive(net, window, schedule, batch_size, cancel, full_maps)


def _progressive(net, window, schedule: Schedule, batch_size: int, cancel,
                 full_maps: bool = True) -> tuple[torch.Tensor, list[dict]]:
    device = _device_of(net)
    pixels = window if isinstance(window, WindowPixels) else WindowPixels(window, device)
    shape = pixels.shape
    scales = _scale_shapes(shape, schedule)
    crop = scales[0]
    whole = pixels.read([(0, 0, shape[0], shape[1])], _input_shape(crop, schedule))
    probabilities = resize_maps(net.segment(whole)[0], crop)
    stage0_uncertainty = uncertainty_map(probabilities)
    stages = [{"scale": crop, "query_map": stage0_uncertainty, "replaced": None, "patches": []}]
    for i, scale in enumerate(scales[1:]):
        if cancel is not None and cancel():
            from napari_uhrseg.errors import Cancelled

            raise Cancelled("MagNet was cancelled")
        probabilities, record = refine_scale(net, pixels, probabilities, scale, schedule, crop, batch_size=batch_size,
                                             full_maps=full_maps,
                                             previous_uncertainty=stage0_uncertainty if i == 0 else None)
        stages.append(record)
    return resize_maps(probabilities, shape), stages


def _device_of(net) -> torch.device:
    module = getattr(net, "net", net)
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# Scripting and freezing the refinement module (BatchNorm folded into the convolutions, oneDNN kernels) halves
# its CPU time on model-input maps of 256² and more; below this many pixels the eager module is used (the
# one-off compilation, ~0.7 s, would not pay off).
JIT_MIN_PIXELS = 128 * 128


class InferenceNet:
    """What inference runs: the same weights as ``net``, set up for speed. The backbone copy has its trunk's
    BatchNorms folded into the convolutions (``nn.fuse``); on the CPU it runs channels-last and the refinement
    module is scripted and frozen (``torch.jit.optimize_for_inference``: BatchNorm folded, oneDNN convolutions);
    elsewhere an eager copy in eval mode. Copies are rebuilt whenever ``net``'s
    weights change (a network trained further in the same process), so predictions always follow them."""

    def __init__(self, net: MagNetNet):
        self.net = net
        self._key = None
        self._backbone = self._refiner = self._scripted = None
        self._pinned = False

    @contextlib.contextmanager
    def pinned(self):
        """Check the weights once for a whole window instead of at every call (the check walks every
        parameter: ~5 ms a call, a few % of a MagNet-Fast window)."""
        self._sync()
        self._pinned = True
        try:
            yield self
        finally:
            self._pinned = False

    def _fingerprint(self):
        return tuple((t.data_ptr(), t._version) for t in (*self.net.parameters(), *self.net.buffers()))

    def _sync(self) -> None:
        key = self._fingerprint()
        if key == self._key:
            return
        import copy

        from napari_uhrseg.nn.fuse import fold_batchnorm

        self._backbone = copy.deepcopy(self.net.backbone).eval()
        fold_batchnorm(self._backbone)  # the trunk's conv → BatchNorm pairs: one pass less over every map
        self._refiner = copy.deepcopy(self.net.refiner).eval()
        if _device_of(self.net).type == "cpu":
            self._backbone = self._backbone.to(memory_format=torch.channels_last)
        self._scripted, self._key = None, key

    def _scripted_refiner(self):
        if self._scripted is None:
            import warnings

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._scripted = torch.jit.optimize_for_inference(torch.jit.script(self._refiner))
            except Exception:  # noqa: BLE001 - a build without TorchScript/oneDNN keeps the eager module
                self._scripted = self._refiner
        return self._scripted

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        if not self._pinned:
            self._sync()
        if images.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self._backbone(images), dim=1).contiguous()

    def refine(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        if not self._pinned:
            self._sync()
        if coarse.device.type == "cpu" and coarse.shape[-2] * coarse.shape[-1] >= JIT_MIN_PIXELS:
            return self._scripted_refiner()(coarse, fine)
        return self._refiner(coarse, fine)

    def parameters(self):
        return self.net.parameters()


# ------------------------------------------------------------------------------------------ the method


def build_net(num_classes: int, preset: str = "fast", *, pretrained: Any = True) -> MagNetNet:
    """A MagNet network for ``preset`` (``fast``: EfficientNet-Lite0 FPN; ``paper``: ResNet-50 FPN)."""
    if preset not in BACKBONE_PRESETS:
        raise ValueError(f"unknown MagNet preset {preset!r}; choose one of {sorted(BACKBONE_PRESETS)}")
    cfg = BACKBONE_PRESETS[preset]
    backbone = FPNSegmenter(cfg["backbone"], num_classes, cfg["fpn_channels"], pretrained=pretrained)
    return MagNetNet(backbone, num_classes)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` → float ``(3, H, W)`` in [0, 1] (the backbone normalises)."""
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float() / 255


def normalisation_of(net: MagNetNet) -> dict:
    """The input statistics the backbone applies (kept in checkpoints for the record)."""
    trunk = net.backbone.branch.backbone
    return {"mean": [float(v) for v in trunk.input_mean], "std": [float(v) for v in trunk.input_std]}


def _to_numpy_map(x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A 2-D map (any dtype) as float32 at ``size`` (area-averaged when shrinking)."""
    import cv2

    x = x.detach().cpu()
    a = x.numpy().astype(np.float32) if x.dtype == torch.bool else x.float().numpy()  # NumPy: bool→float 3× faster
    if a.shape == tuple(size):
        return a.astype(np.float32, copy=False)
    shrink = size[0] < a.shape[0] or size[1] < a.shape[1]
    return cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _parts_map(parts: list[dict], key: str, scale: tuple[int, int], map_shape: tuple[int, int]) -> np.ndarray:
    """The scale-sized map that is ``part[key]`` inside each pasted part and 0 elsewhere, at ``map_shape``
    (area-averaged), without making it at the scale: where the scale is a whole multiple of the map (every
    DeepGlobe stage), each part's own pixels are summed into the map's blocks (pixels an earlier part covers
    left out, so each counts once); otherwise through the scale-sized map."""
    import cv2

    (H, W), (h, w) = scale, map_shape
    if H % h or W % w:
        full = np.zeros(scale, np.float32)
        for part in parts:
            y0, x0, y1, x1 = part["box"]
            full[y0:y1, x0:x1] = part[key].detach().cpu().float().numpy()
        return _to_numpy_map(torch.from_numpy(full), map_shape)
    fy, fx = H // h, W // w
    out = np.zeros(map_shape, np.float32)
    for part in parts:
        y0, x0, y1, x1 = part["box"]
        values = part[key].detach().cpu().numpy()
        owned = part["owned"]
        by0, bx0, by1, bx1 = y0 // fy, x0 // fx, -(-y1 // fy), -(-x1 // fx)
        block = np.zeros(((by1 - by0) * fy, (bx1 - bx0) * fx), np.float32)
        inside = block[y0 - by0 * fy : y1 - by0 * fy, x0 - bx0 * fx : x1 - bx0 * fx]
        if owned is None:
            inside[...] = values
        else:
            np.copyto(inside, values, where=owned.detach().cpu().numpy())
        # OpenCV's area resize by a whole factor is the block mean, and ~10× faster than a reshaped sum
        out[by0:by1, bx0:bx1] += cv2.resize(block, (bx1 - bx0, by1 - by0), interpolation=cv2.INTER_AREA)
    return out


def _stage_maps(st: dict, map_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(query map, replaced-point density) of a stage record at ``map_shape`` and its replaced count."""
    if st.get("query_map") is not None or "parts" not in st:
        replaced = st.get("replaced")
        return (_to_numpy_map(st["query_map"], map_shape),
                None if replaced is None else _to_numpy_map(replaced, map_shape),
                0 if replaced is None else count_true(replaced))
    scale, parts = tuple(st["scale"]), st["parts"]
    n = 0
    for part in parts:
        mask = part["replaced"] if part["owned"] is None else part["replaced"] & part["owned"]
        n += count_true(mask)
    return _parts_map(parts, "query", scale, map_shape), _parts_map(parts, "replaced", scale, map_shape), n


def stage_artefacts(stages: list[dict], window_shape: tuple[int, int], map_shape: tuple[int, int]) -> list[dict]:
    """Stage records in window pixels: query maps and replaced-point density at ``map_shape`` (the coarsest
    scale, so a window's artefacts stay small), patch boxes scaled to the window."""
    out = []
    for i, st in enumerate(stages):
        fy, fx = window_shape[0] / st["scale"][0], window_shape[1] / st["scale"][1]
        query_map, replaced, n_replaced = _stage_maps(st, map_shape)
        out.append(
            {
                "stage": i,
                "scale": tuple(int(v) for v in st["scale"]),
                "query_map": np.clip(query_map, 0, 1),
                "replaced": replaced,
                "n_replaced": n_replaced,
                "patches": [
                    {
                        "box": (round(p["box"][0] * fy), round(p["box"][1] * fx),
                                round(p["box"][2] * fy), round(p["box"][3] * fx)),
                        "score": p["score"],
                        "selected": p["selected"],
                    }
                    for p in st["patches"]
                ],
            }
        )
    return out


def starter_checkpoint() -> Path:
    return Path(__file__).resolve().parent.parent / "starters" / "magnet_fast.pt"


@register_method("magnet")
class MagNet(Method):
    """MagNet: every patch of every scale refined (the paper's full method).

    ``predict(window)`` returns probabilities at the window size and artefacts
    ``{"uncertainty": (H, W) float32 in [0, 1] (1 − certainty of the final prediction, window pixels),
    "stages": [...]}`` (see ``stage_artefacts``).
    """

    fast_mode = False

    def __init__(
        self,
        net: MagNetNet,
        class_names: list[str],
        *,
        normalisation: dict | None = None,
        preset: str = "fast",
        schedule: str = "deepglobe",
        device: str = "cpu",
        batch_size: int = 4,
        input_ratio: float | None = None,
        window_size: int | None = None,
    ):
        self.net = net.to(device).eval()
        self.inference_net = InferenceNet(self.net)
        self.class_names = list(class_names)
        self.normalisation = normalisation or normalisation_of(self.net)
        self.preset = preset
        self.schedule = get_schedule(schedule, fast=self.fast_mode, preset=preset, input_ratio=input_ratio)
        if window_size:  # the window the checkpoint was trained for; the engine's default otherwise
            self.window_size = int(window_size)
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path=None, *, device: str = "cpu", schedule: str | None = None) -> "MagNet":
        """Load a MagNet checkpoint (MagNet and MagNet-Fast share weights; both read ``method == "magnet"``).
        ``path=None`` takes the starter checkpoint shipped for the sample scene."""
        path = Path(path) if path is not None else starter_checkpoint()
        state, meta = load_checkpoint(path, method="magnet", map_location=device)
        net = build_net(len(meta["class_names"]), meta["preset"], pretrained=False)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            from napari_uhrseg.errors import CheckpointError

            raise CheckpointError(
                f"Checkpoint {path.name} does not fit the MagNet {meta['preset']!r} network ({str(exc)[:200]}): "
                "train a new one with `uhrseg train --method magnet`."
            ) from None
        return cls(net, meta["class_names"], normalisation=meta["normalisation"], preset=meta["preset"],
                   schedule=schedule or meta.get("schedule", "deepglobe"), device=device,
                   input_ratio=meta.get("input_ratio"), window_size=meta.get("window"))

    def predict(self, window: np.ndarray, *, context: dict | None = None) -> Prediction:
        context = context or {}
        probabilities, stages = progressive_inference(
            self.inference_net, window, self.schedule, batch_size=self.batch_size, cancel=context.get("cancel"),
            full_maps=False,
        )
        probabilities = probabilities.cpu()
        with torch.inference_mode():
            uncertainty = uncertainty_map(probabilities).numpy()
        map_shape = tuple(stages[0]["scale"])
        artefacts = {
            "uncertainty": uncertainty,
            "stages": stage_artefacts(stages, tuple(window.shape[:2]), map_shape),
        }
        return Prediction(probabilities.numpy(), artefacts)

    def backbone_only(self, window: np.ndarray, input_side: int | None = None) -> np.ndarray:
        """The backbone alone (the paper's "Downsample" baseline): probabilities ``(C, H, W)`` of the window
        resized to the model input (or to ``input_side`` px on its long side, e.g. the size a reused GRNet
        G-branch was trained at)."""
        with torch.inference_mode():
            pixels = WindowPixels(window, _device_of(self.net))
            crop = _scale_shapes(pixels.shape, self.schedule)[0]
            size = _input_shape(crop, self.schedule)
            if input_side:
                f = input_side / max(pixels.shape)
                size = (max(1, round(pixels.shape[0] * f)), max(1, round(pixels.shape[1] * f)))
            whole = pixels.read([(0, 0, *pixels.shape)], size)
            p = self.inference_net.segment(whole)[0].cpu()
            return resize_maps(p, pixels.shape).numpy()


@register_method("magnet-fast")
class MagNetFast(MagNet):
    """MagNet-Fast: per scale only the most uncertain patches (3 on DeepGlobe) and 0.9 of their points."""

    fast_mode = True


# ------------------------------------------------------------------------------- whole-image uncertainty


class UncertaintyMap:
    """Assemble per-window 2-D maps (e.g. ``Prediction.artefacts["uncertainty"]``) into one coarse whole-image
    array, averaging where windows overlap.

    shape: level-0 (Y, X) of the image; downsample: level-0 pixels per map pixel (a coarse pyramid level,
    e.g. 8 or 16). ``add(box0, window_map)`` takes the window's level-0 box ``(y0, x0, y1, x1)``.
    """

    def __init__(self, shape: tuple[int, int], downsample: float):
        self.downsample = float(downsample)
        self.shape0 = (int(shape[0]), int(shape[1]))
        self.shape = (max(1, math.ceil(shape[0] / downsample)), max(1, math.ceil(shape[1] / downsample)))
        self._sum = np.zeros(self.shape, np.float32)
        self._count = np.zeros(self.shape, np.float32)

    def add(self, box0: tuple[int, int, int, int], window_map: np.ndarray) -> None:
        import cv2

        d = self.downsample
        y0, x0 = int(box0[0] // d), int(box0[1] // d)
        y1, x1 = min(self.shape[0], math.ceil(box0[2] / d)), min(self.shape[1], math.ceil(box0[3] / d))
        if y1 <= y0 or x1 <= x0:
            return
        small = cv2.resize(np.asarray(window_map, np.float32), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        self._sum[y0:y1, x0:x1] += small
        self._count[y0:y1, x0:x1] += 1

    def add_window(self, window_map: np.ndarray, read_box: tuple[int, int, int, int], level_downsample: float,
                   window_shape: tuple[int, int] | None = None) -> None:
        """Add a map the method made for the working-level ``read_box`` (the engine's ``WindowEvent.read_box``).

        ``window_shape``: the (possibly padded) window the method saw, when the map has another resolution
        (a stage's query map is at the coarsest scale); padding past ``read_box`` is cut off first."""
        from napari_uhrseg.io.coords import to_level0

        window_map = np.asarray(window_map)
        window_shape = window_shape or window_map.shape
        fy, fx = window_map.shape[0] / window_shape[0], window_map.shape[1] / window_shape[1]
        h, w = read_box[2] - read_box[0], read_box[3] - read_box[1]
        corners = np.asarray(to_level0(np.asarray(read_box, np.float64).reshape(2, 2), level_downsample))
        self.add(tuple(float(v) for v in corners.reshape(4)),
                 window_map[: max(1, round(h * fy)), : max(1, round(w * fx))])

    def add_event(self, event, level_downsample: float, key: str = "uncertainty") -> None:
        """Add ``event.artefacts[key]`` of an engine ``WindowEvent`` (no-op when the method made none)."""
        window_map = (event.artefacts or {}).get(key)
        if window_map is not None and np.ndim(window_map) == 2:
            self.add_window(window_map, event.read_box, level_downsample)

    @property
    def covered(self) -> np.ndarray:
        """Map pixels at least one window was added over (bool)."""
        return self._count > 0

    @property
    def array(self) -> np.ndarray:
        """The map so far; 0 where no window has been added."""
        return np.where(self._count > 0, self._sum / np.maximum(self._count, 1), 0).astype(np.float32)


# The whole-image map: at least 4× coarser than the working level (a stage query map is at the coarsest MagNet
# scale, a quarter of the window) and at most this many pixels on its long side.
MAX_MAP_SIDE = 4096


def coarse_downsample(shape0: tuple[int, int], level_downsample: float) -> float:
    """Level-0 pixels per pixel of the whole-image map of an image of level-0 ``shape0``."""
    return float(max(4.0 * level_downsample, max(shape0) / MAX_MAP_SIDE, 1.0))


class UncertaintyRecorder:
    """What ``uhrseg segment`` needs: feed every engine ``WindowEvent``, then write the map next to the labels.

    >>> rec = UncertaintyRecorder(pyramid.shape, pyramid.downsamples[level])   # doctest: +SKIP
    >>> for event in iter_segment(...): rec.add_event(event)                  # doctest: +SKIP
    >>> rec.save_next_to(labels_path)   # <stem>_uncertainty.tif, or None for methods without a map   # doctest: +SKIP
    """

    def __init__(self, shape0: tuple[int, int], level_downsample: float):
        self.level_downsample = float(level_downsample)
        self.map = UncertaintyMap(shape0, coarse_downsample(shape0, level_downsample))
        self.windows = 0

    def add_event(self, event) -> None:
        if np.ndim((event.artefacts or {}).get("uncertainty")) == 2:
            self.map.add_event(event, self.level_downsample)
            self.windows += 1

    def save_next_to(self, labels_path, pixel_size=None, pixel_unit=None) -> Path | None:
        return save_uncertainty(labels_path, self.map, pixel_size, pixel_unit) if self.windows else None


def uncertainty_path(labels_path: str | Path) -> Path:
    """Where ``uhrseg segment -o OUT`` puts the map: next to OUT, ``<stem>_uncertainty.tif``."""
    p = Path(labels_path)
    stem = p.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".png", ".geojson"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return p.with_name(f"{stem}_uncertainty.tif")


def save_uncertainty(labels_path: str | Path, umap: UncertaintyMap, pixel_size=None, pixel_unit=None) -> Path:
    """Write the assembled map (float32 in [0, 1]) next to the labels as a TIFF, atomically. The downsample
    (level-0 px per map px) and the level-0 pixel size are kept in the description."""
    import json

    import tifffile

    from napari_uhrseg.errors import ExportError
    from napari_uhrseg.io.atomic import atomic_path

    out = uncertainty_path(labels_path)
    meta = {"uncertainty": UNCERTAINTY_TAG, "downsample": umap.downsample, "shape0": list(umap.shape0),
            "pixel_size": None if pixel_size is None else [float(v) for v in np.ravel(pixel_size)],
            "pixel_unit": pixel_unit}
    if out.is_dir():  # a folder of the map's name is the user's: never replaced
        raise ExportError(f"{out} is a folder, so the uncertainty map of {Path(labels_path).name} was not written: "
                          "rename or move the folder and segment again.")
    with atomic_path(out) as tmp:  # disk full, no permission: ExportError with what to do, nothing half-written
        tifffile.imwrite(tmp, umap.array, description=json.dumps(meta), compression="zlib")
    return out


UNCERTAINTY_TAG = "MagNet 1 - (p_top1 - p_top2)"


def read_uncertainty(path: str | Path) -> tuple[np.ndarray, dict] | None:
    """``(map, meta)`` of a TIFF written by ``save_uncertainty``, or None for any other file (the reader asks)."""
    import json

    import tifffile

    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
        return None
    try:
        with tifffile.TiffFile(p) as tif:
            meta = json.loads(tif.pages[0].description or "{}")
            if not isinstance(meta, dict) or meta.get("uncertainty") != UNCERTAINTY_TAG:
                return None
            umap = tif.asarray().astype(np.float32, copy=False)
    except Exception:  # noqa: BLE001 - damaged TIFFs raise anything (IndexError on an empty page list, ...)
        return None  # not a map we wrote: open_pyramid then reads it or says clearly what is wrong with it
    problem = _uncertainty_problem(umap, meta)
    if problem:
        from napari_uhrseg.errors import UnsupportedImageError

        raise UnsupportedImageError(
            f"{p.name} is a MagNet uncertainty map, but {problem}: it was edited or damaged. Segment the image "
            "again with `uhrseg segment --method magnet ... -o OUT` to write a new one."
        )
    return umap, meta


def _uncertainty_problem(umap: np.ndarray, meta: dict) -> str | None:
    """What is wrong with a tagged map's array or metadata (None: nothing) — before a layer gets a zero,
    negative or NaN scale from it."""
    def positive(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    if umap.ndim != 2 or 0 in umap.shape:
        return f"its map has shape {umap.shape} instead of (rows, columns)"
    if not positive(meta.get("downsample")):
        return f"its downsample is {meta.get('downsample')!r} instead of a positive number"
    size = meta.get("pixel_size")
    if size is not None and not (isinstance(size, list) and 1 <= len(size) <= 2 and all(map(positive, size))):
        return f"its pixel size is {size!r} instead of positive numbers"
    return None


def uncertainty_geometry(meta: dict) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) that put a saved map on its image opened by the plugin's reader (whose scale is the
    level-0 pixel size, or 1): map pixel (r, c) covers level-0 pixels [r·d, (r + 1)·d), so its centre sits at
    level-0 pixel centre r·d + (d − 1)/2."""
    d = float(meta["downsample"])
    size = meta.get("pixel_size") or (1.0, 1.0)
    sy, sx = float(size[0]), float(size[-1])
    return (sy * d, sx * d), (sy * (d - 1) / 2, sx * (d - 1) / 2)


# ------------------------------------------------------------------------------------------------ training
def train_main(argv: list[str] | None = None, method: str = "magnet") -> int:
    """``uhrseg train --method magnet|magnet-fast``; the schedule and data pipeline are in ``magnet_train``."""
    from napari_uhrseg.methods.magnet_train import train_main as _train_main

    return _train_main(argv, method)
