"""Training MagNet (Huynh et al., CVPR 2021): the backbone first (or a GRNet G-branch reused), then the
refinement module with the backbone frozen, on (coarse whole-window, fine random-scale crop) pairs with OHEM
cross-entropy (threshold 0.7, min kept 100 000). ``uhrseg train --method magnet`` lands in ``train_main``.

Coordinates: training windows are whole images (or ``--window`` cuts of them); crop boxes are in window pixels.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from napari_uhrseg.methods.base import load_checkpoint
from napari_uhrseg.methods.magnet import (
    BACKBONE_PRESETS,
    OHEM_MIN_KEPT,
    OHEM_THRESHOLD,
    SCHEDULES,
    MagNetNet,
    Schedule,
    WindowPixels,
    _input_shape,
    _scale_shapes,
    build_net,
    crop_probabilities,
    get_schedule,
    normalisation_of,
    patch_boxes,
)

# The paper trains the refiner with SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 8, 50 epochs.
REFINER_LR, REFINER_MOMENTUM, REFINER_WEIGHT_DECAY, REFINER_BATCH = 1e-3, 0.9, 5e-4, 8


def _crop_box(scale: tuple[int, int], crop: tuple[int, int], window_shape: tuple[int, int], rng) -> tuple:
    """A random crop of side ``crop`` at a scale of ``scale`` pixels, returned in window pixels (floats)."""
    y = rng.integers(0, scale[0] - crop[0] + 1)
    x = rng.integers(0, scale[1] - crop[1] + 1)
    fy, fx = window_shape[0] / scale[0], window_shape[1] / scale[1]
    return (y * fy, x * fx, (y + crop[0]) * fy, (x + crop[1]) * fx)


def _read_crop(image: np.ndarray, labels: np.ndarray, box, size: tuple[int, int]):
    """Window-pixel ``box`` of an RGB image, resampled to ``size`` exactly as inference reads a patch
    (``WindowPixels``: antialiased bilinear from the window's pixels) as a float ``(3, h, w)`` tensor, and its
    labels (nearest) as an array."""
    import cv2

    y0, x0, y1, x1 = (int(round(v)) for v in box)
    rgb = WindowPixels(image).read([(y0, x0, y1, x1)], size)[0]
    lab = cv2.resize(labels[y0:y1, x0:x1], (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return rgb, lab


def _loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    from napari_uhrseg.nn.losses import ohem_cross_entropy

    return ohem_cross_entropy(logits, target, thresh=OHEM_THRESHOLD, min_kept=OHEM_MIN_KEPT,
                              ignore_index=ignore_index)


def backbone_batch(samples, schedule: Schedule, rng, batch_size: int):
    """Multi-scale crops for the backbone: a random scale of the schedule, a random crop of the crop size,
    resized to the model input (the backbone must read every scale it will see at inference)."""
    images, targets = [], []
    for _ in range(batch_size):
        image, labels = samples[rng.integers(len(samples))]
        scales = _scale_shapes(image.shape[:2], schedule)
        crop, size = scales[0], _input_shape(scales[0], schedule)
        box = _crop_box(scales[rng.integers(len(scales))], crop, image.shape[:2], rng)
        rgb, lab = _read_crop(image, labels, box, size)
        if rng.random() < 0.5:
            rgb, lab = rgb.flip(-1), lab[:, ::-1]
        images.append(rgb)
        targets.append(torch.from_numpy(lab.astype(np.int64)))
    return torch.stack(images), torch.stack(targets)


@torch.no_grad()
def coarse_predictions(net: MagNetNet, samples, schedule: Schedule) -> list[torch.Tensor]:
    """Each training window predicted whole at the model input size by the frozen backbone (the coarse
    member of every refiner training pair; computed once because the backbone does not change)."""
    net.eval()
    out = []
    for image, _ in samples:
        crop = _scale_shapes(image.shape[:2], schedule)[0]
        x = WindowPixels(image).read([(0, 0, *image.shape[:2])], _input_shape(crop, schedule))
        out.append(net.segment(x)[0])
    return out


def refiner_batch(net: MagNetNet, samples, coarse, schedule: Schedule, rng, batch_size: int):
    """(coarse, fine, target) pairs: coarse = crop of the whole-window prediction, fine = the backbone on a
    random crop of a random finer scale, both at the model input size (the paper's training pairs)."""
    coarse_in, images, targets = [], [], []
    for _ in range(batch_size):
        i = rng.integers(len(samples))
        image, labels = samples[i]
        scales = _scale_shapes(image.shape[:2], schedule)
        crop, size = scales[0], _input_shape(scales[0], schedule)
        finer = scales[1:] or scales
        box = _crop_box(finer[rng.integers(len(finer))], crop, image.shape[:2], rng)
        rgb, lab = _read_crop(image, labels, box, size)
        c = crop_probabilities(coarse[i], box, image.shape[:2], size)
        if rng.random() < 0.5:
            rgb, lab, c = rgb.flip(-1), lab[:, ::-1], c.flip(-1)
        coarse_in.append(c)
        images.append(rgb)
        targets.append(torch.from_numpy(lab.astype(np.int64)))
    with torch.no_grad():
        fine = net.segment(torch.stack(images))
    return torch.stack(coarse_in), fine, torch.stack(targets)


def _sub_crop(batch, size: int | None, rng):
    """The same random ``size``² sub-window of every (coarse, fine, target) triple: the refiner is fully
    convolutional, and training it on sub-windows of the model-input maps cuts CPU time (None = whole)."""
    coarse, fine, target = batch
    h, w = target.shape[-2:]
    if not size or size >= min(h, w):
        return batch
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return coarse[..., y : y + size, x : x + size], fine[..., y : y + size, x : x + size], target[..., y : y + size, x : x + size]


def refiner_training_step(net: MagNetNet, batch, optimizer, ignore_index: int) -> float:
    """One step on the refinement module; the backbone stays frozen (eval mode, no gradients)."""
    coarse, fine, target = batch
    net.backbone.eval()
    net.refiner.train()
    loss = _loss(net.refine(coarse, fine), target, ignore_index)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_backbone(net, samples, schedule, *, steps, lr, batch_size, ignore_index, rng, log=print):
    """Train the segmentation backbone alone on multi-scale crops (Adam, OHEM CE)."""
    net.backbone.train()
    opt = torch.optim.Adam(net.backbone.parameters(), lr=lr, weight_decay=1e-5)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        images, target = backbone_batch(samples, schedule, rng, batch_size)
        loss = _loss(net.backbone(images), target, ignore_index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps:
            log(f"backbone step {step}/{steps} loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f} s)")
    net.backbone.eval()


def train_refiner(net, samples, schedule, *, steps, lr, batch_size, ignore_index, rng,
                  optimizer="sgd", sub_crop=None, log=print, deadline=None):
    """Train the refinement module on (coarse, fine) pairs with the backbone frozen; ``deadline`` (a
    ``time.perf_counter()`` value) ends it early, after the step that passes it. Returns the steps done."""
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    coarse = coarse_predictions(net, samples, schedule)
    params = net.refiner.parameters()
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=REFINER_MOMENTUM, weight_decay=REFINER_WEIGHT_DECAY)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    step = 0
    for step in range(1, steps + 1):
        batch = refiner_batch(net, samples, coarse, schedule, rng, batch_size)
        loss = refiner_training_step(net, _sub_crop(batch, sub_crop, rng), opt, ignore_index)
        out_of_time = deadline is not None and time.perf_counter() >= deadline
        if step % 10 == 0 or step == steps or out_of_time:
            log(f"refiner step {step}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)")
        if out_of_time:
            log(f"refiner: time budget spent after {step} steps")
            break
    net.refiner.eval()
    return step


def _load_training_samples(args) -> tuple[list, list[str], int]:
    """(windows, class_names, ignore_index) from the data options, read by the GRNet trainer's loader so that
    both methods train on the same data the same way; windows are (rgb, labels) pairs."""
    from napari_uhrseg.methods.grnet_ppn import load_training_data

    items, class_names, _colors, ignore_zero, source = load_training_data(args)
    print(f"data: {source}", flush=True)
    return [(it.image, it.labels) for it in items], list(class_names), 0 if ignore_zero else -100


def _parser(method: str):
    import argparse

    from napari_uhrseg.cli._argtypes import count, non_negative, positive

    p = argparse.ArgumentParser(prog=f"uhrseg train --method {method}",
                                description="Train MagNet: the backbone first (or reuse one), then the refiner "
                                            "with the backbone frozen. One checkpoint serves MagNet and MagNet-Fast.")
    data = p.add_argument_group("data (one of; as for GRNet)")
    data.add_argument("--deepglobe", nargs="*", metavar="ID",
                      help="DeepGlobe tiles from the shared data (no ids: the project's train split)")
    data.add_argument("--images", help="folder of RGB images")
    data.add_argument("--masks", help="folder of label images <stem>.png (0 = unlabelled, 1..K = classes)")
    data.add_argument("--classes", help="comma-separated names of label values 1..K (with --images)")
    data.add_argument("--scene", choices=["sample"], help="the synthetic sample scene")
    data.add_argument("--scene-size", type=count(64), default=2448, help="side of the synthetic scene (px)")
    data.add_argument("--scene-seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--preset", choices=sorted(BACKBONE_PRESETS), default="fast")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="deepglobe")
    p.add_argument("--init", help="start from this MagNet checkpoint (e.g. to train only the refiner)")
    p.add_argument("--backbone-from", help="take the backbone from a GRNet checkpoint's G-branch (same backbone)")
    p.add_argument("--backbone-steps", type=count(0), default=300, help="backbone steps (0: keep the loaded one)")
    p.add_argument("--backbone-lr", type=float, default=5e-4)
    p.add_argument("--refiner-steps", type=count(0), default=200)
    p.add_argument("--refiner-lr", type=float, default=REFINER_LR)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="refiner optimiser (paper: sgd)")
    p.add_argument("--batch-size", type=count(1), default=REFINER_BATCH)
    p.add_argument("--refiner-crop", type=count(0), default=0,
                   help="train the refiner on random sub-windows of this side of the model input (0 = whole)")
    p.add_argument("--window", type=count(0), default=0,
                   help="cut the training images into windows of this side (0 = each image is one window); "
                        "stored as the window the checkpoint segments with")
    p.add_argument("--input-ratio", type=positive, default=None,
                   help="model input side / crop side (default: the preset's; 1 keeps full resolution, "
                        "needed when classes differ only in fine texture)")
    p.add_argument("--minutes", type=non_negative, default=0,
                   help="time budget of the refiner training in minutes: stop after the step that spends it "
                        "(0 = run all --refiner-steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=count(0), default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--half", action="store_true", help="store float weights in float16 (half the size; a starter)")
    return p


