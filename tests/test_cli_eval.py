"""`uhrseg eval` on small label files whose figures are worked out by hand."""
import json

import numpy as np
import pytest
import skimage.io

from napari_uhrseg.cli import main
from napari_uhrseg.datasets import encode_deepglobe_mask, shared_data_dir


def _save(path, array):
    skimage.io.imsave(path, array, check_contrast=False)


def _run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def _halves():
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    pred = gt.copy()
    pred[:4, 4] = 0
    return pred, gt


def test_eval_index_pngs(tmp_path, capsys):
    pred, gt = _halves()
    _save(tmp_path / "pred.png", pred)
    _save(tmp_path / "gt.png", gt)
    code, out = _run(capsys, tmp_path / "pred.png", tmp_path / "gt.png")
    assert code == 0
    # cm = [[32, 0], [4, 28]]: IoU0 = 32 / 36, IoU1 = 28 / 32; band = columns 3-4 (16 px), 4 wrong -> mBA 0.75
    assert out["per_class_iou"] == pytest.approx([8 / 9, 7 / 8], abs=1e-6)
    assert out["miou"] == pytest.approx((8 / 9 + 7 / 8) / 2, abs=1e-6)
    assert out["mba"] == pytest.approx(0.75)
    assert out["num_classes"] == 2 and out["ignore_index"] is None
    code, out = _run(capsys, tmp_path / "pred.png", tmp_path / "gt.png", "--ignore", "0", "--num-classes", "3")
    # only gt == 1 pixels count: IoU1 = 28 / 32; class 0 ignored, class 2 absent (null)
    assert out["per_class_iou"][1] == pytest.approx(7 / 8) and out["per_class_iou"][2] is None
    assert out["miou"] == pytest.approx(7 / 8)


def test_eval_deepglobe_colour_masks(tmp_path, capsys):
    gt = np.zeros((4, 4), np.uint8)  # row 0 unknown
    gt[1:, :2] = 1  # urban
    gt[1:, 2:] = 5  # water
    pred = gt.copy()
    pred[0] = 2  # agriculture on the ignored row: not counted
    pred[1, 2] = 4  # one water pixel called forest
    _save(tmp_path / "a_mask.png", encode_deepglobe_mask(gt))
    _save(tmp_path / "a_pred.png", encode_deepglobe_mask(pred))
    code, out = _run(capsys, tmp_path / "a_pred.png", tmp_path / "a_mask.png", "--format", "deepglobe")
    assert code == 0
    # urban 6/6 = 1; water 5 / (6 + 5 - 5) = 5/6; forest 0 / 1 = 0 (predicted, never true); others absent
    iou = out["per_class_iou"]
    assert iou[1] == 1.0 and iou[5] == pytest.approx(5 / 6) and iou[4] == 0.0
    assert iou[0] is None and iou[2] is None and iou[3] is None and iou[6] is None
    assert out["miou"] == pytest.approx((1 + 5 / 6 + 0) / 3)
    # band (radius 1) without the void row: columns 1-2 of rows 1-3 + the rest of row 1 = 8 px, 1 wrong
    assert out["mba"] == pytest.approx(7 / 8)
    assert out["class_names"][5] == "water"


def test_eval_folders_pool_the_images(tmp_path, capsys):
    pred, gt = _halves()
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    _save(tmp_path / "p" / "one.png", pred)
    _save(tmp_path / "g" / "one_mask.png", gt)
    _save(tmp_path / "p" / "two.png", gt)
    _save(tmp_path / "g" / "two_mask.png", gt)
    code, out = _run(capsys, tmp_path / "p", tmp_path / "g")
    assert code == 0 and out["num_images"] == 2
    # pooled: cm = [[64, 0], [4, 60]] -> IoU0 = 64/68, IoU1 = 60/64; mBA = mean(0.75, 1.0)
    assert out["per_class_iou"] == pytest.approx([64 / 68, 60 / 64], abs=1e-6)
    assert out["mba"] == pytest.approx(0.875)


def test_eval_reads_tiff_and_zarr_labels(tmp_path, capsys):
    import tifffile
    import zarr

    pred, gt = _halves()
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    store = zarr.create_array(store=str(tmp_path / "gt.zarr"), shape=gt.shape, chunks=(4, 4), dtype=np.uint8)
    store[:] = gt
    code, out = _run(capsys, tmp_path / "pred.tif", tmp_path / "gt.zarr")
    assert code == 0 and out["mba"] == pytest.approx(0.75)


def test_eval_bad_input_is_a_clear_error(tmp_path, capsys):
    _save(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _save(tmp_path / "b.png", np.zeros((4, 5), np.uint8))
    code, err = _run(capsys, tmp_path / "a.png", tmp_path / "b.png")
    assert code == 2 and "a.png" in err and "b.png" in err
    code, err = _run(capsys, tmp_path / "a.png", tmp_path / "missing.png")
    assert code == 2 and "missing.png" in err
    (tmp_path / "junk.png").write_bytes(b"not a png")
    code, err = _run(capsys, tmp_path / "a.png", tmp_path / "junk.png")
    assert code == 2 and "junk.png" in err


@pytest.mark.parametrize("name, make, said", [
    ("nopages.tif", lambda p: p.write_bytes(b"II*\x00" + b"\x00" * 50), "damaged TIFF"),
    ("garbage.tif", lambda p: p.write_bytes(b"II*\x00" + b"\xff" * 64), "damaged TIFF"),
    ("truncated.tif", None, "is truncated"),
], ids=["no-pages", "garbage", "truncated"])
def test_damaged_label_tiffs_are_a_message_in_every_command(tmp_path, capsys, name, make, said):
    import tifffile

    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.arange(600 * 800, dtype=np.uint32).reshape(600, 800) % 5)
    bad = tmp_path / name
    if make is None:
        bad.write_bytes(good.read_bytes()[:300])
    else:
        make(bad)
    code, err = _run(capsys, good, bad)
    assert code == 2 and said in err and "Traceback" not in err
    _save(tmp_path / "img.png", np.zeros((600, 800, 3), np.uint8))
    for argv in (["refine", str(tmp_path / "img.png"), "--mask", str(bad), "-o", str(tmp_path / "r.ome.tif")],
                 ["export", str(bad), "-o", str(tmp_path / "e.ome.tif")]):
        assert main(argv) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "r.ome.tif").exists() and not (tmp_path / "e.ome.tif").exists()


@pytest.mark.skipif(shared_data_dir() is None or not (shared_data_dir() / "deepglobe").is_dir(),
                    reason="no ../shared/data")
def test_eval_a_real_deepglobe_mask_against_itself(capsys):
    mask = shared_data_dir() / "deepglobe" / "6399_mask.png"
    code, out = _run(capsys, mask, mask, "--format", "deepglobe")
    assert code == 0 and out["miou"] == 1.0 and out["mba"] == 1.0
    assert all(v == 1.0 for v in out["per_class_iou"][1:])  # 6399 holds every class
