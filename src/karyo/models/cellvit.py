"""CellViT-style nucleus segmentation and classification (Hörst et al. 2024, "CellViT: Vision Transformers for precise
cell segmentation and classification", Medical Image Analysis 94) with HoVer-Net's three outputs and
post-processing (Graham et al. 2019, "HoVer-Net", Medical Image Analysis 58).

Network (:class:`CellViT`): an encoder, a U-Net decoder and three branches predicting at full resolution

* NP — nucleus / background logits (2 channels),
* HV — horizontal and vertical distances of every nucleus pixel to its nucleus's centre of mass, each scaled to
  [-1, 1] within the nucleus (2 channels, regressed without activation as in HoVer-Net),
* NT — nucleus type logits (``num_classes`` + 1 channels; index 0 = background),
* optionally a tissue-type head on the pooled deepest encoder features (CellViT's tissue classifier).

Encoders: ``"vit"`` — karyo's one :class:`~karyo.models.vit.ViT` (SAM / timm / CLIP weights via
:func:`~karyo.models.vit.load_vit_weights`), as CellViT: four intermediate block outputs z1..z4 (``out_indices``)
at stride 16, z1..z3 brought to strides 2/4/8 by stacks of (transposed conv + conv) blocks, z4 the bottleneck.
``"convnext"`` — a :class:`~karyo.models.convnext.ConvNeXt` preset (the small convolutional variant for CPU use);
its four stages (strides 4–32) are the skips. Both add a convolutional stem on the image (full resolution, and
stride 2 for ConvNeXt) feeding the last decoder stages, as CellViT's ``decoder0``. Each decoder stage upsamples
×2 (transposed conv), concatenates the skip and applies ``decoder_convs`` conv–BN–ReLU blocks.

Deviations from CellViT, stated once: ``shared_stages`` lets the three branches share the first decoder stages
(CellViT: 0, three full decoders; the CPU preset shares all but the last to stay fast); the tissue head pools
the bottleneck (or reads the ViT class token when there is one) instead of always the class token; the decoder
widths are free (``decoder_dims``).

Losses (:func:`cellvit_loss`): NP = CE + Dice (+ focal, weight 0 by default), HV = MSE + MSGE (mean squared
error of the HV maps' gradients inside nuclei, with HoVer-Net's 5×5 kernel x/(x²+y²)), NT = CE + Dice over the
classes (nuclei of unknown class ignored), tissue = CE; the weights live in the config (defaults HoVer-Net's:
NP 1 + 1, HV 1 + 2, NT 1 + 1; CellViT's focal-Tversky terms are not implemented). Post-processing:
:mod:`karyo.infer.hovernet`, whose default energy deviates from HoVer-Net's min–max normalisation (see there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from karyo.config import check_fields
from karyo.data.augment import IMAGENET_MEAN, IMAGENET_STD
from karyo.data.sample import keep_instances
from karyo.device import pick_device
from karyo.errors import InputError
from karyo.infer.binary import BinaryConfig, binary_instances, instance_scores
from karyo.infer.hovernet import ENERGIES, hovernet_postprocess
from karyo.infer.prepare import (
    check_mpp,
    check_prompts,
    double_click_px,
    model_input,
    resample_to_model,
    resize_instances,
)
from karyo.infer.result import SegmentationResult, finish
from karyo.infer.tiling import tile_starts
from karyo.metrics.detection import labels_at
from karyo.models.adapter import AdapterConfig, ChannelAdapter
from karyo.models.base import InstanceModel, register
from karyo.models.convnext import (
    CONVNEXT_PRESETS,
    ConvNeXt,
    ConvNeXtConfig,
    WeightLoadReport,
    load_convnext_weights,
)
from karyo.models.vit import LoadReport, ViT, ViTConfig, load_vit_weights, read_state_dict

__all__ = [
    "CELLVIT_PRESETS",
    "CellViT",
    "CellViTConfig",
    "CellViTModel",
    "cellvit_loss",
    "cellvit_targets",
    "hv_maps",
    "msge_loss",
    "postprocess_params",
    "sobel_hv",
]

WEIGHTS_FILE = "cellvit.pt"


# --------------------------------------------------------------------------------------------------------- config


@dataclass
class CellViTConfig:
    """Everything that rebuilds a :class:`CellViT` and runs it (``karyo.config.from_dict`` round-trips it).

    Encoder: ``encoder`` ``"convnext"`` (``convnext`` names a preset: atto … base) or ``"vit"`` (``vit`` is the
    :class:`ViTConfig`; it needs ``patch_size`` 16 and four ``out_indices``, CellViT's z1..z4).
    ``stem_dims``: widths of the image stem — one level (stride 1) for a ViT, two (strides 1 and 2) for ConvNeXt.
    ``decoder_dims``: output width of each decoder stage, deepest first — 4 stages for a ViT (strides 8→1),
    5 for ConvNeXt (16→1). ``decoder_convs`` conv–BN–ReLU blocks per stage and per stem level.
    ``shared_stages``: how many leading decoder stages the NP/HV/NT branches share (0 = CellViT's three decoders).
    ``num_classes`` C excludes background; NT has C + 1 channels. ``num_tissues`` > 0 adds the tissue head
    (``tissue_names`` maps 0..T-1 to the ``Sample.tissue`` strings it is trained on).
    ``pixel_mean``/``pixel_std`` (per channel, for images scaled to [0, 1]) and ``mpp`` describe the input.
    ``loss_*``: weights of the loss terms. ``np_threshold`` … ``min_area``: HoVer-Net post-processing
    (:func:`karyo.infer.hovernet.hovernet_instances`). ``tile_size``/``tile_overlap``/``tile_batch``: inference
    tiling of images larger than one tile. ``adapter`` (optional): a :class:`~karyo.models.adapter.ChannelAdapter`
    in front of the network, mapping N input channels onto ``in_chans`` (the input normalisation is then the
    adapter's). ``binary`` (optional): instances from the NP map alone (:mod:`karyo.infer.binary`, the
    stain-agnostic recipe) instead of HoVer-Net's post-processing; HV and NT are then not used.
    """

    encoder: str = "convnext"
    convnext: str = "atto"
    vit: ViTConfig | None = None
    drop_path_rate: float = 0.0
    stem_dims: tuple[int, ...] = (16, 24)
    decoder_dims: tuple[int, ...] = (128, 80, 48, 24, 16)
    decoder_convs: int = 1
    shared_stages: int = 4
    dropout: float = 0.0
    in_chans: int = 3
    num_classes: int = 1
    class_names: dict[int, str] = field(default_factory=dict)
    num_tissues: int = 0
    tissue_names: dict[int, str] = field(default_factory=dict)
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    mpp: float = 0.25
    # loss weights (HoVer-Net: NP CE 1 + Dice 1; HV MSE 1 + MSGE 2; NT CE 1 + Dice 1)
    loss_np_ce: float = 1.0
    loss_np_dice: float = 1.0
    loss_np_focal: float = 0.0
    loss_hv_mse: float = 1.0
    loss_hv_msge: float = 2.0
    loss_nt_ce: float = 1.0
    loss_nt_dice: float = 1.0
    loss_tissue: float = 0.1
    focal_gamma: float = 2.0
    # HoVer-Net post-processing at 40× (object size 10 as CellViT; energy see karyo.infer.hovernet)
    np_threshold: float = 0.5
    energy: str = "slope"
    sobel_ksize: int = 5
    energy_threshold: float = 0.02
    marker_open_radius: int = 1
    min_marker_area: int = 10
    min_area: int = 10
    # inference tiling
    tile_size: int = 256
    tile_overlap: int = 64
    tile_batch: int = 4
    # stain-agnostic additions (issue 7): channel adapter, binary post-processing
    adapter: AdapterConfig | None = None
    binary: BinaryConfig | None = None

    def __post_init__(self) -> None:
        self.stem_dims = tuple(int(v) for v in self.stem_dims)
        self.decoder_dims = tuple(int(v) for v in self.decoder_dims)
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        self.class_names = {int(k): str(v) for k, v in (self.class_names or {}).items()}
        self.tissue_names = {int(k): str(v) for k, v in (self.tissue_names or {}).items()}
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if isinstance(self.binary, dict):
            self.binary = BinaryConfig(**self.binary)
        problems = []
        if self.adapter is not None and self.adapter.out_channels != self.in_chans:
            problems.append(f"adapter.out_channels {self.adapter.out_channels} differs from in_chans {self.in_chans}")
        if self.encoder == "convnext":
            if self.convnext not in CONVNEXT_PRESETS:
                problems.append(f"unknown ConvNeXt preset {self.convnext!r}; known: {sorted(CONVNEXT_PRESETS)}")
            want_stem, want_dec = 2, 5
        elif self.encoder == "vit":
            if self.vit is None:
                problems.append("encoder 'vit' needs a vit config")
            else:
                if self.vit.patch_size != 16 or len(self.vit.out_indices) != 4:
                    problems.append("the ViT encoder needs patch_size 16 and four out_indices (CellViT's z1..z4), "
                                    f"got {self.vit.patch_size} and {self.vit.out_indices}")
                if self.vit.in_chans != self.in_chans:
                    problems.append(f"vit.in_chans {self.vit.in_chans} differs from in_chans {self.in_chans}")
            want_stem, want_dec = 1, 4
        else:
            problems.append(f"encoder must be 'convnext' or 'vit', got {self.encoder!r}")
            want_stem, want_dec = len(self.stem_dims), len(self.decoder_dims)
        if len(self.stem_dims) != want_stem or len(self.decoder_dims) != want_dec:
            problems.append(f"encoder {self.encoder!r} needs {want_stem} stem_dims and {want_dec} decoder_dims, got "
                            f"{self.stem_dims} and {self.decoder_dims}")
        if min((*self.stem_dims, *self.decoder_dims), default=1) < 1 or self.decoder_convs < 1:
            problems.append("stem_dims, decoder_dims and decoder_convs must be positive")
        if not 0 <= self.shared_stages <= len(self.decoder_dims):
            problems.append(f"shared_stages must be in 0..{len(self.decoder_dims)}, got {self.shared_stages}")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and not set(self.class_names) <= set(range(1, self.num_classes + 1)):
            problems.append(f"class_names keys must lie in 1..{self.num_classes}, got {sorted(self.class_names)}")
        if self.num_tissues < 0 or (self.tissue_names and not set(self.tissue_names) <= set(range(self.num_tissues))):
            problems.append(f"tissue_names keys must lie in 0..num_tissues-1 ({self.num_tissues}), got "
                            f"{sorted(self.tissue_names)}")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            problems.append(f"pixel_mean/pixel_std need {self.in_chans} values, got "
                            f"{len(self.pixel_mean)}/{len(self.pixel_std)}")
        if any(s <= 0 for s in self.pixel_std) or self.mpp <= 0:
            problems.append("pixel_std and mpp must be positive")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.drop_path_rate < 1.0:
            problems.append("dropout and drop_path_rate must lie in [0, 1)")
        if min(self.loss_np_ce, self.loss_np_dice, self.loss_np_focal, self.loss_hv_mse, self.loss_hv_msge,
               self.loss_nt_ce, self.loss_nt_dice, self.loss_tissue) < 0:
            problems.append("loss weights must be >= 0")
        if self.sobel_ksize % 2 == 0 or not 1 <= self.sobel_ksize <= 31:
            problems.append(f"sobel_ksize must be odd and in 1..31, got {self.sobel_ksize}")
        if not 0.0 <= self.np_threshold <= 1.0 or not 0.0 <= self.energy_threshold <= 1.0:
            problems.append("np_threshold and energy_threshold must lie in [0, 1]")
        if self.energy not in ENERGIES:
            problems.append(f"energy must be one of {ENERGIES}, got {self.energy!r}")
        if self.tile_size % self.stride or not 0 <= self.tile_overlap < self.tile_size // 2 or self.tile_batch < 1:
            problems.append(f"tile_size must be a multiple of {self.stride} and tile_overlap in "
                            f"[0, tile_size/2); got {self.tile_size}, {self.tile_overlap}")
        if problems:
            raise InputError(None, "CellViTConfig: " + "; ".join(problems))

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (the encoder's deepest stride)."""
        return 16 if self.encoder == "vit" else 32

    def convnext_config(self) -> ConvNeXtConfig:
        return ConvNeXtConfig.preset(self.convnext, in_chans=self.in_chans, drop_path_rate=self.drop_path_rate)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CellViTConfig:
        """A named configuration from :data:`CELLVIT_PRESETS`, with field overrides."""
        if name not in CELLVIT_PRESETS:
            raise InputError(None, f"unknown CellViT preset {name!r}; known: {sorted(CELLVIT_PRESETS)}")
        base = {k: (dataclasses.replace(v) if isinstance(v, ViTConfig) else v)
                for k, v in CELLVIT_PRESETS[name].items()}
        check_fields(cls, overrides)
        return cls(**{**base, **overrides})


_CELLVIT_OUT = (2, 5, 8, 11)  # CellViT's extract_layers 3, 6, 9, 12 (1-based) of a 12-block ViT

#: "cpu": ConvNeXt-atto, narrow decoder shared up to the full-resolution stage (fast on a 2-core CPU).
#: "vit256": CellViT-256's sizes (ViT-S/16 with class token, as HIPT's ViT-256; three decoders).
#: "sam_b": CellViT-SAM-B's sizes (SAM ViT-B encoder at 1024 px, windowed attention, relative positions).
CELLVIT_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(encoder="convnext", convnext="atto", stem_dims=(16, 24), decoder_dims=(128, 80, 48, 24, 16),
                decoder_convs=1, shared_stages=4),
    "vit256": dict(encoder="vit", vit=ViTConfig(img_size=256, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                                class_token=True, final_norm=True, out_indices=_CELLVIT_OUT),
                   stem_dims=(64,), decoder_dims=(312, 256, 128, 64), decoder_convs=2, shared_stages=0),
    "sam_b": dict(encoder="vit", vit=ViTConfig(img_size=1024, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                               use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11),
                                               out_indices=_CELLVIT_OUT),
                  stem_dims=(64,), decoder_dims=(512, 256, 128, 64), decoder_convs=2, shared_stages=0),
}


