"""GRNet/PPN benchmark on DeepGlobe: train the fast preset within a time budget, then evaluate on the held-out
tiles, in one run on the same windows: G-branch only, all 16 patches refined, GRNet+PPN (the paper's
p >= 0.5 rule and top-k rules) and GRNet with the patches ranked by the G-branch's doubt instead of PPN
(``G-doubt top-k``, the fast preset's rule since 2026-12-03).

Split: ``napari_uhrseg.datasets.deepglobe_split()`` (train 6 tiles, test 10452, 2774, 6399). mIoU over the six
real classes (label 0 "unknown" ignored), pooled confusion matrix over the test tiles; one 2448² window per tile.

    python benchmarks/grnet_ppn.py --minutes 15 --device auto --time-threads 2

Prints the training budget, then per configuration: mIoU, per-class IoU, fraction of patches refined, seconds
per 2448² window on ``--time-device`` (CPU with ``--time-threads`` threads by default) and the peak RSS while
that configuration ran (RssSampler); then the best any selection rule could do with this R-branch (``oracle
top-k``: the k patches whose refinement gains most, measured against the truth; an upper bound for PPN).
``--checkpoint`` skips training. Writes ``--out`` (checkpoint) and a JSON
of the figures next to it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_uhrseg.datasets import DEEPGLOBE_CLASSES, DEEPGLOBE_COLORS, deepglobe_split, load_deepglobe_tile
from napari_uhrseg.engine.train import LabelledImage, RandomCrops
from napari_uhrseg.methods.grnet_ppn import GRNet, GRNetMethod, GRNetSettings, GRNetTrainer
from napari_uhrseg.methods.presets import grnet_preset
from napari_uhrseg.metrics import RssSampler, miou_from_confusion


def train(args, device: str) -> Path:
    split = deepglobe_split()
    items = [LabelledImage(*load_deepglobe_tile(i), name=i) for i in split["train"]]
    lr = args.lr
    if args.frozen_backbones and lr is None:
        from napari_uhrseg.engine.scribbles import FROZEN_LR

        lr = FROZEN_LR
    cfg = grnet_preset("fast", batch_size=args.batch_size, global_share=args.global_share, lr=lr)
    cfg["crop"] = args.crop  # half-window crops keep inference's scales (see GRNetTrainer)
    torch.manual_seed(args.seed)
    data = RandomCrops(items, cfg["crop"], ignore_zero=True, seed=args.seed)
    model = GRNet(cfg, len(DEEPGLOBE_CLASSES) - 1, pretrained=True)
    if args.init:
        start_from(model, Path(args.init))
    install = None
    if args.frozen_backbones:  # `uhrseg train --frozen-backbones`: ImageNet trunks fixed, their features cached
        from napari_uhrseg.engine.scribbles import frozen_grnet

        data, install = frozen_grnet(model, data, crop_pool=args.crop_pool, pool_refresh=args.pool_refresh,
                                     seed=args.seed, cache_mb=args.cache_mb)
    if args.freeze_global:  # the whole G-branch fixed (weights and batch norms): only PPN, R-branch, aggregation
        from napari_uhrseg.engine.scribbles import freeze_backbones

        freeze_backbones(model.global_branch)
    trainer = GRNetTrainer(model, cfg, data, [], class_names=DEEPGLOBE_CLASSES, class_colors=DEEPGLOBE_COLORS,
                           ignore_index=0, total_steps=10**9, batch_size=cfg["batch_size"], device=device,
                           round_steps=10**9 if args.ppn_only else args.round_steps, ppn_labels=args.ppn_labels,
                           extra_meta={"trained_on": "deepglobe " + ",".join(split["train"]),
                                       "frozen_backbone": bool(args.frozen_backbones)})
    if install is not None:
        install(trainer)
    budget = args.minutes * 60
    print(f"training budget {args.minutes:.1f} min on {device}; train tiles {split['train']}; crops {cfg['crop']} px, "
          f"batch {cfg['batch_size']}, lr {cfg['lr']}"
          + (f"; frozen backbones, a pool of {args.crop_pool} crops (one replaced every {args.pool_refresh} steps)"
             if args.frozen_backbones else ""), flush=True)
    # calibrate: time a few steps of each kind, then fix the schedule (G-branch share, rounds) for the budget
    t0 = time.perf_counter()
    t_global = 0.0
    if cfg["global_share"] > 0:  # (no G-branch steps to time when there are none)
        trainer.global_steps = 10**9
        for i in range(3):
            trainer.train_step(i)
        t_global = (time.perf_counter() - t0) / 3
    def timed(step, n=2):  # the last of n steps: the first of a kind pays one-off costs (optimiser set-up, imports)
        for _ in range(n):
            t = time.perf_counter()
            step()
        return time.perf_counter() - t

    t_main = 0.0 if args.ppn_only else timed(trainer._main_step)
    t_ppn = timed(trainer._ppn_step)
    # after the G-branch share, PPN and Mainbody rounds alternate: half of the remaining steps each
    per_step = cfg["global_share"] * t_global + (1 - cfg["global_share"]) * (
        t_ppn if args.ppn_only else (t_main + t_ppn) / 2)
    total = max(8, int((budget - (time.perf_counter() - t0)) / per_step))
    if args.max_steps:
        total = min(total, args.max_steps)
    trainer.total = total
    trainer.global_steps = int(cfg["global_share"] * total)
    print(f"{t_global:.2f} s per G step, {t_main:.2f} s per Mainbody step, {t_ppn:.2f} s per PPN step -> {total} steps "
          f"({trainer.global_steps} G-branch alone, then PPN/Mainbody rounds of {args.round_steps})", flush=True)
    for step in range(total):
        losses = trainer.train_step(step)
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            txt = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
            print(f"[{step + 1}/{total}] {trainer.phase(step)} {txt} {time.perf_counter() - t0:.0f}s", flush=True)
        if time.perf_counter() - t0 > budget * 1.15:
            print(f"stopping at step {step + 1}: over budget", flush=True)
            break
    trainer.total = step + 1
    out = trainer.save(Path(args.out), step=step + 1, best=None, training_state=False)
    print(f"trained {step + 1} steps in {(time.perf_counter() - t0) / 60:.1f} min -> {out}", flush=True)
    return out


def start_from(model: GRNet, path: Path) -> None:
    """Continue from an earlier run's weights. A checkpoint made before ``aggregation_residual`` had plain
    aggregation convs: their last conv is reset to zero so that the model starts from the G-branch's view."""
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.methods.presets import checkpoint_architecture

    state, meta = load_checkpoint(path, method="grnet", class_names=DEEPGLOBE_CLASSES)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    if model.cfg["aggregation_residual"] and not checkpoint_architecture(meta)["aggregation_residual"]:
        torch.nn.init.zeros_(model.aggregation[-1].weight)
        torch.nn.init.zeros_(model.aggregation[-1].bias)
    print(f"starting from {path} (step {meta.get('step')})", flush=True)


