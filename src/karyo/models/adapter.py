"""Channel adapter: any number of input channels (fluorescence, multiplex, H&E) → the 3 a backbone was built for.

Network (:class:`ChannelAdapter`), as the seed's §2.4 (Kontarou & Fredj-Zadoun 2025, "Computationally efficient
stain agnostic nuclei segmentation", after ChannelNet, Goldsborough et al. 2024): two 3×3 conv → BatchNorm → ReLU
blocks of width ``hidden`` and a 1×1 projection to ``out_channels`` (3), with a residual connection when the input
already has ``out_channels`` channels. A model with an adapter is the adapter followed by the *unchanged* 3-channel
backbone, so a pretrained backbone's state dict loads into it as is (:func:`load_backbone_state`) and models without
an adapter keep their state-dict keys. Deviation from the seed, stated once: with the residual connection the
projection starts at zero, so a fresh adapter is the identity and a pretrained RGB backbone behaves as before
training (the seed does not say how it initialised).

Channel invariance beyond the seed (the seed replicates channels up to a fixed 32). A model is trained with N
channels, optionally named (``AdapterConfig.channel_names``). An image with C channels is brought to those N by
:func:`plan_channels` (pure) + :func:`apply_channels`, before normalisation (:func:`karyo.infer.prepare.model_input`):

1. **By name** — when the adapter and the image both have channel names and at least one matches (case and
   surrounding blanks ignored): adapter channel k takes the image channel of the same name, in the adapter's order.
   Image channels the adapter does not know are **ignored, with a** :class:`ChannelWarning`. Adapter channels the
   image lacks are **missing** (also warned about).
2. **Unnamed** (either side has no names, or no name matches — warned): C == N is taken positionally; otherwise
   the C channels are **pooled** to N by adaptive average pooling over the channel axis, exactly
   ``torch.nn.AdaptiveAvgPool1d(N)``: adapter channel k is the mean of image channels ⌊kC/N⌋ … ⌈(k+1)C/N⌉ − 1.
   So 1 → 3 repeats the channel, 8 → 3 averages three overlapping blocks, 3 → 1 averages all three.
   Except: an image that names no channels, with fewer (C < N) than an adapter that names its own, gives them by
   position to the adapter's first C and leaves the others **missing** (warned): a DAPI-only PNG given to a
   DAPI,CD45 model is read as its DAPI, not pooled into CD45 as well.

A missing channel reaches the network as NaN (whole channel) and is replaced inside :meth:`ChannelAdapter.forward`
by ``AdapterConfig.missing``: ``"embedding"`` — a learned per-channel constant (zero-initialised, i.e. the
training mean of that channel, trained by ``channel_dropout``), ``"mean"`` — the per-pixel mean of the present
(normalised) channels, ``"zero"`` — 0 after normalisation (the channel's training mean). ``channel_dropout`` p
marks each channel of each training image missing with probability p (never all of them), so the network learns
to work without any one of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from karyo.errors import InputError

__all__ = [
    "MISSING_RULES",
    "AdapterConfig",
    "ChannelAdapter",
    "ChannelPlan",
    "ChannelWarning",
    "apply_channels",
    "duplicate_channels",
    "load_backbone_state",
    "map_channels",
    "plan_channels",
]

MISSING_RULES = ("embedding", "mean", "zero")


class ChannelWarning(UserWarning):
    """An image's channels were reordered with losses: extra channels ignored, expected ones missing, or pooled."""


@dataclass
class AdapterConfig:
    """The adapter's sizes, its input channels and the channel-invariance rule (see the module docstring).

    ``in_channels`` N and optional ``channel_names`` (N unique names); ``hidden`` width of the two 3×3 convs;
    ``out_channels`` (3) must equal the backbone's ``in_chans``. ``missing``: fill rule for channels an image lacks
    (``"embedding"``, ``"mean"`` or ``"zero"``); ``channel_dropout``: training probability of dropping a channel.
    ``pixel_mean``/``pixel_std``: per-input-channel normalisation of images scaled to [0, 1] (empty → 0.5 each);
    with an adapter these, not the backbone's, normalise the model input.
    """

    in_channels: int = 3
    channel_names: tuple[str, ...] = ()
    hidden: int = 16
    out_channels: int = 3
    missing: str = "embedding"
    channel_dropout: float = 0.0
    pixel_mean: tuple[float, ...] = ()
    pixel_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.channel_names = tuple(str(n) for n in (self.channel_names or ()))
        n = int(self.in_channels)
        self.pixel_mean = tuple(float(v) for v in (self.pixel_mean or (0.5,) * max(n, 0)))
        self.pixel_std = tuple(float(v) for v in (self.pixel_std or (0.5,) * max(n, 0)))
        problems = []
        if n < 1 or self.out_channels < 1 or self.hidden < 1:
            problems.append(f"in_channels, out_channels and hidden must be >= 1, got {n}, {self.out_channels}, "
                            f"{self.hidden}")
        if self.channel_names:
            keys = [channel_key(c) for c in self.channel_names]
            if len(keys) != n:
                problems.append(f"{len(keys)} channel_names for {n} in_channels")
            if len(set(keys)) != len(keys) or "" in keys:
                problems.append(f"channel_names must be unique and non-empty, got {self.channel_names}")
        if self.missing not in MISSING_RULES:
            problems.append(f"missing must be one of {MISSING_RULES}, got {self.missing!r}")
        if not 0.0 <= self.channel_dropout < 1.0:
            problems.append(f"channel_dropout must lie in [0, 1), got {self.channel_dropout}")
        if len(self.pixel_mean) != n or len(self.pixel_std) != n:
            problems.append(f"pixel_mean/pixel_std need {n} values, got {len(self.pixel_mean)}/{len(self.pixel_std)}")
        if any(s <= 0 for s in self.pixel_std):
            problems.append("pixel_std must be positive")
        if problems:
            raise InputError(None, "AdapterConfig: " + "; ".join(problems))

    @property
    def residual(self) -> bool:
        """The seed's rule: a residual connection exactly when input and output widths agree."""
        return self.in_channels == self.out_channels

    @classmethod
    def for_channels(cls, channels: int | Sequence[str], **kw: Any) -> AdapterConfig:
        """An adapter for N unnamed channels (an int) or for the named channels given."""
        if isinstance(channels, int):
            return cls(in_channels=channels, **kw)
        names = tuple(channels)
        return cls(in_channels=len(names), channel_names=names, **kw)


