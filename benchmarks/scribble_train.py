"""Scribble training benchmark: one Train-dock round on the sample scene, frozen backbone with cached features,
against the same round without the cache (same crops, same losses, every backbone pass recomputed) and against
fine-tuning everything (the backbones learn too; fresh random crops every step).

Data: ``sample_data/scene.ome.tif`` (3072², five texture classes named in ``scene.json``). Scribbles are drawn
from the ground truth ``scene_labels.ome.tif``: ``--strokes`` random-walk strokes per class, ``--width`` px wide,
kept inside their class (the GT eroded by the stroke width), so they cover a small share of the pixels. A round is
what the Train dock runs when Start is pressed with its defaults (``TrainWidget`` default iterations, crop,
validation share; GRNet/PPN, ``fast`` preset): reading the painted region, building the model, the steps, the
validations (on the scribbles of the held-out bottom rows) and the checkpoints.

Figures per configuration: seconds per round (and the part spent before the first step), seconds per step,
validation mIoU (scribbles of the held-out rows, as the dock shows), held-out mIoU (the best checkpoint segments
the held-out bottom rows; every pixel scored against the dense ground truth), peak RSS, cache statistics. The
machine's load average is printed before and after: on a shared machine the times say as much about the others.

    .venv/bin/python benchmarks/scribble_train.py --threads 2 [--configs cached,uncached,finetune] [--json out.json]

Bar (issue 6): a round on the sample scene <= 60 s on 2 CPU cores in frozen-backbone mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("cached", "uncached", "finetune")
DOCK_DEFAULTS = {"iterations": 140, "crop": 512, "val_share": 0.15}  # TrainWidget's spin boxes


def scribbles_from_truth(gt: np.ndarray, *, strokes: int, width: int, length: int, seed: int) -> np.ndarray:
    """Label image (0 = unlabelled, class c -> c + 1) of random-walk strokes inside each class's regions."""
    import cv2
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = np.zeros(gt.shape, np.uint8)
    for c in np.unique(gt):
        inside = ndimage.binary_erosion(gt == c, iterations=width + 2)
        ys, xs = np.nonzero(inside)
        if ys.size == 0:
            continue
        canvas = np.zeros(gt.shape, np.uint8)
        for _ in range(strokes):
            i = int(rng.integers(ys.size))
            pts = [(float(xs[i]), float(ys[i]))]
            angle = rng.uniform(0, 2 * np.pi)
            for _ in range(length // 10):
                angle += rng.normal(0, 0.4)
                pts.append((pts[-1][0] + 10 * np.cos(angle), pts[-1][1] + 10 * np.sin(angle)))
            cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, 1, thickness=width)
        out[(canvas > 0) & inside] = c + 1
    return out


