"""Generic training pieces shared by the methods: labelled images, random augmented crops (dense masks or
sparse scribbles), a train/validation split, point-sampled losses, and a training loop written as a
generator of progress events (so a napari dock can drive it from a worker, stop it, and resume it).

Label convention (the label store's): value 0 = unlabelled / unknown, ignored by every loss when
``ignore_zero`` is set; values 1..K are classes 1..K, i.e. network outputs 0..K-1. Without ``ignore_zero``
(dense ground truth whose 0 is a real class, e.g. the synthetic scene's "background"), value v = output v.
Coordinates are pixels of the image as given (its working level).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.nn.losses import focal_loss

IGNORE = -100


# ------------------------------------------------------------------------------------------------- data
@dataclass
class LabelledImage:
    """An image (H, W, 3) uint8 and its labels (H, W) (dense or sparse), restricted to rows ``rows``."""

    image: np.ndarray
    labels: np.ndarray
    name: str = "image"
    rows: tuple[int, int] | None = None

    def __post_init__(self):
        if self.image.ndim != 3 or self.image.shape[2] != 3:
            raise UhrsegError(f"{self.name}: training needs an RGB image (H, W, 3), got shape {self.image.shape}.")
        if self.labels.shape != self.image.shape[:2]:
            raise UhrsegError(f"{self.name}: labels {self.labels.shape} and image {self.image.shape[:2]} differ in "
                              "size; give labels painted on this image.")
        if self.rows is None:
            self.rows = (0, self.image.shape[0])

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        y0, y1 = self.rows
        return self.image[y0:y1], self.labels[y0:y1]


def split_train_val(items: list[LabelledImage], val_share: float) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Hold out the bottom ``val_share`` of every image's rows for validation (works for a single slide too).

    Returns (train, val); val is empty when ``val_share`` is 0.
    """
    if not 0 <= val_share < 1:
        raise ValueError("val_share must be in [0, 1)")
    train, val = [], []
    for it in items:
        y0, y1 = it.rows
        cut = y1 - int(round((y1 - y0) * val_share))
        train.append(LabelledImage(it.image, it.labels, it.name, (y0, cut)))
        if cut < y1:
            val.append(LabelledImage(it.image, it.labels, it.name + " (val)", (cut, y1)))
    return train, val


def labels_to_target(labels: np.ndarray, ignore_zero: bool) -> np.ndarray:
    """Label-store values -> network targets (int64): v -> v - 1 and 0 -> IGNORE when ``ignore_zero``."""
    t = labels.astype(np.int64)
    if ignore_zero:
        t = t - 1
        t[t < 0] = IGNORE
    return t


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random 90° rotation and horizontal flip (8 dihedral poses), as GLNet and GRNet train."""
    k = int(rng.integers(4))
    image, target = np.rot90(image, k), np.rot90(target, k)
    if rng.random() < 0.5:
        image, target = image[:, ::-1], target[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(target)


class RandomCrops(torch.utils.data.IterableDataset):
    """Endless random ``crop``² crops (zero image / IGNORE target padding past the edges), augmented.

    With sparse labels most crops would be empty, so with probability ``focus`` a crop is placed around a
    random labelled pixel. Items: (image uint8 tensor (3, crop, crop), target int64 tensor (crop, crop)).
    """

    def __init__(self, items: list[LabelledImage], crop: int, *, ignore_zero: bool, seed: int = 0,
                 focus: float = 0.8, flips: bool = True):
        self.items = [it for it in items if it.rows[1] > it.rows[0]]
        if not self.items:
            raise UhrsegError("no training rows left: lower --val-share or give more images.")
        self.crop, self.ignore_zero, self.focus, self.flips = int(crop), ignore_zero, focus, flips
        self.rng = np.random.default_rng(seed)
        self._labelled = [None] * len(self.items)

    def _labelled_pixels(self, i: int) -> np.ndarray:
        if self._labelled[i] is None:
            _, lab = self.items[i].view()
            valid = labels_to_target(np.asarray(lab), self.ignore_zero) != IGNORE
            self._labelled[i] = np.flatnonzero(valid)
        return self._labelled[i]

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(self.rng.integers(len(self.items)))
        img, lab = self.items[i].view()
        h, w = lab.shape
        c = self.crop
        anchors = self._labelled_pixels(i)
        if anchors.size and self.rng.random() < self.focus:
            y, x = divmod(int(anchors[self.rng.integers(anchors.size)]), w)
            y0 = int(np.clip(y - self.rng.integers(c), 0, max(h - c, 0)))
            x0 = int(np.clip(x - self.rng.integers(c), 0, max(w - c, 0)))
        else:
            y0, x0 = int(self.rng.integers(max(h - c, 0) + 1)), int(self.rng.integers(max(w - c, 0) + 1))
        image = np.zeros((c, c, 3), np.uint8)
        target = np.full((c, c), IGNORE, np.int64)
        part_img = np.asarray(img[y0:y0 + c, x0:x0 + c])
        ph, pw = part_img.shape[:2]
        image[:ph, :pw] = part_img
        target[:ph, :pw] = labels_to_target(np.asarray(lab[y0:y0 + c, x0:x0 + c]), self.ignore_zero)
        if self.flips:
            image, target = augment(image, target, self.rng)
        return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(target)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, tgts = zip(*(self.sample() for _ in range(n)))
        return torch.stack(imgs), torch.stack(tgts)

    def __iter__(self):
        while True:
            yield self.sample()


def validation_windows(items: list[LabelledImage], window: int, *, ignore_zero: bool, limit: int = 8):
    """Fixed, non-overlapping ``window``² crops covering the validation rows (at most ``limit``), labelled ones
    only: list of (image uint8 (h, w, 3), target int64 (h, w))."""
    out = []
    for it in items:
        img, lab = it.view()
        h, w = lab.shape
        for y0 in range(0, h, window):
            for x0 in range(0, w, window):
                t = labels_to_target(np.asarray(lab[y0:y0 + window, x0:x0 + window]), ignore_zero)
                if (t != IGNORE).any():
                    out.append((np.asarray(img[y0:y0 + window, x0:x0 + window]), t))
    if len(out) > limit:  # spread the kept ones over the list
        out = [out[int(i)] for i in np.linspace(0, len(out) - 1, limit)]
    return out


# ------------------------------------------------------------------------------------------------- losses
def labelled_points(target: torch.Tensor, max_points: int, generator: torch.Generator | None = None):
    """(ys, xs, classes) of up to ``max_points`` labelled pixels (drawn with replacement) of one (H, W) target."""
    ys, xs = torch.nonzero(target != IGNORE, as_tuple=True)
    if ys.numel() > max_points:
        pick = torch.randint(ys.numel(), (max_points,), generator=generator, device=ys.device)
        ys, xs = ys[pick], xs[pick]
    return ys, xs, target[ys, xs]


def sample_logits(logits: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear values of (C, h, w) ``logits`` covering a ``size`` = (H, W) pixel region at pixel centres
    (ys, xs) of that region -> (P, C)."""
    hh, ww = size
    gx = (xs.float() + 0.5) / ww * 2 - 1
    gy = (ys.float() + 0.5) / hh * 2 - 1
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2).to(logits.dtype)
    return F.grid_sample(logits[None], grid, mode="bilinear", align_corners=False)[0, :, 0].t()


