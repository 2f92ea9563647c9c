"""The one place that picks a torch device (CPU unless asked)."""

from __future__ import annotations


def pick_device(device: str | None = "cpu"):
    """Resolve ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` (cuda → mps → cpu) to a torch.device."""
    import torch

    name = (device or "cpu").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    from karyo.errors import InputError

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(None, f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
        raise InputError(None, f"device {device!r} requested but MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(None, f"device {device!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    return dev
