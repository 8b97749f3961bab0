"""The user's checkpoint folder: list, load, rename, delete, import and export checkpoints.

A checkpoint is a ``.pt`` file written by ``napari_uhrseg.methods.base.save_checkpoint``: weights plus the
metadata that says which method, preset and classes it belongs to. Everything here goes through
``load_checkpoint`` (``torch.load(weights_only=True)`` with the metadata checked), so a damaged file or a
checkpoint for another method or class list is a ``CheckpointError`` whose message says what to do.

The folder is ``$UHRSEG_CHECKPOINT_DIR`` when set, else the platform's user data folder
(``~/.local/share/napari-uhrseg/checkpoints`` on Linux). Starter checkpoints shipped in the package
(``napari_uhrseg/starters/*.pt``) are listed too, read-only.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from napari_uhrseg.errors import CheckpointError

SUFFIX = ".pt"
RESUMABLE_TAG = ".last"  # engine.train.last_path: "x.pt" -> "x.last.pt" holds the optimiser state for Resume
STARTERS_DIR = Path(__file__).parent / "starters"
# A checkpoint name is a file name without folders: letters, digits and a few separators.
_NAME_OK = re.compile(r"^[\w][\w .,+()=-]{0,119}$")


def user_data_dir() -> Path:
    """napari-uhrseg's per-user data folder (not created here)."""
    from platformdirs import user_data_dir as _platform_user_data_dir

    return Path(_platform_user_data_dir("napari-uhrseg", appauthor=False))


