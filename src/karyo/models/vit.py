"""One Vision Transformer for karyo: SAM's image encoder, a CellViT-style encoder and a CLIP-style image tower.

Layout and behaviour follow Segment Anything's ``ImageEncoderViT`` (Kirillov et al. 2023), itself ViTDet (Li et al.
2022): tokens are kept channels-last as a B×H'×W'×C map, blocks may use windowed attention (zero padding + window
partition) and decomposed relative positions, and absolute position embeddings are a (1, H/p, W/p, C) grid. Module
and parameter names are SAM's, so SAM checkpoints load with an identity key map; :func:`timm_to_vit` /
:func:`vit_to_timm` and :func:`clip_to_vit` / :func:`vit_to_clip` convert timm and OpenAI-CLIP visual towers.

Additions beyond SAM's encoder (all off by default, so a SAM config builds exactly SAM's parameters):
``class_token`` (with its own position embedding ``cls_pos_embed``), ``pre_norm`` (CLIP's ``ln_pre``),
``final_norm``, ``proj_dim`` (CLIP's bias-free projection of the class token), ``out_indices`` (intermediate block
outputs, for CellViT skip connections), ``drop_path`` and a convolutional ``"stem"`` patch embedding.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from karyo.errors import InputError
from karyo.models.layers import DropPath, LayerNorm2d, MLPBlock

__all__ = [
    "Attention",
    "Block",
    "LoadReport",
    "PatchEmbed",
    "ViT",
    "ViTConfig",
    "ViTOutput",
    "clip_to_vit",
    "detect_layout",
    "get_rel_pos",
    "load_vit_weights",
    "read_state_dict",
    "timm_to_vit",
    "vit_to_clip",
    "vit_to_timm",
    "window_partition",
    "window_unpartition",
]

log = logging.getLogger(__name__)


@dataclass
class ViTConfig:
    """Architecture of a :class:`ViT`; the defaults are ViT-B/16 at 224 px without class token.

    ``window_size`` 0 means global attention everywhere; otherwise every block not listed in
    ``global_attn_indexes`` attends within non-overlapping windows of that many tokens (SAM/ViTDet).
    ``patch_embed`` ``"conv"`` is SAM/timm's single k=s=patch convolution; ``"stem"`` is a stack of stride-2 3×3
    convolutions (LayerNorm2d + GELU between them) reaching the same stride — a convolutional stem trains from
    scratch far more data-efficiently than a patchify layer (Xiao et al. 2021, "Early convolutions help
    transformers see better"); it needs a power-of-two ``patch_size``.
    ``norm_eps`` is 1e-6 for SAM and timm, 1e-5 for OpenAI CLIP. ``act`` is ``"gelu"`` or ``"quick_gelu"`` (CLIP).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = False
    rel_pos_zero_init: bool = True
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    class_token: bool = False
    pre_norm: bool = False
    final_norm: bool = False
    out_indices: tuple[int, ...] = ()
    drop_path: float = 0.0
    patch_embed: str = "conv"
    patch_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    proj_dim: int = 0

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        self.out_indices = tuple(int(i) for i in self.out_indices)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_embed not in ("conv", "stem"):
            raise ValueError(f"patch_embed must be 'conv' or 'stem', got {self.patch_embed!r}")
        if self.patch_embed == "stem" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"a 'stem' patch embedding needs a power-of-two patch_size ≥ 2, got {self.patch_size}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")
        bad = [i for i in (*self.out_indices, *self.global_attn_indexes) if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"block indexes {bad} are outside 0..{self.depth - 1}")
        if self.class_token and (self.use_rel_pos or self.window_size > 0):
            raise ValueError("class_token cannot be combined with relative positions or windowed attention")
        if self.window_size < 0:
            raise ValueError(f"window_size must be ≥ 0, got {self.window_size}")

    @property
    def grid_size(self) -> int:
        """Tokens per side at ``img_size``."""
        return self.img_size // self.patch_size

    def block_window(self, i: int) -> int:
        """Window size of block ``i`` (0 = global)."""
        return 0 if i in self.global_attn_indexes else self.window_size


