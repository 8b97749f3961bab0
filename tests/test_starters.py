"""The shipped MagNet starter segments the part of the sample scene it never saw.

The starter trained on the top-left 2048² of the 3072² sample scene (``starters/README.md``); the scene is
generated from coordinates, so rows from 2612 on (the bottom 15 %, also GRNet's validation rows) are held out.
Figures of all starters on the three windows there: ``benchmarks/sample_starters.py`` and
``docs/methods/magnet.md``.
"""
from __future__ import annotations

import numpy as np
import pytest

from napari_uhrseg.methods import magnet as mg
from napari_uhrseg.metrics import ConfusionMatrix
from napari_uhrseg.synthetic import SAMPLE_SCENE, SyntheticScene

pytestmark = pytest.mark.skipif(not mg.starter_checkpoint().is_file(), reason="no MagNet starter installed")


@pytest.fixture(scope="module")
def held_out():
    scene = SyntheticScene(SAMPLE_SCENE["size"], seed=SAMPLE_SCENE["seed"], num_classes=SAMPLE_SCENE["num_classes"])
    y0, x0, h, w = 2612, 1024, SAMPLE_SCENE["size"] - 2612, 1024
    gt = scene.labels_window(y0, x0, h, w)
    return scene.image_window(y0, x0, h, w, labels=gt), gt


def _miou(labels: np.ndarray, gt: np.ndarray) -> float:
    cm = ConfusionMatrix(SAMPLE_SCENE["num_classes"])
    cm.update(labels, gt)
    return cm.miou()[0]


def test_magnet_starter_segments_held_out_sample_scene_and_its_map_points_at_its_errors(held_out):
    from napari_uhrseg.cli.segment import build_method

    rgb, gt = held_out
    magnet = build_method("magnet", None, "cpu")  # no --checkpoint: the starter
    assert isinstance(magnet, mg.MagNet) and magnet.class_names == ["background", "stripes", "checker", "speckle",
                                                                     "diagonal"]
    assert magnet.window_size == 1024
    pred = magnet.predict(rgb)
    labels = pred.probabilities.argmax(0)
    backbone = magnet.backbone_only(rgb).argmax(0)
    m_magnet, m_backbone = _miou(labels, gt), _miou(backbone, gt)
    assert m_magnet >= 0.70, m_magnet
    assert m_magnet >= m_backbone + 0.3, (m_magnet, m_backbone)  # the refiner carries the texture classes
    # The heat map (the artefact the Segment dock shows) concentrates the errors: far more than 10 % of them
    # lie in its 10 % most uncertain pixels.
    u = pred.artefacts["uncertainty"]
    assert u.shape == gt.shape and 0 <= u.min() and u.max() <= 1
    errors = labels != gt
    top = u >= np.quantile(u, 0.9)
    assert errors[top].sum() >= 0.2 * errors.sum(), errors[top].sum() / errors.sum()


def test_magnet_fast_runs_from_the_same_starter(held_out):
    from napari_uhrseg.cli.segment import build_method

    rgb, gt = held_out
    fast = build_method("magnet-fast", None, "cpu")
    assert isinstance(fast, mg.MagNetFast)
    pred = fast.predict(rgb)
    stages = pred.artefacts["stages"]
    assert [sum(p["selected"] for p in s["patches"]) for s in stages[1:]] == [min(3, len(s["patches"]))
                                                                            for s in stages[1:]]
    assert _miou(pred.probabilities.argmax(0), gt) > _miou(fast.backbone_only(rgb).argmax(0), gt)
