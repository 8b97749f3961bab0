"""MagNet benchmark on DeepGlobe, in one run on the same windows: the backbone alone (the paper's
"Downsample" baseline), MagNet (every patch of every scale refined) and MagNet-Fast (the 3 most uncertain
patches per scale, 0.9 of their points).

Split: ``napari_uhrseg.datasets.deepglobe_split()`` (the GRNet benchmark's): train 6 tiles, test 10452, 2774,
6399; one 2448² window per tile. mIoU over the six real classes (label 0 "unknown" ignored), pooled confusion
matrix over the test tiles.

Figures per configuration: mIoU, per-class IoU, seconds per 2448² window (wall clock of ``predict``, CPU,
``--threads`` threads; the process CPU time too, and the load average before and after, because the machine may
be shared), peak RSS while it ran (``RssSampler``), and how useful the uncertainty map is: the share of the final
label errors that fall inside the 10 % most uncertain area of each window (1 − (p_top1 − p_top2) of the final
prediction; 10 % if the map knew nothing), and the minor page faults of each window. Each configuration runs
over all the windows in turn, as ``uhrseg segment`` runs one method over a slide, after one untimed window (the
first builds the scripted refiner and settles the heap); ``--interleave`` runs every configuration on a window
before the next (each window then page-faults the heap the other method reshaped). ``--profile`` prints a
``torch.profiler`` table of one MagNet-Fast window.

``--ceiling`` also times, in the same loop, MagNet-Fast with no patch refined (``no-patches``: the backbone pass,
the canvases, the certainty maps and the artefacts every window pays whatever is refined) and prints what each
refined patch costs in either method and how fast MagNet-Fast could be relative to MagNet if that shared part
cost nothing: the ceiling of the 3× bar on the machine.

    python benchmarks/magnet.py --checkpoint magnet_deepglobe.pt --threads 2 \\
        --json benchmarks/results/magnet.json --figures docs/methods/images

The checkpoint comes from ``uhrseg train --method magnet --deepglobe ...`` (see docs/methods/magnet.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import napari_uhrseg` sets it, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_uhrseg.datasets import DEEPGLOBE_CLASSES, DEEPGLOBE_COLORS, deepglobe_split, load_deepglobe_tile  # noqa: E402
from napari_uhrseg.methods.magnet import MagNet, MagNetFast, certainty_map  # noqa: E402
from napari_uhrseg.metrics import ConfusionMatrix, RssSampler  # noqa: E402

CONFIGS = ("backbone", "magnet", "magnet-fast")
TOP_SHARE = 0.10  # the "10 % most uncertain area"


def minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_config(name: str, methods: dict, rgb: np.ndarray):
    """(labels, uncertainty, stages or None, wall seconds, CPU seconds, peak RSS MiB, minor page faults) of one
    configuration on one window."""
    with RssSampler() as rss:
        f0 = minor_faults()
        t0, c0 = time.perf_counter(), time.process_time()
        if name.startswith("backbone"):
            side = int(name.split("@")[1]) if "@" in name else None
            probs, stages = methods["magnet"].backbone_only(rgb, side), None
        else:
            pred = methods[name].predict(rgb)
            probs, stages = pred.probabilities, pred.artefacts["stages"]
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = minor_faults() - f0
    uncertainty = 1.0 - certainty_map(torch.from_numpy(probs)).numpy()  # 1 − (p_top1 − p_top2)
    return probs.argmax(0).astype(np.uint8), uncertainty, stages, seconds, cpu, rss.peak_mb, faults


def set_malloc_policy(policy: str) -> str:
    """Apply a glibc heap policy to this process (see ``--malloc``); returns what was set. On the project's VM,
    memory the process freed and touches again costs a page fault per 4 KiB (docs/methods/magnet.md, "Speed"),
    so the policy changes a MagNet-Fast window's CPU time by up to 2.5×."""
    if policy == "package":
        from napari_uhrseg.memory import tune_native_heap

        return f"napari_uhrseg.memory.tune_native_heap: {tune_native_heap()}"
    return "glibc's own"


