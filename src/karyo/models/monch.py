"""MONCH (Zhang et al., "Progressive Vision-Language Prompt for Multi-Organ Multi-Class Cell Semantic
Segmentation with Single Branch"): a per-pixel cell-type map from one branch, guided by class descriptions.

Pipeline (paper section → code):

* §3.1 eq. 1 — image encoder ``G_VLM`` = the project's CLIP-style :class:`~karyo.models.vit.ViT` (class token,
  ``ln_pre``, quick-GELU; CLIP/PLIP/CONCH towers load with :meth:`MONCH.load_image_encoder`). Its token map,
  projected to ``dim`` channels, is the middle-grained ``F^m`` (stride = patch size ``p``); ``G_us`` (2×2
  transposed conv) gives the fine ``F^f`` (stride p/2) and ``G_ds`` (stride-2 conv) the coarse ``F^c`` (stride 2p).
* §3.2 MGFE — ``F^h`` = high-frequency enhancement of ``F^f`` (eqs. 2–4: FFT, radial high-pass, inverse FFT,
  residual), ``F^v`` = conv(``F^m``), ``F^t`` = topological feature of ``F^c`` (eqs. 5–6: dilated k-NN graph over
  the feature tokens, k = 9, max-relative graph convolution, residual).
* §3.3 PPD — progressive multi-head cross-attention (eq. 7), each stage's output querying the next, coarser
  feature: ``F^h → F^v → F^t → F^T`` (text), then the result queries the FPN-blended ``{F^c, F^m, F^f}``; a final
  merge (concatenation + 1×1 conv) with the blended feature.
* §3.4 eq. 8 — ``G_v`` (convolutions and ×2 upsamplings to full resolution), a controller ``G_weight(G_linear(F_T))``
  that writes the weights of a per-class dynamic 1×1-conv head, applied as one grouped convolution over the
  (1, B·C, H, W) reshaped features; one mask per class (background = class 0). Eq. 9: per-class binary
  cross-entropy (:func:`per_class_bce`).

Ablation switches (Tables 3–5): ``mgfe`` (off: ``F^h, F^v, F^t = F^f, F^m, F^c``), ``ppd`` (off: the enhanced
features are fused by the FPN block only), ``hf`` / ``topo`` (off: that branch is replaced by a conv block, as in
Table 4), ``conv`` (off: ``F^v = F^m``), ``ppd_stages`` (a missing stage passes its query through, Table 5).

Deviations, all for a CPU-sized model trained from scratch on a few hundred tiles: the default encoder is a small
ViT (width 128, depth 6) with CLIP-B/16's patch 16 but a convolutional stem, trained by us instead of a
pre-trained CLIP ViT-B/16; text embeddings come from the project's frozen sentence encoder (all-MiniLM-L6-v2, one
384-d vector per sentence) instead of CLIP's 77-token text tower, so ``F^T`` holds one token per sentence; a
3×3 conv (no bias) refines the high-pass component before eq. 4's residual; the conv and PPD stages are residual
(pre-norm transformer decoder layers with an MLP); the blended feature is average-pooled to ``F^m``'s grid before
it serves as keys/values; ``G_v`` receives a stride-2 convolutional "detail" feature of the input image (the paper's
features never go below stride 8, too coarse for 15-px nuclei); the controller also sees the image's class token
(as in the CLIP-driven universal model, which is what makes eq. 8's per-image reshape necessary).

Size: the ``cpu`` preset has 1.80 M parameters (1.32 M in the tower) and one 256² tile takes about 60 ms (one
thread, this project's 2-core CPU; see docs/benchmarks.md, section ``monch``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import Tensor, nn

from karyo.data.augment import IMAGENET_MEAN, IMAGENET_STD
from karyo.device import pick_device
from karyo.errors import InputError
from karyo.infer.postprocess import remove_small_instances
from karyo.infer.prepare import model_input, resample_to_model
from karyo.infer.result import SegmentationResult, finish
from karyo.models.adapter import AdapterConfig, ChannelAdapter
from karyo.models.base import InstanceModel, register
from karyo.models.layers import LayerNorm2d, MLPBlock
from karyo.models.vit import LoadReport, ViT, ViTConfig, load_vit_weights, read_state_dict

__all__ = [
    "MONCH",
    "ConvBranch",
    "CrossAttentionStage",
    "Decoder",
    "DynamicConvHead",
    "FPNBlend",
    "HighFrequencyEnhancement",
    "MONCHConfig",
    "MONCHModel",
    "SemanticModel",
    "SemanticSegmentation",
    "TopologicalBranch",
    "dilated_knn",
    "high_pass",
    "max_relative_graph_conv",
    "per_class_bce",
    "seed_instances",
    "semantic_targets",
    "sine_positions",
    "tiled_probabilities",
    "with_ablation",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _cpu_encoder() -> ViTConfig:
    """The small default image tower trained by us: CLIP-style (class token, ln_pre, quick-GELU, final norm) with
    CLIP-B/16's geometry (patch 16: F^m at stride 16, F^f at 8, F^c at 32, as in the paper) and a convolutional
    stem instead of a patchify layer (trains from scratch far better; Xiao et al. 2021)."""
    return ViTConfig(img_size=256, patch_size=16, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                     class_token=True, pre_norm=True, final_norm=True, act="quick_gelu", norm_eps=1e-5,
                     patch_embed="stem")


ENCODER_PRESETS = {
    "cpu": _cpu_encoder,
    # OpenAI CLIP ViT-B/16 (the paper's default backbone; CONCH's tower has the same size).
    "clip_vit_b16": lambda: ViTConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                      class_token=True, pre_norm=True, final_norm=True, act="quick_gelu",
                                      norm_eps=1e-5, patch_bias=False, proj_dim=512),
    # PLIP = CLIP ViT-B/32 fine-tuned on pathology: half CLIP-B/16's feature resolution (paper §4.3).
    "plip_vit_b32": lambda: ViTConfig(img_size=224, patch_size=32, embed_dim=768, depth=12, num_heads=12,
                                      class_token=True, pre_norm=True, final_norm=True, act="quick_gelu",
                                      norm_eps=1e-5, patch_bias=False, proj_dim=512),
    # CONCH's tower is a timm ViT-B/16 (GELU, eps 1e-6, no ln_pre); strip its "visual.trunk." prefix on loading.
    "conch_vit_b16": lambda: ViTConfig(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                       class_token=True, final_norm=True),
}


@dataclass
class MONCHConfig:
    """Architecture, ablation switches and inference settings of a :class:`MONCH` network.

    ``num_classes`` = N cell classes; the network outputs N + 1 masks (0 = background). The text embeddings
    (``num_classes + 1`` × ``sentences_per_class`` × ``text_dim``) are a buffer of the network, filled once from
    the frozen text encoder and saved with the weights, so inference needs no text model. ``adapter`` (optional): a
    channel adapter (:mod:`karyo.models.adapter`) mapping N input channels onto ``in_chans`` at the input (the input
    normalisation is then the adapter's).
    """

    encoder: ViTConfig = field(default_factory=_cpu_encoder)
    num_classes: int = 4
    class_names: dict[int, str] = field(default_factory=dict)
    text_dim: int = 384
    sentences_per_class: int = 4
    text_encoder: str = "all-MiniLM-L6-v2"
    prompt_set: str = ""
    dim: int = 64  # C of F^m, F^f, F^c
    heads: int = 4
    mlp_ratio: float = 2.0
    knn_k: int = 9
    knn_dilation: int = 2
    hf_cutoff: float = 0.1  # radial frequency (fraction of Nyquist) at and below which eq. 3 removes content
    decoder_channels: tuple[int, ...] = (32, 24, 12)  # G_v widths of the ×2 stages (finest last; stride 1)
    detail_channels: int = 16  # 0 disables the stride-2 image detail feature
    head_channels: int = 8
    head_layers: int = 3
    blend_pool: bool = True
    # ablations (paper Tables 3-5)
    mgfe: bool = True
    ppd: bool = True
    hf: bool = True
    conv: bool = True
    topo: bool = True
    ppd_stages: tuple[str, ...] = ("v", "t", "T", "blend")
    # input and inference
    in_chans: int = 3
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    mpp: float = 0.25
    tile_size: int = 256
    tile_overlap: int = 32
    min_area: int = 10
    marker_min_distance: int = 4
    distance_smooth: float = 1.0
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if self.adapter is not None and self.adapter.out_channels != self.in_chans:
            raise ValueError(f"adapter.out_channels {self.adapter.out_channels} differs from in_chans {self.in_chans}")
        self.ppd_stages = tuple(str(s) for s in self.ppd_stages)
        self.decoder_channels = tuple(int(c) for c in self.decoder_channels)
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        self.class_names = {int(k): str(v) for k, v in self.class_names.items()}
        p = self.encoder.patch_size
        if p < 4 or p & (p - 1):
            raise ValueError(f"MONCH needs a power-of-two patch size ≥ 4 (F^f is at p/2), got {p}")
        if self.encoder.in_chans != self.in_chans:
            raise ValueError(f"encoder.in_chans {self.encoder.in_chans} differs from in_chans {self.in_chans}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.dim % 2:
            raise ValueError("dim must be even (the topological branch works on dim/2 channels)")
        bad = set(self.ppd_stages) - {"v", "t", "T", "blend"}
        if bad:
            raise ValueError(f"unknown PPD stage(s) {sorted(bad)}; stages are v, t, T, blend")
        if len(self.decoder_channels) < 1:
            raise ValueError("decoder_channels needs at least one width")
        if self.num_classes < 1 or self.sentences_per_class < 1 or self.head_layers < 1:
            raise ValueError("num_classes, sentences_per_class and head_layers must be ≥ 1")
        if self.knn_k < 1 or self.knn_dilation < 1:
            raise ValueError("knn_k and knn_dilation must be ≥ 1")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {self.in_chans} values each")

    @property
    def size_multiple(self) -> int:
        """Inputs must be multiples of this (F^c is at stride 2p)."""
        return 2 * self.encoder.patch_size

    @classmethod
    def preset(cls, name: str = "cpu", **changes) -> MONCHConfig:
        """``cpu`` (small tower trained from scratch), ``clip_vit_b16``, ``plip_vit_b32``, ``conch_vit_b16``
        (the paper's backbones, Table 6; CLIP presets use CLIP's pixel statistics)."""
        if name not in ENCODER_PRESETS:
            raise InputError(None, f"unknown MONCH preset {name!r}; choose from {', '.join(ENCODER_PRESETS)}")
        enc = ENCODER_PRESETS[name]()
        base: dict = {"encoder": enc}
        if name in ("clip_vit_b16", "plip_vit_b32", "conch_vit_b16"):  # all three use OpenAI-CLIP statistics
            base.update(pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
        if enc.patch_size > 16:  # one more ×2 stage in G_v per doubling of the stride
            base["decoder_channels"] = (48,) * (int(math.log2(enc.patch_size)) - 4) + (32, 24, 12)
        base.update(changes)
        return cls(**base)


# ------------------------------------------------------------------------------------------------ §3.2 MGFE


def high_pass(x: Tensor, cutoff: float) -> Tensor:
    """Eqs. 2–3 and the inverse transform of eq. 4: ``F⁻¹(H(F(x)))`` per channel of a B×C×H×W map.

    ``H`` keeps the frequencies whose radius ``sqrt(fy² + fx²) / 0.5`` (1 = Nyquist along an axis) exceeds
    ``cutoff``; the DC term (radius 0) is always removed, so a constant map maps to zero. The cutoff is relative
    to the map's own resolution, "based on the resolution of F^f" (§3.2).
    """
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x.float(), norm="ortho")
    fy = torch.fft.fftfreq(h, device=x.device)
    fx = torch.fft.rfftfreq(w, device=x.device)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    mask = (radius > cutoff).to(spec.real.dtype)
    return torch.fft.irfft2(spec * mask, s=(h, w), norm="ortho").to(x.dtype)


def _conv_block(c_in: int, c_out: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.GroupNorm(_groups(c_out), c_out),
                         nn.GELU())


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class ConvBranch(nn.Module):
    """``F^v = conv(F^m)`` (§3.2): two 3×3 conv + GroupNorm layers, residual (deviation: the paper's conv has no
    stated residual). Also the stand-in block of Table 4's "×" rows."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(_conv_block(dim, dim), nn.Conv2d(dim, dim, 3, padding=1, bias=False),
                                  nn.GroupNorm(_groups(dim), dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class HighFrequencyEnhancement(nn.Module):
    """HF²EM (§3.2, eqs. 2–4): ``F^h = refine(F⁻¹(H(F(F^f)))) + F^f``. ``refine`` is a bias-free 3×3 conv + GELU
    (deviation: eq. 4 adds the high-pass component directly); without bias, a constant input stays unchanged."""

    def __init__(self, dim: int, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)
        self.refine = nn.Conv2d(dim, dim, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + F.gelu(self.refine(high_pass(x, self.cutoff)))


def dilated_knn(x: Tensor, k: int, dilation: int = 1) -> Tensor:
    """Dilated k-NN over feature tokens (eq. 5): B×C×N features → B×N×k neighbour indices.

    Distances ``D̂ = ‖x_i‖² − 2 x_i·x_j + ‖x_j‖²`` are taken on L2-normalised features; for each node the
    ``k·dilation`` nearest nodes (itself first, distance 0) are sorted by distance and every ``dilation``-th is
    kept: ranks 0, d, 2d, …, (k−1)d (the dilated aggregation of DeepGCNs/ViG). With fewer than ``k·dilation``
    nodes the dilation shrinks to ``N // k`` (and k to N).
    """
    n = x.shape[-1]
    k = min(k, n)
    d = max(1, min(dilation, n // k))
    xn = F.normalize(x, dim=1).transpose(1, 2)  # B×N×C
    sq = (xn * xn).sum(-1, keepdim=True)  # B×N×1
    dist = sq - 2 * xn @ xn.transpose(1, 2) + sq.transpose(1, 2)
    idx = torch.topk(-dist, k * d, dim=-1, sorted=True).indices
    return idx[..., ::d][..., :k]


def max_relative_graph_conv(x: Tensor, idx: Tensor) -> Tensor:
    """Max-relative aggregation (DeepGCNs, ViG): for node i, ``[x_i ‖ max_{j∈N(i)} (x_j − x_i)]`` (B×2C×N)."""
    b, c, n = x.shape
    k = idx.shape[-1]
    flat = idx.reshape(b, 1, n * k).expand(b, c, n * k)
    neigh = torch.gather(x, 2, flat).reshape(b, c, n, k)
    rel = (neigh - x.unsqueeze(-1)).amax(-1)
    return torch.cat([x, rel], dim=1)


class TopologicalBranch(nn.Module):
    """TSEM (§3.2, eqs. 5–6): ``F^c`` → 1×1 conv to C/2 channels (the normalised, reduced ``F^c'``) → dilated k-NN
    graph over its tokens → max-relative graph convolution → 1×1 conv back to C = ``F^k``; ``F^t = F^k + F^c``."""

    def __init__(self, dim: int, k: int = 9, dilation: int = 2):
        super().__init__()
        half = dim // 2
        self.k, self.dilation = int(k), int(dilation)
        self.reduce = nn.Sequential(nn.Conv2d(dim, half, 1, bias=False), nn.GroupNorm(_groups(half), half))
        self.graph = nn.Sequential(nn.Conv1d(2 * half, half, 1, bias=False), nn.GroupNorm(_groups(half), half),
                                   nn.GELU())
        self.expand = nn.Sequential(nn.Conv2d(half, dim, 1, bias=False), nn.GroupNorm(_groups(dim), dim))

    def neighbours(self, fc: Tensor) -> Tensor:
        """B×N×k neighbour indices of the tokens of ``fc`` (B×C×h×w), N = h·w in row-major order."""
        red = self.reduce(fc)
        return dilated_knn(red.flatten(2), self.k, self.dilation)

    def forward(self, fc: Tensor) -> Tensor:
        b, _, h, w = fc.shape
        red = self.reduce(fc).flatten(2)  # B×C/2×N
        idx = dilated_knn(red, self.k, self.dilation)
        fk = self.graph(max_relative_graph_conv(red, idx)).reshape(b, -1, h, w)
        return fc + self.expand(fk)


# ------------------------------------------------------------------------------------------------- §3.3 PPD


@functools.lru_cache(maxsize=32)
def _sine_positions_cpu(h: int, w: int, dim: int) -> Tensor:
    return _sine_positions(h, w, dim)


def sine_positions(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(h·w)×dim fixed 2-D sine/cosine encoding of normalised cell centres, so maps of different resolution that
    cover the same image get matching codes (fine queries attend to the coarse keys at their own location)."""
    return _sine_positions_cpu(h, w, dim).to(device if device is not None else "cpu")


def _sine_positions(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(1, quarter)))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    ay = ys[:, None] * freq[None] * 2 * math.pi * 8
    ax = xs[:, None] * freq[None] * 2 * math.pi * 8
    py = torch.cat([ay.sin(), ay.cos()], 1)[:, None, :].expand(h, w, 2 * quarter)
    px = torch.cat([ax.sin(), ax.cos()], 1)[None, :, :].expand(h, w, 2 * quarter)
    pos = torch.cat([py, px], -1).reshape(h * w, 4 * quarter)
    return F.pad(pos, (0, dim - 4 * quarter))


class CrossAttentionStage(nn.Module):
    """One PPD stage, eq. 7: ``softmax(g_q(Q) g_k(K)ᵀ / √d_k) g_v(K)`` with ``heads`` heads, as a pre-norm residual
    decoder layer (+ MLP; the residual and MLP are ours, so a stage refines its query instead of replacing it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.g_q = nn.Linear(dim, dim)
        self.g_k = nn.Linear(dim, dim)
        self.g_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), "gelu")

    def forward(self, query: Tensor, kv: Tensor, q_pos: Tensor | None = None, kv_pos: Tensor | None = None
                ) -> Tensor:
        """B×Nq×C queries, B×Nk×C keys/values (positions: Nq×C / Nk×C or None) → B×Nq×C."""
        b, nq, c = query.shape
        nk = kv.shape[1]
        qn, kvn = self.norm_q(query), self.norm_kv(kv)
        q = self.g_q(qn if q_pos is None else qn + q_pos)
        k = self.g_k(kvn if kv_pos is None else kvn + kv_pos)
        v = self.g_v(kvn)
        hd = c // self.heads
        q = q.reshape(b, nq, self.heads, hd).transpose(1, 2)
        k = k.reshape(b, nk, self.heads, hd).transpose(1, 2)
        v = v.reshape(b, nk, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, nq, c)
        x = query + self.proj(out)
        return x + self.mlp(self.norm_mlp(x))


class FPNBlend(nn.Module):
    """The FPN-like fusion block of Fig. 1: lateral 1×1 convs on (coarse, middle, fine), top-down ×2 upsampling
    and addition, a 3×3 output conv at the fine resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(3))
        self.out = _conv_block(dim, dim)

    def forward(self, coarse: Tensor, middle: Tensor, fine: Tensor) -> Tensor:
        x = self.lateral[0](coarse)
        x = self.lateral[1](middle) + F.interpolate(x, size=middle.shape[-2:], mode="bilinear", align_corners=False)
        x = self.lateral[2](fine) + F.interpolate(x, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(x)


# ------------------------------------------------------------------------------------------------ §3.4 head


class DynamicConvHead(nn.Module):
    """Eq. 8: ``G_conv(G_reshape(G_v(F)), G_weight(G_linear(F_T)))`` for K = N + 1 classes.

    ``G_linear`` projects each class's text feature; the controller ``G_weight`` maps [text feature ‖ image
    feature] to the weights and biases of ``layers`` 1×1 convolutions (c→c, …, c→1); the B×c×H×W visual feature
    is reshaped to (1, B·K·c, H, W) and convolved with groups = B·K, giving one logit map per (image, class).
    A learned per-class bias (initialised to a low foreground prior) is added.
    """

    def __init__(self, text_dim: int, image_dim: int, dim: int, channels: int, layers: int, num_masks: int):
        super().__init__()
        self.c, self.layers = int(channels), int(layers)
        self.shapes: list[tuple[int, int]] = [(self.c, self.c)] * (self.layers - 1) + [(1, self.c)]
        self.n_params = sum(o * i + o for o, i in self.shapes)
        self.g_linear = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        self.g_weight = nn.Linear(2 * dim, self.n_params)
        self.class_bias = nn.Parameter(torch.full((num_masks,), -2.0))
        # Small input-dependent part around a Kaiming-scaled static part (the controller's bias), so the dynamic
        # convolution starts as a sensible random conv that text and image then modulate.
        nn.init.normal_(self.g_weight.weight, std=0.02)
        with torch.no_grad():
            bias = torch.zeros(self.n_params)
            pos = 0
            for o, i in self.shapes:
                bias[pos:pos + o * i] = torch.randn(o * i) * math.sqrt(2.0 / i)
                pos += o * i + o
            self.g_weight.bias.copy_(bias)

    def params(self, text: Tensor, image: Tensor) -> Tensor:
        """K×T text features and B×E image features → B×K×n_params dynamic parameters."""
        t = self.g_linear(text)  # K×d
        g = self.image_proj(image)  # B×d
        b, k = g.shape[0], t.shape[0]
        z = torch.cat([t[None].expand(b, k, -1), g[:, None].expand(b, k, -1)], dim=-1)
        return self.g_weight(z)

    def _layers(self, theta: Tensor):
        """Yield (weight B×K×o×i, bias B×K×o) of each dynamic layer from the flat parameters."""
        pos = 0
        for o, i in self.shapes:
            wgt = theta[..., pos:pos + o * i].unflatten(-1, (o, i))
            pos += o * i
            yield wgt, theta[..., pos:pos + o]
            pos += o

    def forward(self, feat: Tensor, text: Tensor, image: Tensor) -> Tensor:
        """B×c×H×W visual feature → B×K×H×W logits. Computed with batched matrix products, which is the grouped
        1×1 convolution of eq. 8 (:meth:`forward_grouped`) without materialising K copies of the input."""
        b, c, h, w = feat.shape
        theta = self.params(text, image)
        k = theta.shape[1]
        x = feat.reshape(b, c, h * w)
        for li, (wgt, bias) in enumerate(self._layers(theta)):
            o = wgt.shape[2]
            if li == 0:  # every class reads the same input: one (K·o)×c product per image
                x = torch.bmm(wgt.reshape(b, k * o, c), x).reshape(b * k, o, h * w)
            else:
                x = torch.bmm(wgt.reshape(b * k, o, -1), x)
            x = x + bias.reshape(b * k, o, 1)
            if li < self.layers - 1:
                x = F.relu(x)
        return x.reshape(b, k, h, w) + self.class_bias[None, :, None, None]

    def forward_grouped(self, feat: Tensor, text: Tensor, image: Tensor) -> Tensor:
        """Eq. 8 literally: reshape to (1, B·K·c, H, W) and run grouped convolutions (groups = B·K)."""
        b, c, h, w = feat.shape
        theta = self.params(text, image)
        k = theta.shape[1]
        x = feat[:, None].expand(b, k, c, h, w).reshape(1, b * k * c, h, w)
        for li, (wgt, bias) in enumerate(self._layers(theta)):
            o, i = wgt.shape[2:]
            x = F.conv2d(x, wgt.reshape(b * k * o, i, 1, 1), bias.reshape(b * k * o), groups=b * k)
            if li < self.layers - 1:
                x = F.relu(x)
        return x.reshape(b, k, h, w) + self.class_bias[None, :, None, None]


class Decoder(nn.Module):
    """``G_v``: a 1×1 conv reducing the merged fine feature (stride ``fine_stride``) to ``widths[0]`` channels, then
    ×2 bilinear upsampling + 3×3 conv stages down to stride 1 (the finest ``log2(fine_stride)`` of ``widths``);
    where the running stride reaches 2 the image detail feature (3×3 conv at stride 1, stride-2 3×3 conv; see the
    module docstring) is concatenated; a 1×1 conv gives the head's ``out_channels``."""

    def __init__(self, dim: int, fine_stride: int, widths: Sequence[int], detail: int, out_channels: int,
                 in_chans: int = 3):
        super().__init__()
        n_up = int(math.log2(fine_stride))
        widths = list(widths)
        if len(widths) < n_up:  # repeat the coarsest width for extra stages (larger patch sizes)
            widths = [widths[0]] * (n_up - len(widths)) + widths
        widths = widths[len(widths) - n_up:] if n_up else widths[-1:]
        self.fine_stride = int(fine_stride)
        self.reduce = _conv_block(dim, widths[0], k=1)
        self.use_detail = detail > 0
        if self.use_detail:
            half = max(4, detail // 2)
            self.detail = nn.Sequential(_conv_block(in_chans, half),
                                        nn.Conv2d(half, detail, 3, stride=2, padding=1, bias=False),
                                        nn.GroupNorm(_groups(detail), detail), nn.GELU())
        self.stages = nn.ModuleList()
        c, stride = widths[0], self.fine_stride
        if self.use_detail and stride == 2:
            c += detail
        for width in widths[:n_up]:
            stride //= 2
            extra = detail if (self.use_detail and stride == 2) else 0
            self.stages.append(_conv_block(c + extra, width))
            c = width
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        x = self.reduce(x)
        detail = self.detail(image) if self.use_detail else None
        stride = self.fine_stride
        if detail is not None and stride == 2:
            x = torch.cat([x, detail], 1)
        for stage in self.stages:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            stride //= 2
            if detail is not None and stride == 2:
                x = torch.cat([x, detail], 1)
            x = stage(x)
        return self.out(x)


# ----------------------------------------------------------------------------------------------------- model


class MONCH(nn.Module):
    """The MONCH network: B×3×H×W normalised images → B×(N+1)×H×W per-class logits (see the module docstring)."""

    def __init__(self, config: MONCHConfig | None = None):
        super().__init__()
        cfg = config if config is not None else MONCHConfig()
        self.config = cfg
        e, d = cfg.encoder.embed_dim, cfg.dim
        k_masks = cfg.num_classes + 1
        self.adapter = ChannelAdapter(cfg.adapter) if cfg.adapter is not None else None
        self.encoder = ViT(cfg.encoder)
        self.neck = nn.Sequential(LayerNorm2d(e), nn.Conv2d(e, d, 1))  # token map → F^m
        self.upscale = nn.Sequential(nn.ConvTranspose2d(d, d, 2, stride=2), nn.GroupNorm(_groups(d), d), nn.GELU())
        self.downscale = nn.Sequential(nn.Conv2d(d, d, 3, stride=2, padding=1), nn.GroupNorm(_groups(d), d),
                                       nn.GELU())
        if cfg.mgfe:
            self.hf = HighFrequencyEnhancement(d, cfg.hf_cutoff) if cfg.hf else ConvBranch(d)
            if cfg.conv:
                self.conv_branch = ConvBranch(d)
            self.topo = TopologicalBranch(d, cfg.knn_k, cfg.knn_dilation) if cfg.topo else ConvBranch(d)
        self.fuse = FPNBlend(d)
        if cfg.ppd:
            self.text_proj = nn.Linear(cfg.text_dim, d)
            self.stages = nn.ModuleDict({s: CrossAttentionStage(d, cfg.heads, cfg.mlp_ratio) for s in cfg.ppd_stages})
            self.merge = _conv_block(2 * d, d, k=1)
        self.decoder = Decoder(d, cfg.encoder.patch_size // 2, cfg.decoder_channels, cfg.detail_channels,
                               cfg.head_channels, cfg.in_chans)
        self.head = DynamicConvHead(cfg.text_dim, e, d, cfg.head_channels, cfg.head_layers, k_masks)
        self.register_buffer("text_embeddings", torch.zeros(k_masks, cfg.sentences_per_class, cfg.text_dim))

    # ---- text

    def set_text_embeddings(self, embeddings: np.ndarray | Tensor) -> None:
        """Store the frozen (N+1)×S×T sentence embeddings (row 0 = background); rows are L2-normalised."""
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if tuple(emb.shape) != tuple(self.text_embeddings.shape):
            raise InputError(None, f"text embeddings of shape {tuple(emb.shape)} do not fit the model's "
                                   f"{tuple(self.text_embeddings.shape)} (classes + 1, sentences, text dim)")
        self.text_embeddings.copy_(F.normalize(emb, dim=-1))

    def class_text(self) -> Tensor:
        """K×T class features F_T: the normalised mean of each class's sentence embeddings (prompt ensembling)."""
        return F.normalize(self.text_embeddings.mean(1), dim=-1)

    # ---- image

    def load_image_encoder(self, path: str | os.PathLike, layout: str = "auto", strip_prefix: str = "") -> LoadReport:
        """Load CLIP / PLIP (OpenAI-CLIP ``visual.*`` layout) or CONCH (``strip_prefix="visual.trunk."``,
        ``layout="timm"``) image-tower weights from a local file into the encoder (:func:`load_vit_weights`)."""
        if not strip_prefix:
            return load_vit_weights(self.encoder, path, layout=layout)
        sd = {k[len(strip_prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(strip_prefix)}
        if not sd:
            raise InputError(path, f"no key starts with {strip_prefix!r}")
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / "encoder.pt"
            torch.save(sd, tmp_path)
            return load_vit_weights(self.encoder, tmp_path, layout=layout)

    def _check_size(self, x: Tensor) -> None:
        m = self.config.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise InputError(None, f"MONCH input sides must be multiples of {m}, got {tuple(x.shape[-2:])}")

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Every intermediate of the forward pass (B×C×h×w maps unless noted), for inspection and tests:
        ``F_m, F_f, F_c`` (eq. 1), ``F_h, F_v, F_t`` (MGFE), ``text`` (K·S×C tokens of F^T), ``blend``, the PPD
        stage outputs ``X_v, X_t, X_T, X_blend`` (where enabled), ``merged``, ``decoded`` (B×c×H×W), ``logits``."""
        cfg = self.config
        if self.adapter is not None:
            x = self.adapter(x)
        self._check_size(x)
        out: dict[str, Tensor] = {}
        enc = self.encoder.forward_features(x)
        tokens = enc.features.permute(0, 3, 1, 2)
        glob = enc.cls if enc.cls is not None else enc.features.mean(dim=(1, 2))
        fm = self.neck(tokens)
        ff, fc = self.upscale(fm), self.downscale(fm)
        out.update(F_m=fm, F_f=ff, F_c=fc)
        if cfg.mgfe:
            fh = self.hf(ff)
            fv = self.conv_branch(fm) if cfg.conv else fm
            ft = self.topo(fc)
        else:
            fh, fv, ft = ff, fm, fc
        out.update(F_h=fh, F_v=fv, F_t=ft)
        if cfg.ppd:
            blend = self.fuse(fc, fm, ff)
            out["blend"] = blend
            merged = self._progressive(fh, fv, ft, blend, out)
        else:  # Table 3 "without PPD": the enhanced features fused by the FPN block alone
            merged = self.fuse(ft, fv, fh)
        out["merged"] = merged
        dec = self.decoder(merged, x)
        out["decoded"] = dec
        out["logits"] = self.head(dec, self.class_text(), glob)
        return out

    def _progressive(self, fh: Tensor, fv: Tensor, ft: Tensor, blend: Tensor, out: dict[str, Tensor]) -> Tensor:
        """§3.3: F^h queries F^v, the result queries F^t, then the text F^T, then the blended feature; a stage left
        out of ``ppd_stages`` passes its query on unchanged (Table 5's "×")."""
        b, c, h, w = fh.shape
        dev = fh.device
        x = fh.flatten(2).transpose(1, 2)
        q_pos = sine_positions(h, w, c, dev)
        text = self.text_proj(self.text_embeddings.flatten(0, 1))  # K·S×C
        out["text"] = text
        bl = F.avg_pool2d(blend, 2) if self.config.blend_pool and min(blend.shape[-2:]) >= 2 else blend
        keys = {"v": fv, "t": ft, "T": None, "blend": bl}
        for name in ("v", "t", "T", "blend"):
            if name not in self.stages:
                continue
            if name == "T":
                kv, kv_pos = text[None].expand(b, -1, -1), None
            else:
                m = keys[name]
                kv, kv_pos = m.flatten(2).transpose(1, 2), sine_positions(m.shape[-2], m.shape[-1], c, dev)
            x = self.stages[name](x, kv, q_pos, kv_pos)
            out[f"X_{name}"] = x.transpose(1, 2).reshape(b, c, h, w)
        xmap = x.transpose(1, 2).reshape(b, c, h, w)
        return self.merge(torch.cat([xmap, blend], 1))

    def forward(self, x: Tensor) -> Tensor:
        """B×3×H×W normalised images (sides multiples of ``config.size_multiple``) → B×(N+1)×H×W logits."""
        return self.features(x)["logits"]


# ----------------------------------------------------------------------------------------------------- loss


def semantic_targets(types: Tensor, num_classes: int, instances: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One-hot B×(N+1)×H×W targets of a class map (0 = background) and the matching loss weights.

    Nuclei of unknown class (``instances > 0`` but ``types == 0``, from datasets used class-agnostically) are
    known *not* to be background: channel 0 is supervised with 0 there, the class channels are ignored (weight 0).
    """
    k = num_classes + 1
    top = int(types.max()) if types.numel() else 0
    if top > num_classes:
        raise InputError(None, f"class map holds label {top} > num_classes {num_classes}")
    target = F.one_hot(types.long(), k).permute(0, 3, 1, 2).float()
    weight = torch.ones_like(target)
    if instances is not None:
        unknown = (instances > 0) & (types == 0)
        if bool(unknown.any()):
            target[:, 0] = target[:, 0].masked_fill(unknown, 0.0)
            weight[:, 1:] = weight[:, 1:] * (~unknown)[:, None].to(weight.dtype)
    return target, weight


def per_class_bce(logits: Tensor, types: Tensor, instances: Tensor | None = None) -> Tensor:
    """Eq. 9: binary cross-entropy of every class mask (background included), averaged over classes, pixels and
    images; pixels of unknown-class nuclei are ignored in the class channels (:func:`semantic_targets`)."""
    target, weight = semantic_targets(types, logits.shape[1] - 1, instances)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ inference


@dataclass
class SemanticSegmentation:
    """A semantic result: the H×W class map (0 = background), the (N+1)×H×W per-class sigmoid probabilities and
    per-class area statistics (:meth:`area_table`)."""

    class_map: np.ndarray
    probabilities: np.ndarray
    class_names: dict[int, str] = field(default_factory=dict)
    mpp: float | None = None
    name: str = ""
    model: str = ""

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[0]) - 1

    def area_table(self) -> pd.DataFrame:
        """One row per class 1..N: pixels, fraction of the image, fraction of all nuclear pixels, area in µm²
        (``area_um2``, only when the pixel size is known, as in instance tables), connected regions and the mean
        probability of the class over its pixels."""
        cm = np.asarray(self.class_map)
        total = cm.size
        nuclear = int((cm > 0).sum())
        counts = np.bincount(cm.ravel(), minlength=self.num_classes + 1)
        rows = []
        for c in range(1, self.num_classes + 1):
            px = int(counts[c])
            mask = cm == c
            rows.append({
                "class_id": c, "class_name": self.class_names.get(c, ""), "pixels": px,
                "fraction_of_image": px / total if total else float("nan"),
                "fraction_of_nuclei": px / nuclear if nuclear else float("nan"),
                **({"area_um2": px * self.mpp ** 2} if self.mpp else {}),
                "regions": int(ndi.label(mask)[1]) if px else 0,
                "mean_probability": float(self.probabilities[c][mask].mean()) if px else float("nan"),
            })
        return pd.DataFrame(rows)


@torch.no_grad()
def tiled_probabilities(net: nn.Module, x: Tensor, *, tile: int = 256, overlap: int = 32, multiple: int = 16
                        ) -> Tensor:
    """Per-class sigmoid probabilities (K×H×W) of one normalised 1×C×H×W image.

    Images up to ``tile`` per side run in one pass (reflect-padded to a multiple of ``multiple``); larger ones run
    on overlapping ``tile``² windows whose probabilities are averaged (attention cost is quadratic in tokens).
    """
    _, _, h, w = x.shape
    tile = max(multiple, tile - tile % multiple)
    if h <= tile and w <= tile:
        ph, pw = -h % multiple, -w % multiple
        xp = _pad(x, ph, pw)
        return torch.sigmoid(net(xp))[0, :, :h, :w]
    ph, pw = max(0, tile - h), max(0, tile - w)
    xp = _pad(x, ph, pw)
    hh, ww = xp.shape[-2:]
    stride = max(multiple, tile - overlap)
    ys = _starts(hh, tile, stride)
    xs = _starts(ww, tile, stride)
    acc = None
    count = torch.zeros(1, hh, ww, device=x.device)
    for y0 in ys:
        for x0 in xs:
            p = torch.sigmoid(net(xp[:, :, y0:y0 + tile, x0:x0 + tile]))[0]
            if acc is None:
                acc = torch.zeros(p.shape[0], hh, ww, device=x.device)
            acc[:, y0:y0 + tile, x0:x0 + tile] += p
            count[:, y0:y0 + tile, x0:x0 + tile] += 1
    return (acc / count)[:, :h, :w]


def _pad(x: Tensor, ph: int, pw: int) -> Tensor:
    if not (ph or pw):
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def seed_instances(class_map: np.ndarray, probabilities: np.ndarray | None = None, *, min_area: int = 10,
                   min_distance: int = 4, distance_smooth: float = 1.0
                   ) -> tuple[np.ndarray, dict[int, int], dict[int, float]]:
    """Instances from a semantic map (issue: "semantic maps can also seed instances").

    Foreground = class > 0; connected components are split by a marker watershed on the (smoothed) distance
    transform, markers = its local maxima at least ``min_distance`` px apart; a component without a marker stays
    one instance; instances under ``min_area`` px are dropped. Each instance takes the majority class of its
    pixels; its score is the mean probability of that class over them (1.0 without probabilities).
    Returns (H×W int32 instance map, {id: class}, {id: score}).
    """
    from skimage import filters, segmentation
    from skimage.feature import peak_local_max

    cm = np.asarray(class_map)
    fg = cm > 0
    if not fg.any():
        return np.zeros(cm.shape, np.int32), {}, {}
    dist = ndi.distance_transform_edt(fg)
    if distance_smooth > 0:
        dist = filters.gaussian(dist, distance_smooth)
    comps, _ = ndi.label(fg)
    md = max(1, int(min_distance))
    peaks = peak_local_max(dist, min_distance=md, footprint=np.ones((2 * md + 1,) * 2, bool), labels=comps,
                           exclude_border=False)
    markers = np.zeros(cm.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = segmentation.watershed(-dist, markers, mask=fg)
    rest, _ = ndi.label(fg & (labels == 0))
    labels = np.where(rest > 0, rest + labels.max(), labels)
    labels = remove_small_instances(labels, max(1, int(min_area)))
    n = int(labels.max())
    if n == 0:
        return labels, {}, {}
    k = int(cm.max()) + 1
    votes = np.bincount(labels.ravel() * k + cm.ravel(), minlength=(n + 1) * k).reshape(n + 1, k)
    votes[:, 0] = 0
    cls = votes.argmax(1)
    classes = {i: int(cls[i]) for i in range(1, n + 1)}
    if probabilities is None:
        scores = dict.fromkeys(classes, 1.0)
    else:
        prob = np.asarray(probabilities)
        chosen = prob[cls[labels], np.arange(cm.shape[0])[:, None], np.arange(cm.shape[1])[None, :]]
        sums = np.bincount(labels.ravel(), weights=chosen.ravel(), minlength=n + 1)
        area = np.bincount(labels.ravel(), minlength=n + 1)
        scores = {i: float(sums[i] / area[i]) for i in range(1, n + 1)}
    return labels, classes, scores


class SemanticModel(InstanceModel):
    """A semantic segmenter as a karyo model: ``segment_semantic`` gives the class map, ``segment`` (the
    :class:`InstanceModel` API, so ``karyo segment`` and ``karyo evaluate`` work) seeds instances from it.

    Subclasses set ``net`` (an ``nn.Module`` mapping normalised images to (N+1)-channel logits) and ``weights_file``.
    """

    weights_file = "weights.pt"
    net: nn.Module

    def __init__(self, config=None, device: str = "cpu"):
        super().__init__(config)
        self.device = pick_device(device)

    @property
    def size_multiple(self) -> int:
        return int(self.config.size_multiple)

    @classmethod
    def _from_config(cls, config, directory: Path | None, device: str = "cpu") -> SemanticModel:
        model = cls(config, device=device)
        if directory is not None:
            state = read_state_dict(directory / cls.weights_file)
            model.net.load_state_dict(state)
        return model

    def _save_weights(self, directory: Path) -> None:
        from karyo.data.io import atomic_path

        with atomic_path(directory / self.weights_file) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, tmp)

    def _prepare(self, image: np.ndarray, name: str, channel_names: Sequence[str] | None = None) -> Tensor:
        cfg = self.config
        return model_input(image, cfg.in_chans, cfg.pixel_mean, cfg.pixel_std, name or None,
                           adapter=getattr(cfg, "adapter", None), channel_names=channel_names)

    @torch.no_grad()
    def predict_probabilities(self, image: np.ndarray, mpp: float | None = None, name: str = "",
                              channel_names: Sequence[str] | None = None) -> np.ndarray:
        """(N+1)×H×W per-class probabilities at the image's own resolution (resampled to the model's ``mpp``)."""
        cfg = self.config
        self.net.eval()
        x = self._prepare(image, name, channel_names)
        h0, w0 = x.shape[-2:]
        x, _ = resample_to_model(x, mpp, cfg.mpp, name or None)
        prob = tiled_probabilities(self.net, x.to(self.device), tile=cfg.tile_size, overlap=cfg.tile_overlap,
                                   multiple=self.size_multiple)
        if prob.shape[-2:] != (h0, w0):
            prob = F.interpolate(prob[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
        return prob.float().cpu().numpy()

    def segment_semantic(self, image: np.ndarray, *, mpp: float | None = None, name: str = "",
                         channel_names: Sequence[str] | None = None) -> SemanticSegmentation:
        """Class map (argmax of the per-class probabilities), probabilities and area statistics of one image."""
        prob = self.predict_probabilities(image, mpp=mpp, name=name, channel_names=channel_names)
        names = self.class_names or {}
        return SemanticSegmentation(prob.argmax(0).astype(np.int32), prob, dict(names),
                                    mpp=mpp or None, name=name, model=self.arch)  # unknown stays unknown

    def segment(self, image: np.ndarray, *, points: Sequence[tuple[float, float]] | None = None,
                negative: Sequence[tuple[float, float]] | None = None, mpp: float | None = None,
                name: str = "", channel_names: Sequence[str] | None = None) -> SegmentationResult:
        """Instances seeded from the semantic map (:func:`seed_instances`); point prompts are not supported."""
        if points is not None or negative is not None:
            raise InputError(None, f"the {self.arch} model is not promptable; run it without points (no --points; "
                                   f"in Python, no points= or negative=)")
        sem = self.segment_semantic(image, mpp=mpp, name=name, channel_names=channel_names)
        cfg = self.config
        scale = 1.0 if mpp is None or mpp <= 0 else cfg.mpp / float(mpp)  # pixel parameters are at the model's mpp
        inst, classes, scores = seed_instances(sem.class_map, sem.probabilities,
                                               min_area=max(1, round(cfg.min_area * scale * scale)),
                                               min_distance=max(1, round(cfg.marker_min_distance * scale)),
                                               distance_smooth=cfg.distance_smooth * scale)
        return finish(SegmentationResult(inst, classes=classes, scores=scores, class_names=self.class_names,
                                         name=name, model=self.arch), None, mpp)


@register
class MONCHModel(SemanticModel):
    """A trained MONCH network as a karyo model (folder: ``config.json`` + ``monch.pt``)."""

    arch = "monch"
    config_class = MONCHConfig
    weights_file = "monch.pt"

    def __init__(self, config: MONCHConfig | None = None, device: str = "cpu", net: MONCH | None = None):
        super().__init__(config, device=device)
        self.net = (net if net is not None else MONCH(self.config)).to(self.device).eval()


def with_ablation(config: MONCHConfig, name: str) -> MONCHConfig:
    """The paper's ablations by name: ``full``, ``no_mgfe``, ``no_ppd``, ``no_hf``, ``no_conv``, ``no_topo``."""
    changes = {"full": {}, "no_mgfe": {"mgfe": False}, "no_ppd": {"ppd": False}, "no_hf": {"hf": False},
               "no_conv": {"conv": False}, "no_topo": {"topo": False}}
    if name not in changes:
        raise InputError(None, f"unknown ablation {name!r}; choose from {', '.join(changes)}")
    return dataclasses.replace(config, **changes[name])
