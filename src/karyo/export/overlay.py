"""Overlay of nucleus outlines on the image, coloured by class (what a pathologist looks at first)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from skimage.segmentation import find_boundaries

from karyo.data.io import to_rgb
from karyo.errors import InputError
from karyo.export.colors import class_color


def draw_overlay(image: np.ndarray, instances: np.ndarray, classes: Mapping[int, int] | None = None,
                 class_names: Mapping[int, str] | None = None, *, thickness: int = 1,
                 highlight: Mapping[int, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Return an RGB uint8 copy of ``image`` with each instance's inner boundary drawn.

    Colour comes from the instance's class (unclassified: yellow); ``highlight`` overrides per instance.
    """
    rgb = to_rgb(image).copy()
    if rgb.shape[:2] != np.shape(instances)[:2]:
        raise InputError(None, f"the image ({rgb.shape[1]}×{rgb.shape[0]} px) is not the one segmented "
                               f"({np.shape(instances)[1]}×{np.shape(instances)[0]} px)")
    if instances.max(initial=0) == 0:
        return rgb
    boundary = find_boundaries(instances, mode="inner")
    if thickness > 1:
        from scipy.ndimage import binary_dilation

        boundary = binary_dilation(boundary, iterations=thickness - 1) & (instances > 0)
    n = int(instances.max())
    lut = np.empty((n + 1, 3), np.uint8)
    lut[:] = class_color(0)
    names = class_names or {}
    for label, cid in (classes or {}).items():
        if 0 < label <= n:
            lut[label] = class_color(int(cid), names.get(int(cid)))
    for label, color in (highlight or {}).items():
        if 0 < label <= n:
            lut[label] = color
    rgb[boundary] = lut[instances[boundary]]
    return rgb
