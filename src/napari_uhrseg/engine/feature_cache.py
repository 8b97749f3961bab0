"""Cached features of frozen backbones: the frozen-backbone mode of scribble training, made fast.

With its backbone frozen (no gradients, batch norms in inference mode; ``engine.scribbles.freeze_backbones``) a
network's backbone is a fixed function of its input, and its feature maps are the same every time the same crop
comes back. Training on scribbles therefore draws its crops from a fixed pool (``CropPool``: augmented crops
around the strokes, drawn once per round) and a ``FeatureCache`` remembers each crop's backbone maps, so each
step only runs (and back-propagates through) the parts that learn: FPN, heads, aggregation. Validation windows
are fixed too, so they hit the cache from the second validation on.

What is cached, and when it is exact:

* the cache is keyed by the *content* of the backbone input (a BLAKE2b digest of each batch item's bytes), so a
  hit returns exactly the maps the backbone computed for those pixels: no step can get another crop's features;
* it answers only while gradients cannot reach the backbone (no backbone parameter and no input requiring a
  gradient); otherwise the call goes through to the backbone untouched. So a backbone input that depends on
  learned weights (GRNet's saliency-multiplied patches while the saliency learns) is never served from the cache;
* it only stores and serves while it is ``active`` (the trainer's steps and validations; ``cache.wrap``), so the
  live preview, which segments whatever the user looks at with the same model, neither fills nor uses it;
* memory is bounded: entries (the kept maps, float32, on the training device) are evicted least recently used
  beyond ``budget_bytes``; ``keep`` names the maps the backbone's users read (GRNet's branches drop the stride-2
  map, the PPN reads only its last), and the others come back as ``None``.

Consumers must not modify returned maps in place (they are the cache's; GRNet's, MagNet's and CascadePSP's
modules never do). The backbone itself is not modified: ``attach`` sets an instance ``forward`` that
``detach`` removes, so state dicts and checkpoints are unchanged.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

DEFAULT_BUDGET_MB = 384


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    passes: int = 0  # calls answered by the backbone itself (gradients needed, or inactive)
    evictions: int = 0

    def as_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "passes": self.passes, "evictions": self.evictions}


def digest(x: torch.Tensor) -> bytes:
    """BLAKE2b (16 bytes) of a tensor's shape, dtype and values."""
    a = x.detach()
    if a.device.type != "cpu":
        a = a.cpu()
    a = a.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(a.shape), str(a.dtype))).encode())
    h.update(memoryview(a.numpy()).cast("B") if a.numel() else b"")
    return h.digest()


