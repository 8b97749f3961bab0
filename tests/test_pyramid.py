"""open_pyramid: formats, metadata, dtypes/channels, laziness and read_region."""
import numpy as np
import pytest
import tifffile

from napari_uhrseg.errors import UnsupportedImageError
from napari_uhrseg.io import formats
from napari_uhrseg.io.pyramid import Pyramid, open_pyramid


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_pyramidal_ome(path, data, levels=3, **meta):
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        md = {"axes": "YXS" if data.ndim == 3 else "YX", **meta}
        photometric = "rgb" if data.ndim == 3 else "minisblack"
        tw.write(data, subifds=levels - 1, tile=(128, 128), compression="zlib", metadata=md, photometric=photometric)
        for k in range(1, levels):
            tw.write(data[:: 2**k, :: 2**k], subfiletype=1, tile=(128, 128), compression="zlib",
                     photometric=photometric)


def test_pyramidal_ome_tiff_levels_pixel_size_and_region(tmp_path):
    data = _rgb(1000, 1500)
    path = tmp_path / "slide.ome.tif"
    _write_pyramidal_ome(path, data, PhysicalSizeX=0.5, PhysicalSizeY=0.25, PhysicalSizeXUnit="µm",
                         PhysicalSizeYUnit="µm")
    pyr = open_pyramid(path)
    assert isinstance(pyr, Pyramid) and pyr.name == "slide" and pyr.path == str(path)
    assert pyr.shape == (1000, 1500) and pyr.rgb and pyr.channel_axis == 2
    assert [pyr.level_shape(i) for i in range(3)] == [(1000, 1500), (500, 750), (250, 375)]
    assert pyr.downsamples == [1.0, 2.0, 4.0]
    assert pyr.pixel_size == (0.25, 0.5) and pyr.pixel_unit == "µm"
    np.testing.assert_array_equal(pyr.read_region(0, 100, 200, 50, 60), data[100:150, 200:260])
    np.testing.assert_array_equal(pyr.read_region(1, 10, 20, 30, 40), data[::2, ::2][10:40, 20:60])
    region = pyr.read_region(2, 240, 370, 20, 20)  # zero padding past the bottom-right edge
    np.testing.assert_array_equal(region[:10, :5], data[::4, ::4][240:, 370:])
    assert region[10:].max() == 0 and region[:, 5:].max() == 0
    assert pyr.read_region(0, -5, -5, 3, 3).max() == 0


def test_plain_tiff_gets_a_lazy_pyramid_and_resolution_tags(tmp_path):
    ramp = np.tile(np.linspace(0, 60000, 900), (1200, 1))
    data = (ramp + np.random.default_rng(1).integers(0, 100, (1200, 900))).astype(np.uint16)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, tile=(256, 256), resolution=(10000 / 0.8, 10000 / 0.8), resolutionunit="CENTIMETER")
    pyr = open_pyramid(path)
    assert pyr.pixel_size == pytest.approx((0.8, 0.8)) and pyr.pixel_unit == "µm"
    assert not pyr.rgb and pyr.channel_axis is None and len(pyr.levels) == 3
    level1 = np.asarray(pyr.levels[1])
    expected = data[:1200, :900].reshape(600, 2, 450, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(level1, np.round(expected), atol=0.51)
    lo, hi = pyr.intensity_range()
    assert 200 < lo < 600 and 59300 < hi < 59900  # 0.5/99.5 percentiles of the coarsest level
    rgb = pyr.read_region(0, 0, 0, 16, 16)
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1])


def test_geotiff_pixel_size_from_model_pixel_scale(tmp_path):
    path = tmp_path / "scene.tif"
    geokeys = (1, 1, 0, 2, 1024, 0, 1, 1, 3076, 0, 1, 9001)  # projected model, linear unit metre
    tifffile.imwrite(path, _rgb(256, 300), photometric="rgb",
                     extratags=[(33550, "d", 3, (0.3, 0.3, 0.0), False), (34735, "H", len(geokeys), geokeys, False)])
    pyr = open_pyramid(path)
    assert pyr.pixel_size == (0.3, 0.3) and pyr.pixel_unit == "m" and pyr.rgb


