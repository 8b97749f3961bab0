"""MagNet's uncertainty surface: the region queue (no viewer), then the heat-map layer, the stage selector and
the "next most uncertain region" button in a real viewer (gui)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from napari_uhrseg.widgets import uncertainty as un

SCALE, TRANSLATE = (0.5, 0.5), (10.0, 20.0)


def test_region_queue_goes_from_most_to_least_uncertain_once():
    umap = np.zeros((40, 60), np.float32)  # downsample 4 → a 160 x 240 level-0 image
    umap[20:30, 30:40] = 1.0  # level-0 rows 80..120, cols 120..160
    umap[0:10, 0:10] = 0.5
    q = un.RegionQueue(umap, downsample=4, region=40, shape0=(160, 240))
    assert q.scores.shape == (4, 6)
    first = q.next()
    assert first == (80.0, 120.0, 120.0, 160.0)
    assert q.next() == (0.0, 0.0, 40.0, 40.0)
    q.mark_visited((0, 0, 160, 120))  # the user looked at the left half
    seen = [q.next() for _ in range(q.remaining)]
    assert all(b[1] >= 120 for b in seen) and len(set(seen)) == len(seen)
    assert q.next() is None


def test_region_queue_skips_what_was_never_segmented_and_boxes_the_scored_block():
    # A run over a box of the slide: the rest of the map is empty (0), which is "no map", not "certain".
    umap = np.zeros((40, 60), np.float32)
    covered = np.zeros((40, 60), bool)
    covered[:20, :30] = True
    umap[:20, :30] = 0.2
    umap[10:20, 10:20] = 0.9
    q = un.RegionQueue(umap, downsample=4, region=40, shape0=(160, 240), covered=covered)
    assert q.total == 6 and q.remaining == 6
    seen = [q.next() for _ in range(6)]
    assert seen[0] == (40.0, 40.0, 80.0, 80.0)
    assert all(b[2] <= 80 and b[3] <= 120 for b in seen)  # only the segmented top-left block
    assert q.next() is None
    # A region half inside the box is scored on its segmented half: 0.6 there beats 0.5 over a whole region.
    umap, covered = np.zeros((20, 20), np.float32), np.zeros((20, 20), bool)
    covered[:, :15] = True
    umap[:10, :10], umap[:10, 10:15] = 0.5, 0.6
    q = un.RegionQueue(umap, downsample=4, region=40, shape0=(80, 80), covered=covered)
    assert q.next() == (0.0, 40.0, 40.0, 80.0)
    # A map at a non-integer downsample (a 100k slide: 24.41 px per map pixel): a region of 1024 px is 42 map
    # pixels, and the box offered is exactly the block that was scored, wherever it is on the slide.
    d = 100_000 / 4096
    umap = np.zeros((4096, 4096), np.float32)
    umap[42 * 90 : 42 * 91, 42 * 80 : 42 * 81] = 1.0
    q = un.RegionQueue(umap, downsample=d, region=1024, shape0=(100_000, 100_000))
    y0, x0, y1, x1 = q.next()
    assert (y0, x0) == pytest.approx((42 * 90 * d, 42 * 80 * d)) and y1 - y0 == pytest.approx(42 * d)


def test_stage_maps_assemble_windows_at_a_coarse_level():
    maps = un.StageMaps((128, 192), downsample=4)
    for x0 in (0, 96):
        final = np.full((128, 96), 0.25 if x0 == 0 else 0.75, np.float32)
        stages = [{"stage": i, "query_map": np.full((32, 24), 0.1 * i, np.float32)} for i in range(3)]
        ev = SimpleNamespace(index=x0 // 96, artefacts={"uncertainty": final, "stages": stages},
                             read_box=(0, x0, 128, x0 + 96))
        assert maps.add_event(ev, level_downsample=1.0)
    assert maps.names == ["final", "stage 0", "stage 1", "stage 2"]
    a = maps.array("final")
    assert a.shape == (32, 48) and a[5, 5] == pytest.approx(0.25) and a[5, 40] == pytest.approx(0.75)
    assert np.allclose(maps.array("stage 2"), 0.2)
    assert not maps.add_event(SimpleNamespace(index=0, artefacts={"patches": []}, read_box=(0, 0, 1, 1)), 1.0)
    assert un.coarse_downsample((100_000, 80_000), 1.0) == pytest.approx(100_000 / 4096)


# ------------------------------------------------------------------------------------------------ viewer
@pytest.fixture
def viewer_and_image(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
    layer = viewer.add_image([image, image[::2, ::2]], multiscale=True, rgb=True, name="scene",
                             scale=SCALE, translate=TRANSLATE)
    return viewer, layer


def _event(index, read_box, final):
    return SimpleNamespace(index=index, artefacts={"uncertainty": final, "stages": [
        {"stage": 0, "query_map": final[::4, ::4] * 0.5}]}, read_box=read_box)


@pytest.mark.gui
def test_layer_sits_on_the_image_and_the_button_visits_the_hot_region(viewer_and_image, qtbot):
    viewer, layer = viewer_and_image
    # Working level 1 (downsample 2): two windows of 128 x 80 px cover the 128 x 160 level.
    hot = np.zeros((128, 80), np.float32)
    hot[32:48, 48:64] = 1.0  # level-1 rows 32..48, cols 128..144 of the second window → level 0 64..96, 256..288
    un.on_window_event(viewer, layer, _event(0, (0, 0, 128, 80), np.zeros((128, 80), np.float32)), 2.0)
    out = un.on_window_event(viewer, layer, _event(1, (0, 80, 128, 160), hot), 2.0)
    assert out is viewer.layers["scene MagNet uncertainty"]
    assert out.colormap.name == un.COLORMAP and tuple(out.contrast_limits) == (0.0, 1.0) and out.opacity < 1
    # World position of the hottest map pixel's centre = the world position of its level-0 pixels' centre.
    d = un.coarse_downsample((256, 320), 2.0)
    r, c = np.unravel_index(np.argmax(out.data), out.data.shape)
    world_map = np.asarray(out.data_to_world((r, c)))[-2:]
    level0_centre = (np.array([r, c]) + 0.5) * d - 0.5
    world_image = np.asarray(layer.data_to_world(level0_centre))[-2:]
    np.testing.assert_allclose(world_map, world_image, atol=1e-6)
    assert 64 <= level0_centre[0] < 96 and 256 <= level0_centre[1] < 288

    widget = un.UncertaintyWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MagNet uncertainty")
    widget.image_combo.set_layer(layer)
    widget.refresh()
    assert [widget.stage_combo.itemText(i) for i in range(widget.stage_combo.count())] == ["final", "stage 0"]
    widget.stage_combo.setCurrentText("stage 0")
    assert out.metadata["uhrseg_uncertainty"]["stage"] == "stage 0"
    assert out.data.max() == pytest.approx(0.5, abs=0.05)
    widget.stage_combo.setCurrentText("final")
    widget.region_spin.setValue(64)
    box = widget.next_region()
    assert box == (64.0, 256.0, 128.0, 320.0)
    centre_world = np.asarray(layer.data_to_world(((box[0] + box[2]) / 2 - 0.5, (box[1] + box[3]) / 2 - 0.5)))
    np.testing.assert_allclose(viewer.camera.center[-2:], centre_world[-2:], atol=1e-6)
    second = widget.next_region()
    assert second != box


@pytest.mark.gui
def test_magnet_run_through_the_engine_feeds_the_layer(viewer_and_image):
    from napari_uhrseg.engine.segment import iter_segment
    from napari_uhrseg.io.pyramid import open_pyramid
    from napari_uhrseg.methods import available_methods
    from napari_uhrseg.methods import magnet as mg

    assert {"magnet", "magnet-fast"} <= set(available_methods())
    viewer, layer = viewer_and_image
    torch.manual_seed(0)
    net = mg.MagNetNet(nn.Conv2d(3, 3, 1), 3).eval()
    method = mg.MagNetFast(net, ["a", "b", "c"], normalisation={"mean": [0.5] * 3, "std": [0.5] * 3})
    gen = iter_segment(open_pyramid(np.asarray(layer.data[0])), method, level=0, window=128, overlap=16)
    n = 0
    for ev in gen:
        un.on_window_event(viewer, layer, ev, 1.0)
        n += 1
    umap = viewer.layers["scene MagNet uncertainty"].data
    assert n > 1 and umap.shape == (64, 80) and 0 <= umap.min() and umap.max() <= 1 and umap.std() > 0


@pytest.mark.gui
def test_segment_dock_run_creates_the_uncertainty_layer_on_the_image(make_napari_viewer, tmp_path):
    """A MagNet-Fast run from the Segment dock at working level 1 fills "<image> MagNet uncertainty": the
    engine's windows assembled at 4× the working level's downsample, heat colormap, contrast [0, 1], on the
    image whatever its scale and translate; the uncertainty dock then offers the stages and the queue."""
    from _magnet_helpers import write_magnet_checkpoint
    from napari_uhrseg.engine.segment import iter_segment
    from napari_uhrseg.methods import magnet as mg
    from napari_uhrseg.widgets._layers import pyramid_for_layer
    from napari_uhrseg.widgets.segment import SegmentWidget

    viewer = make_napari_viewer()
    y, x = np.mgrid[:256, :384]
    image = np.stack([128 + 100 * np.sin(x / 19.0), 128 + 100 * np.cos(y / 13.0), (x * 3) % 256], -1).astype(np.uint8)
    layer = viewer.add_image([image, image[::2, ::2]], multiscale=True, rgb=True, name="scene", scale=SCALE,
                             translate=TRANSLATE)
    ckpt = write_magnet_checkpoint(tmp_path / "magnet.pt")
    dock = SegmentWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Segment")
    dock.image_combo.set_layer(layer)
    dock.method_combo.setCurrentText("magnet-fast")
    dock.set_checkpoint(str(ckpt))
    dock.window_spin.setValue(128)
    dock.level_spin.setValue(1)
    result = dock.segment(sync=True)
    assert result is not None and result.windows_done == result.windows_total == 2

    out = viewer.layers["scene MagNet uncertainty"]
    assert out.colormap.name == un.COLORMAP and tuple(out.contrast_limits) == (0.0, 1.0)
    recorder = mg.UncertaintyRecorder((256, 384), 2.0)  # what the CLI writes for the same run
    method = mg.MagNetFast.from_checkpoint(ckpt)
    for ev in iter_segment(pyramid_for_layer(layer), method, level=1, window=128, overlap=32):
        recorder.add_event(ev)
    np.testing.assert_allclose(out.data, recorder.map.array, atol=1e-5)
    assert out.data.shape == (32, 48) and out.data.std() > 0
    d = recorder.map.downsample  # 8 level-0 px per map pixel
    for r, c in [(0, 0), (5, 30), (31, 47)]:
        np.testing.assert_allclose(np.asarray(out.data_to_world((r, c)))[-2:],
                                   np.asarray(layer.data_to_world((r * d + (d - 1) / 2, c * d + (d - 1) / 2)))[-2:],
                                   atol=1e-9)

    widget = un.UncertaintyWidget(viewer)
    widget.image_combo.set_layer(layer)
    widget.refresh()
    assert [widget.stage_combo.itemText(i) for i in range(widget.stage_combo.count())] == [
        "final", "stage 0", "stage 1", "stage 2"]
    box = widget.next_region()
    assert box is not None and 0 <= box[0] < 256 and 0 <= box[1] < 384


@pytest.mark.gui
def test_queue_after_a_run_on_a_box_stays_inside_it(viewer_and_image):
    """A MagNet run over a box of the image: the dock's queue offers the regions of that box and then says
    every region has been visited, instead of walking the unsegmented rest of the image."""
    from napari_uhrseg.engine.segment import iter_segment
    from napari_uhrseg.io.pyramid import open_pyramid
    from napari_uhrseg.methods import magnet as mg

    viewer, layer = viewer_and_image
    torch.manual_seed(0)
    net = mg.MagNetNet(nn.Conv2d(3, 3, 1), 3).eval()
    method = mg.MagNetFast(net, ["a", "b", "c"], normalisation={"mean": [0.5] * 3, "std": [0.5] * 3})
    for ev in iter_segment(open_pyramid(np.asarray(layer.data[0])), method, level=0, window=128, overlap=16,
                           region=(0, 0, 128, 128)):
        un.on_window_event(viewer, layer, ev, 1.0)
    widget = un.UncertaintyWidget(viewer)
    widget.image_combo.set_layer(layer)
    widget.refresh()
    widget.region_spin.setValue(64)
    boxes = []
    while (box := widget.next_region()) is not None:
        boxes.append(box)
    assert len(boxes) == 4 and all(b[2] <= 128 and b[3] <= 128 for b in boxes)
    assert "visited" in widget.status.text()
