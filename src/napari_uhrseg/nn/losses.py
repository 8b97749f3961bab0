"""Segmentation losses: focal loss (Lin et al. 2017c; GLNet, GRNet use gamma = 3) and online hard example
mining cross-entropy (MagNet: threshold 0.7, min_kept 1e5).

Both take logits (N, C, H, W) and integer targets (N, H, W); pixels equal to ``ignore_index`` count for
nothing. A batch with no valid pixel gives a zero loss that still has a graph (so ``backward`` works).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 3.0, ignore_index: int = -100,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class focal loss, mean over valid pixels: -(1 - p_t)^gamma * log p_t. gamma = 0 is cross-entropy."""
    target = target.long()
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), dim=1)
    safe = torch.where(valid, target, torch.zeros_like(target))
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1.0 - logp_t.exp()).clamp_min(0) ** gamma) * logp_t
    if weight is not None:
        loss = loss * weight.to(loss.device)[safe]
    return loss[valid].mean()


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = 0.7, min_kept: int = 100000,
                       ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy over the hard pixels only: those whose probability for the true class is below
    ``thresh``; when fewer than ``min_kept`` are that hard, the ``min_kept`` hardest valid pixels instead."""
    target = target.long()
    pixel_loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none").flatten()
    valid = (target != ignore_index).flatten()
    n_valid = int(valid.sum())
    if n_valid == 0:
        return logits.sum() * 0.0
    losses = pixel_loss[valid]
    prob_t = torch.exp(-losses.detach())
    hard = prob_t < thresh
    if int(hard.sum()) < min(min_kept, n_valid):
        k = min(min_kept, n_valid)
        return torch.topk(losses, k, sorted=False).values.mean()
    return losses[hard].mean()
