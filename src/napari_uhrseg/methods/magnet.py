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

Coordinates: everything in this module is in *window pixels at the working level* (the window the engine
hands to ``predict``), rows then columns; boxes are ``(y0, x0, y1, x1)`` with exclusive ends. The engine
converts artefacts to level-0 pixels.
"""
from __future__ import annotations

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


def certainty(probabilities: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Top-1 minus top-2 class probability along ``dim`` (1 = sure, 0 = a tie)."""
    top2 = probabilities.topk(2, dim=dim).values
    return top2.select(dim, 0) - top2.select(dim, 1)


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
        out.append(cv2.medianBlur(q, kernel).astype(np.float32) / 255 + 1e-4 * m)
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
    w = torch.ones(y1 - y0, x1 - x0)
    if border > 0:
        if y0 > 0:
            w[:border] = 0
        if x0 > 0:
            w[:, :border] = 0
        if y1 < shape[0]:
            w[-border:] = 0
        if x1 < shape[1]:
            w[:, -border:] = 0
    return w


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)``; antialiased when shrinking (images and probabilities alike)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _scale_shapes(shape: tuple[int, int], schedule: Schedule) -> list[tuple[int, int]]:
    return [(max(1, round(shape[0] * f)), max(1, round(shape[1] * f))) for f in schedule.scale_fractions]


def _input_shape(crop: tuple[int, int], schedule: Schedule) -> tuple[int, int]:
    return max(1, round(crop[0] * schedule.input_ratio)), max(1, round(crop[1] * schedule.input_ratio))


def _select_patches(previous: torch.Tensor, boxes: list, n_patches: int) -> tuple[list[float], list[int]]:
    """Mean uncertainty 1 − certainty per patch, and the indices refined: all, or the ``n_patches`` MOST
    uncertain (the public code's ascending sort kept the least uncertain ones)."""
    uncertainty = 1 - certainty(previous[None])[0]
    scores = [float(uncertainty[y0:y1, x0:x1].mean()) for y0, x0, y1, x1 in boxes]
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep = order if n_patches < 0 else order[:n_patches]
    return scores, sorted(keep)


def refine_scale(
    net: MagNetNet,
    image: torch.Tensor,
    previous: torch.Tensor,
    schedule: Schedule,
    crop: tuple[int, int],
    *,
    batch_size: int = 4,
) -> tuple[torch.Tensor, dict]:
    """One stage of the progressive inference at one scale.

    image: ``(3, h, w)`` normalised window resized to this scale; previous: ``(C, h, w)`` probabilities of the
    previous scale upsampled to it. Returns the new ``(C, h, w)`` probabilities and the stage record (query
    map, replaced-point mask, patches; all in this scale's pixels).
    """
    shape = tuple(image.shape[-2:])
    model_input = _input_shape(crop, schedule)
    border = round(schedule.border_fraction * min(crop))
    boxes = patch_boxes(shape, crop)
    scores, keep = _select_patches(previous, boxes, schedule.n_patches)
    refined_sum = torch.zeros_like(previous)
    query_sum = torch.zeros(shape)
    weight = torch.zeros(shape)
    for start in range(0, len(keep), batch_size):
        chosen = [boxes[i] for i in keep[start : start + batch_size]]
        fine = net.segment(torch.stack([_resize(image[None, :, y0:y1, x0:x1], model_input)[0]
                                        for y0, x0, y1, x1 in chosen]))
        coarse = torch.stack([_resize(previous[None, :, y0:y1, x0:x1], model_input)[0] for y0, x0, y1, x1 in chosen])
        refined = torch.softmax(net.refine(coarse, fine), dim=1)
        query = query_score(refined, coarse, schedule.median_kernel)
        for j, (y0, x0, y1, x1) in enumerate(chosen):
            size = (y1 - y0, x1 - x0)
            w = paste_weight((y0, x0, y1, x1), shape, border)
            # Accumulate and average: overlapping patches must not overwrite each other.
            refined_sum[:, y0:y1, x0:x1] += _resize(refined[j : j + 1], size)[0] * w
            query_sum[y0:y1, x0:x1] += _resize(query[j][None, None], size)[0, 0] * w
            weight[y0:y1, x0:x1] += w
    covered = weight > 0
    refined_avg = refined_sum / weight.clamp(min=1e-12)
    query_map = torch.where(covered, query_sum / weight.clamp(min=1e-12), torch.zeros(()))
    k = min(points_to_replace(schedule.n_points, shape[0] * shape[1], len(keep), len(boxes)), int(covered.sum()))
    replaced = torch.zeros(shape, dtype=torch.bool)
    if k > 0:
        replaced.view(-1)[query_map.view(-1).topk(k).indices] = True
    new = torch.where(replaced[None], refined_avg, previous)
    record = {
        "scale": shape,
        "query_map": query_map,
        "replaced": replaced,
        "patches": [{"box": b, "score": s, "selected": i in keep} for i, (b, s) in enumerate(zip(boxes, scores))],
    }
    return new, record