def profile_window(method, rgb: np.ndarray, rows: int = 15) -> str:
    """A ``torch.profiler`` table (self CPU time) of one ``predict``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        method.predict(rgb)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def errors_in_top_area(labels, gt, uncertainty, share: float = TOP_SHARE) -> tuple[int, int, int]:
    """(errors inside the ``share`` most uncertain labelled pixels, all errors, labelled pixels); label 0 is
    not counted. No map can place more than ``share × labelled`` errors in that area, so the best possible
    share is ``min(1, share × labelled / errors)``: a model wrong on 50 % of the pixels caps it at 20 %."""
    valid = gt != 0
    errors = (labels != gt) & valid
    threshold = np.quantile(uncertainty[valid], 1.0 - share) if valid.any() else np.inf
    return int((errors & (uncertainty >= threshold)).sum()), int(errors.sum()), int(valid.sum())


def colour(labels: np.ndarray) -> np.ndarray:
    return np.asarray(DEEPGLOBE_COLORS, np.uint8)[labels]


def heat(u: np.ndarray) -> np.ndarray:
    import cv2

    bgr = cv2.applyColorMap(np.clip(u * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return bgr[..., ::-1]


def save_figure(path: Path, panels: list[np.ndarray], side: int = 408) -> None:
    """Panels (RGB) side by side, each resized to ``side`` px, 8 px apart, as a JPEG (quality 85) or PNG."""
    import cv2

    tiles = [cv2.resize(p, (side, side), interpolation=cv2.INTER_AREA) for p in panels]
    gap = np.full((side, 8, 3), 255, np.uint8)
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), row[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a MagNet checkpoint trained on the DeepGlobe train split")
    p.add_argument("--tiles", help="comma-separated test ids (default: the split's test tiles)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--figures", help="folder for the figure PNGs (docs)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one MagNet-Fast window")
    p.add_argument("--malloc", choices=["package", "default"], default="package",
                   help="glibc heap policy of the process: the package's (napari_uhrseg.memory, what `uhrseg "
                        "segment`, the plugin and every checkpoint load apply; the default) or glibc's own")
    p.add_argument("--backbone-side", type=int, default=0,
                   help="also report the backbone alone on the window resized to this side (e.g. 512, the input a "
                        "reused GRNet fast G-branch was trained at); for information, not one of the bars")
    p.add_argument("--interleave", action="store_true",
                   help="run every configuration on a window before the next window (the order before 2026-12-03) "
                        "instead of each configuration over all windows in turn")
    p.add_argument("--ceiling", action="store_true",
                   help="also time MagNet-Fast with no patch refined and print the per-patch costs and the "
                        "speed-up MagNet-Fast could reach if the per-window shared work cost nothing")
    args = p.parse_args(argv)
    configs = CONFIGS + ((f"backbone@{args.backbone_side}",) if args.backbone_side else ())
    configs += ("no-patches",) if args.ceiling else ()
    torch.set_num_threads(args.threads)
    print(f"malloc policy: {args.malloc} ({set_malloc_policy(args.malloc)})", flush=True)
    tiles = args.tiles.split(",") if args.tiles else deepglobe_split()["test"]
    methods = {"magnet": MagNet.from_checkpoint(args.checkpoint), "magnet-fast": MagNetFast.from_checkpoint(args.checkpoint)}
    if args.ceiling:
        methods["no-patches"] = MagNetFast.from_checkpoint(args.checkpoint)
        methods["no-patches"].schedule = dataclasses.replace(methods["no-patches"].schedule, n_patches=0)
    refined = {c: [] for c in configs}  # patches refined per window
    num_classes = len(methods["magnet"].class_names)
    cms = {c: ConfusionMatrix(num_classes, ignore_index=0) for c in configs}
    seconds = {c: [] for c in configs}
    cpu_seconds = {c: [] for c in configs}
    peak = {c: 0.0 for c in configs}
    inside = {c: [0, 0, 0] for c in configs}
    warm, _ = load_deepglobe_tile(tiles[0])
    for name in ("magnet-fast", "magnet") + (("no-patches",) if args.ceiling else ()):  # warm-up on a full window
        methods[name].predict(warm)
    if args.profile:
        print(profile_window(methods["magnet-fast"], warm), flush=True)
    faults = {c: [] for c in configs}
    data = {tile: load_deepglobe_tile(tile) for tile in tiles}
    # Each configuration in its own pass over the windows, as `uhrseg segment` runs them, after one untimed
    # window (--interleave: every configuration on a window before the next window). Alternating methods window
    # by window makes each predict page-fault ~300 MB of heap the other method left in other shapes (~75k
    # faults a window on the Xeon VM, 2026-12-03); one method in a loop faults only in its first window.
    order = ([(c, t) for t in tiles for c in configs] if args.interleave else [(c, t) for c in configs for t in tiles])
    panels = {t: [data[t][0], colour(data[t][1])] for t in tiles}
    load_before = os.getloadavg()
    for k, (c, tile) in enumerate(order):
        rgb, gt = data[tile]
        if not args.interleave and (k == 0 or order[k - 1][0] != c):
            run_config(c, methods, rgb)  # untimed: the first window of a pass settles the heap for this method
        labels, u, stages, sec, cpu, rss, flt = run_config(c, methods, rgb)
        cms[c].update(labels, gt)
        seconds[c].append(sec)
        cpu_seconds[c].append(cpu)
        peak[c] = max(peak[c], rss)
        faults[c].append(flt)
        refined[c].append(sum(q["selected"] for st in stages or () for q in st["patches"]))
        a, b, n = errors_in_top_area(labels, gt, u)
        inside[c] = [inside[c][0] + a, inside[c][1] + b, inside[c][2] + n]
        print(f"{tile} {c:12s} {sec:7.2f} s (CPU {cpu:6.2f} s, {flt} page faults)  errors in top-10% uncertainty "
              f"{a / max(b, 1):.1%} (best possible {min(1, TOP_SHARE * n / max(b, 1)):.1%})", flush=True)
        if args.figures:
            if c in ("magnet", "magnet-fast"):
                panels[tile] += [colour(labels), heat(u)]
                if c == "magnet":
                    maps = [heat(s["query_map"]) for s in stages]
                    save_figure(Path(args.figures) / f"magnet_stages_{tile}.jpg", [rgb, *maps])
            elif c == "backbone":
                panels[tile].append(colour(labels))
    load_after = os.getloadavg()
    if args.figures:  # backbone, MagNet, MagNet-Fast beside the image and its ground truth
        for tile in tiles:
            save_figure(Path(args.figures) / f"magnet_{tile}.jpg", panels[tile])
    results = {"checkpoint": str(args.checkpoint), "tiles": tiles, "threads": args.threads, "malloc": args.malloc,
               "order": "interleaved" if args.interleave else "per configuration",
               "load_average_before": load_before, "load_average_after": load_after,
               "classes": DEEPGLOBE_CLASSES[1:], "configs": {}}
    print(f"\n{'configuration':14s} {'mIoU':>6s}  " + " ".join(f"{n[:6]:>6s}" for n in DEEPGLOBE_CLASSES[1:])
          + "  s/window  (CPU s)  peak RSS MiB  faults/window  errors in top-10% (best possible)")
    for c in configs:
        miou, per_class = cms[c].miou(exclude=(0,))
        share = inside[c][0] / max(inside[c][1], 1)
        best = min(1.0, TOP_SHARE * inside[c][2] / max(inside[c][1], 1))
        results["configs"][c] = {"miou": miou, "per_class_iou": [float(v) for v in per_class[1:]],
                                 "seconds_per_window": float(np.mean(seconds[c])),
                                 "cpu_seconds_per_window": float(np.mean(cpu_seconds[c])), "peak_rss_mb": peak[c],
                                 "page_faults_per_window": float(np.mean(faults[c])),
                                 "errors_in_top10_uncertainty": share, "best_possible_share": best,
                                 "pixel_error_rate": inside[c][1] / max(inside[c][2], 1)}
        print(f"{c:14s} {100 * miou:6.2f}  " + " ".join(f"{100 * v:6.1f}" for v in per_class[1:])
              + f"  {np.mean(seconds[c]):8.2f}  ({np.mean(cpu_seconds[c]):5.2f})  {peak[c]:12.0f}"
              + f"  {np.mean(faults[c]):13.0f}"
              + f"  {share:8.1%} ({best:.1%})")
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    if args.ceiling:
        shared = float(np.mean(seconds["no-patches"]))
        per_patch = {c: (float(np.mean(seconds[c])) - shared) / max(float(np.mean(refined[c])), 1)
                     for c in ("magnet", "magnet-fast")}
        fast_patches = max(float(np.mean(seconds["magnet-fast"])) - shared, 1e-9)
        ceiling = (float(np.mean(seconds["magnet"])) - shared) / fast_patches
        print(f"shared work per window (no patch refined): {1000 * shared:.0f} ms; patches refined per window: "
              f"MagNet {np.mean(refined['magnet']):.0f}, MagNet-Fast {np.mean(refined['magnet-fast']):.0f}; per "
              f"refined patch: MagNet {1000 * per_patch['magnet']:.0f} ms, MagNet-Fast "
              f"{1000 * per_patch['magnet-fast']:.0f} ms; MagNet-Fast / MagNet speed-up "
              f"{np.mean(seconds['magnet']) / np.mean(seconds['magnet-fast']):.2f}x, with no shared work "
              f"{ceiling:.2f}x")
        results["ceiling"] = {"shared_seconds_per_window": shared, "seconds_per_refined_patch": per_patch,
                              "patches_refined_per_window": {c: float(np.mean(refined[c])) for c in per_patch},
                              "speedup_without_shared_work": ceiling}
    r = results["configs"]
    bars = {
        "MagNet >= backbone + 2 mIoU": r["magnet"]["miou"] >= r["backbone"]["miou"] + 0.02,
        "MagNet-Fast >= 3x faster than MagNet":
            r["magnet"]["seconds_per_window"] >= 3 * r["magnet-fast"]["seconds_per_window"],
        ">= 40% of MagNet's errors in its top-10% uncertainty": r["magnet"]["errors_in_top10_uncertainty"] >= 0.4,
        f"MagNet-Fast <= 4 s per 2448² window on {args.threads} threads": r["magnet-fast"]["seconds_per_window"] <= 4,
    }
    results["bars"] = bars
    for k, v in bars.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
