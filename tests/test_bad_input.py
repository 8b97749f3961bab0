"""A corpus of bad files, generated here: each gives UnsupportedImageError naming the file and what to do."""
import struct
import zlib

import numpy as np
import pytest
import tifffile

from napari_uhrseg._reader import get_reader
from napari_uhrseg.errors import UnsupportedImageError
from napari_uhrseg.io.pyramid import open_pyramid


def _png_with_header(width, height):
    """A PNG whose IHDR claims ``width x height`` RGB pixels but holds one tiny compressed row."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _truncated_tiff(path):
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (512, 512), dtype=np.uint8), tile=(128, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _png_named_tif(path):
    import cv2

    cv2.imwrite(str(path.with_suffix(".png")), np.zeros((32, 32, 3), np.uint8))
    path.with_suffix(".png").rename(path)


CORPUS = {
    "empty.tif": (lambda p: p.write_bytes(b""), "empty"),
    "truncated.tif": (_truncated_tiff, "truncated"),
    "garbage.tif": (lambda p: p.write_bytes(b"II*\x00" + b"\xff" * 64), "damaged TIFF"),
    "png_named.tif": (_png_named_tif, "rename it with the .png extension"),
    "text.png": (lambda p: p.write_text("this is not an image\n"), "not an image file"),
    "one_pixel.tif": (lambda p: tifffile.imwrite(p, np.zeros((1, 1), np.uint8)), "only 1 x 1 pixels"),
    "stack.tif": (lambda p: tifffile.imwrite(p, np.zeros((5, 64, 64), np.uint8)), "stack"),
    "float4.tif": (lambda p: tifffile.imwrite(p, np.zeros((64, 64, 4), np.float32), photometric="minisblack",
                                              planarconfig="contig"), "floating-point channels"),
    "bomb.png": (lambda p: p.write_bytes(_png_with_header(200_000, 200_000)), "Convert it to a tiled pyramidal TIFF"),
    "missing.png": (None, "does not exist"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_file_gives_a_clear_error(tmp_path, name):
    make, message = CORPUS[name]
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(UnsupportedImageError) as info:
        open_pyramid(path)
    text = str(info.value)
    assert str(path) in text and message in text
    # The napari reader claims the file by its name and passes the same clear error on (napari shows it).
    reader = get_reader(str(path))
    assert reader is not None
    with pytest.raises(UnsupportedImageError, match=message):
        reader(str(path))


def test_a_tiff_with_no_pages_gets_our_message_only(tmp_path, caplog):
    # tifffile logs "... contains no pages" itself; the user should read one message, ours.
    path = tmp_path / "nopages.tif"
    path.write_bytes(b"II*\x00" + b"\x00" * 50)
    with caplog.at_level("WARNING"), pytest.raises(UnsupportedImageError, match="it contains no image"):
        open_pyramid(path)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_reader_declines_what_is_not_ours(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "folder")) is None
    assert get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) is None
