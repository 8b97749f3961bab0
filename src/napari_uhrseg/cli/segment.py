"""``uhrseg segment IMAGE -o OUT --method grnet [--checkpoint CKPT] ...``: segment a whole image (or a region)
window by window, write the labels and the overlays (PPN patches in level-0 pixels), print a JSON summary.

OUT ending in ``.zarr`` (not ``.ome.zarr``) is the engine's label store itself, written window by window and
covering the region (its origin is in the summary and the store's attributes); any other suffix (``.ome.tif``,
``.ome.zarr``, ``.png``, ``.geojson``) is exported at the end with ``napari_uhrseg.io.export.export_labels``
from a store covering the whole working level, so exported coordinates are the image's. Labels are at the
working level. Methods that report an uncertainty map (MagNet, MagNet-Fast) also get it written next to OUT as
``<stem>_uncertainty.tif`` (a coarse whole-image float32 map in [0, 1]; its level-0 downsample and pixel size are
in the TIFF description, and the plugin's reader opens it on the image). Ctrl-C stops after the current window
and still writes everything finished; a second Ctrl-C stops at once (finished windows are still kept in a
``.zarr`` OUT).
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

from napari_uhrseg.errors import CheckpointError, UhrsegError

MODES = ("ppn", "all", "global")


def register(sub) -> None:
    from napari_uhrseg.engine.segment import DEFAULT_OVERLAP, DEFAULT_WINDOW

    p = sub.add_parser("segment", help="segment a whole image or a region window by window")
    p.add_argument("image", help="image file (OME-TIFF, SVS, NDPI, TIFF, OME-Zarr, PNG, JPEG)")
    p.add_argument("-o", "--out", required=True,
                   help="labels: a .zarr label store, or .ome.tif / .ome.zarr / .png / .geojson to export")
    p.add_argument("--method", default="grnet", help="segmentation method (default grnet; see `uhrseg info`)")
    p.add_argument("--checkpoint", default=None, help="the method's checkpoint (.pt); default: its starter")
    p.add_argument("--level", type=int, default=0, help="working pyramid level (0 = full resolution)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--window", type=int, default=None,
                   help=f"window side in working-level px (default: the method's training window, else {DEFAULT_WINDOW})")
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP, help="overlap between windows in px")
    p.add_argument("--region", default=None, help="y0,x0,y1,x1 in level-0 pixels (default: whole image)")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="GRNet: refine the patches PPN selects (ppn), all patches (all) or none (global)")
    p.add_argument("--scorer", choices=["ppn", "uncertainty"], default=None,
                   help="GRNet: what ranks the patches: PPN (the paper) or the G-branch's doubt (uncertainty); "
                        "default: the checkpoint's rule")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--top-k", type=int, default=None, help="GRNet: refine the K best-ranked patches of a window")
    sel.add_argument("--threshold", type=float, default=None,
                     help="GRNet: refine the patches whose score is at least P (the paper's rule with P = 0.5)")
    p.add_argument("--patch-batch", type=int, default=None,
                   help="GRNet: patches per R-branch call (default 4 on the CPU, 16 on a GPU; it sets the "
                        "window's peak memory)")
    p.add_argument("--overlays", default=None,
                   help="overlay file (.geojson or .json; default: OUT's name + .patches.geojson)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    p.add_argument("--quiet", action="store_true", help="no per-window progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from napari_uhrseg.device import select_device
    from napari_uhrseg.engine.overlays import OverlaySpool, write_overlays
    from napari_uhrseg.engine.segment import DEFAULT_WINDOW, iter_segment
    from napari_uhrseg.engine.windows import check_window
    from napari_uhrseg.io.pyramid import open_pyramid
    from napari_uhrseg.methods.magnet import UncertaintyRecorder

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UhrsegError(f"{out} exists: choose another output or pass --overwrite.")
    overlays_path = Path(args.overlays) if args.overlays else default_overlays_path(out)
    _check_outputs(out, overlays_path)  # a bad suffix or folder fails now, not after the whole image
    region = parse_region(args.region)
    if args.method == "cascadepsp":
        raise UhrsegError("CascadePSP refines labels that exist, it does not segment: segment with grnet, magnet or "
                          "magnet-fast, then `uhrseg refine IMAGE --mask LABELS -o OUT`.")
    choice = select_device(args.device)
    method = build_method(args.method, args.checkpoint, choice.device, args.mode)
    if args.patch_batch is not None:
        set_patch_batch(method, args.patch_batch)
    set_selection(method, scorer=args.scorer, top_k=args.top_k, threshold=args.threshold)
    pyramid = open_pyramid(args.image)
    _say(args, f"uhrseg segment: {pyramid.name} {pyramid.shape[0]} x {pyramid.shape[1]} px, level {args.level}, "
               f"method {method.name}, {choice.describe()}")

    window = args.window if args.window is not None else int(getattr(method, "window_size", 0) or DEFAULT_WINDOW)
    check_window(window, args.overlap)  # before any output exists
    cancel = threading.Event()
    with _first_ctrl_c_cancels(cancel, lambda m: _say(args, m)), \
            _label_store_for(out, args, pyramid, region, list(method.class_names)) as store, OverlaySpool() as spool:
        # MagNet's per-window uncertainty, assembled into one coarse whole-image map (nothing for other methods)
        recorder = UncertaintyRecorder(pyramid.shape, pyramid.downsamples[args.level])
        gen = iter_segment(pyramid, method, level=args.level, window=window, overlap=args.overlap,
                           region=region, store=store, cancel=cancel, keep_overlays=False)

        def on_event(ev):  # overlays go to a temporary file as they come (even after a second Ctrl-C)
            spool.add(ev.overlays)
            recorder.add_event(ev)

        result = _drive(gen, args, on_event=on_event)
        labels_path = _write_labels(out, store, method, pyramid, args.level)
        write_overlays(spool.records(), overlays_path)
        uncertainty_path = recorder.save_next_to(labels_path, pyramid.pixel_size, pyramid.pixel_unit)

    summary = result.summary() if result is not None else {"windows_done": None, "cancelled": True}
    summary.update({"patches": spool.patches, "patches_selected": spool.patches_selected})
    summary.update({"image": str(args.image), "labels": str(labels_path), "overlays": str(overlays_path),
                    "device_name": choice.name})
    if uncertainty_path is not None:
        summary["uncertainty"] = str(uncertainty_path)
    print(json.dumps(summary, indent=2))
    return 130 if summary["cancelled"] else 0


def _check_outputs(out: Path, overlays_path: Path) -> None:
    """What can be known about the outputs before the run: the export format (from OUT's suffix) and that the
    folders of OUT and of the overlays exist and can be written."""
    from napari_uhrseg.io.atomic import check_output_folder, check_replaceable
    from napari_uhrseg.io.export import guess_format

    if not _is_label_store_path(out):
        try:
            guess_format(out)
        except UhrsegError:
            raise UhrsegError(f"Cannot tell the output format from {out.name!r}: end OUT with .zarr (a label "
                              "store), .ome.tif, .ome.zarr, .png or .geojson.") from None
    check_output_folder(out)
    check_output_folder(overlays_path)
    check_replaceable(out, folder_output=_is_label_store_path(out) or out.name.lower().endswith(".ome.zarr"))
    from napari_uhrseg.methods.magnet import uncertainty_path

    for sidecar in (overlays_path, uncertainty_path(out)):  # files written beside OUT; never delete a folder
        if sidecar.is_dir():
            raise UhrsegError(f"{sidecar} is a folder, and uhrseg segment writes a file of that name next to "
                              "OUT: rename or move the folder, or choose another OUT.")


def parse_region(text: str | None):
    """``"y0,x0,y1,x1"`` (level-0 pixels) → a tuple of floats, or None."""
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise UhrsegError(f"--region {text!r} must be y0,x0,y1,x1 in level-0 pixels with y1 > y0 and x1 > x0.")
    return vals


def default_overlays_path(out: Path) -> Path:
    name = out.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr", ".tiff", ".tif", ".png", ".geojson"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(f"{name}.patches.geojson")


def starter_checkpoint(method_name: str) -> Path | None:
    """The starter checkpoint shipped for ``method_name``: its module's ``starter_checkpoint()`` when it has
    one, else ``starters/<name>*.pt`` in the package; None when there is none."""
    import importlib

    from napari_uhrseg.methods import get_method

    module = importlib.import_module(get_method(method_name).__module__)
    finder = getattr(module, "starter_checkpoint", None)
    if finder is not None:
        path = Path(finder())
        return path if path.is_file() else None
    starters = Path(__file__).resolve().parent.parent / "starters"
    found = sorted(starters.glob(f"{method_name.lower()}*.pt"))
    return found[0] if found else None


def build_method(name: str, checkpoint: str | None, device: str, mode: str | None = None):
    """``get_method(name).from_checkpoint(...)`` with the starter when no checkpoint is given."""
    from napari_uhrseg.methods import get_method

    try:
        cls = get_method(name)
    except KeyError as exc:
        raise UhrsegError(str(exc.args[0])) from None
    if checkpoint is None:
        checkpoint = starter_checkpoint(name)
        if checkpoint is None:
            raise CheckpointError(
                f"Method {name!r} has no starter checkpoint in this installation: pass --checkpoint PATH "
                f"(train one with `uhrseg train --method {name} ...`)."
            )
    method = cls.from_checkpoint(checkpoint, device=device)
    if mode is not None:
        set_mode(method, mode)
    return method


def set_mode(method, mode: str) -> None:
    """Choose GRNet's inference mode (``ppn``, ``all`` or ``global``) on a method that has one."""
    settings = getattr(method, "settings", None)
    if settings is not None and hasattr(settings, "mode"):
        settings.mode = mode
    elif hasattr(method, "set_mode"):
        method.set_mode(mode)
    elif hasattr(method, "mode"):
        method.mode = mode
    else:
        raise UhrsegError(f"Method {method.name!r} has no --mode; it applies to grnet only.")


def set_patch_batch(method, n: int) -> None:
    """GRNet's patches per R-branch call."""
    settings = getattr(method, "settings", None)
    if settings is None or not hasattr(settings, "patch_batch"):
        raise UhrsegError(f"Method {method.name!r} has no --patch-batch; it applies to grnet only.")
    if n < 1:
        raise UhrsegError(f"--patch-batch must be at least 1, not {n}.")
    settings.patch_batch = int(n)


def set_selection(method, *, scorer: str | None = None, top_k: int | None = None,
                  threshold: float | None = None) -> None:
    """GRNet's patch selection: what ranks the patches (``scorer``) and the rule (``top_k`` K or
    ``threshold`` P); None keeps the checkpoint's."""
    if scorer is None and top_k is None and threshold is None:
        return
    settings = getattr(method, "settings", None)
    if settings is None or not hasattr(settings, "scorer"):
        raise UhrsegError(f"Method {method.name!r} has no --scorer / --top-k / --threshold; they apply to grnet only.")
    if top_k is not None:
        if not 1 <= top_k <= settings.grid ** 2:
            raise UhrsegError(f"--top-k must be between 1 and the {settings.grid ** 2} patches of a window, "
                              f"not {top_k}.")
        settings.selection, settings.top_k = "topk", int(top_k)
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise UhrsegError(f"--threshold is a score in [0, 1], not {threshold}.")
        settings.selection, settings.threshold = "threshold", float(threshold)
    if scorer is not None:
        settings.scorer = scorer


@contextlib.contextmanager
def _label_store_for(out: Path, args, pyramid, region, class_names):
    """The store the engine writes into: OUT itself for ``.zarr`` (covering the region; its origin is recorded
    in the store's attributes); else a store shaped like the whole working level (memory, or a temporary zarr
    store when large: ``create_label_store`` decides), exported to OUT at the end, so that an exported region
    keeps the image's coordinates (GeoJSON, OME-TIFF) with the rest unlabelled."""
    from napari_uhrseg.engine.segment import downsample_pair, region_at_level
    from napari_uhrseg.io.labels import create_label_store

    if not 0 <= args.level < len(pyramid.levels):
        raise UhrsegError(f"Level {args.level} does not exist: {pyramid.name} has levels 0..{len(pyramid.levels) - 1}.")
    box = region_at_level(region, downsample_pair(pyramid.downsamples[args.level]), pyramid.level_shape(args.level))
    dtype = "uint8" if len(class_names) <= 256 else "uint16"
    if _is_label_store_path(out):
        store = create_label_store((box[2] - box[0], box[3] - box[1]), path=out, dtype=dtype,
                                   class_names=class_names, overwrite=args.overwrite)
        store.set_info(origin=[box[0], box[1]], level=args.level,
                       downsample=list(downsample_pair(pyramid.downsamples[args.level])),
                       pixel_size=pyramid.pixel_size, pixel_unit=pyramid.pixel_unit)
        yield store
    else:
        yield create_label_store(pyramid.level_shape(args.level), dtype=dtype, class_names=class_names)


def _is_label_store_path(out: Path) -> bool:
    name = out.name.lower()
    return name.endswith(".zarr") and not name.endswith(".ome.zarr")


def _write_labels(out: Path, store, method, pyramid, level: int) -> Path:
    if _is_label_store_path(out):
        return out
    from napari_uhrseg.io.export import export_labels

    return Path(export_labels(store.array, out, class_names=list(method.class_names),
                              pixel_size=pyramid.pixel_size, pixel_unit=pyramid.pixel_unit,
                              downsample=pyramid.downsamples[level]))


def _drive(gen, args, on_event=None):
    """Run the engine's generator, printing a line per window (and handing each event to ``on_event``);
    returns the result, or None after a second Ctrl-C."""
    t0 = time.perf_counter()
    try:
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_event is not None:
                on_event(ev)
            _say(args, f"window {ev.index + 1}/{ev.total}  {ev.seconds['total_s']:.2f} s "
                       f"(predict {ev.seconds['predict_s']:.2f} s, wait for read {ev.seconds['read_wait_s']:.2f} s)"
                       f"  elapsed {time.perf_counter() - t0:.1f} s")
    except KeyboardInterrupt:
        gen.close()
        print("uhrseg segment: interrupted; writing the finished windows.", file=sys.stderr)
        return None


@contextlib.contextmanager
def _first_ctrl_c_cancels(cancel: threading.Event, say):
    """The first Ctrl-C asks the engine to stop after the current window; the second interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        say("Ctrl-C: stopping after this window (press again to stop now); finished windows are kept.")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)
