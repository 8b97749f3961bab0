"""export_labels: every format re-opened and compared exactly; streaming; atomic writes; clear errors."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_uhrseg.errors import ExportError
from napari_uhrseg.io import export as export_mod
from napari_uhrseg.io import geojson
from napari_uhrseg.io.export import export_labels
from napari_uhrseg.io.labels import create_label_store, open_label_store
from napari_uhrseg.io.pyramid import open_pyramid

NAMES = ["unlabelled", "urban", "water", "forest"]


def _labels(shape=(1100, 1300), classes=4, seed=0, dtype=np.uint8):
    """Blobs of several classes with holes, islands in holes and diagonal contacts."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (shape[0] // 37 + 1, shape[1] // 37 + 1))
    lab = ndimage.zoom(coarse, 37, order=0)[: shape[0], : shape[1]].astype(dtype)
    if min(shape) > 310:
        lab[90:210, 90:210] = 0
        lab[100:200, 100:200] = 1  # spans two strips in `small_strips`: must still be one polygon
        lab[130:170, 130:170] = 0  # a hole
        lab[145:155, 145:155] = 1  # an island in the hole
        lab[299:303, 299:303] = 0
        lab[300, 300] = 2
        lab[301, 301] = 2  # diagonal contact only
    return lab


@pytest.fixture
def small_strips(monkeypatch):
    """Force many strips so that seams between strips are exercised."""
    monkeypatch.setattr(export_mod, "STRIP_BYTES", 1)
    monkeypatch.setattr(export_mod, "TILE", 64)
    monkeypatch.setattr(export_mod, "COARSEST_SIDE", 128)


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr", ".png"])
def test_raster_formats_round_trip_exactly(tmp_path, small_strips, suffix):
    lab = _labels()
    out = export_labels(lab, tmp_path / f"labels{suffix}", class_names=NAMES, pixel_size=(0.25, 0.25), downsample=2)
    store = open_label_store(out)
    np.testing.assert_array_equal(np.asarray(store.array), lab)
    assert store.class_names == NAMES and len(store.class_colors) == 4
    if suffix != ".png":
        pyr = open_pyramid(out)
        assert len(pyr.levels) >= 3 and pyr.pixel_size == (0.5, 0.5)  # label pixel = 2 level-0 pixels
        for k in range(1, len(pyr.levels)):  # nearest: every 2^k-th row and column, never averaged
            np.testing.assert_array_equal(np.asarray(pyr.levels[k]), lab[:: 2**k, :: 2**k])


def test_uint16_labels_round_trip_in_every_raster_format(tmp_path):
    lab = _labels((300, 400), classes=3).astype(np.uint16) * 400
    for suffix in (".ome.tif", ".ome.zarr", ".png"):
        store = open_label_store(export_labels(lab, tmp_path / f"l{suffix}"))
        np.testing.assert_array_equal(np.asarray(store.array).astype(np.uint16), lab)


def test_ome_tiff_is_a_tiled_subifd_pyramid_with_ome_class_table(tmp_path, small_strips):
    out = export_labels(_labels(), tmp_path / "l.ome.tif", class_names=NAMES, pixel_size=(0.5, 0.5))
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled and len(tif.pages[0].subifds) >= 2
        xml = tif.ome_metadata
    assert 'PhysicalSizeX="0.5"' in xml and "napari-uhrseg/class-names" in xml and ">water<" in xml


def test_ome_zarr_has_image_label_metadata(tmp_path):
    import zarr

    out = export_labels(_labels((400, 500)), tmp_path / "l.ome.zarr", class_names=NAMES,
                        class_colors=[(0, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 0)])
    attrs = zarr.open_group(str(out), mode="r").attrs.asdict()
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert attrs["image-label"]["colors"][2] == {"label-value": 2, "rgba": [0, 0, 255, 255]}
    assert {"label-value": 3, "class": "forest"} in attrs["image-label"]["properties"]


def _rasterise(path, shape, scale=(1.0, 1.0)):
    fc = json.loads(path.read_text())
    return fc, geojson.rasterize(fc["features"], shape, fc["properties"]["class_names"], scale=scale)


def test_geojson_is_exact_qupath_polygons_with_holes(tmp_path, small_strips):
    lab = _labels()
    out = export_labels(lab, tmp_path / "l.geojson", class_names=NAMES)
    fc, back = _rasterise(out, lab.shape)
    np.testing.assert_array_equal(back, lab)  # exact: no boundary tolerance needed
    assert fc["type"] == "FeatureCollection"
    for f in fc["features"]:
        assert f["properties"]["objectType"] == "annotation"
        cls = f["properties"]["classification"]
        assert cls["name"] in NAMES[1:] and len(cls["color"]) == 3
        assert f["geometry"]["type"] == "Polygon"
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 5
    def bbox(f):
        ring = np.asarray(f["geometry"]["coordinates"][0])
        return (*ring.min(axis=0).tolist(), *ring.max(axis=0).tolist())

    # The square with a hole is one polygon with one interior ring; its island is a polygon of its own.
    square = [f for f in fc["features"] if bbox(f) == (100, 100, 200, 200)]
    assert len(square) == 1 and len(square[0]["geometry"]["coordinates"]) == 2
    assert bbox(square[0]) and [f for f in fc["features"] if bbox(f) == (145, 145, 155, 155)]
    # Pixels touching only at a corner are two polygons.
    assert [f for f in fc["features"] if bbox(f) == (300, 300, 301, 301)]
    assert [f for f in fc["features"] if bbox(f) == (301, 301, 302, 302)]


