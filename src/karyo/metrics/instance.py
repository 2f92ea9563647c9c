"""Instance-segmentation metrics (PQ/DQ/SQ, AJI, AJI+, Dice) computed exactly as HoVer-Net does, but vectorised.

Reference: HoVer-Net ``metrics/stats_utils.py`` (github.com/vqdang/hover_net, last changed in a0f80c7):
``remap_label``, ``get_fast_pq``, ``get_fast_aji``, ``get_fast_aji_plus``, ``get_dice_1``. The reference loops over
every (GT, prediction) pair with full-image masks; here every pixel is visited once: the instance maps are
renumbered with a lookup table and the intersections come from one ``np.bincount`` over the joint labels. When
(nGT+1)·(nPred+1) is at most the pixel count, the joint histogram of all pixels is taken (its margins are the
areas); otherwise only the pixels where both maps are foreground are counted (``np.bincount`` or ``np.unique``)
and the areas come from separate ``np.bincount`` calls. Either way only the overlapping pairs are kept. Every IoU,
epsilon and tie-break of the reference is reproduced; where the reference raises (PQ with both maps empty, AJI
with an empty prediction) the result is NaN. (A map without any background pixel makes the reference's
``remap_label`` raise; here the metrics are computed as defined.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from karyo.data.sample import validate_instances
from karyo.errors import InputError
from karyo.metrics._util import NAN, safe_div

__all__ = [
    "AJIResult",
    "Contingency",
    "PQResult",
    "aggregated_jaccard_index",
    "aggregated_jaccard_index_plus",
    "aji_from_contingency",
    "aji_plus_from_contingency",
    "class_instance_map",
    "contingency",
    "dice",
    "multiclass_pq",
    "panoptic_quality",
    "pq_from_contingency",
    "pq_from_counts",
    "remap_label",
]

#: AJI / AJI+ pairing uses |g∩p| / (|g∪p| + 1e-6), as ``get_fast_aji`` does (this decides exact-IoU ties).
AJI_EPS = 1.0e-6
#: SQ = sum IoU / (TP + 1e-6), as ``get_fast_pq`` does.
SQ_EPS = 1.0e-6
#: Above this many GT×prediction cells the AJI+ assignment is solved per connected block of overlapping pairs.
DENSE_ASSIGNMENT_LIMIT = 4_000_000
_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- renumbering
def _as_instances(inst: np.ndarray, what: str) -> np.ndarray:
    return validate_instances(np.asarray(inst), None, what)


def _renumber(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flattened map of contiguous indices 1..K (0 = background) and the K original ids, ascending.

    Ascending order of the original id is exactly the order ``remap_label`` produces, which decides the
    reference's ``argmax`` tie-breaks. A lookup table is used when the ids are small, ``np.unique`` otherwise.
    """
    flat = inst.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), _EMPTY_I
    top = int(flat.max())
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int64)
        return lut[flat], ids
    uniq, inv = np.unique(flat, return_inverse=True)
    inv = inv.astype(np.int64).ravel()
    if uniq[0] == 0:
        return inv, uniq[1:].astype(np.int64)
    return inv + 1, uniq.astype(np.int64)


