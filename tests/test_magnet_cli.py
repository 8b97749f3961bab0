"""``uhrseg segment --method magnet|magnet-fast`` writes MagNet's uncertainty map next to its output, and the
plugin's reader opens that map on the image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from _magnet_helpers import write_magnet_checkpoint
from napari_uhrseg.cli import main
from napari_uhrseg.methods import magnet as mg

SHAPE0 = (256, 384)
PIXEL = 0.5  # µm per level-0 pixel


def _write_scene(path):
    """A 2-level pyramidal OME-TIFF: smooth colour blobs (something for the network to be unsure about)."""
    y, x = np.mgrid[: SHAPE0[0], : SHAPE0[1]]
    rgb = np.stack([128 + 100 * np.sin(x / 23.0), 128 + 100 * np.cos(y / 17.0), (x + y) % 256], -1).astype(np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        md = {"axes": "YXS", "PhysicalSizeX": PIXEL, "PhysicalSizeY": PIXEL, "PhysicalSizeXUnit": "µm",
              "PhysicalSizeYUnit": "µm"}
        tw.write(rgb, subifds=1, tile=(128, 128), compression="zlib", metadata=md, photometric="rgb")
        tw.write(rgb[::2, ::2], subfiletype=1, tile=(128, 128), compression="zlib", photometric="rgb")
    return rgb


@pytest.fixture
def scene(tmp_path):
    image = tmp_path / "scene.ome.tif"
    rgb = _write_scene(image)
    return image, rgb, write_magnet_checkpoint(tmp_path / "magnet.pt")


def _summary(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_segment_writes_the_uncertainty_map_and_it_reopens_on_the_image(scene, tmp_path, capsys):
    import napari

    from napari_uhrseg._reader import read_pyramid

    image, rgb, ckpt = scene
    out = tmp_path / "scene_labels.ome.tif"
    code = main(["segment", str(image), "-o", str(out), "--method", "magnet-fast", "--checkpoint", str(ckpt),
                 "--level", "1", "--window", "128", "--overlap", "16", "--device", "cpu", "--quiet"])
    assert code == 0
    summary = _summary(capsys)
    path = tmp_path / "scene_labels_uncertainty.tif"
    assert summary["uncertainty"] == str(path) and path.is_file() and "uncertainty" in path.name
    with tifffile.TiffFile(path) as tif:
        saved = tif.asarray()
        meta = json.loads(tif.pages[0].description)
    # level 1 (downsample 2) → the map is 4× coarser: 8 level-0 px per map pixel
    assert meta["downsample"] == 8.0 and meta["pixel_size"] == [PIXEL, PIXEL] and meta["shape0"] == list(SHAPE0)
    assert saved.shape == (32, 48) and saved.dtype == np.float32
    assert 0 <= saved.min() and saved.max() <= 1 and saved.std() > 0

    # Independently of the recorder: map pixels inside the first window only (level-1 pixels 0..32) are the
    # 4 × 4 block means of that window's own uncertainty.
    method = mg.MagNetFast.from_checkpoint(ckpt)
    window = np.ascontiguousarray(rgb[::2, ::2][:128, :128])
    own = method.predict(window).artefacts["uncertainty"]
    blocks = own[:32, :32].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(saved[:8, :8], blocks, atol=1e-5)

    # Re-opened with the plugin's reader, the map lies on the image: a map pixel's centre is at the world
    # position of the centre of the 8 × 8 level-0 pixels it covers.
    (data, kwargs, kind), = read_pyramid(str(path))
    assert kind == "image" and "MagNet uncertainty" in kwargs["name"]
    assert kwargs["colormap"] == "inferno" and list(kwargs["contrast_limits"]) == [0.0, 1.0]
    umap = napari.layers.Image(data, **kwargs)
    (levels, ikwargs, _), = read_pyramid(str(image))
    img = napari.layers.Image(levels, **ikwargs)
    for r, c in [(0, 0), (7, 40), (31, 47)]:
        centre0 = (r * 8 + 3.5, c * 8 + 3.5)
        np.testing.assert_allclose(umap.data_to_world((r, c)), img.data_to_world(centre0), atol=1e-9)


def test_a_region_fills_only_its_part_of_the_map_and_other_methods_write_none(scene, tmp_path, capsys):
    image, _, ckpt = scene
    out = tmp_path / "part.zarr"
    region = (64, 96, 192, 224)  # level-0 pixels: one window of 128 px
    assert main(["segment", str(image), "-o", str(out), "--method", "magnet", "--checkpoint", str(ckpt),
                 "--region", ",".join(map(str, region)), "--window", "128", "--overlap", "16", "--device", "cpu",
                 "--quiet"]) == 0
    path = tmp_path / "part_uncertainty.tif"
    assert _summary(capsys)["uncertainty"] == str(path)
    saved = tifffile.imread(path)
    d = 4.0  # level 0 → 4× coarser map
    rows, cols = np.nonzero(saved > 0)
    assert rows.min() * d >= region[0] - d and (rows.max() + 1) * d <= region[2] + d
    assert cols.min() * d >= region[1] - d and (cols.max() + 1) * d <= region[3] + d
    inside = saved[int(region[0] / d) + 1 : int(region[2] / d) - 1, int(region[1] / d) + 1 : int(region[3] / d) - 1]
    assert (inside > 0).all()

    from _segment_helpers import write_channel_checkpoint

    other = write_channel_checkpoint(tmp_path / "channels.pt")
    assert main(["segment", str(image), "-o", str(tmp_path / "ch.ome.tif"), "--method", "test-channels",
                 "--checkpoint", str(other), "--window", "128", "--overlap", "16", "--device", "cpu", "--quiet"]) == 0
    assert "uncertainty" not in _summary(capsys)
    assert not (tmp_path / "ch_uncertainty.tif").exists()


@pytest.mark.parametrize("meta, shape, said", [
    ({}, (10, 12), "downsample is None"),
    ({"downsample": 0}, (10, 12), "downsample is 0"),
    ({"downsample": -4}, (10, 12), "downsample is -4"),
    ({"downsample": "x"}, (10, 12), "downsample is 'x'"),
    ({"downsample": 4, "pixel_size": "abc"}, (10, 12), "pixel size is 'abc'"),
    ({"downsample": 4, "pixel_size": [0, 0]}, (10, 12), "pixel size is [0, 0]"),
    ({"downsample": 4}, (3, 10, 12), "shape (3, 10, 12)"),
])
def test_an_edited_or_damaged_map_is_refused_with_a_message(tmp_path, meta, shape, said):
    """A map with our tag but metadata that would give the layer a zero, negative or NaN scale (or a map that
    is not 2-D) is refused by the reader with a message, not opened misplaced or crashing on a KeyError."""
    from napari_uhrseg._reader import read_pyramid
    from napari_uhrseg.errors import UnsupportedImageError
    from napari_uhrseg.methods.magnet import UNCERTAINTY_TAG

    path = tmp_path / "scene_uncertainty.tif"
    tifffile.imwrite(path, np.full(shape, 0.5, np.float32),
                     description=json.dumps({"uncertainty": UNCERTAINTY_TAG, **meta}))
    with pytest.raises(UnsupportedImageError, match="MagNet uncertainty map") as err:
        read_pyramid(str(path))
    assert said in str(err.value) and "uhrseg segment" in str(err.value)
    tifffile.imwrite(path, np.full((10, 12), 0.5, np.float32),
                     description=json.dumps({"uncertainty": UNCERTAINTY_TAG, "downsample": 4, "pixel_size": [0.5, 0.5]}))
    (data, kwargs, kind), = read_pyramid(str(path))
    assert kind == "image" and kwargs["scale"] == (2.0, 2.0) and data.shape == (10, 12)


@pytest.mark.parametrize("sidecar", ["scene_labels_uncertainty.tif", "scene_labels.patches.geojson"])
def test_a_folder_where_a_file_goes_beside_out_is_refused_before_the_run(scene, tmp_path, capsys, sidecar):
    """The map and the patch overlays are written beside OUT under names the user did not type: a folder of
    that name (with the user's files in it) is never replaced, even with --overwrite; the run stops first."""
    image, _, ckpt = scene
    folder = tmp_path / sidecar
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    out = tmp_path / "scene_labels.ome.tif"
    code = main(["segment", str(image), "-o", str(out), "--method", "magnet-fast", "--checkpoint", str(ckpt),
                 "--level", "1", "--window", "128", "--device", "cpu", "--quiet", "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{folder} is a folder" in err and "choose another OUT" in err
    assert (folder / "keep.txt").read_text() == "mine" and not out.exists()


def test_save_uncertainty_never_replaces_a_folder_and_reports_os_errors(tmp_path, monkeypatch):
    from napari_uhrseg.errors import ExportError

    umap = mg.UncertaintyMap((64, 64), 4)
    umap.add((0, 0, 64, 64), np.full((64, 64), 0.25, np.float32))
    (tmp_path / "a_uncertainty.tif").mkdir()
    with pytest.raises(ExportError, match="is a folder"):
        mg.save_uncertainty(tmp_path / "a.ome.tif", umap)
    assert (tmp_path / "a_uncertainty.tif").is_dir()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    with pytest.raises(ExportError, match="disk is full"):
        mg.save_uncertainty(tmp_path / "b.ome.tif", umap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_uncertainty.tif"]  # no temporary left behind
    monkeypatch.undo()
    path = mg.save_uncertainty(tmp_path / "b.ome.tif", umap)
    umap_back, meta = mg.read_uncertainty(path)
    assert umap_back.shape == (16, 16) and np.allclose(umap_back, 0.25) and meta["downsample"] == 4.0
