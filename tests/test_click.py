"""Click-to-segment (engine.click): seeds, snapping, painting, removing, level-0 clicks, bad clicks."""
import cv2
import numpy as np
import pytest
import torch

from napari_uhrseg.engine.click import click_segment, grow_region, most_stable, predicted_region, small_object
from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.methods.cascadepsp import CascadePSP


class EchoDouble(torch.nn.Module):
    """Test double of the network: returns the seed mask (isolates seeding, boxes and painting)."""

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = seg * 10
        return {k: out for k in ("s8_1", "s8_2", "s4_2", "s8_3", "s4_3", "full")}


def _disk_scene(size=400, centre=(180, 220), r=60):
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(200, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r
    image[disk] = np.clip(rng.normal((60, 90, 140), 12, (disk.sum(), 3)), 0, 255).astype(np.uint8)
    return image, disk


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_grown_seed_finds_the_object():
    image, disk = _disk_scene()
    seed = grow_region(image, (180, 220))
    assert _iou(seed, disk) > 0.85


def test_a_nucleus_sized_object_is_found_at_full_resolution():
    # a 9-px-radius dark blob among others on a noisy stained background, in a 1024² neighbourhood: on the
    # 256² view the fill used to run into its neighbours (MoNuSeg clicks: IoU 0.05)
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal((215, 160, 200), 10, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:1024, :1024]
    target = None
    for i, (cy, cx) in enumerate([(500, 500), (500, 530), (470, 515), (540, 480), (300, 700)]):
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= 81
        image[blob] = np.clip(rng.normal((90, 60, 140), 8, (blob.sum(), 3)), 0, 255).astype(np.uint8)
        target = blob if i == 0 else target
    seed = grow_region(image, (500, 500))
    assert _iou(seed, target) > 0.7
    assert small_object(image, (500, 500)) is not None
    # a click on the plain background finds no small object there (it is not closed within the crop)
    assert small_object(image, (100, 100)) is None


def test_most_stable_region_is_the_plateau_of_the_growth():
    def nested(*areas):
        out = []
        for a in areas:
            m = np.zeros(10_000, bool)
            m[:a] = True
            out.append(m.reshape(100, 100))
        return out

    regions = nested(5, 40, 300, 320, 330, 2000, 9000)
    best = most_stable(regions, max_fraction=0.7, min_fraction=0.002)
    assert best.sum() == 320  # 320 → 330 grows least; 9000 (90 %) is never a candidate
    assert most_stable(nested(3, 5, 9000), 0.7, 0.002).sum() == 5  # only specks: the last one below the cap
    assert most_stable(nested(8000, 9000), 0.7, 0.002) is None  # even the first leaks


def test_predicted_region_is_the_component_under_the_click():
    pred = np.zeros((50, 50), np.uint8)
    pred[5:15, 5:15] = 2
    pred[30:40, 30:40] = 2
    region = predicted_region(pred, (10, 10))
    assert region.sum() == 100 and region[10, 10] and not region[35, 35]
    assert predicted_region(pred, (20, 20)) is None


def test_click_paints_the_object_with_the_label_id_as_one_edit():
    image, disk = _disk_scene()
    labels = np.zeros(disk.shape, np.uint8)
    edit = click_segment(image, labels, (180.5, 220.5), label_id=3, refiner=CascadePSP(EchoDouble()))
    assert not labels.any()  # input untouched; the caller applies the edit
    out = labels.copy()
    edit.apply(out)
    assert _iou(out == 3, disk) > 0.85
    assert set(np.unique(out)) == {0, 3}


def test_shift_click_removes_only_that_label():
    image, disk = _disk_scene()
    labels = np.zeros(disk.shape, np.uint8)
    labels[disk] = 3
    labels[:20, :20] = 5
    edit = click_segment(image, labels, (180, 220), label_id=3, remove=True, refiner=CascadePSP(EchoDouble()))
    out = labels.copy()
    edit.apply(out)
    assert not (out == 3).any() and (out == 5).sum() == 400


class EraseDouble(torch.nn.Module):
    """Test double of a refiner that finds no object at all (every output says background)."""

    def forward(self, image, seg, inter_s8=None, inter_s4=None):
        out = torch.full_like(seg, -10.0)
        return {k: out for k in ("s8_1", "s8_2", "s4_2", "s8_3", "s4_3", "full")}


def test_a_seed_the_refiner_erases_is_painted_as_grown_and_the_dock_is_told():
    image, disk = _disk_scene()
    labels = np.zeros(disk.shape, np.uint8)
    edit = click_segment(image, labels, (180, 220), label_id=4, refiner=CascadePSP(EraseDouble()))
    out = labels.copy()
    edit.apply(out)
    assert _iou(out == 4, disk) > 0.8  # the grown seed itself
    assert "as it is" in edit.note
    snapped = click_segment(image, labels, (180, 220), label_id=4, refiner=CascadePSP(EchoDouble()))
    assert snapped.note == ""


def test_prediction_seeds_the_click():
    image, disk = _disk_scene()
    prediction = np.zeros(disk.shape, np.uint8)
    prediction[150:210, 190:250] = 1  # a square prediction: the echo refiner keeps it
    edit = click_segment(image, np.zeros_like(prediction), (180, 220), label_id=1, prediction=prediction,
                         refiner=CascadePSP(EchoDouble()))
    out = np.zeros_like(prediction)
    edit.apply(out)
    assert np.array_equal(out.astype(bool), prediction.astype(bool))


def test_a_prediction_running_out_of_the_neighbourhood_is_narrowed_to_the_clicked_object():
    """One predicted class over the whole image (fields among fields): the click paints the field under it,
    found by colour inside the prediction, not the whole neighbourhood with straight cuts at its sides."""
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal((200, 180, 120), 10, (800, 800, 3)), 0, 255).astype(np.uint8)
    field = np.zeros((800, 800), bool)
    field[330:450, 340:500] = True
    image[field] = np.clip(rng.normal((70, 120, 60), 10, (field.sum(), 3)), 0, 255).astype(np.uint8)
    prediction = np.ones((800, 800), np.uint8)  # the whole scene predicted as one class
    edit = click_segment(image, np.zeros_like(prediction), (390, 420), label_id=2, prediction=prediction,
                         neighbourhood=400, refiner=CascadePSP(EchoDouble()))
    out = np.zeros_like(prediction)
    edit.apply(out)
    assert _iou(out == 2, field) > 0.85
    assert not (out[200, 200:600] | out[599, 200:600] | out[200:600, 200] | out[200:600, 599]).any()


