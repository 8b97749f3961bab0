"""Synthetic scenes: determinism, laziness, the texture property, files, the committed sample and `uhrseg synth`."""
import json
import time

import numpy as np
import pytest
import tifffile

from napari_uhrseg.synthetic import (
    CLASS_LIBRARY,
    MEAN_COLOR,
    SAMPLE_SCENE,
    SyntheticScene,
    _reduce_mean,
    sample_scene_paths,
)


@pytest.fixture(scope="module")
def scene_small():
    scene = SyntheticScene(1536, seed=0)
    return scene, scene.image.compute(), scene.labels.compute()


def test_same_pixels_whatever_the_tiling():
    a = SyntheticScene((300, 500), seed=5, tile=128)
    b = SyntheticScene((300, 500), seed=5, tile=1000)
    labels = a.labels.compute()
    np.testing.assert_array_equal(labels, b.labels.compute())
    np.testing.assert_array_equal(a.image.compute(), b.image.compute())
    np.testing.assert_array_equal(a.labels_window(133, 111, 50, 70), labels[133:183, 111:181])
    assert not np.array_equal(SyntheticScene((300, 500), seed=6).labels.compute(), labels)
    assert a.image.dtype == np.uint8 and a.image.shape == (300, 500, 3) and a.labels.shape == (300, 500)


def test_a_100k_scene_is_lazy():
    scene = SyntheticScene(100_000, seed=1)
    assert scene.image.shape == (100_000, 100_000, 3) and scene.image.npartitions == 98 * 98
    start = time.perf_counter()
    window = scene.image[61_000:61_100, 37_000:37_100].compute()  # one 1024² chunk, not 30 GB
    assert time.perf_counter() - start < 10
    np.testing.assert_array_equal(window, scene.image_window(61_000, 37_000, 100, 100))


def test_classes_and_metadata(scene_small):
    scene, _, labels = scene_small
    assert scene.class_names == ["background", "stripes", "checker", "speckle", "diagonal"]
    assert len(scene.class_colors) == 5 and len(set(scene.class_colors)) == 5
    fractions = np.bincount(labels.ravel(), minlength=5) / labels.size
    assert (fractions > 0.08).all(), fractions  # every class holds large regions
    meta = scene.metadata()
    assert meta["seed"] == 0 and meta["class_names"] == scene.class_names
    six = SyntheticScene(64, num_classes=6)
    assert six.class_names[-1] == CLASS_LIBRARY[5][0]


def _pure_blocks(labels, f):
    h, w = labels.shape[0] // f * f, labels.shape[1] // f * f
    blocks = labels[:h, :w].reshape(h // f, f, w // f, f)
    lo, hi = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
    return lo == hi, lo


def _block_mean(image, f):
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    return image[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3))


def test_classes_share_their_mean_colour_once_downsampled(scene_small):
    _, image, labels = scene_small
    for f in (4, 8):
        pure, cls = _pure_blocks(labels, f)
        means = _block_mean(image, f)
        per_class = np.array([means[pure & (cls == k)].mean(axis=0) for k in range(5)])
        # every class averages to the shared mean colour, within half a grey level per channel
        assert np.abs(per_class - np.array(MEAN_COLOR)).max() < 0.5, per_class
        # and a single downsampled block says nothing more: nearest class mean is right at chance level
        guess = np.argmin(((means[pure][:, None, :] - per_class[None]) ** 2).sum(-1), axis=1)
        assert (guess == cls[pure]).mean() < 0.35


def _lag_difference(lum, dy, dx):
    """|lum(y, x) - lum(y + dy, x + dx)|, zero where the partner pixel falls outside the image."""
    h, w = lum.shape
    out = np.zeros_like(lum)
    x0, x1 = max(0, -dx), w - max(0, dx)
    out[: h - dy, x0:x1] = np.abs(lum[: h - dy, x0:x1] - lum[dy:, x0 + dx : x1 + dx])
    return out


def _texture_features(image, f=8):
    """Mean absolute differences at lags (0,1), (1,0), (1,1), (1,-1), (0,2), (2,0) per f x f block (luminance)."""
    lum = image.astype(np.float64).mean(axis=2)
    lags = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0))
    return np.stack([_block_mean(_lag_difference(lum, dy, dx)[..., None], f)[..., 0] for dy, dx in lags], axis=-1)


