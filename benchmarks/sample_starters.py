"""The shipped starter checkpoints on the sample scene (what `make demo` and a first Segment press use), in one
run on the same held-out windows: GRNet/PPN (its stored selection rule; beside it the same number of patches
ranked by the G-branch's doubt, the G-branch alone and every patch refined), the MagNet backbone alone, MagNet
and MagNet-Fast.

Held out: the bottom 15 % of the 3072² sample scene (rows 2612–3071; ``SAMPLE_SCENE``), as three 1024 × 460
windows. The GRNet starter trained on the rows above them; the MagNet starter on the top-left 2048² of the same
scene (the generator is coordinate-based, so ``--scene-size 2048`` is exactly that corner), so neither saw these
pixels. mIoU over the 5 classes (0 = "background" is a real class here), pooled confusion matrix; seconds per
window (wall clock of ``predict`` after one warm-up call); the share of each model's label errors that fall in
the 10 % most uncertain pixels of each window (1 − (p_top1 − p_top2)), with the best possible share
``min(1, 10 % / error rate)``. A model made for windows narrower than a held-out window (its checkpoint's
``window``) predicts it as side-by-side tiles of its own width (without the engine's overlap); the seconds are
the tiles' sum.

    python benchmarks/sample_starters.py --threads 2 --json bench_out/sample_starters.json
    python benchmarks/sample_starters.py --grnet bench_out/grnet_candidate.pt   # a candidate against the rest
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import napari_uhrseg` sets it, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_uhrseg.cli.segment import build_method, set_selection  # noqa: E402
from napari_uhrseg.methods.magnet import certainty_map  # noqa: E402
from napari_uhrseg.metrics import ConfusionMatrix  # noqa: E402
from napari_uhrseg.synthetic import SAMPLE_SCENE, SyntheticScene  # noqa: E402

CONFIGS = ("grnet", "grnet-doubt", "grnet-global", "grnet-all", "backbone", "magnet", "magnet-fast")
GRNET_MODES = {"grnet-global": "global", "grnet-all": "all"}  # the G-branch alone; every patch refined
TOP_SHARE = 0.10
HELD_OUT_FRACTION = 0.15
WINDOW = 1024


def held_out_windows(scene: SyntheticScene, window: int = WINDOW) -> list[tuple[int, int, int, int]]:
    """(y0, x0, h, w) windows tiling the scene's bottom ``HELD_OUT_FRACTION`` of rows."""
    height, width = scene.shape
    y0 = int(round(height * (1 - HELD_OUT_FRACTION)))
    return [(y0, x0, height - y0, min(window, width - x0)) for x0 in range(0, width, window)]


def predict(name: str, methods: dict, rgb: np.ndarray) -> np.ndarray:
    if name == "backbone":
        return methods["magnet"].backbone_only(rgb)
    method = methods[name]
    tile = int(getattr(method, "window_size", 0) or WINDOW)
    if rgb.shape[1] <= tile and rgb.shape[0] <= tile:
        return method.predict(rgb).probabilities
    rows = [method_tiles(method, rgb[y0 : y0 + tile], tile) for y0 in range(0, rgb.shape[0], tile)]
    return np.concatenate(rows, axis=1)


def method_tiles(method, strip: np.ndarray, tile: int) -> np.ndarray:
    """Probabilities of a strip predicted as side-by-side tiles of ``tile`` px."""
    return np.concatenate([method.predict(strip[:, x0 : x0 + tile]).probabilities
                           for x0 in range(0, strip.shape[1], tile)], axis=2)


def errors_in_top_area(labels, gt, uncertainty, share: float = TOP_SHARE) -> tuple[int, int, int]:
    """(errors inside the ``share`` most uncertain pixels, all errors, pixels)."""
    errors = labels != gt
    threshold = np.quantile(uncertainty, 1.0 - share)
    return int((errors & (uncertainty >= threshold)).sum()), int(errors.sum()), int(gt.size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--grnet", help="GRNet checkpoint (default: the shipped starter)")
    p.add_argument("--magnet", help="MagNet checkpoint, for MagNet, MagNet-Fast and the backbone (default: the starter)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scene = SyntheticScene(SAMPLE_SCENE["size"], seed=SAMPLE_SCENE["seed"], num_classes=SAMPLE_SCENE["num_classes"])
    checkpoints = {"grnet": args.grnet, "magnet": args.magnet, "magnet-fast": args.magnet}
    methods = {name: build_method(name, ckpt, "cpu") for name, ckpt in checkpoints.items()}
    methods.update({name: build_method("grnet", args.grnet, "cpu", mode=mode) for name, mode in GRNET_MODES.items()})
    # the stored rule's k, the patches ranked by the G-branch's doubt instead of PPN (the fast preset's default)
    methods["grnet-doubt"] = build_method("grnet", args.grnet, "cpu")
    set_selection(methods["grnet-doubt"], scorer="uncertainty")
    windows = held_out_windows(scene)
    data = []
    for y0, x0, h, w in windows:
        gt = scene.labels_window(y0, x0, h, w)
        data.append((scene.image_window(y0, x0, h, w, labels=gt), gt))
    for name in methods:  # warm-up: scripted refiner, thread pool, allocator
        predict(name, methods, data[0][0])
    n = scene.num_classes
    cms = {c: ConfusionMatrix(n) for c in CONFIGS}
    seconds = {c: [] for c in CONFIGS}
    inside = {c: [0, 0, 0] for c in CONFIGS}
    load_before = os.getloadavg()
    for (y0, x0, h, w), (rgb, gt) in zip(windows, data):
        for c in CONFIGS:
            t0 = time.perf_counter()
            probs = predict(c, methods, rgb)
            seconds[c].append(time.perf_counter() - t0)
            labels = probs.argmax(0).astype(np.uint8)
            cms[c].update(labels, gt)
            u = 1.0 - certainty_map(torch.from_numpy(np.ascontiguousarray(probs))).numpy()
            a, b, m = errors_in_top_area(labels, gt, u)
            inside[c] = [inside[c][0] + a, inside[c][1] + b, inside[c][2] + m]
            print(f"window y={y0} x={x0} ({h}×{w}) {c:12s} {seconds[c][-1]:6.2f} s  "
                  f"errors {b / m:6.1%}, in top-10% {a / max(b, 1):6.1%}", flush=True)
    load_after = os.getloadavg()
    results = {"scene": SAMPLE_SCENE, "windows": windows, "threads": args.threads, "classes": scene.class_names,
               "checkpoints": {k: v or "starter" for k, v in checkpoints.items()},
               "load_average_before": load_before, "load_average_after": load_after, "configs": {}}
    print(f"\n{'starter':12s} {'mIoU':>6s}  " + " ".join(f"{k[:8]:>8s}" for k in scene.class_names)
          + "  s/window  error rate  errors in top-10% (best possible)")
    for c in CONFIGS:
        miou, per_class = cms[c].miou()
        share = inside[c][0] / max(inside[c][1], 1)
        rate = inside[c][1] / max(inside[c][2], 1)
        best = min(1.0, TOP_SHARE / max(rate, 1e-9))
        results["configs"][c] = {"miou": miou, "per_class_iou": [float(v) for v in per_class],
                                 "seconds_per_window": float(np.mean(seconds[c])), "pixel_error_rate": rate,
                                 "errors_in_top10_uncertainty": share, "best_possible_share": best}
        print(f"{c:12s} {100 * miou:6.2f}  " + " ".join(f"{100 * v:8.1f}" for v in per_class)
              + f"  {np.mean(seconds[c]):8.2f}  {rate:10.1%}  {share:8.1%} ({best:.1%})")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
