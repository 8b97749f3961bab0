"""Screenshots for the user guide, taken from the real flow on the sample scene (``make docs-images``).

    python scripts/docs_images.py [--out docs/images] [--only refine,train] [--magnet-checkpoint PATH]

Opens a real napari viewer (under Xvfb when there is no display: ``make docs-images`` does that), opens the
sample scene through the plugin's sample-data contribution and the docks through its manifest, then, with the
shipped starter checkpoints (``src/napari_uhrseg/starters/``):

- ``segment.jpg``: the Segment dock after GRNet/PPN segmented the whole scene, labels and PPN patches shown;
- ``magnet-uncertainty.jpg``: the MagNet uncertainty heat map and its dock — only with a MagNet checkpoint
  (``--magnet-checkpoint``, else the shipped MagNet starter); skipped with a message, not faked, when there is none;
- ``refine-before.jpg`` / ``refine-after.jpg``: the Refine dock, a brush stroke over a ragged border, and the
  labels after *Refine* (the real CascadePSP starter);
- ``train.jpg``: the Train dock with its loss / validation curve after a short round on strokes painted from the
  scene's ground truth;
- ``export.jpg``: the Export dock after writing a pyramidal OME-TIFF.

Images are JPEG (quality 80, at most 1400 px wide): the set stays well under 2 MB. Checkpoints, autosaves and
exports go to a temporary folder, never into the user's. Exit status 0 when every shot that could be taken was.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-uhrseg"
WINDOW_SIZE = (1400, 900)  # fits the 1600 x 1000 Xvfb screen of the Makefile
DOCK_WIDTH = 430  # px: the rest of the window goes to the canvas
MAX_WIDTH = 1400
QUALITY = 80
SHOTS = ("segment", "refine", "train", "export", "magnet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the images (docs/images)")
    p.add_argument("--magnet-checkpoint", default=None, help="a MagNet or MagNet-Fast checkpoint for its shot")
    p.add_argument("--magnet-level", type=int, default=0, help="working level of the MagNet run (0)")
    p.add_argument("--iterations", type=int, default=30, help="training steps of the Train dock shot (30)")
    p.add_argument("--only", default=",".join(SHOTS), help=f"comma-separated shots to take (default all: {','.join(SHOTS)})")
    p.add_argument("--keep-open", action="store_true", help="leave the viewer open at the end (with a display)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers
def say(msg: str) -> None:
    print(f"docs-images: {msg}", flush=True)


def wait_for(signal, timeout: float = 900.0):
    """Run the Qt event loop until ``signal`` fires; its first argument (or None on timeout, with an error)."""
    from qtpy.QtCore import QEventLoop, QTimer

    got = []
    loop = QEventLoop()
    signal.connect(lambda *args: (got.append(args[0] if args else None), loop.quit()))
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    loop.exec()
    if not got:
        raise RuntimeError(f"timed out after {timeout:.0f} s")
    return got[0]


def settle(ms: int = 300) -> None:
    """Let napari draw (layers, docks, the camera) before a screenshot."""
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()
    QApplication.processEvents()


class Shots:
    """Saves compact JPEG screenshots of the whole window (canvas and docks)."""

    def __init__(self, viewer, out: Path):
        self.viewer, self.out, self.saved, self.skipped = viewer, out, [], []
        out.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> Path:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
        from PIL import Image

        for toast in self.viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()  # napari's pop-up notifications would cover the canvas
        settle()
        shot = self.viewer.screenshot(canvas_only=False, flash=False)
        img = Image.fromarray(np.asarray(shot)[..., :3])
        if img.width > MAX_WIDTH:
            img = img.resize((MAX_WIDTH, round(img.height * MAX_WIDTH / img.width)), Image.LANCZOS)
        path = self.out / name
        img.save(path, "JPEG", quality=QUALITY, optimize=True, progressive=True)
        self.saved.append(path)
        say(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size // 1024} KB)")
        return path

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        say(f"skipped {name}: {why}")


def show_only(viewer, docks: dict, name: str) -> None:
    """One dock visible on the right, the others hidden (the shot is about that dock), at ``DOCK_WIDTH``."""
    from qtpy.QtCore import Qt

    for key, (dock, _) in docks.items():
        dock.setVisible(key == name)
    dock = docks[name][0]
    settle(100)  # the window lays the dock out first; a resize before that is forgotten
    viewer.window._qt_window.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)


def look_at(viewer, layer, box_data, margin: float = 1.15) -> None:
    """Centre and zoom the camera on a (y0, x0, y1, x1) box in ``layer``'s data coordinates."""
    y0, x0, y1, x1 = box_data
    c = np.asarray(layer.data_to_world(((y0 + y1) / 2, (x0 + x1) / 2)), float)[-2:]
    corner = np.asarray(layer.data_to_world((y0, x0)), float)[-2:]
    far = np.asarray(layer.data_to_world((y1, x1)), float)[-2:]
    extent = np.abs(far - corner) * margin
    cam = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    cam.center = (float(c[0]), float(c[1]))
    native = viewer.window._qt_viewer.canvas.native
    canvas = np.array([native.height(), native.width()], float)
    cam.zoom = float(np.min(canvas / np.maximum(extent, 1e-9)))


