"""Training from scribbles painted in a viewer: labelled regions -> a method's trainer -> progress events.

The Train dock (and scripts) use three calls::

    items = [labelled_item(pyramid, labels, level=0, name="slide")]       # crops to the painted area
    session = start_session("grnet", items, class_names, settings=TrainingSettings(iterations=200), out=path)
    for event in session.events(stop=lambda: stop_requested):             # engine.train.TrainEvent
        ...                                                               # session.method() segments meanwhile

Label convention: 0 = unlabelled (ignored by the losses), 1..K = classes; ``class_names[0]`` names value 0.
Coordinates: ``labels`` are pixels of the chosen pyramid level (the *training level*), and the model learns at
that level, so it should segment at the same level.

Each trainable method provides a builder here (``_BUILDERS``: GRNet/PPN below, the MagNet refiner and CascadePSP
fine-tuning in ``engine.scribble_trainers``); a method module that exposes its own
``build_scribble_trainer(items, class_names, class_colors, settings, resume_meta)`` joins the list without
changes to this file. Frozen-backbone mode caches the frozen backbones' features (``engine.feature_cache``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from napari_uhrseg.errors import CheckpointError, UhrsegError

#: Largest painted area (pixels, margin included) read into memory for one training image.
MAX_TRAIN_PIXELS = 64 * 2**20


@dataclass
class TrainingSettings:
    """What the user chooses. ``crop``: training crop side in training-level pixels (also the window the
    model is made for); ``val_every``: steps between validations (None: a tenth of the run, at least 5).

    Frozen-backbone mode (``frozen_backbone``) with ``feature_cache``: the crops come from a fixed pool of
    ``crop_pool`` augmented crops around the strokes (one replaced every ``pool_refresh`` steps; 0 = never) and
    each crop's backbone features are computed once and kept (at most ``cache_mb`` MiB; see
    ``engine.feature_cache``). ``init``: a checkpoint to start from (MagNet: a GRNet or MagNet checkpoint giving
    the backbone; CascadePSP: the refiner to fine-tune, default the shipped one)."""

    # A round: 140 steps; with the backbones frozen only the FPNs, heads and aggregation learn, from scratch, and
    # 3e-4 (three times the paper's 1e-4) gets them as far in 140 steps as 1e-4 in 200 (held-out mIoU on the
    # sample scene 0.769 vs 0.788, 55 s vs 76 s on 2 cores: docs/benchmarks.md).
    iterations: int = 140
    lr: float | None = None  # None: FROZEN_LR in frozen-backbone mode (GRNet), else the preset's
    crop: int = 512
    val_share: float = 0.15
    batch_size: int | None = None
    frozen_backbone: bool = True
    preset: str = "fast"
    device: str = "cpu"
    seed: int = 0
    val_every: int | None = None
    feature_cache: bool = True
    crop_pool: int = 32
    pool_refresh: int = 0
    cache_mb: int = 384
    init: str | None = None
    extra: dict = field(default_factory=dict)

    def validation_interval(self) -> int:
        return int(self.val_every or max(5, self.iterations // 10))


# ----------------------------------------------------------------------------------------------- data
FROZEN_LR = 3e-4  # GRNet's learning rate for a frozen-backbone round when none is chosen


def labelled_box(labels, margin: int = 0) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) around the non-zero labels, widened by ``margin`` and clipped; None when unlabelled."""
    from napari_uhrseg.engine.refine import FramedLabels

    if isinstance(labels, FramedLabels):  # labels of a region: only its own pixels can be set
        box = labels.bounding_box()
        if box is None:
            return None
        h, w = labels.shape
        return (max(0, box[0] - margin), max(0, box[1] - margin), min(h, box[2] + margin), min(w, box[3] + margin))
    arr = np.asarray(labels)
    rows = np.flatnonzero(arr.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(arr.any(axis=0))
    h, w = arr.shape
    return (max(0, int(rows[0]) - margin), max(0, int(cols[0]) - margin),
            min(h, int(rows[-1]) + 1 + margin), min(w, int(cols[-1]) + 1 + margin))


def labelled_item(pyramid, labels, *, level: int = 0, name: str | None = None, margin: int = 256):
    """A ``LabelledImage`` of the painted part of one image (plus ``margin`` pixels of context).

    ``labels`` must have the shape of pyramid level ``level``; only the box around the labels is read.
    """
    from napari_uhrseg.engine.train import LabelledImage

    name = name or getattr(pyramid, "name", "image")
    shape = tuple(int(v) for v in pyramid.level_shape(level))
    if tuple(labels.shape[-2:]) != shape:
        raise UhrsegError(
            f"The labels of {name} are {tuple(labels.shape)} but the image (level {level}) is {shape}: "
            "paint on a labels layer made for this image."
        )
    box = labelled_box(labels, margin)
    if box is None:
        raise UhrsegError(f"Nothing is painted on {name}: paint a few strokes of each class first (0 = unlabelled).")
    y0, x0, y1, x1 = box
    if (y1 - y0) * (x1 - x0) > MAX_TRAIN_PIXELS:
        raise UhrsegError(
            f"The strokes on {name} spread over {(y1 - y0)} x {(x1 - x0)} px, more than training reads at once: "
            "paint in a smaller area or train at a coarser level."
        )
    image = pyramid.read_region(level, y0, x0, y1 - y0, x1 - x0)
    return LabelledImage(image, np.ascontiguousarray(np.asarray(labels[y0:y1, x0:x1])), name=name)


# -------------------------------------------------------------------------------------------- sessions
@dataclass
class TrainingSession:
    """A trainer ready to run (or resume). ``make_method()`` wraps the live model for inference."""

    method_name: str
    trainer: Any
    total: int
    out: Path
    val_every: int
    make_method: Callable[[], Any]
    start: int = 0
    best: float | None = None
    info: dict = field(default_factory=dict)

    def events(self, stop: Callable[[], bool] | None = None) -> Iterator:
        """``engine.train.run_training`` over this session: one ``TrainEvent`` per step."""
        from napari_uhrseg.engine.train import run_training

        return run_training(self.trainer, self.total, self.out, val_every=self.val_every, start_step=self.start,
                            best=self.best, stop=stop)

    def method(self):
        return self.make_method()


def trainable_methods() -> list[str]:
    """Methods the Train dock can train: registered ones with a scribble-training builder."""
    from napari_uhrseg.methods import available_methods, get_method

    out = []
    for name in available_methods():
        module = importlib.import_module(get_method(name).__module__)
        if name in _BUILDERS or hasattr(module, "build_scribble_trainer"):
            out.append(name)
    order = list(_BUILDERS)  # GRNet/PPN (the default segmenter) first, then the refiners; others after
    return sorted(out, key=lambda n: (order.index(n) if n in order else len(order), n))


def start_session(method: str, items: list, class_names, class_colors=None, *, settings: TrainingSettings,
                  out, resume: str | Path | None = None) -> TrainingSession:
    """Build the trainer of ``method`` on ``items`` (``LabelledImage`` list, 0 = unlabelled).

    ``resume``: a ``.last.pt`` written by an earlier session; training goes on from its step (and, when that run
    had finished, for ``settings.iterations`` more steps).
    """
    from napari_uhrseg.methods import get_method
    from napari_uhrseg.methods.base import check_checkpoint_output

    method = method.lower()
    check_checkpoint_output(out)  # before the first step, not after the last
    cls = get_method(method)
    module = importlib.import_module(cls.__module__)
    builder = getattr(module, "build_scribble_trainer", None) or _BUILDERS.get(method)
    if builder is None:
        raise UhrsegError(
            f"Method {method!r} cannot be trained from the viewer yet: use `uhrseg train --method {method}`."
        )
    resume_state, resume_meta = _load_resume(resume, method)
    trainer, total, make_method = builder(items, list(class_names), class_colors, settings, resume_meta)
    start, best = 0, None
    if resume_state is not None:
        trainer.model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in resume_state.items()})
        start, best = trainer.load_training_state(resume_meta["training_state"])
        total = start + settings.iterations if start >= total else total
        trainer.total = total
    return TrainingSession(method, trainer, total, Path(out), settings.validation_interval(), make_method,
                           start=start, best=best)


