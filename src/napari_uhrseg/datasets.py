"""Readers for annotated images: DeepGlobe land cover, Aperio/MoNuSeg XML polygons, generic image/mask folders.

Everything here is torch-free: readers return ``(rgb uint8 (H, W, 3), labels (H, W))`` numpy pairs in level-0
pixel coordinates of the image; training code builds torch datasets on top. ``shared_data_dir()`` finds the
project's development data (``../shared/data`` next to the repository) without ever copying it into the repo.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_uhrseg.errors import UhrsegError

__all__ = [
    "DatasetError",
    "shared_data_dir",
    "read_rgb",
    "read_mask",
    "DEEPGLOBE_CLASSES",
    "DEEPGLOBE_COLORS",
    "DEEPGLOBE_SPLIT",
    "decode_deepglobe_mask",
    "encode_deepglobe_mask",
    "deepglobe_ids",
    "deepglobe_split",
    "load_deepglobe_tile",
    "read_aperio_xml",
    "polygons_to_mask",
    "load_monuseg_tile",
    "ImageMaskFolder",
    "random_crop",
    "RandomCropSampler",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetError(UhrsegError, ValueError):
    """An annotation or image file is missing, unreadable, or does not match its partner."""


# ---------------------------------------------------------------------------------------------------------
# Where the development data lives
# ---------------------------------------------------------------------------------------------------------
def shared_data_dir() -> Path | None:
    """The folder of real annotated data used by tests and benchmarks, or None when there is none.

    ``$UHRSEG_DATA`` wins when set (None if it does not name a folder); otherwise ``<repo root>/../shared/data``,
    where the repo root is found from this file's location (an editable install or a source checkout). An
    installed wheel has no repo root and gets None, so tests that need the data skip.
    """
    env = os.environ.get("UHRSEG_DATA")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]  # src/napari_uhrseg/datasets.py -> repo root
    if not (repo_root / "pyproject.toml").is_file():
        return None
    path = repo_root.parent / "shared" / "data"
    return path if path.is_dir() else None


# ---------------------------------------------------------------------------------------------------------
# Small readers
# ---------------------------------------------------------------------------------------------------------
def _imread(path: Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        import skimage.io

        return np.asarray(skimage.io.imread(path))
    except Exception as exc:  # any decoder failure becomes one clear message
        raise DatasetError(f"{path}: cannot be read as an image ({exc}); check that the file is complete.") from exc


def folder_pairs(images, masks) -> list[tuple[Path, Path]]:
    """``(image, label image)`` paths of a training folder pair: every image in ``images`` with a label image
    ``<stem>.png`` (or ``<stem>_mask.png``) in ``masks``, sorted by name. Raises ``DatasetError`` when a folder is
    missing or no image has its label image."""
    images, masks = Path(images), Path(masks)
    for folder, what in ((images, "--images"), (masks, "--masks")):
        if not folder.is_dir():
            raise DatasetError(f"{what} {folder} is not a folder: give the folder that holds the files.")
    pairs = []
    for image in sorted(images.glob("*")):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        for cand in (masks / f"{image.stem}.png", masks / f"{image.stem}_mask.png"):
            if cand.is_file():
                pairs.append((image, cand))
                break
    if not pairs:
        raise DatasetError(f"no image in {images} has a label image in {masks} (<stem>.png).")
    return pairs


def read_rgb(path) -> np.ndarray:
    """Read a small image file as RGB uint8 (H, W, 3): grey is repeated, alpha dropped, 16-bit scaled."""
    image = _imread(path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise DatasetError(f"{path}: expected an RGB or grey image, got shape {image.shape}.")
    image = image[..., :3]
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DatasetError(f"{path}: pixel type {image.dtype} is not supported here; convert it to 8-bit RGB.")
    return np.ascontiguousarray(image)


def read_mask(path, decode: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Read a label image. Index masks (2-D) are returned as they are; colour masks need ``decode``."""
    mask = _imread(path)
    if mask.ndim == 3 and decode is not None:
        return decode(mask)
    if mask.ndim == 3 and mask.shape[2] in (3, 4) and np.array_equal(mask[..., 0], mask[..., 1]):
        return mask[..., 0]  # grey saved as RGB
    if mask.ndim != 2:
        raise DatasetError(
            f"{path}: a {mask.shape} colour mask needs a colour decoder (e.g. decode_deepglobe_mask); "
            "index masks must be single-channel."
        )
    return mask