def test_geojson_coordinates_are_level0_pixels(tmp_path):
    lab = np.zeros((50, 60), np.uint8)
    lab[10:20, 5:15] = 1
    out = export_labels(lab, tmp_path / "l.geojson", downsample=4.0)
    fc, back = _rasterise(out, lab.shape, scale=(4.0, 4.0))
    xs = [p[0] for p in fc["features"][0]["geometry"]["coordinates"][0]]
    ys = [p[1] for p in fc["features"][0]["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (20, 60, 40, 80)
    np.testing.assert_array_equal(back, lab)


def test_rasterize_agrees_with_skimage_and_takes_any_polygon(tmp_path):
    """The parity fill of pixel-edge polygons gives what skimage's centre test gives; other polygons (a QuPath
    triangle, a shape crossing the image border) still go through skimage."""
    from skimage.draw import polygon as fill

    lab = _labels((330, 350), seed=3)
    fc = json.loads(export_labels(lab, tmp_path / "l.geojson", class_names=NAMES).read_text())
    by_skimage = np.zeros(lab.shape, np.uint8)
    for f in fc["features"]:
        (y0, x0), mask = geojson._fill_rings([np.asarray(r, float) for r in f["geometry"]["coordinates"]], lab.shape)
        by_skimage[mask] = NAMES.index(f["properties"]["classification"]["name"])
    np.testing.assert_array_equal(by_skimage, lab)
    np.testing.assert_array_equal(geojson.rasterize(fc["features"], lab.shape, NAMES), lab)

    def feat(name, ring):
        return {"properties": {"classification": {"name": name}}, "geometry": {"coordinates": [ring]}}

    triangle = [[2.0, 3.0], [40.5, 3.0], [2.0, 30.0], [2.0, 3.0]]
    border = [[-5, 20], [70, 20], [70, 45], [-5, 45], [-5, 20]]  # pixel edges, partly outside a 60 x 64 image
    out = geojson.rasterize([feat("urban", triangle), feat("water", border)], (60, 64), NAMES)
    expected = np.zeros((60, 64), np.uint8)
    rr, cc = fill(np.array([3.0, 3.0, 30.0]) - 0.5, np.array([2.0, 40.5, 2.0]) - 0.5, expected.shape)
    expected[rr, cc] = 1
    expected[20:45, :] = 2
    np.testing.assert_array_equal(out, expected)


def test_exports_stream_in_strips(tmp_path, small_strips):
    """No exporter reads more than one strip of rows at a time (bounded memory whatever the size)."""
    lab = _labels((700, 900))

    class Watched:
        shape, dtype, rows = lab.shape, lab.dtype, []

        def __getitem__(self, item):
            Watched.rows.append(item[0].stop - item[0].start)
            return lab[item]

    for suffix in (".ome.tif", ".ome.zarr", ".geojson"):
        Watched.rows = []
        export_labels(Watched(), tmp_path / f"w{suffix}")
        assert max(Watched.rows) == export_mod.strip_height(900, 1) < lab.shape[0]


def test_png_refuses_what_it_cannot_hold(tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="65536 classes"):
        export_labels(np.full((20, 20), 70000, np.int32), tmp_path / "a.png")
    monkeypatch.setattr(export_mod, "PNG_MAX_PIXELS", 100)
    with pytest.raises(ExportError, match="too large for PNG"):
        export_labels(np.zeros((20, 20), np.uint8), tmp_path / "b.png")
    assert not list(tmp_path.iterdir())


def test_errors_are_export_errors_and_keep_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "l.geojson"
    export_labels(_labels((64, 64)), target)
    before = target.read_bytes()

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "write_geojson", disk_full)
    with pytest.raises(ExportError, match="disk is full"):
        export_labels(_labels((64, 64), seed=1), target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["l.geojson"]
    monkeypatch.undo()

    real_replace = os.replace

    def no_permission(src, dst):
        if str(dst) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_permission)
    with pytest.raises(ExportError, match="No permission"):
        export_labels(_labels((64, 64), seed=1), target)
    assert target.read_bytes() == before
    with pytest.raises(ExportError, match="does not exist"):
        export_labels(_labels((64, 64)), tmp_path / "missing" / "l.png")
    with pytest.raises(ExportError, match="format"):
        export_labels(_labels((64, 64)), tmp_path / "l.bmp")
    with pytest.raises(ExportError, match="2-D integer"):
        export_labels(np.zeros((8, 8), np.float32), tmp_path / "l.png")


@pytest.mark.parametrize("suffix", [".ome.tif", ".png", ".geojson", ".ome.zarr"])
def test_an_export_never_deletes_a_folder_of_the_users(tmp_path, suffix):
    """A folder at the export's name, with the user's files in it, is left as it was: a file never replaces a
    folder, and a store replaces only a zarr store (or an empty folder)."""
    labels = np.zeros((64, 64), np.uint8)
    labels[8:40, 8:40] = 1
    target = tmp_path / f"mine{suffix}"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is a folder"):
        export_labels(labels, target, class_names=["bg", "a"])
    assert (target / "notes.txt").read_text() == "keep me" and sorted(os.listdir(target)) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left behind


def test_ome_zarr_replaces_an_existing_store_atomically(tmp_path):
    target = tmp_path / "l.ome.zarr"
    export_labels(np.ones((100, 100), np.uint8), target)
    export_labels(np.full((100, 100), 2, np.uint8), target)
    np.testing.assert_array_equal(np.asarray(open_label_store(target).array), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.ome.zarr"]


_KILL_SCRIPT = """
import sys, time, numpy as np
from pathlib import Path
from napari_uhrseg.io import export as ex
ex.STRIP_BYTES = 1; ex.TILE = 64
lab = np.random.default_rng(0).integers(0, 3, (2000, 2000)).astype(np.uint8)
def progress(done, total):
    if done > total // 3:
        Path(sys.argv[2]).write_text("midway")
        time.sleep(60)
ex.export_labels(lab, sys.argv[1], progress=progress)
"""


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_killed_export_leaves_the_previous_file_intact(tmp_path, suffix):
    target = tmp_path / f"labels{suffix}"
    previous = _labels((200, 300))
    export_labels(previous, target)
    flag = tmp_path / "midway.flag"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target), str(flag)])
    try:
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the export never reached the middle"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    np.testing.assert_array_equal(np.asarray(open_label_store(target).array), previous)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers  # the killed process's temporary file is there...
    export_labels(previous, target)  # ...and the next export of the same target removes it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_from_store_and_cli(tmp_path, capsys):
    from napari_uhrseg.cli import main

    store = create_label_store((120, 150), path=tmp_path / "s.zarr", class_names=["bg", "a", "b"])
    lab = _labels((120, 150), classes=3)
    store.write_window(0, 0, lab)
    out = export_labels(store, tmp_path / "from_store.ome.tif")
    assert open_label_store(out).class_names == ["bg", "a", "b"]
    code = main(["export", str(tmp_path / "s.zarr"), "-o", str(tmp_path / "cli.geojson"), "--classes", "bg,x,y",
                 "--pixel-size", "0.5"])
    assert code == 0 and str(tmp_path / "cli.geojson") in capsys.readouterr().out
    fc, back = _rasterise(tmp_path / "cli.geojson", lab.shape)
    np.testing.assert_array_equal(back, lab)
    assert fc["properties"]["class_names"] == ["bg", "x", "y"] and fc["properties"]["pixel_size"] == [0.5, 0.5]
    code = main(["export", str(tmp_path / "cli.geojson"), "-o", str(tmp_path / "x.png")])
    assert code == 2 and "not a label file" in capsys.readouterr().err


