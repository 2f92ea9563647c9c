"""Per-prompt masks → one instance map (PromptNucSeg inference, overlap resolution).

Each prompt yields a probability mask over its decode window. A pixel goes to the prompt with the highest
probability there (among those above the threshold): one scatter-max over all window pixels, no loop over
prompts. An instance that keeps less than ``min_kept_fraction`` of its own mask lost it to a neighbour that
claimed the same nucleus (a duplicate prompt) and is dropped; each instance keeps its largest connected piece.

``suppress_duplicate_masks`` is mask-level non-maximum suppression, as SAM's automatic mask generator does with
boxes: best score first, every mask that mostly lies inside a better-scored one is removed. PromptNucSeg runs it on
masks decoded without negatives, before it chooses negative prompts (``PromptNucSegModel.mask_candidates``), so a
second point on a nucleus is dropped instead of cutting the nucleus in two.

``stability_scores`` is SAM's mask stability (Kirillov et al. 2023, §"automatic mask generation"; its
``calculate_stability_score``): a mask that hardly changes when the threshold moves is confident. PromptNucSeg
can drop detected points whose masks are unstable (``PromptNucSegConfig.min_stability``, off by default: faint
nuclei in dense tissue are unstable too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from skimage.measure import label as connected_label


@dataclass
class Assembly:
    instances: np.ndarray  # H×W int32, instance k+1 ↔ prompt prompt_index[k]
    prompt_index: np.ndarray  # which prompt each instance 1..N came from
    mask_area: np.ndarray  # pixels of each kept prompt's own mask (before resolution)


def assemble_instances(probs: torch.Tensor, windows: torch.Tensor, image_shape: tuple[int, int],
                       scores: torch.Tensor | np.ndarray | None = None, *, threshold: float = 0.5,
                       min_area: int = 8, min_kept_fraction: float = 0.35) -> Assembly:
    """Resolve P window masks (``probs`` P×Hw×Ww in [0, 1], ``windows`` P×4 pixel boxes x0, y0, x1, y1 in the
    image, possibly extending past it) into an H×W instance map. Ties go to the higher ``scores``."""
    h, w = int(image_shape[0]), int(image_shape[1])
    p = probs.shape[0]
    if p == 0:
        return Assembly(np.zeros((h, w), np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    probs = probs.detach().float().cpu()
    windows = windows.detach().long().cpu()
    hw, ww = probs.shape[1], probs.shape[2]
    rows = windows[:, 1, None] + torch.arange(hw)  # P×Hw
    cols = windows[:, 0, None] + torch.arange(ww)  # P×Ww
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    fg = (probs > threshold) & inside
    own_area = fg.flatten(1).sum(1)
    pix = (rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :])
    sel = fg.nonzero(as_tuple=True)
    flat_pix = pix[sel]
    # Rank = probability with a tiny tie-break by prompt score, so equal probabilities resolve deterministically.
    if scores is None:
        tie = torch.zeros(p)
    else:
        s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).float()
        tie = (s - s.min()) / (s.max() - s.min() + 1e-12) * 1e-4
    value = probs[sel] + tie[sel[0]]
    best = torch.full((h * w,), -1.0).scatter_reduce(0, flat_pix, value, "amax")
    win_mask = value >= best[flat_pix]
    owner = torch.full((h * w,), -1, dtype=torch.long)
    owner.scatter_reduce_(0, flat_pix[win_mask], sel[0][win_mask], "amax")
    owner = owner.view(h, w).numpy()
    labels = np.where(owner >= 0, owner + 1, 0).astype(np.int64)  # label = prompt index + 1
    labels = largest_piece(labels)
    kept_area = np.bincount(labels.ravel(), minlength=p + 1)[1:]
    own = own_area.numpy()
    ok = (kept_area >= min_area) & (kept_area >= min_kept_fraction * np.maximum(own, 1))
    lut = np.zeros(p + 1, np.int32)
    kept = np.flatnonzero(ok)
    lut[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return Assembly(lut[labels], kept.astype(np.int64), own[kept].astype(np.int64))


def mask_overlaps(probs: torch.Tensor, windows: torch.Tensor, threshold: float = 0.5
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, intersection, area): every pair a < b of window masks (above ``threshold``) that share a pixel, with
    the pixels they share, and each mask's own area. Windows may extend past the image; that is harmless here."""
    p = probs.shape[0]
    probs = probs.detach().float().cpu()
    windows = windows.detach().long().cpu()
    fg = probs > threshold
    area = fg.flatten(1).sum(1).numpy()
    empty = np.zeros(0, np.int64)
    if p < 2:
        return empty, empty, empty, area
    # Pixel ids in one frame spanning all windows.
    x0, y0 = windows[:, 0] - windows[:, 0].min(), windows[:, 1] - windows[:, 1].min()
    width = int(x0.max()) + probs.shape[2]
    mask_of, ys, xs = fg.nonzero(as_tuple=True)
    pix = ((y0[mask_of] + ys) * width + x0[mask_of] + xs).numpy()
    owner = mask_of.numpy()
    order = np.lexsort((owner, pix))
    pix, owner = pix[order], owner[order]
    # Every pair of masks sharing a pixel, once per shared pixel: compare each entry with the ones after it
    # in its pixel's run (runs are short: a pixel lies in few masks).
    codes = []
    for step in range(1, p):
        same = pix[:-step] == pix[step:]
        if not same.any():
            break
        codes.append(owner[:-step][same] * p + owner[step:][same])
    if not codes:
        return empty, empty, empty, area
    pair, inter = np.unique(np.concatenate(codes), return_counts=True)
    return pair // p, pair % p, inter, area


