"""Peak RSS of `uhrseg segment` on a 20k x 20k image vs a 5k x 5k image (bar: within 10 %), per-window seconds.

Usage: .venv/bin/python benchmarks/segment_memory.py [--sizes 5000 20000] [--mode global] [--work DIR] [--repeats N]
       [--checkpoint CKPT] [--scorer ppn|uncertainty]
       [--baseline-patch-batch 16]

What is measured: `python -m napari_uhrseg.cli segment IMAGE -o OUT.zarr --method grnet --mode MODE --device cpu`
run as a subprocess on a synthetic pyramidal OME-TIFF of each size (level 0, the default 2448 px window, labels
into a zarr store on disk). Peak RSS is the child's own ``ru_maxrss`` from ``os.wait4`` (kernel accounting,
nothing missed between polls); a psutil poll every 50 ms gives the same figure as a cross-check. The GRNet
checkpoint is the shipped starter when there is one, else a randomly initialised `fast` GRNet (the memory
profile of a network does not depend on its weights; the labels are then meaningless). ``--mode global`` (the
G-branch only) keeps the run tractable on 2 CPU cores; ``--mode ppn`` adds the refined patches, whose batch
memory is per window too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, size: int) -> Path:
    """A smooth synthetic RGB pyramid (cheap to make and to compress; its content does not matter here)."""
    from napari_uhrseg.synthetic import write_pyramid_tiff

    def tile(y0, x0, h, w):
        y = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
        x = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
        base = 128 + 50 * np.sin(y / 97.0) + 50 * np.cos(x / 131.0)
        rgb = np.stack([base, base * 0.8 + 20 * np.sin((x + y) / 61.0), 255 - base], axis=-1)
        return np.clip(rgb, 0, 255).astype(np.uint8)

    if not path.exists():
        t0 = time.perf_counter()
        write_pyramid_tiff(path, tile, (size, size), channels=3, dtype=np.uint8, tile=512, compression="zlib")
        print(f"  wrote {path.name} ({size} x {size}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def grnet_checkpoint(work: Path) -> tuple[Path, str]:
    from napari_uhrseg.cli.segment import starter_checkpoint

    starter = starter_checkpoint("grnet")
    if starter is not None:
        return starter, "starter"
    path = work / "grnet_fast_random.pt"
    if not path.exists():
        from napari_uhrseg.datasets import DEEPGLOBE_CLASSES
        from napari_uhrseg.methods.base import save_checkpoint
        from napari_uhrseg.methods.grnet_ppn import GRNet, GRNetSettings, checkpoint_meta
        from napari_uhrseg.methods.presets import grnet_preset

        cfg = grnet_preset("fast")
        model = GRNet(cfg, len(DEEPGLOBE_CLASSES) - 1, pretrained=False)
        meta = checkpoint_meta(cfg, DEEPGLOBE_CLASSES, None, 0, model, GRNetSettings())
        save_checkpoint(path, model.state_dict(), meta)
    return path, "random fast GRNet"


def run_segment(image: Path, out: Path, ckpt: Path, mode: str, threads: int, patch_batch: int | None = None,
                scorer: str | None = None) -> dict:
    """Run `uhrseg segment` as a child; returns its peak RSS (wait4 and polled), wall time and summary."""
    import psutil

    cmd = [sys.executable, "-m", "napari_uhrseg.cli", "segment", str(image), "-o", str(out), "--method", "grnet",
           "--checkpoint", str(ckpt), "--mode", mode, "--device", "cpu", "--quiet", "--overwrite"]
    if patch_batch is not None:
        cmd += ["--patch-batch", str(patch_batch)]
    if scorer is not None:
        cmd += ["--scorer", scorer]
    env = dict(os.environ, UHRSEG_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    polled = {"peak": 0}

    def poll():
        ps = psutil.Process(proc.pid)
        while proc.returncode is None:
            try:
                polled["peak"] = max(polled["peak"], ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout, stderr = _communicate_then_wait4(proc)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"uhrseg segment failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout[stdout.index("{"):])
    return {"peak_rss_mb": proc._maxrss_kb / 1024, "polled_peak_mb": polled["peak"] / 2**20, "wall_s": wall,
            "summary": summary}


def _communicate_then_wait4(proc):
    """Read the child's output, then reap it with wait4 to get *its* rusage (not all children's)."""
    out_chunks, err_chunks = [], []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()))
    t_out.start()
    t_err.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._maxrss_kb = usage.ru_maxrss  # kilobytes on Linux
    t_out.join()
    t_err.join()
    return out_chunks[0].decode(), err_chunks[0].decode()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[5000, 20000])
    p.add_argument("--mode", default="global", choices=["global", "ppn", "all"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="GRNet checkpoint (default: the shipped starter)")
    p.add_argument("--scorer", choices=["ppn", "uncertainty"], default=None,
                   help="what ranks GRNet's patches (`uhrseg segment --scorer`; default: the checkpoint's rule)")
    p.add_argument("--work", default=None, help="folder for the images (kept between runs); default: a temp dir")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per image size; the median peak of each size is compared (a run's peak varies by "
                        "~±5 %% with how the heap happens to fragment, so one run per size can cross the bar "
                        "either way)")
    p.add_argument("--baseline-patch-batch", type=int, default=None,
                   help="also run both sizes with this GRNet patch batch (e.g. 16, the batch before 2026-12-02)")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "uhrseg-segment-memory"
    work.mkdir(parents=True, exist_ok=True)
    ckpt, kind = (Path(args.checkpoint), "given") if args.checkpoint else grnet_checkpoint(work)
    scorer = args.scorer or "the checkpoint's"
    print(f"checkpoint: {kind} ({ckpt.name}); mode {args.mode}; scorer: {scorer}; "
          f"{args.threads} threads; work folder {work}")
    rows, baseline = [], []
    for size in args.sizes:
        image = write_image(work / f"synthetic_{size}.ome.tif", size)
        runs = [(None, rows)] + ([(args.baseline_patch_batch, baseline)] if args.baseline_patch_batch else [])
        for batch, into in runs:
            peaks = []
            for _ in range(max(1, args.repeats)):
                res = run_segment(image, work / f"labels_{size}.zarr", ckpt, args.mode, args.threads, batch,
                                  args.scorer)
                peaks.append(res["peak_rss_mb"])
                s = res["summary"]
                what = "default patch batch" if batch is None else f"patch batch {batch}"
                print(f"  {size} x {size} ({what}): {s['windows']} windows, peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"{res['wall_s']:.0f} s", flush=True)
            res["runs_peak_rss_mb"] = peaks
            res["peak_rss_mb"] = float(np.median(peaks))  # the last run's timings, the median peak
            into.append((size, res))

    print()
    print(f"{'image':>14} {'windows':>8} {'peak RSS MB':>12} {'polled MB':>10} {'s/window':>9} {'median':>7} "
          f"{'max':>6} {'wall s':>7}")
    for size, res in rows:
        per = res["summary"]["seconds_per_window"]
        print(f"{f'{size} x {size}':>14} {res['summary']['windows']:>8} {res['peak_rss_mb']:>12.0f} "
              f"{res['polled_peak_mb']:>10.0f} {np.mean(per):>9.2f} {np.median(per):>7.2f} {np.max(per):>6.2f} "
              f"{res['wall_s']:>7.0f}")
    if baseline:
        b_small, b_large = baseline[0][1]["peak_rss_mb"], baseline[-1][1]["peak_rss_mb"]
        print(f"\nbaseline, patch batch {args.baseline_patch_batch}: peak RSS {b_small:.0f} / {b_large:.0f} MB, "
              f"ratio {b_large / b_small:.3f}; s / window (largest) "
              f"{np.mean(baseline[-1][1]['summary']['seconds_per_window']):.2f}")
    small, large = rows[0][1]["peak_rss_mb"], rows[-1][1]["peak_rss_mb"]
    ratio = large / small
    verdict = "PASS" if abs(ratio - 1) <= 0.10 else "FAIL"
    if args.repeats > 1:
        for size, res in rows:
            print(f"{size}²: peaks of {len(res['runs_peak_rss_mb'])} runs "
                  + ", ".join(f"{v:.0f}" for v in res["runs_peak_rss_mb"]) + f" MB, median {res['peak_rss_mb']:.0f}")
    print(f"\npeak RSS {rows[-1][0]}² / {rows[0][0]}² = {ratio:.3f} (bar: within 10 %) -> {verdict}")
    print("per-window seconds (largest image):", " ".join(f"{v:.2f}" for v in rows[-1][1]["summary"]["seconds_per_window"]))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
