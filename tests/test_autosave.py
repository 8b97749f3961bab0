"""Autosave: snapshots round-trip, only changed chunks are rewritten, and SIGKILL never corrupts a snapshot."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from napari_uhrseg.engine.autosave import (
    Autosaver,
    autosave_root,
    discard,
    find_autosave,
    image_id_for,
    restore,
)
from napari_uhrseg.errors import UhrsegError


def _chunk_files(info):
    return {p.name: p.stat().st_mtime_ns for p in (info.folder / "chunks").iterdir()}


def test_root_and_image_id(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "as"))
    assert autosave_root() == tmp_path / "as"
    img = tmp_path / "slide.svs"
    img.write_bytes(b"x")
    assert image_id_for(img) == str(img.resolve())
    assert image_id_for("scene (in memory)") == "scene (in memory)"


def test_numpy_round_trip_manifest_and_discard(tmp_path):
    labels = np.zeros((300, 500), np.uint8)
    labels[10:50, 20:400] = 3
    saver = Autosaver("slide-a", labels, classes=["bg", "a", "b", "c"], root=tmp_path, chunk_shape=(128, 128))
    assert find_autosave("slide-a", root=tmp_path) is None
    info = saver.save_now()
    assert (info.shape, info.dtype, info.chunk_shape, info.generation) == ((300, 500), "|u1", (128, 128), 1)
    assert info.classes == ["bg", "a", "b", "c"] and "autosaved" in info.describe()
    assert len(info.chunks) == 3 * 4
    # all-zero chunks are recorded without a file; identical chunks share one
    assert len(_chunk_files(info)) == len(set(info.chunks.values()) - {"0"}) < 12
    np.testing.assert_array_equal(restore("slide-a", root=tmp_path), labels)
    assert find_autosave("slide-b", root=tmp_path) is None
    assert discard("slide-a", root=tmp_path) and find_autosave("slide-a", root=tmp_path) is None
    with pytest.raises(UhrsegError, match="no autosave"):
        restore("slide-a", root=tmp_path)


def test_only_changed_chunks_are_rewritten(tmp_path):
    labels = np.random.default_rng(0).integers(0, 4, (512, 512), dtype=np.uint8)
    saver = Autosaver("img", labels, root=tmp_path, chunk_shape=(128, 128))
    before = _chunk_files(saver.save_now())
    assert len(before) == 16
    assert saver.save_now() is not None  # numpy, no hint: rescanned, nothing rewritten
    assert _chunk_files(find_autosave("img", root=tmp_path)) == before
    labels[130:140, 260:270] = 9  # inside chunk (1, 2)
    info = saver.save_now()
    after = _chunk_files(info)
    assert len(after) == 16 and len(set(after) - set(before)) == 1  # one new file, the old one removed
    assert len(set(before) - set(after)) == 1
    assert all(after[k] == before[k] for k in set(after) & set(before))
    assert info.generation == 3
    np.testing.assert_array_equal(restore(info), labels)


def test_zarr_labels_use_change_hints_and_restore_into_a_store(tmp_path):
    store = zarr.create_array(tmp_path / "labels.zarr", shape=(600, 700), chunks=(256, 256), dtype="uint16")
    store[:] = 0
    store[0:100, 0:100] = 5
    saver = Autosaver("zimg", store, root=tmp_path / "as")
    first = saver.save_now()
    assert first.chunk_shape == (256, 256) and first.dtype == "<u2"
    store[300:310, 600:610] = 7
    assert saver.save_now() is None  # zarr without a hint: nothing scanned, nothing written
    saver.mark_dirty(300, 600, 10, 10)
    second = saver.save_now()
    changed = {k for k in second.chunks if second.chunks[k] != first.chunks[k]}
    assert changed == {"1,2"}
    out = zarr.create_array(tmp_path / "restored.zarr", shape=(600, 700), chunks=(256, 256), dtype="uint16")
    restore(second, out=out)
    np.testing.assert_array_equal(out[:], store[:])
    with pytest.raises(UhrsegError, match="same image"):
        restore(second, out=np.zeros((5, 5), np.uint16))


def test_background_thread_saves_periodically(tmp_path):
    labels = np.zeros((64, 64), np.uint8)
    saver = Autosaver("live", lambda: labels, root=tmp_path, interval_s=0.05).start()
    try:
        deadline = time.time() + 5
        while find_autosave("live", root=tmp_path) is None and time.time() < deadline:
            time.sleep(0.02)
        labels[5, 5] = 2
        saver.mark_dirty(5, 5, 1, 1)
        while restore("live", root=tmp_path)[5, 5] != 2 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        saver.stop()
    assert saver.last_error is None
    assert restore("live", root=tmp_path)[5, 5] == 2


def test_damaged_chunk_is_a_clear_error(tmp_path):
    labels = np.full((64, 64), 2, np.uint8)
    info = Autosaver("d", labels, root=tmp_path, chunk_shape=(32, 32)).save_now()
    for p in (info.folder / "chunks").iterdir():
        p.write_bytes(b"garbage")
    with pytest.raises(UhrsegError, match="discard this autosave"):
        restore(info)


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from napari_uhrseg.engine.autosave import Autosaver

    root = sys.argv[1]
    labels = np.zeros((1024, 1024), np.uint8)
    saver = Autosaver("killme", labels, root=root, chunk_shape=(128, 128))
    while True:
        g = saver.generation + 1
        labels[:] = np.random.default_rng(g).integers(0, 7, labels.shape, dtype=np.uint8)
        saver.mark_dirty()
        saver.save_now()
        print(g, flush=True)
    """
)


def test_sigkill_during_autosave_never_corrupts(tmp_path):
    """Kill a process that snapshots non-stop, at random moments; the last complete snapshot always loads."""
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            proc.stdout.readline()  # at least one snapshot finished
            time.sleep(float(rng.uniform(0.0, 0.4)))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        info = find_autosave("killme", root=tmp_path)
        assert info is not None
        expected = np.random.default_rng(info.generation).integers(0, 7, (1024, 1024), dtype=np.uint8)
        np.testing.assert_array_equal(restore(info), expected)
        seen.add(info.generation)
    assert len(seen) == 4  # every round made progress, so the kills landed at different points
