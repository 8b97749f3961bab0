"""The Export dock in a real viewer: every format written from the dock, re-opened and compared with the layer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_uhrseg.widgets.state import get_state, write_classes

pytestmark = pytest.mark.gui
NAMES = ["unlabelled", "stroma", "tumour", "fat"]
COLORS = ["black", (0.0, 0.8, 0.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0)]


@pytest.fixture(autouse=True)
def _private_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def _scene_labels():
    data = np.zeros((180, 260), np.uint8)
    data[10:60, 20:120] = 1
    data[30:50, 40:80] = 2  # a hole-making island inside class 1
    data[100:170, 150:250] = 3
    data[120:140, 10:30] = 2
    return data


@pytest.fixture
def dock(make_napari_viewer):
    from napari_uhrseg.widgets.export import ExportWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((360, 520), np.uint8), name="slide", scale=(0.25, 0.25))
    labels = viewer.add_labels(_scene_labels(), name="slide labels", scale=(0.5, 0.5))  # working level 1
    write_classes(labels, NAMES, COLORS)
    state = get_state(viewer)
    state.image_layer, state.labels_layer = image, labels
    return ExportWidget(viewer)


def _export(qtbot, dock, path, fmt):
    dock.set_format(fmt)
    dock.path_edit.setText(str(path))
    with qtbot.waitSignal(dock.finished, timeout=20000) as blocker:
        dock.start_export()
    return blocker.args[0]


def test_format_choice_fixes_the_suffix(dock, tmp_path):
    dock.path_edit.setText(str(tmp_path / "a.ome.tif"))
    for fmt, suffix in [("png", ".png"), ("ome-zarr", ".ome.zarr"), ("geojson", ".geojson"), ("ome-tiff", ".ome.tif")]:
        dock.set_format(fmt)
        assert dock.path_edit.text() == str(tmp_path / f"a{suffix}")


def test_dock_reads_classes_and_pixel_size_from_layers(dock):
    assert dock.classes_edit.text() == ", ".join(NAMES)
    assert dock.pixel_edit.text() == "0.25, 0.25"
    args = dock.export_arguments()
    assert args["downsample"] == 2.0 and args["pixel_size"] == (0.25, 0.25)
    assert args["class_colors"][2] == [255, 0, 255] and args["class_colors"][1] == [0, 204, 0]


@pytest.mark.parametrize("fmt", ["ome-tiff", "ome-zarr", "png", "geojson"])
def test_export_each_format_and_reopen(qtbot, dock, tmp_path, fmt):
    from napari_uhrseg.io.export import FORMATS
    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import open_label_store

    assert fmt in FORMATS
    dock.unit_edit.setText("µm")
    suffix = {"ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr", "png": ".png", "geojson": ".geojson"}[fmt]
    result = _export(qtbot, dock, tmp_path / f"out{suffix}", fmt)
    assert not isinstance(result, BaseException), result
    assert result.exists() and dock.status.text().startswith("Exported")
    expected = _scene_labels()
    if fmt == "geojson":
        doc = json.loads(result.read_text())
        names = doc["properties"]["class_names"]
        assert names == NAMES
        # coordinates are level-0 pixels: the labels are at downsample 2
        back = rasterize(doc["features"], expected.shape, names, scale=(2.0, 2.0))
        np.testing.assert_array_equal(back, expected)
        tumour = [f for f in doc["features"] if f["properties"]["classification"]["name"] == "tumour"]
        assert len(tumour) == 2 and tumour[0]["properties"]["classification"]["color"] == [255, 0, 255]
        return
    store = open_label_store(result, writable=False)
    np.testing.assert_array_equal(np.asarray(store.array[:]), expected)
    assert store.class_names == NAMES
    colors = store.class_colors
    colors = [colors[k] for k in range(4)] if isinstance(colors, dict) else colors
    assert [list(c[:3]) for c in colors][1:3] == [[0, 204, 0], [255, 0, 255]]
    if fmt == "ome-tiff":
        assert store.info["pixel_size"] == (0.5, 0.5)  # a label pixel is two level-0 pixels of 0.25 µm
    if fmt == "ome-zarr":
        import zarr

        attrs = zarr.open_group(str(result), mode="r").attrs.asdict()
        assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 0.5]


def test_errors_are_notified_and_previous_file_is_kept(qtbot, dock, tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    target = tmp_path / "keep.png"
    target.write_bytes(b"previous export")
    dock.pixel_edit.setText("abc")
    result = _export(qtbot, dock, target, "png")
    assert isinstance(result, Exception) and "not a number" in errors[-1]
    dock.pixel_edit.setText("0.25")
    result = _export(qtbot, dock, tmp_path / "missing" / "out.png", "png")
    assert isinstance(result, Exception) and "does not exist" in errors[-1]
    assert target.read_bytes() == b"previous export" and dock.export_button.isEnabled()


@pytest.mark.parametrize("suffix", [".ome.tif", ".png", ".geojson"])
def test_file_save_keeps_classes_colours_and_pixel_size_of_a_segment_layer(make_napari_viewer, tmp_path, suffix):
    """File › Save with the plugin's writers, on a layer made like the Segment dock's (classes in ``features``,
    colours in the colormap, working level in ``metadata["uhrseg_downsample"]``, the image's units)."""
    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import open_label_store

    viewer = make_napari_viewer()
    labels = viewer.add_labels(_scene_labels(), name="slide labels", scale=(0.5, 0.5),
                               units=("micrometer", "micrometer"), metadata={"uhrseg_downsample": (2.0, 2.0)})
    write_classes(labels, NAMES, COLORS)
    viewer.layers.selection.active = labels
    path = tmp_path / f"saved{suffix}"
    assert viewer.layers.save(str(path), selected=True, plugin="napari-uhrseg") == [str(path)]
    if suffix == ".geojson":
        doc = json.loads(path.read_text())
        assert doc["properties"]["class_names"] == NAMES
        np.testing.assert_array_equal(rasterize(doc["features"], labels.data.shape, NAMES, scale=(2.0, 2.0)),
                                      labels.data)  # level-0 coordinates: the labels are at downsample 2
        return
    store = open_label_store(path, writable=False)
    np.testing.assert_array_equal(np.asarray(store.array[:]), labels.data)
    assert store.class_names == NAMES
    colors = store.class_colors
    colors = [colors[k] for k in range(4)] if isinstance(colors, dict) else colors
    assert [list(c[:3]) for c in colors][1:3] == [[0, 204, 0], [255, 0, 255]]
    if suffix == ".ome.tif":
        assert store.info["pixel_size"] == (0.5, 0.5) and store.info.get("pixel_unit") in ("µm", "um")


@pytest.mark.parametrize("fmt", ["ome-tiff", "geojson"])
def test_labels_of_a_segmented_region_are_exported_where_they_lie(qtbot, make_napari_viewer, tmp_path, fmt):
    # A Segment run on a region makes a labels layer of the region's size, placed by scale and translate. For
    # QuPath and GIS tools its objects must keep the image's coordinates, the rest unlabelled (as `uhrseg
    # segment --region` exports), not move to the image's corner.
    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import open_label_store
    from napari_uhrseg.widgets._layers import labels_geometry
    from napari_uhrseg.widgets.export import ExportWidget

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((360, 520), np.uint8), name="slide")
    region = _scene_labels()[:90, :130]  # at working level 1 (downsample 2), from working pixel (40, 60)
    scale, translate = labels_geometry(image, 2.0, (40, 60))
    labels = viewer.add_labels(region, name="slide labels", scale=scale, translate=translate)
    write_classes(labels, NAMES, COLORS)
    dock = ExportWidget(viewer)
    assert (dock.image_combo.layer() or dock._image_for(labels)) is image
    expected = np.zeros((180, 260), np.uint8)
    expected[40:130, 60:190] = region
    suffix = {"ome-tiff": ".ome.tif", "geojson": ".geojson"}[fmt]
    result = _export(qtbot, dock, tmp_path / f"region{suffix}", fmt)
    assert not isinstance(result, BaseException), result
    if fmt == "geojson":
        doc = json.loads(result.read_text())
        back = rasterize(doc["features"], expected.shape, doc["properties"]["class_names"], scale=(2.0, 2.0))
        np.testing.assert_array_equal(back, expected)  # level-0 coordinates of the image
    else:
        np.testing.assert_array_equal(np.asarray(open_label_store(result, writable=False).array[:]), expected)


