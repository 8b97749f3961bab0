"""Dataset readers on small generated files (always) and on ../shared/data (when present)."""
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile

from napari_uhrseg.datasets import (
    DEEPGLOBE_CLASSES,
    DEEPGLOBE_COLORS,
    DatasetError,
    ImageMaskFolder,
    RandomCropSampler,
    decode_deepglobe_mask,
    deepglobe_ids,
    deepglobe_split,
    encode_deepglobe_mask,
    load_deepglobe_tile,
    load_monuseg_tile,
    polygons_to_mask,
    read_aperio_xml,
    shared_data_dir,
)

DATA = shared_data_dir()
needs_deepglobe = pytest.mark.skipif(DATA is None or not (DATA / "deepglobe").is_dir(), reason="no ../shared/data")
needs_monuseg = pytest.mark.skipif(DATA is None or not (DATA / "monuseg").is_dir(), reason="no ../shared/data")


def _save(path, array):
    skimage.io.imsave(path, array, check_contrast=False)


# ------------------------------------------------------------------------------------------- shared_data_dir
def test_shared_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("UHRSEG_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("UHRSEG_DATA", str(tmp_path / "missing"))
    assert shared_data_dir() is None


def test_shared_data_dir_default_is_next_to_the_repo(monkeypatch):
    monkeypatch.delenv("UHRSEG_DATA", raising=False)
    repo = Path(__file__).resolve().parents[1]
    expected = repo.parent / "shared" / "data"
    assert shared_data_dir() == (expected if expected.is_dir() else None)


# ------------------------------------------------------------------------------------------- DeepGlobe
def test_deepglobe_decode_every_colour_and_off_colours():
    rgb = np.array([DEEPGLOBE_COLORS], np.uint8)  # one row: unknown, urban, ..., barren
    np.testing.assert_array_equal(decode_deepglobe_mask(rgb), [[0, 1, 2, 3, 4, 5, 6]])
    # thresholds at 128 per channel: (250, 5, 250) is rangeland, (20, 130, 30) forest; pure red is no class
    off = np.array([[[250, 5, 250], [20, 130, 30], [255, 0, 0], [127, 127, 127]]], np.uint8)
    np.testing.assert_array_equal(decode_deepglobe_mask(off), [[3, 4, 0, 0]])
    labels = np.arange(7, dtype=np.uint8).reshape(1, 7)
    np.testing.assert_array_equal(decode_deepglobe_mask(encode_deepglobe_mask(labels)), labels)
    assert DEEPGLOBE_CLASSES[0] == "unknown" and len(DEEPGLOBE_CLASSES) == 7


def _fake_deepglobe(folder: Path, stem: str, shape=(40, 56)) -> np.ndarray:
    labels = (np.arange(shape[0] * shape[1]).reshape(shape) // 37 % 7).astype(np.uint8)
    _save(folder / f"{stem}_mask.png", encode_deepglobe_mask(labels))
    _save(folder / f"{stem}_sat.jpg", np.full(shape + (3,), 90, np.uint8))
    return labels


def test_deepglobe_reader_on_generated_tiles(tmp_path):
    labels = _fake_deepglobe(tmp_path, "42")
    _fake_deepglobe(tmp_path, "7")
    (tmp_path / "99_sat.jpg").write_bytes((tmp_path / "42_sat.jpg").read_bytes())  # no mask: not a tile
    assert deepglobe_ids(tmp_path) == ["42", "7"]
    rgb, decoded = load_deepglobe_tile("42", root=tmp_path)
    assert rgb.shape == (40, 56, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(decoded, labels)
    _, again = load_deepglobe_tile(tmp_path / "42_mask.png")
    np.testing.assert_array_equal(again, labels)
    with pytest.raises(DatasetError, match="no such file"):
        load_deepglobe_tile("99", root=tmp_path)


def test_deepglobe_split_is_fixed_and_disjoint():
    split = deepglobe_split()
    assert len(split["train"]) == 6 and len(split["test"]) == 3
    assert not set(split["train"]) & set(split["test"])
    split["train"].clear()
    assert len(deepglobe_split()["train"]) == 6  # callers get a copy


@needs_deepglobe
def test_deepglobe_split_on_the_real_tiles_covers_every_class():
    ids = deepglobe_ids()
    split = deepglobe_split()
    assert sorted(split["train"] + split["test"]) == sorted(ids)
    for part in ("train", "test"):
        counts = np.zeros(7, np.int64)
        for tile in split[part]:
            _, labels = load_deepglobe_tile(tile)
            assert labels.shape == (2448, 2448)
            counts += np.bincount(labels.ravel(), minlength=7)
        fractions = counts / counts.sum()
        assert (fractions[1:] > 0.003).all(), (part, fractions)  # each real class >= 0.3 % of the pixels


# ------------------------------------------------------------------------------------------- Aperio / MoNuSeg
XML = """<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>
<Region Id="1"><Vertices><Vertex X="1.5" Y="1.5"/><Vertex X="5.5" Y="1.5"/><Vertex X="5.5" Y="5.5"/>
<Vertex X="1.5" Y="5.5"/></Vertices></Region>
<Region Id="2"><Vertices><Vertex X="10.5" Y="0.5"/><Vertex X="15" Y="0.5"/><Vertex X="10.5" Y="5"/></Vertices></Region>
<Region Id="3"><Vertices><Vertex X="4.5" Y="4.5"/><Vertex X="7.5" Y="4.5"/><Vertex X="7.5" Y="7.5"/>
<Vertex X="4.5" Y="7.5"/></Vertices></Region>
<Region Id="4"><Vertices><Vertex X="1" Y="1"/><Vertex X="2" Y="2"/></Vertices></Region>
</Regions></Annotation></Annotations>"""


def test_aperio_xml_polygons_to_masks(tmp_path):
    (tmp_path / "t.xml").write_text(XML)
    polygons = read_aperio_xml(tmp_path / "t.xml")
    assert len(polygons) == 3  # the 2-vertex region encloses nothing and is dropped
    np.testing.assert_array_equal(polygons[0][0], [1.5, 1.5])  # (x, y)
    mask = polygons_to_mask(polygons, (12, 20))
    # square 1: centres x, y in 2..5 -> 16 px, minus the corner pixel (5, 5) that square 3 overwrites
    assert (mask == 1).sum() == 16 - 1
    # triangle: x >= 11, y >= 1, x + y <= 15 -> 4 + 3 + 2 + 1 = 10 px
    assert (mask == 2).sum() == 10
    assert mask[1, 11] == 2 and mask[1, 14] == 2 and mask[4, 11] == 2 and mask[4, 12] == 0
    # square 3: centres x, y in 5..7 -> 9 px, drawn last
    assert (mask == 3).sum() == 9 and mask[5, 5] == 3
    binary = polygons_to_mask(polygons, (12, 20), instance=False)
    np.testing.assert_array_equal(binary, (mask > 0).astype(np.uint8))


def test_monuseg_tile_reader_on_generated_files(tmp_path):
    tifffile.imwrite(tmp_path / "slide.tif", np.full((12, 20, 3), 200, np.uint8))
    (tmp_path / "slide.xml").write_text(XML)
    rgb, mask = load_monuseg_tile(tmp_path / "slide.xml")
    assert rgb.shape == (12, 20, 3) and mask.max() == 3
    (tmp_path / "broken.xml").write_text("<Annotations><Region>")
    tifffile.imwrite(tmp_path / "broken.tif", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="broken.xml"):
        load_monuseg_tile(tmp_path / "broken.tif")


@needs_monuseg
def test_monuseg_real_tile():
    tif = sorted((DATA / "monuseg").glob("*.tif"))[0]
    rgb, instances = load_monuseg_tile(tif)
    assert rgb.shape == (1000, 1000, 3)
    count = len(np.unique(instances)) - 1
    assert 100 < count < 2000  # hundreds of hand-traced nuclei per tile
    foreground = (instances > 0).mean()
    assert 0.05 < foreground < 0.6


# ------------------------------------------------------------------------------------------- folders and crops
def test_image_mask_folder_pairs_both_layouts(tmp_path):
    a = np.zeros((10, 12), np.uint8)
    a[:, 6:] = 2
    _save(tmp_path / "a.png", np.full((10, 12, 3), 50, np.uint8))
    _save(tmp_path / "a_mask.png", a)
    (tmp_path / "masks").mkdir()
    _save(tmp_path / "b.tif", np.full((10, 12, 3), 60, np.uint8))
    _save(tmp_path / "masks" / "b.png", a + 1)
    _save(tmp_path / "c.png", np.zeros((10, 12, 3), np.uint8))  # no mask
    folder = ImageMaskFolder(tmp_path)
    assert folder.stems == ["a", "b"] and [p.name for p in folder.unpaired] == ["c.png"]
    rgb, mask = folder[1]
    assert rgb.shape == (10, 12, 3)
    np.testing.assert_array_equal(mask, a + 1)
    assert len(list(folder)) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no image/mask pairs"):
        ImageMaskFolder(empty)


def test_image_mask_folder_with_colour_masks(tmp_path):
    labels = np.array([[1, 5], [6, 0]], np.uint8)
    _save(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    _save(tmp_path / "x_mask.png", encode_deepglobe_mask(labels))
    with pytest.raises(DatasetError, match="colour decoder"):
        ImageMaskFolder(tmp_path)[0]
    np.testing.assert_array_equal(ImageMaskFolder(tmp_path, decode=decode_deepglobe_mask)[0][1], labels)


def test_random_crops_keep_image_and_mask_aligned():
    mask = (np.arange(50 * 70).reshape(50, 70) % 251).astype(np.uint8)
    image = np.stack([mask, mask // 2, mask // 3], axis=-1)
    sampler = RandomCropSampler([(image, mask)], 32, seed=1, length=20)
    crops = list(sampler)
    assert len(crops) == 20
    for img, msk in crops:
        assert img.shape == (32, 32, 3) and msk.shape == (32, 32)
        np.testing.assert_array_equal(img[..., 0], msk)  # same window, same flips
    again = list(RandomCropSampler([(image, mask)], 32, seed=1, length=20))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(crops, again))
    small = list(RandomCropSampler([(image[:20, :20], mask[:20, :20])], 32, length=1, flips=False))[0]
    assert small[1].shape == (32, 32) and small[1][20:].sum() == 0  # zero-padded past the edge
