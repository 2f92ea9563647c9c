"""Fitting PromptNucSeg's mask verifier (:mod:`karyo.models.verifier`) and duplicate judge
(:mod:`karyo.models.duplicates`) on a training run's training images.

Each image's candidates are made exactly as inference makes them, at :data:`FIT_SETTINGS`; a candidate is a
nucleus when its mask (probability > 0.5) overlaps an annotated nucleus at IoU > :data:`MATCH_IOU` (0.3). Not
PQ's 0.5: that label also calls a real nucleus with a poor mask "not a nucleus", and a verifier taught so drops
such nuclei where masks are hardest, in dense tissue. Fitted without 66 dense CoNSeP training patches and tested
on them, the 0.5 label lowered their AJI by 0.020 and F1d by 0.044 (validation PQ +0.021), the 0.3 label raised
PQ and AJI by 0.008 (validation PQ +0.010; ``python -m benchmarks.promptnucseg_verifier``). The
fit is an L2-regularised logistic regression on standardised features (scikit-learn's ``LogisticRegression(C=1)``
objective), minimised with SciPy's L-BFGS: six weights do not need a new dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from scipy.stats import rankdata

from karyo.metrics.detection import labels_at
from karyo.models.duplicates import DUPLICATE_FEATURES, MIN_OVERLAP, DuplicateJudgeConfig, mask_pairs
from karyo.models.promptnucseg import MaskCandidates, PromptNucSegModel, candidate_score
from karyo.models.verifier import FEATURE_THRESHOLD, VerifierConfig

# Candidates for fitting: the lowest prompter score of karyo pack's grid (the verifier must judge the faint
# points it admits), the smallest NMS radius, duplicate removal and two refinements (the shipped settings).
FIT_SETTINGS = {"score_threshold": 0.3, "nms_radius_px": 6.0, "mask_nms_overlap": 0.2, "refine_points": 2}
MATCH_IOU = 0.3  # see the module docstring


class VerifierFitError(ValueError):
    """The fitting images cannot teach a verifier (no candidates, or all of one kind)."""


def candidate_match_iou(candidates: MaskCandidates, instances: np.ndarray) -> np.ndarray:
    """Best IoU of each candidate's mask (probability > 0.5, clipped to the image) with an annotated nucleus."""
    h, w = instances.shape
    sizes = np.bincount(instances.ravel())
    fg = (candidates.probs > FEATURE_THRESHOLD).cpu().numpy()
    out = np.zeros(len(fg))
    for i, (x0, y0, x1, y1) in enumerate(candidates.windows.tolist()):
        ya, yb, xa, xb = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if ya >= yb or xa >= xb:
            continue
        mask = fg[i, ya - y0:yb - y0, xa - x0:xb - x0]
        area = int(mask.sum())
        if area == 0:
            continue
        hit = np.bincount(instances[ya:yb, xa:xb][mask], minlength=len(sizes))
        hit[0] = 0
        out[i] = float(np.max(hit / (area + sizes - hit)))
    return out


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weights, bias) minimising Σ log-loss + l2/2 ‖w‖² on standardised ``features``."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    if len(np.unique(y)) < 2:
        raise VerifierFitError("the verifier needs candidates that are nuclei and candidates that are not")
    mean, scale = x.mean(0), x.std(0)
    scale[scale == 0] = 1.0
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    sign = 2 * y - 1

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        margin = sign * (z @ theta)
        grad = -(z.T @ (sign * expit(-margin)))
        grad[:-1] += l2 * theta[:-1]
        return float(-log_expit(margin).sum() + 0.5 * l2 * theta[:-1] @ theta[:-1]), grad

    theta = minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 1000}).x
    return mean, scale, theta[:-1], float(theta[-1])


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties)."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_verifier(model: PromptNucSegModel, samples: Sequence, log: Callable[[str], None] = print,
                 settings: dict | None = None, match_iou: float = MATCH_IOU) -> VerifierConfig:
    """Fit the verifier on ``samples`` (annotated images the networks trained on), candidates made with the
    model's networks at ``settings`` (default :data:`FIT_SETTINGS`)."""
    settings = FIT_SETTINGS | (settings or {})
    base = model.config
    features, labels, scores, images = [], [], [], 0
    no_neg = np.zeros((0, 2), np.float32)
    try:
        # Candidates as the overlap rule makes them (as the shipped verifier was fitted), judge or not.
        model.config = replace(base, **({"min_duplicate_probability": None}
                                        | {k: v for k, v in settings.items() if k != "score_threshold"}))
        with torch.no_grad():
            for sample in samples:
                if sample.instances is None or sample.instances.max() == 0:
                    continue
                prep = model.prepare(sample.image, mpp=None)
                pts = model.detect(prep, settings["score_threshold"], settings["nms_radius_px"])
                candidates = model.mask_candidates(prep, *pts, no_neg)
                if len(candidates.scores) == 0:
                    continue
                images += 1
                features.append(candidates.features)
                labels.append(candidate_match_iou(candidates, np.asarray(sample.instances)) > match_iou)
                scores.append(candidates.scores)
    finally:
        model.config = base
    if not features:
        raise VerifierFitError("no candidates on the fitting images: cannot fit the verifier")
    x, y = np.concatenate(features), np.concatenate(labels)
    mean, scale, weights, bias = fit_logistic(x, y)
    verifier = VerifierConfig(mean=mean.tolist(), scale=scale.tolist(), weights=weights.tolist(), bias=bias)
    fit = {"images": images, "candidates": len(y), "nuclei_fraction": round(float(y.mean()), 4),
           "settings": settings, "train_auc_score": round(roc_auc(y, np.concatenate(scores)), 4),
           "train_auc_verifier": round(roc_auc(y, verifier.probability(x)), 4)}
    log(f"verifier fitted on {images} images, {len(y)} candidates ({y.mean():.0%} nuclei): training ROC AUC "
        f"{fit['train_auc_verifier']:.3f} (prompter score × √IoU alone {fit['train_auc_score']:.3f})")
    return replace(verifier, fit=fit)


