"""Scribble trainers of the Train dock beyond GRNet/PPN: the MagNet refiner and CascadePSP fine-tuning.

Both are ``engine.scribbles`` builders (``builder(items, class_names, class_colors, settings, resume_meta) ->
(trainer, total, make_method)``) whose trainers follow ``engine.train.Trainer``, so the dock, ``run_training``,
Stop / Resume and the best-checkpoint logic are the ones GRNet uses. Label convention: 0 = unlabelled (ignored
by every loss), 1..K = the classes; ``class_names[0]`` names value 0.

**MagNet refiner** (``build_magnet_trainer``; paper ``seeds/002``, training code ``methods.magnet_train``). The
refinement module learns on (coarse, fine) pairs with the backbone frozen, as in the paper. The backbone comes
from ``settings.init``: a GRNet checkpoint (its G-branch, e.g. the one the Train dock just made) or a MagNet one
(then only its refiner is trained further); both must have been trained on the same classes. Without ``init``
the first 40 % of the steps train the backbone's FPN head on the strokes (its ImageNet trunk frozen in
frozen-backbone mode), the rest the refiner. MagNet's window is 4 patches wide (the DeepGlobe schedule: scales
1/4, 1/2, 1 of the window); the patch is the GRNet checkpoint's window (its backbone learned at that scale) or
the dock's *Crop*. Frozen mode with ``feature_cache``: the (coarse, fine, target) triples are a fixed function of
the crop, so a pool of them (as many as ``crop_pool`` and ``cache_mb`` allow) is computed once and the steps run
the refiner only; the backbone phase caches its trunk's features (``engine.feature_cache``).

**CascadePSP fine-tuning** (``build_cascadepsp_trainer``; paper ``seeds/004`` §3.3). The shipped class-agnostic
refiner (or ``settings.init``) is trained further on perturbed masks of the user's labels: crops around the
painted pixels that hold at least two classes; one of them is the object, the other painted classes the
background. What is correct with label 0 = unlabelled: the ground truth of a pixel is known only where it is
painted. So (a) where a crop is fully painted, it is the paper's training exactly (perturbed ground truth, the
six-output loss); (b) elsewhere the perturbation needs a whole mask, so unpainted pixels take the class of the
nearest painted pixel before ``engine.perturb.perturb_mask`` degrades it, and every loss term is averaged over
painted pixels only (the gradient term over pixels whose whole 5 x 5 Sobel footprint is painted): the network is
never taught the nearest-stroke guess, only to put the painted pixels on the right side of the boundary given a
degraded mask. The checkpoint is a CascadePSP checkpoint (classes background / object) that the Refine dock uses.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_uhrseg.errors import CheckpointError, UhrsegError

MAGNET_BACKBONE_SHARE = 0.4  # of the steps, when there is no trained backbone to start from
MAGNET_BACKBONE_LR = 5e-4  # as `uhrseg train --method magnet`
MAGNET_SCHEDULE = "deepglobe"
MAGNET_REFINER_BATCH = 4  # the paper's 8 is too slow on a CPU for a round of strokes
MAGNET_REFINER_CROP = 192  # sub-window of the model input the refiner trains on (magnet_train._sub_crop)
VAL_WINDOWS = 2
CASCADE_VAL_SAMPLES = 8


# =============================================================================================== MagNet
def _magnet_start(settings, class_names, resume_meta):
    """(net, preset, input_ratio, patch, backbone_trained, source) for a new, initialised or resumed run."""
    from napari_uhrseg.methods import magnet as mg
    from napari_uhrseg.methods.base import load_checkpoint, read_checkpoint_meta
    from napari_uhrseg.methods.magnet_train import load_grnet_backbone

    names = list(class_names)
    if resume_meta:
        net = mg.build_net(len(names), resume_meta["preset"], pretrained=False)
        window = int(resume_meta["window"])
        return (net, resume_meta["preset"], float(resume_meta["input_ratio"]), window // 4,
                bool(resume_meta.get("backbone_trained", True)), resume_meta.get("started_from"))
    if settings.init:
        path = Path(settings.init)
        meta = read_checkpoint_meta(path)
        method = str(meta["method"]).lower()
        if method == "magnet":
            state, meta = load_checkpoint(path, method="magnet", class_names=names)
            net = mg.build_net(len(names), meta["preset"], pretrained=False)
            try:
                net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            except RuntimeError as exc:
                raise CheckpointError(f"{path.name} does not fit the MagNet {meta['preset']!r} network "
                                      f"({str(exc)[:160]}).") from None
            ratio = float(meta.get("input_ratio") or mg.get_schedule(MAGNET_SCHEDULE, preset=meta["preset"]).input_ratio)
            return net, meta["preset"], ratio, int(meta.get("window", 4 * settings.crop)) // 4, True, path.name
        if method == "grnet":
            arch = meta.get("architecture", {})
            preset = next((p for p, cfg in mg.BACKBONE_PRESETS.items()
                           if (cfg["backbone"], cfg["fpn_channels"]) == (arch.get("global_backbone"),
                                                                        arch.get("fpn_channels"))), "fast")
            net = mg.build_net(len(names), preset, pretrained=False)
            load_grnet_backbone(net, path, preset, names)  # checks the classes and the G-branch's architecture
            window = int(meta.get("window", settings.crop))
            ratio = min(1.0, float(arch.get("global_size", window)) / window)  # the scale its G-branch learned at
            return net, preset, ratio, window, True, path.name
        raise CheckpointError(
            f"{path.name} is a {meta['method']!r} checkpoint: MagNet starts from a GRNet checkpoint (its G-branch "
            "becomes the backbone) or a MagNet one. Train GRNet first, or leave 'Start from' empty.")
    preset = settings.extra.get("magnet_preset", "fast")
    net = mg.build_net(len(names), preset, pretrained=True)
    ratio = float(mg.get_schedule(MAGNET_SCHEDULE, preset=preset).input_ratio)
    return net, preset, ratio, int(settings.crop), False, None


def _windows_of(items, window: int) -> list:
    """(rgb, labels) windows of ``window``² cut from the items' rows; windows without strokes are dropped."""
    from napari_uhrseg.methods.magnet_train import cut_windows

    out = []
    for it in items:
        img, lab = it.view()
        if lab.shape[0] < 8 or lab.shape[1] < 8:
            continue
        out.extend((np.ascontiguousarray(i), np.ascontiguousarray(lb)) for i, lb in cut_windows([(img, lab)], window)
                   if lb.any() and min(lb.shape) >= 8)
    return out


