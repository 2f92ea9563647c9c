"""Detection and classification F1 of nucleus centroids, as HoVer-Net ``compute_stats.run_nuclei_type_stat``.

Reference: github.com/vqdang/hover_net ``compute_stats.py`` and ``metrics/stats_utils.py:pair_coordinates`` (a0f80c7).
Every instance becomes one point, its centre of mass (x = mean column, y = mean row) cast to float32, with its
type. Per image the points are paired by the Hungarian algorithm on the full Euclidean distance matrix (minimum
total distance), then pairs farther apart than 12 px are dropped (exactly 12 is kept) — this is not a maximum
matching within the radius. An image with no instance on one side gets a dummy point (0, 0) of type 0 on that
side, as the reference does. Pairs and unpaired points are pooled over the dataset; then

* F1_d = 2·TP / (2·TP + FP + FN) (TP = pairs, FP = unpaired predictions, FN = unpaired GT),
* type accuracy = fraction of pairs whose types agree,
* F1_c = 2·TP_c / (2·TP_c + 2·FP_c + 2·FN_c + FPd_c + FNd_c) with the weights w = [2, 2, 1, 1] of the reference
  (FP_c/FN_c: pairs where only the prediction/only the GT is c; FPd_c/FNd_c: unpaired predictions/GT of type c).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from karyo.data.sample import validate_instances
from karyo.errors import InputError
from karyo.metrics._util import NAN, safe_div
from karyo.metrics.instance import _renumber

__all__ = [
    "DETECTION_RADIUS",
    "CoordinatePairing",
    "DetectionResult",
    "InstancePoints",
    "NucleiTypeStats",
    "instance_points",
    "instance_types",
    "pair_coordinates",
]

#: HoVer-Net's pairing radius in pixels (``pair_coordinates(..., 12)``).
DETECTION_RADIUS = 12.0


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class InstancePoints:
    """One point per instance, in ascending order of the instance id: ``xy`` (N×2 float32, x = column), ``types``."""

    ids: np.ndarray
    xy: np.ndarray
    types: np.ndarray


def instance_types(idx: np.ndarray, n: int, type_flat: np.ndarray) -> np.ndarray:
    """Type of each of ``n`` instances (``idx`` = flat 1..n index map): the most frequent non-zero type inside it.

    Ties go to the smaller class id; an instance without any typed pixel gets 0 (HoVer-Net's post-processing rule).
    """
    type_flat = np.asarray(type_flat).ravel()
    fg = idx > 0
    t = type_flat[fg].astype(np.int64)
    if t.size and t.min() < 0:
        raise InputError(None, "type map holds negative class ids")
    n_types = int(t.max()) + 1 if t.size else 1
    counts = np.bincount((idx[fg] - 1) * n_types + t, minlength=n * n_types).reshape(n, n_types)
    counts[:, 0] = 0
    out = np.argmax(counts, axis=1).astype(np.int32) if n_types > 1 else np.zeros(n, np.int32)
    return out


def instance_points(inst: np.ndarray, type_map: np.ndarray | None = None) -> InstancePoints:
    """Centres of mass (float32 x, y) and types of all instances of a map (vectorised with ``np.bincount``)."""
    inst = validate_instances(np.asarray(inst), None, "instance map")
    idx, ids = _renumber(inst)
    n = ids.size
    width = inst.shape[1] if inst.ndim == 2 else 1
    pos = np.flatnonzero(idx)
    lab = idx[pos]
    area = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    sum_y = np.bincount(lab, weights=(pos // width).astype(np.float64), minlength=n + 1)[1:]
    sum_x = np.bincount(lab, weights=(pos % width).astype(np.float64), minlength=n + 1)[1:]
    xy = np.stack([sum_x / np.maximum(area, 1), sum_y / np.maximum(area, 1)], axis=1).astype(np.float32)
    if type_map is None:
        types = np.zeros(n, np.int32)
    else:
        type_map = np.asarray(type_map)
        if type_map.shape != inst.shape:
            raise InputError(None, f"type map shape {type_map.shape} differs from instance map shape {inst.shape}")
        types = instance_types(idx, n, type_map)
    return InstancePoints(ids=ids, xy=xy.reshape(n, 2), types=types)


def labels_at(instances: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """The label of ``instances`` (H×W) under each point of ``xy`` (N×2 x, y in its pixels), rounded to the
    nearest pixel and clipped to the map (0: background)."""
    h, w = instances.shape
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    cols = np.clip(np.floor(xy[:, 0] + 0.5).astype(np.int64), 0, w - 1)
    rows = np.clip(np.floor(xy[:, 1] + 0.5).astype(np.int64), 0, h - 1)
    return instances[rows, cols]


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class CoordinatePairing:
    """``paired`` (K×2 indices into set A and set B) and the indices of the unpaired points of each set."""

    paired: np.ndarray
    unpaired_a: np.ndarray
    unpaired_b: np.ndarray


def pair_coordinates(set_a: np.ndarray, set_b: np.ndarray, radius: float = DETECTION_RADIUS) -> CoordinatePairing:
    """HoVer-Net ``pair_coordinates``: Hungarian on the full distance matrix, then drop pairs with distance > radius."""
    a = np.asarray(set_a).reshape(-1, 2)
    b = np.asarray(set_b).reshape(-1, 2)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return CoordinatePairing(np.zeros((0, 2), np.int64), np.arange(a.shape[0]), np.arange(b.shape[0]))
    dist = cdist(a, b, metric="euclidean")
    rows, cols = linear_sum_assignment(dist)
    keep = dist[rows, cols] <= radius
    rows, cols = rows[keep].astype(np.int64), cols[keep].astype(np.int64)
    un_a = np.ones(a.shape[0], bool)
    un_a[rows] = False
    un_b = np.ones(b.shape[0], bool)
    un_b[cols] = False
    return CoordinatePairing(np.stack([rows, cols], axis=1), np.flatnonzero(un_a), np.flatnonzero(un_b))


@dataclass(frozen=True)
class DetectionResult:
    """Pooled detection/classification values of ``run_nuclei_type_stat`` (``f1_type`` keyed by class id)."""

    f1_d: float
    precision_d: float
    recall_d: float
    acc_type: float
    f1_type: dict[int, float]
    tp: int
    fp: int
    fn: int


class NucleiTypeStats:
    """Accumulate per-image point pairings, then compute the pooled values (``run_nuclei_type_stat``).

    ``dummy_for_empty=True`` reproduces the reference's (0, 0) type-0 point for a side without instances.
    """

    def __init__(self, radius: float = DETECTION_RADIUS, dummy_for_empty: bool = True) -> None:
        self.radius = float(radius)
        self.dummy_for_empty = dummy_for_empty
        self._paired_true: list[np.ndarray] = []
        self._paired_pred: list[np.ndarray] = []
        self._unpaired_true: list[np.ndarray] = []
        self._unpaired_pred: list[np.ndarray] = []
        self._true_types: list[np.ndarray] = []

    def _dummy(self, xy: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xy = np.asarray(xy, dtype=np.float32).reshape(-1, 2)
        types = np.asarray(types, dtype=np.int32).reshape(-1)
        if xy.shape[0] != types.shape[0]:
            raise ValueError(f"{xy.shape[0]} points but {types.shape[0]} types")
        if xy.shape[0] == 0 and self.dummy_for_empty:
            return np.zeros((1, 2), np.float32), np.zeros(1, np.int32)
        return xy, types

    def add_points(self, true_xy: np.ndarray, true_types: np.ndarray, pred_xy: np.ndarray,
                   pred_types: np.ndarray) -> CoordinatePairing:
        """Add one image given as points (x, y) and types; returns its pairing (after any dummy insertion)."""
        txy, tt = self._dummy(true_xy, true_types)
        pxy, pt = self._dummy(pred_xy, pred_types)
        pairing = pair_coordinates(txy, pxy, self.radius)
        self._paired_true.append(tt[pairing.paired[:, 0]])
        self._paired_pred.append(pt[pairing.paired[:, 1]])
        self._unpaired_true.append(tt[pairing.unpaired_a])
        self._unpaired_pred.append(pt[pairing.unpaired_b])
        self._true_types.append(tt)
        return pairing

    def add(self, true_inst: np.ndarray, true_type: np.ndarray | None, pred_inst: np.ndarray,
            pred_type: np.ndarray | None) -> CoordinatePairing:
        """Add one image given as instance (and optional type) maps; types are 0 where no type map is given."""
        t = instance_points(true_inst, true_type)
        p = instance_points(pred_inst, pred_type)
        return self.add_points(t.xy, t.types, p.xy, p.types)

    def compute(self, type_uid_list: Sequence[int] | None = None) -> DetectionResult:
        """Pooled F1_d, precision, recall, type accuracy and F1 per type.

        ``type_uid_list=None`` uses the types present in the GT, including the dummy type 0 when an image was
        empty (the reference's default). If no image has a single pair the reference raises (concatenating an
        empty list), so every value is NaN then.
        """
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.int32)

        pt, pp = cat(self._paired_true), cat(self._paired_pred)
        ut, up = cat(self._unpaired_true), cat(self._unpaired_pred)
        if type_uid_list is None:
            type_uid_list = np.unique(cat(self._true_types)).tolist()
        tp, fp, fn = int(pt.size), int(up.size), int(ut.size)
        if tp == 0:
            return DetectionResult(NAN, NAN, NAN, NAN, {int(c): NAN for c in type_uid_list}, tp, fp, fn)
        f1_type = {}
        for c in type_uid_list:
            tp_c = int(np.count_nonzero((pt == c) & (pp == c)))
            fp_c = int(np.count_nonzero((pt != c) & (pp == c)))
            fn_c = int(np.count_nonzero((pt == c) & (pp != c)))
            fpd_c = int(np.count_nonzero(up == c))
            fnd_c = int(np.count_nonzero(ut == c))
            f1_type[int(c)] = safe_div(2 * tp_c, 2 * tp_c + 2 * fp_c + 2 * fn_c + fpd_c + fnd_c)
        return DetectionResult(
            f1_d=safe_div(2 * tp, 2 * tp + fp + fn), precision_d=safe_div(tp, tp + fp), recall_d=safe_div(tp, tp + fn),
            acc_type=safe_div(int(np.count_nonzero(pt == pp)), tp), f1_type=f1_type, tp=tp, fp=fp, fn=fn)
