"""CoNIC challenge metrics: multi-class PQ+ pooled over the dataset, binary PQ, and R² of per-class counts.

Reference: github.com/TissueImageAnalytics/CoNIC (``compute_stats.py``, ``metrics/stats_utils.py``, commit c1c4964):
``get_multi_pq_info`` gives per image and class the TP, FP, FN and sum of matched IoUs of ``inst * (type == c)``
(match when IoU > 0.5); these are summed over the dataset and then DQ = TP / ((TP + FP/2 + FN/2) + 1e-6),
SQ = sumIoU / (TP + 1e-6), PQ+ = DQ·SQ per class, mPQ+ = plain mean over the classes (a class with nothing anywhere
contributes 0). The binary ``pq`` is the mean over images of ``get_pq`` on the class-agnostic maps (same +1e-6 in
DQ, so an image with both maps empty gives 0). R² follows ``get_multi_r2`` (``sklearn.metrics.r2_score`` per
class, then the mean). The class list is passed in, not hard-coded to CoNIC's six classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from karyo.metrics._util import NAN
from karyo.metrics.instance import PQResult, contingency, multiclass_pq, pq_from_contingency, pq_from_counts

__all__ = [
    "CONIC_DQ_EPS",
    "ConicImageStats",
    "ConicResult",
    "conic_aggregate",
    "conic_image_stats",
    "conic_image_stats_from_pq",
    "conic_pq",
    "r2_score",
]

#: CoNIC adds 1e-6 to the DQ denominator (``get_pq`` and the ``multi_pq+`` aggregation).
CONIC_DQ_EPS = 1.0e-6


def conic_pq(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> PQResult:
    """Class-agnostic PQ as CoNIC ``get_pq(true, pred)``: HoVer-Net's PQ but with +1e-6 in the DQ denominator."""
    return pq_from_contingency(contingency(true, pred), match_iou, dq_eps=CONIC_DQ_EPS)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ConicImageStats:
    """One image: ``class_stats[k] = (TP, FP, FN, sumIoU)`` of ``classes[k]``, the binary PQ, per-class counts."""

    classes: tuple[int, ...]
    class_stats: np.ndarray
    binary: PQResult
    counts_true: np.ndarray
    counts_pred: np.ndarray


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ConicResult:
    """Dataset values: ``mpq_plus``, ``class_pq_plus``, pooled ``class_totals`` (TP, FP, FN, sumIoU), binary ``pq``,
    ``r2`` (mean of ``class_r2``)."""

    classes: tuple[int, ...]
    mpq_plus: float
    class_pq_plus: dict[int, float]
    class_totals: np.ndarray
    binary_pq: float
    r2: float
    class_r2: dict[int, float]


def conic_image_stats_from_pq(class_results: dict[int, PQResult], binary: PQResult) -> ConicImageStats:
    """Build the per-image CoNIC statistics from per-class and class-agnostic PQ results (match IoU > 0.5)."""
    classes = tuple(int(c) for c in class_results)
    stats = np.array([[r.tp, r.fp, r.fn, r.sum_iou] for r in class_results.values()], dtype=np.float64)
    stats = stats.reshape(len(classes), 4)
    tp, fp, fn, s = binary.tp, binary.fp, binary.fn, binary.sum_iou
    pq, dq, sq = pq_from_counts(tp, fp, fn, s, CONIC_DQ_EPS)  # both maps empty: 0/(0 + 1e-6) = 0, no error
    binary = PQResult(pq=pq, dq=dq, sq=sq, tp=tp, fp=fp, fn=fn, sum_iou=s, n_true=binary.n_true,
                      n_pred=binary.n_pred, paired_true=binary.paired_true, paired_pred=binary.paired_pred,
                      paired_iou=binary.paired_iou)
    counts_true = np.array([r.n_true for r in class_results.values()], dtype=np.int64)
    counts_pred = np.array([r.n_pred for r in class_results.values()], dtype=np.int64)
    return ConicImageStats(classes, stats, binary, counts_true, counts_pred)


def conic_image_stats(true_inst: np.ndarray, true_type: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray,
                      classes: Sequence[int]) -> ConicImageStats:
    """``get_multi_pq_info`` (for ``classes``) + binary ``get_pq`` + per-class instance counts of one image.

    Counts are the number of distinct instances of each class in the whole map (the input of the R² metric).
    """
    return conic_image_stats_from_pq(multiclass_pq(true_inst, true_type, pred_inst, pred_type, classes),
                                     conic_pq(true_inst, pred_inst))


def r2_score(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Coefficient of determination with ``sklearn.metrics.r2_score``'s conventions (force_finite=True).

    1 − SS_res/SS_tot; a constant true column gives 1.0 if predicted perfectly, else 0.0. Fewer than two samples:
    NaN (sklearn warns and returns NaN).
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    if t.size < 2:
        return NAN
    num = float(np.sum((t - p) ** 2))
    den = float(np.sum((t - np.mean(t)) ** 2))
    if num == 0:
        return 1.0
    if den == 0:
        return 0.0
    return 1.0 - num / den


def conic_aggregate(images: Sequence[ConicImageStats]) -> ConicResult:
    """Pool per-image statistics as ``compute_stats.py`` does (``multi_pq+``, ``pq`` and R²)."""
    images = list(images)
    if not images:
        raise ValueError("no images to aggregate")
    classes = images[0].classes
    if any(im.classes != classes for im in images):
        raise ValueError("all images must use the same class list")
    totals = np.sum(np.stack([im.class_stats for im in images]), axis=0).reshape(len(classes), 4)
    class_pq = {}
    for c, (tp, fp, fn, s) in zip(classes, totals.tolist(), strict=True):
        class_pq[c] = pq_from_counts(tp, fp, fn, s, CONIC_DQ_EPS)[0]
    mpq = float(np.mean(list(class_pq.values()))) if class_pq else NAN
    binary = float(np.mean([im.binary.pq for im in images]))
    counts_true = np.stack([im.counts_true for im in images]).reshape(len(images), len(classes))
    counts_pred = np.stack([im.counts_pred for im in images]).reshape(len(images), len(classes))
    class_r2 = {c: r2_score(counts_true[:, k], counts_pred[:, k]) for k, c in enumerate(classes)}
    r2 = float(np.mean(list(class_r2.values()))) if class_r2 else NAN
    return ConicResult(classes=classes, mpq_plus=mpq, class_pq_plus=class_pq, class_totals=totals, binary_pq=binary,
                       r2=r2, class_r2=class_r2)