def _load_resume(resume, method: str):
    if resume is None:
        return None, None
    from napari_uhrseg.methods.base import load_checkpoint

    state, meta = load_checkpoint(resume, method=method)
    if "training_state" not in meta:
        raise CheckpointError(f"{Path(resume).name} holds no training state: resume from its .last.pt file.")
    return state, meta


# ------------------------------------------------------------------------------------------- GRNet/PPN
def _grnet_builder(items, class_names, class_colors, settings: TrainingSettings, resume_meta):
    """GRNet/PPN made for ``settings.crop`` windows (the G-branch sees a crop at most 512 px wide, as it will see
    a window at inference), trained with the method's own schedule (G-branch, then PPN/Mainbody rounds)."""
    import torch

    from napari_uhrseg.engine.train import RandomCrops, split_train_val, validation_windows
    from napari_uhrseg.methods.grnet_ppn import GRNet, GRNetMethod, GRNetTrainer
    from napari_uhrseg.methods.presets import grnet_preset

    resume_meta = resume_meta or {}
    crop = int(resume_meta.get("window", settings.crop))  # a resumed run keeps the window it was made for
    preset = resume_meta.get("preset", settings.preset)
    base = grnet_preset(preset)
    lr = settings.lr or (FROZEN_LR if settings.frozen_backbone else None)
    overrides = dict(lr=lr, batch_size=settings.batch_size, window=crop,
                     global_size=min(base["global_size"], crop),
                     refine_size=min(base["refine_size"], max(32, crop // base["grid"])))
    if resume_meta:  # the checkpoint's network wins
        from napari_uhrseg.methods.presets import checkpoint_architecture

        overrides.update(checkpoint_architecture(resume_meta))
    cfg = grnet_preset(preset, **overrides)
    cfg["crop"] = crop
    torch.manual_seed(settings.seed)
    train_items, val_items = split_train_val(items, settings.val_share)
    data = RandomCrops(train_items, crop, ignore_zero=True, seed=settings.seed)
    val = validation_windows(val_items, crop, ignore_zero=True, limit=4)
    model = GRNet(cfg, len(class_names) - 1, pretrained=not resume_meta)
    install = None
    if settings.frozen_backbone:
        data, install = frozen_grnet(model, data, feature_cache=settings.feature_cache, crop_pool=settings.crop_pool,
                                     pool_refresh=settings.pool_refresh, seed=settings.seed, cache_mb=settings.cache_mb)
    round_steps = max(2, settings.iterations // 8)
    trainer = GRNetTrainer(model, cfg, data, val, class_names=class_names, class_colors=class_colors,
                           ignore_index=0, total_steps=settings.iterations, batch_size=cfg["batch_size"],
                           device=settings.device, round_steps=round_steps,
                           extra_meta={"trained_on": "scribbles in napari",
                                       "frozen_backbone": settings.frozen_backbone})
    if install is not None:
        install(trainer)

    def make_method():
        return GRNetMethod(model, class_names, ignore_index=0, settings=trainer.settings, device=settings.device,
                           meta={"window": crop})

    return trainer, settings.iterations, make_method


def frozen_grnet(model, data, *, feature_cache: bool = True, crop_pool: int = 32, pool_refresh: int = 0,
                 seed: int = 0, cache_mb: int = 384):
    """Frozen-backbone training of a GRNet: its three ImageNet backbones stay fixed and only the FPNs, heads,
    PPN classifier and aggregation learn (the Train dock's default; ``uhrseg train --method grnet
    --frozen-backbones``). Call before building the trainer; returns ``(data, install)``: the crops to train on
    (a ``CropPool`` over ``data`` when ``feature_cache``) and ``install(trainer)``, which serves the backbones'
    features from a ``FeatureCache`` during the trainer's steps and validations (a no-op without the cache)."""
    freeze_backbones(model.global_branch.backbone, model.refine_branch.backbone, model.ppn.backbone)
    # The saliency map multiplies the R-branch's input: while it learns, that input depends on the G-branch's
    # current output, so the frozen R-branch backbone would still run (and back-propagate) on every patch of
    # every step. Frozen mode keeps it at what it starts from (identity for a new model).
    model.saliency.requires_grad_(False)
    if not feature_cache:
        return data, lambda trainer: None
    from napari_uhrseg.engine.feature_cache import CropPool, FeatureCache

    data = CropPool(data, crop_pool, seed=seed, refresh_every=pool_refresh)
    cache = FeatureCache(cache_mb * 2**20)

    def install(trainer) -> None:
        def attach():  # after a resumed session has loaded its weights (the checks below read them)
            gb, pb, rb = model.global_branch.backbone, model.ppn.backbone, model.refine_branch.backbone
            cache.attach(gb, keep=range(1, gb.num_stages), slot="global")  # the FPN reads strides 4..32
            if not cache.share(pb, gb):  # the PPN's trunk is usually the G-branch's, cut short
                cache.attach(pb, keep=[-1], slot="ppn")
            if not bool(model.saliency.weight.any()):  # constant saliency: the R-branch input is the patch
                # With zero (frozen) weights the saliency's gradient with respect to the G-branch probabilities is
                # exactly zero, so detaching its output changes no gradient; it tells autograd (and the cache) that
                # the R-branch input needs none, so the patches' features can be served from the cache.
                model.saliency.register_forward_hook(_detach_if_constant)
                cache.attach(rb, keep=range(1, rb.num_stages), slot="refine")

        trainer.train_step = cache.wrap(trainer.train_step, attach)
        trainer.validate = cache.wrap(trainer.validate, attach)
        trainer.feature_cache = cache

    return data, install


def _detach_if_constant(module, _inputs, output):
    """Forward hook of a frozen conv whose weights are all zero: its output (bias only) is a constant."""
    if not module.weight.requires_grad and not bool(module.weight.any()):
        return output.detach()
    return None


def freeze_backbones(*backbones) -> None:
    """Keep pretrained backbones fixed: no gradients, and batch-norm layers always in inference mode.

    The trainer calls ``model.train()`` each step; a forward pre-hook puts the backbones' batch norms back in
    eval mode so that their running statistics (ImageNet's) are used and never updated by tiny scribble batches.
    """
    from torch import nn

    def keep_eval(module, _inputs):
        module.training = False

    for backbone in backbones:
        for p in backbone.parameters():
            p.requires_grad_(False)
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(keep_eval)


def _magnet_builder(*args):
    from napari_uhrseg.engine.scribble_trainers import build_magnet_trainer

    return build_magnet_trainer(*args)


def _cascadepsp_builder(*args):
    from napari_uhrseg.engine.scribble_trainers import build_cascadepsp_trainer

    return build_cascadepsp_trainer(*args)


# MagNet-Fast shares MagNet's checkpoints (method "magnet"): training "magnet" serves both.
_BUILDERS: dict[str, Callable] = {"grnet": _grnet_builder, "magnet": _magnet_builder,
                                  "cascadepsp": _cascadepsp_builder}

#: What each trainable method learns, for the Train dock's method list.
DESCRIPTIONS = {
    "grnet": "GRNet/PPN: the whole segmenter (frozen backbones by default)",
    "magnet": "MagNet refiner: the refinement module on a frozen backbone (from a GRNet or MagNet checkpoint)",
    "cascadepsp": "CascadePSP fine-tuning: the class-agnostic boundary refiner of the Refine dock",
}