class FeatureCache:
    """LRU memo of frozen backbones' feature maps, per batch item, keyed by input content (see the module doc)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_MB * 2**20):
        self.budget = int(budget_bytes)
        self.stats = CacheStats()
        self.nbytes = 0
        self._entries: "OrderedDict[tuple, list]" = OrderedDict()
        self._attached: list = []
        self._active = 0
        self._setups_done: list = []
        self.enabled = True  # False: every call goes to the backbone (same inputs, no cache: the baseline)

    # ------------------------------------------------------------------------------------------- set-up
    def attach(self, backbone, *, keep: Iterable[int] | None = None, slot: str | None = None) -> None:
        """Serve ``backbone``'s forward from the cache. ``keep``: indices of the maps to store (default: all;
        negative indices count from the end); ``slot``: a name separating its entries from other backbones'."""
        n = int(backbone.num_stages)
        keep_set = set(range(n)) if keep is None else {k % n for k in keep}
        self._install(backbone, slot or f"backbone{len(self._attached)}", keep_set, n, source=backbone)

    def share(self, backbone, source) -> bool:
        """Let ``backbone`` read ``source``'s entries when it is a truncated copy of it (same normalisation, same
        weights for every parameter and buffer it has, fewer stages): its maps are then the first
        ``backbone.num_stages`` maps of ``source``, computed once for both. Returns False (nothing attached)
        when they differ. ``source`` must be attached first, keeping the maps ``backbone``'s users read."""
        own, theirs = backbone.state_dict(), source.state_dict()
        same = (backbone.num_stages <= source.num_stages
                and tuple(backbone.input_mean) == tuple(source.input_mean)
                and tuple(backbone.input_std) == tuple(source.input_std)
                and all(k in theirs and own[k].shape == theirs[k].shape and torch.equal(own[k], theirs[k])
                        for k in own))
        entry = next((a for a in self._attached if a[0] is source), None)
        if not same or entry is None:
            return False
        _, slot, keep, _n, _src = entry
        self._install(backbone, slot, keep, int(backbone.num_stages), source=source)
        return True

    def _install(self, backbone, slot, keep, n_out, source) -> None:
        own = type(backbone).forward.__get__(backbone)  # the backbone's real forward (pass-through calls)
        compute = type(source).forward.__get__(source)  # the one that fills the entries (shared: the source's)
        frozen_check = [backbone] if source is backbone else [backbone, source]

        def forward(x: torch.Tensor):
            return self._features(frozen_check, own, compute, x, slot, keep, n_out)

        backbone.forward = forward  # an instance attribute: state dicts and the class are untouched
        self._attached.append((backbone, slot, keep, n_out, source))

    def detach(self) -> None:
        """Give every attached backbone its own forward back and drop all entries."""
        for backbone, *_ in self._attached:
            backbone.__dict__.pop("forward", None)
        self._attached.clear()
        self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    # ------------------------------------------------------------------------------------------- scope
    @contextmanager
    def active(self):
        """The cache stores and serves only inside this context (nests)."""
        self._active += 1
        try:
            yield self
        finally:
            self._active -= 1

    def wrap(self, fn: Callable, setup: Callable[[], None] | None = None) -> Callable:
        """``fn`` run with the cache active (for a trainer's ``train_step`` and ``validate``). ``setup`` (shared
        by every function wrapped with it) runs once, before the first call: attaching there rather than when
        the trainer is built lets a resumed session load its weights first."""

        def wrapped(*args, **kwargs):
            if setup is not None and setup not in self._setups_done:
                self._setups_done.append(setup)
                setup()
            with self.active():
                return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn
        return wrapped

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------------------------------- lookup
    def _features(self, modules, own, compute, x, slot, keep, n_out):
        if (not self._active or not self.enabled or x.dim() != 4 or x.shape[0] == 0
                or any(p.requires_grad for m in modules for p in m.parameters())
                or (torch.is_grad_enabled() and x.requires_grad)):
            self.stats.passes += 1
            return own(x)
        keys = [(slot, digest(item)) for item in x]
        found = [self._entries.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            # Inference tensors (a validation under torch.inference_mode) could not be used later by a training
            # step's autograd: compute plain tensors, without a graph.
            with torch.inference_mode(False), torch.no_grad():
                xm = x[missing].clone() if torch.is_inference(x) else x[missing]
                maps = compute(xm)
            for j, i in enumerate(missing):
                item = [m[j].clone() if k in keep else None for k, m in enumerate(maps)]
                found[i] = item
                self._store(keys[i], item)
        for k in keys:
            if k in self._entries:
                self._entries.move_to_end(k)
        out = []
        for k in range(n_out):
            if k in keep:
                out.append(torch.stack([f[k] for f in found]))  # a new tensor: callers never hold the cache's
            else:
                out.append(None)
        return out

    def _store(self, key, item) -> None:
        size = sum(m.numel() * m.element_size() for m in item if m is not None)
        if size > self.budget:
            return
        self._entries[key] = item
        self.nbytes += size
        while self.nbytes > self.budget and self._entries:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= sum(m.numel() * m.element_size() for m in old if m is not None)
            self.stats.evictions += 1


class CropPool:
    """A fixed pool of ``size`` augmented crops drawn from ``source`` (an ``engine.train.RandomCrops``), sampled
    with replacement: the same crops come back, so a frozen backbone's features can be cached.

    ``refresh_every``: every that many batches one pool crop (the oldest) is replaced by a fresh one (0: never),
    trading a backbone pass for variety on long runs. Same interface as ``RandomCrops`` (``sample``, ``batch``).
    """

    def __init__(self, source, size: int = 32, *, seed: int = 0, refresh_every: int = 0):
        if size < 1:
            raise ValueError("the crop pool needs at least one crop")
        self.source = source
        self.crop = source.crop
        self.crops = [source.sample() for _ in range(int(size))]
        self.rng = np.random.default_rng(seed)
        self.refresh_every = int(refresh_every)
        self._batches = 0
        self._oldest = 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.crops[int(self.rng.integers(len(self.crops)))]

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._batches += 1
        if self.refresh_every and self._batches % self.refresh_every == 0:
            self.crops[self._oldest] = self.source.sample()
            self._oldest = (self._oldest + 1) % len(self.crops)
        imgs, tgts = zip(*(self.sample() for _ in range(n)))
        return torch.stack(imgs), torch.stack(tgts)

    def __iter__(self):
        while True:
            yield self.sample()
