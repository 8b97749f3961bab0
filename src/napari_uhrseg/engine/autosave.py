"""Autosave of the labels being edited, so that a crash loses at most the last interval of work.

Layout of one image's autosave (``<root>/<key>/``, ``key`` a hash of the image id)::

    manifest.json       image id, shape, dtype, chunk shape, classes, time, and one hash per chunk
    chunks/<hash>.z     the chunk's bytes, zlib-compressed; all-zero chunks have no file

Chunks are content-addressed: a chunk whose bytes did not change has the same hash and is not rewritten,
so a snapshot of a 100k x 100k label store costs the chunks painted since the last one. Every file is
written to a temporary name and renamed; the manifest is renamed last, and files it does not reference are
removed only after that. A process killed at any moment therefore leaves the previous manifest and all its
chunks in place: the last complete snapshot always loads.

Coordinates: label arrays are level-0 pixels (Y, X); chunks tile them from (0, 0).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_uhrseg.errors import UhrsegError

MANIFEST = "manifest.json"
FORMAT = 1
ZERO = "0"  # hash recorded for an all-zero (unlabelled) chunk; no file is written for it
DEFAULT_INTERVAL_S = 60.0
DEFAULT_CHUNK = (1024, 1024)
# Below this many pixels a numpy label array is rescanned at every tick even without change hints:
# hashing 64 Mpx takes well under a second in the background thread.
FULL_SCAN_MAX_PIXELS = 64 * 2**20


def autosave_root() -> Path:
    """``$UHRSEG_AUTOSAVE_DIR`` if set, else ``<user data dir>/autosave``."""
    env = os.environ.get("UHRSEG_AUTOSAVE_DIR")
    if env:
        return Path(env).expanduser()
    from napari_uhrseg.checkpoints import user_data_dir

    return user_data_dir() / "autosave"


def image_id_for(path_or_name: str | os.PathLike) -> str:
    """A stable id for an image: its absolute path when it is a file or folder, else the name as given."""
    p = Path(path_or_name).expanduser()
    return str(p.resolve()) if p.exists() else str(path_or_name)


def _key(image_id: str) -> str:
    return hashlib.blake2b(image_id.encode("utf-8"), digest_size=10).hexdigest()


def autosave_folder(image_id: str, root: str | os.PathLike | None = None) -> Path:
    return (Path(root) if root is not None else autosave_root()) / _key(image_id)


@dataclass(frozen=True)
class AutosaveInfo:
    """What a manifest says about the last complete snapshot of one image's labels."""

    image_id: str
    folder: Path
    shape: tuple[int, int]
    dtype: str
    chunk_shape: tuple[int, int]
    classes: list[str] | None
    saved_at: str  # ISO 8601, UTC
    saved_at_s: float  # seconds since the epoch
    generation: int  # 1 for the first snapshot, +1 for each later one
    chunks: dict[str, str] = field(repr=False, default_factory=dict)  # "cy,cx" -> hash

    def describe(self) -> str:
        age = max(0.0, time.time() - self.saved_at_s)
        when = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.0f} h"
        return f"labels {self.shape[0]} x {self.shape[1]} autosaved {when} ago ({self.saved_at})"


# ------------------------------------------------------------------------------------------- small files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; rename is already atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _chunk_grid(shape: tuple[int, int], chunk: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[0] // chunk[0]), -(-shape[1] // chunk[1])


def _chunk_slices(cy: int, cx: int, shape: tuple[int, int], chunk: tuple[int, int]) -> tuple[slice, slice]:
    y0, x0 = cy * chunk[0], cx * chunk[1]
    return slice(y0, min(y0 + chunk[0], shape[0])), slice(x0, min(x0 + chunk[1], shape[1]))


def _hash_chunk(block: np.ndarray) -> str:
    if not block.any():
        return ZERO
    h = hashlib.blake2b(digest_size=16)
    h.update(str(block.shape).encode())
    h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- reading
def find_autosave(image_id: str, *, root: str | os.PathLike | None = None) -> AutosaveInfo | None:
    """The last complete snapshot for ``image_id``, or None when there is none (or it is unreadable)."""
    info = _read_manifest(autosave_folder(image_id, root))
    if info is None or info.image_id != image_id:
        return None  # none, another version, or (vanishingly unlikely) a hash collision
    return info


