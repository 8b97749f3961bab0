"""Brushed-region refinement (engine.refine) and `uhrseg refine`: only brushed pixels change; bad input."""
import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_uhrseg.engine.refine import refine_region
from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.methods.cascadepsp import CascadePSP, RefinementModule, save_refiner


class GrowDouble(torch.nn.Module):
    """Test double of the network: the refined mask is the input dilated by 4 px (a visible, known change)."""

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = F.max_pool2d(seg, 9, stride=1, padding=4) * 10
        return {k: out for k in ("s8_2", "s4_2", "s8_3", "s4_3", "full")}


@pytest.fixture
def scene():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)
    labels = np.zeros((300, 300), np.uint8)
    labels[100:200, 100:200] = 1
    brush = np.zeros((300, 300), np.uint8)
    brush[120:180, 190:215] = 1  # across the right edge of the square
    return image, labels, brush


def test_only_brushed_pixels_change(scene):
    image, labels, brush = scene
    keep = labels.copy()
    edit = refine_region(image, labels, brush, refiner=CascadePSP(GrowDouble()))
    assert np.array_equal(labels, keep)  # the input is never modified
    assert edit.box == (120, 190, 180, 215)
    out = labels.copy()
    edit.apply(out)
    changed = out != labels
    assert changed.any() and not changed[brush == 0].any()
    assert np.all(out[120:180, 200:204] == 1) and np.all(out[120:180, 205:215] == 0)  # grown by 4 px
    assert edit.changed == int(changed.sum())


def test_working_level_of_a_pyramid(scene):
    from napari_uhrseg.io.pyramid import open_pyramid

    image, labels, brush = scene
    big = cv2.resize(image, (1200, 1200), interpolation=cv2.INTER_NEAREST)
    pyr = open_pyramid(big)
    if len(pyr.levels) < 2:
        pytest.skip("open_pyramid builds no coarser level for this size")
    lab0 = cv2.resize(labels, (1200, 1200), interpolation=cv2.INTER_NEAREST)
    brush0 = cv2.resize(brush, (1200, 1200), interpolation=cv2.INTER_NEAREST)
    edit = refine_region(pyr, lab0, brush0, level=1, refiner=CascadePSP(GrowDouble()))
    out = lab0.copy()
    edit.apply(out)
    assert not (out != lab0)[brush0 == 0].any()
    ds = pyr.downsamples[1]
    grown = np.flatnonzero(out[600] == 1)  # grows by 4 working px = 4·ds level-0 px
    assert grown.max() + 1 == pytest.approx(800 + 4 * ds, abs=ds)


def test_grayscale_and_16bit_images_work(scene):
    image, labels, brush = scene
    gray16 = (image[..., 0].astype(np.uint16) * 200)
    edit = refine_region(gray16, labels, brush, refiner=CascadePSP(GrowDouble()))
    assert edit.changed > 0


@pytest.mark.parametrize(
    "make_region, message",
    [
        (lambda b: np.zeros_like(b), "Nothing is brushed"),
        (lambda b: np.ones((10, 10), np.uint8), "same size"),
        (lambda b: (400, 400, 500, 500), "outside the image"),
        (lambda b: np.pad(np.ones((1, 1), np.uint8), ((150, 149), (150, 149))), "pixel"),
    ],
    ids=["empty", "wrong-size", "outside", "one-pixel"],
)
def test_bad_regions_are_refused_with_a_message(scene, make_region, message):
    image, labels, brush = scene
    keep = labels.copy()
    with pytest.raises(UhrsegError, match=message):
        refine_region(image, labels, make_region(brush), refiner=CascadePSP(GrowDouble()))
    assert np.array_equal(labels, keep)


@pytest.mark.parametrize("shape", [(250, 300), (310, 290)], ids=["cropped", "another-image"])
def test_labels_of_another_size_than_the_image_are_refused(scene, shape):
    # Neither level 0 nor a pyramid level: their pixels cannot be placed on the image (they used to be
    # stretched onto it, and the refined labels written back misplaced).
    image, _, _ = scene
    labels = np.zeros(shape, np.uint8)
    labels[100:200, 100:200] = 1
    brush = np.zeros(shape, np.uint8)
    brush[120:180, 190:215] = 1
    keep = labels.copy()
    with pytest.raises(UhrsegError, match=f"labels are {shape[0]}×{shape[1]} px but .* is 300×300 px"):
        refine_region(image, labels, brush, refiner=CascadePSP(GrowDouble()))
    assert np.array_equal(labels, keep)


def test_labels_of_a_region_refine_as_the_same_pixels_of_whole_labels(scene):
    # A Segment run on a region makes labels of the region's size; placed in their frame (FramedLabels) they
    # refine exactly as the same pixels of whole-image labels do.
    from napari_uhrseg.engine.refine import FramedLabels

    image, labels, brush = scene
    full = refine_region(image, labels, brush, refiner=CascadePSP(GrowDouble()))
    expected = labels.copy()
    full.apply(expected)
    part, part_brush = labels[50:250, 60:260].copy(), brush[50:250, 60:260].copy()
    framed = FramedLabels(part, labels.shape, (50, 60))
    assert framed.shape == labels.shape and np.array_equal(framed[0:300, 0:300], labels)
    edit = refine_region(image, framed, FramedLabels(part_brush, labels.shape, (50, 60)),
                         refiner=CascadePSP(GrowDouble()))
    assert edit.box == full.box  # frame pixels
    local = framed.local(edit)
    assert local.box == (edit.box[0] - 50, edit.box[1] - 60, edit.box[2] - 50, edit.box[3] - 60)
    local.apply(part)
    assert np.array_equal(part, expected[50:250, 60:260]) and local.changed == full.changed > 0
    assert framed.local(dataclasses.replace(edit, box=(0, 0, 20, 20), before=edit.before[:20, :20],
                                            after=edit.after[:20, :20])) is None  # wholly outside the region
    with pytest.raises(UhrsegError, match="do not fit"):
        FramedLabels(part, labels.shape, (150, 60))


