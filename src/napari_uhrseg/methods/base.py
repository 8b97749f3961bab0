"""What every method offers the engine and the widgets: the ``Method`` interface, ``Prediction``,
a registry by name, and checkpoints that carry their own metadata.

Coordinates: a ``Prediction`` is in *window pixels at the working level*; the engine converts its
artefacts to level-0 pixels with ``napari_uhrseg.io.coords``.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from napari_uhrseg.errors import CheckpointError

CHECKPOINT_FORMAT = 1
REQUIRED_META = ("format", "method", "preset", "class_names", "normalisation")


@dataclass
class Prediction:
    """One window's result.

    probabilities: float32 array (C, H, W), class probabilities at the window's working resolution.
    artefacts: method-specific records in window pixels, e.g. ``{"patches": [...]}`` for PPN
        (each ``{"box": (y0, x0, y1, x1), "probability": p, "selected": bool}``), ``{"uncertainty": (H, W)}``
        for MagNet, per-step outputs for CascadePSP.
    """

    probabilities: np.ndarray
    artefacts: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        return np.argmax(self.probabilities, axis=0)


class Method:
    """A segmentation method as the engine sees it. Subclasses set ``name`` and implement ``predict``.

    ``class_names`` includes index 0 (e.g. "background" or "unlabelled" — its meaning is the checkpoint's).
    ``predict`` takes an RGB window ``(H, W, 3)`` uint8 at the working level and returns a ``Prediction``.
    """

    name: ClassVar[str] = ""
    class_names: list[str]
    device: str = "cpu"

    def predict(self, window: np.ndarray, *, context: dict | None = None) -> Prediction:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str = "cpu") -> "Method":  # pragma: no cover
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make a method available by ``name`` (lower case, e.g. ``"grnet"``)."""

    def deco(cls: type[Method]) -> type[Method]:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    from napari_uhrseg.methods import _load_all

    _load_all()
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"Unknown method {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}.")
    return _REGISTRY[key]


def available_methods() -> list[str]:
    from napari_uhrseg.methods import _load_all

    _load_all()
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike, state_dict: dict, meta: dict) -> Path:
    """Write ``{"meta": meta, "state_dict": state_dict}`` atomically (temporary file, then rename).

    ``meta`` must hold at least ``method``, ``preset``, ``class_names`` and ``normalisation``
    (``{"mean": [...], "std": [...]}`` applied to inputs scaled to [0, 1]); ``format`` and ``created`` are added.
    Only tensors, numbers, strings, lists and dicts go in, so ``torch.load(weights_only=True)`` reads it back.
    """
    import torch

    from napari_uhrseg import __version__

    meta = dict(meta)
    meta.setdefault("format", CHECKPOINT_FORMAT)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("uhrseg_version", __version__)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    from napari_uhrseg.io.atomic import atomic_path

    path = Path(path)
    check_checkpoint_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # disk full, no permission: ExportError with what to do, nothing half-written
        torch.save({"meta": meta, "state_dict": state_dict}, tmp)
    return path


