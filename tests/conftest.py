"""Shared fixtures (additive: each helper adds its own below)."""
from __future__ import annotations

import numpy as np
import pytest



@pytest.fixture(autouse=True, scope="session")
def _user_folders_kept_out_of_reach(tmp_path_factory):
    """No test writes autosaves or checkpoints into the real user data folder: a user who runs the suite would
    otherwise be offered a test's labels by "Restore autosave" (seen in `make demo` after the slow tests). Both go
    to a folder of the session; tests that need their own set it on top (``private_folders``)."""
    import os

    base = tmp_path_factory.mktemp("user-data")
    keys = {"UHRSEG_CHECKPOINT_DIR": base / "checkpoints", "UHRSEG_AUTOSAVE_DIR": base / "autosave"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(v) for k, v in keys.items()})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# ----------------------------------------------------------------------------------------------- io (pyramids)


@pytest.fixture(scope="session")
def big_pyramid_tiff(tmp_path_factory):
    """A 40 000 x 40 000 pyramidal OME-TIFF (grayscale, 1024 px zstd tiles, 0.25 µm pixels), built in ~2 s
    from a tile generator: tiles are constant per 2048 px block, so compression is nearly free."""
    from napari_uhrseg.io.ometiff import write_tiled_pyramid

    cache: dict = {}

    def tile(level, y0, x0, h, w):
        value = 20 + 40 * (((y0 << level) // 2048 + (x0 << level) // 2048) % 5)
        if (value, h, w) not in cache:
            cache[(value, h, w)] = np.full((h, w), value, np.uint8)
        return cache[(value, h, w)]

    path = tmp_path_factory.mktemp("pyramid") / "big.ome.tif"
    return write_tiled_pyramid(path, (40000, 40000), tile, channels=1, tile=1024, compression="zstd",
                               pixel_size=(0.25, 0.25))


@pytest.fixture
def tiff_chunk_reads(monkeypatch):
    """A list that collects every image chunk key read through tifffile's zarr store ("<level>/<index>")."""
    from tifffile.zarr import ZarrTiffStore

    keys: list[str] = []
    real_get = ZarrTiffStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        if key not in self._store and not key.endswith(("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")):
            keys.append(key)
        return await real_get(self, key, prototype, byte_range)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    return keys


# ------------------------------------------------------------------------------------------------ GUI docks
@pytest.fixture
def private_folders(monkeypatch, tmp_path):
    """Checkpoints and autosaves in the test's own folder, one torch thread, the CPU: what the dock tests use."""
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("UHRSEG_THREADS", "1")
    monkeypatch.setenv("UHRSEG_DEVICE", "cpu")