def configurations(rules: str) -> list[tuple[str, dict]]:
    confs = [("G-branch only", {"mode": "global"}), ("all 16 refined", {"mode": "all"})]
    for rule in rules.split(","):
        kind, _, val = rule.partition(":")
        # a leading "u" ranks the patches by the G-branch's doubt instead of PPN (scorer "uncertainty")
        scorer, who = ("uncertainty", "G-doubt") if kind.startswith("u") else ("ppn", "GRNet+PPN")
        kind = kind[1:] if scorer == "uncertainty" else kind
        base = {"mode": "ppn", "scorer": scorer}
        if kind == "threshold":
            confs.append((f"{who} p>={val}", {**base, "selection": "threshold", "threshold": float(val)}))
        elif kind == "topk":
            confs.append((f"{who} top-{val}", {**base, "selection": "topk", "top_k": int(val)}))
        else:
            raise SystemExit(f"--rules: {rule!r} is not threshold:P, topk:K, uthreshold:P or utopk:K")
    return confs


def run_config(method: GRNetMethod, tiles, settings: dict, *, timed: bool):
    s = method.settings
    for k, v in settings.items():
        setattr(s, k, v)
    cm = np.zeros((7, 7), np.int64)
    selected = total = 0
    seconds = []
    with RssSampler() as rss:
        for rgb, gt in tiles:
            t = time.perf_counter()
            pred = method.predict(rgb)
            seconds.append(time.perf_counter() - t)
            labels = pred.labels
            m = gt > 0
            cm += np.bincount(gt[m].astype(np.int64) * 7 + labels[m], minlength=49).reshape(7, 7)
            patches = pred.artefacts["patches"]
            selected += sum(p["selected"] for p in patches)
            total += len(patches)
    miou, iou = miou_from_confusion(cm, exclude=(0,))
    return {"miou": miou, "per_class_iou": iou[1:].tolist(), "selected_fraction": selected / max(total, 1),
            "seconds_per_window": float(np.median(seconds)) if timed else None,
            "peak_rss_mb": rss.peak_mb if timed else None}


