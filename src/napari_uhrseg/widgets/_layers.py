"""Layer adapters: napari layers ⇄ core objects (pyramids, label stores, overlay records).

Frames. The core speaks *level-0 pixels* with the pixel-corner convention (pixel ``r`` covers ``[r, r + 1)``).
napari puts the centre of data pixel ``r`` at data coordinate ``r``, and maps data to world with the layer's
``scale`` and ``translate``. So a level-0 corner coordinate ``c`` is image-layer data coordinate ``c - 0.5``,
and a label pixel ``i`` at a working level with downsample ``d`` (covering level-0 ``[i d, (i + 1) d)``) has
its centre at level-0 data coordinate ``i d + (d - 1) / 2``. Everything here goes through these two facts so
that labels and patch rectangles sit on the image at every zoom level.
"""
from __future__ import annotations

import numpy as np

from napari_uhrseg.engine.segment import downsample_pair

# Above this many pixels a labels layer is shown as a lazy multiscale pyramid of the store (napari would
# otherwise read the whole array for a single-scale layer).
MULTISCALE_PIXELS = 4096 * 4096
LABELS_OPACITY = 0.55
PATCH_COLORMAP = "plasma"


# ------------------------------------------------------------------------------------------------ images
def pyramid_for_layer(layer):
    """The lazy ``Pyramid`` behind an Image layer.

    A layer carrying a Pyramid in ``layer.metadata["uhrseg_pyramid"]`` gives it; a layer opened from a file (this
    plugin's reader records ``metadata["uhrseg_path"]``) is re-opened lazily from it; anything else (an array in the viewer) is wrapped as it is, its own
    multiscale levels kept.
    """
    from napari_uhrseg.io.pyramid import Pyramid, open_pyramid

    meta = getattr(layer, "metadata", None) or {}
    pyr = meta.get("uhrseg_pyramid") or meta.get("pyramid")
    if isinstance(pyr, Pyramid):
        return pyr
    path = meta.get("uhrseg_path") or getattr(getattr(layer, "source", None), "path", None)
    if path:
        return open_pyramid(path, name=layer.name)
    if not getattr(layer, "multiscale", False):
        return open_pyramid(layer.data, name=layer.name)
    base = open_pyramid(layer.data[0], name=layer.name)
    import dask.array as da

    levels = [da.asarray(lv) for lv in layer.data]
    shape0 = levels[0].shape[:2]
    downs = [float(np.mean([shape0[0] / lv.shape[0], shape0[1] / lv.shape[1]])) for lv in levels]
    return Pyramid(levels=levels, downsamples=downs, pixel_size=base.pixel_size, pixel_unit=base.pixel_unit,
                   channel_axis=base.channel_axis, channel_names=base.channel_names, rgb=base.rgb,
                   name=layer.name, path=None)


def same_units(layer, image_layer) -> None:
    """Give ``layer`` the world units of ``image_layer`` (napari warns, and ignores units, when layers differ)."""
    units = getattr(image_layer, "units", None)
    if units is not None and len(units) >= 2 and tuple(getattr(layer, "units", ())[-2:]) != tuple(units[-2:]):
        layer.units = tuple(units[-2:])


def image_geometry(layer) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translate) of the image layer's last two spatial axes (y, x), world units per level-0 pixel."""
    scale = np.asarray(layer.scale, dtype=float)[-2:]
    translate = np.asarray(layer.translate, dtype=float)[-2:]
    return scale, translate


# ------------------------------------------------------------------------------------------------ regions
def view_box_level0(layer) -> tuple[float, float, float, float]:
    """The part of ``layer`` on screen as a level-0 box (y0, x0, y1, x1), from napari's corner pixels (which
    are at the displayed pyramid level for multiscale layers)."""
    corners = np.asarray(layer.corner_pixels, dtype=float)[:, -2:]
    d = 1.0
    if getattr(layer, "multiscale", False):
        d = np.asarray(layer.downsample_factors[layer.data_level], dtype=float)[-2:]
    y0, x0 = corners[0] * d
    y1, x1 = (corners[1] + 1) * d
    return (float(y0), float(x0), float(y1), float(x1))


def drawn_box_level0(shapes_layer, image_layer) -> tuple[float, float, float, float]:
    """The last shape of ``shapes_layer`` (usually a rectangle) → its bounding box in the image's level-0 pixels."""
    from napari_uhrseg.errors import UhrsegError

    if shapes_layer is None or len(shapes_layer.data) == 0:
        raise UhrsegError("No box is drawn: add a Shapes layer, draw a rectangle over the image, then Segment.")
    verts = np.asarray(shapes_layer.data[-1], dtype=float)[:, -2:]
    world = [shapes_layer.data_to_world(v) for v in verts]
    data = np.asarray([image_layer.world_to_data(w) for w in world], dtype=float)[:, -2:]
    lo, hi = data.min(axis=0) + 0.5, data.max(axis=0) + 0.5  # centre → corner convention
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