def test_svs_slide_through_tiffslide(tmp_path):
    data = _rgb(1024, 1536)
    path = tmp_path / "scan.svs"
    desc = "Aperio Image Library v12.0.15\n1536x1024 [0,0 1536x1024] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.4990"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, tile=(256, 256), photometric="rgb", description=desc)
        tw.write(data[::8, ::8], photometric="rgb", description="Aperio Image Library v12.0.15\nthumbnail")
        tw.write(data[::4, ::4], tile=(256, 256), photometric="rgb",
                 description="Aperio Image Library v12.0.15\n1536x1024 -> 384x256 - |AppMag = 20|MPP = 0.4990")
    pyr = open_pyramid(path)
    assert pyr.metadata["format"] == "slide"
    assert pyr.pixel_size == pytest.approx((0.499, 0.499)) and pyr.pixel_unit == "µm" and pyr.rgb
    assert pyr.level_shape(0) == (1024, 1536) and (256, 384) in [pyr.level_shape(i) for i in range(len(pyr.levels))]
    np.testing.assert_array_equal(pyr.read_region(0, 500, 700, 20, 20), data[500:520, 700:720])


def test_ome_zarr_multiscales(tmp_path):
    import zarr

    data = _rgb(600, 700).transpose(2, 0, 1)  # (C, Y, X)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    for k in range(2):
        root.create_array(str(k), data=data[:, :: 2**k, :: 2**k], chunks=(3, 128, 128))
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5 * 2**k, 0.5 * 2**k]}]}
                     for k in range(2)],
    }]
    pyr = open_pyramid(tmp_path / "img.ome.zarr")
    assert pyr.name == "img" and pyr.level_shape(1) == (300, 350)
    assert pyr.pixel_size == (0.5, 0.5) and pyr.pixel_unit == "µm"
    assert pyr.channel_axis == 2 and pyr.num_channels == 3
    np.testing.assert_array_equal(np.asarray(pyr.levels[0][10:20, 30:40]), data[:, 10:20, 30:40].transpose(1, 2, 0))


def test_png_and_jpeg_are_lazy_until_a_chunk_is_read(tmp_path, monkeypatch):
    import cv2

    rgba = np.dstack([_rgb(700, 900), np.full((700, 900), 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba[..., [2, 1, 0, 3]])
    cv2.imwrite(str(tmp_path / "b.jpg"), rgba[..., [2, 1, 0]])
    calls = []
    real = formats._decode.__wrapped__
    formats._decode.cache_clear()
    monkeypatch.setattr(formats, "_decode", lambda *a: calls.append(a) or real(*a))
    png = open_pyramid(tmp_path / "a.png")
    jpg = open_pyramid(tmp_path / "b.jpg")
    assert calls == []  # open read headers only
    assert png.rgb and png.levels[0].shape == (700, 900, 3)  # alpha dropped
    assert len(png.levels) == 2 and png.level_shape(1) == (350, 450)
    np.testing.assert_array_equal(png.read_region(0, 0, 0, 50, 50), rgba[:50, :50, :3])
    assert len(calls) == 1
    region = jpg.read_region(0, 0, 0, 50, 50).astype(int)
    assert np.abs(region - rgba[:50, :50, :3]).mean() < 60  # lossy, but the same picture (channel order right)


def test_arrays_dtypes_and_channels():
    rgba = np.random.default_rng(2).random((64, 80, 4)).astype(np.float32)
    with pytest.raises(UnsupportedImageError, match="floating-point channels"):
        open_pyramid(rgba)
    rgb_float = open_pyramid(rgba[..., :3])
    assert rgb_float.rgb and rgb_float.read_region(0, 0, 0, 8, 8).dtype == np.uint8
    five = open_pyramid(np.zeros((64, 64, 5), np.uint16))
    assert not five.rgb and five.num_channels == 5
    chw = open_pyramid(np.zeros((3, 100, 120), np.uint8))
    assert chw.shape == (100, 120) and chw.num_channels == 3
    rgba8 = open_pyramid(np.zeros((40, 40, 4), np.uint8))
    assert rgba8.num_channels == 3 and rgba8.rgb
    gray = open_pyramid(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))
    region = gray.read_region(0, 0, 0, 2, 2)
    assert region.shape == (2, 2, 3) and (region[..., 0] == region[..., 2]).all()
    assert open_pyramid(np.zeros((32, 32), bool)).dtype == np.uint8
    with pytest.raises(UnsupportedImageError, match="complex"):
        open_pyramid(np.zeros((32, 32), np.complex64))
    assert open_pyramid(rgb_float) is rgb_float


def test_contrast_limits_override_scales_read_region():
    pyr = open_pyramid(np.full((32, 32), 1000, np.uint16))
    pyr.contrast_limits = (0.0, 2000.0)
    assert int(pyr.read_region(0, 0, 0, 1, 1)[0, 0, 0]) == 127
