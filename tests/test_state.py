"""The shared evented state of the docks."""
from __future__ import annotations

import numpy as np
import pytest

from napari_uhrseg.widgets.state import UhrsegState, default_colors, get_state, read_classes, write_classes


def test_fields_emit_and_set_classes_is_one_change():
    state = UhrsegState()
    seen = []
    state.events.device.connect(lambda v: seen.append(("device", v)))
    state.events.class_names.connect(lambda v: seen.append(("names", v, state.class_colors)))
    state.device = "cpu"
    state.device = "cpu"  # same value: no event
    state.set_classes(["unlabelled", "road", "water"])
    assert seen[0] == ("device", "cpu") and len(seen) == 2
    # when the names event arrives, the colours are already the new ones
    assert seen[1][1] == ("unlabelled", "road", "water") and len(seen[1][2]) == 3
    assert state.num_classes == 3 and state.class_colors[0][3] == 0.0
    with pytest.raises(ValueError, match="one colour per class"):
        state.set_classes(["a", "b"], colors=["red"])
    state.set_classes(["a", "b"], colors=["red", (0, 0, 1)])
    assert state.class_colors == ((1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0))


def test_default_colors_are_distinct():
    cols = default_colors(8)
    assert len(set(cols)) == 8 and cols[0] == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.gui
def test_one_state_per_viewer_and_removed_layers_are_dropped(make_napari_viewer):
    v1, v2 = make_napari_viewer(), make_napari_viewer()
    assert get_state(v1) is get_state(v1) and get_state(v1) is not get_state(v2)
    img = v1.add_image(np.zeros((32, 32), np.uint8), name="img")
    lab = v1.add_labels(np.zeros((32, 32), np.uint8), name="img labels")
    state = get_state(v1)
    state.image_layer, state.labels_layer = img, lab
    heard = []
    state.events.labels_layer.connect(heard.append)
    v1.layers.remove(lab)
    assert state.labels_layer is None and heard == [None] and state.image_layer is img


@pytest.mark.gui
def test_classes_round_trip_through_a_labels_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    data = np.zeros((16, 16), np.uint8)
    data[2:5, 2:5] = 2
    layer = viewer.add_labels(data)
    names, colors = read_classes(layer)  # nothing stored: generic names, layer colours
    assert names == ("unlabelled", "class 1", "class 2") and colors[0] == (0.0, 0.0, 0.0, 0.0)
    write_classes(layer, ["background", "stroma", "tumour"], ["black", "green", "magenta"])
    names, colors = read_classes(layer)
    assert names == ("background", "stroma", "tumour")
    assert np.allclose(colors[1], (0, 128 / 255, 0, 1))
    assert np.allclose(colors[2], (1, 0, 1, 1))
    assert np.allclose(layer.get_color(2), (1, 0, 1, 1))  # the layer really paints in that colour