def remap_label(inst: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..K in ascending order of the original id (HoVer-Net ``remap_label``, by_size=False).

    Returns an int32 map of the same shape; background stays 0.
    """
    inst = _as_instances(inst, "instance map")
    idx, _ = _renumber(inst)
    return idx.reshape(inst.shape).astype(np.int32)


def class_instance_map(inst: np.ndarray, type_map: np.ndarray, class_id: int) -> np.ndarray:
    """``inst * (type_map == class_id)``: the instances of one class, as PanNuke's channels and CoNIC build them."""
    inst = np.asarray(inst)
    type_map = np.asarray(type_map)
    if inst.shape != type_map.shape:
        raise InputError(None, f"type map shape {type_map.shape} differs from instance map shape {inst.shape}")
    return np.where(type_map == class_id, inst, 0)


# ---------------------------------------------------------------------------------------------- contingency
@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class Contingency:
    """Sparse GT × prediction intersection table: only pairs that share at least one pixel are stored.

    Indices are 0-based positions in ``true_ids`` / ``pred_ids`` (the original ids, ascending, i.e. the
    ``remap_label`` order). Pairs are sorted by (true index, pred index), the order ``np.nonzero`` visits the
    reference's dense matrix in.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_true(self) -> int:
        return int(self.true_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def pair_union(self) -> np.ndarray:
        """|g∪p| for every stored pair (int64)."""
        return self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.pair_inter

    @property
    def pair_iou(self) -> np.ndarray:
        """Exact IoU |g∩p| / |g∪p| of every stored pair, as the reference's ``inter / (total - inter)``."""
        return self.pair_inter / self.pair_union

    def dense(self, values: np.ndarray) -> np.ndarray:
        """Scatter per-pair ``values`` into a dense n_true × n_pred float64 matrix (0 where no overlap)."""
        out = np.zeros((self.n_true, self.n_pred), dtype=np.float64)
        out[self.pair_true, self.pair_pred] = values
        return out


def contingency(true: np.ndarray, pred: np.ndarray) -> Contingency:
    """Intersection table of two instance maps with arbitrary (non-contiguous) ids, in one pass over the pixels."""
    true = _as_instances(true, "true instance map")
    pred = _as_instances(pred, "predicted instance map")
    if true.shape != pred.shape:
        raise InputError(None, f"true and predicted instance maps differ in shape: {true.shape} vs {pred.shape}")
    t_idx, t_ids = _renumber(true)
    p_idx, p_ids = _renumber(pred)
    nt, npr = t_ids.size, p_ids.size
    cells = (nt + 1) * (npr + 1)
    if cells <= max(t_idx.size, 1 << 16):
        # few instances: one joint histogram gives the intersections and (as margins) the areas
        table = np.bincount(t_idx * (npr + 1) + p_idx, minlength=cells).reshape(nt + 1, npr + 1)
        sub = table[1:, 1:]
        pair_true, pair_pred = np.nonzero(sub)  # row-major: sorted by (true, pred)
        return Contingency(true_ids=t_ids, pred_ids=p_ids, true_area=table[1:].sum(axis=1).astype(np.int64),
                           pred_area=table[:, 1:].sum(axis=0).astype(np.int64),
                           pair_true=pair_true.astype(np.int64), pair_pred=pair_pred.astype(np.int64),
                           pair_inter=sub[pair_true, pair_pred].astype(np.int64))
    # many instances: only the pixels where both maps are foreground, pairs counted sparsely
    t_area = np.bincount(t_idx, minlength=nt + 1)[1:].astype(np.int64)
    p_area = np.bincount(p_idx, minlength=npr + 1)[1:].astype(np.int64)
    both = (t_idx > 0) & (p_idx > 0)
    key = (t_idx[both] - 1) * npr + (p_idx[both] - 1)
    if key.size == 0:
        keys, inter = _EMPTY_I, _EMPTY_I
    elif nt * npr <= 4 * key.size:
        counts = np.bincount(key, minlength=nt * npr)
        keys = np.flatnonzero(counts)
        inter = counts[keys].astype(np.int64)
    else:
        keys, inter = np.unique(key, return_counts=True)
        inter = inter.astype(np.int64)
    keys = keys.astype(np.int64)
    return Contingency(true_ids=t_ids, pred_ids=p_ids, true_area=t_area, pred_area=p_area,
                       pair_true=keys // max(npr, 1), pair_pred=keys % max(npr, 1), pair_inter=inter)


# ---------------------------------------------------------------------------------------------- PQ
@dataclass(frozen=True)
class PQResult:
    """Panoptic quality and its parts (named like StarDist's ``matching`` result).

    ``paired_true`` / ``paired_pred`` hold the original ids of the matched instances, ``paired_iou`` their IoUs.
    """

    pq: float
    dq: float
    sq: float
    tp: int
    fp: int
    fn: int
    sum_iou: float
    n_true: int
    n_pred: int
    paired_true: np.ndarray = field(default_factory=lambda: _EMPTY_I, repr=False, compare=False)
    paired_pred: np.ndarray = field(default_factory=lambda: _EMPTY_I, repr=False, compare=False)
    paired_iou: np.ndarray = field(default_factory=lambda: _EMPTY_F, repr=False, compare=False)


def pq_from_counts(tp: int, fp: int, fn: int, sum_iou: float, dq_eps: float = 0.0) -> tuple[float, float, float]:
    """(pq, dq, sq) from match counts.

    ``dq_eps=0`` is HoVer-Net ``get_fast_pq``: DQ = TP / (TP + FP/2 + FN/2), which raises ZeroDivisionError when
    both maps are empty, so (NaN, NaN, NaN) is returned then. ``dq_eps=1e-6`` is CoNIC ``get_pq`` / the
    ``multi_pq+`` aggregation: DQ = TP / ((TP + FP/2 + FN/2) + 1e-6), 0 for empty maps. SQ = sum IoU / (TP + 1e-6).
    """
    den = (tp + 0.5 * fp + 0.5 * fn) + dq_eps
    if den == 0:
        return NAN, NAN, NAN
    dq = tp / den
    sq = sum_iou / (tp + SQ_EPS)
    return dq * sq, dq, sq


def _match(ct: Contingency, match_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched (true index, pred index, IoU) as ``get_fast_pq`` finds them."""
    if match_iou < 0:
        raise ValueError("match_iou must be non-negative")
    iou = ct.pair_iou
    if match_iou >= 0.5:
        # IoU > 0.5 can hold for at most one partner on each side: the matching is unique, no assignment needed.
        sel = iou > match_iou
        return ct.pair_true[sel], ct.pair_pred[sel], iou[sel]
    if ct.n_true == 0 or ct.n_pred == 0:
        return _EMPTY_I, _EMPTY_I, _EMPTY_F
    # Below 0.5 the reference runs linear_sum_assignment on the full -IoU matrix, then keeps IoU > match_iou.
    dense = ct.dense(iou)
    rows, cols = linear_sum_assignment(-dense)
    vals = dense[rows, cols]
    keep = vals > match_iou
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64), vals[keep]


def pq_from_contingency(ct: Contingency, match_iou: float = 0.5, dq_eps: float = 0.0) -> PQResult:
    """PQ from a precomputed :class:`Contingency` (see :func:`panoptic_quality`)."""
    pt, pp, piou = _match(ct, match_iou)
    tp = int(pt.size)
    fp, fn = ct.n_pred - tp, ct.n_true - tp
    sum_iou = float(piou.sum())
    pq, dq, sq = pq_from_counts(tp, fp, fn, sum_iou, dq_eps)
    return PQResult(pq=pq, dq=dq, sq=sq, tp=tp, fp=fp, fn=fn, sum_iou=sum_iou, n_true=ct.n_true,
                    n_pred=ct.n_pred, paired_true=ct.true_ids[pt], paired_pred=ct.pred_ids[pp], paired_iou=piou)


def panoptic_quality(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> PQResult:
    """Panoptic quality as HoVer-Net ``get_fast_pq(remap_label(true), remap_label(pred), match_iou)``.

    A GT and a predicted instance match when IoU > ``match_iou`` (strictly: IoU = 0.5 exactly is *not* a
    match). DQ = TP / (TP + FP/2 + FN/2), SQ = sum of matched IoUs / (TP + 1e-6), PQ = DQ·SQ. Both maps empty:
    the reference raises ZeroDivisionError, so PQ, DQ and SQ are NaN. For ``match_iou < 0.5`` the matching is the
    reference's Hungarian assignment on the IoU matrix followed by the threshold.
    """
    return pq_from_contingency(contingency(true, pred), match_iou)


def multiclass_pq(true_inst: np.ndarray, true_type: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray,
                  classes: list[int] | tuple[int, ...], match_iou: float = 0.5) -> dict[int, PQResult]:
    """PQ per class: for class c, ``get_fast_pq`` on ``inst * (type == c)`` of both sides (PanNuke / CoNIC masking).

    Returns ``{c: PQResult}``; PanNuke's rule that a class absent from the GT counts as NaN is applied by
    :func:`karyo.metrics.pannuke.pannuke_image`, not here (here such a class has PQ 0 or NaN if both are empty).
    """
    return {int(c): panoptic_quality(class_instance_map(true_inst, true_type, c),
                                     class_instance_map(pred_inst, pred_type, c), match_iou)
            for c in classes}


# ---------------------------------------------------------------------------------------------- AJI / AJI+
@dataclass(frozen=True)
class AJIResult:
    """Aggregated Jaccard Index: ``value = intersection / union`` over the chosen (GT, prediction) pairs.

    ``paired_true`` / ``paired_pred`` are original ids; for AJI a prediction may appear several times.
    """

    value: float
    intersection: int
    union: int
    paired_true: np.ndarray = field(default_factory=lambda: _EMPTY_I, repr=False, compare=False)
    paired_pred: np.ndarray = field(default_factory=lambda: _EMPTY_I, repr=False, compare=False)


def _aji_scores(ct: Contingency) -> np.ndarray:
    return ct.pair_inter / (ct.pair_union + AJI_EPS)


def aji_from_contingency(ct: Contingency) -> AJIResult:
    """AJI from a precomputed :class:`Contingency` (see :func:`aggregated_jaccard_index`)."""
    if ct.n_pred == 0:
        # get_fast_aji: np.argmax over an empty axis raises ValueError -> NaN.
        return AJIResult(NAN, 0, 0)
    score = _aji_scores(ct)
    # Per GT: highest score first, then the lowest prediction index (numpy argmax returns the first maximum).
    order = np.lexsort((ct.pair_pred, -score, ct.pair_true))
    pt_sorted = ct.pair_true[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = pt_sorted[1:] != pt_sorted[:-1]
    chosen = order[first]
    pt, pp = ct.pair_true[chosen], ct.pair_pred[chosen]
    inter = int(ct.pair_inter[chosen].sum())
    union = int(ct.pair_union[chosen].sum())
    true_used = np.zeros(ct.n_true, dtype=bool)
    true_used[pt] = True
    pred_used = np.zeros(ct.n_pred, dtype=bool)
    pred_used[pp] = True
    union += int(ct.true_area[~true_used].sum()) + int(ct.pred_area[~pred_used].sum())
    return AJIResult(safe_div(inter, union), inter, union, ct.true_ids[pt], ct.pred_ids[pp])


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> AJIResult:
    """AJI as HoVer-Net ``get_fast_aji`` (MoNuSeg's definition).

    Each GT takes the prediction with the highest |g∩p| / (|g∪p| + 1e-6) (the epsilon makes the larger union win
    an exact-IoU tie; bit-identical scores go to the lowest remapped prediction index); a prediction may be taken by
    several GT. C = sum |g∩p*|, U = sum |g∪p*| + areas of unpaired GT and of predictions no GT took; AJI = C/U.
    Empty prediction (with or without GT): the reference raises, so NaN. Empty GT, non-empty prediction: 0.
    """
    return aji_from_contingency(contingency(true, pred))


def _assign(ct: Contingency, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max-total-score one-to-one assignment (``linear_sum_assignment(-score)``) over the GT × pred matrix.

    Up to :data:`DENSE_ASSIGNMENT_LIMIT` cells the full dense matrix is solved, exactly as the reference does
    (so exact ties resolve identically); beyond, each connected block of overlapping pairs is solved on its own,
    which gives the same optimum (exact ties may then resolve differently).
    """
    if ct.n_true * ct.n_pred <= DENSE_ASSIGNMENT_LIMIT:
        dense = ct.dense(score)
        rows, cols = linear_sum_assignment(-dense)
        return rows.astype(np.int64), cols.astype(np.int64)
    nt = ct.n_true
    graph = coo_matrix((np.ones(ct.pair_true.size), (ct.pair_true, nt + ct.pair_pred)),
                       shape=(nt + ct.n_pred, nt + ct.n_pred))
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[ct.pair_true]
    order = np.argsort(pair_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
    rows_all, cols_all = [], []
    for block in np.split(order, bounds):
        r_ids, r_inv = np.unique(ct.pair_true[block], return_inverse=True)
        c_ids, c_inv = np.unique(ct.pair_pred[block], return_inverse=True)
        sub = np.zeros((r_ids.size, c_ids.size))
        sub[r_inv, c_inv] = score[block]
        rr, cc = linear_sum_assignment(-sub)
        rows_all.append(r_ids[rr])
        cols_all.append(c_ids[cc])
    return np.concatenate(rows_all), np.concatenate(cols_all)


def aji_plus_from_contingency(ct: Contingency) -> AJIResult:
    """AJI+ from a precomputed :class:`Contingency` (see :func:`aggregated_jaccard_index_plus`)."""
    score = _aji_scores(ct)
    rows = cols = pos = _EMPTY_I
    if ct.pair_true.size:
        rows, cols = _assign(ct, score)
        # find each assigned cell in the sparse pair list (sorted by the flat key); cells without overlap
        # have score 0 and are dropped, as the reference drops ``paired_iou == 0``
        key = ct.pair_true * ct.n_pred + ct.pair_pred
        cell = rows * ct.n_pred + cols
        pos = np.clip(np.searchsorted(key, cell), 0, key.size - 1)
        keep = (key[pos] == cell) & (score[pos] > 0.0)
        rows, cols, pos = rows[keep], cols[keep], pos[keep]
    inter = int(ct.pair_inter[pos].sum())
    union = int(ct.pair_union[pos].sum())
    true_used = np.zeros(ct.n_true, dtype=bool)
    true_used[rows] = True
    pred_used = np.zeros(ct.n_pred, dtype=bool)
    pred_used[cols] = True
    union += int(ct.true_area[~true_used].sum()) + int(ct.pred_area[~pred_used].sum())
    return AJIResult(safe_div(inter, union), inter, union, ct.true_ids[rows], ct.pred_ids[cols])


def aggregated_jaccard_index_plus(true: np.ndarray, pred: np.ndarray) -> AJIResult:
    """AJI+ as HoVer-Net ``get_fast_aji_plus``: one-to-one pairing that maximises the total AJI score.

    Scores as in :func:`aggregated_jaccard_index` (with the 1e-6); ``linear_sum_assignment(-score)``; assigned
    pairs with score 0 are dropped; unpaired GT and predictions add their areas to the union. Either side empty
    gives 0; both empty is 0/0 = NaN (the reference returns NaN with a warning).
    """
    return aji_plus_from_contingency(contingency(true, pred))


# ---------------------------------------------------------------------------------------------- Dice
def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice of the foregrounds, HoVer-Net ``get_dice_1``: 2|G∩P| / (|G| + |P|); NaN when both are empty."""
    t = np.asarray(true) > 0
    p = np.asarray(pred) > 0
    if t.shape != p.shape:
        raise InputError(None, f"true and predicted maps differ in shape: {t.shape} vs {p.shape}")
    inter = int(np.count_nonzero(t & p))
    return safe_div(2 * inter, int(np.count_nonzero(t)) + int(np.count_nonzero(p)))