def point_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 3.0, max_points: int = 16384):
    """Focal loss of (N, C, h, w) logits against (N, H, W) full-resolution targets, at up to ``max_points``
    labelled pixels per item (thin scribbles survive, which downsampling the targets would erase)."""
    vals, cls = [], []
    for lg, tg in zip(logits, targets):
        ys, xs, c = labelled_points(tg, max_points)
        if c.numel():
            vals.append(sample_logits(lg, ys, xs, tg.shape))
            cls.append(c)
    if not vals:
        return logits.sum() * 0.0
    v = torch.cat(vals)
    return focal_loss(v.t()[None, :, :, None], torch.cat(cls)[None, :, None], gamma=gamma, ignore_index=IGNORE)


def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(k, k) confusion counts (rows = truth) over labelled pixels."""
    m = target != IGNORE
    return torch.bincount(target[m] * k + pred[m], minlength=k * k).view(k, k)


def miou(conf: torch.Tensor) -> float:
    """Mean IoU over the classes present in truth or prediction (NaN when nothing is labelled)."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if bool(present.any()) else float("nan")


# ------------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainEvent:
    """One progress report: after each step, and after each validation (``val_miou`` set)."""

    step: int
    total: int
    phase: str
    losses: dict[str, float]
    val_miou: float | None = None
    best_miou: float | None = None
    checkpoint: str | None = None
    seconds: float = 0.0
    done: bool = False
    extra: dict = field(default_factory=dict)


class Trainer(Protocol):
    """What ``run_training`` needs from a method's trainer."""

    def phase(self, step: int) -> str: ...
    def train_step(self, step: int) -> dict[str, float]: ...
    def validate(self, step: int) -> float: ...
    def save(self, path: Path, *, step: int, best: float | None, training_state: bool) -> Path: ...
    def load_training_state(self, state: dict) -> tuple[int, float | None]: ...
    def counts_for_best(self, step: int) -> bool: ...


def last_path(out: Path) -> Path:
    """Where the resumable state goes next to the best checkpoint ``out`` (``x.pt`` -> ``x.last.pt``)."""
    return out.with_name(out.stem + ".last" + out.suffix)


def run_training(trainer: Trainer, total_steps: int, out, *, val_every: int = 100, start_step: int = 0,
                 best: float | None = None, stop: Callable[[], bool] | None = None) -> Iterator[TrainEvent]:
    """Run ``trainer`` from ``start_step`` to ``total_steps`` and yield a ``TrainEvent`` per step.

    Every ``val_every`` steps (and at the end) it validates; a better validation mIoU (among steps where
    ``trainer.counts_for_best``) rewrites the best checkpoint ``out``; the resumable state (optimisers, step)
    goes to ``last_path(out)``. ``stop()`` returning True ends the run after the current step, keeping both
    files, so a later run can resume. Without validation data the final weights are the checkpoint.
    """
    out = Path(out)
    t0 = time.perf_counter()
    step = start_step
    while step < total_steps:
        phase = trainer.phase(step)
        losses = trainer.train_step(step)
        step += 1
        event = TrainEvent(step, total_steps, phase, losses, best_miou=best, seconds=time.perf_counter() - t0)
        stopping = bool(stop and stop())
        if step % val_every == 0 or step == total_steps or stopping:
            score = trainer.validate(step)
            event.val_miou = score
            if trainer.counts_for_best(step) and np.isfinite(score) and (best is None or score > best):
                best = score
                event.checkpoint = str(trainer.save(out, step=step, best=best, training_state=False))
            elif not np.isfinite(score) and (step == total_steps or stopping):
                event.checkpoint = str(trainer.save(out, step=step, best=best, training_state=False))
            trainer.save(last_path(out), step=step, best=best, training_state=True)
            event.best_miou = best
        if not out.exists() and (step == total_steps or stopping):
            event.checkpoint = str(trainer.save(out, step=step, best=best, training_state=False))
        event.done = step == total_steps or stopping
        yield event
        if stopping:
            return