def test_labels_of_another_pyramid_of_the_image_are_accepted(scene):
    # A level of the file's pyramid may be a pixel off the one the refiner builds (rounded the other way): it is
    # still the image's frame, one downsample on both axes.
    image, labels, brush = scene
    half = cv2.resize(labels, (151, 149), interpolation=cv2.INTER_NEAREST)  # 300 / 2, rounded either way
    brush_half = cv2.resize(brush, (151, 149), interpolation=cv2.INTER_NEAREST)
    edit = refine_region(image, half, brush_half, refiner=CascadePSP(GrowDouble()))
    assert edit.changed > 0


@pytest.mark.parametrize("L", [0, 16, 10_000])
def test_a_global_step_size_out_of_range_is_refused(scene, L):
    image, labels, brush = scene
    with pytest.raises(UhrsegError, match=f"L = {L} px"):
        refine_region(image, labels, brush, L=L, refiner=CascadePSP(GrowDouble()))


def test_whole_slide_region_is_refused_and_empty_labels_too(scene):
    image, labels, brush = scene
    with pytest.raises(UhrsegError, match="coarser working level"):
        refine_region(image, labels, np.ones_like(brush), refiner=CascadePSP(GrowDouble()), max_side=256)
    with pytest.raises(UhrsegError, match="no labels"):
        refine_region(image, np.zeros_like(labels), brush, refiner=CascadePSP(GrowDouble()))


def test_cli_refine(tmp_path, scene, capsys):
    from napari_uhrseg.cli import main

    image, labels, brush = scene
    paths = {k: str(tmp_path / f"{k}.png") for k in ("image", "labels", "brush")}
    paths["out"] = str(tmp_path / "out.ome.tif")
    cv2.imwrite(paths["image"], image[..., ::-1])
    cv2.imwrite(paths["labels"], labels)
    cv2.imwrite(paths["brush"], brush)
    torch.manual_seed(0)
    ckpt = save_refiner(tmp_path / "r.pt", RefinementModule("fast", pretrained=False), "fast")
    rc = main(["refine", paths["image"], "--mask", paths["labels"], "-o", paths["out"], "--region", paths["brush"],
               "--fast", "--margin", "8", "--checkpoint", str(ckpt)])
    assert rc == 0
    from napari_uhrseg.io.labels import open_label_store

    out = np.asarray(open_label_store(paths["out"]).array)
    assert out.shape == labels.shape
    assert np.array_equal(out[brush == 0], labels[brush == 0])
    cv2.imwrite(paths["brush"], np.zeros_like(brush))
    rc = main(["refine", paths["image"], "--mask", paths["labels"], "-o", paths["out"], "--region", paths["brush"],
               "--checkpoint", str(ckpt)])
    assert rc == 2 and "Nothing is brushed" in capsys.readouterr().err
    cv2.imwrite(paths["brush"], brush)
    cv2.imwrite(str(tmp_path / "small.png"), labels[:250])  # labels of another size than the image
    rc = main(["refine", paths["image"], "--mask", str(tmp_path / "small.png"), "-o", str(tmp_path / "o2.ome.tif"),
               "--checkpoint", str(ckpt)])
    assert rc == 2 and "labels are 250×300 px" in capsys.readouterr().err and not (tmp_path / "o2.ome.tif").exists()
    for out, said in ((tmp_path / "nowhere" / "o.ome.tif", "nowhere does not exist"),
                      (tmp_path / "o.xyz", "Cannot tell the export format")):  # said before any refinement
        rc = main(["refine", paths["image"], "--mask", str(tmp_path / "missing.png"), "-o", str(out),
                   "--checkpoint", str(ckpt)])
        assert rc == 2 and said in capsys.readouterr().err and not out.exists()


def test_cli_refine_of_a_segmented_region_writes_it_where_it_lies(tmp_path, capsys):
    # `uhrseg segment --region ... -o OUT.zarr` then `uhrseg refine IMAGE --mask OUT.zarr`: the store is placed
    # in its level's frame (it used to be refused as labels "of another size"), and the export keeps the image's
    # coordinates and class names.
    import json

    import tifffile

    from napari_uhrseg.cli import main
    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import open_label_store

    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image)
    store_path = tmp_path / "reg.zarr"
    assert main(["segment", str(tmp_path / "img.tif"), "--region", "50,100,250,300", "-o", str(store_path),
                 "--quiet"]) == 0
    store = open_label_store(store_path)
    torch.manual_seed(0)
    ckpt = save_refiner(tmp_path / "r.pt", RefinementModule("fast", pretrained=False), "fast")
    capsys.readouterr()
    out = tmp_path / "refined.geojson"
    assert main(["refine", str(tmp_path / "img.tif"), "--mask", str(store_path), "-o", str(out), "--fast",
                 "--checkpoint", str(ckpt)]) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["properties"]["class_names"] == store.class_names
    back = rasterize(doc["features"], (300, 400), store.class_names)
    assert not back[:50].any() and not back[:, :100].any()  # nothing moved to the image's corner
    assert back[50:250, 100:300].any() and not back[250:].any() and not back[:, 300:].any()
