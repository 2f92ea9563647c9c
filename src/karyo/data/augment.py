"""Training augmentation: the PromptNucSeg pipeline (Table S1, inherited from CellViT) on albumentations 2.x.

The paper used albumentations 1.x. Each step below keeps the 1.x *behaviour* (the distribution of what is
sampled), not just the argument names. Mapping, 1.x → 2.x:

==================  =====  ==========================================  ==============================================
transform           p      1.x arguments (Table S1)                    2.x call here, and why
==================  =====  ==========================================  ==============================================
(pad)               1      (not in the paper)                          PadIfNeeded(crop, crop): inputs smaller than the
                                                                        crop are padded first, reflect (image and maps
                                                                        mirrored alike) or constant 0
RandomGridShuffle   0.5    grid=(4, 4)                                 unchanged
RandomCrop          1      height=256, width=256                       unchanged
RandomRotate90      0.5                                                unchanged
HorizontalFlip      0.5                                                unchanged
VerticalFlip        0.5                                                unchanged
Downscale           0.15   scale_min=0.5, scale_max=0.5                scale_range=(0.5, 0.5); interpolation_pair
                                                                        nearest/nearest (the 1.x default)
Blur                0.2    blur_limit=10                               blur_limit=(3, 9): 1.x drew the kernel from
                                                                        range(3, 10 + 1, 2) = {3, 5, 7, 9}; 2.x would
                                                                        round 10 up to 11 and add an 11 px kernel
GaussNoise          0.25   var_limit=50                                std_range=(0, sqrt(50) / 255): 2.x gives the
                                                                        std as a fraction of the dtype's maximum
                                                                        (255 for uint8, 1 for float), so the noise
                                                                        std is ≤ 7.07 grey levels as in 1.x. 1.x drew
                                                                        the *variance* uniformly in [0, 50], 2.x draws
                                                                        the std uniformly: mean std 3.5 instead of 4.7
                                                                        (same range; no 2.x argument gives sqrt(U)).
ColorJitter         0.2    brightness=0.25, contrast=0.25,             brightness=(0.75, 1.25), contrast=(0.75, 1.25),
                           saturation=0.1, hue=0.05                    saturation=(0.9, 1.1), hue=(-0.05, 0.05): the
                                                                        ranges 1.x derived from the scalars
Superpixels         0.1    p_replace=0.1, n_segments=200,              p_replace=(0.1, 0.1), n_segments=(200, 200),
                           max_size=128                                max_size=128: 1.x turned a scalar x into
                                                                        (x, x); 2.x would read the scalars as
                                                                        p_replace (0, 0.1) and n_segments (1, 200)
ZoomBlur            0.1    max_factor=1.05                             max_factor=(1.0, 1.05), step_factor=(0.01, 0.03)
(scale)             0      (not in the paper; karyo's p_scale)         CentreZoom(scale_range): shrink or enlarge,
                                                                        equally often; reflect at the border; off
                                                                        unless asked for
RandomSizedCrop     0.1    min_max_height=(128, 256), height=256,      min_max_height=(crop // 2, crop),
                           width=256                                   size=(crop, crop): height/width became size
ElasticTransform    0.2    sigma=25, alpha=0.5, alpha_affine=15        Sequential([ThreePointAffine(15),
                                                                        ElasticTransform(alpha=0.5, sigma=25,
                                                                        noise_distribution="uniform")], p=0.2), both
                                                                        with BORDER_REFLECT_101 (the 1.x default; 2.x
                                                                        defaults to constant 0). 2.x removed
                                                                        alpha_affine; :class:`ThreePointAffine` redoes
                                                                        that 1.x step (three points at ±min(H, W)//3
                                                                        around the centre each moved by U(-15, 15) px,
                                                                        affine fitted through them), which is where
                                                                        nearly all of this transform's effect comes
                                                                        from: with alpha=0.5, sigma=25 the elastic
                                                                        field itself stays below 0.05 px.
Normalize           1      ImageNet mean/std                           mean/std, max_pixel_value=255 for uint8 and 1
                                                                        for float input (uint16 is scaled to [0, 1])
==================  =====  ==========================================  ==============================================

Masks (the instance map) always use nearest interpolation, so ids are never blended. ColorJitter and
Superpixels need an RGB image: they run on 3-channel uint8 images only and are left out for other channel
counts and for uint16/float images. Blur, Downscale, GaussNoise and ZoomBlur work on any channel count.

Seeding. albumentations 2.0.8's ``Compose(seed=s)`` / ``set_random_seed(s)`` gives *every* transform its own
generator seeded with the same ``s``, so all probability draws coincide (with a seed, HorizontalFlip and
VerticalFlip at p=0.5 are applied together every time). :func:`seed_pipeline` instead hands one shared
generator pair to the whole pipeline, which keeps draws independent and still reproducible.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

# albumentations ≥ 2 checks PyPI for a newer release on import (2 s timeout when offline); a library should
# not phone home, so it is off unless the user has asked for it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
from skimage.measure import label as _label_regions

from karyo.data.sample import integer_by_value
from karyo.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}
_BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


@dataclass
class AugmentConfig:
    """Every knob of the training pipeline; the defaults are PromptNucSeg Table S1 for 256 px crops.

    A probability of 0 removes a step; ``geometric`` / ``pixel`` / ``colour`` switch whole groups off.
    Saved with a model (:meth:`to_dict` / :meth:`from_dict`) so evaluation normalises the same way.
    """

    crop_size: int = 256
    pad_mode: Literal["reflect", "constant"] = "reflect"
    # geometric (image and instance map together)
    geometric: bool = True
    p_grid_shuffle: float = 0.5
    grid: tuple[int, int] = (4, 4)
    p_rotate90: float = 0.5
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_sized_crop: float = 0.1
    # karyo addition, not in Table S1 (off by default): zoom in *and* out about the crop's centre, so that a
    # prompter meets nuclei larger and smaller than its training magnification gives (RandomSizedCrop only
    # zooms in, one crop in ten). Factors below and above 1 are equally likely.
    p_scale: float = 0.0
    scale_range: tuple[float, float] = (0.75, 1.33)
    sized_crop_min_max_height: tuple[int, int] | None = None  # None → (crop_size // 2, crop_size)
    p_elastic: float = 0.2
    elastic_alpha: float = 0.5
    elastic_sigma: float = 25.0
    elastic_alpha_affine: float = 15.0
    interpolation: Literal["nearest", "linear", "cubic"] = "linear"  # image resampling; maps are always nearest
    # pixel-level, any channel count
    pixel: bool = True
    p_downscale: float = 0.15
    downscale_scale: float = 0.5
    p_blur: float = 0.2
    blur_limit: int = 10
    p_gauss_noise: float = 0.25
    gauss_noise_var: float = 50.0  # in uint8 grey levels², as 1.x var_limit
    p_zoom_blur: float = 0.1
    zoom_blur_max_factor: float = 1.05
    # colour, 3-channel uint8 only
    colour: bool = True
    p_color_jitter: float = 0.2
    color_jitter: tuple[float, float, float, float] = (0.25, 0.25, 0.1, 0.05)  # brightness, contrast, sat., hue
    p_superpixels: float = 0.1
    # karyo addition, not in Table S1 (off by default): H&E stain jitter in optical-density space
    # (Tellez et al. 2018), for robustness to other labs' staining. See HedJitter.
    p_hed_jitter: float = 0.0
    hed_sigma: float = 0.05
    hed_bias: float = 0.01
    superpixels_p_replace: float = 0.1
    superpixels_n_segments: int = 200
    superpixels_max_size: int = 128
    # normalisation: mean/std apply when their length matches the channel count (or is 1); otherwise
    # fallback_mean/fallback_std are used for every channel (e.g. fluorescence with the ImageNet defaults), or, with
    # fit_stats, each channel's percentile range over the training images (karyo.train.channels.fit_channel_stats).
    normalize: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    fallback_mean: float = 0.5
    fallback_std: float = 0.5
    fit_stats: bool = False
    # instance clean-up after the geometric steps
    split_fragments: bool = True
    min_fragment_area: int = 4
    # None: a fresh random seed per sample; an int: sample (epoch, index) always gets the same augmentation
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # from JSON/YAML
                setattr(self, f.name, tuple(value))
        bad = [f.name for f in fields(self) if f.name.startswith("p_") and not 0.0 <= getattr(self, f.name) <= 1.0]
        if bad:
            raise ValueError(f"probabilities must lie in [0, 1]: {', '.join(bad)}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.pad_mode not in _BORDERS:
            raise ValueError(f"pad_mode must be one of {sorted(_BORDERS)}, got {self.pad_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"grid must be two positive integers, got {self.grid}")
        if self.blur_limit < 3:
            raise ValueError(f"blur_limit must be ≥ 3, got {self.blur_limit}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need the same non-zero length, got {self.mean} and {self.std}")
        if min(self.std) <= 0 or self.fallback_std <= 0:
            raise ValueError("std values must be positive")
        if self.min_fragment_area < 0:
            raise ValueError(f"min_fragment_area must be ≥ 0, got {self.min_fragment_area}")
        _checked_scale_range(self.scale_range)
        lo, hi = self.min_max_height
        if not 1 <= lo <= hi:
            raise ValueError(f"sized_crop_min_max_height must satisfy 1 ≤ min ≤ max, got {(lo, hi)}")

    @property
    def min_max_height(self) -> tuple[int, int]:
        return self.sized_crop_min_max_height or (self.crop_size // 2, self.crop_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(None, f"unknown AugmentConfig field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def channel_stats(self, n_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) used to normalise an image with ``n_channels`` channels."""
        if len(self.mean) == n_channels:
            return tuple(self.mean), tuple(self.std)
        if len(self.mean) == 1:
            return (self.mean[0],) * n_channels, (self.std[0],) * n_channels
        return (self.fallback_mean,) * n_channels, (self.fallback_std,) * n_channels


