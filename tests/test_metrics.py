"""Metrics against small cases worked out by hand (the arithmetic is in the comments)."""
import math
import sys
import time

import numpy as np
import pytest

from napari_uhrseg.metrics import (
    ConfusionMatrix,
    MetricInputError,
    RssSampler,
    Timer,
    boundary_accuracy,
    boundary_band,
    confusion_matrix,
    current_rss_mb,
    evaluate,
    mba_radii,
    mean_boundary_accuracy,
    miou_from_confusion,
    peak_rss_mb,
    windowed_boundary_accuracy,
)

PRED = np.array([[0, 0, 1], [1, 2, 2]])
GT = np.array([[0, 1, 1], [1, 2, 0]])


def test_confusion_matrix_by_hand():
    # (gt, pred) pairs: (0,0) (1,0) (1,1) (1,1) (2,2) (0,2)
    cm = confusion_matrix(PRED, GT, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 1], [1, 2, 0], [0, 0, 1]])


def test_miou_by_hand():
    miou, iou = miou_from_confusion(confusion_matrix(PRED, GT, 3))
    # IoU0 = 1 / (2 + 2 - 1) = 1/3; IoU1 = 2 / (3 + 2 - 2) = 2/3; IoU2 = 1 / (1 + 2 - 1) = 1/2
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # = 0.5


def test_ignore_index_drops_pixels_and_is_not_averaged():
    cm = ConfusionMatrix(3, ignore_index=0).update(PRED, GT)
    # gt == 0 pixels (0,0) and (1,2) are dropped: left (1,0) (1,1) (1,1) (2,2)
    np.testing.assert_array_equal(cm.matrix, [[0, 0, 0], [1, 2, 0], [0, 0, 1]])
    miou, iou = cm.miou()
    # IoU1 = 2 / (3 + 2 - 2) = 2/3, IoU2 = 1/1; class 0 (IoU 0/1 = 0) is the ignore class, not averaged
    assert iou[0] == 0.0
    assert miou == pytest.approx((2 / 3 + 1) / 2)


def test_excluded_classes_and_absent_classes():
    cm = confusion_matrix(PRED, GT, 4)  # class 3 is in neither image
    miou, iou = miou_from_confusion(cm)
    assert math.isnan(iou[3])
    assert miou == pytest.approx(0.5)  # NaN is left out of the mean (same as with 3 classes)
    miou, _ = miou_from_confusion(cm, exclude=(0,))
    assert miou == pytest.approx((2 / 3 + 1 / 2) / 2)  # = 7/12
    miou, _ = miou_from_confusion(np.zeros((2, 2), int))
    assert math.isnan(miou)


def test_pooled_is_not_the_mean_of_per_image_iou():
    # image A: gt all 1 (4 px), pred all 1 -> IoU1 = 1; image B: gt 1 px of class 1 in 4, pred misses it
    a_gt, a_pred = np.ones((2, 2), int), np.ones((2, 2), int)
    b_gt, b_pred = np.array([[1, 0], [0, 0]]), np.zeros((2, 2), int)
    cm = ConfusionMatrix(2).update(a_pred, a_gt).update(b_pred, b_gt)
    _, iou = cm.miou()
    # pooled class 1: TP = 4, FN = 1, FP = 0 -> 4/5 (the mean of per-image IoUs would be (1 + 0) / 2)
    assert iou[1] == pytest.approx(4 / 5)