@torch.no_grad()
def progressive_inference(
    net: MagNetNet,
    image: torch.Tensor,
    schedule: Schedule,
    *,
    batch_size: int = 4,
    cancel: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """MagNet on one window: ``image`` ``(3, H, W)`` normalised → ``(C, H, W)`` probabilities and one record
    per stage (stage 0 = backbone alone at the coarsest scale; then one per finer scale)."""
    shape = tuple(image.shape[-2:])
    scales = _scale_shapes(shape, schedule)
    crop = scales[0]
    small = _resize(image[None], _input_shape(crop, schedule))
    probabilities = _resize(net.segment(small), crop)[0]
    stages = [{"scale": crop, "query_map": 1 - certainty(probabilities[None])[0], "replaced": None, "patches": []}]
    for scale in scales[1:]:
        if cancel is not None and cancel():
            from napari_uhrseg.errors import Cancelled

            raise Cancelled("MagNet was cancelled")
        previous = _resize(probabilities[None], scale)[0]
        scaled_image = _resize(image[None], scale)[0]
        probabilities, record = refine_scale(net, scaled_image, previous, schedule, crop, batch_size=batch_size)
        stages.append(record)
    return _resize(probabilities[None], shape)[0], stages


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
    return _resize(x.float()[None, None], size)[0, 0].numpy().astype(np.float32)


def stage_artefacts(stages: list[dict], window_shape: tuple[int, int], map_shape: tuple[int, int]) -> list[dict]:
    """Stage records in window pixels: query maps and replaced-point density at ``map_shape`` (the coarsest
    scale, so a window's artefacts stay small), patch boxes scaled to the window."""
    out = []
    for i, st in enumerate(stages):
        fy, fx = window_shape[0] / st["scale"][0], window_shape[1] / st["scale"][1]
        replaced = st["replaced"]
        out.append(
            {
                "stage": i,
                "scale": tuple(int(v) for v in st["scale"]),
                "query_map": np.clip(_to_numpy_map(st["query_map"], map_shape), 0, 1),
                "replaced": None if replaced is None else _to_numpy_map(replaced, map_shape),
                "n_replaced": 0 if replaced is None else int(replaced.sum()),
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
        image = to_tensor(window).to(self.device)
        probabilities, stages = progressive_inference(
            self.net, image, self.schedule, batch_size=self.batch_size, cancel=context.get("cancel")
        )
        probabilities = probabilities.cpu()
        uncertainty = (1 - certainty(probabilities[None])[0]).numpy().astype(np.float32)
        map_shape = tuple(stages[0]["scale"])
        artefacts = {
            "uncertainty": uncertainty,
            "stages": stage_artefacts(stages, tuple(window.shape[:2]), map_shape),
        }
        return Prediction(probabilities.numpy().astype(np.float32), artefacts)

    def backbone_only(self, window: np.ndarray) -> np.ndarray:
        """The backbone alone (the paper's "Downsample" baseline): probabilities ``(C, H, W)`` of the window
        resized to the model input."""
        image = to_tensor(window).to(self.device)
        crop = _scale_shapes(tuple(image.shape[-2:]), self.schedule)[0]
        with torch.no_grad():
            p = self.net.segment(_resize(image[None], _input_shape(crop, self.schedule)))
        return _resize(p, tuple(image.shape[-2:]))[0].cpu().numpy()


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
    import os

    import tifffile

    out = uncertainty_path(labels_path)
    meta = {"uncertainty": "MagNet 1 - (p_top1 - p_top2)", "downsample": umap.downsample,
            "pixel_size": pixel_size, "pixel_unit": pixel_unit}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(tmp, umap.array, description=json.dumps(meta), compression="zlib")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


# ------------------------------------------------------------------------------------------------ training
def train_main(argv: list[str] | None = None, method: str = "magnet") -> int:
    """``uhrseg train --method magnet|magnet-fast``; the schedule and data pipeline are in ``magnet_train``."""
    from napari_uhrseg.methods.magnet_train import train_main as _train_main

    return _train_main(argv, method)