def fit_duplicate_judge(model: PromptNucSegModel, samples: Sequence, log: Callable[[str], None] = print,
                        settings: dict | None = None) -> DuplicateJudgeConfig:
    """Fit the duplicate judge (:mod:`karyo.models.duplicates`) on ``samples`` (annotated images the networks
    trained on). The pairs are those inference judges: the detected points at ``settings`` (default
    :data:`FIT_SETTINGS`' score threshold and NMS radius), each decoded without negatives. A pair is a duplicate
    when the worse point lies on the same annotated nucleus as the better one, or on no nucleus (dropping it is
    right either way); it is not when the two lie on different nuclei."""
    settings = {k: v for k, v in (FIT_SETTINGS | (settings or {})).items() if k in ("score_threshold", "nms_radius_px")}
    features, labels, images = [], [], 0
    no_neg = np.zeros((0, 2), np.float32)
    with torch.no_grad():
        for sample in samples:
            if sample.instances is None or sample.instances.max() == 0:
                continue
            prep = model.prepare(sample.image, mpp=None)
            pts, _, score = model.detect(prep, settings["score_threshold"], settings["nms_radius_px"])
            if len(pts) < 2:
                continue
            probs, windows, iou = model._decode(prep, pts, no_neg, negatives=False,
                                                detail=model.config.detail_every_pass)
            pairs = mask_pairs(probs, windows, pts, candidate_score(score, iou), score, iou)
            if len(pairs.better) == 0:
                continue
            images += 1
            under = labels_at(np.asarray(sample.instances), pts / prep.scale)
            labels.append((under[pairs.worse] == 0) | (under[pairs.worse] == under[pairs.better]))
            features.append(pairs.features)
    if not features:
        raise VerifierFitError("no overlapping masks on the fitting images: cannot fit the duplicate judge")
    x, y = np.concatenate(features), np.concatenate(labels)
    if len(np.unique(y)) < 2:
        raise VerifierFitError("the duplicate judge needs pairs that are one nucleus and pairs that are two")
    mean, scale, weights, bias = fit_logistic(x, y)
    judge = DuplicateJudgeConfig(mean=mean.tolist(), scale=scale.tolist(), weights=weights.tolist(), bias=bias)
    fit = {"images": images, "pairs": len(y), "duplicate_fraction": round(float(y.mean()), 4),
           "settings": settings, "min_overlap": MIN_OVERLAP,
           "train_auc_overlap": round(roc_auc(y, x[:, DUPLICATE_FEATURES.index("overlap")]), 4),
           "train_auc_judge": round(roc_auc(y, judge.probability(x)), 4)}
    log(f"duplicate judge fitted on {images} images, {len(y)} overlapping mask pairs ({y.mean():.0%} duplicates): "
        f"training ROC AUC {fit['train_auc_judge']:.3f} (overlap alone {fit['train_auc_overlap']:.3f})")
    return replace(judge, fit=fit)