def channel_key(name: str) -> str:
    """How channel names are compared: ``" dapi"`` is ``"DAPI"``."""
    return str(name).strip().casefold()


class ChannelAdapter(nn.Module):
    """B×N×H×W normalised image (whole NaN channels = missing) → B×3×H×W for the backbone (module docstring)."""

    def __init__(self, config: AdapterConfig | None = None):
        super().__init__()
        cfg = config if config is not None else AdapterConfig()
        self.config = cfg
        n, h = cfg.in_channels, cfg.hidden
        self.body = nn.Sequential(nn.Conv2d(n, h, 3, padding=1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                                  nn.Conv2d(h, h, 3, padding=1, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True))
        self.proj = nn.Conv2d(h, cfg.out_channels, 1)
        if cfg.residual:  # identity at initialisation (a stated deviation: keeps a pretrained backbone's behaviour)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        if cfg.missing == "embedding":
            self.missing_embed = nn.Parameter(torch.zeros(n))

    def missing_mask(self, x: Tensor) -> Tensor:
        """B×N bool: channels holding NaN (marked missing by the input preparation), plus, in training, the
        channels dropped by ``channel_dropout`` (never every channel of an image)."""
        miss = torch.isnan(x).flatten(2).any(-1)
        p = self.config.channel_dropout
        if self.training and p > 0:
            drop = (torch.rand(miss.shape, device=x.device) < p) & ~miss
            all_gone = (miss | drop).all(1, keepdim=True)
            if bool(all_gone.any()):  # keep one random present channel of those images
                score = torch.rand(miss.shape, device=x.device).masked_fill(miss, -1.0)
                keep = torch.zeros_like(miss).scatter_(1, score.argmax(1, keepdim=True), True)
                drop = drop & ~(keep & all_gone)
            miss = miss | drop
        return miss

    def fill_missing(self, x: Tensor, missing: Tensor) -> Tensor:
        """Replace the missing channels (B×N mask) by the configured fill (module docstring)."""
        if not bool(missing.any()):
            return x
        m4 = missing[:, :, None, None]
        xz = x.masked_fill(m4, 0.0)
        rule = self.config.missing
        if rule == "zero":
            return xz
        if rule == "embedding":
            fill = self.missing_embed.to(x.dtype).view(1, -1, 1, 1).expand_as(x)
        else:  # mean of the present channels, per pixel
            present = (~missing).to(x.dtype)[:, :, None, None]
            fill = ((xz * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp_min(1.0)).expand_as(x)
        return torch.where(m4, fill, xz)

    def forward(self, x: Tensor) -> Tensor:
        n = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != n:
            raise InputError(None, f"the channel adapter expects B×{n}×H×W images, got {tuple(x.shape)}")
        x = self.fill_missing(x, self.missing_mask(x))
        y = self.proj(self.body(x))
        return x + y if self.config.residual else y


# --------------------------------------------------------------------------------------------- channel mapping


@dataclass(frozen=True)
class ChannelPlan:
    """How an image's C channels become the adapter's N: ``sources[k]`` are the image channels averaged into
    adapter channel k (empty = missing); ``mode`` is ``"identity"``, ``"named"`` or ``"pooled"``; ``ignored`` the
    image channels used nowhere."""

    mode: str
    sources: tuple[tuple[int, ...], ...]
    ignored: tuple[int, ...] = ()

    @property
    def present(self) -> np.ndarray:
        return np.array([len(s) > 0 for s in self.sources], bool)

    @property
    def missing(self) -> tuple[int, ...]:
        return tuple(k for k, s in enumerate(self.sources) if not s)


def _pooled_sources(c: int, n: int) -> tuple[tuple[int, ...], ...]:
    """``torch.nn.AdaptiveAvgPool1d(n)`` windows over c channels."""
    return tuple(tuple(range((k * c) // n, math.ceil((k + 1) * c / n))) for k in range(n))


def plan_channels(n_image: int, config: AdapterConfig, names: Sequence[str] | None = None,
                  source: str | None = None, warn: bool = True) -> ChannelPlan:
    """The channel mapping of an image with ``n_image`` channels (named ``names`` if known) onto ``config``'s.

    Rules in the module docstring; ``warn=False`` silences the :class:`ChannelWarning` s (the plan is the same).
    """
    n = config.in_channels
    where = f"{source}: " if source else ""
    if names is not None and len(names) != n_image:
        raise InputError(source, f"{len(names)} channel names for an image with {n_image} channels")

    def say(msg: str) -> None:
        if warn:
            warnings.warn(where + msg, ChannelWarning, stacklevel=3)

    if config.channel_names and names:
        index: dict[str, int] = {}
        for i, nm in enumerate(names):
            index.setdefault(channel_key(nm), i)
        hits = [index.get(channel_key(nm)) for nm in config.channel_names]
        if any(h is not None for h in hits):
            sources = tuple(() if h is None else (h,) for h in hits)
            used = {h for h in hits if h is not None}
            ignored = tuple(i for i in range(n_image) if i not in used)
            if ignored:
                say(f"channel(s) {[names[i] for i in ignored]} not used by the model (it knows "
                    f"{list(config.channel_names)}); ignored")
            lost = [config.channel_names[k] for k, h in enumerate(hits) if h is None]
            if lost:
                say(f"channel(s) {lost} missing from the image; filled by the adapter's '{config.missing}' rule")
            mode = "identity" if sources == tuple((k,) for k in range(n)) and n == n_image else "named"
            return ChannelPlan(mode, sources, ignored)
        say(f"no channel name of the image ({list(names)}) matches the model's ({list(config.channel_names)}): "
            f"its channels are read as the model's by position or pooled, which is probably not what they are; "
            f"name them as the model's (OME-TIFF channel names, or channel_names= in Python) to be sure")
    if n_image == n:
        if config.channel_names and not names:
            say(f"the image names no channels: they are taken by position as the model's "
                f"{list(config.channel_names)}; if that is not their order, reorder them (--channels with 0-based "
                f"indices) or name them (OME-TIFF channel names, or channel_names= in Python)")
        return ChannelPlan("identity", tuple((k,) for k in range(n)))
    if config.channel_names and not names and n_image < n:
        taken, lost = list(config.channel_names[:n_image]), list(config.channel_names[n_image:])
        which = "its one channel is" if n_image == 1 else f"its {n_image} channels are"
        say(f"the image names no channels: {which} taken by position as the model's {taken}; {lost} "
            f"missing, filled by the adapter's '{config.missing}' rule (name the image's channels, e.g. as an "
            f"OME-TIFF, if they are others)")
        return ChannelPlan("named", tuple((k,) if k < n_image else () for k in range(n)))
    plural = "s" if n_image != 1 else ""
    say(f"the image has {n_image} channel{plural}, the model {n}: channels pooled (adaptive average over the "
        "channel axis)")
    return ChannelPlan("pooled", _pooled_sources(n_image, n))


def apply_channels(image: np.ndarray, plan: ChannelPlan) -> np.ndarray:
    """H×W×C image → H×W×N in the same dtype (missing channels are 0; pooled integer channels are rounded)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be H×W×C, got {image.shape}")
    if plan.mode == "identity":
        return image
    out = np.zeros((*image.shape[:2], len(plan.sources)), image.dtype)
    for k, src in enumerate(plan.sources):
        if len(src) == 1:
            out[..., k] = image[..., src[0]]
        elif src:
            mean = image[..., list(src)].mean(axis=2, dtype=np.float64)
            out[..., k] = np.round(mean) if image.dtype.kind in "iu" else mean
    return out


def map_channels(image: np.ndarray, config: AdapterConfig, names: Sequence[str] | None = None,
                 source: str | None = None, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`plan_channels` + :func:`apply_channels`: (H×W×N image, N bool ``present``)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    plan = plan_channels(image.shape[2], config, names, source, warn)
    return apply_channels(image, plan), plan.present


def duplicate_channels(image: np.ndarray, n: int = 3) -> np.ndarray:
    """The naive baseline the adapter is compared with: repeat the channels cyclically (1 → 3: gray as RGB) or
    keep the first ``n`` (truncate)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[2]
    if c == n:
        return image
    return np.ascontiguousarray(image[..., [k % c for k in range(n)]] if c < n else image[..., :n])


def load_backbone_state(net: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Load a state dict of the same network *without* an adapter (e.g. a pretrained 3-channel CellViT) into
    ``net``, which has one; only ``adapter.*`` keys may be missing. Returns those missing keys."""
    result = net.load_state_dict(state, strict=False)
    other = [k for k in result.missing_keys if not k.startswith("adapter.")]
    if other or result.unexpected_keys:
        raise InputError(None, f"state dict does not fit the backbone: missing {other[:5]}, unexpected "
                               f"{list(result.unexpected_keys)[:5]}")
    return list(result.missing_keys)
