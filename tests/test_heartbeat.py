"""The viewer stays responsive: a 20 ms QTimer heartbeat never waits more than 200 ms while a training round
(with its live re-segmentation) and a Segment-dock run work in their worker threads.

What is measured: from the moment each dock's worker starts until it has finished and its results are shown.
The press itself — the docks make their output layers and napari draws them for the first time before the
worker starts, 0.2–0.5 s of the GUI thread with software OpenGL (Xvfb + llvmpipe compiles every new visual's
shaders) — is napari's work for a click, recorded and printed but not held to the bar.

When it skips: only when the machine itself cannot meet the bar, before or after the run: a plain Python thread
next to the event loop already makes it wait more than 200 ms, or the GUI thread gets less than half a core
(other processes own the CPUs, and every GUI update then takes twice its CPU time or more). The old calibration
skipped every time, even on an idle machine: it started 200 ms after the window appeared and measured napari's
first paint (102–154 ms), not the GIL.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.widgets.state import get_state

pytestmark = pytest.mark.gui
MAX_GAP_S = 0.200
MIN_CPU_SHARE = 0.5  # of a core, for the GUI thread next to a worker


class Heartbeat:
    """Ticks every ``interval_ms`` on the GUI thread and records the longest time between two ticks."""

    def __init__(self, interval_ms: int = 20):
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self._last = 0.0

    def __enter__(self):
        self._last = time.perf_counter()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.stop()
        self.gaps.append(time.perf_counter() - self._last)  # the wait up to the end counts too

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    @property
    def max_gap(self) -> float:
        return max(self.gaps)


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _gap_next_to_busy_python(qtbot, ms: int = 1000) -> float:
    """The worst heartbeat gap while a pure-Python thread runs flat out next to the event loop: the worst case a
    worker can be for the GIL (it lets go only at CPython's switch interval). Idle machine: 25–40 ms."""
    stop = threading.Event()
    thread = threading.Thread(target=_spin, args=(stop,), daemon=True)
    with Heartbeat() as beat:
        thread.start()
        qtbot.wait(ms)
    stop.set()
    thread.join()
    return beat.max_gap


def _gui_thread_cpu_share(ms: int = 500) -> float:
    """CPU time the GUI thread gets per second of wall time when it has work, next to a worker thread doing
    torch work (as the docks' workers do): ~1 on an idle 2-core machine, ~0.3 at a load average of 7."""
    import torch

    stop = threading.Event()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def work():
        a = torch.rand(256, 256)
        while not stop.is_set():
            a @ a

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        while time.perf_counter() - t0 < ms / 1000:
            sum(range(2000))
        return (time.thread_time() - c0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        worker.join()
        torch.set_num_threads(threads)


def _settle(qtbot, timeout_s: float = 15.0) -> None:
    """Wait until the shown window has drawn itself (napari's first paints take 100–300 ms each)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        with Heartbeat() as beat:
            qtbot.wait(400)
        if beat.max_gap < MAX_GAP_S / 4:
            return


def _machine(qtbot, when: str) -> str:
    """Skip (saying why) when the machine itself cannot meet the bar; else a line describing it."""
    gap = _gap_next_to_busy_python(qtbot)
    share = _gui_thread_cpu_share()
    load = os.getloadavg()[0]
    line = (f"{when}: next to a plain Python thread the loop waits {gap * 1000:.0f} ms; the GUI thread gets "
            f"{share:.2f} of a core; load average {load:.1f}")
    if gap > MAX_GAP_S or share < MIN_CPU_SHARE:
        pytest.skip(f"machine too busy to measure responsiveness ({line})")
    return line


@pytest.fixture(autouse=True)
def _private_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("UHRSEG_DEVICE", "cpu")
    monkeypatch.delenv("UHRSEG_SYNC", raising=False)


def _run(qtbot, press, dock, finished):
    """Press (``press()`` returns once the dock has made its worker), then beat from the worker's start to the
    dock's end. Returns (press gap, run gap, the finished signal's argument)."""
    with qtbot.waitSignal(finished, timeout=180000) as done:
        with Heartbeat() as beat_press:
            press()
            worker = dock._worker
            assert worker is not None
            with qtbot.waitSignal(worker.started, timeout=30000):
                pass
        with Heartbeat() as beat_run:
            qtbot.waitUntil(lambda: dock._worker is None, timeout=180000)
    return beat_press.max_gap, beat_run, done.args[0]


def test_no_event_loop_stall_while_training_and_segmenting(make_napari_viewer, qtbot):
    from napari_uhrseg.widgets.segment import SegmentWidget
    from napari_uhrseg.widgets.train import TrainWidget

    viewer = make_napari_viewer(show=True)
    image, scribbles = scribbled_scene()
    img = viewer.add_image(image, name="scene", rgb=True)
    lab = viewer.add_labels(scribbles, name="scene scribbles")  # "scene labels" is the Segment dock's output
    state = get_state(viewer)
    state.image_layer, state.labels_layer = img, lab
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train)
    train.classes_edit.setText(", ".join(NAMES))
    train.iterations.setValue(4)
    train.crop.setValue(128)
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    _settle(qtbot)
    before = _machine(qtbot, "before")

    press_train, beat_train, checkpoint = _run(qtbot, train.start, train, train.finished)
    assert not isinstance(checkpoint, BaseException), checkpoint
    assert len(train.curves.loss) == 4 and f"{img.name} live prediction" in viewer.layers
    assert len(beat_train.gaps) > 20

    segment.method_combo.setCurrentText("grnet")
    segment.set_checkpoint(str(checkpoint[0]))
    segment.window_spin.setValue(128)
    press_seg, beat_seg, result = _run(qtbot, lambda: segment.segment(sync=False), segment, segment.finished)
    assert not isinstance(result, BaseException), result
    assert result.windows_done == result.windows_total > 1
    assert np.asarray(viewer.layers["scene labels"].data).shape == (256, 256)
    assert np.array_equal(lab.data, scribbles)  # the strokes were not touched
    worst = {"training": beat_train.max_gap, "segmentation": beat_seg.max_gap}
    report = ("longest waits of the event loop (ms): " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in worst.items())
              + f"; the presses (layers made and first drawn): training {press_train * 1000:.0f}, "
              f"segmentation {press_seg * 1000:.0f}; {before}")
    print(report)
    if max(worst.values()) > MAX_GAP_S:
        # The machine is shared and may have become busy meanwhile: a failure must mean "the machine could meet
        # the bar before and after the run, and the docks did not".
        after = _machine(qtbot, "after")
        pytest.fail(f"event loop stalls over {MAX_GAP_S * 1000:.0f} ms: {report}; {after}")