def test_click_in_level0_coordinates_on_a_coarser_working_level():
    from napari_uhrseg.io.pyramid import open_pyramid

    image, disk = _disk_scene()
    big = cv2.resize(image, (1600, 1600), interpolation=cv2.INTER_NEAREST)
    pyr = open_pyramid(big)
    if len(pyr.levels) < 2:
        pytest.skip("open_pyramid builds no coarser level for this size")
    labels0 = np.zeros((1600, 1600), np.uint8)
    edit = click_segment(pyr, labels0, (720, 880), label_id=2, level=1, refiner=CascadePSP(EchoDouble()))
    out = labels0.copy()
    edit.apply(out)
    disk0 = cv2.resize(disk.astype(np.uint8), (1600, 1600), interpolation=cv2.INTER_NEAREST) > 0
    assert _iou(out == 2, disk0) > 0.8


@pytest.mark.parametrize("kwargs, message", [
    ({"point": (-5, 10)}, "outside the image"),
    ({"label_id": 0}, "label id"),
    ({"remove": True}, "Nothing to remove"),
    ({"labels": np.zeros((100, 120), np.uint8)}, "labels are 100×120 px but"),
    ({"prediction": np.ones((60, 60), np.uint8)}, "prediction is 60×60 px"),
    ({"level": 3}, "Working level 3 does not exist"),
], ids=["outside", "label-0", "nothing-to-remove", "labels-of-another-size", "prediction-of-another-size",
        "no-such-level"])
def test_bad_clicks(kwargs, message):
    image, disk = _disk_scene(size=120, centre=(60, 60), r=20)
    point = kwargs.pop("point", (60, 60))
    labels = kwargs.pop("labels", np.zeros((120, 120), np.uint8))
    kwargs.setdefault("label_id", 1)
    keep = labels.copy()
    with pytest.raises(UhrsegError, match=message):
        click_segment(image, labels, point, refiner=CascadePSP(EchoDouble()), **kwargs)
    assert np.array_equal(labels, keep)