class ViTOutput(NamedTuple):
    """Everything a forward pass computes: the final map, requested intermediates and the class token."""

    features: Tensor  # B×H'×W'×C, after the final norm when configured
    intermediates: list[Tensor]  # outputs of the blocks in out_indices, B×H'×W'×C each
    cls: Tensor | None  # B×C final class token (after the final norm), None without class token


# ----------------------------------------------------------------------------------------------------- attention


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """B×H×W×C → (B·nW)×ws×ws×C windows, zero-padding H and W up to multiples of ``window_size`` (ViTDet/SAM)."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`, dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if (hp, wp) != (h, w) else x


def get_rel_pos(size: int, rel_pos: Tensor) -> Tensor:
    """size×size×C table of relative-position embeddings for query/key offsets (q − k) along one axis.

    ``rel_pos`` holds one row per offset, −(L−1)..(L−1); when it was trained for another length it is resampled
    linearly to 2·size−1 rows, as SAM does to run a 1024-px checkpoint at other resolutions.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + (size - 1)]


def rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, hw: tuple[int, int]) -> Tensor:
    """Decomposed relative-position attention bias (MViTv2 / SAM): B×nH×N×N from the *unscaled* queries."""
    h, w = hw
    b, nh, _, hd = q.shape
    rh = get_rel_pos(h, rel_pos_h)  # h×h×hd
    rw = get_rel_pos(w, rel_pos_w)  # w×w×hd
    r_q = q.reshape(b, nh, h, w, hd)
    # einsum returns permuted views; made contiguous (cheap: N×h values) the broadcast sum below comes out
    # contiguous too, instead of inheriting their layout and costing a second full copy of the N×N bias.
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).contiguous()
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).contiguous()
    return (bias_h[..., :, None] + bias_w[..., None, :]).view(b, nh, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention over a B×H×W×C map (optionally with decomposed relative positions) or a B×L×C
    sequence (plain global attention, used with a class token). Names: ``qkv``, ``proj``, ``rel_pos_h/w`` (SAM)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: tuple[int, int] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the attention's input size")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        spatial = x.ndim == 4
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        elif self.use_rel_pos:
            raise ValueError("relative positions need a B×H×W×C input")
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))
        return out.view(b, h, w, c) if spatial else out


class Block(nn.Module):
    """Pre-norm transformer block with optional window attention (SAM's ``Block``: norm1, attn, norm2, mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 use_rel_pos: bool = False, rel_pos_zero_init: bool = True, window_size: int = 0,
                 input_size: tuple[int, int] | None = None, drop_path: float = 0.0, act: str = "gelu",
                 norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init,
                              (window_size, window_size) if window_size > 0 else input_size)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            if x.ndim != 4:
                raise ValueError("windowed attention needs a B×H×W×C input")
            hw = (x.shape[1], x.shape[2])
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Image → B×H/p×W/p×C tokens. ``"conv"``: one k=s=p convolution (SAM/timm ``patch_embed.proj``);
    ``"stem"``: log2(p)−1 stride-2 3×3 convolutions (``stem.*``) then a stride-2 3×3 ``proj``."""

    def __init__(self, kind: str = "conv", patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True):
        super().__init__()
        if kind == "conv":
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
            return
        n = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(1, n):
            c = max(embed_dim // 2 ** (n - i), 8)
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), LayerNorm2d(c), nn.GELU()]
            c_in = c
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, 3, stride=2, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "stem"):
            x = self.stem(x)
        return self.proj(x).permute(0, 2, 3, 1)


