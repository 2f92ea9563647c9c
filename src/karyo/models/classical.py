"""The classical baseline: hematoxylin (colour deconvolution) → threshold → distance-transform watershed.

No learning. It is the reference point every learned karyo model must beat, and a fallback that runs
anywhere. Parameters are in pixels at the config's ``mpp`` and rescaled to the image's pixel size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology, segmentation
from skimage.color import rgb2hed
from skimage.feature import peak_local_max

from karyo.data.io import to_uint8
from karyo.data.sample import as_hwc, grey_fluorescence, is_marker_image, nuclear_channel_index
from karyo.infer.postprocess import remove_small_instances
from karyo.infer.prepare import check_mpp, check_prompts, double_click_px
from karyo.infer.result import SegmentationResult, drop_negated, finish
from karyo.infer.tissue import saturation
from karyo.models.base import InstanceModel, register


@dataclass
class ClassicalConfig:
    """Tuned on CoNSeP *train* patches (see benchmarks/classical_baseline.py)."""

    mpp: float = 0.25  # pixel size the pixel parameters below refer to
    signal: str = "auto"  # "auto": hematoxylin for RGB, the single channel otherwise; "hematoxylin", "intensity"
    bright_nuclei: bool | None = None  # None: True for 1-channel (fluorescence), False for RGB (brightfield)
    # (with "auto", marker images give their nuclear channel and fluorescence saved as RGB one channel: see signal)
    smooth_sigma: float = 1.0
    threshold_scale: float = 1.1  # multiplies the Otsu threshold
    min_area: int = 30
    max_hole: int = 64
    opening_radius: int = 2
    marker_min_distance: int = 8
    marker_footprint: int = 0  # 0: square of side 2*min_distance+1
    distance_smooth: float = 1.0
    compactness: float = 0.0
    # Absolute foreground threshold on the smoothed signal. None: Otsu of each image × threshold_scale. Set by
    # for_slide, so that a slide processed tile by tile is thresholded as one image.
    threshold: float | None = None


CALIBRATION_MIN_SATURATION = 0.1  # stained H&E is above it; glass and white are far below (about 0.02)


@register
class ClassicalModel(InstanceModel):
    arch = "classical"
    config_class = ClassicalConfig

    def signal(self, image: np.ndarray, channel_names: Sequence[str] | None = None, source: str = "") -> np.ndarray:
        """The scalar image in which nuclei are bright: hematoxylin optical density for RGB (alpha dropped), the
        channel itself for one channel, the nuclear channel (DAPI, Hoechst ... by name, else channel 0) of a marker
        image, and the grey level of a fluorescence image saved as RGB (:func:`grey_fluorescence`)."""
        cfg = self.config
        image = as_hwc(image)
        kind = cfg.signal
        if kind == "auto":
            image = self._one_stain(image, channel_names, source)
            kind = "hematoxylin" if image.shape[2] == 3 else "intensity"
        if kind == "hematoxylin":
            if image.shape[2] != 3:
                raise ValueError(f"hematoxylin signal needs an RGB image, got {image.shape[2]} channels")
            sig = rgb2hed(to_uint8(image))[..., 0]
            bright = True if cfg.bright_nuclei is None else cfg.bright_nuclei
        else:
            sig = to_uint8(image).astype(np.float32).mean(axis=2) / 255.0
            bright = (image.shape[2] == 1) if cfg.bright_nuclei is None else cfg.bright_nuclei
        return sig if bright else -sig

    @staticmethod
    def _one_stain(image: np.ndarray, channel_names: Sequence[str] | None, source: str) -> np.ndarray:
        """RGB for H&E, else the one channel that shows nuclei; averaging marker channels (or reading fluorescence
        as H&E) would find the background instead."""
        n = image.shape[2]
        if is_marker_image(n, channel_names):
            k = nuclear_channel_index(channel_names, n, source=source, fallback_warning=(
                f"{source or 'image'}: {n} channels, none named as a nuclear stain (DAPI, Hoechst ...): channel 0 is "
                f"segmented as bright nuclei; pick another with --channels"))
            return image[..., [k]]
        if channel_names is None and grey_fluorescence(image):
            warnings.warn(f"{source or 'image'}: R, G and B are equal and the background is dark: segmented as one "
                          f"fluorescence channel (bright nuclei)", stacklevel=4)
            return image[..., :1]
        return image[..., :3] if n == 4 else image

    def segment(self, image: np.ndarray, *, points: Sequence[tuple[float, float]] | None = None,
                negative: Sequence[tuple[float, float]] | None = None, mpp: float | None = None,
                name: str = "", channel_names: Sequence[str] | None = None) -> SegmentationResult:
        cfg = self.config
        if np.asarray(image).dtype.kind == "f":  # as the learned models read floats: [0, 1], else refused
            from karyo.data.augment import prepare_image

            prepare_image(np.asarray(image), name or None)
        mpp = check_mpp(mpp, name or None)
        points, negative = check_prompts(points, negative, np.shape(image), name or None,
                                         double_click_px(mpp, cfg.mpp))
        scale = 1.0 if mpp is None else cfg.mpp / mpp  # > 1 when the image is more magnified
        sig = self._smoothed(image, scale, channel_names, name)
        if cfg.threshold is not None:
            fg = sig > cfg.threshold
        else:
            span = float(np.ptp(sig))
            if span < 1e-6:  # a flat (e.g. empty or white) image holds no nuclei
                return finish(SegmentationResult(np.zeros(sig.shape, np.int32), name=name, model=self.arch),
                              points, mpp)
            sig = (sig - sig.min()) / span
            fg = sig > filters.threshold_otsu(sig) * cfg.threshold_scale
        min_area = max(1, round(cfg.min_area * scale * scale))
        if cfg.opening_radius > 0:
            fg = ndi.binary_opening(fg, morphology.disk(max(1, round(cfg.opening_radius * scale))))
        fg = morphology.remove_small_holes(fg, max_size=max(0, round(cfg.max_hole * scale * scale) - 1))
        fg = morphology.remove_small_objects(fg, max_size=min_area - 1)
        dist = ndi.distance_transform_edt(fg)
        if cfg.distance_smooth > 0:
            dist = filters.gaussian(dist, cfg.distance_smooth * scale)
        if points is not None:
            none = np.zeros((0, 2))
            return finish(self._segment_at_points(fg, dist, points, negative if negative is not None else none,
                                                  min_area, name), points, mpp)
        md = max(1, round(cfg.marker_min_distance * scale))
        comps, _ = ndi.label(fg)
        fp = np.ones((2 * md + 1,) * 2, bool) if cfg.marker_footprint <= 0 else \
            morphology.disk(max(1, round(cfg.marker_footprint * scale)))
        peaks = peak_local_max(dist, min_distance=md, footprint=fp, labels=comps, exclude_border=False)
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        labels = segmentation.watershed(-dist, markers, mask=fg, compactness=cfg.compactness)
        # A component whose distance map has no peak (a thin plateau) still becomes one nucleus.
        rest, _ = ndi.label(fg & (labels == 0))
        labels = np.where(rest > 0, rest + labels.max(), labels)
        labels = remove_small_instances(labels, min_area)
        # negative points alone: every nucleus but those under them (as the learned models do)
        return finish(drop_negated(SegmentationResult(labels, name=name, model=self.arch), negative), None, mpp)

    def _smoothed(self, image: np.ndarray, scale: float, channel_names: Sequence[str] | None = None,
                  source: str = "") -> np.ndarray:
        sig = self.signal(image, channel_names, source)
        return filters.gaussian(sig, self.config.smooth_sigma * scale) if self.config.smooth_sigma > 0 else sig

    def for_slide(self, images: Sequence[np.ndarray], mpp: float | None = None) -> ClassicalModel:
        """A copy whose threshold is fixed from ``images`` (a sample of one slide's tiles, at ``mpp``). Whole-slide
        inference calls this, so that tiles do not each get their own threshold (which moves outlines and invents
        nuclei on pale tiles).

        The slide threshold is the median over the sampled tiles of each tile's Otsu threshold (× threshold_scale)
        on its stained pixels (RGB: HSV saturation > ``CALIBRATION_MIN_SATURATION``, as in tissue detection);
        tiles with under 1 % stained pixels are skipped. Why: sampled tissue tiles also hold glass and the white
        beyond the slide's edge, which would make Otsu split glass from tissue, and one tile with ink or pigment
        (optical density far above any nucleus) would dominate a pooled Otsu; the median ignores such tiles.
        Without any RGB tile with stain (fluorescence), every pixel of every tile counts."""
        cfg = self.config
        scale = 1.0 if mpp is None else cfg.mpp / mpp
        thresholds, pooled = [], []
        for im in images:
            sig = self._smoothed(im, scale)
            pooled.append(sig.ravel())
            im = as_hwc(im)
            if im.shape[2] != 3:
                continue
            stained = saturation(to_uint8(im)) > CALIBRATION_MIN_SATURATION
            if stained.mean() >= 0.01 and np.ptp(sig[stained]) > 1e-6:
                thresholds.append(float(filters.threshold_otsu(sig[stained])))
        if not thresholds:
            sig = np.concatenate(pooled) if pooled else np.zeros(0)
            if not sig.size or np.ptp(sig) < 1e-6:
                return self
            thresholds = [float(filters.threshold_otsu(sig))]
        return ClassicalModel(replace(cfg, threshold=float(np.median(thresholds)) * cfg.threshold_scale))

    def _segment_at_points(self, fg: np.ndarray, dist: np.ndarray, points, negative, min_area: int,
                           name: str) -> SegmentationResult:
        """Interactive mode: each positive (x, y) point seeds one nucleus, negative points claim the
        foreground they flood so it is not given to a nucleus; nothing else is segmented."""
        h, w = fg.shape
        markers = np.zeros(fg.shape, np.int32)
        pos = _pixel_points(points, h, w)
        neg = _pixel_points(negative, h, w)
        markers[pos[:, 1], pos[:, 0]] = np.arange(1, len(pos) + 1, dtype=np.int32)
        markers[neg[:, 1], neg[:, 0]] = len(pos) + 1
        # A point off the foreground still gets its own small region: grow the mask around it.
        mask = fg | ndi.binary_dilation(markers > 0, iterations=2)
        labels = segmentation.watershed(-dist, markers, mask=mask)
        labels[labels == len(pos) + 1] = 0
        return SegmentationResult(remove_small_instances(labels, min(min_area, 4)), name=name, model=self.arch)


def _pixel_points(points, h: int, w: int) -> np.ndarray:
    """Pixel (column, row) of each (x, y) point; :func:`check_points` has refused points off the image, so
    clipping only moves those within half a pixel of its edge onto it."""
    arr = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
    return np.clip(np.floor(arr), 0, [w - 1, h - 1]).astype(np.int64)
