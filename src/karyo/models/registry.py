"""Pretrained names → models, from ``registry.yaml`` (one audited place for what karyo ships)."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import yaml

from karyo.errors import InputError
from karyo.models.base import ARCHITECTURES, InstanceModel, load_model_dir


def _registry() -> dict:
    text = resources.files("karyo.models").joinpath("registry.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)["models"]


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_registry())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(name: str) -> dict:
    """The registry entry of ``name`` after following aliases."""
    registry = _registry()
    seen = []
    while name in registry and "alias" in registry[name]:
        seen.append(name)
        name = registry[name]["alias"]
        if name in seen:
            raise RuntimeError(f"alias loop in registry.yaml: {seen}")
    if name not in registry:
        raise InputError(None, f"unknown model {name!r}; available: {', '.join(available())} "
                               f"(or give a model folder)")
    return {"name": name, **registry[name]}


def model_folder(name_or_path: str | os.PathLike) -> Path:
    """A folder as given, or the installed folder of a shipped model's name (``"default"`` → its weights), for the
    places that read weights from a folder (``karyo train --init``, ``pack``/``query --segmentor``)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix or os.sep in str(name_or_path) or str(name_or_path).startswith("."):
        return path
    entry = resolve(str(name_or_path))
    if "folder" not in entry:
        raise InputError(None, f"model {entry['name']!r} has no weights (it is {entry.get('arch', 'built in')})")
    return _installed_folder(entry)


def _installed_folder(entry: dict) -> Path:
    return Path(str(resources.files("karyo.models").joinpath(entry["folder"])))


def load(name_or_path: str | os.PathLike = "default", device: str = "cpu") -> InstanceModel:
    """Load a shipped model by name (:func:`available`: ``"default"``, ``"promptnucseg_cpu"``, ``"cellvit_cpu"``,
    ``"classical"``) or any model folder (``karyo pack`` output, ``model.save``), on ``device`` (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"``). The model's ``segment(image)`` takes one H×W or H×W×C
    array (uint8, uint16, or float in [0, 1]) and returns a :class:`~karyo.infer.result.SegmentationResult`."""
    import karyo.models  # noqa: F401  (registers the architectures)

    if not isinstance(name_or_path, str | os.PathLike):
        raise InputError(None, f"load takes a shipped model's name (karyo.available()) or a model folder's path, "
                               f"got {type(name_or_path).__name__} {name_or_path!r}")
    if not str(name_or_path).strip():
        raise InputError(None, "no model given: a shipped name (karyo.available()) or a model folder")
    from karyo.device import pick_device

    pick_device(device)  # a mistyped or absent device is refused for every model, not only those that use one
    path = Path(name_or_path)
    if path.is_dir():
        return load_model_dir(path, device=device)
    if (path.suffix or len(path.parts) > 1) and not path.exists():  # looks like a path, not a name
        raise InputError(path, f"model folder not found (shipped models: {', '.join(available())})")
    if path.is_file():
        raise InputError(path, "a file, not a model: a model is a folder (config.json + weights; karyo pack makes "
                               "one from training runs)")
    entry = resolve(str(name_or_path))
    if "folder" in entry:
        folder = _installed_folder(entry)
        for file_name, expected in (entry.get("sha256") or {}).items():
            weights = folder / file_name
            if not weights.is_file():
                raise InputError(weights, "missing from the installed package; reinstall karyo")
            if _sha256(weights) != expected:
                raise InputError(weights, "checksum mismatch with registry.yaml; the shipped weights are damaged")
        return load_model_dir(folder, device=device)
    arch = entry["arch"]
    return ARCHITECTURES[arch]()
