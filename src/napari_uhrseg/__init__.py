"""napari-uhrseg: annotate ultra-high-resolution images with GRNet/PPN, MagNet and CascadePSP (GLNet, ISDNet planned).

The compute core (``io``, ``nn``, ``methods``, ``engine``, ``metrics``, ``synthetic``) never imports Qt or
napari; the ``widgets`` package and the npe2 hooks translate between napari layers and core calls.
Imports are lazy so that ``import napari_uhrseg`` stays cheap (no torch, no Qt).
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# torch's OpenMP worker threads sleep when idle instead of spinning. Where the cores are shared (other jobs, the
# napari GUI thread), spinning threads made 2-thread inference ~3× slower than 1 thread (MagNet-Fast, 2448² window:
# 12.5 s against 4.8 s with this, docs/methods/magnet.md). Read by OpenMP when torch loads it, so it only applies
# when this package is imported first (the ``uhrseg`` command, the napari plugin); a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "open_pyramid": ("napari_uhrseg.io.pyramid", "open_pyramid"),
    "Pyramid": ("napari_uhrseg.io.pyramid", "Pyramid"),
    "export_labels": ("napari_uhrseg.io.export", "export_labels"),
    "create_label_store": ("napari_uhrseg.io.labels", "create_label_store"),
    "select_device": ("napari_uhrseg.device", "select_device"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'napari_uhrseg' has no attribute {name!r}")