def oracle_selection(method: GRNetMethod, tiles, ks=(2, 4, 6)) -> dict:
    """What the best possible selection rule would get from this R-branch: per window, each patch's gain in
    correctly labelled pixels (all 16 refined vs the G-branch alone); the k patches with the largest gain take the
    all-16 labels, the rest the G-branch's. (The aggregation's 3×3 convs see across patch borders, so a patch
    refined with others is a close stand-in for it refined alone: pasting PPN's own top-4 this way reproduces
    its measured mIoU to ~0.1.) An upper bound for PPN at each k, untimed."""
    s = method.settings
    mode = s.mode
    per_tile = []
    for rgb, gt in tiles:
        s.mode = "global"
        g = method.predict(rgb).labels
        s.mode = "all"
        pred = method.predict(rgb)
        a = pred.labels
        boxes = [tuple(int(v) for v in p["box"]) for p in pred.artefacts["patches"]]
        gains = []
        for y0, x0, y1, x1 in boxes:
            t, m = gt[y0:y1, x0:x1], gt[y0:y1, x0:x1] > 0
            gains.append(int(((a[y0:y1, x0:x1] == t) & m).sum()) - int(((g[y0:y1, x0:x1] == t) & m).sum()))
        per_tile.append((g, a, gt, boxes, gains))
    s.mode = mode
    out = {}
    for k in ks:
        cm = np.zeros((7, 7), np.int64)
        for g, a, gt, boxes, gains in per_tile:
            comp = g.copy()
            for i in np.argsort(gains, kind="stable")[::-1][:k]:
                y0, x0, y1, x1 = boxes[i]
                comp[y0:y1, x0:x1] = a[y0:y1, x0:x1]
            m = gt > 0
            cm += np.bincount(gt[m].astype(np.int64) * 7 + comp[m], minlength=49).reshape(7, 7)
        out[f"oracle top-{k}"] = miou_from_confusion(cm, exclude=(0,))[0]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="training budget")
    p.add_argument("--device", default="auto", help="training / accuracy device")
    p.add_argument("--time-device", default="cpu", help="device for the seconds-per-window figures")
    p.add_argument("--time-threads", type=int, default=2)
    p.add_argument("--train-threads", type=int, help="torch CPU threads while training (default: all cores)")
    p.add_argument("--checkpoint", help="evaluate this checkpoint instead of training")
    p.add_argument("--init", help="train on from this checkpoint's weights (e.g. with --global-share 0)")
    p.add_argument("--out", default="bench_out/grnet_deepglobe.pt")
    p.add_argument("--rules", default="threshold:0.5,topk:2,topk:4,topk:6,utopk:2,utopk:4,utopk:6",
                   help="selection rules, comma-separated: threshold:P, topk:K (PPN), uthreshold:P, utopk:K (patches "
                        "ranked by the G-branch's doubt, no PPN)")
    p.add_argument("--json", help="where to write the figures (default: next to --out / --checkpoint)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--crop", type=int, default=1224, help="training crop (px); 1224 = half a window")
    p.add_argument("--global-share", type=float, default=0.3)
    p.add_argument("--round-steps", type=int, default=25)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's; 3e-4 with --frozen-backbones)")
    p.add_argument("--frozen-backbones", action="store_true",
                   help="train as `uhrseg train --frozen-backbones` does: ImageNet trunks fixed, features cached")
    p.add_argument("--freeze-global", action="store_true",
                   help="with --init: keep the whole G-branch of that checkpoint fixed (no G-branch steps); only the "
                        "PPN, the R-branch and the aggregation learn, so the G-branch cannot overfit meanwhile")
    p.add_argument("--ppn-labels", choices=["paper", "gain"], default="paper",
                   help="PPN targets: the paper's Eq. (1), or the patches where refining gains most (gain_labels)")
    p.add_argument("--ppn-only", action="store_true",
                   help="with --init: train only the PPN (every step a PPN step); the rest stays as loaded")
    p.add_argument("--crop-pool", type=int, default=32)
    p.add_argument("--pool-refresh", type=int, default=0)
    p.add_argument("--cache-mb", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--timing-tiles", type=int, default=3, help="test tiles timed per configuration")
    args = p.parse_args(argv)
    if args.freeze_global and not args.init:
        p.error("--freeze-global keeps the G-branch of the --init checkpoint: give --init")
    if args.ppn_only and not args.init:
        p.error("--ppn-only trains the PPN of the --init checkpoint: give --init")
    if args.freeze_global or args.ppn_only:
        args.global_share = 0.0

    from napari_uhrseg.device import select_device

    dev = select_device(args.device)
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    print(f"device: {dev.describe()}; torch {torch.__version__}; {torch.get_num_threads()} threads", flush=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else train(args, dev.device)
    test_ids = deepglobe_split()["test"]
    tiles = [load_deepglobe_tile(i) for i in test_ids]
    results = {"checkpoint": str(ckpt), "test_tiles": test_ids, "train_minutes": None if args.checkpoint else args.minutes,
               "accuracy_device": dev.device, "configs": {}}
    torch.set_num_threads(args.time_threads)
    timer = GRNetMethod.from_checkpoint(ckpt, device=args.time_device)
    run_config(timer, tiles[:1], {"mode": "global"}, timed=True)  # warm-up
    same = torch.device(args.time_device).type == torch.device(dev.device).type
    acc = timer if same else GRNetMethod.from_checkpoint(ckpt, device=dev.device)
    for name, settings in configurations(args.rules):
        # one pass when accuracy and time share the device; else accuracy on all tiles, time on --timing-tiles
        results["configs"][name] = run_config(acc, tiles, settings, timed=same)
        if not same:
            r = run_config(timer, tiles[: args.timing_tiles], settings, timed=True)
            results["configs"][name].update(seconds_per_window=r["seconds_per_window"], peak_rss_mb=r["peak_rss_mb"])
        print(f"{name}: {results['configs'][name]}", flush=True)
    results["oracle"] = oracle_selection(acc, tiles)
    results["time_device"] = f"{args.time_device} ({torch.get_num_threads()} threads)"
    names = DEEPGLOBE_CLASSES[1:]
    print(f"\nDeepGlobe test tiles {test_ids} (2448² windows); accuracy on {dev.device}, "
          f"time on {results['time_device']}")
    print(f"{'configuration':22s} {'mIoU':>6s} " + " ".join(f"{n[:6]:>6s}" for n in names)
          + f" {'refined':>7s} {'s/win':>6s} {'RSS MB':>7s}")
    for name, r in results["configs"].items():
        print(f"{name:22s} {100 * r['miou']:6.2f} " + " ".join(f"{100 * v:6.2f}" for v in r["per_class_iou"])
              + f" {100 * r['selected_fraction']:6.1f}% {r['seconds_per_window']:6.2f} {r['peak_rss_mb']:7.0f}")
    g_only = results["configs"]["G-branch only"]["miou"]
    print("best possible selection from this R-branch (patches ranked by their measured gain; an upper bound for "
          "PPN): " + ", ".join(f"{k} {100 * v:.2f} ({100 * (v - g_only):+.2f})" for k, v in results["oracle"].items()))
    out_json = Path(args.json) if args.json else (
        Path(args.out).with_suffix(".json") if not args.checkpoint else Path(args.checkpoint).with_suffix(".json"))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2))
    print(f"figures: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
