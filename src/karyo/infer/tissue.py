"""Tissue detection at low resolution, so that whole-slide inference skips empty glass.

Saturation (HSV S = (max − min) / max) separates stained tissue from glass, whatever the stain intensity. The
threshold is Otsu's on the slide's saturation, clipped to [``min_threshold``, ``max_threshold``]: on a slide that
is mostly tissue Otsu splits pale eosin from dark hematoxylin instead of glass from tissue, and the upper clip keeps
pale tissue in. Clean-up is morphological (closing, small objects removed, small holes filled), with sizes in µm so
that the result does not depend on the mask's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from karyo.data.slide import Slide


@dataclass(frozen=True)
class TissueOptions:
    """Settings of :func:`detect_tissue`; sizes in µm, so they hold at any mask resolution."""

    enabled: bool = True  # False: the whole slide counts as tissue
    mask_mpp: float = 8.0  # µm per mask pixel
    threshold: float | None = None  # fixed saturation threshold; None: Otsu clipped to the range below
    min_threshold: float = 0.04  # glass is below this saturation on any scanner seen so far
    max_threshold: float = 0.10  # pale tissue (stroma, fat borders) is above it
    min_dark: int = 25  # pixels darker than this (all channels) are scanner borders or ink, not tissue
    close_um: float = 16.0
    min_area_um2: float = 2000.0
    max_hole_um2: float = 10000.0
    margin_um: float = 8.0  # tiles are selected on the mask grown by this much (nuclei at the tissue edge)


@dataclass
class TissueMask:
    """A boolean mask on a grid of ``scale`` level-0 pixels per mask pixel (x, y)."""

    mask: np.ndarray
    scale: tuple[float, float]
    slide_mpp: float
    threshold: float
    margin_px: int = 1
    extent: tuple[int, int] | None = None  # level-0 (width, height); the last mask row/column may overhang it

    def _level0_px(self) -> tuple[float, float]:
        """(tissue, slide) in level-0 pixels. Each mask pixel counts the level-0 pixels it covers inside the
        slide: a 1000 px wide slide on a 32 px grid has a last column 8 px wide, not 32 (counting it whole
        overstates the area)."""
        h, w = self.mask.shape
        sx, sy = self.scale
        ew, eh = self.extent if self.extent is not None else (w * sx, h * sy)
        cols = np.clip(np.minimum((np.arange(w) + 1) * sx, ew) - np.arange(w) * sx, 0, None)
        rows = np.clip(np.minimum((np.arange(h) + 1) * sy, eh) - np.arange(h) * sy, 0, None)
        return float(rows @ self.mask.astype(np.float64) @ cols), float(cols.sum() * rows.sum())

    @property
    def area_mm2(self) -> float:
        return self._level0_px()[0] * self.slide_mpp ** 2 / 1e6

    @property
    def fraction(self) -> float:
        tissue, total = self._level0_px()
        return tissue / total if total > 0 else 0.0

    def selection(self) -> np.ndarray:
        """The mask grown by the margin: where a tile must look for nuclei."""
        if self.margin_px <= 0:
            return self.mask
        return ndi.binary_dilation(self.mask, morphology.disk(self.margin_px))

    def box_fractions(self, boxes: np.ndarray, selection: np.ndarray | None = None) -> np.ndarray:
        """Fraction of selected mask pixels in each level-0 box (N×4: x0, y0, x1, y1), by a summed-area table."""
        sel = self.selection() if selection is None else selection
        sat = np.zeros((sel.shape[0] + 1, sel.shape[1] + 1), np.int64)
        sat[1:, 1:] = np.cumsum(np.cumsum(sel, axis=0), axis=1)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        h, w = sel.shape
        x0 = np.clip(np.floor(boxes[:, 0] / self.scale[0]), 0, w).astype(np.int64)
        y0 = np.clip(np.floor(boxes[:, 1] / self.scale[1]), 0, h).astype(np.int64)
        x1 = np.clip(np.ceil(boxes[:, 2] / self.scale[0]), 0, w).astype(np.int64)
        y1 = np.clip(np.ceil(boxes[:, 3] / self.scale[1]), 0, h).astype(np.int64)
        count = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
        size = np.maximum((x1 - x0) * (y1 - y0), 1)
        return count / size


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an RGB uint8 image (0 for black)."""
    rgb = rgb.astype(np.float32)
    mx = rgb.max(axis=2)
    mn = rgb.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def detect_tissue(rgb: np.ndarray, mpp: float, options: TissueOptions | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of a low-resolution RGB image with ``mpp`` µm/px, and the saturation threshold used."""
    opts = options or TissueOptions()
    if not opts.enabled:
        return np.ones(rgb.shape[:2], bool), 0.0
    sat = saturation(rgb)
    dark = rgb.max(axis=2) < opts.min_dark
    if opts.threshold is not None:
        thr = float(opts.threshold)
    else:
        valid = sat[~dark]
        otsu = filters.threshold_otsu(valid) if valid.size and np.ptp(valid) > 1e-6 else opts.max_threshold
        thr = min(max(float(otsu), opts.min_threshold), opts.max_threshold)
    mask = (sat > thr) & ~dark
    px_area = mpp * mpp
    radius = round(opts.close_um / mpp)
    if radius >= 1:
        mask = ndi.binary_closing(mask, morphology.disk(radius), border_value=0) | mask
    min_px = round(opts.min_area_um2 / px_area)
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px - 1)
    hole_px = round(opts.max_hole_um2 / px_area)
    if hole_px > 0:
        mask = morphology.remove_small_holes(mask, max_size=hole_px)
    return mask, thr


def slide_tissue(slide: Slide, options: TissueOptions | None = None) -> tuple[TissueMask, np.ndarray]:
    """Detect tissue on a low-resolution read of ``slide``; returns the mask and the thumbnail it came from."""
    opts = options or TissueOptions()
    mpp = float(slide.mpp)
    thumb, scale = slide.read_downsampled(max(opts.mask_mpp / mpp, 1.0))
    mask_mpp = mpp * (scale[0] + scale[1]) / 2
    mask, thr = detect_tissue(thumb, mask_mpp, opts)
    margin = int(np.ceil(opts.margin_um / mask_mpp)) if opts.enabled else 0
    return TissueMask(mask, scale, mpp, thr, margin, extent=tuple(int(v) for v in slide.dimensions)), thumb
