"""The main job, end to end: ``python -m napari_uhrseg.demo [--headless --out demo_out]`` (``make demo``).

Opens the sample scene in napari with the plugin's docks, segments it with the starter GRNet checkpoint through
the Segment dock, and shows the labels and the PPN patches. With ``--headless`` (no display: ``make demo`` runs
it under Xvfb) it also writes to ``--out``:

- ``labels.ome.tif`` and ``labels.geojson`` (QuPath polygons, level-0 pixels), via ``export_labels``;
- ``ppn_patches.geojson`` (the patches PPN scored, level-0 pixels, with probability and selection);
- ``metrics.json`` (mIoU, per-class IoU, mBA against the scene's exact ground truth, plus timings);
- ``screenshot.png`` (the viewer with its docks), then exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PLUGIN = "napari-uhrseg"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m napari_uhrseg.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--headless", action="store_true", help="write the outputs and a screenshot, then exit")
    p.add_argument("--out", default="demo_out", help="output folder for --headless (default demo_out)")
    p.add_argument("--method", default="grnet", help="method (default grnet)")
    p.add_argument("--checkpoint", default=None, help="checkpoint (default: the method's starter)")
    p.add_argument("--level", type=int, default=0, help="working level (default 0)")
    p.add_argument("--window", type=int, default=None, help="window side in px (default: the method's)")
    p.add_argument("--region", default=None, help="y0,x0,y1,x1 in level-0 px (default: the whole scene)")
    p.add_argument("--sample-folder", default=None, help="folder with the sample scene (default sample_data/)")
    return p.parse_args(argv)


def main(argv=None, *, viewer=None) -> int:
    """Run the demo; ``viewer`` lets a test pass its own (headless) napari viewer."""
    args = parse_args(argv)
    from napari_uhrseg.errors import UhrsegError

    try:
        return run(args, viewer=viewer)
    except UhrsegError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2


def run(args, *, viewer=None) -> int:
    import napari

    from napari_uhrseg.cli.segment import parse_region, starter_checkpoint
    from napari_uhrseg.errors import CheckpointError
    from napari_uhrseg.synthetic import sample_scene_paths

    checkpoint = args.checkpoint or starter_checkpoint(args.method)
    if checkpoint is None:
        raise CheckpointError(
            f"No starter checkpoint for {args.method!r} is installed (napari_uhrseg/starters/): train one with "
            f"`uhrseg train --method {args.method} ...` (see docs/methods/grnet.md) and pass --checkpoint PATH."
        )
    paths = sample_scene_paths(args.sample_folder)
    own_viewer = viewer is None
    if own_viewer:
        viewer = napari.Viewer(title="napari-uhrseg demo", show=not args.headless)
    image_layer, truth_layer = open_scene(viewer, paths)
    docks = add_plugin_docks(viewer)
    seg = docks.get("Segment")
    if seg is None:
        from napari_uhrseg.widgets.segment import SegmentWidget

        seg = SegmentWidget(viewer)
        viewer.window.add_dock_widget(seg, name="Segment")
    configure(seg, image_layer, args, str(checkpoint), parse_region(args.region))
    if not args.headless:
        seg.finished.connect(lambda r: print(_describe(r), flush=True))
        seg.segment(sync=False)
        napari.run()
        return 0

    result = seg.segment(sync=True)
    if result is None or isinstance(result, Exception):
        print(f"demo: segmentation failed: {seg.status.text()}", file=sys.stderr)
        return 1
    summary = write_outputs(Path(args.out), viewer, image_layer, truth_layer, seg, result, paths)
    print(json.dumps(summary, indent=2))
    if own_viewer:
        viewer.close()
    return 0


def open_scene(viewer, paths):
    """The sample scene through the plugin's sample-data contribution: (image layer, ground-truth layer)."""
    from napari_uhrseg._sample_data import SCENE_NAME

    viewer.open_sample(PLUGIN, "scene")
    image = viewer.layers[SCENE_NAME]
    truth = viewer.layers[f"{SCENE_NAME} ground truth"]
    truth.visible = False  # the demo is about the prediction; the truth is one click away
    return image, truth


def add_plugin_docks(viewer) -> dict:
    """Every dock the manifest declares, by display name; a dock that fails to build is reported, not fatal."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    manifest = pm.get_manifest(PLUGIN)
    docks = {}
    for contrib in manifest.contributions.widgets or []:
        try:
            _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, contrib.display_name)
            docks[contrib.display_name] = widget
        except Exception as exc:  # noqa: BLE001 - one broken dock must not stop the demo
            print(f"demo: the {contrib.display_name} dock could not be added: {exc}", file=sys.stderr)
    return docks


def configure(seg, image_layer, args, checkpoint: str, region) -> None:
    """Set the Segment dock's choices as a user would."""
    seg.image_combo.set_layer(image_layer)
    seg.method_combo.setCurrentText(args.method)
    seg.set_checkpoint(checkpoint)
    seg.level_spin.setValue(args.level)
    if args.window:
        seg.window_spin.setValue(args.window)
    else:
        seg.window_spin.setValue(_method_window(args.method, checkpoint))
    if region is not None:
        seg.region_combo.setCurrentText("Drawn box")
        y0, x0, y1, x1 = region
        box = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) - 0.5
        world = np.array([image_layer.data_to_world(v) for v in box])
        layer = seg.viewer.add_shapes([world], shape_type="rectangle", name="demo region", face_color="transparent",
                                      edge_color="white")
        seg.box_combo.set_layer(layer)


