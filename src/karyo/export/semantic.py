"""Write a semantic segmentation (MONCH, U-Net: :class:`~karyo.models.monch.SemanticSegmentation`) to disk:

    OUT/semantic/<stem>.png            class map, 8-bit, pixel value = class id (0 = background)
    OUT/semantic_overlays/<stem>.png   the image with every class's pixels tinted in its colour, regions outlined
    OUT/semantic_areas/<stem>.csv      per-class area statistics (pixels, fractions, µm², regions, probability)
    OUT/classes.json                   {class id: name}

Colours are the ones instance overlays and GeoJSON use (:func:`karyo.export.colors.class_color`). Every file is
written atomically. ``karyo segment --task semantic`` calls :func:`save_semantic`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from skimage.segmentation import find_boundaries

from karyo.data.io import to_rgb, write_image, write_text
from karyo.errors import InputError
from karyo.export.colors import class_color
from karyo.export.writers import write_table_csv

if TYPE_CHECKING:
    from karyo.models.monch import SemanticSegmentation

__all__ = ["SEMANTIC_OUTPUTS", "class_palette", "save_semantic", "semantic_overlay"]

SEMANTIC_OUTPUTS = ("class_map", "overlay", "areas")


def class_palette(num_classes: int, class_names: Mapping[int, str] | None = None) -> np.ndarray:
    """(N+1)×3 uint8 colours, row = class id (row 0, background, black)."""
    names = class_names or {}
    lut = np.zeros((num_classes + 1, 3), np.uint8)
    for c in range(1, num_classes + 1):
        lut[c] = class_color(c, names.get(c))
    return lut


def semantic_overlay(image: np.ndarray, class_map: np.ndarray, class_names: Mapping[int, str] | None = None,
                     *, alpha: float = 0.4, num_classes: int | None = None) -> np.ndarray:
    """RGB uint8 copy of ``image``: class pixels blended with their class colour (``alpha``), the inner boundary of
    every class region drawn in full colour."""
    rgb = to_rgb(image).copy()
    cm = np.asarray(class_map)
    if cm.shape != rgb.shape[:2]:
        raise InputError(None, f"class map {cm.shape} and image {rgb.shape[:2]} differ in size")
    n = int(num_classes if num_classes is not None else cm.max(initial=0))
    if n == 0 or not (cm > 0).any():
        return rgb
    lut = class_palette(n, class_names)
    fg = cm > 0
    tint = lut[cm[fg]].astype(np.float32)
    rgb[fg] = np.clip((1 - alpha) * rgb[fg].astype(np.float32) + alpha * tint + 0.5, 0, 255).astype(np.uint8)
    edge = find_boundaries(cm, mode="inner") & fg
    rgb[edge] = lut[cm[edge]]
    return rgb


def save_semantic(result: SemanticSegmentation, out_dir: str | os.PathLike, image: np.ndarray | None = None, *,
                  stem: str | None = None, outputs: Iterable[str] = SEMANTIC_OUTPUTS) -> dict[str, Path]:
    """Write the class map, overlay (needs ``image``) and area table of one image; returns {kind: path}."""
    out = Path(out_dir)
    stem = stem or result.name or "image"
    outputs = set(outputs)
    unknown = outputs - set(SEMANTIC_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown semantic output kind(s) {sorted(unknown)}; choose from {SEMANTIC_OUTPUTS}")
    cm = np.asarray(result.class_map)
    if cm.max(initial=0) > 255 or cm.min(initial=0) < 0:
        raise InputError(None, f"class ids must lie in 0..255 for an 8-bit class map, got {cm.min()}..{cm.max()}")
    written: dict[str, Path] = {}
    if "class_map" in outputs:
        written["class_map"] = write_image(out / "semantic" / f"{stem}.png", cm.astype(np.uint8))
    if "overlay" in outputs and image is not None:
        overlay = semantic_overlay(image, cm, result.class_names, num_classes=result.num_classes)
        written["overlay"] = write_image(out / "semantic_overlays" / f"{stem}.png", overlay)
    if "areas" in outputs:
        written["areas"] = write_table_csv(out / "semantic_areas" / f"{stem}.csv", result.area_table())
    if result.class_names:
        names = {str(k): v for k, v in sorted(result.class_names.items())}
        written["class_names"] = write_text(out / "classes.json", json.dumps(names, indent=1) + "\n")
    return written
