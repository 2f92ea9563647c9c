"""One entry point for every dataset format karyo reads: :func:`open_dataset` (used by the CLI)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from karyo.data.coco import CocoDataset
from karyo.data.consep import ConsepFolder, consep_split_folders
from karyo.data.folder import ImageFolder
from karyo.data.geojson import GeoJsonFolder, geojson_pairs
from karyo.data.io import IMAGE_SUFFIXES
from karyo.data.layout import LayoutDataset
from karyo.data.monuseg import MoNuSegFolder
from karyo.data.pannuke import find_pannuke_folds, open_pannuke
from karyo.data.sample import SampleSequence
from karyo.errors import InputError

FORMATS = ("layout", "pannuke", "consep", "monuseg", "coco", "geojson", "folder")


def detect_format(path: str | os.PathLike) -> str:
    """Name the format of a dataset path (one of :data:`FORMATS`), checking the most specific layouts first."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"  # CocoDataset says precisely what is wrong with a json that is not COCO
        if suffix == ".geojson":
            raise InputError(path, "a GeoJSON needs its image: put <id>.geojson beside <id>.png and open the folder")
        if suffix == ".npy":
            return "pannuke"
        if suffix in IMAGE_SUFFIXES:
            return "folder"
        raise InputError(path, "cannot tell the dataset format of this file (expected a COCO .json, a PanNuke "
                               ".npy or an image)")
    if not path.is_dir():
        raise InputError(path, "dataset path not found")
    if (path / "images").is_dir() and ((path / "split.csv").is_file() or (path / "instances").is_dir()):
        return "layout"
    if consep_split_folders(path):
        return "consep"
    if find_pannuke_folds(path):
        return "pannuke"
    if any(path.glob("*.xml")) or any(path.glob("*/*.xml")):
        return "monuseg"
    if geojson_pairs(path):
        return "geojson"
    jsons = [p for p in path.glob("*.json") if _is_coco(p)]
    if len(jsons) == 1:
        return "coco"
    if (path / "images").is_dir():
        return "layout"  # images only, no labels
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
        return "folder"
    raise InputError(path, "cannot tell the dataset format: expected a karyo layout (images/, instances/, "
                           "split.csv), a PanNuke fold (images.npy, masks.npy), CoNSeP (Images/, Labels/), "
                           "MoNuSeg (.xml + images), a COCO .json, images with .geojson, or a folder of images")


def open_dataset(path: str | os.PathLike, format: str = "auto", split: str | None = None) -> SampleSequence:
    """Open a dataset of any supported format as a lazy sequence of :class:`~karyo.data.Sample`.

    ``split`` selects a split where the format has them: a split.csv name for the layout, ``train``/``test``
    for a CoNSeP release, a fold (``fold1`` or ``1``, comma-separated for several) for a PanNuke release.
    """
    path = Path(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; known: auto, {', '.join(FORMATS)}")
    if split is not None and fmt not in ("layout", "consep", "pannuke"):
        raise InputError(path, f"the {fmt} format has no splits; got split={split!r}")
    if fmt == "layout":
        return LayoutDataset(path, split=split)
    if fmt == "pannuke":
        return open_pannuke(path, _fold_numbers(split, path))
    if fmt == "consep":
        return ConsepFolder(path, split=split)
    if fmt == "monuseg":
        return MoNuSegFolder(path)
    if fmt == "geojson":
        return GeoJsonFolder(path)
    if fmt == "coco":
        if path.is_dir():
            path = next(p for p in sorted(path.glob("*.json")) if _is_coco(p))
        return CocoDataset(path)
    return ImageFolder(path)


def _fold_numbers(split: str | None, path: Path) -> list[int] | None:
    if split is None:
        return None
    numbers = []
    for part in split.split(","):
        m = re.fullmatch(r"\s*(?:fold\s*)?(\d+)\s*", part, re.IGNORECASE)
        if not m:
            raise InputError(path, f"PanNuke split must name folds ('fold1', '2', 'fold1,fold2'), got {split!r}")
        numbers.append(int(m.group(1)))
    return numbers


def _is_coco(path: Path) -> bool:
    """A json with top-level ``images`` and ``annotations`` (parsed here and again when opened: detection only)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "images" in data and "annotations" in data
