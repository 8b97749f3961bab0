"""Segmentation methods, one module per paper, behind the small interface in ``base``.

A method module registers itself with ``@register_method("name")`` when imported; ``_load_all`` imports
the known modules so that ``get_method``/``available_methods`` see them.
"""
from __future__ import annotations

import importlib

from napari_uhrseg.methods.base import (
    Method,
    Prediction,
    available_methods,
    get_method,
    load_checkpoint,
    register_method,
    save_checkpoint,
)

# Method modules in the order they are offered to users.
METHOD_MODULES = ("grnet_ppn", "magnet", "cascadepsp")

__all__ = [
    "Method",
    "Prediction",
    "available_methods",
    "get_method",
    "load_checkpoint",
    "register_method",
    "save_checkpoint",
]


def _load_all() -> None:
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(f"napari_uhrseg.methods.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"napari_uhrseg.methods.{mod}":
                raise
