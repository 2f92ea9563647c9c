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
* Background prompts (a karyo addition, off by default): positive points placed on no nucleus, whose target is
  the empty mask and whose IoU target is 0 (:func:`sample_background_prompts`). The paper's segmentor only ever
  sees prompts on nuclei, so a prompter false positive still yields a confident nucleus-shaped mask; these
  prompts teach the mask and the IoU head to say "nothing here", which inference's score and verifier can use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from karyo.models.losses import binary_focal

__all__ = ["BACKGROUND_ID", "PromptBatch", "crop_targets", "sample_background_prompts", "sample_prompt_batch",
           "sample_prompts", "segmentor_loss"]

BACKGROUND_ID = -1
"""Instance id of a background prompt: it matches no pixel, so :func:`crop_targets` gives it the empty mask."""


def _nucleus_anchor(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float) -> tuple[float, float]:
    """The centroid when its pixel belongs to the nucleus, else the nucleus pixel nearest to it; as (x, y)."""
    iy, ix = int(np.floor(cy + 0.5)), int(np.floor(cx + 0.5))
    if np.any((ys == iy) & (xs == ix)):
        return cx, cy
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return float(xs[i]), float(ys[i])


class _Nuclei:
    """Ids, centroids and (lazily) in-nucleus anchor points of an instance map, in one bincount pass."""

    def __init__(self, inst: np.ndarray):
        ids = np.unique(inst)
        self.ids = ids[ids > 0]
        n = len(self.ids)
        flat = inst.ravel()
        where = np.flatnonzero(flat > 0)
        lab = np.searchsorted(self.ids, flat[where])
        self._rr, self._cc = np.divmod(where, inst.shape[1])
        counts = np.bincount(lab, minlength=n)
        self.cy = np.bincount(lab, self._rr, minlength=n) / counts  # every id has pixels: counts ≥ 1
        self.cx = np.bincount(lab, self._cc, minlength=n) / counts
        self._pixels = np.split(np.argsort(lab, kind="stable"), np.cumsum(counts)[:-1]) if n else []
        self._anchors: dict[int, tuple[float, float]] = {}

    def anchor(self, j: int) -> tuple[float, float]:
        if j not in self._anchors:
            px = self._pixels[j]
            self._anchors[j] = _nucleus_anchor(self._rr[px], self._cc[px], self.cy[j], self.cx[j])
        return self._anchors[j]

    def random_pixel(self, j: int, rng: np.random.Generator) -> tuple[float, float]:
        """A pixel of nucleus ``j``, uniformly, as (x, y)."""
        k = self._pixels[j][rng.integers(len(self._pixels[j]))]
        return float(self._cc[k]), float(self._rr[k])

    def nearest_negatives(self, x: float, y: float, k_neg: int, exclude: int | None = None
                          ) -> list[tuple[float, float]]:
        """Anchors of the k_neg nuclei whose centroids are nearest to (x, y), ``exclude`` left out."""
        dist = (self.cx - x) ** 2 + (self.cy - y) ** 2
        if exclude is not None:
            dist[exclude] = np.inf
        available = len(self.ids) - (exclude is not None)
        return [self.anchor(int(j)) for j in np.argsort(dist, kind="stable")[: max(0, min(k_neg, available))]]