def suppress_pairs(n: int, better: np.ndarray, worse: np.ndarray, scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices (ascending) of the ``n`` items to keep when each listed pair says ``worse`` duplicates ``better``:
    greedily by descending ``scores``, a kept item drops its listed worse partners (a dropped item drops nothing)."""
    partners: dict[int, list[int]] = {}
    for i, j in zip(np.asarray(better).tolist(), np.asarray(worse).tolist(), strict=True):
        partners.setdefault(i, []).append(j)
    dropped = np.zeros(n, bool)
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable").tolist():
        if not dropped[i]:
            for j in partners.get(i, ()):
                dropped[j] = True
    return np.flatnonzero(~dropped)


def suppress_duplicate_masks(probs: torch.Tensor, windows: torch.Tensor, scores: np.ndarray | torch.Tensor,
                             *, threshold: float = 0.5, max_overlap: float = 0.5) -> np.ndarray:
    """Indices (ascending) of the window masks to keep: greedily by descending ``scores``, a mask is dropped when
    more than ``max_overlap`` of the smaller of it and a kept mask is their intersection. Masks above
    ``threshold`` only; an empty mask is kept (``assemble_instances`` drops it by area)."""
    a, b, inter, area = mask_overlaps(probs, windows, threshold)
    dup = inter > max_overlap * np.maximum(np.minimum(area[a], area[b]), 1)
    a, b = a[dup], b[dup]
    # Both directions: whichever of the two ranks higher drops the other.
    return suppress_pairs(probs.shape[0], np.r_[a, b], np.r_[b, a], scores)


def stability_scores(probs: torch.Tensor, threshold: float = 0.5, offset: float = 1.0) -> np.ndarray:
    """Per mask (``probs`` P×H×W in [0, 1]): area above the threshold raised by ``offset`` in logit space, over the
    area above it lowered by ``offset`` (the IoU of the two nested masks; SAM's offset is 1.0). An empty mask
    scores 0."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"mask threshold must lie in (0, 1), got {threshold}")
    logit = float(np.log(threshold / (1.0 - threshold)))
    hi, lo = (1.0 / (1.0 + np.exp(-(logit + d))) for d in (offset, -offset))
    probs = probs.detach().float().cpu().flatten(1)
    inner = (probs > hi).sum(1).double()
    outer = (probs > lo).sum(1).double()
    return (inner / outer.clamp(min=1)).numpy()


def largest_piece(labels: np.ndarray) -> np.ndarray:
    """Keep only the largest 4-connected piece of every label (vectorised: one labelling pass)."""
    if labels.max(initial=0) == 0:
        return labels
    pieces = connected_label(labels, background=0, connectivity=1)
    n = int(pieces.max())
    size = np.bincount(pieces.ravel(), minlength=n + 1)
    owner = np.zeros(n + 1, np.int64)
    owner[pieces.ravel()] = labels.ravel()
    piece_ids = np.arange(1, n + 1)
    # Sort pieces by (owner, size): the last piece of each owner is its largest.
    order = np.lexsort((size[1:], owner[1:]))
    own_sorted = owner[1:][order]
    last = np.r_[own_sorted[1:] != own_sorted[:-1], True]
    keep = np.zeros(n + 1, bool)
    keep[piece_ids[order][last]] = True
    return np.where(keep[pieces], labels, 0)
