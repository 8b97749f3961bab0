"""All-or-nothing writes of files and folders.

Everything is first written to a temporary sibling of the target (same folder, so the same file system) and
moved into place only when complete: a file with :func:`os.replace` (atomic on POSIX and Windows); a folder
(zarr store) by renaming the old one away, renaming the new one in, then deleting the old one. A process that
is killed midway therefore leaves the previous file intact; at worst a ``.<name>.tmp-*`` sibling stays behind,
which the next successful write of the same target removes.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from napari_uhrseg.errors import ExportError

_TMP_TAG = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stale_siblings(path: Path) -> list[Path]:
    """Temporary siblings left by earlier writes of ``path`` that were killed (their process is gone)."""
    stale = []
    prefix = f".{path.name}{_TMP_TAG}"
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                stale.append(p)
    return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_folder(path: str | os.PathLike) -> None:
    """Raise :class:`ExportError` now if ``path`` could not be written because its folder is missing or not
    writable: long jobs call it before they start, so that the answer comes before the hours of work."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise ExportError(f"Folder {folder} does not exist: create it or choose another one.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"No permission to write in {folder}: choose a folder you can write to.")


def describe_os_error(exc: OSError, path: Path) -> str:
    """A user-facing sentence for an OS error met while writing ``path``."""
    if exc.errno == errno.ENOSPC:
        return f"The disk is full while writing {path}: free some space or choose another folder."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"No permission to write {path}: choose a folder you can write to."
    if exc.errno == errno.ENOENT:
        return f"Folder {path.parent} does not exist: create it or choose another one."
    return f"Could not write {path} ({exc.strerror or exc}): check the path and the disk."


_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zattrs")


def check_replaceable(path: str | os.PathLike, folder_output: bool) -> None:
    """Raise :class:`ExportError` if writing ``path`` would delete a folder of the user's: a folder there is
    replaced only by a store (``folder_output``), and only when it is a zarr store itself or empty. Long jobs
    call it before they start; every atomic write checks it again before the move."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    if not folder_output:
        raise ExportError(f"{path} is a folder, and a file cannot replace it (the folder is left untouched): "
                          "rename or move the folder, or choose another name.")
    if not any((path / m).exists() for m in _ZARR_MARKERS) and any(path.iterdir()):
        raise ExportError(f"{path} is a folder that is not a zarr store, so it was not replaced (its files are "
                          "untouched): rename or move it, or choose another name.")


def replace_into(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` (file or folder) onto ``path``, replacing what was there — never a folder of
    the user's (``check_replaceable``)."""
    check_replaceable(path, tmp.is_dir())
    if tmp.is_dir() and path.exists():
        old = _temp_sibling(path)
        os.replace(path, old)  # a folder cannot be replaced in one rename: move the old one aside first
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)  # put the previous store back
            raise
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success move it onto ``path``, on any error delete it.

    The body may create a file or a folder at the yielded path. OS errors (disk full, no permission) are
    re-raised as :class:`ExportError` with a message that says what to do; the previous ``path`` is untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"Folder {path.parent} does not exist: create it or choose another one.")
    for stale in _stale_siblings(path):
        _remove(stale)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise ExportError(f"Nothing was written for {path}.")
        replace_into(tmp, path)
    except ExportError:
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise ExportError(describe_os_error(exc, path)) from exc
    except BaseException:
        _remove(tmp)
        raise