# ---------------------------------------------------------------------------------------------------------
# DeepGlobe land cover
# ---------------------------------------------------------------------------------------------------------
DEEPGLOBE_CLASSES = ["unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren"]
DEEPGLOBE_COLORS = [(0, 0, 0), (0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
DEEPGLOBE_IGNORE = 0

#: The fixed split every benchmark uses (see docs/data.md for the class content of each tile). Both sides hold
#: all six classes; the test tiles hold every class with at least 0.4 % of their pixels pooled.
DEEPGLOBE_SPLIT = {
    "train": ["10233", "104113", "119", "180902", "19627", "3484"],
    "test": ["10452", "2774", "6399"],
}

# 3-bit code (R>=128, G>=128, B>=128) -> class index; codes of no DeepGlobe colour (pure red) -> unknown.
_DG_CODE_TO_CLASS = np.zeros(8, dtype=np.uint8)
for _index, (_r, _g, _b) in enumerate(DEEPGLOBE_COLORS):
    _DG_CODE_TO_CLASS[(_r >= 128) * 4 + (_g >= 128) * 2 + (_b >= 128)] = _index


def decode_deepglobe_mask(rgb: np.ndarray) -> np.ndarray:
    """DeepGlobe colour mask (H, W, 3) -> class indices uint8 (0 unknown, 1..6 as ``DEEPGLOBE_CLASSES``).

    Each channel is thresholded at 128, so slightly off colours (resampling, JPEG) still decode.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DatasetError(f"a DeepGlobe mask is an RGB image; got shape {rgb.shape}.")
    bits = rgb[..., :3] >= 128
    code = bits[..., 0].astype(np.uint8) * 4 + bits[..., 1] * 2 + bits[..., 2]
    return _DG_CODE_TO_CLASS[code]


def encode_deepglobe_mask(labels: np.ndarray) -> np.ndarray:
    """Class indices -> DeepGlobe colour mask (H, W, 3) uint8 (for writing predictions in the challenge format)."""
    palette = np.asarray(DEEPGLOBE_COLORS, dtype=np.uint8)
    labels = np.asarray(labels)
    if labels.size and labels.max() >= len(palette):
        raise DatasetError(f"DeepGlobe has classes 0..6; got class {int(labels.max())}.")
    return palette[labels]


def _deepglobe_root(root) -> Path:
    if root is not None:
        return Path(root)
    data = shared_data_dir()
    if data is None:
        raise DatasetError(
            "no DeepGlobe folder given and no shared data found; pass root=... or set UHRSEG_DATA to a folder "
            "holding deepglobe/<id>_sat.jpg and <id>_mask.png."
        )
    return data / "deepglobe"


def deepglobe_ids(root=None) -> list[str]:
    """Ids of the tiles in a DeepGlobe folder that have both ``<id>_sat.jpg`` and ``<id>_mask.png``, sorted."""
    folder = _deepglobe_root(root)
    stems = (p.name[: -len("_sat.jpg")] for p in folder.glob("*_sat.jpg"))
    return sorted(stem for stem in stems if (folder / f"{stem}_mask.png").is_file())


def deepglobe_split() -> dict[str, list[str]]:
    """The project's fixed DeepGlobe split: ``{"train": [6 ids], "test": [3 ids]}`` (a copy; see docs/data.md)."""
    return {k: list(v) for k, v in DEEPGLOBE_SPLIT.items()}


def load_deepglobe_tile(id_or_path, root=None) -> tuple[np.ndarray, np.ndarray]:
    """Read one DeepGlobe tile.

    Parameters
    ----------
    id_or_path : str or path
        A tile id (looked up in ``root``, default ``shared_data_dir()/deepglobe``) or the path of the
        ``_sat.jpg`` or ``_mask.png`` file.

    Returns
    -------
    rgb : uint8 (H, W, 3)
    labels : uint8 (H, W), 0 = unknown (ignore), 1..6 = urban, agriculture, rangeland, forest, water, barren.
    """
    text = str(id_or_path)
    if text.endswith("_sat.jpg") or text.endswith("_mask.png"):
        path = Path(text)
        stem = path.name.rsplit("_", 1)[0]
        folder = path.parent
    else:
        stem, folder = text, _deepglobe_root(root)
    rgb = read_rgb(folder / f"{stem}_sat.jpg")
    labels = decode_deepglobe_mask(_imread(folder / f"{stem}_mask.png"))
    if labels.shape != rgb.shape[:2]:
        raise DatasetError(f"{folder / stem}: mask {labels.shape} and image {rgb.shape[:2]} differ in size.")
    return rgb, labels


# ---------------------------------------------------------------------------------------------------------
# Aperio ImageScope XML (MoNuSeg)
# ---------------------------------------------------------------------------------------------------------
def read_aperio_xml(path) -> list[np.ndarray]:
    """Polygons of an Aperio ImageScope annotation file, as float arrays (N, 2) of (x, y) level-0 pixels.

    Reads every ``Region/Vertices/Vertex`` with ``X`` and ``Y`` attributes; regions with fewer than 3 vertices
    are dropped (a point or a line encloses no pixel).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Aperio XML annotation file ({exc}).") from exc
    polygons = []
    for region in root.iter("Region"):
        vertices = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex") if v.get("X") and v.get("Y")]
        if len(vertices) >= 3:
            polygons.append(np.asarray(vertices, dtype=np.float64))
    return polygons


def polygons_to_mask(polygons, shape: tuple[int, int], *, instance: bool = True) -> np.ndarray:
    """Rasterise (x, y) polygons into a (H, W) mask.

    ``instance=True`` gives int32 instance ids 1..N in file order (a later polygon overwrites an earlier one
    where they overlap); ``instance=False`` gives a uint8 0/1 foreground mask. A pixel belongs to a polygon
    when its centre lies inside it (``skimage.draw.polygon``).
    """
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros(shape, dtype=np.int32 if instance else np.uint8)
    for index, poly in enumerate(polygons, start=1):
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=shape)
        mask[rr, cc] = index if instance else 1
    return mask


def load_monuseg_tile(path, *, instance: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a MoNuSeg tile: ``<id>.tif`` plus its ``<id>.xml`` polygons (either path may be given).

    Returns ``(rgb uint8 (H, W, 3), mask)`` with the mask as in :func:`polygons_to_mask`.
    """
    path = Path(path)
    image_path = path.with_suffix(".tif") if path.suffix.lower() == ".xml" else path
    xml_path = image_path.with_suffix(".xml")
    rgb = read_rgb(image_path)
    mask = polygons_to_mask(read_aperio_xml(xml_path), rgb.shape[:2], instance=instance)
    return rgb, mask


# ---------------------------------------------------------------------------------------------------------
# Generic image/mask folders
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePair:
    stem: str
    image: Path
    mask: Path


class ImageMaskFolder:
    """Image/mask pairs in a folder.

    An image ``<stem>.<png|jpg|jpeg|tif|tiff>`` (in ``root`` or ``root/images``) pairs with ``<stem>_mask.png``
    next to it, or with ``root/masks/<stem>.png``. Images without a mask are listed in ``unpaired``.
    Items are ``(rgb uint8 (H, W, 3), mask (H, W))``; ``decode`` turns colour masks into indices
    (e.g. :func:`decode_deepglobe_mask`).
    """

    def __init__(self, root, decode: Callable[[np.ndarray], np.ndarray] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such folder.")
        self.decode = decode
        self.pairs: list[ImagePair] = []
        self.unpaired: list[Path] = []
        for folder in (self.root, self.root / "images"):
            for image in sorted(folder.glob("*")) if folder.is_dir() else []:
                if image.suffix.lower() not in IMAGE_SUFFIXES or image.stem.endswith("_mask"):
                    continue
                mask = self._find_mask(image)
                if mask is None:
                    self.unpaired.append(image)
                else:
                    self.pairs.append(ImagePair(image.stem, image, mask))
        if not self.pairs:
            raise DatasetError(
                f"{self.root}: found no image/mask pairs; name masks <stem>_mask.png next to the image "
                "or put them in masks/<stem>.png."
            )

    def _find_mask(self, image: Path) -> Path | None:
        for candidate in (image.with_name(f"{image.stem}_mask.png"), self.root / "masks" / f"{image.stem}.png"):
            if candidate.is_file():
                return candidate
        return None

    @property
    def stems(self) -> list[str]:
        return [p.stem for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[index]
        rgb = read_rgb(pair.image)
        mask = read_mask(pair.mask, self.decode)
        if mask.shape != rgb.shape[:2]:
            raise DatasetError(f"{pair.mask}: mask {mask.shape} does not match image {pair.image} {rgb.shape[:2]}.")
        return rgb, mask

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


# ---------------------------------------------------------------------------------------------------------
# Random crops (torch-free)
# ---------------------------------------------------------------------------------------------------------
def random_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator):
    """A random ``size``² crop of an image/mask pair (zero-padded when the image is smaller), same window for both.

    Returns ``(image_crop, mask_crop, (y0, x0))``, the offset in the input's pixels.
    """
    h, w = mask.shape[:2]
    y0 = int(rng.integers(0, max(h - size, 0) + 1))
    x0 = int(rng.integers(0, max(w - size, 0) + 1))
    img = image[y0 : y0 + size, x0 : x0 + size]
    msk = mask[y0 : y0 + size, x0 : x0 + size]
    if img.shape[0] < size or img.shape[1] < size:
        pad = ((0, size - img.shape[0]), (0, size - img.shape[1]))
        img = np.pad(img, pad + ((0, 0),) * (img.ndim - 2))
        msk = np.pad(msk, pad)
    return img, msk, (y0, x0)


class RandomCropSampler:
    """Endless (or ``length``-long) stream of random crops over a list of (image, mask) pairs, reproducible by seed.

    ``pairs`` is any indexable of ``(image, mask)`` (e.g. :class:`ImageMaskFolder`); ``flips`` adds random
    horizontal/vertical flips and 90° rotations (the papers' augmentations). Items loaded once are cached, so
    use it with a handful of large tiles, not thousands.
    """

    def __init__(self, pairs, size: int, *, seed: int = 0, length: int | None = None, flips: bool = True):
        self.pairs = pairs
        self.size = int(size)
        self.length = length
        self.flips = flips
        self.rng = np.random.default_rng(seed)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _item(self, index: int):
        if index not in self._cache:
            self._cache[index] = self.pairs[index]
        return self._cache[index]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        count = 0
        while self.length is None or count < self.length:
            image, mask = self._item(int(self.rng.integers(len(self.pairs))))
            img, msk, _ = random_crop(image, mask, self.size, self.rng)
            if self.flips:
                k = int(self.rng.integers(4))
                img, msk = np.rot90(img, k), np.rot90(msk, k)
                if self.rng.random() < 0.5:
                    img, msk = img[:, ::-1], msk[:, ::-1]
            yield np.ascontiguousarray(img), np.ascontiguousarray(msk)
            count += 1
