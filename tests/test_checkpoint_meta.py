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
