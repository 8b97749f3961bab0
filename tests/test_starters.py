"""The shipped GRNet and MagNet starters segment the part of the sample scene they never saw.

The MagNet starter trained on the top-left 2048² of the 3072² sample scene, the GRNet starter on its top-left
2612² (``starters/README.md``); the scene is generated from coordinates, so rows from 2612 on (the bottom 15 %)
are held out for both.
Figures of all starters on the three windows there: ``benchmarks/sample_starters.py`` and
``docs/methods/magnet.md``.
"""
from __future__ import annotations

import numpy as np
import pytest

from napari_uhrseg.methods import magnet as mg
from napari_uhrseg.metrics import ConfusionMatrix
from napari_uhrseg.synthetic import SAMPLE_SCENE, SyntheticScene

needs_magnet = pytest.mark.skipif(not mg.starter_checkpoint().is_file(), reason="no MagNet starter installed")


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


@needs_magnet
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


@needs_magnet
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


def test_grnet_starter_segments_held_out_sample_scene_window_by_window(held_out):
    from napari_uhrseg.cli.segment import build_method, starter_checkpoint
    from napari_uhrseg.engine.segment import segment_image
    from napari_uhrseg.io.pyramid import open_pyramid

    if starter_checkpoint("grnet") is None:
        pytest.skip("no GRNet starter installed")
    rgb, gt = held_out
    grnet = build_method("grnet", None, "cpu")  # no --checkpoint: the starter
    assert grnet.class_names == ["background", "stripes", "checker", "speckle", "diagonal"]
    assert grnet.window_size == 512  # what `uhrseg segment`, the dock and the demo take from its metadata
    result = segment_image(open_pyramid(rgb, name="held out"), grnet, window=grnet.window_size, overlap=64)
    labels = np.asarray(result.store.array)
    assert labels.shape == gt.shape
    assert _miou(labels, gt) >= 0.85, _miou(labels, gt)
    patches = [o for o in result.overlays if o["kind"] == "ppn_patch"]  # the dock's PPN rectangles
    assert patches and 0 < sum(o["selected"] for o in patches) < len(patches)
