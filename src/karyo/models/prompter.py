"""PromptNucSeg prompter: one point (and class) per nucleus, P2PNet-style.

Follows the supplementary §A of PromptNucSeg (Shui et al.) and P2PNet (Song et al., ICCV 2021, "Rethinking
counting and localization in crowds: a purely point-based framework"):

* image encoder: ConvNeXt (:mod:`karyo.models.convnext`) + FPN with L levels (:mod:`karyo.models.fpn`),
  giving one feature per anchor; anchors lie every λ pixels at cell centres ((i + 0.5)·λ);
* two heads, both FC-ReLU-Dropout-FC: regression (offset in pixels, point = anchor + offset) and
  classification (C nucleus classes + background at index 0);
* training: one-to-one Hungarian matching of anchors to ground-truth points with cost
  ``α·‖p̂_i − p_j‖₂ − ĉ_i(class_j)`` (P2PNet's one-to-one matching), cross entropy with background
  weight β and ``γ·MSE`` on the matched points (P2PNet's loss).

Deviations from the released PromptNucSeg prompter, stated once here: no deformable-proposal step (features
are read at the fixed anchors, see :mod:`karyo.models.fpn`), and the background class is index 0 (theirs is
the last index). Its auxiliary nucleus-mask head (a binary focal loss on the foreground, weight 1 in the released
configs) is optional here (``mask_loss_weight``, off in the presets) and reads the stride-4 level of the shared FPN
instead of a second FPN; it only trains the encoder and is not computed at inference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from torch import nn

from karyo.config import check_fields
from karyo.errors import InputError
from karyo.models.adapter import AdapterConfig, ChannelAdapter
from karyo.models.convnext import CONVNEXT_PRESETS, ConvNeXt, ConvNeXtConfig, WeightLoadReport, load_convnext_weights
from karyo.models.fpn import ANCHOR_STRIDES, FPN
from karyo.models.losses import binary_focal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PrompterConfig:
    """Everything needed to rebuild a :class:`Prompter` (``karyo.config.from_dict`` round-trips it).

    Backbone: ``backbone`` names a ConvNeXt preset; ``depths``/``dims``, when given, override it.
    ``levels`` (L) and ``anchor_stride`` (λ) as in the supplementary §A. ``anchors_per_cell`` K must be a
    square (1, 4, 9, …): the K anchors of a cell sit at the centres of a √K×√K sub-grid (P2PNet uses 4 on
    stride 8); the default 1 is PromptNucSeg's one anchor per λ×λ cell. ``num_classes`` C excludes
    background; ``class_names`` maps 1..C to names. ``alpha``/``beta``/``gamma``: matching distance
    coefficient, background weight in the CE, regression-loss weight. ``score_threshold`` (on the
    foreground probability 1 − p_bg) and ``nms_radius_px`` are the decoding defaults. ``pixel_mean``/
    ``pixel_std`` (one per input channel, for images scaled to [0, 1]) and ``mpp`` (µm per pixel the model
    expects) describe the input the pipeline must produce. ``adapter`` (optional): a channel adapter
    (:mod:`karyo.models.adapter`) mapping N input channels onto ``in_chans`` before the backbone; the input is then
    normalised with the adapter's statistics. ``mask_loss_weight`` > 0 adds the released prompter's auxiliary
    nucleus-mask head and its loss with this weight (dense supervision for the encoder).
    ``matches_per_nucleus`` k > 1 (a karyo addition; 1 is PromptNucSeg's one-to-one matching) lets up to k
    anchors learn each nucleus in training (:func:`hungarian_match`); decoding's point NMS then keeps one.
    """

    backbone: str = "atto"
    depths: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    in_chans: int = 3
    fpn_dim: int = 96
    levels: int = 3
    anchor_stride: int = 8
    anchors_per_cell: int = 1
    num_classes: int = 1
    class_names: dict[int, str] = field(default_factory=dict)
    head_hidden: int = 128
    dropout: float = 0.1
    alpha: float = 0.1
    beta: float = 0.4
    gamma: float = 5e-3
    score_threshold: float = 0.5
    nms_radius_px: float = 12.0
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    mpp: float = 0.25
    drop_path_rate: float = 0.0
    adapter: AdapterConfig | None = None
    mask_loss_weight: float = 0.0
    matches_per_nucleus: int = 1

    def __post_init__(self) -> None:
        self.pixel_mean = tuple(float(v) for v in self.pixel_mean)
        self.pixel_std = tuple(float(v) for v in self.pixel_std)
        self.class_names = {int(k): str(v) for k, v in (self.class_names or {}).items()}
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        problems = []
        if self.adapter is not None and self.adapter.out_channels != self.in_chans:
            problems.append(f"adapter.out_channels {self.adapter.out_channels} differs from in_chans {self.in_chans}")
        if self.depths is None and self.dims is None and self.backbone not in CONVNEXT_PRESETS:
            problems.append(f"unknown backbone {self.backbone!r}; known: {sorted(CONVNEXT_PRESETS)}")
        if len(self.pixel_mean) != self.in_chans or len(self.pixel_std) != self.in_chans:
            problems.append(f"pixel_mean/pixel_std need {self.in_chans} values (one per input channel), got "
                            f"{len(self.pixel_mean)}/{len(self.pixel_std)}")
        if any(s <= 0 for s in self.pixel_std):
            problems.append("pixel_std must be positive")
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.class_names and not set(self.class_names) <= set(range(1, self.num_classes + 1)):
            problems.append(f"class_names keys must lie in 1..{self.num_classes}, got {sorted(self.class_names)}")
        k = math.isqrt(max(int(self.anchors_per_cell), 0))
        if self.anchors_per_cell < 1 or k * k != self.anchors_per_cell:
            problems.append(f"anchors_per_cell must be a square (1, 4, 9, ...), got {self.anchors_per_cell}")
        if not 1 <= self.levels <= 4:
            problems.append(f"levels L must be in 1..4 (ConvNeXt has 4 stages), got {self.levels}")
        if self.anchor_stride not in ANCHOR_STRIDES:
            problems.append(f"anchor_stride λ must be one of {ANCHOR_STRIDES}, got {self.anchor_stride}")
        if self.fpn_dim < 1 or self.head_hidden < 1:
            problems.append(f"fpn_dim and head_hidden must be >= 1, got {self.fpn_dim}, {self.head_hidden}")
        if not 0.0 <= self.score_threshold <= 1.0 or self.nms_radius_px < 0 or self.mpp <= 0:
            problems.append(f"need score_threshold in [0, 1], nms_radius_px >= 0, mpp > 0; got "
                            f"{self.score_threshold}, {self.nms_radius_px}, {self.mpp}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mask_loss_weight < 0:
            problems.append(f"mask_loss_weight must be >= 0, got {self.mask_loss_weight}")
        if self.matches_per_nucleus < 1:
            problems.append(f"matches_per_nucleus must be >= 1, got {self.matches_per_nucleus}")
        if self.beta <= 0 or self.alpha < 0 or self.gamma < 0:
            problems.append(f"need beta > 0, alpha >= 0, gamma >= 0; got {self.beta}, {self.alpha}, {self.gamma}")
        if problems:
            raise InputError(None, "PrompterConfig: " + "; ".join(problems))

    def backbone_config(self) -> ConvNeXtConfig:
        """The ConvNeXt sizes this prompter uses."""
        if self.depths is not None or self.dims is not None:
            base_depths, base_dims = CONVNEXT_PRESETS.get(self.backbone, (None, None))
            depths = self.depths if self.depths is not None else base_depths
            dims = self.dims if self.dims is not None else base_dims
            if depths is None or dims is None:
                raise InputError(None, "PrompterConfig: give both depths and dims, or a known backbone preset")
            return ConvNeXtConfig(depths=depths, dims=dims, in_chans=self.in_chans,
                                  drop_path_rate=self.drop_path_rate)
        return ConvNeXtConfig.preset(self.backbone, in_chans=self.in_chans, drop_path_rate=self.drop_path_rate)

    @classmethod
    def preset(cls, name: str, **overrides) -> PrompterConfig:
        """A named configuration from :data:`PROMPTER_PRESETS`, with field overrides."""
        if name not in PROMPTER_PRESETS:
            raise InputError(None, f"unknown prompter preset {name!r}; known: {sorted(PROMPTER_PRESETS)}")
        check_fields(cls, overrides)
        return cls(**{**PROMPTER_PRESETS[name], **overrides})


_PANNUKE_NAMES = {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}
_PAPER = dict(backbone="small", fpn_dim=256, head_hidden=256, dropout=0.1, drop_path_rate=0.0)

#: Named configurations. "cpu": ConvNeXt-atto, fpn_dim 96, L = 3, λ = 8, sized for a 2-core CPU.
#: "pannuke"/"kumar"/"cpm": the supplementary §A settings (ConvNeXt-S, FPN width and head width 256 as in
#: the released configs; NMS radius 12/11/12 px as their test settings).
PROMPTER_PRESETS: dict[str, dict] = {
    "cpu": dict(backbone="atto", fpn_dim=96, head_hidden=128, levels=3, anchor_stride=8, beta=0.4,
                class_names={1: "nucleus"}),
    "pannuke": dict(**_PAPER, levels=3, anchor_stride=8, beta=0.4, num_classes=5, class_names=_PANNUKE_NAMES,
                    nms_radius_px=12.0),
    "kumar": dict(**_PAPER, levels=4, anchor_stride=16, beta=0.2, class_names={1: "nucleus"}, nms_radius_px=11.0),
    "cpm": dict(**_PAPER, levels=4, anchor_stride=16, beta=0.25, class_names={1: "nucleus"}, nms_radius_px=12.0),
}


def _head(dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    """FC-ReLU-Dropout-FC (supplementary §A), applied to every anchor's feature."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


def anchor_points(height: int, width: int, stride: int, per_cell: int = 1,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """A×2 anchor (x, y) pixel positions for an H×W input: cell centres of the λ-grid, row-major.

    With ``per_cell`` K = k² the anchors of cell (i, j) are ``((j + (b + 0.5)/k)·λ, (i + (a + 0.5)/k)·λ)``
    for a, b in 0..k-1, listed cell by cell (sub-anchors row-major inside a cell); K = 1 gives
    ``((j + 0.5)·λ, (i + 0.5)·λ)``.
    """
    k = math.isqrt(per_cell)
    rows, cols = height // stride, width // stride
    sub = (torch.arange(k, dtype=torch.float32, device=device) + 0.5) / k
    ys = (torch.arange(rows, dtype=torch.float32, device=device)[:, None] + sub[None, :]) * stride  # rows×k
    xs = (torch.arange(cols, dtype=torch.float32, device=device)[:, None] + sub[None, :]) * stride  # cols×k
    y = ys[:, None, :, None].expand(rows, cols, k, k)
    x = xs[None, :, None, :].expand(rows, cols, k, k)
    return torch.stack((x, y), dim=-1).reshape(-1, 2)


class Prompter(nn.Module):
    """ConvNeXt + FPN + point/class heads: ``forward(images)`` → ``{"points", "logits"}``.

    ``images`` are B×C×H×W, normalised with ``pixel_mean``/``pixel_std``, with H and W multiples of 32
    (the pipeline pads). Outputs: ``points`` B×A×2 absolute (x, y) pixel coordinates (anchor + predicted
    offset; may fall slightly outside the image), ``logits`` B×A×(C+1), index 0 = background.
    """

    def __init__(self, config: PrompterConfig | None = None):
        super().__init__()
        cfg = config if config is not None else PrompterConfig()
        self.config = cfg
        self.adapter = ChannelAdapter(cfg.adapter) if cfg.adapter is not None else None
        self.backbone = ConvNeXt(cfg.backbone_config())
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_dim, cfg.levels, cfg.anchor_stride)
        k = cfg.anchors_per_cell
        self.reg_head = _head(cfg.fpn_dim, cfg.head_hidden, 2 * k, cfg.dropout)
        self.cls_head = _head(cfg.fpn_dim, cfg.head_hidden, k * (cfg.num_classes + 1), cfg.dropout)
        for head in (self.reg_head, self.cls_head):
            for layer in head:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
        # Offsets start at exactly 0 (points = anchors), so early matching is driven by the anchor grid.
        nn.init.zeros_(self.reg_head[-1].weight)
        self.mask_head = None
        if cfg.mask_loss_weight > 0:  # released prompter: conv3×3-BN-ReLU-conv1×1 on a stride-4 FPN map
            d = cfg.fpn_dim
            self.mask_head = nn.Sequential(nn.Conv2d(d, d, 3, padding=1), nn.BatchNorm2d(d), nn.ReLU(),
                                           nn.Conv2d(d, 1, 1))

    #: Parameters a checkpoint without the optional mask head may lack (``init`` from such weights trains it fresh).
    optional_init_prefixes = ("mask_head.",)
    #: The layer whose shape is the class count: fine-tuning on another taxonomy (``--init`` with other classes)
    #: starts it afresh and keeps every other weight.
    class_head_prefixes = ("cls_head.3.",)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(images)[0]

    def forward_features(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`forward`'s outputs plus the B×A×D per-anchor features the heads read (FPN width D), so
        models built on the prompter (IVAAN) can add heads without repeating it. The K anchors of a cell share
        their cell's feature. In training mode a model with the mask head also returns ``mask_logits``
        (B×1×H/4×W/4, before the sigmoid)."""
        cfg = self.config
        if self.adapter is not None:
            images = self.adapter(images)
        if images.ndim != 4 or images.shape[1] != cfg.in_chans:
            raise InputError(None, f"Prompter expects B×{cfg.in_chans}×H×W images, got {tuple(images.shape)}")
        b, _, h, w = images.shape
        if h % 32 or w % 32:
            raise InputError(None, f"Prompter input H and W must be multiples of 32 (pad first), got {h}×{w}")
        levels = self.fpn.pyramid(self.backbone(images))
        feat = self.fpn.fuse_levels(levels).permute(0, 2, 3, 1)  # B, H/λ, W/λ, D
        k = cfg.anchors_per_cell
        offsets = self.reg_head(feat).reshape(b, -1, 2)
        logits = self.cls_head(feat).reshape(b, -1, cfg.num_classes + 1)
        anchors = anchor_points(h, w, cfg.anchor_stride, k, device=images.device).to(offsets.dtype)
        per_anchor = feat.reshape(b, -1, feat.shape[-1])
        if k > 1:
            per_anchor = per_anchor.repeat_interleave(k, dim=1)
        out = {"points": anchors + offsets, "logits": logits}
        if self.mask_head is not None and self.training:
            out["mask_logits"] = self.mask_head(levels[0])
        return out, per_anchor

    def load_backbone_weights(self, path: str | os.PathLike) -> WeightLoadReport:
        """Initialise the ConvNeXt from a local ImageNet checkpoint (official or timm layout), e.g. ConvNeXt-S."""
        return load_convnext_weights(self.backbone, path)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """B×C×H×W images scaled to [0, 1] → the normalised input :meth:`forward` expects."""
        stats = self.config.adapter or self.config
        mean = images.new_tensor(stats.pixel_mean).view(1, -1, 1, 1)
        std = images.new_tensor(stats.pixel_std).view(1, -1, 1, 1)
        return (images - mean) / std

    def decode(self, outputs: dict[str, torch.Tensor]) -> list[PointPrediction]:
        """:func:`decode_points` with this model's ``score_threshold`` and ``nms_radius_px``."""
        return decode_points(outputs, self.config.score_threshold, self.config.nms_radius_px)


# ------------------------------------------------------------------------------------------ matching & loss


def _check_targets(gt_points: torch.Tensor, gt_classes: torch.Tensor, num_classes: int) -> None:
    if gt_points.ndim != 2 or gt_points.shape[1] != 2:
        raise InputError(None, f"gt points must be G×2 (x, y), got {tuple(gt_points.shape)}")
    if gt_classes.shape != (gt_points.shape[0],):
        raise InputError(None, f"gt classes must have shape ({gt_points.shape[0]},), got {tuple(gt_classes.shape)}")
    if gt_classes.numel() and (int(gt_classes.min()) < 0 or int(gt_classes.max()) > num_classes):
        raise InputError(None, f"gt classes must lie in 0..{num_classes} (0 = unknown class), "
                               f"got {int(gt_classes.min())}..{int(gt_classes.max())}")


def _matched_probability(probs: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
    """A×G probability each anchor gives each GT's class; unknown-class GTs (0) use 1 − p_bg."""
    cls = gt_classes.clamp(min=1)
    prob = probs[:, cls]
    foreground = (1.0 - probs[:, :1]).expand_as(prob)
    return torch.where((gt_classes == 0)[None, :], foreground, prob)


@torch.no_grad()
def hungarian_match(points: torch.Tensor, logits: torch.Tensor, gt_points: torch.Tensor,
                    gt_classes: torch.Tensor, alpha: float = 0.1, per_nucleus: int = 1,
                    extra_radius: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one assignment of the A anchors of one image to its G ground-truth points (P2PNet's matching).

    Cost ``C[i, j] = α·‖p̂_i − p_j‖₂ − ĉ_i(class_j)`` with ĉ the softmax probability; a GT of class 0
    ("nucleus of unknown class") uses the foreground probability 1 − p_bg. Solved exactly with
    :func:`scipy.optimize.linear_sum_assignment`; min(A, G) pairs are returned as (anchor_idx, gt_idx)
    long tensors on the inputs' device, sorted by anchor index.

    ``per_nucleus`` k > 1 (karyo's one-to-many variant, the repeated-target matching of hybrid-matching DETRs):
    every GT column is repeated k times, so each nucleus gets up to k distinct anchors. Each nucleus keeps its
    cheapest anchor; its other anchors only while their predicted point lies within ``extra_radius`` px of it
    (a dense cluster has too few anchors nearby, and a far anchor would be taught a long jump).
    """
    _check_targets(gt_points, gt_classes, logits.shape[-1] - 1)
    device = points.device
    if points.shape[0] == 0 or gt_points.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    probs = logits.detach().float().softmax(-1)
    distance = torch.cdist(points.detach().float(), gt_points.to(points.device).float())
    cost = (alpha * distance - _matched_probability(probs, gt_classes.to(device))).cpu().double().numpy()
    g = cost.shape[1]
    k = max(1, min(int(per_nucleus), cost.shape[0] // g))
    rows, cols = linear_sum_assignment(np.tile(cost, (1, k)) if k > 1 else cost)
    if k > 1:
        cols = cols % g
        order = np.lexsort((cost[rows, cols], cols))  # by GT, cheapest first
        rows, cols = rows[order], cols[order]
        cheapest = np.r_[True, cols[1:] != cols[:-1]]
        near = distance.cpu().numpy()[rows, cols] <= extra_radius
        keep = cheapest | near
        rows, cols = rows[keep], cols[keep]
        by_anchor = np.argsort(rows)
        rows, cols = rows[by_anchor], cols[by_anchor]
    return (torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device))


def prompter_loss(outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]],
                  cfg: PrompterConfig) -> dict[str, torch.Tensor | int]:
    """P2PNet's loss with PromptNucSeg's weights: ``loss = cls + γ·reg`` (+ ``mask_loss_weight · mask``).

    ``cls``: cross entropy over every anchor of the batch; targets are the matched GT class or background
    (0), per-anchor weights β for background targets and 1 otherwise, averaged with those weights (PyTorch's
    weighted-CE mean, as in P2PNet). A matched anchor whose GT class is unknown (0) gets the foreground-only
    term −log(1 − p_bg) instead of a class CE. ``reg``: squared error in pixels² summed over x and y,
    averaged over matched points (the released code divides by the GT count, the same when A ≥ G); 0 with
    no match. Images without GT contribute background terms only. ``mask`` (when the outputs hold
    ``mask_logits`` and every target a H×W ``foreground``): the pixel mean of
    :func:`karyo.models.losses.binary_focal` (γ = 2, no α) of the logits upsampled bilinearly to the input size,
    as the released prompter does. Returns ``loss``, ``cls``, ``reg``, ``mask`` (unweighted; 0 without the head)
    and ``n_matched`` (int).
    """
    points, logits = outputs["points"], outputs["logits"]
    b, a, _ = logits.shape
    if len(targets) != b:
        raise InputError(None, f"{len(targets)} targets for a batch of {b} images")
    target_cls = torch.zeros(b, a, dtype=torch.long, device=logits.device)
    unknown = torch.zeros(b, a, dtype=torch.bool, device=logits.device)
    src_pts, tgt_pts = [], []
    for i, target in enumerate(targets):
        gt_points = target["points"].to(points.device, points.dtype)
        gt_classes = target["classes"].to(logits.device, torch.long)
        anchor_idx, gt_idx = hungarian_match(points[i], logits[i], gt_points, gt_classes, cfg.alpha,
                                             cfg.matches_per_nucleus, float(cfg.anchor_stride))
        cls = gt_classes[gt_idx]
        target_cls[i, anchor_idx] = cls
        unknown[i, anchor_idx] = cls == 0
        src_pts.append(points[i, anchor_idx])
        tgt_pts.append(gt_points[gt_idx])
    log_probs = logits.float().log_softmax(-1)
    ce = -log_probs.gather(-1, target_cls[..., None])[..., 0]
    # −log(1 − p_bg) = −log Σ_{c≥1} p_c: a logsumexp of the class log-probabilities (stable for p_bg → 1)
    fg_only = -(torch.logsumexp(log_probs[..., 1:], dim=-1))
    per_anchor = torch.where(unknown, fg_only, ce)
    is_bg = (target_cls == 0) & ~unknown
    weights = torch.where(is_bg, torch.full_like(ce, cfg.beta), torch.ones_like(ce))
    cls_loss = (weights * per_anchor).sum() / weights.sum()
    src, tgt = torch.cat(src_pts), torch.cat(tgt_pts)
    n_matched = int(src.shape[0])
    reg = ((src.float() - tgt.float()) ** 2).sum(-1).mean() if n_matched else points.sum() * 0.0
    loss = cls_loss + cfg.gamma * reg
    mask = cls_loss.new_zeros(())
    if "mask_logits" in outputs and cfg.mask_loss_weight > 0:
        if any("foreground" not in t for t in targets):
            raise InputError(None, "the prompter's mask head needs a 'foreground' map in every target")
        foreground = torch.stack([t["foreground"] for t in targets]).to(logits.device)
        upsampled = torch.nn.functional.interpolate(outputs["mask_logits"].float(), size=foreground.shape[-2:],
                                                    mode="bilinear", align_corners=False)[:, 0]
        mask = binary_focal(upsampled, foreground.float()).mean()
        loss = loss + cfg.mask_loss_weight * mask
    return {"loss": loss, "cls": cls_loss, "reg": reg, "mask": mask, "n_matched": n_matched}


# --------------------------------------------------------------------------------------------- decoding


@dataclass
class PointPrediction:
    """Decoded points of one image: (x, y) pixels, class 1..C, foreground score, P(class | nucleus) N×C."""

    points: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    class_probs: np.ndarray

    def __len__(self) -> int:
        return int(self.points.shape[0])


def point_nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Greedy distance NMS: indices (by descending score) of points kept; a point within ``radius`` px of
    a higher-scoring kept point is dropped. Neighbour pairs come from a KD-tree; the loop only visits
    points in score order (not pairs)."""
    order = np.argsort(-scores, kind="stable")
    if radius <= 0 or len(order) < 2:
        return order
    pairs = cKDTree(points).query_pairs(r=radius, output_type="ndarray")
    if len(pairs) == 0:
        return order
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    # direct each pair from the higher-ranked (better) point to the lower-ranked one
    hi = np.where(rank[pairs[:, 0]] < rank[pairs[:, 1]], pairs[:, 0], pairs[:, 1])
    lo = pairs[:, 0] + pairs[:, 1] - hi
    by_hi = np.argsort(hi, kind="stable")
    hi, lo = hi[by_hi], lo[by_hi]
    starts = np.searchsorted(hi, np.arange(len(points)))
    ends = np.searchsorted(hi, np.arange(len(points)), side="right")
    removed = np.zeros(len(points), dtype=bool)
    keep = []
    for idx in order:
        if removed[idx]:
            continue
        keep.append(idx)
        removed[lo[starts[idx]:ends[idx]]] = True
    return np.asarray(keep, dtype=np.int64)


@torch.no_grad()
def decode_points(outputs: dict[str, torch.Tensor], score_threshold: float | None = None,
                  nms_radius_px: float | None = None) -> list[PointPrediction]:
    """Per image: anchors with foreground probability 1 − p_bg ≥ ``score_threshold`` (default 0.5), then
    greedy distance NMS with ``nms_radius_px`` (default: none). Class = argmax of the C class
    probabilities; ``class_probs`` are those probabilities renormalised to sum to 1 (P(class | nucleus))."""
    threshold = 0.5 if score_threshold is None else float(score_threshold)
    probs = outputs["logits"].detach().float().softmax(-1).cpu().numpy()
    points = outputs["points"].detach().float().cpu().numpy()
    results = []
    for pts, pr in zip(points, probs, strict=True):
        score = 1.0 - pr[:, 0]
        sel = np.flatnonzero(score >= threshold)
        keep = sel[point_nms(pts[sel], score[sel], nms_radius_px or 0.0)]
        cls_p = pr[keep, 1:]
        cls_p = cls_p / np.maximum(cls_p.sum(-1, keepdims=True), 1e-12)
        results.append(PointPrediction(points=pts[keep].astype(np.float32),
                                       classes=(cls_p.argmax(-1) + 1).astype(np.int64) if len(keep)
                                       else np.zeros(0, np.int64),
                                       scores=score[keep].astype(np.float32),
                                       class_probs=cls_p.astype(np.float32)))
    return results
