"""The demo's headless path (what `make demo` runs without a display), on a region of the sample scene."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _segment_helpers import write_channel_checkpoint

pytestmark = pytest.mark.gui

# The headless demo opens the 3072² sample scene with every dock, exports GeoJSON and takes a screenshot:
# 20-40 s on 2 cores, over the default-run budget, so it runs with `make test-all` (-m "not benchmark"). The
# MagNet starter's run on a 1024² region takes ~11 s and stays in the default run.
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_headless_demo_writes_labels_patches_metrics_and_screenshot(make_napari_viewer, tmp_path):
    from napari_uhrseg import demo
    from napari_uhrseg.engine.overlays import read_overlays
    from napari_uhrseg.io.labels import open_label_store
    from napari_uhrseg.metrics import evaluate
    from napari_uhrseg.synthetic import sample_scene_paths

    paths = sample_scene_paths()
    names = json.loads(paths["metadata"].read_text())["class_names"]
    ckpt = write_channel_checkpoint(tmp_path / "channels.pt", class_names=names)
    out = tmp_path / "demo_out"
    viewer = make_napari_viewer()
    code = demo.main(["--headless", "--out", str(out), "--method", "test-channels", "--checkpoint", str(ckpt),
                      "--region", "512,768,1024,1280", "--level", "1", "--window", "128"], viewer=viewer)
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["region_level0"] == [512, 768, 1024, 1280] and summary["windows_done"] == summary["windows"]
    assert summary["labels_shape"] == [256, 256]  # the region at level 1

    labels = np.asarray(open_label_store(out / "labels.ome.tif").array)
    assert labels.shape == (256, 256)
    np.testing.assert_array_equal(labels, np.asarray(viewer.layers["synthetic scene labels"].data))
    patches = read_overlays(out / "ppn_patches.geojson")
    assert len(patches) == summary["patches"] > 0
    assert all(512 - 256 <= p["box"][0] and p["box"][2] <= 1024 + 256 for p in patches)  # level-0, near the region
    geo = json.loads((out / "labels.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]

    # the metrics recompute from the written file and the ground truth (level-1 labels repeated 2 x 2)
    truth = np.asarray(open_label_store(paths["labels"], writable=False).array[512:1024, 768:1280])
    again = evaluate(np.kron(labels, np.ones((2, 2), labels.dtype)), truth, num_classes=len(names))
    assert summary["metrics"]["miou"] == pytest.approx(again["miou"], nan_ok=True)

    from skimage.io import imread

    shot = imread(out / "screenshot.png")
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot[..., :3].std() > 5


@pytest.mark.slow
def test_make_demo_headless_subprocess(tmp_path):
    """The real thing: `python -m napari_uhrseg.demo --headless` with the starter GRNet (slow, needs Xvfb)."""
    from napari_uhrseg.cli.segment import starter_checkpoint

    if starter_checkpoint("grnet") is None:
        pytest.skip("no GRNet starter checkpoint installed")
    env = dict(os.environ, QT_QPA_PLATFORM=os.environ.get("QT_QPA_PLATFORM", "xcb"))
    out = tmp_path / "demo_out"
    proc = subprocess.run([sys.executable, "-m", "napari_uhrseg.demo", "--headless", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["method"] == "grnet" and summary["metrics"]["miou"] > 0
    for name in ("labels.ome.tif", "labels.geojson", "ppn_patches.geojson", "screenshot.png"):
        assert (out / name).is_file()


def test_headless_demo_with_the_magnet_starter_writes_its_uncertainty_map(make_napari_viewer, tmp_path):
    """`--method magnet` with the shipped starter: the heat map the dock showed is written next to the labels."""
    from napari_uhrseg import demo
    from napari_uhrseg.methods.magnet import read_uncertainty, starter_checkpoint

    if not starter_checkpoint().is_file():
        pytest.skip("no MagNet starter installed")
    out = tmp_path / "demo_out"
    viewer = make_napari_viewer()
    code = demo.main(["--headless", "--out", str(out), "--method", "magnet", "--region", "2048,2048,3072,3072"],
                     viewer=viewer)
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"]["miou"] > 0.7  # held out: the starter trained on the top-left 2048²
    path = Path(summary["files"]["uncertainty"])
    assert path == out / "labels_uncertainty.tif"
    umap, meta = read_uncertainty(path)
    shown = viewer.layers["synthetic scene MagNet uncertainty"].data
    np.testing.assert_array_equal(umap, shown)
    assert meta["shape0"] == [3072, 3072] and umap.shape == (3072 // meta["downsample"],) * 2
    inside = umap[int(2048 / meta["downsample"]):, int(2048 / meta["downsample"]):]
    assert inside.max() > 0.5 and umap[: int(2048 / meta["downsample"])].max() == 0  # only the region has values