def test_windowed_update_equals_one_shot():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (300, 500))
    pred = np.where(rng.random((300, 500)) < 0.8, gt, rng.integers(0, 4, (300, 500)))
    one = ConfusionMatrix(4, ignore_index=3).update(pred, gt).matrix
    windowed = ConfusionMatrix(4, ignore_index=3).update_windows(pred, gt, window=64).matrix
    np.testing.assert_array_equal(one, windowed)
    assert one.sum() == (gt != 3).sum()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(MetricInputError, match="shape"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(MetricInputError, match="outside 0..1"):
        confusion_matrix(np.full((2, 2), 5), np.zeros((2, 2), int), 2)
    with pytest.raises(MetricInputError, match="integer"):
        confusion_matrix(np.zeros((2, 2), float), np.zeros((2, 2), int), 2)


def test_mba_radii_follow_cascadepsp():
    assert mba_radii(2448, 2448) == [1, 4, 7, 10, 13]  # R = 16.32, step (R - 1) / 5 = 3.064
    assert mba_radii(1000, 1000) == [1, 2, 3, 4, 5]  # R = 6.67, step 1.133
    assert mba_radii(300, 300) == [1, 1, 1, 1, 1]  # R = 2, step 0.2
    assert mba_radii(100, 100) == [1, 1, 1, 1, 1]  # R < 1: int() truncates the negative steps to 0


def test_mba_binary_by_hand():
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    # radius 1 (8 x 8 image): the 3x3 ellipse is a cross, so the band is columns 3 and 4 (16 px)
    np.testing.assert_array_equal(np.nonzero(boundary_band(gt, 1).any(axis=0))[0], [3, 4])
    assert boundary_band(gt, 1).sum() == 16
    pred = gt.copy()
    pred[:4, 4] = 0  # 4 wrong pixels in the band
    pred[0, 0] = 1  # a wrong pixel outside the band does not count
    assert boundary_accuracy(pred, gt) == pytest.approx(12 / 16)


def test_mba_averages_over_growing_radii():
    gt = np.zeros((600, 600), np.uint8)
    gt[:, 300:] = 1
    pred = np.zeros_like(gt)
    pred[:, 301:] = 1  # the edge one column too far right: column 300 is wrong
    # R = 4: radii 1, 1, 2, 2, 3; a straight edge gives a band 2r columns wide, 1 of them wrong
    accuracies = [1 - 1 / (2 * r) for r in (1, 1, 2, 2, 3)]  # 0.5, 0.5, 0.75, 0.75, 0.8333
    assert boundary_accuracy(pred, gt) == pytest.approx(sum(accuracies) / 5)  # = 2/3


def test_mba_multiclass_with_void_by_hand():
    gt = np.zeros((6, 6), np.uint8)
    gt[:5, :3] = 1
    gt[:5, 3:] = 2  # row 5 is void (0)
    # band (radius 1): columns 2-3 of rows 0-4 (10 px) + the rest of row 4 (4 px) + row 5 (6 px, void)
    assert boundary_band(gt, 1).sum() == 20
    pred = gt.copy()
    pred[0, 2] = 2  # in the band: wrong
    pred[4, 0] = 2  # in the band (row 4 touches the void row): wrong
    pred[2, 0] = 2  # outside the band
    pred[5, :] = 1  # void row: not counted when void=0
    assert boundary_accuracy(pred, gt, void=0) == pytest.approx(12 / 14)
    # without void the 6 void pixels count, all wrong: (20 - 2 - 6) / 20
    assert boundary_accuracy(pred, gt) == pytest.approx(12 / 20)


def _band_by_definition(gt, radius, void):
    """CascadePSP's multi-class band, literally: union of per-class morphological gradients, 0 and void skipped."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    band = np.zeros(gt.shape, bool)
    for c in np.unique(gt):
        if c not in (0, void):
            band |= cv2.morphologyEx((gt == c).astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
    return band


@pytest.mark.parametrize("void", [None, 0, 3])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.uint32])
def test_band_equals_the_per_class_definition(void, dtype):
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, (12, 16)).repeat(5, axis=0).repeat(5, axis=1).astype(dtype)  # 60 x 80 blocks
    for radius in (1, 2, 4):
        np.testing.assert_array_equal(boundary_band(gt, radius, void=void), _band_by_definition(gt, radius, void))
    big = gt.astype(np.int64) * 70000  # values beyond uint16 take the per-class path
    np.testing.assert_array_equal(boundary_band(big, 2, void=None), _band_by_definition(big, 2, None))


def test_mba_without_boundary_is_nan_and_skipped():
    flat = np.ones((10, 10), np.uint8)
    assert math.isnan(boundary_accuracy(flat, flat))
    assert mean_boundary_accuracy([0.5, float("nan"), 1.0]) == pytest.approx(0.75)


def test_windowed_mba_covers_the_image_with_full_windows():
    gt = np.zeros((250, 250), np.uint8)
    gt[:, 125:] = 1
    pred = gt.copy()
    pred[:, 125] = 0  # 1 of the 2 band columns wrong in every window that holds the edge
    # windows of 100 start at 0, 100, 150 in each axis; the edge (columns 124/125) lies in the x-windows
    # starting at 100 (cols 100-199); windows without the edge have no band (NaN) and are skipped
    assert windowed_boundary_accuracy(pred, gt, window=100) == pytest.approx(0.5)


def test_evaluate_returns_the_three_figures():
    gt = np.zeros((8, 8), np.uint8)
    gt[:, 4:] = 1
    pred = gt.copy()
    pred[:4, 4] = 0
    out = evaluate(pred, gt, 2)
    # cm = [[32, 0], [4, 28]]: IoU0 = 32/36, IoU1 = 28/32
    assert out["per_class_iou"] == pytest.approx([8 / 9, 7 / 8])
    assert out["miou"] == pytest.approx((8 / 9 + 7 / 8) / 2)
    assert out["mba"] == pytest.approx(0.75)
    both = evaluate([pred, gt], [gt, gt], 2)  # a dataset: pooled IoU, mean of per-image mBA
    assert both["mba"] == pytest.approx((0.75 + 1.0) / 2)
    assert both["num_images"] == 2


def test_timer_and_memory_probes():
    with Timer() as t:
        time.sleep(0.05)
    assert 0.04 < t.elapsed < 2
    assert peak_rss_mb() >= current_rss_mb() * 0.9 > 10
    # Fresh pages straight from the kernel: memory the allocator kept from earlier tests (the package's heap
    # policy keeps freed memory for reuse) is already resident and would not move RSS at all.
    import mmap

    def spike(mib: int, sleep: float) -> RssSampler:
        before = current_rss_mb()
        with RssSampler(interval=0.005) as probe:
            block = mmap.mmap(-1, mib * 2**20)
            block.write(b"\x01" * len(block))  # touched: resident
            time.sleep(sleep)
            block.close()
        assert probe.peak_mb >= before + 0.75 * mib
        assert probe.peak_mb >= current_rss_mb() + 0.75 * mib  # and given back: the peak, not the end
        return probe

    spike(40, 0.05)
    if sys.platform.startswith("linux"):
        probe = spike(40, 0.0)  # the kernel's high-water mark: no sampling interval to miss the spike in
        assert probe.kernel and probe._thread is None
        # ... and reset on entry: a later, smaller block does not report the earlier peak
        with RssSampler() as small:
            pass
        assert small.peak_mb < probe.peak_mb - 30


def test_rss_sampler_falls_back_to_a_sampling_thread(monkeypatch):
    import mmap

    import napari_uhrseg.metrics as metrics

    monkeypatch.setattr(metrics, "_reset_peak_rss", lambda: False)
    before = current_rss_mb()
    with RssSampler(interval=0.005) as probe:
        block = mmap.mmap(-1, 40 * 2**20)
        block.write(b"\x01" * len(block))
        time.sleep(0.05)
        block.close()
    assert not probe.kernel and probe._thread is not None and not probe._thread.is_alive()
    assert probe.peak_mb >= before + 30