def test_local_texture_separates_the_classes_at_full_resolution(scene_small):
    _, image, labels = scene_small
    feats = _texture_features(image)
    pure, cls = _pure_blocks(labels, 8)
    pure[-1, :] = pure[:, -1] = False  # lags run past the last block
    x, y = feats[pure], cls[pure]
    centroids = np.array([x[y == k].mean(axis=0) for k in range(5)])
    guess = np.argmin(((x[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (guess == y).mean() > 0.95


def _class_changes(labels):
    return int((labels[1:] != labels[:-1]).sum() + (labels[:, 1:] != labels[:, :-1]).sum())


def test_boundaries_are_ragged(scene_small):
    from scipy.ndimage import gaussian_filter

    labels = scene_small[2][:1024, :1024]
    # Smoothing each class mask (sigma 4 px) and re-taking the argmax keeps the regions but irons out wiggles
    # under ~10 px; ragged boundaries are then markedly longer than their smoothed outline (smooth ones: ~1.05x).
    smoothed = np.argmax([gaussian_filter((labels == k).astype(np.float32), 4) for k in range(5)], axis=0)
    assert _class_changes(labels) > 1.25 * _class_changes(smoothed)


def test_write_ome_tiff_pyramid_roundtrip(tmp_path):
    from napari_uhrseg.io.ome import read_class_metadata

    scene = SyntheticScene((600, 800), seed=2)
    paths = scene.write(tmp_path, tile=256)
    image, labels = scene.image.compute(), scene.labels.compute()
    with tifffile.TiffFile(paths["image"]) as tif:
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(600, 800, 3), (300, 400, 3), (150, 200, 3)]
        np.testing.assert_array_equal(levels[0].asarray(), image)
        np.testing.assert_array_equal(levels[1].asarray(), _reduce_mean(image))
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    with tifffile.TiffFile(paths["labels"]) as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), labels)
        np.testing.assert_array_equal(tif.series[0].levels[1].asarray(), labels[::2, ::2])
        info = read_class_metadata(tif.ome_metadata)
    assert info["class_names"] == scene.class_names and info["pixel_size"] == (0.5, 0.5)
    assert json.loads(paths["metadata"].read_text())["files"]["labels"] == paths["labels"].name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_ome_zarr_roundtrip(tmp_path):
    import zarr

    scene = SyntheticScene((300, 500), seed=4)
    paths = scene.write(tmp_path, format="zarr", tile=128)
    group = zarr.open_group(str(paths["image"]), mode="r")
    assert group.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "c"
    np.testing.assert_array_equal(np.moveaxis(group["0"][:], 0, -1), scene.image.compute())
    labels = zarr.open_group(str(paths["labels"]), mode="r")
    np.testing.assert_array_equal(labels["0"][:], scene.labels.compute())
    np.testing.assert_array_equal(labels["1"][:], scene.labels.compute()[::2, ::2])


def test_committed_sample_matches_its_command():
    paths = sample_scene_paths()
    assert paths["image"].parent.name == "sample_data"  # found in the repository, not regenerated
    total = sum(p.stat().st_size for p in paths["image"].parent.iterdir() if p.is_file())
    assert total <= 10 * 2**20
    scene = SyntheticScene(SAMPLE_SCENE["size"], seed=SAMPLE_SCENE["seed"], num_classes=SAMPLE_SCENE["num_classes"])
    with tifffile.TiffFile(paths["image"]) as tif:
        level0 = tif.series[0].levels[0]
        assert level0.shape == (3072, 3072, 3)
        window = tif.series[0].asarray(level=0)[1500:1700, 2000:2300]
    np.testing.assert_array_equal(window, scene.image_window(1500, 2000, 200, 300))
    with tifffile.TiffFile(paths["labels"]) as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(level=0)[1500:1700, 2000:2300],
                                      scene.labels_window(1500, 2000, 200, 300))


def test_sample_data_hook_returns_image_and_ground_truth():
    from napari_uhrseg._sample_data import sample_scene

    (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = sample_scene()
    assert image_type == "image" and labels_type == "labels"
    assert image_kwargs["multiscale"] and image_kwargs["rgb"] and image[0].shape == (3072, 3072, 3)
    assert labels_kwargs["name"] == f"{image_kwargs['name']} ground truth"
    assert labels.shape == (3072, 3072) and set(np.unique(labels)) == set(range(5))
    assert tuple(labels_kwargs["scale"]) == tuple(image_kwargs["scale"]) == (0.5, 0.5)


def test_cli_synth_writes_the_scene(tmp_path, capsys):
    from napari_uhrseg.cli import main

    assert main(["synth", "-o", str(tmp_path / "out"), "--size", "300", "400", "--seed", "2", "--tile", "128"]) == 0
    written = json.loads(capsys.readouterr().out)
    with tifffile.TiffFile(written["labels"]) as tif:
        labels = tif.series[0].asarray(level=0)
    np.testing.assert_array_equal(labels, SyntheticScene((300, 400), seed=2).labels.compute())
    assert main(["synth", "-o", str(tmp_path / "bad"), "--size", "300", "--classes", "9"]) == 2


@pytest.mark.slow
def test_writing_a_large_scene_keeps_memory_bounded(tmp_path):
    from napari_uhrseg.metrics import RssSampler

    scene = SyntheticScene(16384, seed=0)  # 805 MB of RGB, 268 MB of labels
    with RssSampler(interval=0.05) as probe:
        base = probe.peak_mb
        scene.write(tmp_path)
    assert probe.peak_mb - base < 300, probe.peak_mb - base
