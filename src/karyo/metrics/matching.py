"""Object-level matching over a range of IoU thresholds: precision, recall, F1, F1-mean and mAP.

Definitions (StarDist ``stardist/matching.py`` and the DSB2018 "average precision", with karyo's conventions):

* At threshold t a GT and a predicted instance match when IoU > t (strictly, like HoVer-Net's PQ). For t >= 0.5
  any instance has at most one partner with IoU > t, so the matching is unique and needs no assignment; for
  t < 0.5 the matching with the most pairs (ties: largest IoU sum) is found with ``linear_sum_assignment``, as
  StarDist does.
* TP = matches, FP = unmatched predictions, FN = unmatched GT; precision = TP/(TP+FP), recall = TP/(TP+FN),
  F1 = 2TP/(2TP+FP+FN).
* ``ap`` = TP/(TP+FP+FN), the DSB2018 / StarDist "average precision" (StarDist calls it ``accuracy``); ``map`` is
  its mean over the thresholds, by default 0.5:0.05:0.95.
* ``f1_mean`` is the mean of the F1 over the same thresholds (the "F1^μ" of the InstanSeg / ChannelNet papers).
* 0/0 (e.g. precision with no prediction) is NaN here; StarDist returns 0 for it.
* Over a dataset, :meth:`ThresholdMatching.pool` adds the counts of all images first (StarDist
  ``matching_dataset(by_image=False)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from karyo.metrics._util import NAN, safe_div_array
from karyo.metrics.instance import Contingency, contingency

__all__ = ["IOU_THRESHOLDS", "ThresholdMatching", "match_at_thresholds", "matching_from_contingency"]

#: 0.5, 0.55, ..., 0.95 (rounded, so that 0.6 is 0.6 and not 0.6000000000000001).
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class ThresholdMatching:
    """Match counts at each IoU threshold; the ratios are derived properties (arrays aligned with ``thresholds``)."""

    thresholds: tuple[float, ...]
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_true: int
    n_pred: int

    @property
    def precision(self) -> np.ndarray:
        return safe_div_array(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> np.ndarray:
        return safe_div_array(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> np.ndarray:
        return safe_div_array(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def ap(self) -> np.ndarray:
        """TP / (TP + FP + FN) per threshold (DSB2018 average precision)."""
        return safe_div_array(self.tp, self.tp + self.fp + self.fn)

    @property
    def f1_mean(self) -> float:
        """Mean F1 over the thresholds (NaN when both sides are empty)."""
        return _mean_or_nan(self.f1)

    @property
    def map(self) -> float:
        """Mean of :attr:`ap` over the thresholds."""
        return _mean_or_nan(self.ap)

    def at(self, threshold: float) -> dict[str, float]:
        """Precision, recall, F1 and AP at one of the thresholds."""
        k = self.thresholds.index(threshold)
        return {"precision": float(self.precision[k]), "recall": float(self.recall[k]), "f1": float(self.f1[k]),
                "ap": float(self.ap[k])}

    @classmethod
    def pool(cls, results: Iterable[ThresholdMatching]) -> ThresholdMatching:
        """Add the counts of several images (all computed at the same thresholds)."""
        results = list(results)
        if not results:
            raise ValueError("nothing to pool")
        th = results[0].thresholds
        if any(r.thresholds != th for r in results):
            raise ValueError("cannot pool results computed at different thresholds")
        return cls(th, sum(r.tp for r in results), sum(r.fp for r in results), sum(r.fn for r in results),
                   sum(r.n_true for r in results), sum(r.n_pred for r in results))


def _mean_or_nan(values: np.ndarray) -> float:
    return NAN if values.size == 0 or np.isnan(values).any() else float(np.mean(values))


def _n_matches_low(ct: Contingency, iou: np.ndarray, t: float) -> int:
    """Number of pairs of the StarDist matching at t < 0.5: most pairs with IoU > t, ties by the largest IoU sum."""
    sel = iou > t
    if not sel.any():
        return 0
    n = max(min(ct.n_true, ct.n_pred), 1)
    cost = np.zeros((ct.n_true, ct.n_pred))
    cost[ct.pair_true[sel], ct.pair_pred[sel]] = -1.0 - iou[sel] / (2 * n)
    rows, cols = linear_sum_assignment(cost)
    return int(np.count_nonzero(cost[rows, cols] < 0))


def matching_from_contingency(ct: Contingency, thresholds: Sequence[float] = IOU_THRESHOLDS) -> ThresholdMatching:
    """Counts at each threshold from a precomputed :class:`Contingency` (vectorised for thresholds >= 0.5)."""
    th = tuple(float(t) for t in thresholds)
    if any(t < 0 or t >= 1 for t in th):
        raise ValueError("IoU thresholds must lie in [0, 1)")
    iou = ct.pair_iou
    tp = np.array([np.count_nonzero(iou > t) if t >= 0.5 else _n_matches_low(ct, iou, t) for t in th],
                  dtype=np.int64)
    return ThresholdMatching(th, tp, ct.n_pred - tp, ct.n_true - tp, ct.n_true, ct.n_pred)


def match_at_thresholds(true: np.ndarray, pred: np.ndarray,
                        thresholds: Sequence[float] = IOU_THRESHOLDS) -> ThresholdMatching:
    """Match two instance maps at each IoU threshold (IoU > t); see the module docstring for the definitions."""
    return matching_from_contingency(contingency(true, pred), thresholds)
