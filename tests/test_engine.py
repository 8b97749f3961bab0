"""The whole-image engine: windows, stitching, blending, coordinates, cancel, OOM retry, prefetch, memory."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from _segment_helpers import ChannelMethod, channel_probabilities, channel_scene
from napari_uhrseg.engine.segment import iter_segment, segment_image
from napari_uhrseg.engine.windows import blend_weights, window_grid
from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.io.pyramid import open_pyramid
from napari_uhrseg.methods.base import Method, Prediction


def pointwise_labels(rgb: np.ndarray) -> np.ndarray:
    return np.argmax(channel_probabilities(np.asarray(rgb)), axis=0)


# ------------------------------------------------------------------------------------------------ the grid
@pytest.mark.parametrize("shape,window,overlap", [((300, 420), 128, 16), ((129, 1000), 128, 40), ((50, 70), 64, 8),
                                                  ((256, 256), 128, 0)])
def test_grid_tiles_partition_region_and_windows_stay_inside(shape, window, overlap):
    region = (7, 3, 7 + shape[0], 3 + shape[1])
    grid = window_grid(region, window, overlap)
    cover = np.zeros(shape, np.int32)
    for w in grid:
        assert region[0] <= w.y0 < w.y1 <= region[2] and region[1] <= w.x0 < w.x1 <= region[3]
        assert w.shape == (min(window, shape[0]), min(window, shape[1]))  # inside the region, never shrunk
        ty0, tx0, ty1, tx1 = w.tile
        assert w.y0 <= ty0 < ty1 <= w.y1 and w.x0 <= tx0 < tx1 <= w.x1
        cover[ty0 - 7:ty1 - 7, tx0 - 3:tx1 - 3] += 1
    assert (cover == 1).all()  # tiles partition the region
    # neighbours overlap by at least `overlap`
    by_rc = {(w.row, w.col): w for w in grid}
    for (r, c), w in by_rc.items():
        if (r, c + 1) in by_rc:
            assert w.x1 - by_rc[(r, c + 1)].x0 >= overlap


def test_two_window_ramps_cross_fade_to_one():
    grid = window_grid((0, 0, 100, 180), 100, 20)
    assert len(grid) == 2
    a, b = blend_weights(grid[0]), blend_weights(grid[1])
    overlap = grid[0].x1 - grid[1].x0
    total = a[:, grid[1].x0:] + b[:, :overlap]
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert a[0, 0] == 1.0 and b[0, -1] == 1.0  # outer edges are not ramped


# ------------------------------------------------------------------------------------------------ stitching
def test_stitching_is_exact_for_a_pointwise_method_at_level0():
    image, truth = channel_scene((300, 420))
    pyr = open_pyramid(image)
    method = ChannelMethod()
    res = segment_image(pyr, method, window=128, overlap=16)
    labels = np.asarray(res.store.array)
    assert labels.shape == (300, 420)
    np.testing.assert_array_equal(labels, truth)
    np.testing.assert_array_equal(labels, pointwise_labels(image))
    assert res.windows_total == res.windows_done == len(window_grid((0, 0, 300, 420), 128, 16)) == 12
    assert all(shape == (128, 128) for shape in method.calls)
    assert not res.cancelled and res.timings["mean_window_s"] > 0


def test_level1_region_labels_and_overlays_are_in_level0_coordinates():
    image, _ = channel_scene((512, 640), seed=3)
    pyr = open_pyramid(image)
    assert len(pyr.levels) >= 2
    ds = pyr.downsamples[1]
    level1 = np.asarray(pyr.levels[1])
    region = (100, 60, 460, 600)  # level-0 pixels
    res = segment_image(pyr, ChannelMethod(), level=1, window=96, overlap=8, region=region)
    y0, x0, y1, x1 = res.region
    assert (y0, x0) == (int(np.floor(100 / ds)), int(np.floor(60 / ds)))
    assert res.store.shape == (y1 - y0, x1 - x0) and res.store_origin == (y0, x0)
    np.testing.assert_array_equal(np.asarray(res.store.array), pointwise_labels(level1[y0:y1, x0:x1]))
    assert res.region_level0 == pytest.approx((y0 * ds, x0 * ds, y1 * ds, x1 * ds))
    # Every patch record recomputes from the level-1 pixels under its level-0 box divided by the downsample.
    assert len(res.overlays) == 4 * res.windows_total
    for rec in res.overlays:
        by0, bx0, by1, bx1 = (int(round(v / ds)) for v in rec["box"])
        expected = level1[by0:by1, bx0:bx1, 0].mean() / 255.0
        assert rec["probability"] == pytest.approx(expected, abs=1e-6)
        assert rec["level"] == 1 and 0 <= rec["window"] < res.windows_total
        assert rec["selected"] == (rec["probability"] >= 0.3)


class _WindowConstant(Method):
    """Class 1 with probability p_i over the whole window, p alternating 0.9, 0.1 from call to call."""

    class_names = ["a", "b"]

    def __init__(self):
        self.n = 0

    def predict(self, window, *, context=None):
        p = 0.9 if self.n % 2 == 0 else 0.1
        self.n += 1
        probs = np.empty((2,) + window.shape[:2], np.float32)
        probs[1], probs[0] = p, 1 - p
        return Prediction(probs)


def test_overlaps_are_blended_with_a_linear_cross_fade():
    image = np.zeros((64, 180, 3), np.uint8)
    res = segment_image(open_pyramid(image), _WindowConstant(), window=100, overlap=20)
    labels = np.asarray(res.store.array)
    # windows [0, 100) and [80, 180): the overlap is [80, 100); the ramps cross at its middle (90), where
    # 0.9 w0 + 0.1 w1 = 0.1 w0 + 0.9 w1. Last-writer-wins would switch at 80, first-writer-wins at 100.
    assert (labels[:, :90] == 1).all() and (labels[:, 90:] == 0).all()


def test_small_image_is_padded_to_the_window_and_patches_in_padding_dropped():
    image, truth = channel_scene((50, 70), seed=1, block=10)
    method = ChannelMethod(grid=4)
    res = segment_image(open_pyramid(image), method, window=128, overlap=8)
    assert method.calls == [(128, 128)]
    np.testing.assert_array_equal(np.asarray(res.store.array), truth)
    # of the 16 patches (32 px each) 2 x 3 touch the image, clipped to it; the rest lie in the padding
    boxes = sorted(tuple(r["box"]) for r in res.overlays)
    assert len(boxes) == 6
    assert boxes[0] == pytest.approx((0, 0, 32, 32)) and boxes[-1] == pytest.approx((32, 64, 50, 70))


def test_small_region_reads_real_context_around_it():
    image, truth = channel_scene((300, 300), seed=2)
    method = ChannelMethod()
    events = list(_events(open_pyramid(image), method, window=128, overlap=8, region=(140, 150, 180, 200)))
    assert method.calls == [(128, 128)]
    ev = events[0]
    assert ev.read_box[2] - ev.read_box[0] == 128 and ev.read_box[0] <= 140 and ev.read_box[2] >= 180
    np.testing.assert_array_equal(ev.tile_labels, truth[140:180, 150:200])


def _events(pyr, method, **kw):
    gen = iter_segment(pyr, method, **kw)
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_events_carry_tiles_equal_to_the_store_and_progress_is_reported():
    image, truth = channel_scene((200, 260), seed=4)
    seen = []
    gen = iter_segment(open_pyramid(image), ChannelMethod(), window=96, overlap=12,
                       progress=lambda i, n: seen.append((i, n)))
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
    n = res.windows_total
    assert [e.index for e in events] == list(range(n)) and seen == [(i + 1, n) for i in range(n)]
    store = np.asarray(res.store.array)
    for e in events:
        oy, ox = e.store_offset
        h, w = e.tile_labels.shape
        np.testing.assert_array_equal(store[oy:oy + h, ox:ox + w], e.tile_labels)
        assert e.box_level0 == pytest.approx(e.box)  # level 0: the same numbers
    np.testing.assert_array_equal(store, truth)


# ------------------------------------------------------------------------------------------------ cancel, OOM
def test_cancel_between_windows_keeps_finished_windows():
    image, truth = channel_scene((300, 420), seed=5)
    stop = threading.Event()

    def progress(done, total):
        if done == 2:
            stop.set()

    res = segment_image(open_pyramid(image), ChannelMethod(), window=128, overlap=16, cancel=stop,
                        progress=progress)
    assert res.cancelled and res.windows_done == 2 and res.windows_total == 12
    labels = np.asarray(res.store.array)
    grid = window_grid((0, 0, 300, 420), 128, 16)
    done = np.zeros(labels.shape, bool)
    for w in grid[:2]:
        done[w.y0:w.y1, w.x0:w.x1] = True
    np.testing.assert_array_equal(labels[done], truth[done])  # whole finished windows, overlaps included
    assert (labels[~done] == 0).all()  # nothing else was written (class 0 never wins in this scene)


def test_cuda_oom_is_retried_once_then_reported():
    import torch

    class OnceOOM(ChannelMethod):
        def __init__(self, failures):
            super().__init__()
            self.failures = failures

        def predict(self, window, *, context=None):
            if self.failures:
                self.failures -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().predict(window)

    image, truth = channel_scene((200, 200), seed=6)
    res = segment_image(open_pyramid(image), OnceOOM(1), window=128, overlap=16)
    assert res.oom_retries == 1
    np.testing.assert_array_equal(np.asarray(res.store.array), truth)

    with pytest.raises(UhrsegError, match="Out of GPU memory on window 0"):
        segment_image(open_pyramid(image), OnceOOM(2), window=128, overlap=16)


def test_a_method_error_still_keeps_finished_windows():
    class FailsOnThird(ChannelMethod):
        def predict(self, window, *, context=None):
            if len(self.calls) == 2:
                raise RuntimeError("boom")
            return super().predict(window)

    from napari_uhrseg.io.labels import create_label_store

    image, truth = channel_scene((128, 300), seed=7)
    store = create_label_store((128, 300))
    with pytest.raises(RuntimeError, match="boom"):
        segment_image(open_pyramid(image), FailsOnThird(), window=128, overlap=16, store=store)
    labels = np.asarray(store.array)
    grid = window_grid((0, 0, 128, 300), 128, 16)
    assert len(grid) == 3
    end = grid[1].x1  # the first two windows finished before the third failed; all of them is in the store
    np.testing.assert_array_equal(labels[:, :end], truth[:, :end])
    assert (labels[:, end:] == 0).all()


# ------------------------------------------------------------------------------------------------ prefetch, memory
class _SlowPyramid:
    """Delegates to a real Pyramid and logs when each read starts (to observe the prefetch)."""

    def __init__(self, pyr, log):
        self._pyr, self._log = pyr, log

    def __getattr__(self, name):
        return getattr(self._pyr, name)

    def read_region(self, level, y0, x0, h, w):
        self._log.append(("read", (y0, x0), time.perf_counter()))
        time.sleep(0.02)
        return self._pyr.read_region(level, y0, x0, h, w)


def test_next_window_is_read_while_the_current_one_computes():
    log = []

    class SlowMethod(ChannelMethod):
        def predict(self, window, *, context=None):
            t0 = time.perf_counter()
            time.sleep(0.1)
            out = super().predict(window)
            log.append(("predict", None, t0, time.perf_counter()))
            return out

    image, _ = channel_scene((128, 300), seed=8)
    segment_image(_SlowPyramid(open_pyramid(image), log), SlowMethod(), window=128, overlap=16)
    reads = [e for e in log if e[0] == "read"]
    predicts = [e for e in log if e[0] == "predict"]
    assert len(reads) == len(predicts) == 3
    for i in range(2):  # read i+1 starts before predict i ends
        assert reads[i + 1][2] < predicts[i][3]


def test_pending_strips_spill_to_disk_with_identical_labels():
    image, truth = channel_scene((300, 420), seed=9)
    pyr = open_pyramid(image)
    in_ram = segment_image(pyr, ChannelMethod(), window=128, overlap=16)
    spilled = segment_image(pyr, ChannelMethod(), window=128, overlap=16, spill_bytes=0)
    assert not in_ram.spilled and in_ram.pending_peak_bytes > 0
    assert spilled.spilled and spilled.pending_peak_bytes == 0
    np.testing.assert_array_equal(np.asarray(spilled.store.array), np.asarray(in_ram.store.array))
    np.testing.assert_array_equal(np.asarray(spilled.store.array), truth)


def test_pending_memory_is_bounded_by_the_window_not_the_image_height():
    # In RAM, pending strips hold at most about one grid row of overlaps; more rows must not add any.
    peaks = []
    for h in (352, 1024):  # 128 + 112 k: the same last-row overlap
        image = np.zeros((h, 300, 3), np.uint8)
        res = segment_image(open_pyramid(image), ChannelMethod(), window=128, overlap=16)
        peaks.append(res.pending_peak_bytes)
    assert peaks[0] == peaks[1] > 0


def test_bad_region_and_level_give_clear_errors():
    pyr = open_pyramid(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(UhrsegError, match="does not overlap the image"):
        segment_image(pyr, ChannelMethod(), window=64, overlap=8, region=(100, 100, 200, 200))
    with pytest.raises(UhrsegError, match="Level 7 does not exist"):
        segment_image(pyr, ChannelMethod(), level=7)


def test_in_place_strip_weighting_equals_the_full_weight_map():
    from napari_uhrseg.engine.windows import apply_blend_weights

    for win in window_grid((0, 0, 300, 420), 128, 16):
        probs = np.random.default_rng(win.index).random((3, *win.shape)).astype(np.float32)
        expected = probs * blend_weights(win)[None]
        np.testing.assert_allclose(apply_blend_weights(probs, win), expected, rtol=1e-6)


def test_argmax_classes_matches_numpy_with_ties_to_the_lower_class():
    from napari_uhrseg.engine.segment import argmax_classes

    scores = np.random.default_rng(0).integers(0, 4, size=(5, 40, 50)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(argmax_classes(scores), np.argmax(scores, axis=0))


def test_a_real_grnet_through_the_engine_reports_its_patches_at_level0(tmp_path):
    """A tiny randomly initialised GRNet (fast preset, no pretrained weights): the engine's coordinates and
    records for the method the product uses by default, at a non-zero level."""
    import torch

    from napari_uhrseg.methods.base import save_checkpoint
    from napari_uhrseg.methods.grnet_ppn import GRNet, GRNetMethod, GRNetSettings, checkpoint_meta
    from napari_uhrseg.methods.presets import grnet_preset

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine can be 10x slower than one
    try:
        _run_tiny_grnet(tmp_path, GRNet, GRNetMethod, GRNetSettings, checkpoint_meta, grnet_preset, save_checkpoint)
    finally:
        torch.set_num_threads(threads)


def _run_tiny_grnet(tmp_path, GRNet, GRNetMethod, GRNetSettings, checkpoint_meta, grnet_preset, save_checkpoint):
    cfg = grnet_preset("fast", global_size=128, refine_size=64)
    names = ["unlabelled", "a", "b", "c"]
    model = GRNet(cfg, len(names) - 1, pretrained=False)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", model.state_dict(),
                           checkpoint_meta(cfg, names, None, 0, model, GRNetSettings()))
    method = GRNetMethod.from_checkpoint(ckpt, device="cpu")
    image, _ = channel_scene((768, 768), seed=30)
    pyr = open_pyramid(image)
    res = segment_image(pyr, method, level=1, window=256, overlap=16)  # level 1: 384 x 384, 2 x 2 windows
    labels = np.asarray(res.store.array)
    assert labels.shape == pyr.level_shape(1) and labels.max() < len(names)
    assert res.windows_done == 4 and len(res.overlays) == 16 * 4
    ds = pyr.downsamples[1]
    for rec in res.overlays:
        y0, x0, y1, x1 = rec["box"]
        assert (y1 - y0, x1 - x0) == pytest.approx((64 * ds, 64 * ds))  # a 4 x 4 grid of 64 px at level 1
        assert 0 <= y0 and y1 <= 768 and 0 <= x0 and x1 <= 768
        assert 0.0 <= rec["probability"] <= 1.0 and rec["selected"] == (rec["probability"] >= 0.5)
    per_window = {}
    for rec in res.overlays:
        per_window.setdefault(rec["window"], []).append(rec["box"])
    grid = window_grid((0, 0, 384, 384), 256, 16)
    for w in grid:  # each window's patches tile exactly that window, at level 0
        boxes = np.array(per_window[w.index])
        assert boxes[:, 0].min() == w.y0 * ds and boxes[:, 2].max() == w.y1 * ds
        assert boxes[:, 1].min() == w.x0 * ds and boxes[:, 3].max() == w.x1 * ds