class MagNetScribbleTrainer:
    """``engine.train.Trainer`` for MagNet on strokes: optional backbone phase, then the refiner (backbone frozen)."""

    def __init__(self, net, *, class_names, class_colors, preset, input_ratio, window, train_windows, val_windows,
                 total_steps, backbone_steps, settings, started_from=None):
        from napari_uhrseg.methods import magnet as mg
        from napari_uhrseg.methods.magnet_train import REFINER_LR, REFINER_MOMENTUM, REFINER_WEIGHT_DECAY

        self.net = self.model = net.to(settings.device)
        self.class_names, self.class_colors = list(class_names), class_colors
        self.preset, self.input_ratio, self.window = preset, float(input_ratio), int(window)
        self.schedule = mg.get_schedule(MAGNET_SCHEDULE, preset=preset, input_ratio=input_ratio)
        self.samples, self.val_windows = train_windows, val_windows
        if not self.samples:
            raise UhrsegError("No painted pixels are left for training once the validation rows are set aside: "
                              "paint more, or lower the validation share.")
        self.total, self.backbone_steps = int(total_steps), int(backbone_steps)
        self.settings, self.device = settings, settings.device
        self.started_from = started_from
        self.rng = np.random.default_rng(settings.seed)
        self.batch = int(settings.batch_size or MAGNET_REFINER_BATCH)
        trunk = net.backbone.branch.backbone
        head = [p for n, p in net.backbone.named_parameters() if not n.startswith("branch.backbone.")]
        bb_params = head if settings.frozen_backbone else list(net.backbone.parameters())
        if settings.frozen_backbone:
            from napari_uhrseg.engine.scribbles import freeze_backbones

            freeze_backbones(trunk)
        self.opt_backbone = torch.optim.Adam(bb_params, lr=settings.lr or MAGNET_BACKBONE_LR, weight_decay=1e-5)
        self.opt_refiner = torch.optim.SGD(net.refiner.parameters(), lr=settings.lr or REFINER_LR,
                                           momentum=REFINER_MOMENTUM, weight_decay=REFINER_WEIGHT_DECAY)
        self.cached = bool(settings.frozen_backbone and settings.feature_cache)
        self.feature_cache = None
        if self.cached and self.backbone_steps:
            from napari_uhrseg.engine.feature_cache import FeatureCache

            self.feature_cache = FeatureCache(settings.cache_mb * 2**20)
            self.feature_cache.attach(trunk, keep=range(1, trunk.num_stages), slot="magnet-trunk")
            self._backbone_pool = [self._backbone_item() for _ in range(max(1, settings.crop_pool))]
        self._coarse = None
        self._pairs = None  # the pool of refiner triples (cached mode)
        self.pool_size = 0

    # ---- schedule
    def phase(self, step: int) -> str:
        return "backbone" if step < self.backbone_steps else "refiner"

    def counts_for_best(self, step: int) -> bool:
        return step > self.backbone_steps or self.backbone_steps >= self.total

    # ---- steps
    def _backbone_item(self):
        from napari_uhrseg.methods.magnet_train import backbone_batch

        return backbone_batch(self.samples, self.schedule, self.rng, 1)

    def train_step(self, step: int) -> dict:
        if self.phase(step) == "backbone":
            return self._backbone_step()
        return self._refiner_step()

    def _backbone_step(self) -> dict:
        from napari_uhrseg.methods.magnet_train import _loss, backbone_batch

        if self.feature_cache is not None:
            picks = [self._backbone_pool[int(self.rng.integers(len(self._backbone_pool)))] for _ in range(self.batch)]
            images, target = torch.cat([p[0] for p in picks]), torch.cat([p[1] for p in picks])
        else:
            images, target = backbone_batch(self.samples, self.schedule, self.rng, self.batch)
        images, target = images.to(self.device), target.to(self.device)
        self.net.backbone.train()
        ctx = self.feature_cache.active() if self.feature_cache is not None else _null()
        with ctx:
            loss = _loss(self.net.backbone(images), target, 0)
        self.opt_backbone.zero_grad()
        loss.backward()
        self.opt_backbone.step()
        return {"L": float(loss.detach())}

    def _pair_batch(self):
        """(coarse, fine, target) for one refiner step: from the pool (cached mode) or fresh crops."""
        from napari_uhrseg.methods.magnet_train import coarse_predictions, refiner_batch

        if self._coarse is None:  # the backbone no longer changes: its whole-window predictions, once
            for p in self.net.backbone.parameters():
                p.requires_grad_(False)
            self._coarse = coarse_predictions(self.net, self.samples, self.schedule)
            if self.feature_cache is not None:
                self.feature_cache.detach()  # the backbone phase is over: free its entries
            if self.cached:
                self._fill_pool()
        if self._pairs is not None:
            picks = [self._pairs[int(self.rng.integers(len(self._pairs)))] for _ in range(self.batch)]
            coarse, fine, target = (torch.stack([p[i] for p in picks]) for i in range(3))
            return coarse.float(), fine.float(), target.long()
        self.net.eval()
        return refiner_batch(self.net, self.samples, self._coarse, self.schedule, self.rng, self.batch)

    def _fill_pool(self) -> None:
        from napari_uhrseg.methods.magnet_train import refiner_batch

        coarse, fine, target = refiner_batch(self.net, self.samples, self._coarse, self.schedule, self.rng, 1)
        per_pair = (coarse.numel() + fine.numel()) * 4 + target.numel()
        size = max(1, min(int(self.settings.crop_pool), int(self.settings.cache_mb * 2**20 // per_pair)))
        pairs = [(coarse[0], fine[0], target[0].to(torch.uint8))]
        while len(pairs) < size:
            c, f, t = refiner_batch(self.net, self.samples, self._coarse, self.schedule, self.rng, 1)
            pairs.append((c[0], f[0], t[0].to(torch.uint8)))
        self._pairs, self.pool_size = pairs, size

    def _refiner_step(self) -> dict:
        from napari_uhrseg.methods.magnet_train import _sub_crop, refiner_training_step

        coarse, fine, target = self._pair_batch()
        sub = min(MAGNET_REFINER_CROP, *target.shape[-2:])
        batch = _sub_crop((coarse, fine, target), sub, self.rng)
        batch = tuple(t.to(self.device) for t in batch)
        loss = refiner_training_step(self.net, batch, self.opt_refiner, 0)
        if not math.isfinite(loss):
            raise UhrsegError("MagNet's refiner loss is not a number: lower the learning rate.")
        return {"L": loss}

    # ---- validation and checkpoints
    def method(self, fast: bool = False):
        """The network being trained as a MagNet (``fast``: MagNet-Fast, 3 patches per scale instead of all)."""
        from napari_uhrseg.methods.magnet import MagNet, MagNetFast

        return (MagNetFast if fast else MagNet)(self.net, self.class_names, preset=self.preset,
                                                 schedule=MAGNET_SCHEDULE, device=self.device,
                                                 input_ratio=self.input_ratio, window_size=self.window)

    def validate(self, step: int) -> float:
        from napari_uhrseg.engine.train import confusion, labels_to_target, miou

        if not self.val_windows:
            return float("nan")
        method = self.method()
        k = len(self.class_names) - 1
        conf = torch.zeros(k, k, dtype=torch.long)
        for img, lab in self.val_windows:
            if self.phase(step - 1) == "backbone":
                probs = method.backbone_only(img)
            else:
                probs = method.predict(img).probabilities
            pred = torch.from_numpy(np.asarray(probs)[1:].argmax(0))  # channel 0 ("unlabelled") is never a class
            conf += confusion(pred, torch.from_numpy(labels_to_target(lab, True)), k)
        return miou(conf)

    def save(self, path, *, step: int, best, training_state: bool):
        from napari_uhrseg.methods.base import save_checkpoint
        from napari_uhrseg.methods.magnet import BACKBONE_PRESETS, normalisation_of

        meta = {"method": "magnet", "preset": self.preset, "schedule": MAGNET_SCHEDULE,
                "class_names": self.class_names,
                "class_colors": [list(c) for c in self.class_colors] if self.class_colors else None,
                "normalisation": normalisation_of(self.net), "backbone": BACKBONE_PRESETS[self.preset]["backbone"],
                "input_ratio": self.input_ratio, "ignore_index": 0, "window": self.window, "step": step,
                "best_val_miou": best, "trained_on": "scribbles in napari", "started_from": self.started_from,
                "frozen_backbone": bool(self.settings.frozen_backbone),
                "backbone_trained": bool(self.backbone_steps == 0 or step >= self.backbone_steps)}
        if training_state:
            meta["training_state"] = {"step": step, "best": best, "total": self.total,
                                      "backbone_steps": self.backbone_steps,
                                      "opt_backbone": self.opt_backbone.state_dict(),
                                      "opt_refiner": self.opt_refiner.state_dict()}
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        return save_checkpoint(path, state, meta)

    def load_training_state(self, state: dict):
        self.opt_backbone.load_state_dict(state["opt_backbone"])
        self.opt_refiner.load_state_dict(state["opt_refiner"])
        self.backbone_steps = int(state.get("backbone_steps", self.backbone_steps))
        return int(state["step"]), state.get("best")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_magnet_trainer(items, class_names, class_colors, settings, resume_meta):
    """The ``engine.scribbles`` builder of ``"magnet"`` (see the module doc)."""
    from napari_uhrseg.engine.train import split_train_val

    if len(class_names) < 3:
        raise UhrsegError("Name at least two classes after 'unlabelled'.")
    torch.manual_seed(settings.seed)
    net, preset, ratio, patch, backbone_trained, source = _magnet_start(settings, class_names, resume_meta)
    window = 4 * int(patch)  # the DeepGlobe schedule: the coarsest scale (the patch) is a quarter of the window
    train_items, val_items = split_train_val(items, settings.val_share)
    train, val = _windows_of(train_items, window), _windows_of(val_items, window)
    if len(val) > VAL_WINDOWS:
        val = [val[int(i)] for i in np.linspace(0, len(val) - 1, VAL_WINDOWS)]
    total = int(settings.iterations)
    backbone_steps = 0 if backbone_trained else max(1, int(round(MAGNET_BACKBONE_SHARE * total)))
    trainer = MagNetScribbleTrainer(net, class_names=class_names, class_colors=class_colors, preset=preset,
                                    input_ratio=ratio, window=window, train_windows=train, val_windows=val,
                                    total_steps=total, backbone_steps=backbone_steps, settings=settings,
                                    started_from=source)
    # the dock's live preview re-segments the view after every validation: MagNet-Fast (7 backbone passes per
    # window instead of 21) keeps that to seconds; the Segment dock offers both with the saved checkpoint
    return trainer, total, lambda: trainer.method(fast=True)


# =============================================================================================== CascadePSP
def masked_cascade_loss(out: dict, gt: torch.Tensor, valid: torch.Tensor) -> dict:
    """CascadePSP's six-output loss (``methods.cascadepsp.cascade_loss``: BCE on the coarse outputs, L1 + L2 on
    the fine ones, L1 of Sobel gradient magnitudes at full resolution) averaged over ``valid`` pixels only; the
    gradient term over pixels whose 5 x 5 footprint (3 x 3 mean, then 3 x 3 Sobel) is valid. With every pixel
    valid it equals ``cascade_loss``. ``gt``, ``valid``: (N, 1, H, W), {0, 1}."""
    from napari_uhrseg.methods.cascadepsp import LOSS_BCE_W, LOSS_GRAD_W, LOSS_L1L2_W, _sobel_magnitude

    valid = valid.float()
    n = valid.sum().clamp_min(1.0)
    keys = ("full", "s8_1", "s4_2", "s8_2", "s8_3", "s4_3")
    bce = l1l2 = gt.new_zeros(())
    for key, wb, wl in zip(keys, LOSS_BCE_W, LOSS_L1L2_W):
        logits = out[key]
        if wb:
            bce = bce + wb * (F.binary_cross_entropy_with_logits(logits, gt, reduction="none") * valid).sum() / n
        if wl:
            d = torch.sigmoid(logits) - gt
            l1l2 = l1l2 + wl * ((d.abs() + d * d) * valid).sum() / n
    footprint = -F.max_pool2d(-valid, 5, stride=1, padding=2)  # erosion: pixels whose 5 x 5 box is valid
    g = (_sobel_magnitude(torch.sigmoid(out["full"])) - _sobel_magnitude(gt)).abs()
    grad = LOSS_GRAD_W * (g * footprint).sum() / footprint.sum().clamp_min(1.0)
    return {"total": bce + l1l2 + grad, "bce": bce, "l1l2": l1l2, "grad": grad}


class ScribbleRefinementData:
    """(image, ground truth, perturbed mask, painted) samples of ``size``² from painted items (see the module doc).

    A crop of ``size`` x s px (s ~ U(1, 3), as the refiner's own training) is placed around a random painted pixel
    and resized to ``size``; one painted class present is the object, the other painted classes the background.
    """

    def __init__(self, items, size: int = 224, *, seed: int = 0, scale_range=(1.0, 3.0)):
        self.items = [it for it in items if min(it.view()[1].shape) >= 16 and it.view()[1].any()]
        if not self.items:
            raise UhrsegError("No painted pixels to fine-tune CascadePSP on: paint strokes of two classes or more.")
        self.size, self.scale_range = int(size), scale_range
        self.rng = np.random.default_rng(seed)
        self._painted = [np.flatnonzero(it.view()[1]) for it in self.items]
        if not any(np.unique(it.view()[1][it.view()[1] > 0]).size >= 2 for it in self.items):
            raise UhrsegError("CascadePSP learns the boundary between an object and its background: paint at "
                              "least two classes (the object and what surrounds it).")

    def sample(self, tries: int = 50):
        import cv2
        from scipy import ndimage

        from napari_uhrseg.engine.perturb import perturb_mask

        for _ in range(tries):
            i = int(self.rng.integers(len(self.items)))
            img, lab = self.items[i].view()
            h, w = lab.shape
            side = min(int(self.size * self.rng.uniform(*self.scale_range)), h, w)
            y, x = divmod(int(self._painted[i][self.rng.integers(self._painted[i].size)]), w)
            y0 = int(np.clip(y - self.rng.integers(side), 0, h - side))
            x0 = int(np.clip(x - self.rng.integers(side), 0, w - side))
            crop = np.asarray(lab[y0:y0 + side, x0:x0 + side])
            present = np.unique(crop[crop > 0])
            if present.size < 2:
                continue
            c = int(present[self.rng.integers(present.size)])
            painted = crop > 0
            if painted.all():
                dense = crop
            else:  # nearest painted pixel's class: only to give the perturbation a whole mask
                idx = ndimage.distance_transform_edt(~painted, return_distances=False, return_indices=True)
                dense = crop[idx[0], idx[1]]
            image = np.asarray(img[y0:y0 + side, x0:x0 + side])
            gt = (dense == c).astype(np.uint8)
            if side != self.size:
                image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
                gt = cv2.resize(gt, (self.size, self.size), interpolation=cv2.INTER_NEAREST)
                painted = cv2.resize(painted.astype(np.uint8), (self.size, self.size),
                                     interpolation=cv2.INTER_NEAREST).astype(bool)
            if not painted.any():
                continue
            seg = perturb_mask(gt, rng=self.rng)
            if self.rng.random() < 0.5:
                image, gt, seg, painted = image[:, ::-1], gt[:, ::-1], seg[:, ::-1], painted[:, ::-1]
            return (np.ascontiguousarray(image), np.ascontiguousarray(gt), np.ascontiguousarray(seg),
                    np.ascontiguousarray(painted))
        raise UhrsegError("No crop around the strokes holds two painted classes: paint strokes of the object and "
                          "of its background close to each other (within a few hundred pixels).")

    @staticmethod
    def to_batch(samples):
        image = torch.from_numpy(np.stack([s[0] for s in samples])).permute(0, 3, 1, 2).float() / 255
        gt = torch.from_numpy(np.stack([s[1] for s in samples])).float()[:, None]
        seg = torch.from_numpy(np.stack([s[2] for s in samples])).float()[:, None] * 2 - 1
        valid = torch.from_numpy(np.stack([s[3] for s in samples])).float()[:, None]
        return image, gt, seg, valid

    def batch(self, n: int):
        return self.to_batch([self.sample() for _ in range(n)])


class CascadePSPScribbleTrainer:
    """``engine.train.Trainer`` fine-tuning a CascadePSP refiner on painted labels (masked six-output loss)."""

    def __init__(self, model, *, preset, data, val_samples, total_steps, settings, class_names, started_from):
        from napari_uhrseg.methods.cascadepsp import LEARNING_RATE, WEIGHT_DECAY

        self.model = model.to(settings.device)
        self.preset, self.data, self.val_samples = preset, data, val_samples
        self.total, self.settings, self.device = int(total_steps), settings, settings.device
        self.class_names, self.started_from = list(class_names), started_from
        self.batch = int(settings.batch_size or 8)  # the paper's batch
        self.rng = np.random.default_rng(settings.seed + 1)
        self.feature_cache = None
        if settings.frozen_backbone:
            from napari_uhrseg.engine.scribbles import freeze_backbones

            freeze_backbones(model.backbone)
            if settings.feature_cache:
                from napari_uhrseg.engine.feature_cache import FeatureCache

                # the first cascade level sees (image, mask, mask, mask): fixed for a pooled sample, so cached;
                # levels 2 and 3 see the network's own outputs, which need a gradient: never cached.
                self.feature_cache = FeatureCache(settings.cache_mb * 2**20)
                self.feature_cache.attach(model.backbone, slot="cascadepsp")
                self._pool = [data.sample() for _ in range(max(1, settings.crop_pool))]
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=settings.lr or LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def phase(self, step: int) -> str:
        return "finetune"

    def counts_for_best(self, step: int) -> bool:
        return True

    def train_step(self, step: int) -> dict:
        if self.feature_cache is not None:
            batch = self.data.to_batch([self._pool[int(self.rng.integers(len(self._pool)))] for _ in range(self.batch)])
        else:
            batch = self.data.batch(self.batch)
        image, gt, seg, valid = (t.to(self.device) for t in batch)
        self.model.train()
        ctx = self.feature_cache.active() if self.feature_cache is not None else _null()
        with ctx:
            loss = masked_cascade_loss(self.model(image, seg), gt, valid)
        self.opt.zero_grad()
        loss["total"].backward()
        self.opt.step()
        return {"L": float(loss["total"].detach()), "bce": float(loss["bce"].detach()),
                "l1l2": float(loss["l1l2"].detach()), "grad": float(loss["grad"].detach())}

    def scores(self) -> tuple[float, float]:
        """(refined, input) mean IoU of object and background over the painted pixels of the validation samples."""
        if not self.val_samples:
            return float("nan"), float("nan")
        image, gt, seg, valid = (t.to(self.device) for t in ScribbleRefinementData.to_batch(self.val_samples))
        self.model.eval()
        with torch.no_grad():
            refined = torch.sigmoid(self.model(image, seg)["full"]) > 0.5
        self.model.train()
        return _binary_miou(refined, gt > 0.5, valid > 0.5), _binary_miou(seg > 0, gt > 0.5, valid > 0.5)

    def validate(self, step: int) -> float:
        return self.scores()[0]

    def save(self, path, *, step: int, best, training_state: bool):
        from napari_uhrseg.methods.cascadepsp import save_refiner

        extra = {"trained_on": "scribbles in napari", "painted_classes": self.class_names, "step": step,
                 "best_val_miou": best, "started_from": self.started_from,
                 "frozen_backbone": bool(self.settings.frozen_backbone)}
        if training_state:
            extra["training_state"] = {"step": step, "best": best, "total": self.total, "opt": self.opt.state_dict()}
        return save_refiner(path, self.model, self.preset, extra=extra)

    def load_training_state(self, state: dict):
        self.opt.load_state_dict(state["opt"])
        return int(state["step"]), state.get("best")


def _binary_miou(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> float:
    ious = []
    for p, t in ((pred, truth), (~pred, ~truth)):
        inter = int((p & t & valid).sum())
        union = int(((p | t) & valid).sum())
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)) if ious else float("nan")


def build_cascadepsp_trainer(items, class_names, class_colors, settings, resume_meta):
    """The ``engine.scribbles`` builder of ``"cascadepsp"`` (see the module doc). ``make_method`` gives the
    refiner being trained (``methods.cascadepsp.CascadePSP``); it segments nothing by itself, so the dock's
    live preview is skipped."""
    from napari_uhrseg.engine.train import split_train_val
    from napari_uhrseg.methods.base import load_checkpoint
    from napari_uhrseg.methods.cascadepsp import (
        PRESETS,
        STARTER_CHECKPOINT,
        TRAIN_CROP,
        CascadePSP,
        Preset,
        RefinementModule,
    )

    torch.manual_seed(settings.seed)
    if resume_meta:
        preset, source = resume_meta["preset"], resume_meta.get("started_from")
        arch = resume_meta.get("architecture")  # the widths it was made with (the fast preset's have changed)
        model = RefinementModule(Preset(**arch) if isinstance(arch, dict) else preset, pretrained=False)
    else:
        path = Path(settings.init) if settings.init else STARTER_CHECKPOINT
        load_checkpoint(path, method="cascadepsp")  # a clear message for another method's checkpoint
        refiner = CascadePSP.from_checkpoint(path)
        model, preset, source = refiner.model, refiner.preset, path.name
    if preset not in PRESETS:
        raise CheckpointError(f"Unknown CascadePSP preset {preset!r}.")
    train_items, val_items = split_train_val(items, settings.val_share)
    size = max(32, min(TRAIN_CROP, int(settings.crop)) // 8 * 8)  # the paper's 224 px crops (smaller if asked)
    data = ScribbleRefinementData(train_items, size, seed=settings.seed)
    val_samples = []
    if val_items:
        try:
            val_data = ScribbleRefinementData(val_items, size, seed=settings.seed + 7)
            val_samples = [val_data.sample() for _ in range(CASCADE_VAL_SAMPLES)]
        except UhrsegError:  # the held-out rows hold one class only: no validation, the last weights are kept
            val_samples = []
    trainer = CascadePSPScribbleTrainer(model, preset=preset, data=data, val_samples=val_samples,
                                        total_steps=settings.iterations, settings=settings,
                                        class_names=class_names, started_from=source)

    def make_method():
        return CascadePSP(trainer.model, preset=preset, device=settings.device)

    return trainer, int(settings.iterations), make_method
