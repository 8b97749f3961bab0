"""Presets as data: the paper's numbers and the fast CPU defaults, one dict per method and preset.

A preset fixes the architecture (what a checkpoint must match) and the defaults of inference and training;
command-line options override the latter. ``default_preset(device)`` picks ``fast`` on CPU.
"""
from __future__ import annotations

GRNET_PRESETS: dict[str, dict] = {
    # Wu et al. 2020, "Implementation Details": FPN-ResNet50 G-branch on the window resized to 512, FPN-ResNet18
    # R-branch, PPN = ResNet-18 without its last residual stage, 4 x 4 patches, p >= 0.5, Adam 1e-4, wd 5e-4,
    # focal gamma 3, 10 epochs of G-branch then alternating PPN / Mainbody epochs.
    "paper": {
        "global_backbone": "resnet50", "global_stages": 5,
        "refine_backbone": "resnet18", "refine_stages": 5,
        "ppn_backbone": "resnet18", "ppn_stages": 4,
        "global_size": 512, "refine_size": 512,
        "fpn_channels": 256, "aggregation_channels": 256, "aggregation_residual": False,
        "grid": 4, "selection": "threshold", "threshold": 0.5, "top_k": 4, "scorer": "ppn",
        "window": 2448, "lr": 1e-4, "weight_decay": 5e-4, "gamma": 3.0, "batch_size": 10,
        "global_share": 0.08,  # 10 of ~130 epochs train the G-branch alone
    },
    # CPU default: EfficientNet-Lite0 (ImageNet weights shipped) everywhere; R-branch and PPN use the trunk up to
    # stride 16 only (0.7 M parameters each instead of 3.0 M) so that a checkpoint stays under 10 MB in fp16 and
    # a 2448 px window runs in about a second on two cores. Narrower FPN / aggregation (64 channels).
    "fast": {
        "global_backbone": "efficientnet_lite0", "global_stages": 5,
        "refine_backbone": "efficientnet_lite0", "refine_stages": 4,
        "ppn_backbone": "efficientnet_lite0", "ppn_stages": 4,
        "global_size": 512, "refine_size": 384,
        "fpn_channels": 64, "aggregation_channels": 64,
        # The aggregation predicts a correction to the G-branch's logits (its last conv starts at zero), so a
        # refined patch starts as good as the global view and only changes where the R-branch learned better;
        # with the paper's plain aggregation, a CPU-budget training run refined DeepGlobe patches to *worse*
        # than the G-branch alone (26.9 vs 29.6 mIoU with all 16 patches refined; docs/methods/grnet.md).
        "aggregation_residual": True,
        # On the DeepGlobe benchmark the paper's p >= 0.5 refined half the patches (1.24 s a window, only 1.46x
        # faster than refining all 16) for no gain over the 4 most probable (30.72 vs 30.67 mIoU; 0.65 s, 2.8x):
        # top-4 is this preset's rule (docs/methods/grnet.md).
        # And the 4 patches are the G-branch's most doubtful (mean of 1 - top-1 + top-2 probability), not PPN's
        # choice: with the G-branch kept fixed while the rest trained, doubt's top-4 gained +2.23 mIoU over the
        # G-branch, PPN's top-4 +0.49, all 16 patches +2.32 (docs/benchmarks.md, 2026-12-03).
        "grid": 4, "selection": "topk", "threshold": 0.5, "top_k": 4, "scorer": "uncertainty",
        "window": 2448, "lr": 1e-4, "weight_decay": 5e-4, "gamma": 3.0, "batch_size": 2,
        "global_share": 0.3,
    },
}

#: Keys that define the network; a checkpoint stores them and they cannot be overridden at load time.
GRNET_ARCH_KEYS = ("global_backbone", "global_stages", "refine_backbone", "refine_stages", "ppn_backbone",
                   "ppn_stages", "global_size", "refine_size", "fpn_channels", "aggregation_channels",
                   "aggregation_residual")
#: Architecture keys added after checkpoints were made, with the value those older checkpoints mean.
_ARCH_KEYS_ADDED_LATER = {"aggregation_residual": False}


def checkpoint_architecture(meta: dict) -> dict:
    """The architecture a GRNet checkpoint was made with (keys it predates get the value they meant then)."""
    return {**_ARCH_KEYS_ADDED_LATER, **(meta or {}).get("architecture", {})}


def default_preset(device: str = "cpu") -> str:
    """``paper`` on a GPU, ``fast`` elsewhere."""
    return "paper" if str(device).startswith("cuda") else "fast"


def grnet_preset(name: str, **overrides) -> dict:
    """A copy of preset ``name`` with ``overrides`` (None values ignored)."""
    if name not in GRNET_PRESETS:
        raise ValueError(f"Unknown GRNet preset {name!r}; choose one of {', '.join(GRNET_PRESETS)}.")
    cfg = dict(GRNET_PRESETS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["preset"] = name
    return cfg