def cut_windows(samples: list, window: int) -> list:
    """Training images larger than ``window`` cut into ``window``² windows (the grid of ``patch_starts``)."""
    if not window:
        return samples
    out = []
    for image, labels in samples:
        for y0, x0, y1, x1 in patch_boxes(labels.shape[:2], (window, window)):
            out.append((image[y0:y1, x0:x1], labels[y0:y1, x0:x1]))
    return out


def load_grnet_backbone(net: MagNetNet, path, preset: str, class_names: list[str]) -> None:
    """Copy a GRNet checkpoint's G-branch into ``net``'s backbone; its backbone and FPN width must match."""
    from napari_uhrseg.errors import CheckpointError

    state, meta = load_checkpoint(path, method="grnet", class_names=class_names)
    arch, cfg = meta.get("architecture", {}), BACKBONE_PRESETS[preset]
    if (arch.get("global_backbone"), arch.get("fpn_channels"), arch.get("global_stages")) != (
            cfg["backbone"], cfg["fpn_channels"], 5):
        raise CheckpointError(
            f"{Path(path).name}: its G-branch is {arch.get('global_backbone')} with a {arch.get('fpn_channels')}-"
            f"channel FPN; MagNet preset {preset!r} needs {cfg['backbone']} with {cfg['fpn_channels']}.")
    branch = {k[len("global_branch."):]: v.float() for k, v in state.items() if k.startswith("global_branch.")}
    weight = branch.get("classify.weight")
    if weight is not None and weight.shape[0] == len(class_names) - 1:
        # GRNet ignoring label 0 predicts classes 1..K only; MagNet keeps a channel per label value, so
        # channel 0 ("unknown") gets a zero weight and a very low bias: never predicted, as in GRNet.
        branch["classify.weight"] = torch.cat([torch.zeros_like(weight[:1]), weight])
        branch["classify.bias"] = torch.cat([torch.full((1,), -20.0), branch["classify.bias"]])
    net.backbone.branch.load_state_dict(branch)