def _method_window(method: str, checkpoint: str) -> int:
    """The window the checkpoint was trained at (GRNet records it), else the engine default."""
    from napari_uhrseg.engine.segment import DEFAULT_WINDOW
    from napari_uhrseg.methods.base import read_checkpoint_meta

    try:
        return int(read_checkpoint_meta(checkpoint).get("window", DEFAULT_WINDOW))
    except Exception:  # noqa: BLE001 - the dock reports a bad checkpoint itself
        return DEFAULT_WINDOW


def write_outputs(out: Path, viewer, image_layer, truth_layer, seg, result, paths) -> dict:
    """Labels, patches, metrics and a screenshot into ``out``; returns the summary written as metrics.json."""
    from napari_uhrseg.engine.overlays import write_overlays
    from napari_uhrseg.io.export import export_labels
    from napari_uhrseg.io.pyramid import open_pyramid

    out.mkdir(parents=True, exist_ok=True)
    pyr = open_pyramid(paths["image"])
    names = list(seg._method.class_names)
    common = dict(class_names=names, pixel_size=pyr.pixel_size, pixel_unit=pyr.pixel_unit,
                  downsample=result.downsample)
    t0 = time.perf_counter()
    files = {
        "labels_ome_tiff": export_labels(result.store, out / "labels.ome.tif", **common),
        "labels_geojson": export_labels(result.store, out / "labels.geojson", **common),
        "ppn_patches": write_overlays(result.overlays, out / "ppn_patches.geojson"),
    }
    export_s = time.perf_counter() - t0
    uncertainty_file = _save_uncertainty(out / "labels.ome.tif", image_layer, pyr)
    if uncertainty_file is not None:  # MagNet: the heat map next to the labels, as `uhrseg segment` writes it
        files["uncertainty"] = uncertainty_file
    metrics = scene_metrics(result, np.asarray(truth_layer.data), seg._method)
    truth_names = list(truth_layer.metadata.get("class_names") or [])
    metrics["classes_match_ground_truth"] = truth_names == list(seg._method.class_names)
    if not metrics["classes_match_ground_truth"]:
        print(f"demo: the checkpoint's classes {list(seg._method.class_names)} are not the scene's {truth_names}: "
              "the metrics compare label numbers only.", file=sys.stderr)
    files["screenshot"] = screenshot(viewer, image_layer, out / "screenshot.png")
    summary = {
        **result.summary(),
        "device_name": seg.device_label.text(),
        "checkpoint": seg.checkpoint_path(),
        "metrics": metrics,
        "export_s": round(export_s, 3),
        "files": {k: str(v) for k, v in files.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_uncertainty(labels_path: Path, image_layer, pyr):
    """The whole-image MagNet uncertainty map the Segment dock assembled, written next to ``labels_path``
    (``<stem>_uncertainty.tif``); None after a run of another method."""
    from napari_uhrseg.methods.magnet import save_uncertainty
    from napari_uhrseg.widgets import uncertainty

    maps = uncertainty.maps_for(image_layer)
    if maps is None or uncertainty.FINAL not in maps.names:
        return None
    return save_uncertainty(labels_path, maps.map(uncertainty.FINAL), pyr.pixel_size, pyr.pixel_unit)


def scene_metrics(result, truth: np.ndarray, method) -> dict:
    """mIoU / per-class IoU / mBA of the run against the ground truth, compared at level 0 over the region.

    The labels are at the working level; each label pixel is repeated over the level-0 pixels it covers."""
    from napari_uhrseg.engine.segment import downsample_pair
    from napari_uhrseg.metrics import evaluate

    pred = np.asarray(result.store.array[:])
    dy, dx = downsample_pair(result.downsample)
    y0, x0, y1, x1 = (int(round(v)) for v in result.region_level0)
    y1, x1 = min(y1, truth.shape[0]), min(x1, truth.shape[1])
    rows = np.minimum(((np.arange(y0, y1) + 0.5) / dy).astype(int) - result.store_origin[0], pred.shape[0] - 1)
    cols = np.minimum(((np.arange(x0, x1) + 0.5) / dx).astype(int) - result.store_origin[1], pred.shape[1] - 1)
    pred0 = pred[np.ix_(rows, cols)]
    ignore = getattr(method, "ignore_index", None)
    scores = evaluate(pred0, truth[y0:y1, x0:x1], num_classes=len(method.class_names), ignore_index=ignore)
    scores["class_names"] = list(method.class_names)
    scores["ignore_index"] = ignore
    return scores


def screenshot(viewer, image_layer, path: Path) -> Path:
    """The whole viewer window (canvas and docks) as PNG."""
    from skimage.io import imsave

    viewer.window.show()
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    imsave(path, shot, check_contrast=False)
    return path


def _describe(result) -> str:
    if isinstance(result, Exception):
        return f"demo: segmentation failed: {result}"
    return json.dumps(result.summary())


if __name__ == "__main__":
    sys.exit(main())
