"""napari-uhrseg: annotate ultra-high-resolution images with GRNet/PPN, GLNet, MagNet, ISDNet and CascadePSP.

The compute core (``io``, ``nn``, ``methods``, ``engine``, ``metrics``, ``synthetic``) never imports Qt or
napari; the ``widgets`` package and the npe2 hooks translate between napari layers and core calls.
Imports are lazy so that ``import napari_uhrseg`` stays cheap (no torch, no Qt).
"""
from __future__ import annotations

__version__ = "0.1.0"

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
