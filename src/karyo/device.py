"""The one place that picks a torch device (CPU unless asked)."""

from __future__ import annotations


def _available(kind: str) -> bool:
    import torch

    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return kind == "cpu"


def pick_device(device: str | None = "cpu"):
    """Resolve ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` (cuda → mps → cpu) to a torch.device."""
    import torch

    from karyo.errors import InputError

    name = (device or "cpu").lower()
    if name == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if _available(kind)))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(None, f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(None, f"device {device!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    if not _available(dev.type):
        raise InputError(None, f"device {device!r} requested but {dev.type.upper()} is not available here; "
                               f"use --device cpu")
    return dev