class ViT(nn.Module):
    """Vision Transformer in SAM's image-encoder layout (see the module docstring)."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        cfg = config if config is not None else ViTConfig()
        self.config = cfg
        dim, g = cfg.embed_dim, cfg.grid_size
        self.patch_embed = PatchEmbed(cfg.patch_embed, cfg.patch_size, cfg.in_chans, dim, cfg.patch_bias)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, g, g, dim))
            if cfg.class_token:
                self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.pre_norm:
            self.norm_pre = nn.LayerNorm(dim, eps=cfg.norm_eps)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as timm
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.use_rel_pos, cfg.rel_pos_zero_init,
                  cfg.block_window(i), (g, g), rates[i], cfg.act, cfg.norm_eps)
            for i in range(cfg.depth))
        if cfg.final_norm:
            self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        if cfg.proj_dim:
            self.proj = nn.Linear(dim, cfg.proj_dim, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT initialisation (truncated normal 0.02 for linears and embeddings) for training from scratch;
        SAM zero-initialises ``pos_embed`` but only ships trained weights, so this choice never reaches them."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name in ("pos_embed", "cls_pos_embed"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)
        if hasattr(self, "cls_token"):
            nn.init.normal_(self.cls_token, std=1e-6)

    @property
    def stride(self) -> int:
        return self.config.patch_size

    def pos_embed_at(self, h: int, w: int) -> Tensor:
        """Absolute position embeddings for an h×w token grid (bicubic resampling when it differs from training)."""
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def forward_features(self, x: Tensor) -> ViTOutput:
        """B×C×H×W image → :class:`ViTOutput` (final map, intermediates of ``out_indices``, class token)."""
        cfg = self.config
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        if cfg.use_abs_pos:
            x = x + self.pos_embed_at(h, w)
        if cfg.class_token:
            cls = self.cls_token.expand(b, -1, -1)
            if cfg.use_abs_pos:
                cls = cls + self.cls_pos_embed
            x = torch.cat([cls, x.reshape(b, h * w, c)], dim=1)
        if cfg.pre_norm:
            x = self.norm_pre(x)
        wanted = set(cfg.out_indices)
        inter: dict[int, Tensor] = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                inter[i] = self._spatial(x, h, w)
        if cfg.final_norm:
            x = self.norm(x)
        cls_out = x[:, 0] if cfg.class_token else None
        return ViTOutput(self._spatial(x, h, w), [inter[i] for i in cfg.out_indices], cls_out)

    def _spatial(self, x: Tensor, h: int, w: int) -> Tensor:
        if self.config.class_token:
            return x[:, 1:].reshape(x.shape[0], h, w, x.shape[-1])
        return x

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, list[Tensor]]:
        """B×C×H×W → B×H'×W'×C features, plus the ``out_indices`` block outputs when any are configured."""
        out = self.forward_features(x)
        return (out.features, out.intermediates) if self.config.out_indices else out.features

    def encode(self, x: Tensor) -> Tensor:
        """Pooled image embedding (CLIP's image tower): final class token (or mean token), projected if configured."""
        out = self.forward_features(x)
        pooled = out.cls if out.cls is not None else out.features.mean(dim=(1, 2))
        return self.proj(pooled) if self.config.proj_dim else pooled


# --------------------------------------------------------------------------------------------------- key mappers

_TIMM_TO_KARYO = ((".mlp.fc1.", ".mlp.lin1."), (".mlp.fc2.", ".mlp.lin2."))
_CLIP_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_BLOCK_PARTS = {
    "ln_1.": "norm1.", "ln_2.": "norm2.", "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj.": "attn.proj.", "mlp.c_fc.": "mlp.lin1.",
    "mlp.c_proj.": "mlp.lin2.",
}
_CLIP_TOP = {"visual.conv1.weight": "patch_embed.proj.weight", "visual.ln_pre.": "norm_pre.",
             "visual.ln_post.": "norm."}


def _grid_from_tokens(n: int, key: str) -> int:
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{key}: {n} position tokens do not form a square grid")
    return g


def _replace_prefix(key: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def timm_to_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm ``VisionTransformer`` keys → karyo/SAM keys. ``pos_embed`` (1, [1+]N, C) splits into ``cls_pos_embed``
    and the (1, g, g, C) grid; ``mlp.fc1/fc2`` become ``mlp.lin1/lin2``. Keys without a karyo counterpart (the
    classifier ``head``, ``fc_norm``, layer scale) are passed through unchanged so loading reports them."""
    out: dict[str, Tensor] = {}
    has_cls = "cls_token" in state_dict
    for key, value in state_dict.items():
        if key == "pos_embed":
            n = value.shape[1]
            g = math.isqrt(n)
            n_prefix = 0 if (g * g == n or not has_cls) else 1  # timm's no_embed_class models omit the cls slot
            g = _grid_from_tokens(n - n_prefix, key)
            if n_prefix:
                out["cls_pos_embed"] = value[:, :1]
            out["pos_embed"] = value[:, n_prefix:].reshape(1, g, g, value.shape[-1])
            continue
        new = key
        if key.startswith("blocks."):
            for old, rep in _TIMM_TO_KARYO:
                new = new.replace(old, rep)
        out[new] = value
    return out


def vit_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """karyo ViT keys → timm ``VisionTransformer`` keys (inverse of :func:`timm_to_vit`).

    Raises ValueError for parameters a timm ViT cannot hold (relative positions, stem convolutions, the CLIP
    projection, a ``pos_embed`` with a class token but no class position).
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "cls_pos_embed":
            continue
        if key == "pos_embed":
            grid = value.reshape(1, -1, value.shape[-1])
            if "cls_token" in state_dict:
                if "cls_pos_embed" not in state_dict:
                    raise ValueError("pos_embed: a class token without its position embedding has no timm layout")
                grid = torch.cat([state_dict["cls_pos_embed"], grid], dim=1)
            out["pos_embed"] = grid
            continue
        if ".rel_pos_" in key or key.startswith(("patch_embed.stem.", "proj.")):
            raise ValueError(f"{key}: no counterpart in a timm VisionTransformer")
        new = key
        if key.startswith("blocks."):
            for rep, old in _TIMM_TO_KARYO:
                new = new.replace(old, rep)
        out[new] = value
    return out


def clip_to_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI-CLIP (and OpenCLIP) ``visual.*`` keys → karyo ViT keys; the text tower's keys are dropped.

    ``class_embedding`` (C,) → ``cls_token`` (1, 1, C); ``positional_embedding`` (1+N, C) → ``cls_pos_embed`` +
    ``pos_embed`` grid; ``in_proj_weight/bias`` (q, k, v stacked, as in ``nn.MultiheadAttention``) → ``attn.qkv``;
    ``visual.proj`` (C, D), applied as ``x @ proj`` → ``proj.weight`` (D, C). Unknown ``visual.*`` keys pass
    through with their ``visual.`` prefix so that loading reports them.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            continue
        if key == "visual.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "visual.positional_embedding":
            g = _grid_from_tokens(value.shape[0] - 1, key)
            out["cls_pos_embed"] = value[:1].reshape(1, 1, -1)
            out["pos_embed"] = value[1:].reshape(1, g, g, value.shape[-1])
        elif key == "visual.proj":
            out["proj.weight"] = value.t().contiguous()
        elif (m := _CLIP_BLOCK.match(key)) is not None:
            part = _replace_prefix(m.group(2), _CLIP_BLOCK_PARTS)
            out[f"blocks.{m.group(1)}.{part}" if part is not None else key] = value
        else:
            new = _replace_prefix(key, _CLIP_TOP)
            out[new if new is not None else key] = value
    return out


def vit_to_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """karyo ViT keys → OpenAI-CLIP ``visual.*`` keys (inverse of :func:`clip_to_vit`).

    Raises ValueError for what CLIP's tower cannot hold: a patch-embedding bias, a stem, relative positions, or a
    model without class token.
    """
    if "cls_token" not in state_dict:
        raise ValueError("cls_token: a CLIP image tower needs a class token")
    inv_block = {v: k for k, v in _CLIP_BLOCK_PARTS.items()}
    inv_top = {v: k for k, v in _CLIP_TOP.items()}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "cls_pos_embed":
            continue
        elif key == "pos_embed":
            cls_pos = state_dict.get("cls_pos_embed")
            if cls_pos is None:
                raise ValueError("pos_embed: CLIP needs the class token's position embedding (cls_pos_embed)")
            out["visual.positional_embedding"] = torch.cat(
                [cls_pos.reshape(1, -1), value.reshape(-1, value.shape[-1])], dim=0)
        elif key == "proj.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            part = _replace_prefix(rest, inv_block)
            if part is None:
                raise ValueError(f"{key}: no counterpart in a CLIP residual block")
            out[f"visual.transformer.resblocks.{idx}.{part}"] = value
        else:
            new = _replace_prefix(key, inv_top)
            if new is None:
                raise ValueError(f"{key}: no counterpart in a CLIP image tower")
            out[new] = value
    return out


# ------------------------------------------------------------------------------------------------------- loading


class LoadReport(NamedTuple):
    """What :func:`load_vit_weights` did: the layout it read, keys the model lacks values for, checkpoint keys the
    model has no place for, and checkpoint keys skipped as belonging to another part (CLIP's text tower, SAM's
    prompt encoder and mask decoder)."""

    layout: str
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a checkpoint's tensors: ``torch.load(..., weights_only=True)`` or ``.safetensors``.

    Unwraps the usual ``{"model": ...}`` / ``{"state_dict": ...}`` containers and a DataParallel ``module.`` prefix;
    non-tensor entries are dropped. Unreadable files raise :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(path, "reading .safetensors needs the 'safetensors' package "
                                   "(pip install safetensors), or convert it to a .pth file") from None
        try:
            obj = load_file(str(path), device="cpu")
        except Exception as exc:  # any parse failure means a bad file
            raise InputError(path, f"cannot read safetensors checkpoint ({exc})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(path, f"cannot read checkpoint with torch.load(weights_only=True) ({exc})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise InputError(path, f"checkpoint holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise InputError(path, "checkpoint holds no tensors")
    return sd


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"clip"`` (``visual.*``), ``"sam"`` (``image_encoder.*``), ``"timm"`` (``mlp.fc1`` or a flat
    ``pos_embed``) or ``"karyo"`` (this module's own names, i.e. a bare SAM image encoder)."""
    keys = list(state_dict)
    if any(k.startswith("visual.") for k in keys):
        return "clip"
    if any(k.startswith("image_encoder.") for k in keys):
        return "sam"
    pos = state_dict.get("pos_embed")
    if any(".mlp.fc1." in k for k in keys) or (pos is not None and pos.ndim == 3):
        return "timm"
    return "karyo"


def _to_karyo(sd: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str]]:
    if layout == "clip":
        return clip_to_vit(sd), [k for k in sd if not k.startswith("visual.")]
    if layout == "sam":
        p = "image_encoder."
        return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, [k for k in sd if not k.startswith(p)]
    if layout == "timm":
        return timm_to_vit(sd), []
    if layout == "karyo":
        return dict(sd), []
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected auto, karyo, sam, timm or clip")


def load_vit_weights(model: nn.Module, path: str | os.PathLike, layout: str = "auto",
                     strict: bool = False) -> LoadReport:
    """Load a ViT checkpoint (karyo/SAM-encoder, full SAM, timm or OpenAI-CLIP layout) into ``model``.

    ``model`` is a :class:`ViT` or a subclass (e.g. the segmentor's ``ImageEncoderViT``, whose ``neck`` then loads
    from a SAM checkpoint too). Every key present in both is checked for shape first; a mismatch raises
    :class:`InputError` naming the key and both shapes, and nothing is loaded. Missing and unexpected keys are
    returned (and logged); ``strict=True`` turns them into an :class:`InputError`.
    """
    sd = read_state_dict(path)
    if layout == "auto":
        layout = detect_layout(sd)
    try:
        mapped, ignored = _to_karyo(sd, layout)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None
    own = model.state_dict()
    for key, value in mapped.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(path, f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                                   f"{tuple(own[key].shape)} (check the architecture config: img_size, "
                                   "patch_size, embed_dim, window_size, ...)")
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    if strict and (missing or unexpected):
        raise InputError(path, f"{layout} checkpoint does not match the model: missing {missing[:10]}"
                               f"{'...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                               f"{'...' if len(unexpected) > 10 else ''}")
    model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    if missing or unexpected:
        log.warning("%s: loaded %s checkpoint with %d missing key(s) %s and %d unexpected key(s) %s", path, layout,
                    len(missing), missing[:5], len(unexpected), unexpected[:5])
    return LoadReport(layout, missing, unexpected, ignored)
