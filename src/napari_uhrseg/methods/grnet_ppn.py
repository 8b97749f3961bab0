"""GRNet with the Patch Proposal Network (Wu et al., AAAI 2020, ``seeds/000_ac57dd07d85fa2fc.txt``).

A window I (H x W working-level pixels) is cut into ``grid x grid`` non-overlapping patches P_i.

1. **G-branch** (FPN + backbone) segments I resized to ``global_size`` (512): global feature F^G and logits.
2. **PPN** sees the same resized I: its backbone map F^B is average-pooled over the whole map and over each
   patch, one fully connected layer gives G_score and P_score_i, and sigmoid(G_score - P_score_i) is the
   probability that patch i needs refining (trained to mean "the G-branch's mIoU on the patch is below its
   mIoU on the window"). A patch is selected when p >= 0.5 (the paper) or when it is among the top k.
3. **R-branch** (FPN + lighter backbone) runs on the selected full-resolution patches only (resized to
   ``refine_size``), each multiplied by a saliency map: a 3x3 conv of the magnified G-branch class
   probabilities of that patch (RSTN-style saliency transformation, Yu et al. 2018b).
4. **Fusion**: F^E (zeros, refined features in the selected patches) concatenated with F^G goes through the
   aggregation convs (3,3,A), (3,3,A), (1,1,Nc). As the paper says, unselected patches stay unchanged: there the
   output is the G-branch's. So the aggregation is evaluated on the selected patches only, at the R-branch's
   feature resolution (its 3x3 convs see zero padding at patch borders instead of the neighbouring patch).
   With ``aggregation_residual`` (the ``fast`` preset; not in the paper) the convs predict a correction that is
   added to the G-branch's logits of the patch, starting at zero: refining a patch then starts from the global
   view instead of from scratch, which is what a short training budget needs (see ``methods/presets.py``).

Classes: a checkpoint's ``class_names`` are the label values (index = value). With ``ignore_index = 0``
(scribbles, DeepGlobe's "unknown") the network predicts the K = len(class_names) - 1 real classes and
``predict`` returns channel 0 as zeros, so ``argmax`` gives label values directly. Without it, every value is a
class. Losses: focal (gamma 3) on G, R and aggregation outputs, L = L_G + L_R + L_A, evaluated at labelled
pixels (point-sampled, so sparse scribbles at full resolution are not lost by downsampling).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_uhrseg.errors import CheckpointError, UhrsegError
from napari_uhrseg.engine.train import confusion, labelled_points, miou, point_focal_loss, sample_logits
from napari_uhrseg.methods.base import (Method, Prediction, check_checkpoint_output, load_checkpoint, register_method,
                                       save_checkpoint)
from napari_uhrseg.methods.presets import GRNET_ARCH_KEYS, checkpoint_architecture, grnet_preset
from napari_uhrseg.nn.backbones import build_backbone
from napari_uhrseg.nn.fpn import FPN, merge_levels
from napari_uhrseg.nn.losses import focal_loss

IGNORE = -100  # target value of unlabelled pixels inside the network code
MODES = ("ppn", "global", "all")
# PPN training targets: "paper" = Eq. (1), the G-branch's per-patch vs whole-window mIoU; "gain" = where refining
# helps most (GRNetTrainer.gain_labels)
PPN_LABELS = ("paper", "gain")


# --------------------------------------------------------------------------------------------------- network
class SegmentationBranch(nn.Module):
    """Backbone + FPN (strides 4..32) merged at stride 4 + 3x3 conv -> feature; 1x1 conv -> class logits."""

    def __init__(self, backbone: str, stages: int, channels: int, num_classes: int, pretrained):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, num_stages=stages)
        self.fpn = FPN(self.backbone.out_channels[1:], channels)
        self.feature = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classify = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x01: torch.Tensor, saliency: torch.Tensor | None = None):
        """``x01``: (N, 3, h, w) in [0, 1]; returns (feature, logits), both at stride 4 of the input."""
        x = self.backbone.normalise(x01)
        if saliency is not None:
            x = x * saliency
        feats = self.backbone(x)[1:]
        feature = self.feature(merge_levels(self.fpn(feats)))
        return feature, self.classify(feature)


class PatchProposalNetwork(nn.Module):
    """PPN: per-patch probability sigmoid(G_score - P_score) that the patch is worth refining."""

    def __init__(self, backbone: str, stages: int, pretrained):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, num_stages=stages)
        self.fc = nn.Linear(self.backbone.out_channels[-1], 1)  # one FC scores the window and every patch

    def forward(self, x01: torch.Tensor, grid: int) -> torch.Tensor:
        """(N, 3, h, w) in [0, 1] -> logits (N, grid * grid), row-major patch order; sigmoid = probability."""
        fb = self.backbone(self.backbone.normalise(x01))[-1]
        g_score = self.fc(fb.mean(dim=(2, 3)))  # (N, 1)
        p_feat = F.adaptive_avg_pool2d(fb, grid).flatten(2).transpose(1, 2)  # (N, grid², C)
        p_score = self.fc(p_feat).squeeze(-1)  # (N, grid²)
        return g_score - p_score


class GRNet(nn.Module):
    """G-branch, PPN, R-branch with saliency, aggregation layer. ``cfg`` is a GRNet preset dict."""

    def __init__(self, cfg: dict, num_classes: int, pretrained=True):
        super().__init__()
        self.cfg = {k: cfg[k] for k in GRNET_ARCH_KEYS}
        self.num_classes = num_classes
        ch, agg = cfg["fpn_channels"], cfg["aggregation_channels"]
        self.global_branch = SegmentationBranch(cfg["global_backbone"], cfg["global_stages"], ch, num_classes, pretrained)
        self.ppn = PatchProposalNetwork(cfg["ppn_backbone"], cfg["ppn_stages"], pretrained)
        self.refine_branch = SegmentationBranch(cfg["refine_backbone"], cfg["refine_stages"], ch, num_classes, pretrained)
        self.saliency = nn.Conv2d(num_classes, 3, 3, padding=1)
        nn.init.zeros_(self.saliency.weight)  # 2 * sigmoid(0) = 1: the R-branch starts from the plain patch
        nn.init.zeros_(self.saliency.bias)
        self.aggregation = nn.Sequential(
            nn.Conv2d(2 * ch, agg, 3, padding=1, bias=False), nn.BatchNorm2d(agg), nn.ReLU(inplace=True),
            nn.Conv2d(agg, agg, 3, padding=1, bias=False), nn.BatchNorm2d(agg), nn.ReLU(inplace=True),
            nn.Conv2d(agg, num_classes, 1))
        if self.cfg["aggregation_residual"]:  # a correction of the G-branch's logits that starts at zero
            nn.init.zeros_(self.aggregation[-1].weight)
            nn.init.zeros_(self.aggregation[-1].bias)
        self.refine_calls = 0  # patches sent through the R-branch (tests check unselected ones are skipped)

    def forward_global(self, window01: torch.Tensor, size: int | None = None):
        """(N, 3, S, S) full-resolution windows in [0, 1] -> ((F^G, G logits) at size / 4, resized input);
        ``size`` defaults to ``global_size`` (training on smaller crops passes a proportionally smaller one)."""
        g = size or self.cfg["global_size"]
        x = F.interpolate(window01, size=(g, g), mode="bilinear", align_corners=False, antialias=True)
        return self.global_branch(x), x

    def refine(self, patches01: torch.Tensor, global_feat: torch.Tensor, global_logits: torch.Tensor):
        """Refine a batch of patches.

        patches01: (n, 3, r, r) full-resolution patches resized to refine_size; global_feat/global_logits: the
        matching crops of F^G and G logits (n, C, g, g). Returns (aggregated logits, R logits) at r / 4.
        """
        self.refine_calls += patches01.shape[0]
        r = patches01.shape[-1]
        prob = F.interpolate(global_logits.softmax(1), size=(r, r), mode="bilinear", align_corners=False)
        saliency = 2.0 * torch.sigmoid(self.saliency(prob))
        feat_r, logits_r = self.refine_branch(patches01, saliency)
        feat_g = F.interpolate(global_feat, size=feat_r.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.aggregation(torch.cat([feat_g, feat_r], 1))
        if self.cfg["aggregation_residual"]:
            fused = fused + F.interpolate(global_logits, size=fused.shape[-2:], mode="bilinear", align_corners=False)
        return fused, logits_r


def cell_slices(cell: int, i: int, grid: int) -> tuple[slice, slice]:
    """Row-major patch ``i`` of a ``grid x grid`` split of a square of side ``grid * cell``."""
    r, c = divmod(i, grid)
    return slice(r * cell, (r + 1) * cell), slice(c * cell, (c + 1) * cell)


def select_patches(prob: torch.Tensor, rule: str, threshold: float = 0.5, top_k: int = 4,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (grid²,) of the patches to refine: ``prob >= threshold`` ("threshold", the paper) or the
    ``top_k`` most probable ("topk"); patches outside the real window (``valid`` False) are never selected."""
    valid = torch.ones_like(prob, dtype=torch.bool) if valid is None else valid
    if rule == "threshold":
        return (prob >= threshold) & valid
    if rule == "topk":
        p = torch.where(valid, prob, torch.full_like(prob, -1.0))
        k = min(int(top_k), int(valid.sum()))
        mask = torch.zeros_like(valid)
        if k > 0:
            mask[torch.topk(p, k).indices] = True
        return mask
    raise ValueError(f"selection rule must be 'threshold' or 'topk', not {rule!r}")


