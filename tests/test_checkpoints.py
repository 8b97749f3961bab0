"""The checkpoint manager on real (small) checkpoints written by ``save_checkpoint`` and on damaged files."""
from __future__ import annotations

import pytest
import torch

from napari_uhrseg.checkpoints import CheckpointManager, default_checkpoint_dir
from napari_uhrseg.errors import CheckpointError
from napari_uhrseg.methods.base import save_checkpoint

CLASSES = ["background", "tissue", "tumour"]
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _write(path, method="grnet", classes=CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"head.weight": torch.randn(len(classes), 8, 1, 1, generator=g), "head.bias": torch.zeros(len(classes))}
    meta = {"method": method, "preset": "fast", "class_names": list(classes), "normalisation": NORM}
    return save_checkpoint(path, state, meta)


@pytest.fixture
def manager(tmp_path):
    starters = tmp_path / "starters"
    _write(starters / "starter-grnet.pt", seed=7)
    return CheckpointManager(tmp_path / "user", starters_dir=starters)


def test_default_folder_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "ck"))
    assert default_checkpoint_dir() == tmp_path / "ck"
    monkeypatch.delenv("UHRSEG_CHECKPOINT_DIR")
    assert default_checkpoint_dir().name == "checkpoints"
    assert "napari-uhrseg" in str(default_checkpoint_dir())


def test_list_shows_metadata_starters_and_damaged(manager, tmp_path):
    assert [i.name for i in manager.list()] == ["starter-grnet"]  # user folder does not exist yet
    _write(manager.folder / "mine.pt", method="magnet", classes=["bg", "road"])
    (manager.folder / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    infos = {i.name: i for i in manager.list()}
    assert set(infos) == {"mine", "broken", "starter-grnet"}
    mine = infos["mine"]
    assert (mine.method, mine.preset, mine.class_names, mine.starter) == ("magnet", "fast", ["bg", "road"], False)
    assert mine.created.startswith("20") and mine.size_bytes > 0
    assert infos["starter-grnet"].starter and infos["starter-grnet"].method == "grnet"
    assert not infos["broken"].ok and "damaged" in infos["broken"].error
    assert [i.name for i in manager.list(method="magnet")] == ["mine"]
    assert [i.name for i in manager.list(include_starters=False) if i.starter] == []


def test_load_checks_method_and_classes(manager):
    path = _write(manager.folder / "mine.pt")
    state, meta = manager.load("mine", method="grnet", class_names=CLASSES)
    ref = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(state["head.weight"], ref["head.weight"])
    assert meta["class_names"] == CLASSES
    with pytest.raises(CheckpointError, match="trained for method 'grnet', not 'magnet'"):
        manager.load("mine", method="magnet")
    with pytest.raises(CheckpointError, match="expected"):
        manager.load("mine", class_names=["a", "b"])
    with pytest.raises(CheckpointError, match="No checkpoint called 'nothing'"):
        manager.load("nothing")
    assert manager.load("starter-grnet")[1]["method"] == "grnet"


def test_damaged_and_foreign_files_are_clear_errors(manager, tmp_path):
    good = _write(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="damaged"):
        manager.import_file(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a napari-uhrseg checkpoint"):
        manager.import_file(foreign)
    assert not manager.folder.exists() or not list(manager.folder.iterdir())  # nothing half-imported


def test_rename_delete_and_starters_are_read_only(manager):
    _write(manager.folder / "a.pt")
    _write(manager.folder / "b.pt", seed=1)
    info = manager.rename("a", "liver run 1")
    assert info.name == "liver run 1" and info.path.is_file() and not (manager.folder / "a.pt").exists()
    with pytest.raises(CheckpointError, match="already exists"):
        manager.rename("b", "liver run 1")
    with pytest.raises(CheckpointError, match="not a usable checkpoint name"):
        manager.rename("b", "../escape")
    with pytest.raises(CheckpointError, match="starter"):
        manager.rename("starter-grnet", "x")
    with pytest.raises(CheckpointError, match="starter"):
        manager.delete("starter-grnet")
    manager.delete("b")
    assert sorted(i.name for i in manager.list()) == ["liver run 1", "starter-grnet"]


def test_import_validates_then_copies_and_export_round_trips(manager, tmp_path):
    src = _write(tmp_path / "outside.pt", method="cascadepsp", classes=["bg", "fg"], seed=3)
    with pytest.raises(CheckpointError, match="not 'grnet'"):
        manager.import_file(src, method="grnet")
    info = manager.import_file(src, name="refiner", method="cascadepsp")
    assert info.path == manager.folder / "refiner.pt" and info.class_names == ["bg", "fg"]
    assert info.path.read_bytes() == src.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        manager.import_file(src, name="refiner")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    exported = manager.export_file("refiner", out_dir)
    assert exported == out_dir / "refiner.pt" and exported.read_bytes() == src.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        manager.export_file("refiner", exported)
    assert manager.export_file("starter-grnet", tmp_path / "out" / "copy").name == "copy.pt"
    assert [p.name for p in out_dir.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_path_for_new_never_overwrites(manager):
    first = manager.path_for_new("grnet", "fast", stem="run")
    _write(first)
    second = manager.path_for_new("grnet", "fast", stem="run")
    assert first.name == "run.pt" and second.name == "run-2.pt"
    assert manager.path_for_new("grnet", "fast").name.startswith("grnet-fast-")


def test_resumable_states_are_hidden_unless_asked(manager):
    _write(manager.folder / "run.pt")
    _write(manager.folder / "run.last.pt")
    assert [i.name for i in manager.list(include_starters=False)] == ["run"]
    assert sorted(i.name for i in manager.list(include_starters=False, include_resumable=True)) == ["run", "run.last"]