class HedJitter(A.ImageOnlyTransform):
    """H&E stain augmentation (Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3
    as a reference", IEEE TMI 2018): each stain's optical density is scaled by U(1-σ, 1+σ) and shifted by
    U(-b, b) after colour deconvolution (Ruifrok & Johnston HED), then recomposed. Only for RGB uint8."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.01, p: float = 0.5):
        super().__init__(p=p)
        self.sigma = float(sigma)
        self.bias = float(bias)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        rng = self.random_generator
        return {"alpha": rng.uniform(1 - self.sigma, 1 + self.sigma, size=3),
                "beta": rng.uniform(-self.bias, self.bias, size=3)}

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        from skimage.color import hed_from_rgb, rgb_from_hed

        # Exactly invertible OD transform (no clamping of negative stain amounts, unlike rgb2hed/hed2rgb),
        # so alpha = 1, beta = 0 returns the input up to rounding.
        od = -np.log((img.astype(np.float64) + 1.0) / 256.0)
        stains = od @ hed_from_rgb * alpha + beta
        out = 256.0 * np.exp(-(stains @ rgb_from_hed)) - 1.0
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


class _Remap(A.DualTransform):
    """An affine warp of image and masks through one explicit float coordinate map: cv2.warpAffine rounds
    nearest-neighbour lookups differently per dtype (~1 px in 100 disagreed between a uint8 image and an int32
    map), so labels would drift off their pixels. Subclasses give the inverse map (output → input pixels)."""

    def __init__(self, interpolation: int = cv2.INTER_LINEAR, border_mode: int = cv2.BORDER_REFLECT_101,
                 p: float = 0.5):
        super().__init__(p=p)
        self.interpolation = interpolation
        self.border_mode = border_mode

    def inverse_affine(self, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        inverse = self.inverse_affine(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        map_x = (inverse[0, 0] * xx + inverse[0, 1] * yy + inverse[0, 2]).astype(np.float32)
        map_y = (inverse[1, 0] * xx + inverse[1, 1] * yy + inverse[1, 2]).astype(np.float32)
        return {"map_x": map_x, "map_y": map_y}

    def _remap(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, flags: int) -> np.ndarray:
        def one(a: np.ndarray) -> np.ndarray:
            return cv2.remap(np.ascontiguousarray(a), map_x, map_y, interpolation=flags,
                             borderMode=self.border_mode, borderValue=0)

        if img.ndim == 2:
            return one(img)
        # OpenCV is only guaranteed up to 4 channels per call; multiplex images go in chunks.
        parts = [one(img[..., i:i + 4]) for i in range(0, img.shape[2], 4)]
        return np.concatenate([p[..., None] if p.ndim == 2 else p for p in parts], axis=2)

    def apply(self, img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any) -> np.ndarray:
        return self._remap(img, map_x, map_y, self.interpolation)

    def apply_to_mask(self, mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, **params: Any) -> np.ndarray:
        return self._remap(mask, map_x, map_y, cv2.INTER_NEAREST)


class ThreePointAffine(_Remap):
    """The random affine that albumentations 1.x ElasticTransform applied before its elastic field
    (``alpha_affine``), dropped in 2.x.

    Three points (centre ± s, s = min(H, W) // 3, as (c+s, c+s), (c+s, c-s), (c-s, c-s)) are each moved by
    U(-alpha_affine, alpha_affine) px in x and y; the affine map through the three pairs warps image and
    masks (masks with nearest interpolation).
    """

    def __init__(self, alpha_affine: float = 15.0, interpolation: int = cv2.INTER_LINEAR,
                 border_mode: int = cv2.BORDER_REFLECT_101, p: float = 0.5):
        super().__init__(interpolation=interpolation, border_mode=border_mode, p=p)
        if alpha_affine < 0:
            raise ValueError(f"alpha_affine must be ≥ 0, got {alpha_affine}")
        self.alpha_affine = float(alpha_affine)

    def inverse_affine(self, h: int, w: int) -> np.ndarray:
        cx, cy, s = w / 2.0, h / 2.0, float(min(h, w) // 3)
        src = np.array([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=np.float32)
        shift = self.random_generator.uniform(-self.alpha_affine, self.alpha_affine, size=(3, 2))
        dst = (src + shift).astype(np.float32)
        return cv2.invertAffineTransform(cv2.getAffineTransform(src, dst))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("alpha_affine", "interpolation", "border_mode")


def _checked_scale_range(scale_range: tuple[float, float]) -> tuple[float, float]:
    if len(scale_range) != 2 or not 0 < scale_range[0] <= 1 <= scale_range[1]:
        raise ValueError(f"scale_range must be (low ≤ 1, high ≥ 1) with low > 0, got {scale_range}")
    return float(scale_range[0]), float(scale_range[1])


class CentreZoom(_Remap):
    """Zoom about the image centre by a factor drawn from U(low, 1) or U(1, high), each half of the time, so that
    shrinking and enlarging are equally likely whatever the range (karyo's ``p_scale``, not in Table S1)."""

    def __init__(self, scale_range: tuple[float, float] = (0.75, 1.33), interpolation: int = cv2.INTER_LINEAR,
                 border_mode: int = cv2.BORDER_REFLECT_101, p: float = 0.5):
        super().__init__(interpolation=interpolation, border_mode=border_mode, p=p)
        self.scale_range = _checked_scale_range(scale_range)

    def inverse_affine(self, h: int, w: int) -> np.ndarray:
        low, high = self.scale_range
        factor = self.random_generator.uniform(low, 1.0) if self.random_generator.random() < 0.5 else \
            self.random_generator.uniform(1.0, high)
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        return np.array([[1 / factor, 0.0, cx - cx / factor], [0.0, 1 / factor, cy - cy / factor]])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale_range", "interpolation", "border_mode")


def _is_rgb_uint8(n_channels: int, dtype: np.dtype) -> bool:
    return n_channels == 3 and np.dtype(dtype) == np.uint8


def _normalize_step(cfg: AugmentConfig, n_channels: int, dtype: np.dtype) -> A.Normalize:
    mean, std = cfg.channel_stats(n_channels)
    max_value = 255.0 if np.dtype(dtype) == np.uint8 else 1.0
    return A.Normalize(mean=mean, std=std, max_pixel_value=max_value, p=1.0)


def build_augmentation(cfg: AugmentConfig, n_channels: int, dtype: np.dtype | type = np.uint8) -> A.Compose:
    """The Table S1 pipeline for images with ``n_channels`` channels, in the paper's order.

    ``dtype`` is the dtype the pipeline will receive: uint8, or float32 in [0, 1] (see :func:`prepare_image`;
    uint16 images are converted to that first). Call it as ``pipe(image=img, mask=instances)``; seed it with
    :func:`seed_pipeline`.
    """
    if n_channels < 1:
        raise ValueError(f"n_channels must be ≥ 1, got {n_channels}")
    dtype = np.dtype(dtype)
    if dtype not in (np.uint8, np.float32):
        raise ValueError(f"the pipeline takes uint8 or float32 images (see prepare_image), got {dtype}")
    crop = cfg.crop_size
    interp = _INTERPOLATIONS[cfg.interpolation]
    geo, pix, col = cfg.geometric, cfg.pixel, cfg.colour and _is_rgb_uint8(n_channels, dtype)
    steps: list[Any] = [
        A.PadIfNeeded(min_height=crop, min_width=crop, border_mode=_BORDERS[cfg.pad_mode], fill=0, fill_mask=0,
                      p=1.0),
    ]
    if geo and cfg.p_grid_shuffle > 0:
        steps.append(A.RandomGridShuffle(grid=tuple(cfg.grid), p=cfg.p_grid_shuffle))
    steps.append(A.RandomCrop(height=crop, width=crop, p=1.0))
    if geo:
        steps += [A.RandomRotate90(p=cfg.p_rotate90), A.HorizontalFlip(p=cfg.p_hflip),
                  A.VerticalFlip(p=cfg.p_vflip)]
    if pix:
        blur_hi = cfg.blur_limit if cfg.blur_limit % 2 else cfg.blur_limit - 1
        steps += [
            A.Downscale(scale_range=(cfg.downscale_scale, cfg.downscale_scale),
                        interpolation_pair={"downscale": cv2.INTER_NEAREST, "upscale": cv2.INTER_NEAREST},
                        p=cfg.p_downscale),
            A.Blur(blur_limit=(3, blur_hi), p=cfg.p_blur),
            A.GaussNoise(std_range=(0.0, math.sqrt(cfg.gauss_noise_var) / 255.0), mean_range=(0.0, 0.0),
                         per_channel=True, p=cfg.p_gauss_noise),
        ]
    if col:
        b, c, s, h = cfg.color_jitter
        steps += [
            A.ColorJitter(brightness=(1 - b, 1 + b), contrast=(1 - c, 1 + c), saturation=(1 - s, 1 + s),
                          hue=(-h, h), p=cfg.p_color_jitter),
            A.Superpixels(p_replace=(cfg.superpixels_p_replace, cfg.superpixels_p_replace),
                          n_segments=(cfg.superpixels_n_segments, cfg.superpixels_n_segments),
                          max_size=cfg.superpixels_max_size, interpolation=cv2.INTER_LINEAR, p=cfg.p_superpixels),
        ]
        if cfg.p_hed_jitter > 0:
            steps.append(HedJitter(sigma=cfg.hed_sigma, bias=cfg.hed_bias, p=cfg.p_hed_jitter))
    if pix:
        steps.append(A.ZoomBlur(max_factor=(1.0, cfg.zoom_blur_max_factor), step_factor=(0.01, 0.03),
                                p=cfg.p_zoom_blur))
    if geo and cfg.p_scale > 0:
        steps.append(CentreZoom(scale_range=tuple(cfg.scale_range), interpolation=interp,
                                border_mode=cv2.BORDER_REFLECT_101, p=cfg.p_scale))
    if geo:
        steps.append(A.RandomSizedCrop(min_max_height=cfg.min_max_height, size=(crop, crop), w2h_ratio=1.0,
                                       interpolation=interp, mask_interpolation=cv2.INTER_NEAREST,
                                       p=cfg.p_sized_crop))
        steps.append(A.Sequential([
            ThreePointAffine(alpha_affine=cfg.elastic_alpha_affine, interpolation=interp,
                             border_mode=cv2.BORDER_REFLECT_101, p=1.0),
            A.ElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma, interpolation=interp,
                               mask_interpolation=cv2.INTER_NEAREST, approximate=False,
                               noise_distribution="uniform", border_mode=cv2.BORDER_REFLECT_101, p=1.0),
        ], p=cfg.p_elastic))
    if cfg.normalize:
        steps.append(_normalize_step(cfg, n_channels, dtype))
    return A.Compose(steps, p=1.0)


def build_eval_transform(cfg: AugmentConfig, n_channels: int, dtype: np.dtype | type = np.uint8) -> A.Compose:
    """Evaluation counterpart of :func:`build_augmentation`: normalisation only, identical to training's."""
    dtype = np.dtype(dtype)
    return A.Compose([_normalize_step(cfg, n_channels, dtype)] if cfg.normalize else [], p=1.0)


def seed_pipeline(pipeline: A.BaseCompose, seed: int) -> None:
    """Make the next call of ``pipeline`` reproducible, with independent draws across its transforms."""
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one (epoch, index) pair, independent of worker count and order."""
    state = np.random.SeedSequence([int(base_seed), int(epoch), int(index)]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def prepare_image(image: np.ndarray, source: str | None = None) -> np.ndarray:
    """uint8 stays uint8 (0..255); every other dtype becomes float32 in [0, 1].

    uint16 is divided by 65535, so uint16 value ``257 * v`` normalises exactly like uint8 value ``v``. Other
    integer dtypes are first read as 8- or 16-bit by their values (:func:`karyo.data.sample.integer_by_value`).
    Float images must already be in [0, 1] (raw intensities would be normalised wrongly, so they are refused).
    Bool becomes 0/255 uint8.
    """
    image = np.asarray(image)
    if image.dtype.kind in "ui" and image.dtype not in (np.uint8, np.uint16):
        image = integer_by_value(image, source)
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool:  # a mask passed as the image, most likely: said, then read as black and white
        warnings.warn(f"{source or 'image'}: a boolean array (a mask?) is read as a black-and-white picture",
                      stacklevel=2)
        return image.astype(np.uint8) * np.uint8(255)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if image.dtype.kind == "f":
        out = image.astype(np.float32, copy=False)
        if not np.isfinite(out).all():
            raise InputError(source, "image holds NaN or infinite values")
        lo, hi = (float(out.min()), float(out.max())) if out.size else (0.0, 0.0)
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(source, f"float images must hold values in [0, 1], got {lo:.6g}..{hi:.6g}; "
                                     f"rescale it (or store it as uint8/uint16)")
        return out
    raise InputError(source, f"unsupported image dtype {image.dtype}")


def split_fragments(instances: np.ndarray, classes: Mapping[int, int] | None = None, min_area: int = 4,
                    connectivity: int = 2) -> tuple[np.ndarray, dict[int, int]]:
    """Give each disconnected piece of an instance its own id and drop pieces smaller than ``min_area``.

    The largest piece (first in raster order on ties) keeps the id; the others get new ids above the map's
    current maximum, in (old id, size descending) order, with the same class. Connected pieces are found in
    one pass over the whole map (pixels are connected when neighbours (8-connectivity by default) share an
    id), so touching nuclei are never merged. Returns (int32 map, {id: class} for the ids present).
    """
    instances = np.asarray(instances)
    comp, n = _label_regions(instances, background=0, connectivity=connectivity, return_num=True)
    flat_c = comp.ravel()
    area = np.bincount(flat_c, minlength=n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[flat_c] = instances.ravel()  # every pixel of a piece carries the same id
    pieces = np.flatnonzero(area >= max(int(min_area), 1))
    pieces = pieces[pieces > 0]
    order = np.lexsort((pieces, -area[pieces], owner[pieces]))
    pieces = pieces[order]
    kept_owner = owner[pieces]
    first = np.ones(len(pieces), dtype=bool)
    first[1:] = kept_owner[1:] != kept_owner[:-1]
    lut = np.zeros(n + 1, dtype=np.int64)
    lut[pieces[first]] = kept_owner[first]
    start = int(instances.max()) + 1 if instances.size else 1
    new_ids = np.arange(start, start + int((~first).sum()), dtype=np.int64)
    lut[pieces[~first]] = new_ids
    if lut.max(initial=0) > np.iinfo(np.int32).max:
        raise ValueError("splitting fragments would exceed the int32 id range")
    out = lut[comp].astype(np.int32)
    out_classes: dict[int, int] = {}
    if classes:
        for new, old in zip(lut[pieces].tolist(), kept_owner.tolist(), strict=True):
            if old in classes:
                out_classes[new] = int(classes[old])
    return out, out_classes


class Augmenter:
    """Applies the pipeline to (image, instances, classes) triples; one pipeline per channel count/dtype.

    Call with an explicit ``seed`` for reproducible output; fragment splitting follows ``cfg``.
    """

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()
        self._pipelines: dict[tuple[int, str], A.Compose] = {}

    def pipeline(self, n_channels: int, dtype: np.dtype | type) -> A.Compose:
        key = (int(n_channels), np.dtype(dtype).str)
        if key not in self._pipelines:
            self._pipelines[key] = build_augmentation(self.cfg, n_channels, dtype)
        return self._pipelines[key]

    def __call__(self, image: np.ndarray, instances: np.ndarray, classes: Mapping[int, int] | None = None, *,
                 seed: int | None = None, source: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        """Return (augmented H×W×C image — normalised float32 if ``cfg.normalize`` —, int32 map, classes)."""
        image = prepare_image(image, source)
        if image.ndim == 2:
            image = image[..., None]
        pipe = self.pipeline(image.shape[2], image.dtype)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        seed_pipeline(pipe, seed)
        out = pipe(image=image, mask=np.asarray(instances, dtype=np.int32))
        img, inst = out["image"], out["mask"]
        if img.ndim == 2:
            img = img[..., None]
        if self.cfg.split_fragments:
            inst, cls = split_fragments(inst, classes, self.cfg.min_fragment_area)
        else:
            present = set(np.unique(inst).tolist()) - {0}
            cls = {int(k): int(v) for k, v in (classes or {}).items() if int(k) in present}
        return img, inst.astype(np.int32, copy=False), cls


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "Augmenter",
    "ThreePointAffine",
    "build_augmentation",
    "build_eval_transform",
    "prepare_image",
    "sample_seed",
    "seed_pipeline",
    "split_fragments",
]
