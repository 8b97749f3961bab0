"""npe2 sample data: the synthetic scene shipped in ``sample_data/`` (regenerated into the user cache if absent).

The image opens as a lazy multiscale layer exactly as the reader would open the file (pixel size as scale), the
exact ground truth as a Labels layer named ``"<scene> ground truth"`` at the same scale, coloured by class.
"""
from __future__ import annotations

import json

SCENE_NAME = "synthetic scene"


def sample_scene() -> list[tuple]:
    """``[image layer data, ground-truth labels layer data]`` for napari."""
    import numpy as np

    from napari_uhrseg._reader import layer_data
    from napari_uhrseg.io.labels import open_label_store
    from napari_uhrseg.io.pyramid import open_pyramid
    from napari_uhrseg.synthetic import sample_scene_paths

    paths = sample_scene_paths()
    meta = json.loads(paths["metadata"].read_text())
    image = layer_data(open_pyramid(paths["image"], name=SCENE_NAME))
    image[1]["metadata"]["class_names"] = meta["class_names"]
    # 3072² uint8 is 9 MB: an in-memory array the user can paint on, not a read-only lazy TIFF.
    labels = np.asarray(open_label_store(paths["labels"], writable=False).array[:])
    colors = {k: np.array(list(c) + [255]) / 255 for k, c in enumerate(meta["class_colors"])}
    colors[None] = np.array([0.0, 0.0, 0.0, 0.0])  # napari's colour for labels not in the table
    labels_kwargs = {
        "name": f"{SCENE_NAME} ground truth",
        "scale": image[1]["scale"],
        "colormap": colors,
        "opacity": 0.5,
        "metadata": {"class_names": meta["class_names"], "class_colors": meta["class_colors"],
                     "uhrseg_path": str(paths["labels"])},
    }
    if "units" in image[1]:
        labels_kwargs["units"] = image[1]["units"]
    return [image, (labels, labels_kwargs, "labels")]