def ragged_border(labels: np.ndarray, side: int, rng) -> tuple[int, int]:
    """A (y, x) on a border between two classes where the labels around (``side`` px) are most ragged.

    Places with label 0 around are avoided: the refiner treats 0 as "unlabelled", and the sample starter's
    class 0 is a real class ("background")."""
    h, w = labels.shape
    border = np.zeros_like(labels, bool)
    border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    border[1:] |= labels[1:] != labels[:-1]
    best, best_score = None, -1.0
    for _ in range(400):
        y, x = (int(v) for v in rng.integers(side, (h - side, w - side)))
        win = (slice(y - side // 2, y + side // 2), slice(x - side // 2, x + side // 2))
        if not border[y, x] or (labels[win] == 0).any():
            continue
        score = border[win].mean()
        if score > best_score:
            best, best_score = (y, x), score
    if best is None:
        ys, xs = np.nonzero(border)
        i = len(ys) // 2
        best = (int(ys[i]), int(xs[i]))
    return best


def paint_strokes(layer, truth, rng, *, per_class=3, length=240, radius=8) -> None:
    """Strokes a user would paint: inside each class region of ``truth``, value = class + 1 (0 = unlabelled)."""
    from scipy import ndimage as ndi

    layer.brush_size = 2 * radius + 1
    for k in np.unique(truth):
        deep = ndi.distance_transform_edt(truth == k) > radius + 2
        ok = ndi.minimum_filter1d(deep.astype(np.uint8), size=length, axis=1, origin=-(length // 2)) > 0
        ys, xs = np.nonzero(ok)
        if not ys.size:
            continue
        for i in rng.choice(ys.size, size=min(per_class, ys.size), replace=False):
            for x in range(xs[i], xs[i] + length, 3):
                layer.paint((ys[i], x), int(k) + 1, refresh=False)
    layer.refresh()


# ------------------------------------------------------------------------------------------------ the flow
def run(args) -> int:
    import napari

    from napari_uhrseg.cli.segment import starter_checkpoint

    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = wanted - set(SHOTS)
    if unknown:
        say(f"unknown shot(s) {', '.join(sorted(unknown))}: choose from {', '.join(SHOTS)}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="uhrseg-docs-"))
    os.environ["UHRSEG_CHECKPOINT_DIR"] = str(work / "checkpoints")  # never the user's folders
    os.environ["UHRSEG_AUTOSAVE_DIR"] = str(work / "autosave")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()

    viewer = napari.Viewer(title="napari-uhrseg")
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    shots = Shots(viewer, Path(args.out))
    viewer.open_sample(PLUGIN, "scene")
    image = viewer.layers["synthetic scene"]
    truth = viewer.layers["synthetic scene ground truth"]
    truth.visible = False
    names = ["Segment", "MagNet uncertainty", "Refine and click", "Train", "Export"]
    docks = {n: viewer.window.add_plugin_dock_widget(PLUGIN, n) for n in names}
    seg = docks["Segment"][1]
    labels = None

    # ---- 1. Segment: GRNet/PPN starter over the whole scene, PPN patches shown ---------------------------
    if wanted & {"segment", "refine", "export"}:
        show_only(viewer, docks, "Segment")
        seg.image_combo.set_layer(image)
        seg.method_combo.setCurrentText("grnet")
        seg.set_checkpoint(str(starter_checkpoint("grnet")))
        seg.level_spin.setValue(0)
        seg.region_combo.setCurrentText("Whole image")
        say("segmenting the sample scene with the GRNet/PPN starter (a minute or two on a CPU) …")
        result = seg.segment(sync=True)
        if result is None or isinstance(result, BaseException):
            say(f"segmentation failed: {seg.status.text()}")
            return 1
        labels = viewer.layers["synthetic scene labels"]
        viewer.layers.selection.active = labels
        viewer.reset_view()
        if "segment" in wanted:
            shots.take("segment.jpg")

    # ---- 2. Refine: a brush stroke over a ragged border, before and after -----------------------------------
    if "refine" in wanted:
        show_only(viewer, docks, "Refine and click")
        refine = docks["Refine and click"][1]
        refine.synchronous = True
        refine.image_combo.setCurrentText(image.name)
        refine.labels_combo.setCurrentText(labels.name)
        refine.level_spin.setValue(0)
        lab = np.asarray(labels.data)
        cy, cx = ragged_border(lab, 400, rng)
        viewer.layers["synthetic scene PPN patches"].visible = False  # the rectangles would hide the border
        brush = refine.activate_brush()
        brush.brush_size = 24
        brush.opacity = 0.8
        for x in range(cx - 90, cx + 91, 4):  # a stroke along the border, with a little wobble
            brush.paint((cy + int(8 * np.sin(x / 25.0)), x), 1, refresh=False)
        brush.refresh()
        look_at(viewer, labels, (cy - 160, cx - 240, cy + 160, cx + 240))
        shots.take("refine-before.jpg")
        before = lab.copy()
        refine.refine()
        say(f"refine: {refine.status.text()}")
        if not (np.asarray(labels.data) != before).any():
            say("refine changed no pixel: the before/after shots look alike")
        brush.visible = False
        shots.take("refine-after.jpg")

    # ---- 3. Train: strokes from the ground truth, a short round, the loss curve ------------------------------
    if "train" in wanted:
        show_only(viewer, docks, "Train")
        train = docks["Train"][1]
        class_names = ["unlabelled", *truth.metadata["class_names"]]
        strokes = viewer.add_labels(np.zeros(truth.data.shape, np.uint8), name="synthetic scene strokes",
                                    scale=truth.scale, translate=truth.translate)
        paint_strokes(strokes, np.asarray(truth.data), rng)
        if labels is not None:
            labels.visible = False
        train.image_combo.set_layer(image)
        train.labels_combo.set_layer(strokes)
        train.classes_edit.setText(", ".join(class_names))
        train.method_combo.setCurrentText("grnet")
        train.iterations.setValue(args.iterations)
        train.crop.setValue(256)
        train.live.setChecked(False)
        viewer.layers.selection.active = strokes
        ys, xs = np.nonzero(strokes.data[::8, ::8])
        sy, sx = int(np.median(ys)) * 8, int(np.median(xs)) * 8
        look_at(viewer, strokes, (sy - 700, sx - 700, sy + 700, sx + 700))
        say(f"training {args.iterations} steps in the Train dock …")
        # Hidden while it trains: under Xvfb, Mesa's software OpenGL re-composes the canvas on every repaint of
        # the window (progress bar, activity spinner), which took most of the CPU away from the training.
        viewer.window._qt_window.hide()
        train.start()
        outcome = wait_for(train.finished)
        viewer.window._qt_window.show()
        if isinstance(outcome, BaseException):
            say(f"training failed: {outcome}")
            return 1
        shots.take("train.jpg")
        strokes.visible = False

    # ---- 4. Export: a pyramidal OME-TIFF from the Export dock ----------------------------------------------
    if "export" in wanted:
        show_only(viewer, docks, "Export")
        labels.visible = True
        export = docks["Export"][1]
        export.labels_combo.set_layer(labels)
        export.image_combo.set_layer(image)
        export.set_format("ome-tiff")
        export.path_edit.setText(str(work / "synthetic_scene_labels.ome.tif"))
        viewer.layers.selection.active = labels
        viewer.reset_view()
        export.start_export()
        outcome = wait_for(export.finished)
        if isinstance(outcome, BaseException):
            say(f"export failed: {outcome}")
            return 1
        # The autosave offers to "restore" a snapshot of another labels layer of the same image (the strokes):
        # a spurious offer in this flow (reported), not what the shot is about.
        export._offer_restore(None)
        shots.take("export.jpg")

    # ---- 5. MagNet uncertainty: only with a real MagNet checkpoint; last, as its labels replace GRNet's ----
    if "magnet" in wanted:
        magnet_ckpt = args.magnet_checkpoint or starter_checkpoint("magnet") or starter_checkpoint("magnet-fast")
        if magnet_ckpt is None:
            shots.skip("magnet-uncertainty.jpg", "no MagNet checkpoint is installed: pass --magnet-checkpoint "
                       "PATH (train one with `uhrseg train --method magnet …`)")
        else:
            shots_magnet(viewer, docks, image, seg, Path(magnet_ckpt), args.magnet_level, shots)

    total = sum(p.stat().st_size for p in shots.saved)
    say(f"{len(shots.saved)} images, {total / 1e6:.2f} MB, in {time.perf_counter() - t0:.0f} s"
        + (f"; skipped: {', '.join(shots.skipped)}" if shots.skipped else ""))
    if args.keep_open:
        napari.run()
    viewer.close()
    return 0


def shots_magnet(viewer, docks, image, seg, checkpoint: Path, level: int, shots) -> None:
    """MagNet over the scene through the Segment dock; the uncertainty heat map with its dock."""
    from napari_uhrseg.methods.base import read_checkpoint_meta

    method = read_checkpoint_meta(checkpoint).get("method", "magnet")
    show_only(viewer, docks, "Segment")
    seg.image_combo.set_layer(image)
    seg.method_combo.setCurrentText(method)
    seg.set_checkpoint(str(checkpoint))  # the window spin follows the checkpoint's
    seg.level_spin.setValue(level)
    seg.region_combo.setCurrentText("Whole image")
    say(f"segmenting with {method} ({checkpoint.name}) at level {level} …")
    result = seg.segment(sync=True)
    if result is None or isinstance(result, BaseException):
        shots.skip("magnet-uncertainty.jpg", f"the MagNet run failed: {seg.status.text()}")
        return
    heat = next((lay for lay in viewer.layers if lay.name.endswith("MagNet uncertainty")), None)
    if heat is None:
        shots.skip("magnet-uncertainty.jpg", "the run made no uncertainty layer")
        return
    for lay in viewer.layers:
        lay.visible = lay is heat or lay is image
    show_only(viewer, docks, "MagNet uncertainty")
    docks["MagNet uncertainty"][1].refresh()
    viewer.layers.selection.active = heat
    viewer.reset_view()
    shots.take("magnet-uncertainty.jpg")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        say("no display: run it under Xvfb (`make docs-images` does), e.g. "
            'xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/docs_images.py')
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