# ------------------------------------------------------------------------------------------------ labels
def labels_geometry(image_layer, downsample, store_origin) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translate) that put a label store (working level ``downsample``, pixel (0, 0) = working-level
    pixel ``store_origin``) exactly on ``image_layer``."""
    scale, translate = image_geometry(image_layer)
    d = np.asarray(downsample_pair(downsample))
    origin = np.asarray(store_origin, dtype=float)
    return scale * d, translate + scale * (origin * d + (d - 1.0) / 2.0)


def labels_in_frame(data, layer, image_layer, level_shapes=None):
    """``data`` of a labels-like ``layer`` in its level's whole frame: as it is when it starts at the image's
    corner, else an ``engine.refine.FramedLabels`` (0 outside ``data``). A Segment run on a region or a box makes
    a layer of the region's size, put in place by its scale and translate (``labels_geometry``); this undoes
    that, so refining, clicking, training and exporting see it where it lies on the image. ``level_shapes``: the
    shapes of the pyramid the caller reads the image from (the frame is the one of them at the layer's
    downsample); else the level is sized from the image layer, rounded up."""
    return place_in_frame(data, frame_of(layer, image_layer), level_shapes)


def frame_of(layer, image_layer) -> dict:
    """Where ``layer`` lies on ``image_layer`` as plain numbers (read on the GUI thread, used anywhere):
    ``downsample`` (y, x), ``origin`` (its pixel (0, 0) in pixels of that level) and the image's level-0 shape."""
    scale, translate = image_geometry(image_layer)
    d = np.asarray(layer.scale, float)[-2:] / scale
    origin = ((np.asarray(layer.translate, float)[-2:] - translate) / scale - (d - 1.0) / 2.0) / d
    level0 = image_layer.data[0].shape if image_layer.multiscale else image_layer.data.shape
    return {"downsample": tuple(float(v) for v in d), "origin": tuple(float(v) for v in origin),
            "level0": tuple(int(v) for v in level0[:2])}


def place_in_frame(data, frame: dict, level_shapes=None):
    """``data`` as it is when ``frame`` (``frame_of``) starts at the image's corner, else a ``FramedLabels``."""
    from napari_uhrseg.engine.refine import FramedLabels

    origin = np.asarray(frame["origin"], float)
    if np.all(np.abs(origin) < 0.5):  # at the corner (a user's own layer may be placed a fraction off)
        return data
    d = np.asarray(frame["downsample"], float)
    shape = np.ceil(np.asarray(frame["level0"], float) / d - 1e-6).astype(int)  # rounded up, as our pyramids are
    if level_shapes:
        shape = min((np.asarray(s_, int) for s_ in level_shapes), key=lambda s_: float(np.abs(s_ - shape).sum()))
    return FramedLabels(data, shape, np.round(origin).astype(int))


def labels_data(store):
    """What a Labels layer shows for ``store``: the array itself when small (edits write through), else a lazy
    multiscale pyramid (nearest-neighbour 2 x 2 striding) read chunk by chunk."""
    arr = store.array
    if int(np.prod(store.shape)) <= MULTISCALE_PIXELS:
        return arr, False
    import dask.array as da

    base = da.from_zarr(arr) if not isinstance(arr, np.ndarray) else da.from_array(arr, chunks=(1024, 1024))
    levels = [base]
    while max(levels[-1].shape) > 2048:
        levels.append(levels[-1][::2, ::2])
    return levels, True


