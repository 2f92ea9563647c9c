"""Losses shared by karyo's networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["binary_focal"]


def binary_focal(logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float | None = None) -> Tensor:
    """Per-element binary focal loss ``−(1 − p_t)^γ · log p_t`` (Lin et al. 2017), not reduced, so callers average
    over the axes they need. ``alpha`` (optional) weights targets 1 by α and targets 0 by 1 − α; PromptNucSeg's
    segmentor and prompter losses (pytorch-toolbelt's ``BinaryFocalLoss``) use none."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    focal = ce * (1.0 - torch.exp(-ce)) ** gamma  # exp(−ce) = p_t
    if alpha is not None:
        focal = focal * (alpha * target + (1 - alpha) * (1 - target))
    return focal