def train_main(argv: list[str] | None = None, method: str = "magnet") -> int:
    """``uhrseg train --method magnet|magnet-fast``: one checkpoint serves both (its method is ``magnet``)."""
    from napari_uhrseg.methods.base import check_checkpoint_output, save_checkpoint

    args = _parser(method).parse_args(argv)
    check_checkpoint_output(args.out)  # before the training, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    samples, class_names, ignore_index = _load_training_samples(args)
    samples = cut_windows(samples, args.window)
    preset, input_ratio = args.preset, args.input_ratio
    if args.init:
        state, meta = load_checkpoint(args.init, method="magnet", class_names=class_names)
        preset, input_ratio = meta["preset"], input_ratio or meta.get("input_ratio")
        net = build_net(len(class_names), preset, pretrained=False)
        net.load_state_dict(state)
    else:
        net = build_net(len(class_names), preset, pretrained=True)
    if args.backbone_from:
        load_grnet_backbone(net, args.backbone_from, preset, class_names)
    schedule = get_schedule(args.schedule, preset=preset, input_ratio=input_ratio)
    print(f"MagNet {preset}: {len(samples)} windows, classes {class_names}, {schedule}", flush=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    if args.backbone_steps:
        train_backbone(net, samples, schedule, steps=args.backbone_steps, lr=args.backbone_lr,
                       batch_size=args.batch_size, ignore_index=ignore_index, rng=rng, log=log)
    refiner_steps = 0
    if args.refiner_steps:
        deadline = time.perf_counter() + 60 * args.minutes if args.minutes else None
        refiner_steps = train_refiner(net, samples, schedule, steps=args.refiner_steps, lr=args.refiner_lr,
                                      batch_size=args.batch_size, ignore_index=ignore_index, rng=rng,
                                      optimizer=args.optimizer, sub_crop=args.refiner_crop or None, log=log,
                                      deadline=deadline)
    meta = {"method": "magnet", "preset": preset, "schedule": args.schedule, "class_names": class_names,
            "normalisation": normalisation_of(net), "backbone": BACKBONE_PRESETS[preset]["backbone"],
            "input_ratio": schedule.input_ratio, "ignore_index": ignore_index,
            "window": int(args.window or max(samples[0][1].shape[:2])),
            "training": {"argv": list(argv or []), "backbone_steps": args.backbone_steps,
                         "refiner_steps": refiner_steps, "backbone_from": args.backbone_from,
                         "command": "uhrseg train --method magnet " + " ".join(argv or []),
                         "half": bool(args.half)}}
    # Loading copies into the float32 network, so fp16 weights come back as float32 (rounded to fp16 precision).
    state = {k: (v.half() if args.half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in net.state_dict().items()}
    path = save_checkpoint(args.out, state, meta)
    print(f"wrote {path}", flush=True)
    return 0
