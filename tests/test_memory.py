import sys

import pytest

from napari_uhrseg import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_tune_native_heap_applies_once_on_glibc(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_done", None)
    real = memory.ctypes.CDLL

    class Spy:
        def __init__(self, *a, **k):
            self._lib = real(*a, **k)
            self.mallopt = self

        def __call__(self, param, value):
            calls.append((param, value))
            return self._lib.mallopt(param, value)

    monkeypatch.setattr(memory.ctypes, "CDLL", Spy)
    for var in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)
    assert memory.tune_native_heap(mmap_threshold=256 << 20, trim_threshold=512 << 20, arenas=2) is True
    assert calls == [(memory.M_MMAP_THRESHOLD, 256 << 20), (memory.M_TRIM_THRESHOLD, 512 << 20),
                     (memory.M_ARENA_MAX, 2)]
    assert memory.tune_native_heap() is True and len(calls) == 3  # once per process


def test_user_settings_are_left_alone(monkeypatch):
    monkeypatch.setattr(memory, "_done", None)
    for var in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.setenv(var, "65536")
    seen = []

    class Fake:
        def __init__(self, *a, **k):
            self.mallopt = self

        def __call__(self, *args):
            seen.append(args)
            return 1

    monkeypatch.setattr(memory.ctypes, "CDLL", Fake)
    assert memory.tune_native_heap() is True
    assert seen == []
