"""Training pieces: crops and augmentation keep image and labels aligned, sparse labels, PPN labels from
Eq. (1), a training run on scribbles lowers the loss, the generator saves/stops/resumes, and the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_uhrseg.engine.train import (
    IGNORE, LabelledImage, RandomCrops, labels_to_target, last_path, point_focal_loss, run_training, split_train_val)
from napari_uhrseg.methods.base import load_checkpoint
from napari_uhrseg.methods.grnet_ppn import GRNet, GRNetTrainer, train_main
from napari_uhrseg.methods.presets import grnet_preset

torch.set_num_threads(1)


def tiny_cfg(**kw):
    return grnet_preset("fast", global_size=64, refine_size=32, fpn_channels=8, aggregation_channels=8, window=128,
                        **kw)


def two_region_scene(size=256, sparse=True):
    """Left half dark (class 1), right half bright (class 2); labels are scribbles (0 elsewhere) or dense."""
    img = np.full((size, size, 3), 60, np.uint8)
    img[:, size // 2:] = 190
    img = (img + np.random.default_rng(0).integers(0, 20, img.shape)).astype(np.uint8)
    dense = np.where(np.arange(size)[None, :] < size // 2, 1, 2).astype(np.uint8).repeat(size, 0)
    if not sparse:
        return img, dense
    lab = np.zeros_like(dense)
    for y in range(8, size, 24):  # horizontal strokes 3 px thick
        lab[y:y + 3] = dense[y:y + 3]
    return img, lab


def test_targets_and_split():
    lab = np.array([[0, 1, 2]], np.uint8)
    assert labels_to_target(lab, True).tolist() == [[IGNORE, 0, 1]]
    assert labels_to_target(lab, False).tolist() == [[0, 1, 2]]
    img, lab = two_region_scene(100)
    train, val = split_train_val([LabelledImage(img, lab)], 0.2)
    assert train[0].rows == (0, 80) and val[0].rows == (80, 100)
    with pytest.raises(Exception, match="differ in size"):
        LabelledImage(img, lab[:50])


def test_crops_keep_image_and_labels_aligned():
    # the image encodes the label: red = 100 * label value; every augmentation must keep that
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 3, (70, 90)).astype(np.uint8)
    img = np.zeros((70, 90, 3), np.uint8)
    img[..., 0] = lab * 100
    img[..., 1] = np.arange(90)[None, :]  # asymmetric, so a mismatched flip would show
    ds = RandomCrops([LabelledImage(img, lab)], 64, ignore_zero=True, seed=0)
    for _ in range(20):
        x, t = ds.sample()
        assert x.shape == (3, 64, 64) and t.shape == (64, 64)
        m = t != IGNORE
        assert torch.equal(x[0][m].long(), (t[m] + 1) * 100)
        assert torch.all(x[0][~m] == 0)  # unlabelled pixels (value 0) and the padding


def test_ppn_labels_follow_equation_1():
    cfg = tiny_cfg()
    model = GRNet(cfg, 2, pretrained=False)
    trainer = GRNetTrainer(model, cfg, None, [], class_names=["u", "a", "b"], total_steps=1, batch_size=1)
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[:, :, 32:] = 1
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 0, :, :8] = 5  # left half right (class 0)
    logits[:, 1, :, 8:] = 5  # right half right (class 1) ...
    logits[:, 0, :4, 12:] = 10  # ... except the top-right cell, predicted class 0
    labels, mask = trainer.ppn_labels(logits, target, grid=4)
    assert mask.all()
    expected = torch.zeros(16)
    expected[3] = 1  # only the wrong cell scores below the window's mIoU
    assert torch.equal(labels[0], expected)


def test_gain_labels_mark_the_patches_refinement_helps_most(monkeypatch):
    # G-branch: class 0 everywhere. Truth: class 1 in cells 5, 9 and 10. The refinement gets 5 and 9 right
    # and not 10; cell 0 is unlabelled. Gain labels: 1 at 5 and 9 only (the top quarter by gain, gain > 0).
    cfg = tiny_cfg()
    model = GRNet(cfg, 2, pretrained=False)
    trainer = GRNetTrainer(model, cfg, None, [], class_names=["u", "a", "b"], total_steps=1, batch_size=1,
                           ppn_labels="gain")
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    for i in (5, 9, 10):
        r, c = divmod(i, 4)
        target[0, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 1
    target[0, :16, :16] = IGNORE
    logits_g = torch.zeros(1, 2, 16, 16)
    logits_g[:, 0] = 5

    def refine(patches, feat, logits):
        assert patches.shape[0] == 16 and torch.equal(logits, logits_g[0].unfold(1, 4, 4).unfold(2, 4, 4)
                                                      .permute(1, 2, 0, 3, 4).reshape(16, 2, 4, 4))
        agg = torch.zeros(16, 2, 8, 8)
        agg[:, 0] = 5
        agg[[5, 9], 1] = 10
        return agg, None

    monkeypatch.setattr(model, "refine", refine)
    x = torch.rand(1, 3, 64, 64)
    labels, mask = trainer.gain_labels(x, torch.zeros(1, 4, 16, 16), logits_g, target, grid=4)
    expected_mask = torch.ones(16, dtype=torch.bool)
    expected_mask[0] = False
    assert torch.equal(mask[0], expected_mask)
    expected = torch.zeros(16)
    expected[[5, 9]] = 1
    assert torch.equal(labels[0], expected)
    with pytest.raises(Exception, match="ppn_labels"):
        GRNetTrainer(model, cfg, None, [], class_names=["u", "a", "b"], total_steps=1, batch_size=1,
                     ppn_labels="oracle")


def test_sparse_label_training_lowers_the_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg(global_share=0.5, lr=1e-3)
    img, lab = two_region_scene(128)
    data = RandomCrops([LabelledImage(img, lab)], 128, ignore_zero=True, seed=0)
    model = GRNet(cfg, 2, pretrained=True)  # the shipped Lite0 weights: a realistic start
    trainer = GRNetTrainer(model, cfg, data, [], class_names=["u", "dark", "bright"], total_steps=16, batch_size=2,
                           round_steps=2)
    x, t = data.batch(4)
    x = x.float() / 255

    def loss():  # cross-entropy on a fixed batch, inference mode
        model.eval()
        with torch.no_grad():
            (_, lg), _ = model.forward_global(x)
        return float(point_focal_loss(lg, t, gamma=0.0))

    before = loss()
    phases = [trainer.phase(s) for s in range(16)]
    assert phases[:8] == ["global"] * 8 and phases[8:12] == ["ppn", "ppn", "main", "main"]
    steps = [trainer.train_step(s) for s in range(16)]
    assert loss() < 0.5 * before
    main = [s for s in steps if "L_A" in s]
    assert main and all(np.isfinite(s["L"]) and s["patches"] >= 1 for s in main)


def test_mainbody_trains_the_patches_its_scorer_would_refine(monkeypatch):
    # With scorer="uncertainty" inference refines the patches the G-branch doubts most; the Mainbody steps must
    # train the R-branch on those, not on PPN's choice (which inference no longer uses).
    import napari_uhrseg.methods.grnet_ppn as G

    torch.manual_seed(0)
    cfg = tiny_cfg(global_share=0.0, top_k=1, selection="topk", scorer="uncertainty")
    img, lab = two_region_scene(128, sparse=False)
    data = RandomCrops([LabelledImage(img, lab)], 128, ignore_zero=True, seed=0)
    trainer = GRNetTrainer(GRNet(cfg, 3, pretrained=False), cfg, data, [], class_names=["u", "dark", "bright"],
                           total_steps=4, batch_size=2, round_steps=1, max_train_patches=1)
    assert trainer.settings.scorer == "uncertainty"
    seen, ppn_calls = [], []
    real = G.patch_uncertainty
    monkeypatch.setattr(G, "patch_uncertainty", lambda lg, grid: seen.append(real(lg, grid)) or seen[-1])
    monkeypatch.setattr(trainer.model.ppn, "forward", lambda *a: ppn_calls.append(1) or torch.zeros(1))
    chosen = []
    monkeypatch.setattr(trainer, "_chosen_cells", lambda prob, f=trainer._chosen_cells: chosen.append(f(prob))
                        or chosen[-1])
    out = trainer._main_step()
    assert out["patches"] == 1 and not ppn_calls and len(seen) == 2  # one ranking per crop, no PPN pass
    assert [c[0] for c in chosen] == [int(torch.argmax(u)) for u in seen]


def test_run_training_saves_stops_and_resumes(tmp_path):
    cfg = tiny_cfg(global_share=0.25)
    img, lab = two_region_scene(256, sparse=False)
    train, val = split_train_val([LabelledImage(img, lab)], 0.5)

    def trainer(total):
        torch.manual_seed(0)
        from napari_uhrseg.engine.train import validation_windows

        return GRNetTrainer(GRNet(cfg, 3, pretrained=False), cfg,
                            RandomCrops(train, 128, ignore_zero=False), validation_windows(val, 128, ignore_zero=False),
                            class_names=["x", "dark", "bright"], ignore_index=None, total_steps=total, batch_size=1,
                            round_steps=1)

    out = tmp_path / "g.pt"
    calls = iter(range(100))
    events = list(run_training(trainer(8), 8, out, val_every=2, stop=lambda: next(calls) >= 2))
    assert [e.step for e in events] == [1, 2, 3] and events[-1].done and events[-1].val_miou is not None
    _, meta = load_checkpoint(last_path(out), method="grnet")
    assert meta["training_state"]["step"] == 3 and out.is_file()
    t2 = trainer(8)
    start, best = t2.load_training_state(meta["training_state"])
    events = list(run_training(t2, 8, out, val_every=2, start_step=start, best=best))
    assert [e.step for e in events] == [4, 5, 6, 7, 8] and events[-1].done
    assert all(0 <= e.val_miou <= 1 for e in events if e.val_miou is not None)


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "s.pt"
    args = ["--scene", "sample", "--scene-size", "256", "--window", "128", "--global-size", "64",
            "--refine-size", "32", "--batch-size", "1", "--round-steps", "1", "--val-every", "2", "--threads", "1",
            "--val-share", "0.5", "--out", str(out), "--no-pretrained"]
    assert train_main(args + ["--iterations", "3"]) == 0
    _, meta = load_checkpoint(out, method="grnet")
    assert meta["class_names"][:2] == ["background", "stripes"] and meta["ignore_index"] is None
    assert meta["window"] == 128 and meta["grid"] == 4 and "--scene sample" in meta["command"]
    assert train_main(args + ["--iterations", "5", "--resume", str(last_path(out))]) == 0
    _, meta = load_checkpoint(last_path(out))
    assert meta["training_state"]["step"] == 5
    printed = capsys.readouterr().out
    assert "[5/5]" in printed and "[1/" not in printed.split("[3/3]")[-1]
    assert train_main(args + ["--iterations", "5", "--resume", str(out)]) == 2  # best file: no training state


def test_cli_train_chooses_the_aggregation_form_and_a_resume_keeps_it(tmp_path):
    from napari_uhrseg.methods.grnet_ppn import GRNetMethod

    out = tmp_path / "p.pt"
    args = ["--scene", "sample", "--scene-size", "256", "--window", "128", "--global-size", "64",
            "--refine-size", "32", "--batch-size", "1", "--round-steps", "1", "--val-every", "2", "--threads", "1",
            "--val-share", "0.5", "--out", str(out), "--no-pretrained"]
    assert train_main(args + ["--iterations", "3", "--aggregation", "plain"]) == 0
    _, meta = load_checkpoint(out, method="grnet")
    assert meta["architecture"]["aggregation_residual"] is False  # the fast preset's default is residual
    assert GRNetMethod.from_checkpoint(out).model.cfg["aggregation_residual"] is False
    # a resumed run keeps the form it started with, whatever the flag says
    assert train_main(args + ["--iterations", "4", "--aggregation", "residual", "--resume", str(last_path(out))]) == 0
    _, meta = load_checkpoint(last_path(out))
    assert meta["architecture"]["aggregation_residual"] is False


def test_cli_train_frozen_backbones_trains_only_the_heads_and_a_resume_stays_frozen(tmp_path, capsys):
    out = tmp_path / "f.pt"
    args = ["--scene", "sample", "--scene-size", "256", "--window", "128", "--global-size", "64",
            "--refine-size", "32", "--batch-size", "1", "--round-steps", "2", "--val-every", "3", "--threads", "1",
            "--val-share", "0.5", "--crop-pool", "4", "--out", str(out), "--no-pretrained"]
    assert train_main(args + ["--iterations", "3", "--frozen-backbones"]) == 0
    first, meta = load_checkpoint(last_path(out))
    assert meta["frozen_backbone"] is True and "frozen backbones" in capsys.readouterr().out
    # resumed without the flag: the run keeps its mode, and the Mainbody rounds (steps 4-6 here) train its heads
    assert train_main(args + ["--iterations", "8", "--resume", str(last_path(out))]) == 0
    later, meta = load_checkpoint(last_path(out))
    assert meta["frozen_backbone"] is True and meta["training_state"]["step"] == 8
    backbone = [k for k in first if ".backbone." in k or k.startswith(("global_branch.backbone", "ppn.backbone"))]
    assert {k.split(".")[0] for k in backbone} >= {"global_branch", "refine_branch", "ppn"}
    for k in backbone:  # weights and batch-norm statistics alike
        assert torch.equal(first[k], later[k]), k
    learned = [k for k in first if k not in backbone and first[k].is_floating_point()
               and not torch.equal(first[k], later[k])]
    assert any(k.startswith("global_branch.") for k in learned) and any(k.startswith("refine_branch.") for k in learned)


def test_cli_train_init_freeze_global_keeps_the_g_branch_and_trains_the_rest(tmp_path, capsys):
    """`--init CKPT --freeze-global`: the new run starts from CKPT's weights (its window and architecture), its
    G-branch stays bit for bit as loaded -- weights and batch-norm statistics -- while R-branch, aggregation
    and PPN learn; the run says so in its checkpoint, and a resume keeps the G-branch fixed."""
    base = tmp_path / "base.pt"
    args = ["--scene", "sample", "--scene-size", "256", "--global-size", "64", "--refine-size", "32",
            "--batch-size", "1", "--round-steps", "2", "--val-every", "3", "--threads", "1", "--val-share", "0.5",
            "--no-pretrained"]
    assert train_main(args + ["--window", "128", "--iterations", "3", "--out", str(base)]) == 0
    start, _ = load_checkpoint(base, method="grnet")
    out = tmp_path / "fixed.pt"
    # no --window: the checkpoint's 128 px
    assert train_main(args + ["--iterations", "6", "--init", str(base), "--freeze-global", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "G-branch fixed" in printed and "G-branch alone for 0" in printed
    later, meta = load_checkpoint(last_path(out), method="grnet")
    assert meta["freeze_global"] is True and meta["init"] == str(base) and meta["window"] == 128
    g = [k for k in start if k.startswith("global_branch.")]
    assert g and all(torch.equal(start[k], later[k]) for k in g)
    learned = {k.split(".")[0] for k in start if start[k].is_floating_point() and not torch.equal(start[k], later[k])}
    assert {"refine_branch", "aggregation", "ppn"} <= learned
    assert train_main(args + ["--iterations", "8", "--resume", str(last_path(out)), "--out", str(out)]) == 0
    resumed, meta = load_checkpoint(last_path(out))
    assert meta["freeze_global"] is True and all(torch.equal(start[k], resumed[k]) for k in g)
    # what cannot work is refused with the reason
    assert train_main(args + ["--iterations", "2", "--freeze-global", "--out", str(tmp_path / "x.pt")]) == 2
    assert "give --init" in capsys.readouterr().err
    assert train_main(args + ["--iterations", "2", "--init", str(base), "--resume", str(last_path(out)),
                              "--out", str(tmp_path / "y.pt")]) == 2
    assert "not both" in capsys.readouterr().err
    from napari_uhrseg.methods.base import save_checkpoint

    state, meta = load_checkpoint(base, method="grnet")
    other = save_checkpoint(tmp_path / "other.pt", state, dict(meta, class_names=list(reversed(meta["class_names"]))))
    assert train_main(args + ["--iterations", "2", "--init", str(other), "--out", str(tmp_path / "z.pt")]) == 2
    assert "same classes" in capsys.readouterr().err


@pytest.mark.parametrize("method,bad", [
    ("grnet", ["--iterations", "0"]), ("grnet", ["--batch-size", "0"]), ("grnet", ["--crop-pool", "0"]),
    ("grnet", ["--pool-refresh", "-1"]), ("grnet", ["--round-steps", "x"]), ("grnet", ["--epochs", "0"]),
    ("magnet", ["--batch-size", "0"]), ("magnet", ["--refiner-steps", "-1"]), ("magnet", ["--minutes", "-1"]),
    ("cascadepsp", ["--batch-size", "0"]), ("cascadepsp", ["--crop", "16"]), ("cascadepsp", ["--max-steps", "0"]),
    ("cascadepsp", ["--minutes", "0"]),
])
def test_cli_train_refuses_counts_below_their_minimum(tmp_path, capsys, method, bad):
    """Before, '--iterations 0' fell through to the 2000-step default and a zero batch or crop ended in a
    traceback deep inside the run; now argparse exits 2 with the reason, before any data is read."""
    from napari_uhrseg.cli import main as uhrseg

    out = tmp_path / "never.pt"
    data = {"grnet": ["--scene", "sample"], "magnet": ["--scene", "sample"], "cascadepsp": []}[method]
    with pytest.raises(SystemExit) as exc:
        uhrseg(["train", "--method", method, "-o" if method != "grnet" else "--out", str(out)] + data + bad)
    assert exc.value.code == 2 and bad[0] in capsys.readouterr().err and not out.exists()