def run_config(name: str, pyramid, scribbles, gt, names, args) -> dict:
    import torch

    from napari_uhrseg.engine.scribbles import TrainingSettings, labelled_item, start_session
    from napari_uhrseg.engine.segment import segment_image
    from napari_uhrseg.metrics import ConfusionMatrix, RssSampler

    settings = TrainingSettings(iterations=args.iterations, crop=args.crop, val_share=args.val_share,
                                frozen_backbone=name != "finetune", feature_cache=name != "finetune",
                                crop_pool=args.pool, seed=args.seed, device="cpu",
                                **({"batch_size": args.batch_size} if args.batch_size else {}),
                                **({"lr": args.lr} if args.lr else {}))
    out = Path(tempfile.mkdtemp(prefix="scribble_bench_")) / f"{name}.pt"
    losses, vals = [], []
    with RssSampler() as rss:
        t0 = time.perf_counter()
        item = labelled_item(pyramid, scribbles, level=0, name="scene")
        session = start_session("grnet", [item], names, settings=settings, out=out)
        cache = getattr(session.trainer, "feature_cache", None)
        if cache is not None and name == "uncached":
            cache.enabled = False  # same pool of crops, every backbone pass recomputed
        t_ready = time.perf_counter()
        best = None
        for ev in session.events():
            losses.append(ev.losses.get("L", next(iter(ev.losses.values()))))
            if ev.val_miou is not None:
                vals.append((ev.step, ev.val_miou))
                best = ev.best_miou
                print(f"  [{name}] step {ev.step}/{ev.total} {ev.phase} val mIoU {ev.val_miou:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        t_round = time.perf_counter() - t0
    steps_s = (t_round - (t_ready - t0)) / max(1, settings.iterations)

    # Held-out score: the best checkpoint on the bottom rows the trainer never trained on, every pixel.
    from napari_uhrseg.methods.grnet_ppn import GRNetMethod

    h, w = gt.shape
    y0 = h - int(round(h * args.val_share))
    method = GRNetMethod.from_checkpoint(out, class_names=names)
    t1 = time.perf_counter()
    result = segment_image(pyramid, method, level=0, window=args.crop, overlap=max(16, args.crop // 8),
                           region=(y0, 0, h, w))
    seg_s = time.perf_counter() - t1
    pred = np.asarray(result.store.array)
    live_s = None
    if args.live and name == "cached":
        # What the dock adds after each validation with "Live update of the view" on: the view (at most 2048², here
        # the scene's centre) segmented with the model being trained.
        c0 = (h - 2048) // 2, (w - 2048) // 2
        t2 = time.perf_counter()
        segment_image(pyramid, session.method(), level=0, window=args.crop, overlap=max(16, args.crop // 8),
                      region=(c0[0], c0[1], c0[0] + 2048, c0[1] + 2048))
        live_s = time.perf_counter() - t2
    truth = gt[y0:y0 + pred.shape[0], :pred.shape[1]].astype(np.int64) + 1
    cm = ConfusionMatrix(len(names), ignore_index=0).update(pred, truth)
    held_out, per_class = cm.miou()
    row = {
        "config": name, "round_s": round(t_round, 1), "setup_s": round(t_ready - t0, 1),
        "s_per_step": round(steps_s, 3), "iterations": settings.iterations,
        "val_miou_best": None if best is None else round(float(best), 4),
        "val_curve": [(s, round(float(v), 4)) for s, v in vals],
        "held_out_miou": round(float(held_out), 4),
        "held_out_iou": [None if np.isnan(v) else round(float(v), 4) for v in per_class[1:]],
        "held_out_segment_s": round(seg_s, 1), "peak_rss_mb": round(rss.peak_mb),
        "first_loss": round(float(np.mean(losses[:5])), 4), "last_loss": round(float(np.mean(losses[-5:])), 4),
        "torch_threads": torch.get_num_threads(),
        "live_preview_2048_s": None if live_s is None else round(live_s, 1),
        "validations": len(vals),
    }
    if cache is not None:
        row["cache"] = {**cache.stats.as_dict(), "entries": len(cache), "mb": round(cache.nbytes / 2**20, 1)}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bar is for 2)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--iterations", type=int, default=DOCK_DEFAULTS["iterations"])
    p.add_argument("--crop", type=int, default=DOCK_DEFAULTS["crop"])
    p.add_argument("--val-share", type=float, default=DOCK_DEFAULTS["val_share"])
    p.add_argument("--pool", type=int, default=None, help="crops in the pool (default: TrainingSettings')")
    p.add_argument("--batch-size", type=int, default=None, help="crops per step (default: TrainingSettings')")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: TrainingSettings')")
    p.add_argument("--strokes", type=int, default=12, help="strokes per class")
    p.add_argument("--width", type=int, default=3, help="stroke width (px)")
    p.add_argument("--length", type=int, default=300, help="stroke length (px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--live", action="store_true",
                   help="also time one live preview (a 2048² view segmented, as the dock does after each validation)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}; choose from {CONFIGS}")

    import torch

    from napari_uhrseg.engine.scribbles import TrainingSettings
    from napari_uhrseg.io.pyramid import open_pyramid

    if args.pool is None:
        args.pool = TrainingSettings().crop_pool
    torch.set_num_threads(args.threads)
    meta = json.loads((ROOT / "sample_data" / "scene.json").read_text())
    names = ["unlabelled"] + list(meta["class_names"])
    pyramid = open_pyramid(ROOT / "sample_data" / "scene.ome.tif")
    gt = np.asarray(open_pyramid(ROOT / "sample_data" / "scene_labels.ome.tif").levels[0]).squeeze()
    scribbles = scribbles_from_truth(gt, strokes=args.strokes, width=args.width, length=args.length, seed=args.seed)
    share = float((scribbles > 0).mean())
    load_before = os.getloadavg()
    print(f"sample scene {gt.shape[1]}x{gt.shape[0]}, {len(names) - 1} classes; scribbles cover {100 * share:.2f} % "
          f"of the pixels; torch threads {torch.get_num_threads()}; {args.iterations} iterations, crop {args.crop}, "
          f"validation share {args.val_share}, pool {args.pool}; load average {load_before}", flush=True)
    rows = []
    for name in configs:
        row = run_config(name, pyramid, scribbles, gt, names, args)
        row["load_after"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        print(f"{name:9s} round {row['round_s']:6.1f} s (setup {row['setup_s']:.1f} s), {row['s_per_step']:.3f} s/step, "
              f"val mIoU {row['val_miou_best']}, held-out mIoU {row['held_out_miou']:.3f}, "
              f"peak RSS {row['peak_rss_mb']} MB, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
              + (f", cache {row['cache']}" if "cache" in row else "")
              + (f"; live preview of a 2048² view {row['live_preview_2048_s']} s after each of the "
                 f"{row['validations']} validations" if row["live_preview_2048_s"] is not None else "")
              + f"; load {row['load_after']}", flush=True)
    summary = {"scribble_share": share, "load_before": [round(v, 2) for v in load_before],
               "threads": args.threads, "iterations": args.iterations, "crop": args.crop, "pool": args.pool,
               "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    cached = next((r for r in rows if r["config"] == "cached"), None)
    if cached is not None:
        verdict = "meets" if cached["round_s"] <= 60 else "misses"
        print(f"bar: frozen-backbone round with cached features {cached['round_s']} s {verdict} the 60 s bar "
              f"({args.threads} threads, load {load_before[0]:.2f} before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
