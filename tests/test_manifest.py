"""The npe2 manifest validates, and every command's python_name imports and is callable."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_uhrseg" / "napari.yaml"


def _manifest():
    return npe2.PluginManifest.from_file(MANIFEST)  # schema validation happens here


def test_manifest_validates_and_is_the_installed_one():
    mf = _manifest()
    assert mf.name == "napari-uhrseg"
    installed = npe2.PluginManifest.from_distribution("napari-uhrseg")
    assert installed.model_dump() == mf.model_dump()  # the entry point finds this very file


def test_every_python_name_imports():
    mf = _manifest()
    mf.validate_imports()  # npe2's own check (what `npe2 validate --imports` runs)
    for cmd in mf.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), cmd.id


def test_every_contribution_points_at_a_declared_command():
    mf = _manifest()
    ids = {c.id for c in mf.contributions.commands}
    used = [w.command for w in mf.contributions.widgets or []]
    used += [r.command for r in mf.contributions.readers or []]
    used += [w.command for w in mf.contributions.writers or []]
    used += [s.command for s in mf.contributions.sample_data or [] if hasattr(s, "command")]
    assert set(used) <= ids
    widget_ids = {w.command for w in mf.contributions.widgets or []}
    assert {"napari-uhrseg.export_dock", "napari-uhrseg.train_dock", "napari-uhrseg.checkpoints_dock"} <= widget_ids