def default_checkpoint_dir() -> Path:
    """``$UHRSEG_CHECKPOINT_DIR`` if set, else ``<user data dir>/checkpoints``."""
    env = os.environ.get("UHRSEG_CHECKPOINT_DIR")
    return Path(env).expanduser() if env else user_data_dir() / "checkpoints"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint as a list shows it. ``error`` is set (and the metadata empty) for unreadable files."""

    path: Path
    method: str = ""
    preset: str = ""
    class_names: list[str] = field(default_factory=list)
    created: str = ""
    size_bytes: int = 0
    starter: bool = False
    error: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """One line for a list: ``name — method/preset, N classes, created``."""
        if not self.ok:
            return f"{self.name} — unreadable"
        where = " (starter)" if self.starter else ""
        return f"{self.name}{where} — {self.method}/{self.preset}, {len(self.class_names)} classes, {self.created}"


def read_info(path: str | os.PathLike, *, starter: bool = False) -> CheckpointInfo:
    """Metadata of one checkpoint; an unreadable file gives an info with ``error`` set instead of raising."""
    from napari_uhrseg.methods.base import read_checkpoint_meta

    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        meta = read_checkpoint_meta(path)
    except CheckpointError as exc:
        return CheckpointInfo(path=path, size_bytes=size, starter=starter, error=str(exc))
    return CheckpointInfo(
        path=path,
        method=str(meta["method"]),
        preset=str(meta["preset"]),
        class_names=[str(c) for c in meta["class_names"]],
        created=str(meta.get("created", "")),
        size_bytes=size,
        starter=starter,
    )


class CheckpointManager:
    """The user checkpoint folder plus the read-only starters.

    Parameters
    ----------
    folder : path, optional
        Where user checkpoints live; default ``default_checkpoint_dir()``. Created on first write.
    starters_dir : path, optional
        Read-only checkpoints shipped with the package; default ``napari_uhrseg/starters``.
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, starters_dir: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else default_checkpoint_dir()
        self.starters_dir = Path(starters_dir) if starters_dir is not None else STARTERS_DIR
        # (path, mtime_ns, size) -> CheckpointInfo: listing needs a full torch.load per file, so cache it.
        self._cache: dict[tuple[str, int, int], CheckpointInfo] = {}

    # ------------------------------------------------------------------------------------------ listing
    def list(
        self, *, include_starters: bool = True, method: str | None = None, include_resumable: bool = False
    ) -> list[CheckpointInfo]:
        """User checkpoints (newest first), then starters; ``method`` keeps only that method's files.

        Damaged files are listed with ``error`` set so that the user can see and delete them. The resumable
        training states (``*.last.pt``, written next to each best checkpoint) are left out unless asked for.
        """
        user = sorted(self._files(self.folder), key=lambda p: p.stat().st_mtime, reverse=True)
        if not include_resumable:
            user = [p for p in user if not p.stem.endswith(RESUMABLE_TAG)]
        infos = [self._info(p, starter=False) for p in user]
        if include_starters:
            infos += [self._info(p, starter=True) for p in sorted(self._files(self.starters_dir))]
        if method is not None:
            infos = [i for i in infos if i.method.lower() == method.lower()]
        return infos

    def find(self, name: str) -> CheckpointInfo:
        """The checkpoint called ``name`` (file stem, user folder first, then starters)."""
        return self._info(self._resolve(name), starter=self._is_starter(self._resolve(name)))

    def _files(self, folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.suffix == SUFFIX and p.is_file() and not p.name.startswith(".")]

    def _info(self, path: Path, *, starter: bool) -> CheckpointInfo:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._cache:
            self._cache[key] = read_info(path, starter=starter)
        return self._cache[key]

    def _resolve(self, name_or_path: str | os.PathLike) -> Path:
        """A name in the user folder or the starters, or a path to a file anywhere."""
        cand = Path(name_or_path)
        if cand.suffix == SUFFIX and cand.is_file():
            return cand
        stem = cand.name[: -len(SUFFIX)] if cand.name.endswith(SUFFIX) else cand.name
        for folder in (self.folder, self.starters_dir):
            path = folder / f"{stem}{SUFFIX}"
            if path.is_file():
                return path
        raise CheckpointError(
            f"No checkpoint called {stem!r} in {self.folder} or the starters: "
            "choose one from the list, or import the file first."
        )

    def _is_starter(self, path: Path) -> bool:
        return path.resolve().parent == self.starters_dir.resolve()

    # ---------------------------------------------------------------------------------------- loading
    def load(
        self, name_or_path: str | os.PathLike, *, method: str | None = None, class_names: list[str] | None = None
    ) -> tuple[dict, dict]:
        """``(state_dict, meta)`` of a checkpoint, checked against ``method`` and ``class_names`` when given."""
        from napari_uhrseg.methods.base import load_checkpoint

        return load_checkpoint(self._resolve(name_or_path), method=method, class_names=class_names)

    def path_for_new(self, method: str, preset: str = "", *, stem: str | None = None) -> Path:
        """A free path in the user folder for a new checkpoint, e.g. ``grnet-fast-20261122-0441.pt``."""
        import datetime as _dt

        if stem is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            stem = "-".join(s for s in (method, preset, stamp) if s)
        stem = _check_name(stem)
        path, n = self.folder / f"{stem}{SUFFIX}", 2
        while path.exists():
            path, n = self.folder / f"{stem}-{n}{SUFFIX}", n + 1
        return path

    # ------------------------------------------------------------------------------------------ edits
    def rename(self, name: str, new_name: str) -> CheckpointInfo:
        """Rename a user checkpoint; starters are read-only and an existing name is never overwritten."""
        src = self._user_file(name, "rename")
        dst = self.folder / f"{_check_name(new_name)}{SUFFIX}"
        if dst.exists():
            raise CheckpointError(f"A checkpoint called {dst.stem!r} already exists: choose another name.")
        os.replace(src, dst)
        return self._info(dst, starter=False)

    def delete(self, name: str) -> None:
        """Delete a user checkpoint (a damaged one too); starters are read-only."""
        self._user_file(name, "delete").unlink()

    def import_file(
        self,
        source: str | os.PathLike,
        *,
        name: str | None = None,
        method: str | None = None,
        class_names: list[str] | None = None,
        overwrite: bool = False,
    ) -> CheckpointInfo:
        """Copy a checkpoint into the user folder after checking it loads (and matches ``method``/``class_names``).

        The copy is atomic: a temporary file in the folder, renamed when complete.
        """
        from napari_uhrseg.io.atomic import atomic_path
        from napari_uhrseg.methods.base import load_checkpoint

        source = Path(source)
        load_checkpoint(source, method=method, class_names=class_names)  # raises a clear CheckpointError
        stem = _check_name(name if name is not None else source.stem)
        dst = self.folder / f"{stem}{SUFFIX}"
        if dst.exists() and not overwrite:
            raise CheckpointError(
                f"A checkpoint called {stem!r} already exists in {self.folder}: choose another name or overwrite it."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(source, tmp)
        return self._info(dst, starter=False)

    def export_file(self, name: str, destination: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Copy a checkpoint (user or starter) to ``destination`` (a file, or a folder to put it in), atomically."""
        from napari_uhrseg.io.atomic import atomic_path

        src = self._resolve(name)
        dst = Path(destination)
        if dst.is_dir():
            dst = dst / src.name
        if dst.suffix != SUFFIX:
            dst = dst.with_name(dst.name + SUFFIX)
        if dst.exists() and not overwrite:
            raise CheckpointError(f"{dst} already exists: choose another file name or allow overwriting.")
        if not dst.parent.is_dir():
            raise CheckpointError(f"Folder {dst.parent} does not exist: choose an existing folder.")
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return dst

    def _user_file(self, name: str, action: str) -> Path:
        path = self._resolve(name)
        if self._is_starter(path):
            raise CheckpointError(f"{path.stem!r} is a starter checkpoint and cannot be {action}d: export a copy.")
        if path.resolve().parent != self.folder.resolve():
            raise CheckpointError(f"{path} is not in the checkpoint folder {self.folder}: import it first.")
        return path


def _check_name(name: str) -> str:
    name = name.strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not _NAME_OK.match(name):
        raise CheckpointError(
            f"{name!r} is not a usable checkpoint name: use letters, digits, spaces and - _ . + ( ) "
            "(no folders), at most 120 characters."
        )
    return name
