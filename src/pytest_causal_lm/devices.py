"""Device and dtype resolution, and the reason a device cannot be used here."""

from __future__ import annotations

from typing import Any

__all__ = ["resolve_device", "synchronize", "torch_dtype", "unavailable_reason", "worker_device"]


def synchronize(device: Any) -> None:
    """Wait for queued GPU work so a timer measures it (no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``; other names pass through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_device(device: str, worker: str | None, gpus: int) -> str:
    """Under pytest-xdist, worker ``gwK`` takes GPU ``K mod gpus`` for a bare ``cuda``: ``-n N`` on N GPUs checks
    N checkpoints at once. The test ids keep ``cuda`` (every worker must collect the same ids)."""
    if device != "cuda" or not worker or not worker.startswith("gw") or gpus < 2:
        return device
    return f"cuda:{int(worker.removeprefix('gw')) % gpus}"


def unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot run on this machine, or None when it can."""
    import torch

    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"device {device} unavailable: torch {torch.__version__} sees no CUDA GPU"
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return f"device {device} unavailable: only {torch.cuda.device_count()} CUDA device(s) visible"
        return None
    if device == "mps":
        if not torch.backends.mps.is_available():
            return "device mps unavailable: this torch build or machine has no Apple MPS backend"
        return None
    return f"device {device} is not supported (use auto, cpu, cuda, cuda:N or mps)"


def torch_dtype(name: str) -> Any:
    """The torch dtype for a dtype name, or the string ``"auto"`` (the checkpoint's own dtype)."""
    if name == "auto":
        return "auto"
    import torch

    return getattr(torch, name)
