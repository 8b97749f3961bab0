"""The napari reader: one lazy multiscale layer with the pixel size as scale, reading only what is shown."""
import numpy as np
import pytest

from napari_uhrseg._reader import get_reader, layer_data
from napari_uhrseg.io.pyramid import open_pyramid


def test_reader_returns_one_multiscale_layer_with_scale(big_pyramid_tiff, tiff_chunk_reads):
    reader = get_reader(str(big_pyramid_tiff))
    [(levels, kwargs, layer_type)] = reader(str(big_pyramid_tiff))
    assert layer_type == "image" and kwargs["multiscale"] and kwargs["rgb"] is False
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["units"] == ("micrometer", "micrometer")
    assert levels[0].shape == (40000, 40000) and len(levels) == 8
    assert tiff_chunk_reads == []  # opening reads headers, no pixels


def test_viewing_a_corner_reads_only_its_chunks(big_pyramid_tiff, tiff_chunk_reads):
    pyr = open_pyramid(big_pyramid_tiff)
    total_level0 = (40000 // 1024 + 1) ** 2
    corner = np.asarray(pyr.levels[0][:1000, :1600])  # a 1600 x 1000 screen at full resolution
    assert corner.shape == (1000, 1600)
    assert sorted(tiff_chunk_reads) == ["0/0.0", "0/0.1"] or len(tiff_chunk_reads) == 2
    tiff_chunk_reads.clear()
    overview = np.asarray(pyr.levels[-1])  # the whole image at the coarsest level
    assert overview.shape == (313, 313) and len(tiff_chunk_reads) == 1
    tiff_chunk_reads.clear()
    window = pyr.read_region(3, 2000, 2000, 512, 512)  # a model window at level 3 (8x): 4 tiles of 1024
    assert window.shape == (512, 512, 3) and len(tiff_chunk_reads) <= 4 < total_level0


def test_layer_data_for_labels_and_channels(tmp_path):
    from napari_uhrseg.io.export import export_labels

    labels = np.zeros((600, 700), np.uint8)
    labels[100:200, 100:300] = 2
    out = export_labels(labels, tmp_path / "l.ome.zarr", class_names=["bg", "a", "b"], pixel_size=(0.5, 0.5))
    [(levels, kwargs, layer_type)] = get_reader(str(out))(str(out))
    assert layer_type == "labels" and kwargs["scale"] == (0.5, 0.5)
    _, kwargs, layer_type = layer_data(open_pyramid(np.zeros((64, 64, 5), np.uint16) + 7))
    assert layer_type == "image" and kwargs["channel_axis"] == 2 and len(kwargs["name"]) == 5


@pytest.mark.gui
def test_napari_opens_the_pyramid_and_views_a_corner(make_napari_viewer, qtbot, big_pyramid_tiff, tiff_chunk_reads,
                                                    tmp_path):
    viewer = make_napari_viewer()
    layers = viewer.open(str(big_pyramid_tiff), plugin="napari-uhrseg")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and len(layer.data) == 8 and not layer.rgb
    np.testing.assert_allclose(layer.scale, (0.25, 0.25))
    viewer.window.resize(1200, 900)
    # Zoom on the top-left corner.
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 / older
    camera.center = (400, 400)
    camera.zoom = 1.0  # about 800 x 800 world units on screen: 3200 x 3200 level-0 pixels
    viewer.screenshot(canvas_only=True, flash=False)  # a draw: napari picks the level for this zoom
    qtbot.wait(300)
    level = layer.data_level
    assert level < 5  # zoomed in: a fine level is on screen, not the overview
    (y0, x0), (y1, x1) = layer.corner_pixels.tolist()
    needed = {f"{level}/{cy}.{cx}" for cy in range(y0 // 1024, y1 // 1024 + 1) for cx in range(x0 // 1024, x1 // 1024 + 1)}
    shown = [k for k in tiff_chunk_reads if k.split("/")[0] == str(level)]
    assert shown and set(shown) <= needed  # exactly the tiles under the view...
    others = [k for k in tiff_chunk_reads if k.split("/")[0] != str(level)]
    assert all(int(k.split("/")[0]) >= 6 for k in others)  # ...plus the one-tile overview levels
    assert len(tiff_chunk_reads) <= len(needed) + 2 < 40 ** 2
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4 and len(np.unique(shot[..., 0])) >= 2  # blocks of grey shown
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "corner.png", shot)


def test_a_label_store_of_a_region_opens_as_labels_placed_on_its_image(tmp_path, make_napari_viewer):
    # `uhrseg segment --region ... -o OUT.zarr` writes the region's labels with its origin, level and classes;
    # dropped on the viewer they sit where they were segmented (a plain 2-D zarr array used to raise IndexError).
    import zarr

    from napari_uhrseg.cli import main
    from napari_uhrseg.io.labels import open_label_store
    from napari_uhrseg.widgets._layers import labels_in_frame

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", image)
    out = tmp_path / "reg.zarr"
    assert main(["segment", str(tmp_path / "img.tif"), "--region", "100,200,260,360", "-o", str(out),
                 "--quiet"]) == 0
    [(data, kwargs, layer_type)] = get_reader(str(out))(str(out))
    assert layer_type == "labels" and data.shape == (160, 160)
    assert kwargs["translate"] == (100.0, 200.0) and kwargs["scale"] == (1.0, 1.0)
    names = open_label_store(out).class_names
    assert list(kwargs["features"]["class"]) == names
    viewer = make_napari_viewer()
    img = viewer.add_image(image, name="img", rgb=True)
    lab = viewer.add_labels(data, **kwargs)
    framed = labels_in_frame(np.asarray(lab.data), lab, img)
    assert framed.origin == (100, 200) and framed.shape == (300, 400)
    plain = tmp_path / "plain.zarr"
    zarr.open_array(str(plain), mode="w", shape=(64, 80), dtype="uint8")[:] = 3  # no attributes: an image
    [(levels, kwargs, layer_type)] = get_reader(str(plain))(str(plain))
    assert layer_type == "image" and levels[0].shape == (64, 80)
