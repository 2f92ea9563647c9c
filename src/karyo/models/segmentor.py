"""Promptable nucleus segmentor: Segment Anything's architecture written for karyo (PromptNucSeg's segmentor).

Architecture and parameter names follow SAM (Kirillov et al. 2023): a ViT image encoder with a conv neck
(:class:`ImageEncoderViT`), a :class:`PromptEncoder` (random-Fourier positional encoding of points plus learned
point-type embeddings) and a :class:`MaskDecoder` (a two-way transformer between prompt tokens and image tokens,
then 4× transposed-conv upscaling and hypernetwork mask heads). ``segmentor_config("vit_b" | "vit_l" | "vit_h")``
builds a state dict key-for-key and shape-for-shape equal to the official checkpoints, so
:func:`load_sam_checkpoint` reads ``sam_vit_*.pth`` with an identity map. PromptNucSeg (Shui et al. 2024) fine-tunes
exactly this network with one positive point per nucleus plus negative points on neighbouring nuclei.

Deviations from SAM, all behaviour-preserving for SAM's weights unless noted:

* Local decoding (``decode_window`` = w > 0): each prompt is decoded against a w×w-token window of the embedding
  centred on its positive point instead of the whole embedding (nuclei are small, so the whole-image decode wastes
  compute on CPU). The dense positional encoding is taken at the window's true positions, so with a window that
  covers the whole embedding the result equals SAM's; with a smaller window, image tokens outside it are not seen
  (a deliberate approximation). :class:`DecodeOutput` says which pixel box the mask logits cover.
* Inputs of any size: images are zero-padded (after normalisation, as SAM pads) to a multiple of the patch size;
  absolute position embeddings and relative-position tables are resampled to the token grid (SAM resamples only
  the latter), and point coordinates are normalised by the padded input size rather than a fixed 1024.
* Pixel normalisation is kept outside the state dict (non-persistent buffers, :meth:`Segmentor.normalize`), as
  in SAM; :meth:`Segmentor.embed` expects normalised images.
* Mask prompts (SAM's dense ``mask_downscaling`` input) are not exposed by :meth:`Segmentor.decode`; the module is
  kept so checkpoints load, and :meth:`PromptEncoder.embed_masks` computes it.
* Optional image detail for the mask head (``detail_dim`` > 0; off in every preset, so SAM's layout is unchanged):
  a two-convolution stem reads the normalised image at the mask resolution (``stride_out`` px), and a
  zero-initialised 3×3 convolution adds it to the decoder's upscaled features before the hypernetwork product
  (HQ-SAM, Ke et al. 2023, fuses early encoder features there for the same reason). With patch-8 tokens, thin
  nuclei (≤ 2 µm wide) fall between tokens; the detail gives the mask head their edges. Zero initialisation makes
  a model warm-started from weights without the branch compute exactly their masks until it trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from karyo.config import check_fields
from karyo.errors import InputError
from karyo.models.adapter import AdapterConfig, ChannelAdapter
from karyo.models.layers import MLP, LayerNorm2d, MLPBlock
from karyo.models.vit import LoadReport, ViT, ViTConfig, read_state_dict

__all__ = [
    "SAM_PRESETS",
    "DecodeOutput",
    "ImageEncoderViT",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Segmentor",
    "SegmentorConfig",
    "TwoWayTransformer",
    "WindowMasks",
    "load_sam_checkpoint",
    "masks_to_image",
    "paste_masks",
    "segmentor_config",
]

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)  # SAM's pixel_mean: the ImageNet mean on the 0–255 scale
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _sam_encoder(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> ViTConfig:
    return ViTConfig(img_size=1024, patch_size=16, in_chans=3, embed_dim=embed_dim, depth=depth,
                     num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True, use_abs_pos=True, use_rel_pos=True,
                     rel_pos_zero_init=True, window_size=14, global_attn_indexes=global_attn_indexes)


#: (embed_dim, depth, num_heads, global_attn_indexes) of the official SAM image encoders.
SAM_PRESETS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass
class SegmentorConfig:
    """Architecture + inference settings of a :class:`Segmentor`; the defaults are SAM ViT-B.

    ``in_chans`` must equal ``encoder.in_chans``. ``pixel_mean``/``pixel_std`` are on the scale of the images given
    to :meth:`Segmentor.normalize` (SAM: ImageNet statistics ×255, i.e. uint8-scale RGB). ``decode_window`` is in
    tokens (0 = SAM's whole-embedding decoding). ``mask_threshold`` is the logit above which a pixel is foreground.
    ``adapter`` (optional): a channel adapter (:mod:`karyo.models.adapter`) in front of the image encoder; its
    statistics (images in [0, 1]) then replace ``pixel_mean``/``pixel_std`` in :meth:`Segmentor.normalize`.
    ``detail_dim`` > 0 adds the image-detail branch of the mask head (module docstring) with that many channels.
    """

    encoder: ViTConfig = field(default_factory=lambda: _sam_encoder(*SAM_PRESETS["vit_b"]))
    in_chans: int = 3
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN_255
    pixel_std: tuple[float, ...] = IMAGENET_STD_255
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decode_window: int = 0
    mask_threshold: float = 0.0
    adapter: AdapterConfig | None = None
    detail_dim: int = 0

    def __post_init__(self) -> None:
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if self.adapter is not None and self.adapter.out_channels != self.in_chans:
            raise ValueError(f"adapter.out_channels {self.adapter.out_channels} differs from in_chans {self.in_chans}")
        if self.encoder.in_chans != self.in_chans:
            raise ValueError(f"encoder.in_chans {self.encoder.in_chans} differs from in_chans {self.in_chans}")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            raise ValueError(f"pixel_mean/pixel_std need {self.in_chans} values each")
        if self.encoder.patch_size % 4:
            raise ValueError(f"patch_size {self.encoder.patch_size} must be a multiple of 4 (masks are 4× upscaled)")
        if self.encoder.class_token:
            raise ValueError("the segmentor's image encoder has no class token")
        if self.prompt_dim % 8 or (self.prompt_dim // self.attention_downsample_rate) % self.decoder_heads:
            raise ValueError(f"prompt_dim {self.prompt_dim} must be a multiple of 8 and its downsampled width a "
                             f"multiple of decoder_heads {self.decoder_heads}")
        if self.decode_window < 0:
            raise ValueError(f"decode_window must be ≥ 0, got {self.decode_window}")
        if self.detail_dim < 0:
            raise ValueError(f"detail_dim must be ≥ 0, got {self.detail_dim}")


def segmentor_config(name: str = "small", **overrides) -> SegmentorConfig:
    """Preset configs: ``"vit_b"``, ``"vit_l"``, ``"vit_h"`` (official SAM), ``"small"`` and ``"tiny"``.

    ``"small"`` is karyo's CPU-trainable segmentor for 256×256 tiles at ~0.25 µm/px: a stride-8 conv stem (32×32
    tokens per tile, so a ~30-px nucleus spans ~4 tokens), 6 blocks of width 192 with 8×8 windows and two global
    blocks, a 128-wide decoder and 12-token (96-px) local decode windows. ``"tiny"`` is a seconds-to-train variant
    for tests and smoke runs. ``"cpu"`` is ``"small"`` at width 128 (about half the encoder compute), karyo's
    shipped default. ``overrides`` replace top-level fields (``encoder=ViTConfig(...)`` included).
    """
    if name in SAM_PRESETS:
        cfg = SegmentorConfig(encoder=_sam_encoder(*SAM_PRESETS[name]))
    elif name == "small":
        enc = ViTConfig(img_size=256, patch_size=8, in_chans=3, embed_dim=192, depth=6, num_heads=6, mlp_ratio=4.0,
                        use_abs_pos=True, use_rel_pos=True, window_size=8, global_attn_indexes=(2, 5),
                        patch_embed="stem")
        cfg = SegmentorConfig(encoder=enc, prompt_dim=128, decoder_mlp_dim=512, decoder_heads=4,
                              iou_head_hidden_dim=128, decode_window=12)
    elif name == "cpu":
        enc = ViTConfig(img_size=256, patch_size=8, in_chans=3, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                        use_abs_pos=True, use_rel_pos=True, window_size=8, global_attn_indexes=(2, 5),
                        patch_embed="stem")
        cfg = SegmentorConfig(encoder=enc, prompt_dim=128, decoder_mlp_dim=512, decoder_heads=4,
                              iou_head_hidden_dim=128, decode_window=12)
    elif name == "tiny":
        enc = ViTConfig(img_size=64, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                        use_abs_pos=True, use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
                        patch_embed="stem")
        cfg = SegmentorConfig(encoder=enc, prompt_dim=32, mask_in_chans=8, decoder_mlp_dim=64, decoder_heads=2,
                              iou_head_hidden_dim=32, decode_window=6)
    else:
        raise InputError(None, f"unknown segmentor preset {name!r}; known: {[*SAM_PRESETS, 'small', 'cpu', 'tiny']}")
    check_fields(SegmentorConfig, overrides)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ------------------------------------------------------------------------------------------------ image encoder


class ImageEncoderViT(ViT):
    """SAM's image encoder: the :class:`~karyo.models.vit.ViT` plus ``neck`` (1×1 conv → LayerNorm2d → 3×3 conv →
    LayerNorm2d, both convs bias-free), B×C×H×W → B×D×H/p×W/p."""

    def __init__(self, config: ViTConfig, out_chans: int = 256):
        super().__init__(config)
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.neck(self.forward_features(x).features.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------- prompt encoder


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier-feature positional encoding of normalised (x, y) (Tancik et al. 2020; SAM's ``pe_layer``).

    ``positional_encoding_gaussian_matrix`` (2, D/2) is a persistent buffer (it is in SAM's checkpoints)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """…×2 coordinates in [0, 1] → …×D features ``[sin, cos](2π·(2c−1)·G)``."""
        proj = (2.0 * coords - 1.0) @ self.positional_encoding_gaussian_matrix
        proj = 2.0 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, h: int, w: int) -> Tensor:
        """D×h×w encoding of the token centres of an h×w grid."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h×w×2 as (x, y)
        return self.encode(coords).permute(2, 0, 1)

    def points(self, coords: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """…×2 pixel coordinates (x, y) in an image of size ``image_hw`` → …×D."""
        scale = coords.new_tensor([1.0 / image_hw[1], 1.0 / image_hw[0]])
        return self.encode(coords.float() * scale)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder (``pe_layer``, ``point_embeddings.{0..3}``, ``not_a_point_embed``, ``mask_downscaling``,
    ``no_mask_embed``). Point labels: 1 positive, 0 negative, −1 padding. Embeddings 2 and 3 are SAM's box
    corners; karyo does not use boxes but keeps them so checkpoints load."""

    def __init__(self, embed_dim: int = 256, mask_in_chans: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def embed_points(self, points: Tensor, labels: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """P×K×2 pixel points (x, y) + P×K labels → P×(K+1)×D sparse embeddings.

        As in SAM with point-only prompts, coordinates are shifted by half a pixel to the pixel centre and one
        padding token is appended; padding points get only ``not_a_point_embed``.
        """
        p = points.shape[0]
        pts = torch.cat([points.float() + 0.5, points.new_zeros(p, 1, 2, dtype=torch.float32)], dim=1)
        lab = torch.cat([labels.long(), labels.new_full((p, 1), -1, dtype=torch.long)], dim=1)[..., None]
        emb = self.pe_layer.points(pts, image_hw)
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def dense_pe(self, h: int, w: int) -> Tensor:
        """D×h×w positional encoding of the image-embedding grid (SAM's ``get_dense_pe``)."""
        return self.pe_layer.grid(h, w)

    def embed_masks(self, masks: Tensor) -> Tensor:
        """B×1×4h×4w mask logits → B×D×h×w dense prompt embedding (SAM's mask prompt; unused by ``decode``)."""
        return self.mask_downscaling(masks)


# ------------------------------------------------------------------------------------------------- mask decoder


class DecoderAttention(nn.Module):
    """Attention with separate q/k/v projections down to ``dim/downsample_rate`` (SAM's transformer ``Attention``)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        internal = embedding_dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"attention width {internal} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal)
        self.k_proj = nn.Linear(embedding_dim, internal)
        self.v_proj = nn.Linear(embedding_dim, internal)
        self.out_proj = nn.Linear(internal, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image cross-attention, token MLP, image→token cross-attention (SAM)."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2,
                 skip_first_layer_pe: bool = False):
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, "relu")
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(embedding_dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: ``layers.{i}``, ``final_attn_token_to_image``, ``norm_final_attn``."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth))
        self.final_attn_token_to_image = DecoderAttention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """P×D×h×w image tokens, (1|P)×D×h×w positions, P×T×D tokens → (P×T×D tokens, P×hw×D image tokens)."""
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder(nn.Module):
    """SAM's mask decoder: IoU + mask tokens through the two-way transformer, 4× upscaling, hypernetwork MLPs."""

    def __init__(self, transformer_dim: int = 256, depth: int = 2, mlp_dim: int = 2048, num_heads: int = 8,
                 downsample_rate: int = 2, num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, detail_dim: int = 0):
        super().__init__()
        self.transformer = TwoWayTransformer(depth, transformer_dim, num_heads, mlp_dim, downsample_rate)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.detail_fuse = None
        if detail_dim > 0:
            self.detail_fuse = nn.Conv2d(transformer_dim // 8 + detail_dim, transformer_dim // 8, 3, padding=1)
            nn.init.zeros_(self.detail_fuse.weight)
            nn.init.zeros_(self.detail_fuse.bias)

    def forward(self, src: Tensor, pos: Tensor, sparse: Tensor, detail: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """P×D×h×w (image embedding + dense prompt), (1|P)×D×h×w positions, P×T×D sparse prompts (and, with the
        detail branch, P×detail_dim×4h×4w image detail; None skips the fusion) → all ``num_mask_tokens`` mask
        logits P×(M+1)×4h×4w and IoU predictions P×(M+1)."""
        p, d, h, w = src.shape
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(p, -1, -1), sparse], dim=1)
        hs, keys = self.transformer(src, pos, tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(p, d, h, w))
        if self.detail_fuse is not None and detail is not None:
            upscaled = upscaled + self.detail_fuse(torch.cat([upscaled, detail.to(upscaled.dtype)], dim=1))
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        c, uh, uw = upscaled.shape[1:]
        masks = (hyper @ upscaled.reshape(p, c, uh * uw)).reshape(p, self.num_mask_tokens, uh, uw)
        return masks, self.iou_prediction_head(hs[:, 0])


# ---------------------------------------------------------------------------------------------------- segmentor


@dataclass
class DecodeOutput:
    """Mask logits of each prompt over its decode window.

    ``mask_logits`` P×M×Hm×Wm (M = 1, or ``num_multimask_outputs`` with ``multimask``), one logit per
    ``stride_out`` × ``stride_out`` input pixels; ``iou_pred`` P×M; ``window_xyxy`` P×4 (int64) the pixel box
    [x0, y0, x1, y1) of the (padded) input the logits cover — it may extend past the original image's border.
    """

    mask_logits: Tensor
    iou_pred: Tensor
    window_xyxy: Tensor
    stride_out: int


class Segmentor(nn.Module):
    """SAM-architecture promptable segmentor (``image_encoder``, ``prompt_encoder``, ``mask_decoder``)."""

    def __init__(self, config: SegmentorConfig | None = None):
        super().__init__()
        cfg = config if config is not None else SegmentorConfig()
        self.config = cfg
        self.adapter = ChannelAdapter(cfg.adapter) if cfg.adapter is not None else None
        self.image_encoder = ImageEncoderViT(cfg.encoder, out_chans=cfg.prompt_dim)
        self.prompt_encoder = PromptEncoder(cfg.prompt_dim, cfg.mask_in_chans)
        self.mask_decoder = MaskDecoder(cfg.prompt_dim, cfg.decoder_depth, cfg.decoder_mlp_dim, cfg.decoder_heads,
                                        cfg.attention_downsample_rate, cfg.num_multimask_outputs,
                                        cfg.iou_head_depth, cfg.iou_head_hidden_dim, cfg.detail_dim)
        self.detail_encoder = None
        if cfg.detail_dim > 0:
            self.detail_encoder = nn.Sequential(
                nn.Conv2d(cfg.in_chans, cfg.detail_dim, 3, padding=1), nn.GELU(),
                nn.Conv2d(cfg.detail_dim, cfg.detail_dim, 3, stride=self.stride_out, padding=1), nn.GELU())
        stats = cfg.adapter or cfg
        self.register_buffer("pixel_mean", torch.tensor(stats.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(stats.pixel_std).view(-1, 1, 1), persistent=False)

    #: Parameters that weights without the detail branch lack (:func:`karyo.train.loop.load_init_state`).
    optional_init_prefixes = ("detail_encoder.", "mask_decoder.detail_fuse.")

    @property
    def patch_size(self) -> int:
        """Input pixels per embedding token."""
        return self.config.encoder.patch_size

    @property
    def stride_out(self) -> int:
        """Input pixels per mask-logit pixel (the decoder upscales the embedding 4×)."""
        return self.config.encoder.patch_size // 4

    def normalize(self, images: Tensor) -> Tensor:
        """B×C×H×W images on the config's pixel scale (uint8 RGB for the presets) → normalised float images."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def embed(self, images: Tensor) -> Tensor:
        """Normalised B×C×H×W images → B×D×⌈H/p⌉×⌈W/p⌉ embeddings (bottom/right zero padding to a multiple of p).

        With the detail branch the image detail follows the D channels, each token's 4×4 detail pixels folded into
        channels (``pixel_unshuffle``), so :meth:`decode` crops its windows with the same token indices."""
        if self.adapter is not None:
            images = self.adapter(images)
        if images.ndim != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"expected B×{self.config.in_chans}×H×W images, got {tuple(images.shape)}")
        p = self.patch_size
        pad_h, pad_w = (-images.shape[2]) % p, (-images.shape[3]) % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        embedding = self.image_encoder(images)
        if self.detail_encoder is None:
            return embedding
        detail = F.pixel_unshuffle(self.detail_encoder(images), 4)
        return torch.cat([embedding, detail.to(embedding.dtype)], dim=1)

    def decode(self, embeddings: Tensor, image_index: Tensor, points: Tensor, labels: Tensor,
               multimask: bool = False, detail: bool = True) -> DecodeOutput:
        """Decode P prompts (of any images in the batch) in one pass.

        ``image_index`` P (which embedding each prompt belongs to), ``points`` P×K×2 (x, y) in input-pixel
        coordinates (pixel indices, SAM convention), ``labels`` P×K (1 positive, 0 negative, −1 padding).
        With ``decode_window`` w > 0 each prompt sees a w×w-token window around its first positive point (first
        valid point when there is none), clamped inside the embedding; see the module docstring. ``detail=False``
        skips the detail branch's fusion (its cost, and its edges), for masks that only need to be roughly right.
        """
        if points.ndim != 3 or points.shape[-1] != 2 or labels.shape != points.shape[:2]:
            raise ValueError(f"points must be P×K×2 and labels P×K, got {tuple(points.shape)} and "
                             f"{tuple(labels.shape)}")
        _, _, h, w = embeddings.shape
        d = self.config.prompt_dim
        p = self.patch_size
        n = points.shape[0]
        device = embeddings.device
        image_index = image_index.to(device=device, dtype=torch.long)
        points, labels = points.to(device), labels.to(device)
        sparse = self.prompt_encoder.embed_points(points, labels, (h * p, w * p))
        pe = self.prompt_encoder.dense_pe(h, w)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, d, 1, 1)
        win = self.config.decode_window
        if win <= 0 or (win >= h and win >= w):
            wh, ww = h, w
            x0 = y0 = torch.zeros(n, dtype=torch.long, device=device)
            src = embeddings.index_select(0, image_index)
            pos = pe.unsqueeze(0)
        else:
            wh, ww = min(win, h), min(win, w)
            anchor = (_anchor_points(points.float(), labels, (h * p, w * p)) + 0.5) / p  # pixel centre, tokens
            x0 = torch.round(anchor[:, 0] - ww / 2).clamp(0, w - ww).long()
            y0 = torch.round(anchor[:, 1] - wh / 2).clamp(0, h - wh).long()
            rows = (y0[:, None] + torch.arange(wh, device=y0.device))[:, :, None]
            cols = (x0[:, None] + torch.arange(ww, device=x0.device))[:, None, :]
            src = embeddings.permute(0, 2, 3, 1)[image_index[:, None, None], rows, cols].permute(0, 3, 1, 2)
            pos = pe.permute(1, 2, 0)[rows, cols].permute(0, 3, 1, 2)
        fine = F.pixel_shuffle(src[:, d:], 4) if self.detail_encoder is not None and detail else None
        masks, iou = self.mask_decoder(src[:, :d] + dense, pos, sparse, fine)
        keep = slice(1, None) if multimask else slice(0, 1)
        window = torch.stack([x0 * p, y0 * p, (x0 + ww) * p, (y0 + wh) * p], dim=1)
        return DecodeOutput(masks[:, keep], iou[:, keep], window, self.stride_out)

    def forward(self, images: Tensor, image_index: Tensor, points: Tensor, labels: Tensor,
                multimask: bool = False) -> DecodeOutput:
        """:meth:`embed` + :meth:`decode` (normalised images)."""
        return self.decode(self.embed(images), image_index, points, labels, multimask)


def _anchor_points(points: Tensor, labels: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """P×2: each prompt's first positive point, else its first non-padding point, else the image centre."""
    n = points.shape[0]
    positive, valid = labels == 1, labels >= 0
    first = torch.where(positive.any(1), positive.float().argmax(1), valid.float().argmax(1))
    anchor = points[torch.arange(n, device=points.device), first]
    centre = points.new_tensor([image_hw[1] / 2.0, image_hw[0] / 2.0])
    return torch.where(valid.any(1)[:, None], anchor, centre)


# ----------------------------------------------------------------------------------------- masks to the image


class WindowMasks(NamedTuple):
    """Per-prompt masks at pixel resolution over each prompt's window (memory-light: P×M×Hw×Ww, not P×M×H×W)."""

    masks: Tensor  # P×M×Hw×Ww logits or probabilities
    window_xyxy: Tensor  # P×4 pixel boxes of the windows (may extend past the image)
    probabilities: bool
    image_shape: tuple[int, int] | None  # (H, W) of the original image, used by paste_masks


def masks_to_image(output: DecodeOutput, image_shape: tuple[int, int] | None = None,
                   probabilities: bool = False) -> WindowMasks:
    """Bilinearly upsample the window logits to pixel resolution (``align_corners=False``, as SAM's
    ``postprocess_masks``), optionally as sigmoid probabilities. Stays at window level; :func:`paste_masks`
    places the windows into full P×M×H×W images (of ``image_shape``) only when asked."""
    logits = output.mask_logits
    s = output.stride_out
    up = F.interpolate(logits, scale_factor=s, mode="bilinear", align_corners=False) if s > 1 else logits
    shape = None if image_shape is None else (int(image_shape[0]), int(image_shape[1]))
    return WindowMasks(up.sigmoid() if probabilities else up, output.window_xyxy, probabilities, shape)


def paste_masks(masks: WindowMasks, image_shape: tuple[int, int] | None = None, fill: float | None = None) -> Tensor:
    """Paste window masks into P×M×H×W images (``image_shape``, default the one given to :func:`masks_to_image`),
    cropping windows at the image border. Outside a prompt's window the value is ``fill`` (default: 0 for
    probabilities, −inf for logits — no evidence for that prompt there)."""
    shape = image_shape if image_shape is not None else masks.image_shape
    if shape is None:
        raise ValueError("paste_masks needs the image shape")
    h, w = int(shape[0]), int(shape[1])
    m = masks.masks
    if fill is None:
        fill = 0.0 if masks.probabilities else float("-inf")
    out = m.new_full((m.shape[0], m.shape[1], h, w), fill)
    for i, (x0, y0, x1, y1) in enumerate(masks.window_xyxy.tolist()):
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if xb > xa and yb > ya:
            out[i, :, ya:yb, xa:xb] = m[i, :, ya - y0:yb - y0, xa - x0:xb - x0]
    return out


# ------------------------------------------------------------------------------------------------- checkpoints


def load_sam_checkpoint(model: Segmentor, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load an official Segment Anything checkpoint (``sam_vit_b_01ec64.pth`` …) or a karyo Segmentor state dict.

    Reads with ``torch.load(weights_only=True)`` (or ``.safetensors``); the key map is the identity. Shape
    mismatches raise :class:`InputError` naming the key; with ``strict`` missing or unexpected keys do too.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise InputError(path, f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's "
                                   f"{tuple(own[key].shape)} (wrong preset? vit_b/vit_l/vit_h)")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        raise InputError(path, f"not a checkpoint of this segmentor: missing {missing[:10]}, "
                               f"unexpected {unexpected[:10]}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return LoadReport("sam", missing, unexpected, [])