def _read_manifest(folder: Path) -> AutosaveInfo | None:
    try:
        m = json.loads((folder / MANIFEST).read_text("utf-8"))
        if m.get("format") != FORMAT or not isinstance(m.get("image_id"), str):
            return None
        return AutosaveInfo(
            image_id=m["image_id"],
            folder=folder,
            shape=tuple(m["shape"]),
            dtype=m["dtype"],
            chunk_shape=tuple(m["chunk_shape"]),
            classes=m.get("classes"),
            saved_at=m["saved_at"],
            saved_at_s=float(m["saved_at_s"]),
            generation=int(m["generation"]),
            chunks=dict(m["chunks"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, half-written or foreign
        return None


def list_autosaves(*, root: str | os.PathLike | None = None) -> list[AutosaveInfo]:
    """Every readable snapshot under ``root`` (the autosave folder), the most recent first."""
    base = Path(root) if root is not None else autosave_root()
    found = []
    for manifest in base.glob(f"*/{MANIFEST}") if base.is_dir() else []:
        info = _read_manifest(manifest.parent)
        if info is not None and manifest.parent.name == _key(info.image_id):
            found.append(info)
    return sorted(found, key=lambda i: -i.saved_at_s)


def restore(
    image_id_or_info: str | AutosaveInfo, *, out: Any = None, root: str | os.PathLike | None = None
) -> Any:
    """Read the last snapshot back.

    Parameters
    ----------
    image_id_or_info : str or AutosaveInfo
    out : array-like, optional
        A numpy or zarr array of the snapshot's shape to fill chunk by chunk (large label stores);
        by default a new numpy array is returned.

    Raises ``UhrsegError`` when there is no snapshot or one of its chunk files is missing.
    """
    info = image_id_or_info
    if not isinstance(info, AutosaveInfo):
        info = find_autosave(info, root=root)
        if info is None:
            raise UhrsegError(f"There is no autosave for {image_id_or_info!r}: nothing to restore.")
    dtype = np.dtype(info.dtype)
    if out is None:
        out = np.zeros(info.shape, dtype=dtype)
    elif tuple(out.shape) != tuple(info.shape):
        raise UhrsegError(
            f"The autosave of {info.image_id} has shape {info.shape}, the labels have {tuple(out.shape)}: "
            "restore into a labels layer of the same image."
        )
    for key, digest in info.chunks.items():
        cy, cx = (int(v) for v in key.split(","))
        sy, sx = _chunk_slices(cy, cx, info.shape, info.chunk_shape)
        if digest == ZERO:
            block = np.zeros((sy.stop - sy.start, sx.stop - sx.start), dtype=dtype)
        else:
            block = _read_chunk(info, digest, (sy.stop - sy.start, sx.stop - sx.start), dtype)
        out[sy, sx] = block
    return out


def _read_chunk(info: AutosaveInfo, digest: str, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    path = info.folder / "chunks" / f"{digest}.z"
    try:
        raw = zlib.decompress(path.read_bytes())
    except (OSError, zlib.error) as exc:
        raise UhrsegError(
            f"Autosave chunk {path} is missing or damaged ({exc}): discard this autosave."
        ) from None
    block = np.frombuffer(raw, dtype=dtype)
    if block.size != shape[0] * shape[1]:
        raise UhrsegError(f"Autosave chunk {path} has the wrong size: discard this autosave.")
    return block.reshape(shape)


def discard(image_id: str, *, root: str | os.PathLike | None = None) -> bool:
    """Delete the autosave of ``image_id``; True when there was one."""
    import shutil

    folder = autosave_folder(image_id, root)
    if not folder.exists():
        return False
    # Manifest first: from then on the folder holds no snapshot, even if the rest fails half-way.
    (folder / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    return True


# --------------------------------------------------------------------------------------------- writing
class Autosaver:
    """Snapshots a label array of one image every ``interval_s`` seconds (``start``) and on demand (``save_now``).

    Parameters
    ----------
    image_id : str
        Which image the labels belong to (``image_id_for(path)``, or the layer name for in-memory images).
    labels : array or callable
        The (Y, X) integer label array (numpy or zarr, level-0 pixels), or a function returning the current one
        (a napari layer's ``data`` can be replaced).
    classes : list of str, optional
        Class names, stored in the manifest for the restore prompt.
    chunk_shape : (int, int), optional
        Snapshot chunking; default the zarr array's chunks, else 1024 x 1024.

    Change tracking: ``mark_dirty(y0, x0, h, w)`` says which region changed (the widgets call it on paint and
    on engine writes). A tick with no hint rescans a numpy array of up to 64 Mpx (content hashes skip what
    did not change) and skips a larger or zarr-backed one.
    """

    def __init__(
        self,
        image_id: str,
        labels: Any | Callable[[], Any],
        *,
        classes: list[str] | None = None,
        root: str | os.PathLike | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        chunk_shape: tuple[int, int] | None = None,
    ):
        self.image_id = image_id
        self.classes = list(classes) if classes is not None else None
        self.folder = autosave_folder(image_id, root)
        self.interval_s = float(interval_s)
        self._get_labels = labels if callable(labels) else (lambda: labels)
        self._chunk_shape = tuple(chunk_shape) if chunk_shape else None
        self._grid: dict[str, str] = {}  # hashes of the last snapshot written by this saver
        self._last_shape: tuple[int, int] | None = None
        self._dirty: set[tuple[int, int]] | None = None  # None = everything
        self._lock = threading.Lock()  # guards the change hints
        self._save_lock = threading.Lock()  # one snapshot at a time (timer thread and on-demand saves)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: Exception | None = None
        previous = find_autosave(image_id, root=root)
        self.generation = previous.generation if previous else 0

    # ----------------------------------------------------------------------------------- change hints
    def mark_dirty(self, y0: int | None = None, x0: int | None = None, h: int | None = None, w: int | None = None):
        """Record that a region (level-0 pixels) changed; no arguments means the whole array."""
        with self._lock:
            if y0 is None or self._dirty is None or self._last_shape is None:
                self._dirty = None
                return
            cy0, cx0 = max(0, y0) // self._chunks()[0], max(0, x0) // self._chunks()[1]
            cy1 = (max(0, y0 + (h or 1)) - 1) // self._chunks()[0]
            cx1 = (max(0, x0 + (w or 1)) - 1) // self._chunks()[1]
            self._dirty.update((cy, cx) for cy in range(cy0, cy1 + 1) for cx in range(cx0, cx1 + 1))

    def _chunks(self) -> tuple[int, int]:
        if self._chunk_shape is None:
            chunks = getattr(self._get_labels(), "chunks", None)
            ok = isinstance(chunks, tuple) and len(chunks) == 2 and all(isinstance(c, int) for c in chunks)
            self._chunk_shape = tuple(chunks) if ok else DEFAULT_CHUNK
        return self._chunk_shape

    # ------------------------------------------------------------------------------------------ saving
    def save_now(self, *, full: bool = False) -> AutosaveInfo | None:
        """Write a snapshot of what changed; returns its info, or None when nothing needed saving.

        ``full=True`` rescans every chunk (content hashes still skip unchanged ones).
        """
        with self._save_lock:
            return self._save(full)

    def _save(self, full: bool) -> AutosaveInfo | None:
        labels = self._get_labels()
        if labels is None:
            return None
        shape = tuple(int(s) for s in labels.shape)
        if len(shape) != 2:
            raise UhrsegError(f"Autosave handles 2-D (Y, X) labels; these have shape {shape}.")
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        if shape != self._last_shape:
            dirty, self._grid = None, {}
        if full or (not dirty and dirty is not None and self._cheap_to_scan(labels)):
            dirty = None
        if dirty is not None and not dirty:
            return None
        try:
            return self._write_snapshot(labels, shape, dirty)
        except BaseException:
            with self._lock:  # nothing of this tick is lost: the next one rescans everything
                self._dirty = None
            raise

    def _cheap_to_scan(self, labels) -> bool:
        return isinstance(labels, np.ndarray) and labels.size <= FULL_SCAN_MAX_PIXELS and bool(self._grid)

    def _write_snapshot(self, labels, shape, dirty: set[tuple[int, int]] | None) -> AutosaveInfo:
        chunk = self._chunks()
        ny, nx = _chunk_grid(shape, chunk)
        todo = [(cy, cx) for cy in range(ny) for cx in range(nx)] if dirty is None else sorted(dirty)
        chunk_dir = self.folder / "chunks"
        chunk_dir.mkdir(parents=True, exist_ok=True)
        grid = dict(self._grid)
        for cy, cx in todo:
            if cy >= ny or cx >= nx:
                continue
            block = np.asarray(labels[_chunk_slices(cy, cx, shape, chunk)])
            digest = _hash_chunk(block)
            grid[f"{cy},{cx}"] = digest
            path = chunk_dir / f"{digest}.z"
            if digest != ZERO and not path.exists():  # same bytes, same name: never rewritten
                _write_atomic(path, zlib.compress(np.ascontiguousarray(block).tobytes(), 1))
        _fsync_dir(chunk_dir)
        now = _dt.datetime.now(_dt.timezone.utc)
        manifest = {
            "format": FORMAT,
            "image_id": self.image_id,
            "shape": list(shape),
            "dtype": np.dtype(labels.dtype).str,
            "chunk_shape": list(chunk),
            "classes": self.classes,
            "saved_at": now.isoformat(timespec="seconds"),
            "saved_at_s": now.timestamp(),
            "generation": self.generation + 1,
            "chunks": grid,
        }
        _write_atomic(self.folder / MANIFEST, json.dumps(manifest).encode("utf-8"))
        _fsync_dir(self.folder)
        self.generation += 1
        self._grid, self._last_shape = grid, shape
        self._collect_garbage(set(grid.values()))
        return find_autosave(self.image_id, root=self.folder.parent)

    def _collect_garbage(self, keep: set[str]) -> None:
        """Remove chunk files the committed manifest does not use, and temporaries of killed writers."""
        for path in (self.folder / "chunks").iterdir():
            stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
            if stale_tmp and f".{os.getpid()}." in path.name:
                continue  # one of ours, being written by another thread
            if stale_tmp or (path.suffix == ".z" and path.stem not in keep):
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------ background
    def start(self) -> "Autosaver":
        """Save every ``interval_s`` seconds in a daemon thread until ``stop()``."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"uhrseg-autosave-{self.folder.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.save_now()
                self.last_error = None
            except Exception as exc:  # a full disk must not kill the thread; the widget shows last_error
                self.last_error = exc

    def stop(self, *, final_save: bool = True) -> None:
        """Stop the thread; by default write one last snapshot of what changed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if final_save:
            self.save_now()
