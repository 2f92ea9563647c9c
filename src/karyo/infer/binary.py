"""Instances from a foreground probability map alone: the stain-agnostic recipe's post-processing.

The seed (Kontarou & Fredj-Zadoun 2025, §2.5 and §2.7) thresholds the softmax foreground probability at 0.3 (to
keep faint nuclei), removes small objects and fills small holes (32 px) and labels connected components. Its
instance quality stayed low (PQ 0.04) because touching nuclei merge, so — as the issue asks — a distance-transform
watershed splits them before the labelling:

1. ``fg = prob >= threshold``;
2. connected components (8-connectivity) smaller than ``min_size`` px are removed, background components (holes,
   4-connectivity, not touching the border) smaller than ``hole_size`` px are filled — both with one labelling and
   one ``np.bincount`` each, no per-object loop;
3. markers: the h-maxima (``marker_h`` px) of the Euclidean distance transform of ``fg``, smoothed by a Gaussian of
   ``smooth`` px — a neck between two nuclei is a saddle at least ``marker_h`` below both centres, a ragged
   outline makes no new marker; ``watershed=False`` skips 3–4 (the seed's plain connected components);
4. marker watershed on the negated distance inside ``fg``; a component that got no marker (an object whose
   distance peak is below ``marker_h``) stays one instance;
5. instances are numbered 1..N (raster order of their first pixel is not guaranteed; ids are contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["BinaryConfig", "binary_instances", "fill_small_holes", "instance_scores", "remove_small_objects"]

_EIGHT = np.ones((3, 3), bool)


@dataclass
class BinaryConfig:
    """Settings of :func:`binary_instances` (defaults: the seed's 0.3 threshold and 32 px clean-up)."""

    threshold: float = 0.3
    min_size: int = 32
    hole_size: int = 32
    watershed: bool = True
    marker_h: float = 2.0
    smooth: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.min_size < 0 or self.hole_size < 0 or self.marker_h < 0 or self.smooth < 0:
            raise ValueError("min_size, hole_size, marker_h and smooth must be >= 0")


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_size`` pixels."""
    mask = np.asarray(mask, bool)
    if min_size <= 1 or not mask.any():
        return mask.copy()
    comp, _ = ndi.label(mask, structure=_EIGHT)
    area = np.bincount(comp.ravel())
    keep = area >= min_size
    keep[0] = False
    return keep[comp]


def fill_small_holes(mask: np.ndarray, hole_size: int) -> np.ndarray:
    """``mask`` with its holes (4-connected background components not touching the image border) of fewer than
    ``hole_size`` pixels filled."""
    mask = np.asarray(mask, bool)
    if hole_size <= 1 or mask.all() or not mask.any():
        return mask.copy()
    comp, n = ndi.label(~mask)
    area = np.bincount(comp.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]]))
    fill = area < hole_size
    fill[0] = False
    fill[border] = False
    return mask | fill[comp]


def _h_maxima_markers(dist: np.ndarray, fg: np.ndarray, h: float) -> np.ndarray:
    """Labelled regional maxima of ``dist`` with dynamic ≥ ``h`` (morphological reconstruction by dilation of
    ``dist - h`` under ``dist``; plateaus of the difference ≥ h are the h-maxima)."""
    from skimage.morphology import reconstruction

    if h <= 0:
        seed = dist - 1e-6
    else:
        seed = dist - h
    rec = reconstruction(np.maximum(seed, dist.min()), dist, method="dilation")
    peaks = (dist - rec) >= (h - 1e-6 if h > 0 else 1e-7)
    markers, _ = ndi.label(peaks & fg, structure=_EIGHT)
    return markers


def binary_instances(prob: np.ndarray, config: BinaryConfig | None = None) -> np.ndarray:
    """H×W foreground probability → H×W int32 instance map (0 = background, ids 1..N); see the module docstring."""
    from skimage.segmentation import relabel_sequential, watershed

    cfg = config if config is not None else BinaryConfig()
    prob = np.asarray(prob, np.float32)
    if prob.ndim != 2:
        raise ValueError(f"prob must be H×W, got {prob.shape}")
    fg = prob >= cfg.threshold
    fg = remove_small_objects(fg, cfg.min_size)
    fg = fill_small_holes(fg, cfg.hole_size)
    if not fg.any():
        return np.zeros(prob.shape, np.int32)
    comps, _ = ndi.label(fg, structure=_EIGHT)
    if not cfg.watershed:
        return comps.astype(np.int32)
    dist = ndi.distance_transform_edt(fg)
    if cfg.smooth > 0:
        dist = ndi.gaussian_filter(dist, cfg.smooth) * fg
    markers = _h_maxima_markers(dist, fg, cfg.marker_h)
    labels = watershed(-dist, markers, mask=fg, connectivity=2)
    rest = fg & (labels == 0)  # components without a marker keep their own id
    if rest.any():
        extra, _ = ndi.label(rest, structure=_EIGHT)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    return relabel_sequential(labels)[0].astype(np.int32)


def instance_scores(instances: np.ndarray, prob: np.ndarray) -> dict[int, float]:
    """Mean foreground probability of every instance (one ``np.bincount``)."""
    n = int(instances.max(initial=0))
    if n == 0:
        return {}
    sums = np.bincount(instances.ravel(), weights=np.asarray(prob, np.float64).ravel(), minlength=n + 1)
    area = np.bincount(instances.ravel(), minlength=n + 1)
    return {i: float(sums[i] / area[i]) for i in range(1, n + 1) if area[i] > 0}
