"""``uhrseg segment``: labels and overlays on disk, regions and levels, missing checkpoints, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import tifffile

from _segment_helpers import ChannelMethod, channel_probabilities, channel_scene, write_channel_checkpoint
from napari_uhrseg.cli import main
from napari_uhrseg.cli.segment import default_overlays_path
from napari_uhrseg.engine.overlays import read_overlays
from napari_uhrseg.io.labels import open_label_store
from napari_uhrseg.io.pyramid import open_pyramid


@pytest.fixture
def scene(tmp_path):
    image, truth = channel_scene((300, 420), seed=11)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, image)
    ckpt = write_channel_checkpoint(tmp_path / "channels.pt")
    return path, ckpt, image, truth


def _summary(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_segment_writes_a_label_store_and_patch_geojson(scene, tmp_path, capsys):
    path, ckpt, _, truth = scene
    out = tmp_path / "labels.zarr"
    code = main(["segment", str(path), "-o", str(out), "--method", "test-channels", "--checkpoint", str(ckpt),
                 "--window", "128", "--overlap", "16", "--device", "cpu"])
    assert code == 0
    summary = _summary(capsys)
    assert summary["windows"] == summary["windows_done"] == 12 and not summary["cancelled"]
    assert len(summary["seconds_per_window"]) == 12 and summary["device"] == "cpu"
    store = open_label_store(out)
    np.testing.assert_array_equal(np.asarray(store.array), truth)
    assert store.info["origin"] == [0, 0] and store.info["level"] == 0
    records = read_overlays(tmp_path / "labels.patches.geojson")
    assert len(records) == 4 * 12 == summary["patches"]
    image = scene[2]
    for rec in records:  # level 0: the patch probability recomputes from the image under the box
        y0, x0, y1, x1 = (int(round(v)) for v in rec["box"])
        assert 0 <= y0 < y1 <= 300 and 0 <= x0 < x1 <= 420
        assert rec["probability"] == pytest.approx(image[y0:y1, x0:x1, 0].mean() / 255.0, abs=1e-9)


def test_segment_region_at_level1_exports_ome_tiff(tmp_path, capsys):
    image, _ = channel_scene((600, 700), seed=12)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, image)
    ckpt = write_channel_checkpoint(tmp_path / "channels.pt")
    out = tmp_path / "big.ome.tif"
    code = main(["segment", str(path), "-o", str(out), "--method", "test-channels", "--checkpoint", str(ckpt),
                 "--window", "64", "--overlap", "8", "--level", "1", "--region", "40,80,580,500", "--quiet"])
    assert code == 0
    summary = _summary(capsys)
    pyr = open_pyramid(str(path))
    ds = pyr.downsamples[1]
    level1 = np.asarray(pyr.levels[1])
    y0, x0, y1, x1 = (int(round(v / ds)) for v in summary["region_level0"])
    # an export keeps the image's frame: the whole working level, the region filled, the rest unlabelled
    assert summary["labels_shape"] == list(level1.shape[:2])
    written = np.squeeze(tifffile.imread(out, level=0))
    expected = np.argmax(channel_probabilities(level1[y0:y1, x0:x1]), axis=0)
    np.testing.assert_array_equal(written[y0:y1, x0:x1], expected)
    outside = np.ones(written.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert (written[outside] == 0).all()
    assert (tmp_path / "big.patches.geojson").is_file()


def test_missing_checkpoint_without_starter_is_a_clear_error(scene, tmp_path, capsys):
    path, _, _, _ = scene
    code = main(["segment", str(path), "-o", str(tmp_path / "x.zarr"), "--method", "test-channels"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no starter checkpoint" in err and "--checkpoint" in err


def test_outputs_that_cannot_be_written_fail_before_the_first_window(scene, tmp_path, capsys, monkeypatch):
    """A missing folder, an unknown suffix or a read-only folder is reported before any window is computed."""
    import napari_uhrseg.engine.segment as engine

    path, ckpt, _, _ = scene
    ran = []
    real = engine.iter_segment
    monkeypatch.setattr(engine, "iter_segment", lambda *a, **k: ran.append(1) or real(*a, **k))
    common = ["--method", "test-channels", "--checkpoint", str(ckpt)]
    assert main(["segment", str(path), "-o", str(tmp_path / "nowhere" / "a.ome.tif"), *common]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert main(["segment", str(path), "-o", str(tmp_path / "a.xyz"), *common]) == 2
    err = capsys.readouterr().err
    assert "Cannot tell the output format from 'a.xyz'" in err and ".ome.tif" in err
    assert main(["segment", str(path), "-o", str(tmp_path / "a.zarr"), "--overlays",
                 str(tmp_path / "gone" / "p.geojson"), *common]) == 2
    assert "gone does not exist" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            assert main(["segment", str(path), "-o", str(locked / "a.ome.tif"), *common]) == 2
            assert "No permission to write" in capsys.readouterr().err
        finally:
            locked.chmod(0o700)
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scene.tif", "channels.pt"] + (["locked"] if os.geteuid() != 0 else []))


@pytest.mark.parametrize("name", ["mine.ome.tif", "mine.zarr", "mine.ome.zarr"])
def test_out_that_is_a_folder_of_the_users_is_refused_before_the_first_window(scene, tmp_path, capsys,
                                                                             monkeypatch, name):
    """OUT naming a folder of other files (not a zarr store) is never replaced, even with --overwrite: the run
    stops before any window and the folder keeps its files."""
    import napari_uhrseg.engine.segment as engine

    path, ckpt, _, _ = scene
    ran = []
    real = engine.iter_segment
    monkeypatch.setattr(engine, "iter_segment", lambda *a, **k: ran.append(1) or real(*a, **k))
    folder = tmp_path / name
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["segment", str(path), "-o", str(folder), "--method", "test-channels", "--checkpoint", str(ckpt),
                 "--overwrite"]) == 2
    assert f"{folder} is a folder" in capsys.readouterr().err
    assert ran == [] and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_unknown_method_and_bad_region(scene, tmp_path, capsys):
    path, ckpt, _, _ = scene
    assert main(["segment", str(path), "-o", str(tmp_path / "a.zarr"), "--method", "nope"]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
    assert main(["segment", str(path), "-o", str(tmp_path / "b.zarr"), "--method", "test-channels",
                 "--checkpoint", str(ckpt), "--region", "10,10,5"]) == 2
    assert "--region" in capsys.readouterr().err


def test_a_region_starting_above_the_image_is_clipped_not_an_argparse_error(scene, tmp_path, capsys):
    path, ckpt, _, _ = scene
    out = tmp_path / "a.zarr"
    code = main(["segment", str(path), "-o", str(out), "--method", "test-channels", "--checkpoint", str(ckpt),
                 "--region", "-20,-30,40,50", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["region_level0"] == [0, 0, 40, 50] and summary["labels_shape"] == [40, 50]


@pytest.mark.parametrize("args, said", [
    (["--method", "cascadepsp"], "uhrseg refine IMAGE --mask LABELS"),
    (["--device", "tpu"], "Unknown device 'tpu'"),
    (["--device", "cuda:x"], "Unknown device 'cuda:x'"),
], ids=["cascadepsp-does-not-segment", "no-such-device", "bad-cuda-index"])
def test_what_cannot_segment_is_said_without_a_traceback(scene, tmp_path, capsys, args, said):
    path, _, _, _ = scene
    out = tmp_path / "a.zarr"
    assert main(["segment", str(path), "-o", str(out), *args]) == 2
    assert said in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag", [["--patch-batch", "4"], ["--top-k", "2"], ["--threshold", "0.4"],
                                  ["--scorer", "ppn"]])
def test_grnet_flags_are_refused_for_other_methods(scene, tmp_path, capsys, flag):
    path, ckpt, _, _ = scene
    assert main(["segment", str(path), "-o", str(tmp_path / "a.zarr"), "--method", "test-channels",
                 "--checkpoint", str(ckpt), *flag]) == 2
    err = capsys.readouterr().err
    assert "grnet only" in err and flag[0] in err and not (tmp_path / "a.zarr").exists()


def test_patch_batch_must_be_positive():
    from napari_uhrseg.cli.segment import build_method, set_patch_batch
    from napari_uhrseg.errors import UhrsegError

    grnet = build_method("grnet", None, "cpu")  # the shipped starter
    set_patch_batch(grnet, 2)
    assert grnet.settings.patch_batch == 2
    with pytest.raises(UhrsegError, match="at least 1"):
        set_patch_batch(grnet, 0)


def test_grnet_selection_flags(scene, tmp_path):
    from napari_uhrseg.cli.segment import build_method, set_selection
    from napari_uhrseg.errors import UhrsegError

    path = scene[0]
    grnet = build_method("grnet", None, "cpu")  # the shipped starter
    set_selection(grnet, scorer="uncertainty", top_k=6)
    s = grnet.settings
    assert (s.scorer, s.selection, s.top_k) == ("uncertainty", "topk", 6)
    set_selection(grnet, threshold=0.4)
    assert (s.scorer, s.selection, s.threshold) == ("uncertainty", "threshold", 0.4)
    with pytest.raises(UhrsegError, match="between 1 and the 16"):
        set_selection(grnet, top_k=17)
    with pytest.raises(UhrsegError, match=r"in \[0, 1\]"):
        set_selection(grnet, threshold=1.5)
    # on the command line: the doubt-ranked top-2 refines 2 patches of every window, as the overlays say
    out = tmp_path / "g.zarr"
    assert main(["segment", str(path), "-o", str(out), "--scorer", "uncertainty", "--top-k", "2",
                 "--window", "256", "--overlap", "32", "--quiet"]) == 0
    records = read_overlays(default_overlays_path(out))
    windows = {r["window"] for r in records}
    assert sum(r["selected"] for r in records) == 2 * len(windows) > 0
    assert {r["scorer"] for r in records} == {"uncertainty"}  # "probability" is the doubt here
    features = json.loads(default_overlays_path(out).read_text())["features"]
    classes = {f["properties"]["classification"]["name"] for f in features}
    assert classes == {"Refined", "Not refined"}


def test_an_overlap_too_large_for_the_window_is_a_clear_error(scene, tmp_path, capsys):
    path, ckpt, _, _ = scene
    assert main(["segment", str(path), "-o", str(tmp_path / "a.zarr"), "--method", "test-channels",
                 "--checkpoint", str(ckpt), "--window", "128"]) == 2  # the default overlap is 128 px
    err = capsys.readouterr().err
    assert "--overlap" in err and "Traceback" not in err
    assert not (tmp_path / "a.zarr").exists()


def test_a_zero_window_is_refused_not_replaced_by_the_default(scene, tmp_path, capsys):
    path, ckpt, _, _ = scene
    assert main(["segment", str(path), "-o", str(tmp_path / "a.zarr"), "--method", "test-channels",
                 "--checkpoint", str(ckpt), "--window", "0"]) == 2
    assert "A window of 0 px is too small" in capsys.readouterr().err
    assert not (tmp_path / "a.zarr").exists()


def test_ctrl_c_stops_after_the_window_and_keeps_finished_windows(scene, tmp_path, capsys, monkeypatch):
    path, ckpt, _, truth = scene
    calls = {"n": 0}
    original = ChannelMethod.predict

    def predict(self, window, *, context=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the user presses Ctrl-C while the third window computes
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, window, context=context)

    monkeypatch.setattr(ChannelMethod, "predict", predict)
    out = tmp_path / "stopped.zarr"
    code = main(["segment", str(path), "-o", str(out), "--method", "test-channels", "--checkpoint", str(ckpt),
                 "--window", "128", "--overlap", "16"])
    assert code == 130
    summary = _summary(capsys)
    assert summary["cancelled"] and summary["windows_done"] == 3
    labels = np.asarray(open_label_store(out).array)
    from napari_uhrseg.engine.windows import window_grid

    done = np.zeros(labels.shape, bool)
    for w in window_grid((0, 0, 300, 420), 128, 16)[:3]:
        done[w.y0:w.y1, w.x0:w.x1] = True
    np.testing.assert_array_equal(labels[done], truth[done])
    assert (labels[~done] == 0).all()
    assert len(read_overlays(tmp_path / "stopped.patches.geojson")) == 4 * 3


def test_overlays_are_written_record_by_record(tmp_path):
    """A 20000² slide has ~8500 PPN records: writing them must not build the whole document in memory (it did,
    ~58 MB of Python objects at the very end of a run), and both formats read back the same records."""
    import tracemalloc

    from napari_uhrseg.engine.overlays import write_overlays

    records = [{"kind": "ppn_patch", "box": (float(i), 2.0 * i, i + 256.0, 2.0 * i + 256), "probability": i / 9000,
                "selected": i % 3 == 0, "window": i // 16, "level": 0} for i in range(8500)]
    for name in ("p.geojson", "p.json"):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        write_overlays(records, tmp_path / name)
        extra = tracemalloc.get_traced_memory()[1] - before
        tracemalloc.stop()
        assert extra < 8 * 2**20, f"{name}: {extra / 2**20:.1f} MB while writing"
        back = read_overlays(tmp_path / name)
        assert len(back) == len(records)
        assert back[4321]["box"] == records[4321]["box"] and back[4321]["selected"] == records[4321]["selected"]