def _no_prompts(n_pts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((0, n_pts, 2), np.float32), np.zeros((0, n_pts), np.int64), np.zeros(0, np.int64)


def sample_prompts(instances: np.ndarray, z: int = 25, k_neg: int = 1, jitter_px: float = 2.0,
                   rng: np.random.Generator | int | None = None, negative_dropout: float = 0.0,
                   inside_share: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    ``inside_share`` (a karyo addition, as SAM samples its training points): the share of positives drawn
    uniformly from the nucleus' pixels instead of near its centre. A prompter point on an elongated nucleus often
    sits near one end; a segmentor trained only on central points then segments part of it. At 0 no extra random
    numbers are drawn.
    """
    for name, share in (("negative_dropout", negative_dropout), ("inside_share", inside_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be an H×W label map, got shape {inst.shape}")
    rng = np.random.default_rng(rng)
    n_pts = 1 + k_neg
    nuclei = _Nuclei(inst)
    ids, n, cx, cy, anchor = nuclei.ids, len(nuclei.ids), nuclei.cx, nuclei.cy, nuclei.anchor
    if n == 0 or z <= 0:
        return _no_prompts(n_pts)
    h, w = inst.shape

    chosen = rng.choice(n, size=min(z, n), replace=False)
    points = np.zeros((len(chosen), n_pts, 2), np.float32)
    labels = np.full((len(chosen), n_pts), -1, np.int64)
    for row, j in enumerate(chosen):
        x, y = anchor(j)
        if inside_share > 0 and rng.random() < inside_share:
            x, y = nuclei.random_pixel(j, rng)
        elif jitter_px > 0:
            for _ in range(8):
                dx, dy = rng.uniform(-jitter_px, jitter_px, size=2)
                ix, iy = int(np.floor(x + dx + 0.5)), int(np.floor(y + dy + 0.5))
                if 0 <= iy < h and 0 <= ix < w and inst[iy, ix] == ids[j]:
                    x, y = x + dx, y + dy
                    break
        points[row, 0] = (x, y)
        labels[row, 0] = 1
        if k_neg > 0 and n > 1 and not (negative_dropout > 0 and rng.random() < negative_dropout):
            for col, other in enumerate(nuclei.nearest_negatives(cx[j], cy[j], k_neg, exclude=j), start=1):
                points[row, col] = other
                labels[row, col] = 0
    return points, labels, ids[chosen].astype(np.int64)


def sample_background_prompts(instances: np.ndarray, count: int, k_neg: int = 1,
                              rng: np.random.Generator | int | None = None, intensity: np.ndarray | None = None,
                              margin_px: float = 4.0, dark_share: float = 0.5, dark_quantile: float = 0.1
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts on no nucleus, in :func:`sample_prompts`' layout, with instance id :data:`BACKGROUND_ID`.

    The positive point is a background pixel at least ``margin_px`` from every nucleus (a point closer than that
    could be a prompter hit on a nucleus' rim). ``dark_share`` of them come from the darkest ``dark_quantile`` of
    those pixels in ``intensity`` (H×W, e.g. the mean of the normalised channels: dark, nucleus-like background
    such as dye, pigment or dense stroma is where prompter false positives lie), the rest uniformly from the
    remaining eligible pixels. Negatives are the anchors of the K nearest nuclei, as the nearest other prompts
    are at inference. Fewer than ``count`` prompts come back only when fewer eligible pixels exist.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be an H×W label map, got shape {inst.shape}")
    if intensity is not None and np.shape(intensity) != inst.shape:
        raise ValueError(f"intensity must have the instance map's shape {inst.shape}, got {np.shape(intensity)}")
    n_pts = 1 + k_neg
    rng = np.random.default_rng(rng)
    if count <= 0:
        return _no_prompts(n_pts)
    background = inst == 0
    if not background.all():
        background = ndimage.distance_transform_edt(background) >= margin_px
    eligible = np.flatnonzero(background)
    if len(eligible) == 0:
        return _no_prompts(n_pts)
    dark = np.zeros(0, np.int64)
    if intensity is not None and dark_share > 0:
        values = np.asarray(intensity, np.float64).ravel()[eligible]
        darkest = eligible[values <= np.quantile(values, dark_quantile)]
        dark = rng.choice(darkest, size=min(round(count * dark_share), len(darkest)), replace=False)
        eligible = np.setdiff1d(eligible, dark, assume_unique=True)
    uniform = rng.choice(eligible, size=min(count - len(dark), len(eligible)), replace=False)
    where = np.sort(np.concatenate([dark, uniform]))
    nuclei = _Nuclei(inst)
    points = np.zeros((len(where), n_pts, 2), np.float32)
    labels = np.full((len(where), n_pts), -1, np.int64)
    ys, xs = np.divmod(where, inst.shape[1])
    for row, (y, x) in enumerate(zip(ys, xs, strict=True)):
        points[row, 0] = (x, y)
        labels[row, 0] = 1
        for col, other in enumerate(nuclei.nearest_negatives(x, y, k_neg), start=1):
            points[row, col] = other
            labels[row, col] = 0
    return points, labels, np.full(len(where), BACKGROUND_ID, np.int64)


class PromptBatch(NamedTuple):
    """Prompts of a batch of images, concatenated: what :meth:`Segmentor.decode` and :func:`crop_targets` take."""

    points: Tensor  # P×(1+K)×2 float32
    labels: Tensor  # P×(1+K) int64
    image_index: Tensor  # P int64
    instance_ids: Tensor  # P int64


def sample_prompt_batch(instances: np.ndarray | Sequence[np.ndarray], z: int = 25, k_neg: int = 1,
                        jitter_px: float = 2.0, rng: np.random.Generator | int | None = None,
                        negative_dropout: float = 0.0, background: int = 0,
                        intensity: np.ndarray | Sequence[np.ndarray] | None = None, inside_share: float = 0.0
                        ) -> PromptBatch:
    """:func:`sample_prompts` for each H×W map of a B×H×W batch, concatenated with the image index of each;
    with ``background`` > 0 each image also gets that many :func:`sample_background_prompts` (after its nucleus
    prompts; ``intensity`` B×H×W picks the dark ones). At 0 the random stream is that of earlier runs."""
    rng = np.random.default_rng(rng)
    parts = []
    for b, inst in enumerate(instances):
        parts.append(sample_prompts(inst, z, k_neg, jitter_px, rng, negative_dropout, inside_share))
        if background > 0:
            parts[-1] = tuple(np.concatenate(pair) for pair in zip(parts[-1], sample_background_prompts(
                inst, background, k_neg, rng, None if intensity is None else intensity[b]), strict=True))
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
    target is SAM's, the IoU of the thresholded mask (PromptNucSeg uses a soft IoU), and 0 for an empty target
    (a background prompt), whose mask is trained by the focal term alone. Returns ``loss`` and its
    parts ``focal``, ``dice``, ``iou`` (scalar tensors).
    """
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0 + iou_pred.sum() * 0.0
        return {"loss": zero, "focal": zero.detach(), "dice": zero.detach(), "iou": zero.detach()}
    t = target[:, None].to(mask_logits.dtype).expand_as(mask_logits)
    prob = torch.sigmoid(mask_logits)
    focal = binary_focal(mask_logits, t, gamma, alpha).mean(dim=(2, 3))
    dice = 1 - (2 * (prob * t).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1)
    # an empty target's dice is 1 − 1/(Σp + 1): it punishes a total probability of 0.5 as hard as a missed
    # nucleus and drags every mask towards empty; the focal term alone trains background prompts
    dice = dice * t.flatten(2).amax(dim=2)
    with torch.no_grad():
        pred = mask_logits > 0
        tb = t > 0.5
        inter = (pred & tb).sum(dim=(2, 3)).float()
        union = (pred | tb).sum(dim=(2, 3)).float()
        # a target without foreground (a background prompt) has no nucleus to cover: IoU target 0
        iou_true = torch.where(tb.any(dim=(2, 3)), inter / union.clamp(min=1), torch.zeros_like(union))
    iou_mse = (iou_pred - iou_true.to(iou_pred.dtype)) ** 2
    mask_loss = omega * focal + dice
    best = mask_loss.argmin(dim=1, keepdim=True)
    focal_b, dice_b = focal.gather(1, best)[:, 0], dice.gather(1, best)[:, 0]
    loss = (omega * focal_b + dice_b).mean() + iou_mse.mean()
    return {"loss": loss, "focal": focal_b.mean().detach(), "dice": dice_b.mean().detach(),
            "iou": iou_mse.mean().detach()}