def add_or_update_labels(viewer, image_layer, result, *, class_names=None):
    """Show ``result.store`` as ``"<image> labels"``.

    The layer an earlier run on this image made is reused (its data replaced); a layer the user made (painted
    scribbles, say) is never overwritten, even under that name: napari then calls ours ``"<image> labels [1]"``."""
    name = f"{image_layer.name} labels"
    data, multiscale = labels_data(result.store)
    scale, translate = labels_geometry(image_layer, result.downsample, result.store_origin)
    existing = next((lay for lay in viewer.layers if lay.metadata.get("uhrseg_segment") == image_layer.name), None)
    if existing is not None:
        layer = existing
        if not (np.allclose(layer.scale[-2:], scale) and np.allclose(layer.translate[-2:], translate)):
            layer.scale, layer.translate = scale, translate  # before the data: the extent changes once
        layer.data = data
    else:
        layer = viewer.add_labels(data, name=name, scale=scale, translate=translate, opacity=LABELS_OPACITY,
                                  multiscale=multiscale)
    same_units(layer, image_layer)
    from napari_uhrseg.widgets.export import _unit_of

    unit = _unit_of(image_layer)
    if unit:  # what File › Save (the plugin's writers) writes as the pixel size: a level-0 pixel of the image
        layer.metadata["pixel_size"] = tuple(float(v) for v in image_layer.scale[-2:])
        layer.metadata["pixel_unit"] = unit
    layer.metadata["uhrseg_segment"] = image_layer.name  # the image whose runs this layer shows
    layer.metadata["uhrseg_store"] = result.store
    layer.metadata["uhrseg_downsample"] = downsample_pair(result.downsample)
    from napari_uhrseg.errors import UhrsegError

    try:
        frame = labels_in_frame(data[0] if multiscale else data, layer, image_layer)
    except UhrsegError:  # not placeable (a hand-edited geometry): File › Save writes the layer as it is
        frame = None
    if hasattr(frame, "origin"):  # a region: where File › Save (which does not know the image) puts it
        layer.metadata["uhrseg_frame"] = {"shape": list(frame.shape), "origin": list(frame.origin)}
    else:
        layer.metadata.pop("uhrseg_frame", None)
    if class_names:
        from napari_uhrseg.widgets.state import write_classes

        write_classes(layer, class_names)
    return layer


# ------------------------------------------------------------------------------------------------ overlays
def patch_rectangles(records: list[dict]) -> list[np.ndarray]:
    """Overlay records (level-0 corner boxes) → napari rectangles (4 x 2 vertices) in image data coordinates."""
    out = []
    for rec in records:
        y0, x0, y1, x1 = (float(v) - 0.5 for v in rec["box"])
        out.append(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]]))
    return out


def patch_features(records: list[dict]):
    import pandas as pd

    return pd.DataFrame({
        "probability": np.array([r["probability"] for r in records], dtype=float),
        "selected": np.array([r["selected"] for r in records], dtype=bool),
        "window": np.array([r["window"] for r in records], dtype=int),
    })


def set_patch_shapes(layer, records: list[dict], *, new: list[dict] | None = None) -> None:
    """Show ``records`` on a PPN patch layer: edge colour by probability (``PATCH_COLORMAP`` over [0, 1]),
    selected patches drawn thicker.

    With ``new`` (the tail of ``records`` not drawn yet) only those rectangles are added — napari adds shapes
    one by one, so redrawing every patch after every window would cost quadratic time on a large image. This runs
    on the GUI thread after every window of a run, so it does the least napari work that shows the patches:
    the new rectangles' colours are computed here (no colour-map pass over every shape), and the layer's
    thumbnail, which renders every shape again, is not redrawn meanwhile (``refresh()`` the layer at the end).
    """
    from napari.utils.colormaps import ensure_colormap

    if new is None:
        layer.selected_data = set()
        layer.data = []
        new = records
    rects = patch_rectangles(new)
    with layer.block_thumbnail_update():
        if rects:
            sides = np.array([min(r[2, 0] - r[0, 0], r[2, 1] - r[0, 1]) for r in rects])
            widths = np.where([r["selected"] for r in new], 0.03, 0.01) * sides
            colors = ensure_colormap(PATCH_COLORMAP).map(np.clip([float(r["probability"]) for r in new], 0, 1))
            layer.add_rectangles(rects, edge_width=np.maximum(widths, 1.0), edge_color=colors,
                                 face_color="transparent")
        layer.features = patch_features(records)


def patches_name(image_layer) -> str:
    return f"{image_layer.name} PPN patches"


def new_patches_layer(viewer, image_layer):
    """An empty ``"<image> PPN patches"`` Shapes layer placed on ``image_layer``."""
    scale, translate = image_geometry(image_layer)
    return viewer.add_shapes(name=patches_name(image_layer), scale=scale, translate=translate,
                             shape_type="rectangle", face_color="transparent", opacity=0.9)


def add_or_update_patches(viewer, image_layer, records: list[dict], *, new: list[dict] | None = None):
    """Show PPN patches as ``"<image> PPN patches"``: rectangles in the image's level-0 data coordinates, with
    ``probability``, ``selected`` and ``window`` in the features table. ``new``: only these are not drawn yet."""
    name = patches_name(image_layer)
    if name in viewer.layers:
        layer = viewer.layers[name]
        scale, translate = image_geometry(image_layer)
        if not (np.allclose(layer.scale[-2:], scale) and np.allclose(layer.translate[-2:], translate)):
            layer.scale, layer.translate = scale, translate  # (a transform change re-renders the layer)
    else:
        layer = new_patches_layer(viewer, image_layer)
        new = None
    same_units(layer, image_layer)
    set_patch_shapes(layer, records, new=new)
    return layer
