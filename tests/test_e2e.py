"""The whole annotation loop in one real viewer, through the plugin's own contributions:

sample scene (npe2 sample data) → strokes painted on a Labels layer → a short GRNet round in the Train dock →
the Segment dock with the checkpoint just trained → a brushed refinement in the Refine dock → click-to-segment
with a real mouse click on the canvas → every export format from the Export dock and from File › Save → every
file re-opened with the plugin's reader / label APIs and compared exactly with the layer.

Everything runs at pyramid level 2 of the 3072² sample scene (768² labels) with a 256 px crop and four
training steps, so that the loop takes seconds on one CPU thread; the real networks (the GRNet just trained and
the shipped CascadePSP refiner) do the work.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("private_folders")]

PLUGIN = "napari-uhrseg"
LEVEL = 2  # the working level of the whole loop: 768 x 768 px of the 3072² scene
CROP = 256


def _camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _strokes(layer, truth, rng, *, per_class=2, length=60, radius=4):
    """Paint horizontal strokes with ``Labels.paint`` (what napari's brush calls) well inside each class region
    of ``truth`` (level-2 ground truth): value = class + 1, since 0 means unlabelled. Returns the painted values."""
    layer.brush_size = 2 * radius + 1
    for k in np.unique(truth):
        deep = ndi.distance_transform_edt(truth == k) > radius + 2
        # stroke starts whose whole length stays inside the class
        ok = ndi.minimum_filter1d(deep.astype(np.uint8), size=length, axis=1, origin=-(length // 2)) > 0
        ys, xs = np.nonzero(ok)
        assert ys.size, f"class {k} has no room for a stroke"
        for i in rng.choice(ys.size, size=per_class, replace=False):
            for x in range(xs[i], xs[i] + length, 2):
                layer.paint((ys[i], x), int(k) + 1, refresh=False)
    layer.refresh()
    return np.unique(layer.data)


class _Laps:
    """Wall and CPU seconds per step, printed at the end (``pytest -s``) to show where the time goes."""

    def __init__(self):
        self.times, self._t, self._c = {}, time.perf_counter(), time.process_time()

    def __call__(self, step):
        now, cpu = time.perf_counter(), time.process_time()
        self.times[step] = (round(now - self._t, 1), round(cpu - self._c, 1))
        self._t, self._c = now, cpu


def _click_canvas(qtbot, viewer, world_yx):
    """A real left click on the canvas at a world position (the camera is centred there first)."""
    from qtpy.QtCore import QPoint, Qt

    cam = _camera(viewer)
    cam.center = (float(world_yx[0]), float(world_yx[1]))
    native = viewer.window._qt_viewer.canvas.native
    qtbot.wait(50)  # the canvas takes the new camera
    qtbot.mouseClick(native, Qt.LeftButton, Qt.NoModifier, QPoint(native.width() // 2, native.height() // 2))
    return np.asarray(viewer.cursor.position, float)


def test_the_annotation_loop_end_to_end(make_napari_viewer, qtbot, tmp_path):
    from napari_uhrseg._reader import get_reader
    from napari_uhrseg.io.geojson import rasterize
    from napari_uhrseg.io.labels import open_label_store
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.widgets._layers import labels_geometry
    from napari_uhrseg.widgets.refine import BRUSH_NAME
    from napari_uhrseg.widgets.state import get_state

    lap = _Laps()
    # Hidden until the click: with Mesa's software OpenGL a shown window re-composes the canvas on every repaint
    # (progress bars, napari's activity spinner), which made the training round cost nine times its CPU.
    viewer = make_napari_viewer()
    state = get_state(viewer)

    # ---- open the sample scene through the plugin's sample-data contribution, and the docks ---------------
    viewer.open_sample(PLUGIN, "scene")
    image = viewer.layers["synthetic scene"]
    truth_layer = viewer.layers["synthetic scene ground truth"]
    assert image.multiscale and image.data[0].shape[:2] == (3072, 3072)
    class_names = ["unlabelled", *truth_layer.metadata["class_names"]]  # 0 = unlabelled, then the scene's
    docks = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]
             for name in ("Train", "Segment", "Refine and click", "Export")}
    train, seg, refine, export = (docks[n] for n in ("Train", "Segment", "Refine and click", "Export"))
    viewer.window._qt_window.resize(1500, 950)  # room for four docks and the canvas (the Xvfb screen is 1600 wide)
    lap("open")

    # ---- paint strokes on a Labels layer at level 2 -------------------------------------------------------
    d = 2**LEVEL
    truth2 = np.asarray(truth_layer.data)[d // 2 :: d, d // 2 :: d]
    scale, translate = labels_geometry(image, d, (0, 0))
    scribbles = viewer.add_labels(np.zeros(truth2.shape, np.uint8), name="synthetic scene scribbles",
                                  scale=scale, translate=translate)
    painted = _strokes(scribbles, truth2, np.random.default_rng(0))
    assert set(painted.tolist()) == set(range(len(class_names)))  # every class has strokes, the rest is 0
    strokes = scribbles.data > 0
    assert 0.002 < strokes.mean() < 0.05  # strokes, not regions
    np.testing.assert_array_equal(scribbles.data[strokes], truth2[strokes] + 1)
    lap("paint")

    # ---- train a short round in the Train dock ------------------------------------------------------------
    train.image_combo.set_layer(image)
    train.labels_combo.set_layer(scribbles)
    train.classes_edit.setText(", ".join(class_names))
    train.method_combo.setCurrentText("grnet")
    train.iterations.setValue(4)
    train.crop.setValue(CROP)
    train.val_share.setValue(0.25)
    train.live.setChecked(False)
    with qtbot.waitSignal(train.finished, timeout=180000) as done:
        train.start_button.click()
    result = done.args[0]
    assert not isinstance(result, BaseException), result
    ckpt = result[0]
    assert ckpt.exists() and ckpt.parent == tmp_path / "checkpoints"
    weights, meta = load_checkpoint(ckpt, method="grnet", class_names=class_names)  # loads, right classes
    assert weights and meta["window"] == CROP
    assert len(train.curves.loss) == 4 and all(np.isfinite(v) for _, v in train.curves.loss)
    assert state.checkpoint == str(ckpt) and state.method == "grnet"
    lap("train")

    # ---- segment with the Segment dock, using the checkpoint just trained ---------------------------------
    assert seg.method_combo.currentText() == "grnet"
    assert seg.checkpoint_path() == str(ckpt)  # the open dock follows the shared checkpoint ...
    assert seg.window_spin.value() == CROP  # ... and segments with the window the model was made for
    seg.image_combo.set_layer(image)
    seg.level_spin.setValue(LEVEL)
    seg.region_combo.setCurrentText("Whole image")
    segmented = seg.segment(sync=True)
    assert segmented is not None and not isinstance(segmented, BaseException), seg.status.text()
    assert segmented.windows_done == segmented.windows_total > 1
    labels = viewer.layers["synthetic scene labels"]
    assert labels.data.shape == truth2.shape and not labels.multiscale
    assert set(np.unique(labels.data).tolist()) <= set(range(1, len(class_names)))  # every pixel has a class
    np.testing.assert_allclose(labels.scale, scale)  # on the image, like the strokes
    np.testing.assert_allclose(labels.translate, translate)
    patches = viewer.layers["synthetic scene PPN patches"]
    assert len(patches.data) == len(segmented.overlays) > 0
    lap("segment")

    # ---- refine a brushed region with the Refine dock -----------------------------------------------------
    refine.synchronous = True
    refine.image_combo.setCurrentText(image.name)
    refine.labels_combo.setCurrentText(labels.name)
    refine.level_spin.setValue(LEVEL)
    refine.brush_button.click()
    brush = viewer.layers[BRUSH_NAME]
    assert brush.data.shape == labels.data.shape and brush.mode == "paint"
    assert viewer.layers.selection.active is brush
    lab = np.asarray(labels.data)
    border = (lab[:, 1:] != lab[:, :-1])[:-1] | (lab[1:] != lab[:-1])[:, :-1]
    ys, xs = np.nonzero(border[200:568, 200:568])
    cy, cx = int(np.median(ys)) + 200, int(np.median(xs)) + 200  # a border pixel near the middle
    brush.brush_size = 25
    for x in range(cx - 20, cx + 21, 4):  # one stroke along it
        brush.paint((cy, x), 1, refresh=False)
    brushed = np.asarray(brush.data) > 0
    before = lab.copy()
    refine.refine_button.click()
    after = np.asarray(labels.data).copy()
    changed = after != before
    assert changed.any(), refine.status.text()
    assert not changed[~brushed].any()  # only brushed pixels change
    assert not np.asarray(brush.data).any()  # the brush is cleared for the next stroke
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)  # one undo step
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)
    lap("refine")

    # ---- click-to-segment: a real mouse click on the canvas, in click mode -------------------------------
    viewer.window.show()  # a real click needs a drawn canvas
    viewer.layers.selection.active = labels
    labels.mode = "paint"
    labels.selected_label = 3
    refine.click_button.click()
    assert refine.click_button.isChecked() and labels.mode == "pan_zoom"  # the click must not paint a dot too
    before = np.asarray(labels.data).copy()
    world = _click_canvas(qtbot, viewer, labels.data_to_world((300, 450)))
    after = np.asarray(labels.data).copy()
    changed = after != before
    assert changed.any(), refine.status.text()
    py, px = (int(round(v)) for v in np.asarray(labels.world_to_data(world))[-2:])
    assert after[py, px] == 3  # the clicked pixel has the current label ...
    comp, _ = ndi.label(after == 3)
    assert (comp[changed] == comp[py, px]).all()  # ... in one connected region holding every change
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)  # one undo step
    labels.redo()
    np.testing.assert_array_equal(labels.data, after)
    refine.click_button.click()
    assert refine._on_click not in viewer.mouse_drag_callbacks
    lap("click")

    # ---- export every format, from the Export dock and with File › Save (the plugin's writers) -------------
    expected = np.asarray(labels.data).copy()
    export.labels_combo.set_layer(labels)
    export.image_combo.set_layer(image)
    assert export.classes_edit.text() == ", ".join(class_names)
    written = {}
    for fmt, suffix in {"ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr", "png": ".png", "geojson": ".geojson"}.items():
        export.set_format(fmt)
        export.path_edit.setText(str(tmp_path / f"dock{suffix}"))
        with qtbot.waitSignal(export.finished, timeout=60000) as done:
            export.export_button.click()
        assert not isinstance(done.args[0], BaseException), done.args[0]
        written[("dock", fmt)] = done.args[0]
        viewer.layers.selection.active = labels
        saved = tmp_path / f"save{suffix}"
        assert viewer.layers.save(str(saved), selected=True, plugin=PLUGIN) == [str(saved)]
        written[("File › Save", fmt)] = saved
    lap("export")

    # ---- re-open every file and compare with the layer ---------------------------------------------------
    for (how, fmt), path in written.items():
        assert path.exists(), (how, fmt)
        if fmt == "geojson":
            doc = json.loads(path.read_text())
            assert doc["properties"]["class_names"] == class_names, how
            back = rasterize(doc["features"], expected.shape, class_names, scale=(d, d))  # level-0 coordinates
            np.testing.assert_array_equal(back, expected, err_msg=f"{how} {fmt}")
            continue
        store = open_label_store(path, writable=False)
        np.testing.assert_array_equal(np.asarray(store.array[:]), expected, err_msg=f"{how} {fmt}")
        assert store.class_names == class_names, (how, fmt)
        if fmt in ("ome-tiff", "ome-zarr"):
            reader = get_reader(str(path))
            assert reader is not None, (how, fmt)
            ((levels, kwargs, _),) = reader(str(path))
            np.testing.assert_array_equal(np.asarray(levels[0]), expected, err_msg=f"{how} {fmt} via the reader")
            # a label pixel is 4 level-0 pixels of 0.5 µm: its pixel size survives the round trip
            np.testing.assert_allclose(kwargs["scale"][-2:], (2.0, 2.0), err_msg=f"{how} {fmt}")
    lap("reopen")
    print("end-to-end seconds per step (wall, CPU):", lap.times)
