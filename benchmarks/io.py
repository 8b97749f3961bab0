"""I/O benchmark: open a 40k x 40k pyramidal OME-TIFF and show the first screen; export 20k x 20k labels.

    .venv/bin/python benchmarks/io.py [--size 40000] [--labels-size 20000] [--workdir DIR]

Every measured phase runs in its own fresh Python process, so each peak RSS (VmHWM) belongs to that
phase alone (it includes the interpreter and the imports; the import cost is printed separately). Bars (issue 2):
open + first screen < 1 s and < 300 MB RSS; export peak RSS < 1 GB whatever the label size. Naive baselines
(whole-level read, whole-array export) run in the same session and are labelled as such.

Test data (generated in the work folder, deleted at the end unless --keep):
* image: RGB, 512 px JPEG tiles, SubIFD pyramid down to <= 512 px, 0.25 µm pixels. Each tile is drawn from a
  bank of 16 tiles cut from a napari_uhrseg.synthetic scene (a random choice per tile), so decoding costs what
  real textured tiles cost; the lower levels reuse the bank (their picture is not a faithful downsample).
* labels: a zarr v3 label store (uint8, 1024 px chunks) written window by window: 6 classes, each pixel the
  argmax of 6 smooth random fields (bilinear on a 96 px lattice), i.e. blobby regions of ~100-300 px.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB). VmHWM starts afresh at exec; ru_maxrss would carry the
    parent's peak into the child on Linux, so it is only the fallback."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------- data


def make_image(path: Path, size: int) -> float:
    from napari_uhrseg.io.ometiff import write_tiled_pyramid

    try:
        from napari_uhrseg.synthetic import SyntheticScene

        scene = SyntheticScene(size=(2048, 2048), seed=0, num_classes=5)
        source = scene.image_window(0, 0, 2048, 2048)
    except Exception:  # no synthetic module: a procedural texture
        yy, xx = np.mgrid[0:2048, 0:2048]
        source = np.stack([(yy * 7 + xx * 3) % 256, (xx * 5) % 256, (yy * xx) % 256], -1).astype(np.uint8)
    bank = [source[y:y + 512, x:x + 512].copy() for y in range(0, 2048, 512) for x in range(0, 2048, 512)]

    def tile(level, y0, x0, h, w):
        k = (y0 * 7919 + x0 * 104729 + level * 31) // 512 % len(bank)
        return bank[k][:h, :w]

    t0 = time.perf_counter()
    write_tiled_pyramid(path, (size, size), tile, tile=512, compression="jpeg", compression_level=85,
                        pixel_size=(0.25, 0.25))
    return time.perf_counter() - t0


def make_labels(path: Path, size: int, num_classes: int = 6, spacing: int = 96, window: int = 2048) -> float:
    import cv2

    from napari_uhrseg.io.labels import create_label_store

    rng = np.random.default_rng(0)
    n = size // spacing + 3
    lattice = rng.random((num_classes, n, n)).astype(np.float32)
    store = create_label_store((size, size), path=path, chunks=(1024, 1024),
                               class_names=["background"] + [f"class {k}" for k in range(1, num_classes)])
    t0 = time.perf_counter()
    for y0 in range(0, size, window):
        for x0 in range(0, size, window):
            h, w = min(window, size - y0), min(window, size - x0)
            gy, gx = y0 // spacing, x0 // spacing
            sub = lattice[:, gy:gy + window // spacing + 3, gx:gx + window // spacing + 3]
            fields = [cv2.resize(f, (sub.shape[2] * spacing, sub.shape[1] * spacing), interpolation=cv2.INTER_LINEAR)
                      for f in sub]
            oy, ox = y0 - gy * spacing, x0 - gx * spacing
            stack = np.stack([f[oy:oy + h, ox:ox + w] for f in fields])
            store.write_window(y0, x0, np.argmax(stack, axis=0).astype(np.uint8))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- phases
# Each runs in a child process and prints one JSON line.


def phase_open(path: str) -> dict:
    t0 = time.perf_counter()
    import dask.array  # noqa: F401  (napari has these imported already; timed apart from the open)
    import tifffile  # noqa: F401
    import zarr  # noqa: F401

    from napari_uhrseg.io.pyramid import open_pyramid

    t_import = time.perf_counter() - t0
    rss_imports = peak_rss_mb()
    t1 = time.perf_counter()
    pyr = open_pyramid(path)
    t_open = time.perf_counter() - t1
    # First screen: a 1600 x 1000 canvas shows the whole image at the finest level that fits in it.
    level = next(i for i in range(len(pyr.levels)) if pyr.level_shape(i)[0] <= 1000 and pyr.level_shape(i)[1] <= 1600)
    t2 = time.perf_counter()
    overview = np.asarray(pyr.levels[level])
    t_screen = time.perf_counter() - t2
    t3 = time.perf_counter()
    corner = pyr.read_region(0, 0, 0, 1024, 1024)
    t_corner = time.perf_counter() - t3
    assert overview.size and corner.shape == (1024, 1024, 3)
    return {"import_s": t_import, "open_s": t_open, "first_screen_s": t_screen, "screen_level": level,
            "screen_shape": list(overview.shape[:2]), "corner_1024_s": t_corner, "rss_after_imports_mb": rss_imports,
            "peak_rss_mb": peak_rss_mb(), "levels": len(pyr.levels)}


def phase_naive_read(path: str, level: int) -> dict:
    import tifffile

    t0 = time.perf_counter()
    data = tifffile.imread(path, level=level)
    return {"seconds": time.perf_counter() - t0, "shape": list(data.shape), "peak_rss_mb": peak_rss_mb()}


def phase_export(labels: str, out: str) -> dict:
    from napari_uhrseg.io.export import export_labels
    from napari_uhrseg.io.labels import open_label_store

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    export_labels(open_label_store(labels, writable=False), out, pixel_size=(0.25, 0.25))
    result = {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": rss0,
              "bytes": _size(Path(out))}
    if out.endswith(".geojson"):
        with open(out) as fh:
            result["features"] = sum(line.startswith('{"type":"Feature"') for line in fh)
    return result


def phase_naive_export(labels: str, out: str) -> dict:
    import tifffile
    import zarr

    t0 = time.perf_counter()
    full = np.asarray(zarr.open_array(labels, mode="r")[:])  # the whole label image in memory
    levels = [full]
    while max(levels[-1].shape) > 512:
        levels.append(levels[-1][::2, ::2])
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        tw.write(full, tile=(256, 256), compression="zlib", subifds=len(levels) - 1, metadata={"axes": "YX"})
        for lv in levels[1:]:
            tw.write(lv, tile=(256, 256), compression="zlib", subfiletype=1)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "bytes": _size(Path(out))}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


PHASES = {"open": phase_open, "naive_read": phase_naive_read, "export": phase_export, "naive_export": phase_naive_export}


def run_phase(name: str, *args) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(HERE), "--phase", name, *map(str, args)], capture_output=True,
                         text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=40000, help="image side, pixels (default 40000)")
    parser.add_argument("--labels-size", type=int, default=20000, help="label side, pixels (default 20000)")
    parser.add_argument("--workdir", default=None, help="where to put the generated files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--naive-level", type=int, default=1, help="pyramid level read whole by the naive baseline")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        name, *rest = args.phase
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(PHASES[name](*rest)))
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="uhrseg-bench-io-"))
    work.mkdir(parents=True, exist_ok=True)
    image, labels = work / "image.ome.tif", work / "labels.zarr"
    print(f"# napari-uhrseg I/O benchmark  ({platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()})")
    try:
        t = make_image(image, args.size)
        print(f"generated {args.size} x {args.size} RGB pyramidal OME-TIFF: {image.stat().st_size / 1e6:.0f} MB in {t:.1f} s")
        if labels.exists():
            shutil.rmtree(labels)
        t = make_labels(labels, args.labels_size)
        print(f"generated {args.labels_size} x {args.labels_size} label zarr: {_size(labels) / 1e6:.0f} MB in {t:.1f} s")
        print()
        rows = []
        o = run_phase("open", image)
        total = o["open_s"] + o["first_screen_s"]
        print(f"open + first screen (level {o['screen_level']}, {o['screen_shape'][1]} x {o['screen_shape'][0]}):"
              f" {total:.3f} s  [open {o['open_s']:.3f} s, screen {o['first_screen_s']:.3f} s;"
              f" imports before it {o['import_s']:.2f} s]   peak RSS {o['peak_rss_mb']:.0f} MB"
              f" (of which interpreter+imports {o['rss_after_imports_mb']:.0f} MB)"
              f"   bar: < 1 s and < 300 MB -> {'PASS' if total < 1 and o['peak_rss_mb'] < 300 else 'FAIL'}")
        print(f"level-0 1024 x 1024 corner via read_region: {o['corner_1024_s']:.3f} s")
        rows.append(("open+first screen", total, o["peak_rss_mb"]))
        n = run_phase("naive_read", image, args.naive_level)
        print(f"BASELINE (naive) tifffile.imread(level={args.naive_level}) {n['shape']}: {n['seconds']:.2f} s,"
              f" peak RSS {n['peak_rss_mb']:.0f} MB")
        print()
        for suffix in ("ome.tif", "geojson"):
            e = run_phase("export", labels, work / f"export.{suffix}")
            extra = f", {e['features']} polygons" if "features" in e else ""
            print(f"export {args.labels_size}^2 labels -> {suffix}: {e['seconds']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB"
                  f" (imports {e['rss_after_imports_mb']:.0f} MB), {e['bytes'] / 1e6:.1f} MB{extra}"
                  f"   bar: < 1 GB -> {'PASS' if e['peak_rss_mb'] < 1024 else 'FAIL'}")
        b = run_phase("naive_export", labels, work / "naive.ome.tif")
        print(f"BASELINE (naive) whole array in memory + tifffile.imwrite pyramid: {b['seconds']:.1f} s,"
              f" peak RSS {b['peak_rss_mb']:.0f} MB")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
