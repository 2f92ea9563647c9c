"""Semantic-segmentation metrics from one confusion matrix, accumulable over a dataset.

Label 0 is background, 1..C the classes. Everything comes from the (C+1)×(C+1) confusion matrix
``M[true, pred]`` built with ``np.bincount``:

* pixel accuracy = trace(M) / M.sum(), over all pixels (background included);
* per class c: TP = M[c, c], FP = column sum − TP, FN = row sum − TP; IoU = TP/(TP+FP+FN),
  precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN). 0/0 is NaN, so a class absent from both
  maps has NaN IoU/F1 (and NaN precision when never predicted, NaN recall when absent from the truth);
* mean IoU = nanmean of the per-class IoU over the reported classes;
* frequency-weighted IoU: FWIoU = Σ_c freq_c · IoU_c, with freq_c = (true pixels of c) / (true pixels of all
  reported classes), as in Long et al. (FCN); classes absent from the truth have weight 0.

The reported classes are 1..C, or 0..C with ``include_background=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from karyo.errors import InputError
from karyo.metrics._util import NAN, nanmean, safe_div, safe_div_array, to_builtin

__all__ = ["SemanticMetrics", "SemanticReport", "SemanticResult", "confusion_matrix", "semantic_metrics"]


def _labels(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InputError(None, f"{what} must hold integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False).ravel()


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int | None = None,
                     ignore_index: int | None = None) -> np.ndarray:
    """(K×K) int64 matrix of pixel counts, rows = true label, columns = predicted label, K = num_classes + 1.

    ``num_classes=None`` sizes it to the largest label present. Pixels whose true label is ``ignore_index`` are
    skipped. Labels outside 0..num_classes raise :class:`~karyo.errors.InputError`.
    """
    t = _labels(true, "true map")
    p = _labels(pred, "predicted map")
    if np.shape(true) != np.shape(pred):
        raise InputError(None, f"true and predicted maps differ in shape: {np.shape(true)} vs {np.shape(pred)}")
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    lo = min(int(t.min()), int(p.min())) if t.size else 0
    if lo < 0:
        raise InputError(None, f"negative class label {lo}")
    hi = max(int(t.max()), int(p.max())) if t.size else 0
    k = hi + 1 if num_classes is None else int(num_classes) + 1
    if hi >= k:
        raise InputError(None, f"class label {hi} exceeds num_classes={num_classes}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class SemanticResult:
    """Per-class values are dicts keyed by class id (NaN where undefined); ``confusion`` is the full matrix."""

    classes: tuple[int, ...]
    confusion: np.ndarray
    pixel_accuracy: float
    iou: dict[int, float]
    precision: dict[int, float]
    recall: dict[int, float]
    f1: dict[int, float]
    support: dict[int, int]
    mean_iou: float
    fwiou: float


def _result(conf: np.ndarray, include_background: bool) -> SemanticResult:
    k = conf.shape[0]
    classes = tuple(range(0 if include_background else 1, k))
    tp = np.diag(conf).astype(np.int64)
    row = conf.sum(axis=1)
    col = conf.sum(axis=0)
    fp, fn = col - tp, row - tp
    iou = safe_div_array(tp, tp + fp + fn)
    prec = safe_div_array(tp, tp + fp)
    rec = safe_div_array(tp, tp + fn)
    f1 = safe_div_array(2 * tp, 2 * tp + fp + fn)
    sel = np.array(classes, dtype=np.int64)
    support = row[sel]
    total = int(support.sum())
    if total:
        present = support > 0  # IoU is defined wherever the class occurs in the truth
        fwiou = float(np.sum(support[present] / total * iou[sel][present]))
    else:
        fwiou = NAN

    def as_dict(a: np.ndarray) -> dict[int, float]:
        return {int(c): float(a[c]) for c in classes}

    return SemanticResult(classes=classes, confusion=conf, pixel_accuracy=safe_div(int(tp.sum()), int(conf.sum())),
                          iou=as_dict(iou), precision=as_dict(prec), recall=as_dict(rec), f1=as_dict(f1),
                          support={int(c): int(row[c]) for c in classes}, mean_iou=nanmean(iou[sel]), fwiou=fwiou)


class SemanticMetrics:
    """Accumulate a confusion matrix over many (true, pred) maps with :meth:`update`, then :meth:`compute`.

    ``num_classes=None`` lets the matrix grow to the largest label seen.
    """

    def __init__(self, num_classes: int | None = None, include_background: bool = False,
                 ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.include_background = include_background
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        k = 1 if self.num_classes is None else self.num_classes + 1
        self.confusion = np.zeros((k, k), dtype=np.int64)

    def update(self, true: np.ndarray, pred: np.ndarray) -> None:
        conf = confusion_matrix(true, pred, self.num_classes, self.ignore_index)
        k = max(conf.shape[0], self.confusion.shape[0])
        if k > self.confusion.shape[0]:
            grown = np.zeros((k, k), dtype=np.int64)
            grown[: self.confusion.shape[0], : self.confusion.shape[0]] = self.confusion
            self.confusion = grown
        self.confusion[: conf.shape[0], : conf.shape[0]] += conf

    def compute(self) -> SemanticResult:
        return _result(self.confusion.copy(), self.include_background)


def semantic_metrics(true: np.ndarray, pred: np.ndarray, num_classes: int | None = None,
                     include_background: bool = False, ignore_index: int | None = None) -> SemanticResult:
    """All semantic metrics of one pair of class maps (see the module docstring)."""
    acc = SemanticMetrics(num_classes, include_background, ignore_index)
    acc.update(true, pred)
    return acc.compute()


@dataclass(frozen=True, eq=False)
class SemanticReport:
    """``karyo evaluate`` of class maps (``karyo segment --task semantic``): the metrics MONCH reports (pixel
    accuracy, IoU, FWIoU, precision, F1; ``monch_paper.txt`` §4.1 "Metrics") from one confusion matrix pooled over
    the images, plus a per-image table. ``binary``: nucleus vs background only (no classes to compare)."""

    n_images: int
    result: SemanticResult
    class_names: dict[int, str]
    binary: bool
    per_image: pd.DataFrame
    notes: tuple[str, ...] = field(default_factory=tuple)

    def _name(self, c: int) -> str:
        return "nucleus" if self.binary else self.class_names.get(c, str(c))

    @property
    def per_class(self) -> pd.DataFrame:
        r = self.result
        return pd.DataFrame([{"class_id": c, "name": self._name(c), "true_pixels": r.support[c], "iou": r.iou[c],
                              "precision": r.precision[c], "recall": r.recall[c], "f1": r.f1[c]} for c in r.classes])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN → None)."""
        r = self.result
        return to_builtin({"task": "semantic", "n_images": self.n_images, "binary": self.binary,
                           "class_names": {str(c): self._name(c) for c in r.classes},
                           "pixel_accuracy": r.pixel_accuracy, "mean_iou": r.mean_iou, "fwiou": r.fwiou,
                           "mean_f1": nanmean(np.array([r.f1[c] for c in r.classes], float)),
                           "confusion": r.confusion.tolist(), "notes": list(self.notes),
                           "per_class": self.per_class.to_dict(orient="records"),
                           "per_image": self.per_image.to_dict(orient="records")})

    def summary_table(self) -> list[tuple[str, str, str]]:
        """Rows ``(group, metric, value)`` for a printed table (4 decimals, NaN as "n/a")."""
        def fmt(v: float) -> str:
            return "n/a" if v != v else f"{v:.4f}"

        r = self.result
        group = "pixels (pooled over images)"
        rows = [(group, "pixel accuracy", fmt(r.pixel_accuracy)), (group, "mean IoU", fmt(r.mean_iou)),
                (group, "FWIoU", fmt(r.fwiou))]
        for c in r.classes:
            rows += [(group, f"{label} {self._name(c)}", fmt(values[c]))
                     for label, values in (("IoU", r.iou), ("precision", r.precision), ("recall", r.recall),
                                           ("F1", r.f1))]
        return rows
