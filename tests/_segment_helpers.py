"""Small deterministic "methods" for the engine, CLI, widget and demo tests.

They are honest stand-ins for a network: their output is a known function of the pixels they receive, so a
test can compute what the stitched result must be and check the engine's windowing, blending, coordinates
and bookkeeping against it.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from napari_uhrseg.methods.base import Method, Prediction, load_checkpoint, register_method, save_checkpoint

CLASS_NAMES = ["background", "red", "green", "blue"]


def channel_scene(shape=(300, 420), seed=0, block=24) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image whose dominant channel (by a wide margin) encodes a blocky class map in 1..3."""
    rng = np.random.default_rng(seed)
    h, w = shape
    coarse = rng.integers(1, 4, size=(-(-h // block), -(-w // block)))
    labels = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    image = rng.integers(30, 70, size=(h, w, 3)).astype(np.uint8)
    for k in (1, 2, 3):
        image[..., k - 1][labels == k] = rng.integers(180, 220, size=int((labels == k).sum()))
    return image, labels


def channel_probabilities(window: np.ndarray) -> np.ndarray:
    """Pointwise class probabilities: class 0 gets a constant low score, classes 1..3 follow R, G, B."""
    x = window.astype(np.float32) / 32.0
    scores = np.concatenate([np.full(x.shape[:2] + (1,), 0.5, np.float32), x], axis=-1)
    scores -= scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return np.moveaxis(e / e.sum(axis=-1, keepdims=True), -1, 0).astype(np.float32)


@register_method("test-channels")
class ChannelMethod(Method):
    """Labels each pixel by its dominant channel; reports a 2 x 2 grid of "patches" per window whose
    probability is the patch's mean red value / 255 (so a test can recompute it from the image at the
    patch's level-0 box) and selected when that is >= ``threshold``."""

    class_names = CLASS_NAMES

    def __init__(self, threshold: float = 0.3, grid: int = 2, device: str = "cpu", class_names=None):
        # Extra classes beyond the four (to match a dataset's class list) get probability 0.
        self.class_names = list(class_names or CLASS_NAMES)
        self.threshold = threshold
        self.grid = grid
        self.device = device
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def predict(self, window, *, context=None) -> Prediction:
        with self.lock:
            self.calls.append(window.shape[:2])
        h, w = window.shape[:2]
        patches = []
        ys = np.linspace(0, h, self.grid + 1).astype(int)
        xs = np.linspace(0, w, self.grid + 1).astype(int)
        for i in range(self.grid):
            for j in range(self.grid):
                p = float(window[ys[i]:ys[i + 1], xs[j]:xs[j + 1], 0].mean()) / 255.0
                patches.append({"box": (ys[i], xs[j], ys[i + 1], xs[j + 1]), "probability": p,
                                "selected": p >= self.threshold})
        probs = channel_probabilities(window)
        extra = len(self.class_names) - probs.shape[0]
        if extra > 0:
            probs = np.concatenate([probs, np.zeros((extra,) + probs.shape[1:], np.float32)])
        return Prediction(probs, {"patches": patches})

    @classmethod
    def from_checkpoint(cls, path, *, device="cpu") -> "ChannelMethod":
        _, meta = load_checkpoint(path, method=cls.name)
        return cls(threshold=float(meta.get("threshold", 0.3)), device=device, class_names=meta["class_names"])


def write_channel_checkpoint(path: str | os.PathLike, threshold: float = 0.3, class_names=None):
    """A real weights-only checkpoint for ``ChannelMethod`` (its only parameter lives in the metadata)."""
    import torch

    meta = {"method": "test-channels", "preset": "test", "class_names": list(class_names or CLASS_NAMES),
            "normalisation": {"mean": [0.0] * 3, "std": [1.0] * 3}, "threshold": threshold}
    return save_checkpoint(path, {"dummy": torch.zeros(1)}, meta)
