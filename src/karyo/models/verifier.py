"""A second look at each PromptNucSeg mask: is it a nucleus?

The prompter decides alone which points become nuclei, from stride-8 features. Its false positives cost the
model the most validation PQ (error budget in docs/benchmarks.md), and the candidate score separates masks on
nuclei from the rest poorly. The segmentor has looked at each point's neighbourhood at full resolution: how
confident and how large its mask is says more. A logistic regression over six numbers per mask, fitted on the
training images (:func:`karyo.train.verifier.fit_verifier`), ranks the shipped model's training masks at ROC AUC
0.886 against 0.829 for the candidate score alone, and raised validation PQ by 0.010 at the same point setting.
This is a karyo addition, not part of PromptNucSeg. It is cheap (no network) and lives in the model's config, so
config + weights still rebuild the model.

Features, all taken at mask probability 0.5 so that they do not move with the resolve threshold:
``score`` (prompter probability × √predicted IoU, the candidate's ranking score), ``prompter_score``,
``predicted_iou`` (the segmentor's IoU head), ``log_area`` (log(1 + pixels)), ``mean_probability`` (mean mask
probability over its pixels) and ``stability`` (SAM's stability score, :func:`~karyo.infer.assemble.stability_scores`).
No class: the feature set is the same for every taxonomy (and for IVAAN, whose candidates carry prompt indices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from karyo.infer.assemble import stability_scores

FEATURES = ("score", "prompter_score", "predicted_iou", "log_area", "mean_probability", "stability")
FEATURE_THRESHOLD = 0.5  # mask probability the features are measured at


@dataclass
class LogisticConfig:
    """A fitted logistic regression on standardised features: P = σ(w · (x − mean) / scale + b). Subclasses name
    their features in ``FEATURES``; unset lists default to the identity standardisation and zero weights."""

    FEATURES: ClassVar[tuple[str, ...]] = ()
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    bias: float = 0.0
    features: list[str] = field(default_factory=list)  # the order of the lists above
    fit: dict = field(default_factory=dict)  # how it was fitted (images, settings, AUC): for the audit trail

    def __post_init__(self) -> None:
        names, n = list(self.FEATURES), len(self.FEATURES)
        self.features = list(self.features) or names
        self.mean = list(self.mean) or [0.0] * n
        self.scale = list(self.scale) or [1.0] * n
        self.weights = list(self.weights) or [0.0] * n
        kind = type(self).__name__
        if self.features != names:
            raise ValueError(f"{kind} features {self.features} are not this karyo's {names}")
        if not len(self.mean) == len(self.scale) == len(self.weights) == n:
            raise ValueError(f"{kind} mean, scale and weights need {n} values each")

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P for each row of ``features`` (N × len(FEATURES))."""
        z = (np.asarray(features, np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))


@dataclass
class VerifierConfig(LogisticConfig):
    """P(the mask is a nucleus) from the :data:`FEATURES` of its candidate."""

    FEATURES: ClassVar[tuple[str, ...]] = FEATURES


def candidate_features(probs: torch.Tensor, scores: np.ndarray, prompter_scores: np.ndarray,
                       predicted_iou: np.ndarray) -> np.ndarray:
    """N × len(:data:`FEATURES`) for N window masks (``probs`` N×H×W in [0, 1])."""
    probs = probs.detach().float().cpu()
    fg = probs > FEATURE_THRESHOLD
    area = fg.flatten(1).sum(1).double()
    mean_probability = (probs * fg).flatten(1).sum(1).double() / area.clamp(min=1)
    return np.column_stack([np.asarray(scores, np.float64), np.asarray(prompter_scores, np.float64),
                            np.asarray(predicted_iou, np.float64), np.log1p(area.numpy()),
                            mean_probability.numpy(), stability_scores(probs, FEATURE_THRESHOLD)])
