"""Choose the compute device (CUDA, then MPS, then CPU) and a sensible number of torch threads."""
from __future__ import annotations

import os
from dataclasses import dataclass

_VALID = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class DeviceChoice:
    """The device a run uses and why; ``describe()`` is what docks and the CLI show."""

    device: str  # a torch device string: "cpu", "cuda", "cuda:1", "mps"
    name: str  # human-readable: "CPU (2 threads)", "CUDA: NVIDIA H100 (79 GiB)"
    threads: int  # torch intra-op threads (CPU work)
    reason: str  # "auto" or "requested"

    def describe(self) -> str:
        return f"{self.name} [{self.reason}]"

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)


def default_threads(leave_for_ui: int = 0) -> int:
    """Threads for torch's CPU work: the cores this process may use, less ``leave_for_ui``, at least 1.

    ``UHRSEG_THREADS`` overrides the choice.
    """
    env = os.environ.get("UHRSEG_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - leave_for_ui)


def select_device(requested: str | None = None, *, threads: int | None = None, leave_for_ui: int = 0) -> DeviceChoice:
    """Pick the device: ``requested`` ("cpu", "cuda", "cuda:N", "mps" or "auto"/None), else ``UHRSEG_DEVICE``,
    else CUDA, then MPS, then CPU. Sets torch's thread count as a side effect and returns the choice.

    A requested device that is not available is an error, not a silent fallback: the user asked for it.
    """
    import torch

    from napari_uhrseg.errors import DeviceError

    requested = (requested or os.environ.get("UHRSEG_DEVICE") or "auto").strip().lower()
    kind, _, index = requested.partition(":")
    if kind not in _VALID or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"Unknown device {requested!r}: use one of auto, cpu, cuda, cuda:N, mps.")
    n_threads = threads if threads is not None else default_threads(leave_for_ui)
    torch.set_num_threads(max(1, n_threads))

    if kind == "auto":
        if torch.cuda.is_available():
            requested, kind = "cuda", "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested, kind = "mps", "mps"
        else:
            requested, kind = "cpu", "cpu"
        reason = "auto"
    else:
        reason = "requested"

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but torch sees no CUDA GPU: choose device 'cpu' or 'auto'.")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"{requested} was requested but this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}: choose one of them.")
        dev = torch.device(requested)
        props = torch.cuda.get_device_properties(dev)
        name = f"CUDA: {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError("MPS was requested but is not available: choose device 'cpu' or 'auto'.")
        name = "Apple MPS"
    else:
        name = f"CPU ({torch.get_num_threads()} threads)"
    return DeviceChoice(device=requested, name=name, threads=torch.get_num_threads(), reason=reason)
