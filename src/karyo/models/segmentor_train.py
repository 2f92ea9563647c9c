"""Training utilities for the promptable segmentor (PromptNucSeg's segmentor fine-tuning recipe).

PromptNucSeg (Shui et al. 2024, supplementary A) samples Z = 25 nuclei per training image, prompts each with one
positive point (the nucleus centre) and K = 1 negative point on a neighbouring nucleus, and trains with SAM's
loss: ω·focal + dice (ω = 20, SAM's 20:1) plus an MSE between the predicted and the actual mask IoU.

Choices made here (documented deviations):

* The loss is computed on the mask-logit grid (stride ``stride_out``, 2 px for the ``"small"`` preset) with
  targets area-downsampled by :func:`crop_targets` (a logit pixel is foreground when ≥ half of its input pixels
  are), rather than on logits upsampled to full resolution: 4–16× cheaper on CPU, and a ~30-px nucleus still
  spans ~15 logit pixels.
* Targets exist only inside each prompt's decode window (the decoder does not see beyond it).
* A prompt point that would fall outside a non-convex nucleus (its centroid lies in the background or in another
  nucleus) is moved to the nucleus pixel nearest the centroid — for negatives as well, so a negative point always
  lies on its neighbour.
* With multimask outputs only the lowest-loss mask of each prompt receives the mask loss (SAM); the IoU head is
  trained on all masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from karyo.models.losses import binary_focal

__all__ = ["PromptBatch", "crop_targets", "sample_prompt_batch", "sample_prompts", "segmentor_loss"]


def _nucleus_anchor(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float) -> tuple[float, float]:
    """The centroid when its pixel belongs to the nucleus, else the nucleus pixel nearest to it; as (x, y)."""
    iy, ix = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
    if np.any((ys == iy) & (xs == ix)):
        return cx, cy
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[i]), float(ys[i])


def sample_prompts(instances: np.ndarray, z: int = 25, k_neg: int = 1, jitter_px: float = 2.0,
                   rng: np.random.Generator | int | None = None, negative_dropout: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample PromptNucSeg training prompts from an H×W instance map (0 = background).

    Returns ``points`` Z'×(1+K)×2 float32 (x, y in pixel-index coordinates), ``labels`` Z'×(1+K) int64 (1 for the
    positive, 0 for negatives, −1 padding where fewer than K other nuclei exist; padding points are (0, 0)) and
    the Z' sampled instance ids, Z' = min(z, number of nuclei) (sampling without replacement).
    The positive is the nucleus' centroid (or its nearest in-mask pixel) plus uniform jitter in
    [−jitter_px, jitter_px]² that is kept only when the jittered point still lies in the nucleus (8 tries);
    negatives are the anchors of the K nuclei whose centroids are nearest.

    ``negative_dropout`` (a karyo addition, not in the paper): the share of prompts whose negatives are all
    replaced by padding. Inference decodes every point once *without* negatives to find duplicates (mask NMS)
    and to re-centre points; a segmentor that never saw such prompts lets those masks bleed into neighbours.
    At 0 no extra random numbers are drawn, so earlier runs replay exactly.
    """
    if not 0.0 <= negative_dropout <= 1.0:
        raise ValueError(f"negative_dropout must lie in [0, 1], got {negative_dropout}")
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be an H×W label map, got shape {inst.shape}")
    rng = np.random.default_rng(rng)
    n_pts = 1 + k_neg
    ids = np.unique(inst)
    ids = ids[ids > 0]
    n = len(ids)
    if n == 0 or z <= 0:
        return (np.zeros((0, n_pts, 2), np.float32), np.zeros((0, n_pts), np.int64), np.zeros(0, np.int64))
    h, w = inst.shape
    flat = inst.ravel()
    where = np.flatnonzero(flat > 0)
    lab = np.searchsorted(ids, flat[where])
    rr, cc = np.divmod(where, w)
    counts = np.bincount(lab, minlength=n)
    cy = np.bincount(lab, rr, minlength=n) / counts
    cx = np.bincount(lab, cc, minlength=n) / counts
    order = np.argsort(lab, kind="stable")
    pixels = np.split(order, np.cumsum(counts)[:-1])
    anchors: dict[int, tuple[float, float]] = {}

    def anchor(j: int) -> tuple[float, float]:
        if j not in anchors:
            anchors[j] = _nucleus_anchor(rr[pixels[j]], cc[pixels[j]], cy[j], cx[j])
        return anchors[j]

    chosen = rng.choice(n, size=min(z, n), replace=False)
    points = np.zeros((len(chosen), n_pts, 2), np.float32)
    labels = np.full((len(chosen), n_pts), -1, np.int64)
    for row, j in enumerate(chosen):
        x, y = anchor(j)
        if jitter_px > 0:
            for _ in range(8):
                dx, dy = rng.uniform(-jitter_px, jitter_px, size=2)
                ix, iy = int(np.floor(x + dx + 0.5)), int(np.floor(y + dy + 0.5))
                if 0 <= iy < h and 0 <= ix < w and inst[iy, ix] == ids[j]:
                    x, y = x + dx, y + dy
                    break
        points[row, 0] = (x, y)
        labels[row, 0] = 1
        if k_neg > 0 and n > 1 and not (negative_dropout > 0 and rng.random() < negative_dropout):
            dist = (cx - cx[j]) ** 2 + (cy - cy[j]) ** 2
            dist[j] = np.inf
            for col, other in enumerate(np.argsort(dist, kind="stable")[: min(k_neg, n - 1)], start=1):
                points[row, col] = anchor(int(other))
                labels[row, col] = 0
    return points, labels, ids[chosen].astype(np.int64)


