"""The viewer stays responsive: a 20 ms QTimer heartbeat never waits more than 200 ms while a training round
(with its live re-segmentation) and a Segment-dock run work in their worker threads."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from qtpy.QtCore import QTimer

from _train_helpers import NAMES, scribbled_scene

from napari_uhrseg.widgets.state import get_state

pytestmark = pytest.mark.gui
MAX_GAP_S = 0.200


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

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps.append(now - self._last)
        self._last = now

    @property
    def max_gap(self) -> float:
        return max(self.gaps)


def _skip_if_machine_cannot_hand_over_the_gil(qtbot) -> None:
    """Calibrate: one pure-Python busy thread (it gives the GIL up every 5 ms) next to the event loop.

    On a quiet machine the heartbeat then still ticks within a few ms. When other processes own the CPUs, the
    OS preempts whichever thread holds the GIL and both wait; no threaded worker could meet the bar then, and
    a stall of ours could not be told from the machine's. The test measures only when the baseline is clean.
    """
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    with Heartbeat() as baseline:
        thread.start()
        qtbot.wait(1500)
    stop.set()
    thread.join()
    if baseline.max_gap > MAX_GAP_S / 4:
        pytest.skip(f"machine too busy to measure responsiveness: next to a plain Python thread the event loop "
                    f"already waits {baseline.max_gap * 1000:.0f} ms")


@pytest.fixture(autouse=True)
def _private_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("UHRSEG_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("UHRSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("UHRSEG_DEVICE", "cpu")
    monkeypatch.delenv("UHRSEG_SYNC", raising=False)


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
    qtbot.wait(200)  # let the window settle before measuring
    _skip_if_machine_cannot_hand_over_the_gil(qtbot)

    # The button's own GUI work (napari's progress bar, the preview layer) is not part of the measure: what must
    # not stall is the viewer while the worker runs.
    with qtbot.waitSignal(train.finished, timeout=120000) as done:
        train.start()
        with Heartbeat() as beat_train:
            qtbot.waitUntil(lambda: train._worker is None, timeout=120000)
    checkpoint = done.args[0]
    assert not isinstance(checkpoint, BaseException), checkpoint
    assert len(train.curves.loss) == 4 and f"{img.name} live prediction" in viewer.layers
    assert len(beat_train.gaps) > 20

    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    segment.method_combo.setCurrentText("grnet")
    segment.set_checkpoint(str(checkpoint[0]))
    segment.window_spin.setValue(128)
    with qtbot.waitSignal(segment.finished, timeout=120000) as done:
        segment.segment(sync=False)
        with Heartbeat() as beat_seg:
            qtbot.waitUntil(lambda: segment._worker is None, timeout=120000)
    result = done.args[0]
    assert not isinstance(result, BaseException), result
    assert result.windows_done == result.windows_total > 1
    assert np.asarray(viewer.layers["scene labels"].data).shape == (256, 256)
    assert np.array_equal(lab.data, scribbles)  # the strokes were not touched
    worst = {"training": beat_train.max_gap, "segmentation": beat_seg.max_gap}
    assert max(worst.values()) <= MAX_GAP_S, "event loop stalls (ms): " + ", ".join(
        f"{k} {v * 1000:.0f}" for k, v in worst.items())
