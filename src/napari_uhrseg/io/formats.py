"""Format readers behind :func:`napari_uhrseg.io.pyramid.open_pyramid`.

Each reader opens headers only and returns a :class:`~napari_uhrseg.io.pyramid.Source`: the stored levels as
dask arrays with their axis letters, and the pixel size / channel names the file knows. The content decides the
reader (magic bytes), and a name that says another format is refused rather than guessed.

* TIFF family through tifffile's zarr store (``TiffFile.series[0].aszarr()``; zarr 3 reads it directly):
  pyramidal OME-TIFF (SubIFDs), plain and BigTIFF, GeoTIFF (``ModelPixelScaleTag``), ImageJ hyperstacks.
* Whole-slide TIFFs (SVS, NDPI, SCN, BIF, ...) through tiffslide (levels, microns per pixel).
* OME-Zarr (NGFF 0.4 and 0.5 ``multiscales``) and plain zarr arrays through zarr.
* PNG and JPEG: the header is read at open; the pixels are decoded on first access of any chunk (these formats
  cannot be read in parts) and kept in a small cache.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import dask.array as da
import numpy as np

from napari_uhrseg.errors import UnsupportedImageError
from napari_uhrseg.io.pyramid import Source

#: PNG/JPEG larger than this many pixels are refused: they must be decoded whole.
MAX_DECODED_PIXELS = 2**30
SLIDE_SUFFIXES = {".svs", ".ndpi", ".scn", ".bif", ".vms", ".mrxs"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff"} | SLIDE_SUFFIXES
PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg", ".jpe"}
_FORMAT_SUFFIXES = {"TIFF": TIFF_SUFFIXES, "PNG": PNG_SUFFIXES, "JPEG": JPEG_SUFFIXES}
_HINT = "Supported: OME-TIFF, TIFF/BigTIFF, GeoTIFF, SVS/NDPI slides, OME-Zarr, PNG, JPEG."


def display_name(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def sniff(path: Path) -> str | None:
    """The format from the first bytes: 'TIFF', 'PNG', 'JPEG', or None."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    return None


