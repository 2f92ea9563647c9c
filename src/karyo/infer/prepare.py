"""From a user's image to a model's input tensor and back: one place for channel checks, normalisation,
resampling to the model's pixel size and padding, shared by every learned model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from karyo.data.augment import prepare_image
from karyo.data.sample import as_hwc
from karyo.errors import InputError

#: Pixel sizes within this relative difference of the model's are not resampled (resampling blurs).
MPP_TOLERANCE = 0.05


def model_input(image: np.ndarray, in_chans: int, mean: Sequence[float], std: Sequence[float],
                source: str | None = None) -> torch.Tensor:
    """H×W×C image (uint8, uint16 or float in [0, 1]) → normalised 1×C×H×W float32 tensor.

    A grayscale image given to an RGB model is repeated over R, G and B; an RGBA one loses alpha; any other
    channel mismatch is an error naming the image.
    """
    image = as_hwc(image, source)
    if in_chans == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif in_chans == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] != in_chans:
        raise InputError(source, f"this model takes {in_chans}-channel images, got {image.shape[2]} channels")
    x = prepare_image(image, source)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def resample_to_model(x: torch.Tensor, mpp: float | None, model_mpp: float) -> tuple[torch.Tensor, float]:
    """Resample a 1×C×H×W input to the model's µm/px; returns it and the scale applied (1.0 when the pixel
    sizes agree within :data:`MPP_TOLERANCE` or ``mpp`` is unknown)."""
    if mpp is None or mpp <= 0:
        return x, 1.0
    scale = float(mpp) / float(model_mpp)
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        return x, 1.0
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1), scale


def pad_input(x: torch.Tensor, multiple: int = 32, min_size: int = 0) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple`` and at least ``min_size`` (reflection where it fits)."""
    h, w = x.shape[2:]
    ph, pw = max(h, min_size), max(w, min_size)
    ph, pw = ph + (-ph) % multiple, pw + (-pw) % multiple
    if (ph, pw) == (h, w):
        return x
    mode = "reflect" if (pw - w < w and ph - h < h) else "constant"
    return F.pad(x, (0, pw - w, 0, ph - h), mode=mode)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map back to the image's own size."""
    if labels.shape == tuple(shape):
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(labels.dtype)