SCORERS = ("ppn", "uncertainty")


def patch_uncertainty(logits_g: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-patch score without PPN (``scorer="uncertainty"``): the mean over each patch of one minus the
    G-branch's certainty (top-1 minus top-2 class probability), (grid²,) in [0, 1], row-major like the patches."""
    top2 = logits_g[0].float().softmax(0).topk(2, dim=0).values
    doubt = (1.0 - (top2[0] - top2[1]))[None, None]
    return F.adaptive_avg_pool2d(doubt, grid).flatten().cpu()


# --------------------------------------------------------------------------------------------------- the method
@dataclass
class GRNetSettings:
    """Inference settings (not architecture): patch grid, selection rule, mode, patch batch."""

    grid: int = 4
    selection: str = "threshold"
    threshold: float = 0.5
    top_k: int = 4
    mode: str = "ppn"
    patch_batch: int | None = None  # None: CPU_PATCH_BATCH on the CPU, GPU_PATCH_BATCH elsewhere
    scorer: str = "ppn"  # "uncertainty": rank patches by the G-branch's doubt instead of PPN (patch_uncertainty)

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, not {self.scorer!r}")
        if self.selection not in ("threshold", "topk"):
            raise ValueError(f"selection rule must be 'threshold' or 'topk', not {self.selection!r}")


# Patches refined per R-branch call. The batch sets a window's peak memory: with 16, a window whose PPN selects
# every patch needs ~0.5 GB more than one that selects four, so the peak RSS of a run crept up with the number
# of windows (the more windows, the likelier one picks them all; 20000² vs 5000²: 1.35x). With 4 the peak is
# reached by the first ordinary window, for ~15 % more time per window on 2 CPU cores (docs/benchmarks.md).
CPU_PATCH_BATCH = 4
GPU_PATCH_BATCH = 16


@register_method("grnet")
class GRNetMethod(Method):
    """GRNet/PPN behind the ``Method`` interface.

    ``predict(window)`` takes an RGB uint8 window (H, W, 3) at the working level (any size; it is padded to a
    square whose side is a multiple of ``grid``) and returns class probabilities (C, H, W) plus
    ``artefacts["patches"]``: ``{"box": (y0, x0, y1, x1) window px, "probability": p, "selected": bool}`` for
    every patch that overlaps the window. ``settings.mode``: "ppn" (GRNet), "global" (G-branch only) or
    "all" (every patch refined, the paper's EnhanceNet).
    """

    def __init__(self, model: GRNet, class_names: list[str], *, ignore_index: int | None = 0,
                 settings: GRNetSettings | None = None, device: str = "cpu", meta: dict | None = None):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.settings = settings or GRNetSettings()
        self.device = device
        self.meta = dict(meta or {})
        self.window_size = int(self.meta.get("window", 2448))

    # ---- loading --------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str = "cpu", class_names=None,
                        **settings) -> "GRNetMethod":
        state, meta = load_checkpoint(path, method="grnet", class_names=class_names)
        cfg = grnet_preset(meta["preset"], **checkpoint_architecture(meta))
        ignore = meta.get("ignore_index", 0)
        k = len(meta["class_names"]) - (1 if ignore == 0 else 0)
        model = GRNet(cfg, k, pretrained=False)
        state = {n: t.float() if t.is_floating_point() else t for n, t in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"Checkpoint {os.fspath(path)} does not match the GRNet '{meta['preset']}' "
                                  f"architecture ({str(exc)[:200]}): it was made by another version.") from None
        base = {k2: meta[k2] for k2 in ("grid", "selection", "threshold", "top_k", "scorer") if k2 in meta}
        base.update({k2: v for k2, v in settings.items() if v is not None})
        return cls(model, meta["class_names"], ignore_index=ignore, settings=GRNetSettings(**base),
                   device=device, meta=meta)

    # ---- inference ------------------------------------------------------------------------------------
    def predict(self, window: np.ndarray, *, context: dict | None = None) -> Prediction:
        window = np.asarray(window)
        if window.ndim != 3 or window.shape[2] != 3 or window.shape[0] < 1 or window.shape[1] < 1:
            raise ValueError(f"GRNet expects an RGB window (H, W, 3); got shape {window.shape}")
        mode = (context or {}).get("mode", self.settings.mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        # channel 0 = "unlabelled" is never predicted when the checkpoint ignores label 0
        lead = 1 if self.ignore_index == 0 else 0
        with torch.inference_mode():
            probs, patches = self._forward_window(window, mode, lead=lead)
        return Prediction(probs, {"patches": patches, "mode": mode})

    def _forward_window(self, window: np.ndarray, mode: str, lead: int = 0):
        """Probabilities (lead + K, H, W) float32 (numpy; the first ``lead`` channels zero) and patch records.

        The window is zero-padded to a square of side ``grid * cell``; the resizing happens on uint8 so that the
        full-resolution window is never converted to float (that alone cost more than the G-branch on CPU).
        """
        h, w = window.shape[:2]
        grid, m, dev = self.settings.grid, self.model, self.device
        side = -(-max(h, w) // grid) * grid
        cell = side // grid
        square = window if (h, w) == (side, side) else np.zeros((side, side, 3), np.uint8)
        if square is not window:
            square[:h, :w] = window
        x8 = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1)[None].to(dev)  # uint8 (1, 3, S, S)
        g = m.cfg["global_size"]
        x_g = _resize_u8(x8, g)
        feat_g, logits_g = m.global_branch(x_g)
        valid = torch.tensor([(r * cell < h) and (c * cell < w) for r in range(grid) for c in range(grid)])
        if mode == "ppn":
            if self.settings.scorer == "uncertainty":
                prob = patch_uncertainty(logits_g, grid)
            elif self.settings.scorer == "ppn":
                prob = torch.sigmoid(m.ppn(x_g, grid))[0].float().cpu()
            else:
                raise ValueError(f"scorer must be one of {SCORERS}, not {self.settings.scorer!r}")
            chosen = select_patches(prob, self.settings.selection, self.settings.threshold, self.settings.top_k, valid)
        else:
            prob = torch.full((grid * grid,), float("nan"))
            chosen = valid.clone() if mode == "all" else torch.zeros_like(valid)
        k = logits_g.shape[1]
        out = np.zeros((lead + k, h, w), np.float32)
        out_t = torch.from_numpy(out)
        # softmax at low resolution, then bilinear upsampling of probabilities (still sums to one), one class at
        # a time: a (K, S, S) temporary beside ``out`` was another 144 MB per 2448² window, and blocks that size
        # fragment the heap as a slide's windows come and go
        prob_g = logits_g.softmax(1)
        for c in range(k):
            up = F.interpolate(prob_g[:, c:c + 1], size=(side, side), mode="bilinear", align_corners=False)[0, 0]
            out_t[lead + c] = up[:h, :w].float().cpu()
        del up
        idx = [int(i) for i in torch.nonzero(chosen).flatten()]
        if idx:
            for i, lg in zip(idx, self._refine_cells(x8, feat_g, logits_g, idx, grid, cell)):
                ys, xs = cell_slices(cell, i, grid)
                ys, xs = slice(ys.start, min(ys.stop, h)), slice(xs.start, min(xs.stop, w))
                pr = F.interpolate(lg[None].softmax(1), size=(cell, cell), mode="bilinear", align_corners=False)[0]
                out_t[lead:, ys, xs] = pr[:, : ys.stop - ys.start, : xs.stop - xs.start].float().cpu()
        scorer = self.settings.scorer if mode == "ppn" else None  # what "probability" is: PPN's, or the doubt
        patches = [{"box": (r * cell, c * cell, min((r + 1) * cell, h), min((c + 1) * cell, w)),
                    "probability": float(prob[r * grid + c]), "selected": bool(chosen[r * grid + c]),
                    "scorer": scorer}
                   for r in range(grid) for c in range(grid) if valid[r * grid + c]]
        return out, patches

    def _refine_cells(self, x, feat_g, logits_g, idx, grid, cell):
        """Aggregated logits of the chosen cells, in batches of ``patch_batch``; a CUDA out-of-memory error
        halves the batch and retries (never below one patch)."""
        r = self.model.cfg["refine_size"]
        gcell = feat_g.shape[-1] // grid
        batch = self.settings.patch_batch or (CPU_PATCH_BATCH if x.device.type == "cpu" else GPU_PATCH_BATCH)
        results, start, batch = [], 0, max(1, int(batch))
        while start < len(idx):
            part = idx[start:start + batch]
            try:
                results.extend(self._refine_batch(x, feat_g, logits_g, part, grid, cell, gcell, r))
                start += len(part)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                torch.cuda.empty_cache()
        return results

    def _refine_batch(self, x8, feat_g, logits_g, part, grid, cell, gcell, r):
        patches, fg, lg = [], [], []
        for i in part:
            ys, xs = cell_slices(cell, i, grid)
            patches.append(x8[0, :, ys, xs])
            gy, gx = cell_slices(gcell, i, grid)
            fg.append(feat_g[0, :, gy, gx])
            lg.append(logits_g[0, :, gy, gx])
        agg, _ = self.model.refine(_resize_u8(torch.stack(patches), r), torch.stack(fg), torch.stack(lg))
        return list(agg)


def _resize_u8(x8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, s, s) -> float (N, 3, size, size) in [0, 1]; antialiased bilinear (area-like when shrinking).
    uint8 resizing is what CPUs do fastest; CUDA has no uint8 kernel, so there the float path is used."""
    if x8.shape[-1] == size:
        return x8.float() / 255
    if x8.device.type == "cpu":
        y = F.interpolate(x8.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        return y.float().contiguous() / 255
    return F.interpolate(x8.float() / 255, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# --------------------------------------------------------------------------------------------------- training
def checkpoint_meta(cfg: dict, class_names, class_colors, ignore_index, model: GRNet, settings: GRNetSettings,
                    **extra) -> dict:
    """The metadata every GRNet checkpoint carries (see methods.base.save_checkpoint)."""
    gb = model.global_branch.backbone
    return {
        "method": "grnet", "preset": cfg["preset"], "class_names": list(class_names),
        "class_colors": [list(c) for c in class_colors] if class_colors else None,
        "ignore_index": ignore_index,
        "normalisation": {"mean": list(gb.input_mean), "std": list(gb.input_std)},
        "backbone": {"global": cfg["global_backbone"], "refine": cfg["refine_backbone"], "ppn": cfg["ppn_backbone"]},
        "architecture": {k: cfg[k] for k in GRNET_ARCH_KEYS},
        "window": int(cfg["window"]), "grid": settings.grid, "selection": settings.selection,
        "threshold": settings.threshold, "top_k": settings.top_k, "scorer": settings.scorer, **extra,
    }


class GRNetTrainer:
    """The paper's schedule: G-branch alone for the first ``global_share`` of the steps; then rounds of
    ``round_steps`` PPN steps (G fixed, BCE against labels from the G-branch's per-patch vs whole-window mIoU)
    and ``round_steps`` Mainbody steps (PPN fixed; L = L_G + L_R + L_A, focal gamma 3). Adam, separate optimisers
    for the PPN and the Mainbody."""

    def __init__(self, model: GRNet, cfg: dict, data, val_windows, *, class_names, class_colors=None,
                 ignore_index=0, total_steps: int, batch_size: int, device: str = "cpu", round_steps: int = 25,
                 max_train_patches: int = 4, settings: GRNetSettings | None = None, half: bool = False, extra_meta=None,
                 ppn_labels: str = "paper"):
        if ppn_labels not in PPN_LABELS:
            raise UhrsegError(f"ppn_labels is one of {PPN_LABELS}, not {ppn_labels!r}")
        self.ppn_label_rule = ppn_labels
        self.model, self.cfg, self.data, self.val_windows = model.to(device), cfg, data, val_windows
        self.class_names, self.class_colors, self.ignore_index = class_names, class_colors, ignore_index
        self.total, self.batch, self.device = total_steps, batch_size, device
        self.global_steps = int(round(cfg["global_share"] * total_steps))
        self.round_steps, self.max_train_patches, self.half = round_steps, max_train_patches, half
        self.settings = settings or GRNetSettings(cfg["grid"], cfg["selection"], cfg["threshold"], cfg["top_k"],
                                                  scorer=cfg.get("scorer", "ppn"))
        self.extra_meta = dict(extra_meta or {})
        # Crops smaller than the window keep every scale of inference: the G-branch input shrinks in proportion
        # and the crop holds fewer patches of the same size (e.g. 1224 px crops of a 2448 px window: G input 256,
        # a 2 x 2 grid of 612 px patches) -- four times cheaper per step on a CPU.
        crop, window, grid = int(cfg.get("crop", cfg["window"])), int(cfg["window"]), self.settings.grid
        if (crop * grid) % window or (cfg["global_size"] * crop) % window:
            raise UhrsegError(f"training crop {crop} must split into whole patches of the {window} px window's "
                              f"{grid} x {grid} grid: use a crop of window x n / {grid} (e.g. {window // 2}).")
        self.train_grid = crop * grid // window
        self.train_global = cfg["global_size"] * crop // window
        main = [p for n, p in model.named_parameters() if not n.startswith("ppn.")]
        opt = dict(lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.opt_main = torch.optim.Adam(main, **opt)
        self.opt_ppn = torch.optim.Adam(model.ppn.parameters(), **opt)
        self.gamma = cfg["gamma"]

    # schedule
    def phase(self, step: int) -> str:
        if step < self.global_steps:
            return "global"
        return "ppn" if ((step - self.global_steps) // self.round_steps) % 2 == 0 else "main"

    def counts_for_best(self, step: int) -> bool:
        # before the alternation has run a Mainbody round the R-branch is untrained: keep the last weights instead
        return step > self.global_steps + self.round_steps or self.global_steps >= self.total

    def _batch(self):
        x, t = self.data.batch(self.batch)
        return x.to(self.device).float() / 255, t.to(self.device)

    def train_step(self, step: int) -> dict[str, float]:
        return getattr(self, f"_{self.phase(step)}_step")()

    def _global_step(self):
        x, t = self._batch()
        self.model.train()
        (_, logits_g), _ = self.model.forward_global(x, self.train_global)
        loss = point_focal_loss(logits_g, t, self.gamma)
        self._update(self.opt_main, loss)
        return {"L_G": float(loss.detach())}

    def ppn_labels(self, logits_g: torch.Tensor, targets: torch.Tensor, grid: int, min_points: int = 16):
        """Eq. (1): label 1 where the G-branch's mIoU on the patch is below its mIoU on the whole window.
        Returns (labels (N, grid²) float, mask of patches with at least ``min_points`` labelled pixels)."""
        k = logits_g.shape[1]
        labels = torch.zeros(targets.shape[0], grid * grid, device=targets.device)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for n, (lg, tg) in enumerate(zip(logits_g, targets)):
            ys, xs, cls = labelled_points(tg, 65536)
            if cls.numel() == 0:
                continue
            pred = sample_logits(lg, ys, xs, tg.shape).argmax(1)
            cell = tg.shape[-1] // grid
            idx = (ys // cell).clamp_max(grid - 1) * grid + (xs // cell).clamp_max(grid - 1)
            conf = torch.bincount(idx * k * k + cls * k + pred, minlength=grid * grid * k * k).view(-1, k, k)
            whole = miou(conf.sum(0))
            for i in range(grid * grid):
                if int(conf[i].sum()) >= min_points:
                    mask[n, i] = True
                    labels[n, i] = float(miou(conf[i]) < whole)
        return labels, mask

    def gain_labels(self, x: torch.Tensor, feat_g: torch.Tensor, logits_g: torch.Tensor, targets: torch.Tensor,
                    grid: int, min_points: int = 16, max_points: int = 4096):
        """The alternative to Eq. (1) (``ppn_labels="gain"``): label 1 for the patches where the current R-branch
        and aggregation help most -- among the quarter of a crop's patches whose refined prediction labels the
        most more of their labelled pixels correctly than the G-branch's, those where that gain is positive.
        Every patch of the crop is refined (no gradients) to measure it. Returns (labels, mask) as ``ppn_labels``."""
        m, side = self.model, x.shape[-1]
        cell, gcell, r = side // grid, feat_g.shape[-1] // grid, self.cfg["refine_size"]
        labels = torch.zeros(targets.shape[0], grid * grid, device=targets.device)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for n in range(x.shape[0]):
            cells = [cell_slices(cell, i, grid) for i in range(grid * grid)]
            gcells = [cell_slices(gcell, i, grid) for i in range(grid * grid)]
            p = F.interpolate(torch.stack([x[n, :, ys, xs] for ys, xs in cells]), size=(r, r), mode="bilinear",
                              align_corners=False, antialias=cell > r)
            agg, _ = m.refine(p, torch.stack([feat_g[n, :, gy, gx] for gy, gx in gcells]),
                              torch.stack([logits_g[n, :, gy, gx] for gy, gx in gcells]))
            gains = {}
            for i, ((ys, xs), (gy, gx)) in enumerate(zip(cells, gcells)):
                tg = targets[n, ys, xs]
                py, px, cls = labelled_points(tg, max_points)
                if cls.numel() < min_points:
                    continue
                refined = sample_logits(agg[i], py, px, tg.shape).argmax(1)
                alone = sample_logits(logits_g[n, :, gy, gx], py, px, tg.shape).argmax(1)
                gains[i] = float((refined == cls).float().mean() - (alone == cls).float().mean())
            mask[n, list(gains)] = True
            for i in sorted(gains, key=lambda i: -gains[i])[: max(1, len(gains) // 4)]:
                labels[n, i] = float(gains[i] > 0)
        return labels, mask

    def _ppn_step(self):
        x, t = self._batch()
        grid = self.train_grid
        self.model.eval()
        with torch.no_grad():
            (feat_g, logits_g), x_g = self.model.forward_global(x, self.train_global)
            if self.ppn_label_rule == "gain":
                labels, mask = self.gain_labels(x, feat_g, logits_g, t, grid)
        if self.ppn_label_rule == "paper":
            labels, mask = self.ppn_labels(logits_g, t, grid)
        self.model.ppn.train()
        logits = self.model.ppn(x_g, grid)
        if not bool(mask.any()):
            return {"L_PPN": 0.0}
        loss = F.binary_cross_entropy_with_logits(logits[mask], labels[mask])
        self._update(self.opt_ppn, loss)
        return {"L_PPN": float(loss.detach()), "ppn_positive": float(labels[mask].mean())}

    def _chosen_cells(self, prob: torch.Tensor) -> list[int]:
        """Patches the inference rule selects for training (the fixed PPN's probabilities, or the G-branch's doubt
        with ``scorer="uncertainty"``), highest first, at most ``max_train_patches``; at least the highest one so
        that the R-branch always learns."""
        sel = select_patches(prob, self.settings.selection, self.settings.threshold, self.settings.top_k)
        order = [int(i) for i in torch.argsort(prob, descending=True)]
        chosen = [i for i in order if sel[i]][: self.max_train_patches]
        return chosen or order[:1]

    def _main_step(self):
        x, t = self._batch()
        grid, m = self.train_grid, self.model
        doubt = self.settings.scorer == "uncertainty"
        if not doubt:
            m.eval()
            with torch.no_grad():
                x_g = F.interpolate(x, size=(self.train_global,) * 2, mode="bilinear", align_corners=False,
                                    antialias=True)
                prob = torch.sigmoid(m.ppn(x_g, grid))
        m.train()
        m.ppn.eval()
        (feat_g, logits_g), _ = m.forward_global(x, self.train_global)
        if doubt:  # the patches inference will refine: ranked by the G-branch's own doubt, as in predict
            prob = torch.stack([patch_uncertainty(logits_g[n : n + 1].detach(), grid) for n in range(x.shape[0])])
        loss_g = point_focal_loss(logits_g, t, self.gamma)
        side = x.shape[-1]
        cell, gcell, r = side // grid, feat_g.shape[-1] // grid, self.cfg["refine_size"]
        patches, fg, lg, tg = [], [], [], []
        for n in range(x.shape[0]):
            for i in self._chosen_cells(prob[n]):
                ys, xs = cell_slices(cell, i, grid)
                gy, gx = cell_slices(gcell, i, grid)
                patches.append(x[n, :, ys, xs])
                tg.append(t[n, ys, xs])
                fg.append(feat_g[n, :, gy, gx])
                lg.append(logits_g[n, :, gy, gx])
        p = F.interpolate(torch.stack(patches), size=(r, r), mode="bilinear", align_corners=False,
                          antialias=cell > r)
        agg, logits_r = m.refine(p, torch.stack(fg), torch.stack(lg))
        tg = torch.stack(tg)
        loss_r = point_focal_loss(logits_r, tg, self.gamma)
        loss_a = point_focal_loss(agg, tg, self.gamma)
        loss = loss_g + loss_r + loss_a
        self._update(self.opt_main, loss)
        return {"L": float(loss.detach()), "L_G": float(loss_g.detach()), "L_R": float(loss_r.detach()), "L_A": float(loss_a.detach()),
                "patches": float(len(patches)) / x.shape[0]}

    @staticmethod
    def _update(opt, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # validation and checkpoints
    def validate(self, step: int) -> float:
        if not self.val_windows:
            return float("nan")
        mode = "global" if step <= self.global_steps else "ppn"
        method = GRNetMethod(self.model, self.class_names, ignore_index=self.ignore_index, settings=self.settings,
                             device=self.device)
        k = self.model.num_classes
        conf = torch.zeros(k, k, dtype=torch.long)
        for img, tgt in self.val_windows:
            with torch.inference_mode():
                probs, _ = method._forward_window(img, mode)
            conf += confusion(torch.from_numpy(probs.argmax(0)), torch.from_numpy(tgt), k)
        self.model.train()
        return miou(conf)

    def save(self, path, *, step: int, best, training_state: bool):
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.half and not training_state:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        meta = checkpoint_meta(self.cfg, self.class_names, self.class_colors, self.ignore_index, self.model,
                               self.settings, step=step, best_val_miou=best, **self.extra_meta)
        if training_state:
            meta["training_state"] = {"step": step, "best": best, "opt_main": self.opt_main.state_dict(),
                                      "opt_ppn": self.opt_ppn.state_dict(), "total": self.total}
        return save_checkpoint(path, state, meta)

    def load_training_state(self, state: dict):
        self.opt_main.load_state_dict(state["opt_main"])
        self.opt_ppn.load_state_dict(state["opt_ppn"])
        return int(state["step"]), state.get("best")


def starter_checkpoint() -> Path:
    """The starter checkpoint shipped for the sample scene (see starters/README.md for how it was made)."""
    return Path(__file__).resolve().parent.parent / "starters" / "grnet_sample_fast.pt"


# --------------------------------------------------------------------------------------------------- CLI
def _parser():
    import argparse

    from napari_uhrseg.cli._argtypes import count as _count, positive

    p = argparse.ArgumentParser(prog="uhrseg train --method grnet",
                                description="Train GRNet/PPN (G-branch first, then PPN and Mainbody alternating).")
    data = p.add_argument_group("data (one of)")
    data.add_argument("--deepglobe", nargs="*", metavar="ID",
                      help="DeepGlobe tiles from the shared data (no ids: the project's train split)")
    data.add_argument("--images", help="folder of RGB images")
    data.add_argument("--masks", help="folder of label images <stem>.png (0 = unlabelled, 1..K = classes)")
    data.add_argument("--classes", help="comma-separated names of label values 1..K (with --images)")
    data.add_argument("--scene", choices=["sample"], help="the synthetic sample scene")
    data.add_argument("--scene-size", type=int, help="side of the synthetic scene (px; default: the sample's 3072)")
    data.add_argument("--scene-seed", type=int, help="seed of the synthetic scene (default: the sample's)")
    p.add_argument("--out", required=True, help="checkpoint to write (best); the resumable state goes to X.last.pt")
    p.add_argument("--preset", choices=["fast", "paper"], help="default: fast on CPU, paper on CUDA")
    p.add_argument("--iterations", type=_count(1), help="training steps (default 2000)")
    p.add_argument("--epochs", type=positive, help="instead of --iterations: passes over the training pixels")
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=_count(1))
    p.add_argument("--crop", type=int, help="training window side (px); default = --window")
    p.add_argument("--window", type=int, help="window side the model is made for (px; default 2448)")
    p.add_argument("--global-size", type=int, help="G-branch input side (default 512)")
    p.add_argument("--refine-size", type=int, help="R-branch input side")
    p.add_argument("--patches", type=int, choices=[4, 16, 64], default=None, help="patches per window (4x4 = 16)")
    p.add_argument("--aggregation", choices=["residual", "plain"], default=None,
                   help="plain: the paper's aggregation convs; residual: they correct the G-branch's logits (the "
                        "fast preset's default; plain learns faster where the global view sees little)")
    p.add_argument("--frozen-backbones", action="store_true",
                   help="keep the three ImageNet backbones fixed and cache their features: only the FPNs, heads, "
                        "PPN classifier and aggregation learn (the Train dock's mode; several times faster per "
                        "step; default --lr 3e-4)")
    p.add_argument("--init", metavar="CKPT",
                   help="start from the weights of a GRNet checkpoint (its preset, architecture, window and grid; "
                        "the same class names), with a fresh schedule and optimisers; not with --resume")
    p.add_argument("--freeze-global", action="store_true",
                   help="with --init: keep that checkpoint's whole G-branch fixed (weights and batch norms; no "
                        "G-branch steps) while PPN, R-branch and aggregation learn against it: refinement gains "
                        "without the G-branch overfitting small data (docs/methods/grnet.md)")
    p.add_argument("--crop-pool", type=_count(1), default=32,
                   help="with --frozen-backbones: augmented crops drawn once and reused (their features cached)")
    p.add_argument("--pool-refresh", type=_count(0), default=0,
                   help="with --frozen-backbones: replace one pool crop every N steps (0 = never)")
    p.add_argument("--selection", choices=["threshold", "topk"], help="selection rule stored as the default")
    p.add_argument("--scorer", choices=list(SCORERS),
                   help="what ranks the patches by default: ppn (the paper) or uncertainty (the G-branch's doubt; "
                        "the fast preset's default); PPN is trained either way")
    p.add_argument("--threshold", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--global-share", type=float, help="share of steps training the G-branch alone")
    p.add_argument("--round-steps", type=_count(1), default=25, help="steps per PPN / Mainbody round")
    p.add_argument("--val-share", type=float, default=0.15, help="bottom share of rows held out for validation")
    p.add_argument("--val-every", type=_count(1), default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="a .last.pt file written by an earlier run")
    p.add_argument("--half", action="store_true", help="store the best checkpoint in float16 (half the size)")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights")
    p.add_argument("--log-every", type=_count(1), default=10)
    return p


def load_training_data(args):
    """-> (items, class_names, class_colors, ignore_zero, source description)."""
    from napari_uhrseg.engine.train import LabelledImage

    given = [args.deepglobe is not None, bool(args.images), bool(args.scene)]
    if sum(given) != 1:
        raise UhrsegError("give exactly one data source: --deepglobe [IDS], --images DIR --masks DIR, or --scene sample")
    if args.deepglobe is not None:
        from napari_uhrseg.datasets import DEEPGLOBE_CLASSES, DEEPGLOBE_COLORS, deepglobe_split, load_deepglobe_tile

        ids = args.deepglobe or deepglobe_split()["train"]
        items = [LabelledImage(*load_deepglobe_tile(i), name=f"deepglobe {i}") for i in ids]
        return items, DEEPGLOBE_CLASSES, DEEPGLOBE_COLORS, True, f"deepglobe {','.join(ids)}"
    if args.scene:
        from napari_uhrseg.synthetic import SAMPLE_SCENE, SyntheticScene

        # rendered from its definition (the same pixels as sample_data/scene.ome.tif, exact ground truth)
        size = args.scene_size or SAMPLE_SCENE["size"]
        seed = SAMPLE_SCENE["seed"] if args.scene_seed is None else args.scene_seed
        scene = SyntheticScene(size, seed=seed, num_classes=SAMPLE_SCENE["num_classes"])
        lab = scene.labels_window(0, 0, *scene.shape)
        img = scene.image_window(0, 0, *scene.shape, labels=lab)
        return ([LabelledImage(img, lab, name="sample scene")], scene.class_names, scene.class_colors, False,
                f"synthetic scene size={size} seed={seed} classes={scene.num_classes}")
    if not args.masks:
        raise UhrsegError("--images needs --masks DIR (label images named like the images).")
    from napari_uhrseg.datasets import folder_pairs, read_mask, read_rgb

    items = [LabelledImage(read_rgb(image), read_mask(mask), name=image.name)
             for image, mask in folder_pairs(args.images, args.masks)]
    top = max(int(it.labels.max()) for it in items)
    names = ["unlabelled"] + (args.classes.split(",") if args.classes else [f"class {v}" for v in range(1, top + 1)])
    if len(names) - 1 < top:
        raise UhrsegError(f"the masks use label values up to {top} but --classes names {len(names) - 1}.")
    return items, names, None, True, f"{args.images} + {args.masks}"


def train_main(argv: list[str], method: str = "grnet") -> int:
    """``uhrseg train --method grnet ...``: train, print progress, write the best checkpoint; returns an exit code."""
    import math
    import signal

    from napari_uhrseg.device import select_device
    from napari_uhrseg.engine.train import RandomCrops, last_path, run_training, split_train_val, validation_windows
    from napari_uhrseg.methods.presets import default_preset

    args = _parser().parse_args(argv)
    try:
        check_checkpoint_output(args.out)  # before the training, not after it
        dev = select_device(args.device, threads=args.threads)
        torch.manual_seed(args.seed)
        resume_state, resume_meta, init_state, init_meta = None, None, None, None
        if args.resume and args.init:
            raise UhrsegError("give --init (new training from a checkpoint's weights) or --resume (go on with a run), "
                              "not both.")
        if args.resume:
            resume_state, resume_meta = load_checkpoint(args.resume, method=method)
            if "training_state" not in resume_meta:
                raise CheckpointError(f"{args.resume} holds no training state: resume from the .last.pt file.")
        if args.init:
            init_state, init_meta = load_checkpoint(args.init, method=method)
        # a resumed run keeps its G-branch fixed when it was started so
        freeze_global = bool(args.freeze_global or (resume_meta or {}).get("freeze_global"))
        if freeze_global and not (init_meta or resume_meta):
            raise UhrsegError("--freeze-global keeps the G-branch of a trained model fixed: give --init CKPT.")
        source_meta = resume_meta or init_meta
        preset = (source_meta or {}).get("preset") or args.preset or default_preset(dev.device)
        arch = checkpoint_architecture(source_meta) if source_meta else {}
        grid = int(math.isqrt(args.patches)) if args.patches else None
        if init_meta is not None:  # the checkpoint's window and grid unless asked otherwise
            args.window = args.window or init_meta.get("window")
            grid = grid or init_meta.get("grid")
        if freeze_global:
            args.global_share = 0.0
        # a resumed run keeps the architecture it was started with
        overrides = dict(global_size=args.global_size, refine_size=args.refine_size)
        if args.aggregation is not None:
            overrides["aggregation_residual"] = args.aggregation == "residual"
        overrides.update(arch)
        # a resumed run keeps its training mode too (frozen backbones or not)
        frozen = bool(args.frozen_backbones or (resume_meta or {}).get("frozen_backbone"))
        if frozen and args.lr is None:
            from napari_uhrseg.engine.scribbles import FROZEN_LR

            args.lr = FROZEN_LR
        cfg = grnet_preset(preset, lr=args.lr, batch_size=args.batch_size, window=args.window, grid=grid,
                           selection=args.selection, threshold=args.threshold, top_k=args.top_k,
                           scorer=args.scorer, global_share=args.global_share, **overrides)
        cfg["crop"] = args.crop or cfg["window"]
        items, names, colors, ignore_zero, source = load_training_data(args)
        train_items, val_items = split_train_val(items, args.val_share)
        data = RandomCrops(train_items, cfg["crop"], ignore_zero=ignore_zero, seed=args.seed)
        val = validation_windows(val_items, cfg["window"], ignore_zero=ignore_zero)
        k = len(names) - (1 if ignore_zero else 0)
        if args.iterations:
            total = args.iterations
        elif args.epochs:
            pixels = sum((it.rows[1] - it.rows[0]) * it.image.shape[1] for it in train_items)
            total = max(1, int(args.epochs * pixels / cfg["crop"] ** 2 / cfg["batch_size"]))
        else:
            total = 2000
        if init_meta is not None and list(init_meta["class_names"]) != list(names):
            raise CheckpointError(f"{args.init} was trained for the classes {init_meta['class_names']}, this data has "
                                  f"{names}: --init needs the same classes in the same order.")
        model = GRNet(cfg, k, pretrained=not args.no_pretrained and resume_state is None and init_state is None)
        if init_state is not None:
            try:
                model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in init_state.items()})
            except RuntimeError as exc:
                raise CheckpointError(
                    f"{args.init} does not fit a GRNet '{preset}' network ({str(exc)[:200]}).") from None
        install = None
        if frozen:
            from napari_uhrseg.engine.scribbles import frozen_grnet

            data, install = frozen_grnet(model, data, crop_pool=args.crop_pool, pool_refresh=args.pool_refresh,
                                         seed=args.seed)
        if freeze_global:
            from napari_uhrseg.engine.scribbles import freeze_backbones

            freeze_backbones(model.global_branch)
        cmd = "uhrseg train --method grnet " + " ".join(argv)
        trainer = GRNetTrainer(model, cfg, data, val, class_names=names, class_colors=colors,
                               ignore_index=0 if ignore_zero else None, total_steps=total,
                               batch_size=cfg["batch_size"], device=dev.device, round_steps=args.round_steps,
                               half=args.half, extra_meta={"trained_on": source, "command": cmd,
                                                           "frozen_backbone": frozen, "freeze_global": freeze_global,
                                                           "init": str(args.init) if args.init else
                                                           (resume_meta or {}).get("init")})
        start, best = 0, None
        if resume_state is not None:
            model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in resume_state.items()})
            start, best = trainer.load_training_state(resume_meta["training_state"])
            total = max(total, start)
        if install is not None:
            install(trainer)  # after a resumed run's weights are in: the cache checks the saliency's weights
        mode = (", frozen backbones (features cached)" if frozen else "") + (
            f", from {args.init}" if args.init else "") + (", G-branch fixed" if freeze_global else "")
        print(f"GRNet '{preset}' on {dev.describe()}: {source}; {len(val)} validation windows; "
              f"{total} steps (G-branch alone for {trainer.global_steps}), batch {cfg['batch_size']} of "
              f"{cfg['crop']} px{mode}", flush=True)
        stop = {"flag": False}
        old = signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("flag", True))
        try:
            for ev in run_training(trainer, total, args.out, val_every=args.val_every, start_step=start, best=best,
                                   stop=lambda: stop["flag"]):
                if ev.step % args.log_every == 0 or ev.val_miou is not None or ev.done:
                    loss = " ".join(f"{a}={b:.3f}" for a, b in ev.losses.items())
                    val_txt = f" val mIoU {ev.val_miou:.4f} (best {ev.best_miou})" if ev.val_miou is not None else ""
                    print(f"[{ev.step}/{ev.total}] {ev.phase:6s} {loss}{val_txt} {ev.seconds:.0f}s"
                          + (f" -> {ev.checkpoint}" if ev.checkpoint else ""), flush=True)
        finally:
            signal.signal(signal.SIGINT, old)
        print(f"best checkpoint: {args.out}; resumable state: {last_path(Path(args.out))}")
        return 0
    except UhrsegError as exc:  # on stderr, as every other command says what went wrong
        import sys

        print(f"uhrseg train: {exc}", file=sys.stderr)
        return 2