def open_source(path: Path) -> Source:
    """Open ``path`` with the reader its content calls for; refuse clearly when none fits."""
    if not path.exists():
        raise UnsupportedImageError(f"{path} does not exist: check the path.")
    if path.is_dir():
        return open_zarr(path)
    size = path.stat().st_size
    if size == 0:
        raise UnsupportedImageError(f"{path} is empty (0 bytes): the file was not written completely; export it again.")
    kind = sniff(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.name.lower().endswith((".ome.tif", ".ome.tiff")) else path.suffix.lower()
    if kind is None:
        raise UnsupportedImageError(f"{path} is not an image file we can read (unknown content). {_HINT}")
    claimed = next((k for k, sfx in _FORMAT_SUFFIXES.items() if suffix in sfx), None)
    if claimed is not None and claimed != kind:
        right = sorted(_FORMAT_SUFFIXES[kind])[0]
        raise UnsupportedImageError(
            f"{path} is named like a {claimed} file but contains a {kind} image: rename it with the {right} "
            "extension and open it again."
        )
    if kind == "TIFF":
        return open_tiff(path)
    return open_decoded(path, kind)


# ----------------------------------------------------------------------------------------------- TIFF


@contextlib.contextmanager
def _tifffile_quiet():
    """tifffile logs its own warning for a damaged file ("... contains no pages") before we raise ours: keep
    it out of the user's terminal while a TIFF is opened; our message says what is wrong and what to do."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def open_tiff(path: Path) -> Source:
    import tifffile

    try:
        with _tifffile_quiet():
            tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ... on damaged files
        raise UnsupportedImageError(f"{path} is a damaged TIFF ({exc}): re-export or re-download it.") from exc
    try:
        with _tifffile_quiet():
            empty = not tif.series
        if empty:
            raise UnsupportedImageError(f"{path} is a damaged TIFF: it contains no image. Re-export or re-download it.")
        if (tif.is_svs or tif.is_ndpi or tif.is_scn or tif.is_bif or path.suffix.lower() in SLIDE_SUFFIXES) and not tif.is_ome:
            slide = _open_slide(path)
            if slide is not None:
                tif.close()
                return slide
        return _tiff_source(tif, path)
    except UnsupportedImageError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise UnsupportedImageError(f"{path} could not be read as a TIFF image ({exc}): re-export it.") from exc


def _tiff_source(tif, path: Path) -> Source:
    import zarr

    series = tif.series[0]
    _check_complete(series, path)
    store = series.aszarr()
    node = zarr.open(store, mode="r")
    if hasattr(node, "shape"):
        arrays = [node]
    else:
        datasets = node.attrs.get("multiscales", [{}])[0].get("datasets", [])
        keys = [d["path"] for d in datasets] or sorted(node.array_keys(), key=int)
        arrays = [node[k] for k in keys]
    levels = [da.from_zarr(a) for a in arrays]
    page = series.pages[0] if hasattr(series, "pages") and series.pages else tif.pages[0]
    keyframe = getattr(page, "keyframe", page)
    pixel_size, unit, names = None, None, None
    if tif.is_ome:
        pixel_size, unit, names = _ome_metadata(tif.ome_metadata)
    if pixel_size is None:
        pixel_size, unit = _geotiff_pixel_size(keyframe) or _resolution_pixel_size(keyframe) or (None, None)
    photometric = getattr(keyframe, "photometric", None)
    rgb_hint = None
    if photometric is not None:
        rgb_hint = int(photometric) == 2  # RGB
    if tif.is_ome and "C" in series.axes and "S" not in series.axes:
        rgb_hint = False  # separate channels (fluorescence), not samples of a colour image
    return Source(levels=levels, axes=series.axes, pixel_size=pixel_size, pixel_unit=unit, channel_names=names,
                  rgb_hint=rgb_hint, resources=[tif, store], label=str(path),
                  metadata={"format": "ome-tiff" if tif.is_ome else "tiff"})


def _check_complete(series, path: Path) -> None:
    """Refuse a TIFF whose image data runs past the end of the file (a truncated download or copy)."""
    size = os.path.getsize(path)
    for level in getattr(series, "levels", [series]):
        for page in level.pages[:1] if hasattr(level, "pages") else []:
            page = getattr(page, "keyframe", page)
            offsets, counts = getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ())
            if len(offsets) and max(o + c for o, c in zip(offsets, counts)) > size:
                raise UnsupportedImageError(
                    f"{path} is truncated: its image data ends past the end of the file ({size} bytes). "
                    "Copy or download it again."
                )


def _ome_metadata(xml: str | None):
    """(pixel_size (y, x), unit, channel names) from OME-XML; Nones where absent."""
    if not xml:
        return None, None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None, None
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    pixels = root.find(f".//{ns}Image/{ns}Pixels")
    if pixels is None:
        return None, None, None
    names = [c.get("Name") or f"channel {i}" for i, c in enumerate(pixels.findall(f"{ns}Channel"))] or None
    px, py = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
    if px is None or py is None:
        return None, None, names
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    return (float(py), float(px)), unit, names


_GEO_UNITS = {9001: "m", 9002: "ft", 9003: "ft", 9036: "km"}


def _geotiff_pixel_size(page):
    tags = page.tags
    scale = tags.get(33550)  # ModelPixelScaleTag: (sx, sy, sz)
    if scale is None:
        return None
    sx, sy = float(scale.value[0]), float(scale.value[1])
    unit = "m"
    keys = tags.get(34735)  # GeoKeyDirectoryTag: header then (key, location, count, value) quadruples
    if keys is not None:
        values = list(keys.value)
        entries = {values[i]: values[i + 3] for i in range(4, len(values) - 3, 4)}
        if entries.get(1024) == 2:  # GTModelTypeGeoKey: geographic (lat/lon)
            unit = "degree"
        elif 3076 in entries:  # ProjLinearUnitsGeoKey
            unit = _GEO_UNITS.get(entries[3076], "m")
    return (sy, sx), unit


def _resolution_pixel_size(page):
    tags = page.tags
    xres, yres, unit = tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    if xres is None or yres is None or unit is None:
        return None
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))  # micrometres per inch / per centimetre
    xr, yr = (v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v) for v in (xres.value, yres.value))
    if per_unit is None or xr <= 0 or yr <= 0 or (int(unit.value) == 2 and xr in (72.0, 96.0, 300.0)):
        return None  # screen/print defaults say nothing about the scene
    return (per_unit / yr, per_unit / xr), "µm"


def _open_slide(path: Path) -> Source | None:
    """A whole-slide TIFF through tiffslide; None when tiffslide cannot open it (tifffile then tries)."""
    try:
        import tiffslide

        slide = tiffslide.TiffSlide(path)
        group = slide.zarr_group
    except Exception:
        return None
    keys = sorted(group.array_keys(), key=int)
    levels = [da.from_zarr(group[k]) for k in keys]
    props = slide.properties
    mpp_x, mpp_y = props.get("tiffslide.mpp-x"), props.get("tiffslide.mpp-y")
    pixel_size = (float(mpp_y), float(mpp_x)) if mpp_x and mpp_y else None
    axes = "YXS" if levels[0].ndim == 3 else "YX"
    return Source(levels=levels, axes=axes, pixel_size=pixel_size, pixel_unit="µm" if pixel_size else None,
                  rgb_hint=True, resources=[slide], label=str(path),
                  metadata={"format": "slide", "vendor": props.get("tiffslide.vendor")})


# ----------------------------------------------------------------------------------------------- zarr


def open_zarr(path: Path) -> Source:
    """An OME-Zarr image (``multiscales``), or a plain zarr array / group holding one array."""
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise UnsupportedImageError(
            f"{path} is a folder but not a zarr store we can read ({exc}): open an image file or an OME-Zarr folder."
        ) from exc
    if hasattr(node, "shape"):
        if node.ndim == 2:
            axes = "YX"
        elif node.ndim == 3:
            axes = "YXC" if node.shape[2] <= 64 else "CYX"
        else:
            axes = "Q" * node.ndim
        return Source(levels=[da.from_zarr(node)], axes=axes, label=str(path), metadata={"format": "zarr"})
    attrs = node.attrs.asdict()
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales")
    if not multiscales:
        arrays = list(node.array_keys())
        if len(arrays) == 1:
            return open_zarr(path / arrays[0])
        raise UnsupportedImageError(
            f"{path} is a zarr group without OME 'multiscales' metadata: open an OME-Zarr image or a single array."
        )
    ms = multiscales[0]
    axes = "".join(_axis_letter(a) for a in ms.get("axes", [])) or None
    levels = [da.from_zarr(node[d["path"]]) for d in ms["datasets"]]
    if axes is None:
        axes = "TCZYX"[-levels[0].ndim:]
    pixel_size, unit = _ngff_pixel_size(ms, axes)
    names = None
    omero = ome.get("omero", {})
    if omero.get("channels"):
        names = [c.get("label", f"channel {i}") for i, c in enumerate(omero["channels"])]
    rgb_hint = False if "C" in axes else None
    return Source(levels=levels, axes=axes, pixel_size=pixel_size, pixel_unit=unit, channel_names=names,
                  rgb_hint=rgb_hint, label=str(path),
                  metadata={"format": "ome-zarr", "image-label": ome.get("image-label")})


def _axis_letter(axis) -> str:
    name = axis["name"] if isinstance(axis, dict) else str(axis)
    return {"c": "C", "t": "T", "z": "Z", "y": "Y", "x": "X"}.get(name.lower(), "Q")


def _ngff_pixel_size(ms: dict, axes: str):
    transforms = ms["datasets"][0].get("coordinateTransformations", [])
    scale = next((t["scale"] for t in transforms if t.get("type") == "scale"), None)
    if scale is None or "Y" not in axes:
        return None, None
    iy, ix = axes.index("Y"), axes.index("X")
    unit = None
    raw_axes = ms.get("axes", [])
    if raw_axes and isinstance(raw_axes[ix], dict):
        unit = raw_axes[ix].get("unit")
    unit = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "meter": "m"}.get(unit, unit)
    return (float(scale[iy]), float(scale[ix])), unit


# ----------------------------------------------------------------------------------------------- PNG / JPEG


class _DecodedImage:
    """Array-like whose pixels are decoded on first access (shared through a small cache), so open is cheap."""

    def __init__(self, path: Path, shape: tuple, dtype):
        self.path, self.shape, self.dtype, self.ndim = path, shape, np.dtype(dtype), len(shape)
        self._key = (str(path), os.stat(path).st_mtime_ns)

    def __getitem__(self, item):
        return _decode(*self._key, self.shape)[item]


@functools.lru_cache(maxsize=2)
def _decode(path: str, mtime_ns: int, shape: tuple) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UnsupportedImageError(f"{path} could not be decoded (damaged or truncated): re-export it.")
    if img.ndim == 3:
        img = img[..., [2, 1, 0, 3][: img.shape[2]]]  # OpenCV gives BGR(A)
    if img.ndim == 3 and len(shape) == 2:
        img = img[..., 0]
    if img.ndim == 2 and len(shape) == 3:
        img = np.repeat(img[..., None], shape[2], axis=2)
    if img.shape != shape:
        raise UnsupportedImageError(f"{path} decoded to {img.shape}, not the {shape} its header says: re-export it.")
    return img


def _png_header(path: Path):
    """(height, width, channels, dtype) from the IHDR chunk."""
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise UnsupportedImageError(f"{path} is a damaged PNG (no header): re-export it.")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if channels is None:
        raise UnsupportedImageError(f"{path} is a damaged PNG (colour type {colour}): re-export it.")
    dtype = np.uint16 if depth == 16 else np.uint8
    return height, width, channels, dtype


def _jpeg_header(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            channels = {"L": 1, "RGB": 3, "CMYK": 3, "YCbCr": 3}.get(im.mode, 3)
    except Exception as exc:
        raise UnsupportedImageError(f"{path} is a damaged JPEG ({exc}): re-export it.") from exc
    return height, width, channels, np.uint8


def open_decoded(path: Path, kind: str) -> Source:
    height, width, channels, dtype = (_png_header if kind == "PNG" else _jpeg_header)(path)
    if height * width > MAX_DECODED_PIXELS:
        raise UnsupportedImageError(
            f"{path} says it is {width} x {height} pixels; a {kind} that large must be decoded whole in memory "
            f"(limit {MAX_DECODED_PIXELS:,} pixels). Convert it to a tiled pyramidal TIFF (e.g. "
            "`vips tiffsave in.png out.tif --tile --pyramid --bigtiff`) and open that."
        )
    if height == 0 or width == 0:
        raise UnsupportedImageError(f"{path} is a damaged {kind}: its header says it has no pixels.")
    decoded_channels = 1 if channels == 1 else (4 if channels in (2, 4) else 3)
    if kind == "PNG" and channels == 2:
        decoded_channels = 2
    shape = (height, width) if decoded_channels == 1 else (height, width, decoded_channels)
    lazy = _DecodedImage(path, shape, dtype)
    chunks = (1024, 1024) + ((-1,) if len(shape) == 3 else ())
    level = da.from_array(lazy, chunks=chunks, asarray=True, lock=False, meta=np.empty((0,) * len(shape), dtype))
    axes = "YX" if len(shape) == 2 else "YXS"
    return Source(levels=[level], axes=axes, rgb_hint=channels != 1, label=str(path),
                  metadata={"format": kind.lower()})