class PromptBatch(NamedTuple):
    """Prompts of a batch of images, concatenated: what :meth:`Segmentor.decode` and :func:`crop_targets` take."""

    points: Tensor  # P×(1+K)×2 float32
    labels: Tensor  # P×(1+K) int64
    image_index: Tensor  # P int64
    instance_ids: Tensor  # P int64


def sample_prompt_batch(instances: np.ndarray | Sequence[np.ndarray], z: int = 25, k_neg: int = 1,
                        jitter_px: float = 2.0, rng: np.random.Generator | int | None = None,
                        negative_dropout: float = 0.0) -> PromptBatch:
    """:func:`sample_prompts` for each H×W map of a B×H×W batch, concatenated with the image index of each."""
    rng = np.random.default_rng(rng)
    parts = [sample_prompts(inst, z, k_neg, jitter_px, rng, negative_dropout) for inst in instances]
    points = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 1 + k_neg, 2), np.float32)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 1 + k_neg), np.int64)
    ids = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    index = np.concatenate([np.full(len(p[2]), b, np.int64) for b, p in enumerate(parts)]) if parts else ids
    return PromptBatch(torch.from_numpy(points), torch.from_numpy(labels), torch.from_numpy(index),
                       torch.from_numpy(ids))


def crop_targets(instances: Tensor, image_index: Tensor, instance_ids: Tensor, window_xyxy: Tensor,
                 stride_out: int) -> Tensor:
    """P×Hm×Wm binary targets on each prompt's mask-logit grid.

    ``instances`` B×H×W instance maps, ``image_index``/``instance_ids`` P, ``window_xyxy`` P×4 pixel windows (all
    of one size, as :meth:`Segmentor.decode` returns them; parts outside the image are background). The nucleus
    mask is cropped to the window and downsampled by ``stride_out`` with area averaging, thresholded at ≥ 0.5.
    """
    if window_xyxy.shape[0] == 0:
        return instances.new_zeros((0, 0, 0), dtype=torch.float32)
    device = instances.device
    win = window_xyxy.to(device=device, dtype=torch.long)
    sizes = torch.stack([win[:, 3] - win[:, 1], win[:, 2] - win[:, 0]], dim=1)
    if (sizes != sizes[0]).any():
        raise ValueError("all windows must have the same size")
    hp, wp = int(sizes[0, 0]), int(sizes[0, 1])
    _, h, w = instances.shape
    rows = win[:, 1, None] + torch.arange(hp, device=device)
    cols = win[:, 0, None] + torch.arange(wp, device=device)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    idx = image_index.to(device=device, dtype=torch.long)[:, None, None]
    vals = instances[idx, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    fg = ((vals == instance_ids.to(device)[:, None, None]) & valid).float()
    if stride_out > 1:
        fg = F.avg_pool2d(fg[:, None], stride_out)[:, 0]
    return (fg >= 0.5).float()


def segmentor_loss(mask_logits: Tensor, target: Tensor, iou_pred: Tensor, omega: float = 20.0,
                   alpha: float | None = None, gamma: float = 2.0) -> dict[str, Tensor]:
    """SAM / PromptNucSeg loss: ``ω·focal + dice + MSE(iou_pred, IoU(logits > 0, target))``, mean over prompts.

    ``mask_logits`` P×M×h×w, ``target`` P×h×w in {0, 1}, ``iou_pred`` P×M. The focal loss (Lin et al. 2017,
    γ = 2) is averaged over pixels; by default without the α class weighting, as PromptNucSeg's implementation
    (pytorch-toolbelt's ``BinaryFocalLoss``) — RetinaNet's α = 0.25 down-weights the (small) nucleus and trains
    markedly slower from scratch. Dice is the soft dice of the sigmoid probabilities (+1 smoothing); the IoU
    target is SAM's, the IoU of the thresholded mask (PromptNucSeg uses a soft IoU). Returns ``loss`` and its
    parts ``focal``, ``dice``, ``iou`` (scalar tensors).
    """
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0 + iou_pred.sum() * 0.0
        return {"loss": zero, "focal": zero.detach(), "dice": zero.detach(), "iou": zero.detach()}
    t = target[:, None].to(mask_logits.dtype).expand_as(mask_logits)
    prob = torch.sigmoid(mask_logits)
    focal = binary_focal(mask_logits, t, gamma, alpha).mean(dim=(2, 3))
    dice = 1 - (2 * (prob * t).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1)
    with torch.no_grad():
        pred = mask_logits > 0
        tb = t > 0.5
        inter = (pred & tb).sum(dim=(2, 3)).float()
        union = (pred | tb).sum(dim=(2, 3)).float()
        iou_true = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_mse = (iou_pred - iou_true.to(iou_pred.dtype)) ** 2
    mask_loss = omega * focal + dice
    best = mask_loss.argmin(dim=1, keepdim=True)
    focal_b, dice_b = focal.gather(1, best)[:, 0], dice.gather(1, best)[:, 0]
    loss = (omega * focal_b + dice_b).mean() + iou_mse.mean()
    return {"loss": loss, "focal": focal_b.mean().detach(), "dice": dice_b.mean().detach(),
            "iou": iou_mse.mean().detach()}
