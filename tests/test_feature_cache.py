"""Cached features of frozen backbones: exact (the same losses as without the cache on the same crops), used
(hits, fewer backbone passes), bounded (LRU within the budget) and out of the way of everything else (gradients,
the live preview, checkpoints)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.engine.feature_cache import CropPool, FeatureCache
from napari_uhrseg.engine.scribbles import TrainingSettings, freeze_backbones, labelled_item, start_session
from napari_uhrseg.io.pyramid import open_pyramid
from napari_uhrseg.nn.backbones import build_backbone


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountingTrunk:
    """Counts the images the backbone's trunk really computes."""

    def __init__(self, backbone):
        self.images = 0
        real = backbone.trunk.forward_features

        def counted(x, n):
            self.images += x.shape[0]
            return real(x, n)

        backbone.trunk.forward_features = counted


def _frozen_backbone(stages=5):
    bb = build_backbone("efficientnet_lite0", pretrained=False, num_stages=stages)
    freeze_backbones(bb)
    return bb.eval()


def test_hits_return_the_backbones_own_maps_and_misses_compute_only_new_items():
    torch.manual_seed(0)
    bb = _frozen_backbone()
    count = CountingTrunk(bb)
    x = torch.rand(3, 3, 64, 64)
    want = [m.clone() for m in bb(x)]
    count.images = 0
    cache = FeatureCache()
    cache.attach(bb, keep=range(1, 5))
    with cache.active():
        first = bb(x)
        again = bb(x[[2, 0]])
        mixed = bb(torch.cat([x[1:2], torch.rand(1, 3, 64, 64)]))
    assert first[0] is None and all(m is not None for m in first[1:])
    for a, b in zip(first[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(again[1:], want[1:]):
        torch.testing.assert_close(a, b[[2, 0]], rtol=0, atol=0)  # hits: the very maps stored
    torch.testing.assert_close(mixed[1][0], want[1][1], rtol=0, atol=0)
    assert count.images == 3 + 1  # the three first items, then only the new one
    assert cache.stats.hits == 3 and cache.stats.misses == 4
    # returned maps are new tensors: changing them in place cannot change the cache
    again[1].zero_()
    with cache.active():
        torch.testing.assert_close(bb(x[:1])[1], want[1][:1], rtol=1e-5, atol=1e-6)


def test_no_cache_when_gradients_must_reach_the_backbone_or_outside_training():
    bb = _frozen_backbone(3)
    count = CountingTrunk(bb)
    cache = FeatureCache()
    cache.attach(bb)
    x = torch.rand(1, 3, 32, 32)
    bb(x)
    bb(x)  # not active (the live preview): straight to the backbone, nothing stored
    assert count.images == 2 and len(cache) == 0
    with cache.active():
        xg = x.clone().requires_grad_()
        out = bb(xg)
        out[-1].sum().backward()  # the gradient reaches the input: the backbone ran with autograd
        assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
        for p in bb.parameters():
            p.requires_grad_(True)
        bb(x)  # learning backbone: its maps change every step, never cached
    assert len(cache) == 0 and cache.stats.passes == 4
    assert "forward" not in bb.state_dict() and set(bb.state_dict()) == set(_frozen_backbone(3).state_dict())
    cache.detach()
    assert "forward" not in bb.__dict__


def test_memory_stays_within_the_budget_least_recently_used_go_first():
    bb = _frozen_backbone(3)
    per_item = sum(m[0].numel() * 4 for m in bb(torch.rand(1, 3, 64, 64)))
    cache = FeatureCache(budget_bytes=int(per_item * 2.5))
    cache.attach(bb)
    xs = [torch.rand(1, 3, 64, 64) for _ in range(4)]
    with cache.active():
        for x in xs[:3]:
            bb(x)
        assert len(cache) == 2 and cache.nbytes <= cache.budget and cache.stats.evictions == 1
        bb(xs[1])  # a hit: xs[1] becomes the most recent
        bb(xs[3])  # evicts xs[2], not xs[1]
        misses = cache.stats.misses
        bb(xs[1])
        assert cache.stats.misses == misses
        bb(xs[2])
        assert cache.stats.misses == misses + 1


def test_a_truncated_copy_shares_the_entries_of_its_source():
    torch.manual_seed(0)
    full, short = _frozen_backbone(5), _frozen_backbone(4)
    short.load_state_dict({k: v for k, v in full.state_dict().items() if k in short.state_dict()})
    x = torch.rand(2, 3, 64, 64)
    want = short(x)[-1].clone()
    cache = FeatureCache()
    cache.attach(full, keep=range(1, 5))
    assert cache.share(short, full)
    count = CountingTrunk(short)
    with cache.active():
        full(x)
        got = short(x)
    assert len(got) == 4 and count.images == 0
    torch.testing.assert_close(got[-1], want, rtol=1e-5, atol=1e-6)
    other = _frozen_backbone(4)  # different (random) weights: not shared
    assert not cache.share(other, full)


def test_crop_pool_draws_from_a_fixed_set_and_refreshes_when_asked():
    from napari_uhrseg.engine.train import LabelledImage, RandomCrops

    rng = np.random.default_rng(0)
    item = LabelledImage(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8), rng.integers(0, 3, (200, 200)).astype(np.uint8))
    pool = CropPool(RandomCrops([item], 64, ignore_zero=True, seed=0), 3, seed=0)
    images = {pool.batch(1)[0].numpy().tobytes() for _ in range(40)}
    assert len(images) == 3
    fresh = CropPool(RandomCrops([item], 64, ignore_zero=True, seed=0), 3, seed=0, refresh_every=2)
    seen = {fresh.batch(1)[0].numpy().tobytes() for _ in range(40)}
    assert len(seen) > 3


def _grnet_round(feature_cache_on: bool, tmp_path, iterations=10):
    image, scribbles = scribbled_scene()
    item = labelled_item(open_pyramid(image, name="scene"), scribbles)
    settings = TrainingSettings(iterations=iterations, crop=128, val_share=0.25, seed=1, crop_pool=4, val_every=5)
    session = start_session("grnet", [item], NAMES, settings=settings, out=tmp_path / f"cache{feature_cache_on}.pt")
    session.trainer.feature_cache.enabled = feature_cache_on
    events = list(session.events())
    return session, events


def test_grnet_round_with_cache_has_the_losses_of_the_uncached_round(tmp_path):
    from napari_uhrseg.methods.grnet_ppn import GRNetMethod

    cached, ev_c = _grnet_round(True, tmp_path)
    plain, ev_p = _grnet_round(False, tmp_path)
    assert [e.phase for e in ev_c] == [e.phase for e in ev_p] and {"global", "ppn", "main"} <= {e.phase for e in ev_c}
    for a, b in zip(ev_c, ev_p):
        assert a.losses.keys() == b.losses.keys()
        for k in a.losses:
            assert a.losses[k] == pytest.approx(b.losses[k], rel=1e-4, abs=1e-6), (a.step, k)
        if a.val_miou is not None:
            assert a.val_miou == pytest.approx(b.val_miou, abs=1e-3)
    stats = cached.trainer.feature_cache.stats
    # G-branch and PPN share one entry per pool crop; R-branch patches and validation windows add theirs
    assert stats.hits > stats.misses > 0 and stats.passes == 0
    assert plain.trainer.feature_cache.stats.hits == 0
    # the checkpoint is an ordinary GRNet checkpoint: same keys, loads, predicts
    method = GRNetMethod.from_checkpoint(tmp_path / "cacheTrue.pt", class_names=NAMES)
    assert set(method.model.state_dict()) == set(cached.trainer.model.state_dict())
    image, _ = scribbled_scene()
    assert method.predict(image[:128, :128]).probabilities.shape == (4, 128, 128)
    # the live preview (the session's method, outside the trainer's steps) leaves the cache alone
    entries = len(cached.trainer.feature_cache)
    cached.method().predict(image[128:, 128:])
    assert len(cached.trainer.feature_cache) == entries