# -------------------------------------------------------------------------------------------------------- network


class ConvBlock(nn.Sequential):
    """3×3 conv → BatchNorm → ReLU (→ dropout): CellViT's ``Conv2DBlock``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DeconvBlock(nn.Sequential):
    """2×2 transposed conv (×2 upsampling) → 3×3 conv → BatchNorm → ReLU: CellViT's ``Deconv2DBlock``."""

    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0):
        super().__init__(nn.ConvTranspose2d(c_in, c_out, 2, stride=2), *ConvBlock(c_out, c_out, dropout=dropout))


def _convs(c_in: int, c_out: int, n: int, stride: int = 1, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(ConvBlock(c_in, c_out, stride, dropout),
                         *[ConvBlock(c_out, c_out, dropout=dropout) for _ in range(n - 1)])


class UpStage(nn.Module):
    """One decoder stage: ×2 transposed conv of the deeper map, concatenation with the skip, conv blocks."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, convs: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        self.convs = _convs(c_out + c_skip, c_out, convs, dropout=dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class Branch(nn.Module):
    """The decoder stages a branch owns, then its 1×1 output head."""

    def __init__(self, stages: Sequence[UpStage], c_last: int, out_channels: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_last, out_channels, 1)

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        for stage, skip in zip(self.stages, skips, strict=True):
            x = stage(x, skip)
        return self.head(x)


class CellViT(nn.Module):
    """Encoder + U-Net decoder + NP/HV/NT (+ tissue) heads; ``forward`` returns logits at input resolution.

    Input sides must be multiples of ``config.stride`` (32 for ConvNeXt, 16 for the ViT).
    """

    #: The layer whose shape is the class count (see :attr:`karyo.models.prompter.Prompter.class_head_prefixes`).
    class_head_prefixes = ("branches.nt.head.",)

    BRANCHES = ("np", "hv", "nt")

    def __init__(self, config: CellViTConfig | None = None):
        super().__init__()
        cfg = config if config is not None else CellViTConfig()
        self.config = cfg
        drop = cfg.dropout
        self.adapter = ChannelAdapter(cfg.adapter) if cfg.adapter is not None else None
        if cfg.encoder == "vit":
            assert cfg.vit is not None
            self.encoder: nn.Module = ViT(cfg.vit)
            e = cfg.vit.embed_dim
            d = cfg.decoder_dims
            # z3 → s8, z2 → s4, z1 → s2 through 1, 2, 3 (transposed conv + conv) blocks (CellViT decoder3/2/1)
            self.skip_adapters = nn.ModuleList(
                nn.Sequential(*[DeconvBlock(e if i == 0 else d[i - 1], d[i], drop) for i in range(n)])
                for n in (1, 2, 3))
            bottleneck, skip_dims = e, [d[0], d[1], d[2], cfg.stem_dims[0]]
        else:
            self.encoder = ConvNeXt(cfg.convnext_config())
            dims = self.encoder.out_channels
            bottleneck, skip_dims = dims[3], [dims[2], dims[1], dims[0], cfg.stem_dims[1], cfg.stem_dims[0]]
        self.stem = nn.ModuleList()
        c_prev = cfg.in_chans
        for level, c in enumerate(cfg.stem_dims):
            self.stem.append(_convs(c_prev, c, cfg.decoder_convs, stride=1 if level == 0 else 2, dropout=drop))
            c_prev = c

        def stages(lo: int, hi: int) -> list[UpStage]:
            return [UpStage(bottleneck if i == 0 else cfg.decoder_dims[i - 1], skip_dims[i], cfg.decoder_dims[i],
                            cfg.decoder_convs, drop) for i in range(lo, hi)]

        n = len(cfg.decoder_dims)
        k = cfg.shared_stages
        self.shared = nn.ModuleList(stages(0, k))
        out_ch = {"np": 2, "hv": 2, "nt": cfg.num_classes + 1}
        self.branches = nn.ModuleDict({b: Branch(stages(k, n), cfg.decoder_dims[-1], out_ch[b])
                                       for b in self.BRANCHES})
        if cfg.num_tissues:
            c_pool = cfg.vit.embed_dim if cfg.encoder == "vit" else bottleneck
            self.tissue_head = nn.Sequential(nn.LayerNorm(c_pool), nn.Linear(c_pool, cfg.num_tissues))

    @property
    def stride(self) -> int:
        return self.config.stride

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """(bottleneck, skips deepest first, pooled feature for the tissue head)."""
        cfg = self.config
        stem: list[Tensor] = []
        s = x
        for level in self.stem:
            s = level(s)
            stem.append(s)
        if cfg.encoder == "vit":
            out = self.encoder.forward_features(x)
            z = [t.permute(0, 3, 1, 2) for t in out.intermediates]  # z1..z4, B×C×H/16×W/16
            skips = [self.skip_adapters[0](z[2]), self.skip_adapters[1](z[1]), self.skip_adapters[2](z[0]), stem[0]]
            pooled = out.cls if out.cls is not None else z[3].mean(dim=(2, 3))
            return z[3], skips, pooled
        f = self.encoder(x)
        return f[3], [f[2], f[1], f[0], stem[1], stem[0]], f[3].mean(dim=(2, 3))

    def forward(self, x: Tensor, heads: Sequence[str] | None = None) -> dict[str, Tensor]:
        """B×C×H×W normalised image → ``{"np": B×2×H×W, "hv": B×2×H×W, "nt": B×(C+1)×H×W[, "tissue": B×T]}``
        (``heads``: only these of NP/HV/NT, e.g. ``("np",)`` for the binary recipe)."""
        if self.adapter is not None:
            x = self.adapter(x)
        st = self.stride
        if x.ndim != 4 or x.shape[1] != self.config.in_chans or x.shape[2] % st or x.shape[3] % st:
            raise InputError(None, f"CellViT expects B×{self.config.in_chans}×H×W with H, W multiples of {st}, got "
                                   f"{tuple(x.shape)}")
        h, skips, pooled = self.encode(x)
        k = len(self.shared)
        for stage, skip in zip(self.shared, skips[:k], strict=True):
            h = stage(h, skip)
        out = {b: self.branches[b](h, skips[k:]) for b in (self.BRANCHES if heads is None else heads)}
        if self.config.num_tissues:
            out["tissue"] = self.tissue_head(pooled)
        return out

    def load_encoder_weights(self, path: str | Path, layout: str = "auto") -> LoadReport | WeightLoadReport:
        """Load pretrained encoder weights from a local file: SAM / timm / CLIP / karyo ViT layouts
        (:func:`load_vit_weights`) or official / timm ConvNeXt (:func:`load_convnext_weights`)."""
        if self.config.encoder == "vit":
            return load_vit_weights(self.encoder, path, layout=layout)
        return load_convnext_weights(self.encoder, path)


# --------------------------------------------------------------------------------------------------------- targets


def hv_maps(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net's horizontal/vertical target maps (2×H×W float32; channel 0 = x, channel 1 = y).

    For every nucleus, each pixel's x (and y) offset from the nucleus's centre of mass — rounded to a pixel, so
    that pixel is exactly 0, as HoVer-Net's ``gen_targets`` — divided by the largest offset of that nucleus on
    the same side: negative offsets by |min|, positive by max, so values span [-1, 1] in every nucleus and are
    0 outside nuclei. Vectorised: centres from ``np.bincount``, side extremes from ``np.minimum.at`` /
    ``np.maximum.at`` over all nucleus pixels at once.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be H×W, got {inst.shape}")
    h, w = inst.shape
    out = np.zeros((2, h, w), np.float32)
    pos = np.flatnonzero(inst)
    if pos.size == 0:
        return out
    _, dense = np.unique(inst.ravel()[pos], return_inverse=True)
    n = int(dense.max()) + 1
    ys, xs = np.divmod(pos, w)
    area = np.bincount(dense, minlength=n).astype(np.float64)
    for ch, coord in ((0, xs), (1, ys)):
        centre = np.floor(np.bincount(dense, weights=coord, minlength=n) / area + 0.5)
        d = coord - centre[dense]
        lo = np.zeros(n)
        hi = np.zeros(n)
        np.minimum.at(lo, dense, d)
        np.maximum.at(hi, dense, d)
        scale = np.where(d < 0, -lo[dense], hi[dense])
        out[ch].flat[pos] = np.divide(d, scale, out=np.zeros_like(d), where=scale > 0)
    return out


def cellvit_targets(instances: Tensor | np.ndarray, types: Tensor | np.ndarray | None = None,
                    device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Training targets from a batch of instance maps (B×H×W) and class maps (B×H×W, 0 = background or unknown).

    ``np`` (B×H×W long, 1 = nucleus), ``hv`` (B×2×H×W, :func:`hv_maps`), ``nt`` (B×H×W long class ids, with
    ``-100`` — ignored — on nucleus pixels whose class is unknown, so nuclei-only data trains NP/HV but not NT).
    """
    inst = instances.cpu().numpy() if isinstance(instances, Tensor) else np.asarray(instances)
    if inst.ndim != 3:
        raise ValueError(f"instances must be B×H×W, got {inst.shape}")
    fg = inst > 0
    hv = np.stack([hv_maps(m) for m in inst])
    if types is None:
        nt = np.where(fg, -100, 0)
    else:
        t = types.cpu().numpy() if isinstance(types, Tensor) else np.asarray(types)
        nt = np.where(fg & (t <= 0), -100, np.where(fg, t, 0))
    return {"np": torch.from_numpy(fg.astype(np.int64)).to(device), "hv": torch.from_numpy(hv).to(device),
            "nt": torch.from_numpy(nt.astype(np.int64)).to(device)}


# ---------------------------------------------------------------------------------------------------------- losses


def _sobel_kernels(size: int = 5, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> tuple[Tensor, Tensor]:
    """HoVer-Net's size×size gradient kernels: k_x(x, y) = x / (x² + y²), k_y = y / (x² + y²), 0 at the centre."""
    r = torch.arange(size, device=device, dtype=dtype) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    den = x * x + y * y
    den[size // 2, size // 2] = 1.0
    return x / den, y / den


def sobel_hv(hv: Tensor, size: int = 5) -> Tensor:
    """B×2×H×W HV maps → the x-gradient of channel 0 and the y-gradient of channel 1 (HoVer-Net's MSGE input)."""
    kx, ky = _sobel_kernels(size, hv.device, hv.dtype)
    weight = torch.stack([kx, ky])[:, None]  # 2×1×k×k, one kernel per channel (grouped conv)
    return F.conv2d(hv, weight, padding=size // 2, groups=2)


def msge_loss(pred_hv: Tensor, true_hv: Tensor, focus: Tensor) -> Tensor:
    """Mean squared gradient error inside ``focus`` (B×H×W nucleus mask), HoVer-Net's ``msge_loss``."""
    diff = (sobel_hv(pred_hv) - sobel_hv(true_hv)) ** 2
    f = focus[:, None].to(diff.dtype).expand_as(diff)
    return (diff * f).sum() / (f.sum() + 1e-8)


def _dice(prob: Tensor, onehot: Tensor, valid: Tensor | None = None, smooth: float = 1e-3) -> Tensor:
    """HoVer-Net's soft Dice loss summed over channels: Σ_c 1 − (2|P∩T| + s)/(|P| + |T| + s)."""
    if valid is not None:
        v = valid[:, None].to(prob.dtype)
        prob, onehot = prob * v, onehot * v
    dims = (0, 2, 3)
    inter = (prob * onehot).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (prob.sum(dims) + onehot.sum(dims) + smooth)).sum()


def cellvit_loss(out: dict[str, Tensor], targets: dict[str, Tensor], config: CellViTConfig,
                 tissue: Tensor | None = None) -> dict[str, Tensor]:
    """Weighted HoVer-Net/CellViT loss terms and their sum ``loss``.

    ``targets`` from :func:`cellvit_targets`; ``tissue`` (B long, -100 = unknown) when the tissue head is trained.
    Terms with weight 0 are reported but not computed into the graph.
    """
    cfg = config
    zero = out["np"].sum() * 0.0
    t_np, t_hv, t_nt = targets["np"], targets["hv"], targets["nt"]
    terms: dict[str, Tensor] = {}
    np_logp = F.log_softmax(out["np"].float(), dim=1)
    np_prob = np_logp.exp()
    terms["np_ce"] = F.nll_loss(np_logp, t_np)
    terms["np_dice"] = _dice(np_prob, F.one_hot(t_np, 2).permute(0, 3, 1, 2).to(np_prob.dtype))
    if cfg.loss_np_focal > 0:
        logp_t = np_logp.gather(1, t_np[:, None])[:, 0]
        terms["np_focal"] = (-(1.0 - logp_t.exp()) ** cfg.focal_gamma * logp_t).mean()
    else:
        terms["np_focal"] = zero
    hv = out["hv"].float()
    terms["hv_mse"] = F.mse_loss(hv, t_hv)
    terms["hv_msge"] = msge_loss(hv, t_hv, t_np > 0)
    valid = t_nt >= 0
    if bool(valid.any()):
        nt_logp = F.log_softmax(out["nt"].float(), dim=1)
        terms["nt_ce"] = F.nll_loss(nt_logp, t_nt, ignore_index=-100)
        k = nt_logp.shape[1]
        onehot = F.one_hot(t_nt.clamp(min=0), k).permute(0, 3, 1, 2).to(nt_logp.dtype)
        terms["nt_dice"] = _dice(nt_logp.exp(), onehot, valid)
    else:
        terms["nt_ce"] = terms["nt_dice"] = zero
    if "tissue" in out and tissue is not None and bool((tissue >= 0).any()):
        terms["tissue"] = F.cross_entropy(out["tissue"].float(), tissue, ignore_index=-100)
    else:
        terms["tissue"] = zero
    weights = {"np_ce": cfg.loss_np_ce, "np_dice": cfg.loss_np_dice, "np_focal": cfg.loss_np_focal,
               "hv_mse": cfg.loss_hv_mse, "hv_msge": cfg.loss_hv_msge, "nt_ce": cfg.loss_nt_ce,
               "nt_dice": cfg.loss_nt_dice, "tissue": cfg.loss_tissue}
    terms["loss"] = sum((weights[k] * v for k, v in terms.items() if weights[k] > 0), zero)
    return terms


# ---------------------------------------------------------------------------------------------- inference model


def _ramp(n: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    """1-D blending weight of a tile side: linear ramp over ``overlap`` px on sides that have a neighbour."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        if before:
            w[:overlap] = np.minimum(w[:overlap], r)
        if after:
            w[n - overlap:] = np.minimum(w[n - overlap:], r[::-1])
    return w


def postprocess_params(config: CellViTConfig) -> dict[str, Any]:
    """The keyword arguments of :func:`karyo.infer.hovernet.hovernet_instances` held in ``config``."""
    return {k: getattr(config, k) for k in ("np_threshold", "energy", "sobel_ksize", "energy_threshold",
                                            "marker_open_radius", "min_marker_area", "min_area")}


@dataclass
class CellViTMaps:
    """Per-pixel outputs of :meth:`CellViTModel.predict_maps` at the model's mpp: NP foreground probability (H×W),
    HV maps (2×H×W), NT probabilities (K×H×W, index 0 = background), tissue probabilities (T,) or None."""

    np_prob: np.ndarray
    hv: np.ndarray
    nt_prob: np.ndarray
    tissue_prob: np.ndarray | None = None


@register
class CellViTModel(InstanceModel):
    """A trained :class:`CellViT` with its inference settings: tiled prediction, then HoVer-Net post-processing."""

    arch = "cellvit"
    config_class = CellViTConfig

    def __init__(self, config: CellViTConfig | None = None, device: str = "cpu"):
        super().__init__(config)
        self.device = pick_device(device)
        self.net = CellViT(self.config).to(self.device).eval()

    @classmethod
    def _from_config(cls, config: CellViTConfig, directory: Path | None, device: str = "cpu") -> CellViTModel:
        model = cls(config, device=device)
        if directory is not None:
            model.net.load_state_dict(read_state_dict(directory / WEIGHTS_FILE))
        return model

    def _save_weights(self, directory: Path) -> None:
        from karyo.data.io import atomic_path

        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, tmp)

    def _prepare(self, image: np.ndarray, name: str, channel_names: Sequence[str] | None = None) -> Tensor:
        cfg = self.config
        return model_input(image, cfg.in_chans, cfg.pixel_mean, cfg.pixel_std, name or None, adapter=cfg.adapter,
                           channel_names=channel_names)

    def _forward(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        if self.config.binary is not None:  # NP only; HV/NT stand-ins keep the tiling code unchanged
            p = self.net(batch.to(self.device), heads=("np",))["np"].softmax(1)[:, 1].cpu()
            b, h, w = p.shape
            return p, torch.zeros(b, 2, h, w), torch.zeros(b, self.config.num_classes + 1, h, w), None
        out = self.net(batch.to(self.device))
        tissue = out["tissue"].softmax(1).cpu() if "tissue" in out else None
        return (out["np"].softmax(1)[:, 1].cpu(), out["hv"].cpu(), out["nt"].softmax(1).cpu(), tissue)

    @torch.no_grad()
    def predict_maps(self, x: Tensor) -> CellViTMaps:
        """NP/HV/NT maps of one normalised 1×C×H×W image (already at the model's mpp).

        Images within one tile run in one pass (padded to the encoder stride); larger ones run as overlapping
        ``tile_size`` tiles whose maps are blended with weights ramping linearly across the ``tile_overlap``,
        so every pixel near a tile border is dominated by the neighbouring tile that sees it with context (the HV
        maps are relative to each nucleus, so they blend like the probabilities).
        """
        cfg = self.config
        _, _, h, w = x.shape
        ts, ov = cfg.tile_size, cfg.tile_overlap
        if h <= ts and w <= ts:
            st = cfg.stride
            ph, pw = (-h) % st, (-w) % st
            xp = F.pad(x, (0, pw, 0, ph), mode="reflect" if (pw < w and ph < h) else "constant")
            p, hv, nt, tissue = self._forward(xp)
            return CellViTMaps(p[0, :h, :w].numpy(), hv[0, :, :h, :w].numpy(), nt[0, :, :h, :w].numpy(),
                               None if tissue is None else tissue[0].numpy())
        ph, pw = max(h, ts) - h, max(w, ts) - w
        xp = F.pad(x, (0, pw, 0, ph), mode="reflect" if (pw < w and ph < h) else "constant") if ph or pw else x
        hp, wp = xp.shape[2:]
        ys, xs = tile_starts(hp, ts, ov), tile_starts(wp, ts, ov)
        k = cfg.num_classes + 1
        acc = torch.zeros(3 + k, hp, wp)
        wsum = torch.zeros(hp, wp)
        tissue_sum: Tensor | None = None
        corners = [(y0, x0) for y0 in ys for x0 in xs]
        for i in range(0, len(corners), cfg.tile_batch):
            part = corners[i:i + cfg.tile_batch]
            batch = torch.cat([xp[:, :, y0:y0 + ts, x0:x0 + ts] for y0, x0 in part])
            p, hv, nt, tissue = self._forward(batch)
            maps = torch.cat([p[:, None], hv, nt], dim=1)
            for j, (y0, x0) in enumerate(part):
                wt = torch.from_numpy(np.outer(_ramp(ts, ov, y0 > 0, y0 + ts < hp),
                                               _ramp(ts, ov, x0 > 0, x0 + ts < wp)))
                acc[:, y0:y0 + ts, x0:x0 + ts] += maps[j] * wt
                wsum[y0:y0 + ts, x0:x0 + ts] += wt
            if tissue is not None:
                s = tissue.sum(0)
                tissue_sum = s if tissue_sum is None else tissue_sum + s
        acc = (acc / wsum)[:, :h, :w].numpy()
        return CellViTMaps(acc[0], acc[1:3], acc[3:], None if tissue_sum is None
                           else (tissue_sum / len(corners)).numpy())

    def postprocess(self, maps: CellViTMaps) -> tuple[np.ndarray, dict[int, int], dict[int, float]]:
        """HoVer-Net (or, with ``binary``, threshold + watershed) post-processing → (instances, classes, scores)."""
        cfg = self.config
        if cfg.binary is not None:  # class 1 for every nucleus: the binary recipe trains no NT head
            inst = binary_instances(maps.np_prob, cfg.binary)
            scores = instance_scores(inst, maps.np_prob)
            return inst, dict.fromkeys(scores, 1), scores
        res = hovernet_postprocess(maps.np_prob, maps.hv, maps.nt_prob, **postprocess_params(cfg))
        return res.instances, res.classes, res.scores

    @torch.no_grad()
    def segment(self, image: np.ndarray, *, points: Sequence[tuple[float, float]] | None = None,
                negative: Sequence[tuple[float, float]] | None = None, mpp: float | None = None,
                name: str = "", channel_names: Sequence[str] | None = None) -> SegmentationResult:
        """Segment and classify every nucleus of an H×W×C image.

        ``mpp`` (µm/px of the image): the image is resampled to the model's mpp first and the result back.
        ``points`` (x, y): only the nuclei containing at least one of them are kept (CellViT has no prompt input:
        the points select among the nuclei it finds; a point on background selects nothing). ``negative``:
        nuclei containing one of these points are dropped. Kept nuclei are renumbered 1..N. ``channel_names``:
        the image's channel names, mapped onto an adapter's (:mod:`karyo.models.adapter`).
        """
        points, negative = check_prompts(points, negative, np.shape(image), name or None,
                                         double_click_px(check_mpp(mpp, name or None), self.config.mpp))
        x = self._prepare(image, name, channel_names)
        h0, w0 = x.shape[2:]
        x, scale = resample_to_model(x, mpp, self.config.mpp, name or None)
        instances, classes, scores = self.postprocess(self.predict_maps(x))
        if points is not None or negative is not None:
            instances, classes, scores = _select(instances, classes, scores, points, negative, scale)
        instances, classes, scores = resize_instances(instances, (h0, w0), classes, scores)
        return finish(SegmentationResult(instances, classes=classes, scores=scores, class_names=self.class_names,
                                         name=name, model=self.arch), points, mpp)


def _ids_at(instances: np.ndarray, pts: Sequence[tuple[float, float]] | None, scale: float) -> set[int]:
    if pts is None:
        return set()
    # A point's pixel index at the model's scale: the input pixel's extent scaled, as labels_at rounds it
    xy = (np.asarray(list(pts), np.float64).reshape(-1, 2) + 0.5) * scale - 0.5
    return {int(i) for i in labels_at(instances, xy) if i > 0}


def _select(instances: np.ndarray, classes: dict[int, int], scores: dict[int, float],
            points: Sequence[tuple[float, float]] | None, negative: Sequence[tuple[float, float]] | None,
            scale: float) -> tuple[np.ndarray, dict[int, int], dict[int, float]]:
    """Keep the instances under ``points`` (all when None), drop those under ``negative``; renumber 1..N."""
    keep = _ids_at(instances, points, scale) if points is not None else {int(i) for i in np.unique(instances) if i}
    kept, new = keep_instances(instances, keep - _ids_at(instances, negative, scale))
    return kept, {n: classes.get(o, 0) for o, n in new.items()}, {n: scores.get(o, 0.0) for o, n in new.items()}