def check_checkpoint_output(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` now if a checkpoint could not be written at ``path`` (a folder there, or
    no permission in the nearest existing folder): training calls it before the first step, not after hours."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder: give the checkpoint a file name, e.g. {path / 'model.pt'}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, so {path} cannot be written: choose another folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"No permission to write in {folder}: choose a folder you can write to.")


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """Only the metadata, checked as ``load_checkpoint`` checks it, without building the weights.

    A torch file is a zip whose ``data.pkl`` holds the pickled ``{"meta", "state_dict"}``; a restricted
    unpickler reads it with every tensor replaced by ``None`` (nothing else than plain containers, the tensor
    rebuild functions and the storage types is accepted, and nothing is called but ``OrderedDict``), so a
    listing or a dock asking for a checkpoint's window does not rebuild hundreds of tensors on the GUI thread
    (21 ms instead of ~400 ms for the GRNet starter). Tensors inside the metadata (a resumable state's optimiser
    moments) come back as ``None``. Anything the fast path cannot read goes through the full safe load, whose
    errors are the ones ``load_checkpoint`` gives.
    """
    import copy

    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # missing: the load below says so
    if key is not None and key in _META_CACHE:
        return copy.deepcopy(_META_CACHE[key])
    meta = _fast_meta(path)
    if meta is None:
        return load_checkpoint(path)[1]
    _check_meta(path, meta)
    if key is not None:
        # The docks list the checkpoint folder whenever the method or checkpoint changes; reading a zip's
        # directory is ~12 ms a file, on the GUI thread. A file changed since (other time or size) is read again.
        if len(_META_CACHE) >= _META_CACHE_SIZE:
            _META_CACHE.pop(next(iter(_META_CACHE)))
        _META_CACHE[key] = copy.deepcopy(meta)
    return meta


_META_CACHE: dict[tuple, dict] = {}
_META_CACHE_SIZE = 256


def _fast_meta(path: Path) -> dict | None:
    import io
    import pickle
    import zipfile
    from collections import OrderedDict

    def placeholder(*_args, **_kwargs):
        return None

    class MetaUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch._utils" and name.startswith("_rebuild_"):
                return placeholder
            if module == "torch" and name.endswith("Storage"):
                return placeholder
            raise pickle.UnpicklingError(f"{module}.{name} is not read by the metadata reader")

        def persistent_load(self, pid):
            return None

    try:
        with zipfile.ZipFile(path) as archive:
            entry = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            blob = MetaUnpickler(io.BytesIO(archive.read(entry))).load()
    except Exception:  # not a zip, damaged, an unexpected pickle: the full load says what is wrong
        return None
    meta = blob.get("meta") if isinstance(blob, dict) and "state_dict" in blob else None
    return meta if isinstance(meta, dict) else None


def _check_meta(path: Path, meta: dict, method: str | None = None, class_names: list[str] | None = None) -> None:
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"Checkpoint {path} lacks metadata {missing}: it was not written by napari-uhrseg.")
    if int(meta["format"]) > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"Checkpoint {path} has format {meta['format']}, newer than this napari-uhrseg understands "
            f"({CHECKPOINT_FORMAT}): upgrade napari-uhrseg."
        )
    if method is not None and meta["method"].lower() != method.lower():
        raise CheckpointError(
            f"Checkpoint {path.name} was trained for method {meta['method']!r}, not {method!r}: "
            f"choose method {meta['method']!r} or another checkpoint."
        )
    if class_names is not None and list(meta["class_names"]) != list(class_names):
        raise CheckpointError(
            f"Checkpoint {path.name} predicts classes {list(meta['class_names'])}, "
            f"but {list(class_names)} were expected: choose a checkpoint trained on these classes."
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    method: str | None = None,
    class_names: list[str] | None = None,
    map_location: str = "cpu",
) -> tuple[dict, dict]:
    """Load ``(state_dict, meta)`` with ``weights_only=True`` and check the metadata first.

    Raises ``CheckpointError`` with a message saying what to do when the file is missing, damaged,
    not a uhrseg checkpoint, made by another method, or made for other classes.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: choose an existing .pt file.")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # damaged zip, pickle with code, truncated file
        raise CheckpointError(
            f"Checkpoint {path} could not be read ({type(exc).__name__}: {str(exc)[:200]}). "
            "It is damaged or not a weights-only checkpoint: re-export it or train a new one with `uhrseg train`."
        ) from None
    if not isinstance(blob, dict) or "meta" not in blob or "state_dict" not in blob:
        raise CheckpointError(
            f"{path} is not a napari-uhrseg checkpoint (no 'meta'/'state_dict'): "
            "train one with `uhrseg train` or choose another file."
        )
    meta = blob["meta"]
    _check_meta(path, meta, method, class_names)
    from napari_uhrseg.memory import tune_native_heap

    tune_native_heap()  # a loaded model means passes over large tensors follow: reuse their memory
    return blob["state_dict"], meta
