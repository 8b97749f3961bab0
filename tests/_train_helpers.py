"""A small scribbled scene shared by the training tests (Train dock, heartbeat, scribble sessions)."""
from __future__ import annotations

import numpy as np

NAMES = ["unlabelled", "smooth", "striped", "dotted"]


def scribbled_scene(size: int = 256, seed: int = 3):
    """(RGB image, scribbles): a 3-class synthetic scene and every 12th row of its ground truth shifted to 1..3
    (0 = unlabelled)."""
    from napari_uhrseg.synthetic import SyntheticScene

    scene = SyntheticScene(size, seed=seed, num_classes=3, region_size=96)
    truth = scene.labels_window(0, 0, size, size)
    image = scene.image_window(0, 0, size, size, labels=truth)
    scribbles = np.zeros_like(truth)
    scribbles[::12] = truth[::12] + 1
    return image, scribbles
