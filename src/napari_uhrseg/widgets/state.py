"""One evented state per viewer, shared by the Segment, Refine/Click, Train, Export and Checkpoints docks.

Usage in a dock::

    from napari_uhrseg.widgets.state import get_state

    state = get_state(viewer)                      # the same object for every dock of this viewer
    state.events.labels_layer.connect(self._on_labels)   # psygnal: called with the new value
    state.labels_layer = layer                     # every other dock hears about it
    state.set_classes(["background", "tumour"])    # names + colours in one change

Fields (all optional; ``None``/empty means "not chosen yet"):

======================  ======================================================================================
``image_layer``         the napari Image layer being annotated
``labels_layer``        the napari Labels layer holding its labels (0 = unlabelled)
``class_names``         tuple of names, index = label value (index 0 included)
``class_colors``        tuple of RGBA float tuples, same length as ``class_names``
``checkpoint``          path (str) of the checkpoint in use, or None
``method``              registry name of the method in use ("grnet", "magnet", ...), or None
``refiner_checkpoint``  path (str) of the CascadePSP checkpoint the Refine dock uses (None = the shipped one)
``device``              "auto", "cpu", "cuda", "cuda:N" or "mps"
======================  ======================================================================================

Layers removed from the viewer are dropped from the state automatically. ``read_classes`` and
``write_classes`` translate between class lists and a Labels layer's ``features`` table and colormap.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
from psygnal import evented

# Colours for classes 1..: distinct, readable on slides and satellite scenes; class 0 is transparent.
_PALETTE = (
    (0.90, 0.10, 0.10), (0.10, 0.60, 0.95), (0.15, 0.75, 0.20), (1.00, 0.80, 0.00), (0.60, 0.25, 0.85),
    (1.00, 0.50, 0.05), (0.00, 0.80, 0.75), (0.95, 0.40, 0.70), (0.55, 0.35, 0.15), (0.50, 0.50, 0.50),
)
NAME_COLUMNS = ("class_name", "name", "class", "label_name")


@evented
@dataclass(eq=False)
class UhrsegState:
    """The choices the docks share. Assigning a field emits ``state.events.<field>(new_value)``."""

    image_layer: Any = None
    labels_layer: Any = None
    class_names: tuple = ()
    class_colors: tuple = ()
    checkpoint: str | None = None
    method: str | None = None
    refiner_checkpoint: str | None = None
    device: str = "auto"

    def set_classes(self, names, colors=None) -> None:
        """Set class names and colours together (default colours when ``colors`` is None).

        Emits ``events.class_names`` and ``events.class_colors`` once each, colours already in place.
        """
        names = tuple(str(n) for n in names)
        rgba = tuple(_rgba(c) for c in colors) if colors is not None else default_colors(len(names))
        if len(rgba) != len(names):
            raise ValueError(f"{len(names)} class names but {len(rgba)} colours: give one colour per class.")
        with self.events.paused():
            self.class_colors = rgba
            self.class_names = names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_STATES: "weakref.WeakKeyDictionary[Any, UhrsegState]" = weakref.WeakKeyDictionary()


def get_state(viewer) -> UhrsegState:
    """The shared state of ``viewer`` (created on first use, forgotten with the viewer)."""
    state = _STATES.get(viewer)
    if state is None:
        state = UhrsegState()
        _STATES[viewer] = state
        _follow_layer_removal(viewer, state)
    return state


def _follow_layer_removal(viewer, state: UhrsegState) -> None:
    state_ref = weakref.ref(state)

    def on_removed(event) -> None:
        st = state_ref()
        if st is None:
            return
        if st.image_layer is event.value:
            st.image_layer = None
        if st.labels_layer is event.value:
            st.labels_layer = None

    viewer.layers.events.removed.connect(on_removed)


# ------------------------------------------------------------------------------------ classes <-> layer
def default_colors(n: int) -> tuple:
    """``n`` RGBA colours: transparent for class 0, then the palette (cycled)."""
    cols = [(0.0, 0.0, 0.0, 0.0)]
    cols += [(*_PALETTE[(i - 1) % len(_PALETTE)], 1.0) for i in range(1, n)]
    return tuple(cols[:n])


def _rgba(color) -> tuple:
    from napari.utils.colormaps.standardize_color import transform_color

    return tuple(float(v) for v in transform_color(color)[0])


def read_classes(layer, *, num_classes: int | None = None) -> tuple[tuple[str, ...], tuple]:
    """Class names and colours of a Labels layer.

    Names come from ``layer.features`` (a column named class_name, name, class or label_name; an ``index``
    column, if present, gives the label value of each row, else row i is label i), else from
    ``layer.metadata["class_names"]`` (the reader's and the sample data's). Missing names are
    ``"class i"``; colours are the layer colormap's. ``num_classes`` defaults to the largest named label
    + 1, or, without names, to the largest value present in a small layer (at most 2).
    """
    names: dict[int, str] = {}
    feats = getattr(layer, "features", None)
    if feats is not None and len(feats):
        col = next((c for c in NAME_COLUMNS if c in feats.columns), None)
        if col is not None:
            index = feats["index"] if "index" in feats.columns else range(len(feats))
            names = {int(i): str(n) for i, n in zip(index, feats[col])}
    meta_names = (getattr(layer, "metadata", None) or {}).get("class_names")
    if not names and meta_names:  # what the sample data and the reader store
        names = {i: str(n) for i, n in enumerate(meta_names)}
    if num_classes is None:
        num_classes = max(names) + 1 if names else _max_label(layer) + 1
    labels = tuple(names.get(i, "unlabelled" if i == 0 else f"class {i}") for i in range(num_classes))
    transparent = (0.0, 0.0, 0.0, 0.0)
    colors = tuple(transparent if i == 0 else tuple(float(v) for v in layer.get_color(i)) for i in range(num_classes))
    return labels, colors


def _max_label(layer) -> int:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if isinstance(data, np.ndarray) and data.size <= 64 * 2**20:
        return max(int(data.max(initial=0)), 1)
    return 1


def write_classes(layer, names, colors=None) -> None:
    """Store class names in ``layer.features`` (columns ``index``, ``class_name``) and colours in its colormap."""
    import pandas as pd
    from napari.utils.colormaps import DirectLabelColormap

    names = [str(n) for n in names]
    rgba = [_rgba(c) for c in colors] if colors is not None else list(default_colors(len(names)))
    features = pd.DataFrame({"index": np.arange(len(names)), "class_name": names})
    current = getattr(layer, "features", None)
    if current is None or not current.reset_index(drop=True).equals(features):
        layer.features = features
    color_dict = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    color_dict.update({i: rgba[i] for i in range(1, len(names))})
    if not _same_colormap(getattr(layer, "colormap", None), color_dict):
        # (a new colormap makes napari rebuild the layer's shader: worth skipping when nothing changes)
        layer.colormap = DirectLabelColormap(color_dict=color_dict)


def _same_colormap(colormap, color_dict: dict) -> bool:
    """Whether a layer's colormap already maps every label of ``color_dict`` to its colour (and nothing else)."""
    have = getattr(colormap, "color_dict", None)
    if have is None or set(have) != set(color_dict):
        return False
    return all(np.allclose(np.asarray(have[k], float), np.asarray(v, float)) for k, v in color_dict.items())
