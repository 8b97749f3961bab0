"""Label stores: numpy or zarr v3, window writes all-or-nothing, class metadata kept."""
import numpy as np
import pytest

from napari_uhrseg.errors import UhrsegError
from napari_uhrseg.io import labels as labels_mod
from napari_uhrseg.io.labels import create_label_store, open_label_store


def test_small_store_is_numpy_and_reads_with_padding():
    store = create_label_store((100, 120))
    assert isinstance(store.array, np.ndarray) and store.path is None and store.dtype == np.uint8
    store.write_window(10, 20, np.full((5, 6), 3, np.uint8))
    assert store.array[10:15, 20:26].min() == 3 and store.array.sum() == 3 * 30
    out = store.read(8, 18, 8, 4)
    assert out.shape == (8, 4) and out[:2].max() == 0 and out[2:7, 2:].min() == 3 and out[:, :2].max() == 0
    edge = store.read(-3, 115, 20, 10)  # past the top and right edges: zeros there
    assert edge.shape == (20, 10) and edge.max() == 0


def test_zarr_store_round_trip_with_classes(tmp_path):
    path = tmp_path / "labels.zarr"
    store = create_label_store((300, 500), path=path, chunks=(64, 64), dtype=np.uint16,
                               class_names=["bg", "tumour"], class_colors=[(0, 0, 0), (255, 0, 0)])
    rng = np.random.default_rng(0)
    truth = np.zeros((300, 500), np.uint16)
    for _ in range(10):
        y0, x0 = rng.integers(0, 250), rng.integers(0, 430)
        block = rng.integers(0, 1000, (50, 70)).astype(np.uint16)
        store.write_window(int(y0), int(x0), block)
        truth[y0:y0 + 50, x0:x0 + 70] = block
    again = open_label_store(path)
    np.testing.assert_array_equal(np.asarray(again.array), truth)
    assert again.class_names == ["bg", "tumour"] and again.class_colors == [[0, 0, 0], [255, 0, 0]]
    assert again.dtype == np.uint16 and again.is_zarr
    with pytest.raises(UhrsegError, match="already exists"):
        create_label_store((10, 10), path=path)


def test_large_store_without_path_goes_to_a_temporary_zarr(monkeypatch):
    monkeypatch.setattr(labels_mod, "IN_MEMORY_PIXELS", 100)
    store = create_label_store((20, 20))
    assert store.is_zarr and store.path.exists()
    folder = store.path.parent
    del store
    import gc

    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("y0, x0, block, message", [
    (0, 0, np.zeros((5, 5, 2), np.uint8), "2-D"),
    (0, 0, np.zeros((5, 5), np.float32), "integers"),
    (-1, 0, np.zeros((5, 5), np.uint8), "does not fit"),
    (96, 0, np.zeros((5, 5), np.uint8), "does not fit"),
    (0, 0, np.full((5, 5), 300, np.int32), "do not fit"),
    (0, 0, np.full((5, 5), -1, np.int32), "do not fit"),
])
@pytest.mark.parametrize("on_disk", [False, True])
def test_bad_windows_are_refused_before_writing(tmp_path, y0, x0, block, message, on_disk):
    store = create_label_store((100, 100), path=tmp_path / "s.zarr" if on_disk else None, chunks=(32, 32))
    store.write_window(0, 0, np.ones((100, 100), np.uint8))
    with pytest.raises(ValueError, match=message):
        store.write_window(y0, x0, block)
    assert np.asarray(store.array).min() == 1 and np.asarray(store.array).max() == 1


def test_zarr_window_failing_midway_leaves_the_store_unchanged(tmp_path, monkeypatch):
    store = create_label_store((128, 128), path=tmp_path / "s.zarr", chunks=(32, 32))
    before = np.arange(128 * 128, dtype=np.uint64).reshape(128, 128) % 7
    store.write_window(0, 0, before.astype(np.uint8))
    calls = {"n": 0}
    real = labels_mod._store_chunk

    def failing(zarray, sel, block):
        calls["n"] += 1
        if calls["n"] == 5:  # after four chunks of this window were written
            zarray[sel] = 9  # the chunk gets garbage, then the disk "fails"
            raise OSError(28, "No space left on device")
        real(zarray, sel, block)

    monkeypatch.setattr(labels_mod, "_store_chunk", failing)
    with pytest.raises(OSError):
        store.write_window(10, 10, np.full((100, 100), 5, np.uint8))  # spans 16 chunks
    assert calls["n"] == 5
    np.testing.assert_array_equal(np.asarray(store.array), before)
    monkeypatch.setattr(labels_mod, "_store_chunk", real)
    store.write_window(10, 10, np.full((100, 100), 5, np.uint8))
    assert (np.asarray(store.array)[10:110, 10:110] == 5).all()


def test_open_label_store_refuses_non_labels(tmp_path):
    import zarr

    from napari_uhrseg.errors import UnsupportedImageError

    zarr.create_array(store=str(tmp_path / "rgb.zarr"), shape=(10, 10, 3), dtype=np.uint8)
    with pytest.raises(UnsupportedImageError, match="not 2-D integer labels"):
        open_label_store(tmp_path / "rgb.zarr")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnsupportedImageError, match="not a label file"):
        open_label_store(tmp_path / "x.txt")
