"""A plain U-Net semantic segmenter (Ronneberger et al., MICCAI 2015): the baseline MONCH must beat (issue 6).

Same input, output and loss as :class:`~karyo.models.monch.MONCH` — normalised B×3×H×W images → B×(N+1)×H×W
per-class logits trained with per-class BCE (MONCH eq. 9) — so the comparison isolates the architecture.
Layout: ``depth`` downsamplings; each level is two 3×3 conv + GroupNorm + ReLU layers with ``width·2^level``
channels (capped at ``max_width``); 2×2 max-pooling down, ×2 bilinear upsampling + 1×1 conv up, skip concatenation.
Differences from the 2015 paper: padded convolutions (output = input size), GroupNorm, bilinear upsampling.
``width`` is the knob for matching MONCH's parameter count (:func:`unet_width_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from karyo.data.augment import IMAGENET_MEAN, IMAGENET_STD
from karyo.models.base import register
from karyo.models.monch import SemanticModel

__all__ = ["UNet", "UNetConfig", "UNetModel", "unet_width_for"]


@dataclass
class UNetConfig:
    """Architecture and inference settings of a :class:`UNet` (inference fields as in ``MONCHConfig``)."""

    num_classes: int = 4
    class_names: dict[int, str] = field(default_factory=dict)
    width: int = 16
    depth: int = 4
    max_width: int = 512
    in_chans: int = 3
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    mpp: float = 0.25
    tile_size: int = 256
    tile_overlap: int = 32
    min_area: int = 10
    marker_min_distance: int = 4
    distance_smooth: float = 1.0

    def __post_init__(self) -> None:
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        self.class_names = {int(k): str(v) for k, v in self.class_names.items()}
        if self.width < 1 or self.depth < 1 or self.num_classes < 1:
            raise ValueError("width, depth and num_classes must be ≥ 1")

    @property
    def size_multiple(self) -> int:
        return 2 ** self.depth


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """U-Net: B×C×H×W (sides multiples of 2^depth) → B×(N+1)×H×W logits."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = config if config is not None else UNetConfig()
        self.config = cfg
        widths = [min(cfg.width * 2 ** i, cfg.max_width) for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList()
        c = cfg.in_chans
        for w in widths:
            self.down.append(_double_conv(c, w))
            c = w
        self.up_proj = nn.ModuleList()
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up_proj.append(nn.Conv2d(c, w, 1))
            self.up.append(_double_conv(2 * w, w))
            c = w
        self.out = nn.Conv2d(c, cfg.num_classes + 1, 1)
        nn.init.constant_(self.out.bias, -2.0)  # low foreground prior, as MONCH's head

    def forward(self, x: Tensor) -> Tensor:
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"U-Net input sides must be multiples of {m}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for proj, block in zip(self.up_proj, self.up, strict=True):
            x = proj(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
            x = block(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def unet_width_for(n_params: int, **config) -> int:
    """The ``width`` whose U-Net has the parameter count closest to ``n_params`` (with the other ``config``
    fields fixed): how the baseline gets MONCH's parameter budget."""
    best, best_gap = 1, None
    for width in range(1, 129):
        n = sum(p.numel() for p in UNet(UNetConfig(width=width, **config)).parameters())
        gap = abs(n - n_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
        if n > n_params:
            break
    return best


@register
class UNetModel(SemanticModel):
    """A trained U-Net as a karyo model (folder: ``config.json`` + ``unet.pt``), with MONCH's semantic and
    instance outputs."""

    arch = "unet"
    config_class = UNetConfig
    weights_file = "unet.pt"

    def __init__(self, config: UNetConfig | None = None, device: str = "cpu", net: UNet | None = None):
        super().__init__(config, device=device)
        self.net = (net if net is not None else UNet(self.config)).to(self.device).eval()