def test_file_save_of_a_segmented_region_keeps_the_image_coordinates(make_napari_viewer, tmp_path):
    from types import SimpleNamespace

    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import LabelStore
    from napari_uhrseg.widgets._layers import add_or_update_labels

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((360, 520), np.uint8), name="slide")
    region = _scene_labels()[:90, :130]
    result = SimpleNamespace(store=LabelStore(region.copy()), downsample=2.0, store_origin=(40, 60))
    labels = add_or_update_labels(viewer, image, result, class_names=NAMES)
    assert labels.metadata["uhrseg_frame"] == {"shape": [180, 260], "origin": [40, 60]}
    viewer.layers.selection.active = labels
    path = tmp_path / "saved.geojson"
    assert viewer.layers.save(str(path), selected=True, plugin="napari-uhrseg") == [str(path)]
    expected = np.zeros((180, 260), np.uint8)
    expected[40:130, 60:190] = region
    doc = json.loads(path.read_text())
    np.testing.assert_array_equal(rasterize(doc["features"], expected.shape, NAMES, scale=(2.0, 2.0)), expected)
    whole = SimpleNamespace(store=LabelStore(np.zeros((180, 260), np.uint8)), downsample=2.0, store_origin=(0, 0))
    assert "uhrseg_frame" not in add_or_update_labels(viewer, image, whole).metadata  # the next run: whole level
