"""napari_uhrseg.io.coords: the one helper for level conversions."""
import numpy as np
import pytest

from napari_uhrseg.io import coords
from napari_uhrseg.io.pyramid import open_pyramid

DOWNSAMPLES = [1.0, 2.0, 4.0, 4.0003, 7.5, (4.0001, 3.9998), (2, 8)]


@pytest.mark.parametrize("ds", DOWNSAMPLES)
def test_points_and_boxes_round_trip(ds):
    rng = np.random.default_rng(0)
    pts = rng.uniform(-100, 50000, size=(50, 2))
    boxes = np.sort(rng.uniform(0, 50000, size=(20, 2, 2)), axis=1).transpose(0, 2, 1).reshape(20, 4)
    for a in (pts, boxes, pts[0], boxes[0]):
        back = coords.from_level0(coords.to_level0(a, ds), ds)
        np.testing.assert_allclose(back, a, rtol=0, atol=1e-9 * 50000)
        assert back.shape == np.asarray(a).shape


def test_to_level0_scales_y_and_x_separately():
    np.testing.assert_allclose(coords.to_level0([[10, 20]], (2, 3)), [[20, 60]])
    np.testing.assert_allclose(coords.to_level0([1, 2, 3, 4], (2, 3)), [2, 6, 6, 12])
    np.testing.assert_allclose(coords.from_level0([8, 8], 4), [2, 2])
    np.testing.assert_allclose(coords.between_levels([10, 10, 20, 20], 2, 8), [2.5, 2.5, 5, 5])


@pytest.mark.parametrize("bad", [0, -1, np.nan, (1, 2, 3)])
def test_bad_downsample_is_refused(bad):
    with pytest.raises(ValueError):
        coords.to_level0([1, 2], bad)


def test_wrong_coordinate_shape_is_refused():
    with pytest.raises(ValueError, match="points"):
        coords.to_level0([1, 2, 3], 2)


def test_level_scale_of_odd_sizes_is_not_an_integer():
    dy, dx = coords.level_scale((40001, 30003), (10000, 7500))
    assert dy == pytest.approx(4.0001) and dx == pytest.approx(4.0004)
    # A level-0 point at the far corner maps inside the level, and back.
    corner = coords.from_level0([40001, 30003], (dy, dx))
    np.testing.assert_allclose(corner, [10000, 7500])


def test_clip_box_and_window_rounding():
    assert coords.clip_box((-5, -5, 20, 30), (10, 25)) == (0, 0, 10, 25)
    assert coords.clip_box((50, 50, 60, 60), (10, 10)) == (10, 10, 10, 10)  # empty, not negative
    assert coords.box_to_window((1.2, 2.7, 3.1, 4.0)) == (1, 2, 4, 4)
    assert coords.box_to_window((2.0000000001, 0, 2.9999999999, 3)) == (2, 0, 3, 3)  # float noise ignored
    assert coords.box_to_window((-3, -3, 100, 100), (10, 20)) == (0, 0, 10, 20)


@pytest.mark.parametrize("ds", [2.0, 4.0003, (3.0, 5.0)])
def test_level_window_always_covers_the_level0_box(ds):
    rng = np.random.default_rng(1)
    level_shape = (1000, 800)
    for _ in range(200):
        y0, x0 = rng.uniform(-50, 3000, 2)
        box = (y0, x0, y0 + rng.uniform(0, 500), x0 + rng.uniform(0, 500))
        win = coords.level0_box_to_level_window(box, ds, level_shape)
        back = coords.to_level0(win, ds)
        clipped = coords.clip_box(box, coords.to_level0(level_shape, ds))
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            assert back[0] <= clipped[0] + 1e-6 and back[1] <= clipped[1] + 1e-6
            assert back[2] >= clipped[2] - 1e-6 and back[3] >= clipped[3] - 1e-6
        assert 0 <= win[0] <= win[2] <= level_shape[0] and 0 <= win[1] <= win[3] <= level_shape[1]


def test_view_region_accepts_corners_in_any_order_and_outside():
    assert coords.view_region((300, 400), (-100, -50), 4, (100, 100)) == (0, 0, 75, 100)


def test_best_level_for_downsample_and_pixel_size():
    image = np.zeros((2001, 3001), np.uint8)
    pyr = open_pyramid(image)
    assert pyr.downsamples[0] == 1.0 and pyr.downsamples[1] == pytest.approx(2.0, rel=1e-3)
    assert coords.best_level_for_downsample(pyr, 1.0) == 0
    assert coords.best_level_for_downsample(pyr, 1.9) == 0
    assert coords.best_level_for_downsample(pyr, 2.0) == 1  # 2.0007 counts as 2 within the tolerance
    assert coords.best_level_for_downsample(pyr, 5.0) == 2
    assert coords.best_level_for_downsample(pyr, 1000.0) == len(pyr.levels) - 1
    assert coords.best_level_for_downsample([1, 4.0003, 16.001], 4.0) == 1
    with pytest.raises(ValueError, match="no known pixel size"):
        coords.level_for_pixel_size(pyr, 1.0)
    pyr.pixel_size, pyr.pixel_unit = (0.25, 0.25), "µm"
    assert coords.level_for_pixel_size(pyr, 1.0) == 2
    assert coords.level_for_pixel_size(pyr, 0.3) == 0


def test_pyramid_levels_agree_with_coords():
    pyr = open_pyramid(np.zeros((4001, 2999, 3), np.uint8))
    for i in range(len(pyr.levels)):
        dy, dx = pyr.level_scale(i)
        ly, lx = pyr.level_shape(i)
        np.testing.assert_allclose(coords.to_level0([ly, lx], (dy, dx)), [4001, 2999])
        assert pyr.downsamples[i] == pytest.approx((dy + dx) / 2)