def test_cli_export_of_a_segmented_region_keeps_the_image_coordinates(tmp_path, capsys):
    # `uhrseg segment --level 1 --region ... -o OUT.zarr` records the region's origin and downsample; exporting
    # that store must put its objects where they lie on the image (GeoJSON in level-0 pixels, rasters padded
    # above and left), not at the image's corner and at the working level's scale.
    import tifffile

    from napari_uhrseg.cli import main
    from napari_uhrseg.io.geojson import rasterize

    image = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(256, 256))
    store_path = tmp_path / "reg.zarr"
    assert main(["segment", str(tmp_path / "img.tif"), "--level", "1", "--region", "100,200,500,600",
                 "-o", str(store_path), "--quiet"]) == 0
    store = open_label_store(store_path)
    assert store.info["origin"] == [50, 100] and store.info["downsample"] == [2.0, 2.0]
    region = np.asarray(store.array[:])
    capsys.readouterr()
    assert main(["export", str(store_path), "-o", str(tmp_path / "reg.geojson")]) == 0
    doc = json.loads((tmp_path / "reg.geojson").read_text())
    names = doc["properties"]["class_names"]
    assert names == store.class_names
    back = rasterize(doc["features"], (300, 400), names, scale=(2.0, 2.0))  # level-1 frame, level-0 coordinates
    expected = np.zeros((300, 400), region.dtype)
    expected[50:250, 100:300] = region
    np.testing.assert_array_equal(back, expected)
    assert main(["export", str(store_path), "-o", str(tmp_path / "reg.ome.tif")]) == 0
    np.testing.assert_array_equal(np.asarray(open_label_store(tmp_path / "reg.ome.tif").array[:]),
                                  expected[:250, :300])
