"""``read_checkpoint_meta`` reads the metadata without building the weights, checks it like ``load_checkpoint``,
and never runs code from a file."""
from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

from napari_uhrseg.errors import CheckpointError
from napari_uhrseg.methods.base import load_checkpoint, read_checkpoint_meta, save_checkpoint

META = {"method": "grnet", "preset": "fast", "class_names": ["unlabelled", "a", "b"],
        "normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3}, "window": 512}


def test_metadata_without_the_weights_is_the_full_loads_metadata(tmp_path):
    state = {"w": torch.randn(3, 3), "n": torch.tensor(7)}
    meta = dict(META, training_state={"step": 4, "opt": {"exp_avg": torch.ones(2)}})
    path = save_checkpoint(tmp_path / "c.pt", state, meta)
    fast = read_checkpoint_meta(path)
    full = load_checkpoint(path)[1]
    assert {k: v for k, v in fast.items() if k != "training_state"} == \
        {k: v for k, v in full.items() if k != "training_state"}
    assert fast["training_state"]["step"] == 4 and fast["training_state"]["opt"]["exp_avg"] is None  # no tensors


def test_bad_files_still_give_the_full_loads_messages(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_checkpoint_meta(tmp_path / "junk.pt")
    torch.save({"meta": {"method": "grnet"}, "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="lacks metadata"):
        read_checkpoint_meta(tmp_path / "old.pt")


def test_a_pickle_with_code_is_never_run(tmp_path):
    marker = tmp_path / "ran.txt"
    payload = pickle.dumps({"meta": dict(META), "state_dict": {}, "x": _Exec(str(marker))}, protocol=2)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")
    with pytest.raises(CheckpointError):
        read_checkpoint_meta(path)
    assert not marker.exists()


class _Exec:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def test_a_rewritten_checkpoint_is_read_again_and_callers_cannot_change_the_cached_copy(tmp_path):
    import os

    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(2)}, dict(META))
    first = read_checkpoint_meta(path)
    first["class_names"].append("changed by a caller")
    assert read_checkpoint_meta(path)["class_names"] == META["class_names"]
    save_checkpoint(path, {"w": torch.zeros(2)}, dict(META, class_names=["unlabelled", "x"]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewrite within the clock's resolution
    assert read_checkpoint_meta(path)["class_names"] == ["unlabelled", "x"]
    path.unlink()
    with pytest.raises(CheckpointError):
        read_checkpoint_meta(path)


@pytest.mark.parametrize("argv", [["--method", "magnet", "-o"], ["--method", "grnet", "--out"],
                                  ["--method", "cascadepsp", "-o"]])
def test_training_refuses_a_checkpoint_path_it_could_not_write_before_the_first_step(tmp_path, capsys, argv):
    """A folder at -o/--out ended hours of training with an IsADirectoryError traceback and the weights lost;
    now every trainer stops at once with a message, and the folder is untouched."""
    from napari_uhrseg.cli import main

    folder = tmp_path / "ck.pt"
    folder.mkdir()
    assert main(["train", *argv, str(folder)]) == 2
    assert f"{folder} is a folder: give the checkpoint a file name" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_save_checkpoint_reports_a_full_disk_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import torch

    from napari_uhrseg.errors import ExportError
    from napari_uhrseg.methods.base import save_checkpoint

    meta = {"method": "x", "preset": "fast", "class_names": ["a", "b"], "normalisation": {"mean": [0.5] * 3,
                                                                                         "std": [0.5] * 3}}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ExportError, match="disk is full"):
        save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(2)}, meta)
    assert list(tmp_path.iterdir()) == []
