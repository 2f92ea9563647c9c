"""Known-answer tests of the instance metrics on small hand-made maps, and a cross-check against pairwise loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from karyo.errors import InputError
from karyo.metrics import instance as inst_mod
from karyo.metrics.instance import (
    aggregated_jaccard_index,
    aggregated_jaccard_index_plus,
    contingency,
    dice,
    multiclass_pq,
    panoptic_quality,
    remap_label,
)


def canvas(shape=(40, 60)) -> np.ndarray:
    return np.zeros(shape, np.int32)


# ------------------------------------------------------------------------------------------- remap / contingency
def test_remap_label_ascending_original_id():
    m = np.array([[0, 7, 7], [3, 0, 100], [3, 3, 100]])
    assert remap_label(m).tolist() == [[0, 2, 2], [1, 0, 3], [1, 1, 3]]
    assert remap_label(m).dtype == np.int32


def test_remap_label_huge_ids_take_the_unique_path():
    m = np.array([[0, 2_000_000_000, 5], [5, 0, 1_000_000]])
    assert remap_label(m).tolist() == [[0, 3, 1], [1, 0, 2]]


def test_remap_label_rejects_negative_ids():
    with pytest.raises(InputError):
        remap_label(np.array([[0, -1]]))


def test_contingency_matches_brute_force():
    rng = np.random.RandomState(0)
    true = rng.randint(0, 6, size=(30, 30)) * 11
    pred = rng.randint(0, 5, size=(30, 30)) * 3
    ct = contingency(true, pred)
    assert ct.true_ids.tolist() == [11, 22, 33, 44, 55]
    assert ct.pred_ids.tolist() == [3, 6, 9, 12]
    for k, (ti, pj) in enumerate(zip(ct.pair_true, ct.pair_pred, strict=True)):
        g, p = true == ct.true_ids[ti], pred == ct.pred_ids[pj]
        assert ct.pair_inter[k] == np.sum(g & p)
        assert ct.pair_union[k] == np.sum(g | p)
    assert len(ct.pair_true) == sum(np.any((true == a) & (pred == b)) for a in ct.true_ids for b in ct.pred_ids)
    assert ct.true_area.tolist() == [int(np.sum(true == a)) for a in ct.true_ids]
    keys = ct.pair_true * ct.n_pred + ct.pair_pred
    assert np.all(np.diff(keys) > 0)  # sorted by (true, pred)


def test_contingency_many_instances_sparse_paths():
    """More GT × pred cells than pixels: the sparse bincount path (rows × columns) and the np.unique path."""
    rows = np.repeat(np.arange(1, 301), 300).reshape(300, 300)
    ct = contingency(rows, rows.T * 5)  # every row meets every column in exactly one pixel
    assert (ct.n_true, ct.n_pred, ct.pair_inter.size) == (300, 300, 90_000)
    assert np.all(ct.pair_inter == 1) and np.all(ct.true_area == 300) and np.all(ct.pred_area == 300)
    assert ct.pred_ids[:3].tolist() == [5, 10, 15]
    pixels = np.arange(1, 32 * 32 + 1).reshape(32, 32)  # one instance per pixel
    ct = contingency(pixels, np.roll(pixels, 1, axis=1) + 7)
    assert ct.pair_inter.size == 1024 and np.all(ct.pair_inter == 1)
    shifted = np.roll(pixels, 1, axis=1)
    assert np.all(ct.pred_ids[ct.pair_pred] - 7 == shifted.ravel()[ct.true_ids[ct.pair_true] - 1])
    assert panoptic_quality(pixels, pixels * 2).tp == 1024


def test_contingency_shape_mismatch_raises():
    with pytest.raises(InputError):
        contingency(np.zeros((4, 4), int), np.zeros((4, 5), int))


# ------------------------------------------------------------------------------------------- PQ
def test_iou_exactly_half_is_not_a_match_but_just_above_is():
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:5, 0:10] = 1  # IoU 50/100 = 0.5 exactly
    true[20:30, 0:10] = 2
    pred[20:25, 0:10] = 2
    pred[25, 0] = 2  # IoU 51/100
    r = panoptic_quality(true, pred)
    assert (r.tp, r.fp, r.fn) == (1, 1, 1)
    assert r.sum_iou == pytest.approx(0.51, abs=1e-15)
    assert r.dq == 1 / (1 + 0.5 + 0.5)
    assert r.sq == 0.51 / (1 + 1e-6)
    assert r.pq == r.dq * r.sq
    assert r.paired_true.tolist() == [2] and r.paired_pred.tolist() == [2]


def test_perfect_prediction_sq_has_the_reference_epsilon():
    true = canvas()
    true[2:6, 2:6] = 5
    true[10:20, 10:14] = 9
    pred = np.where(true == 5, 40, np.where(true == 9, 2, 0))  # same shapes, other ids
    r = panoptic_quality(true, pred)
    assert (r.tp, r.fp, r.fn) == (2, 0, 0)
    assert r.dq == 1.0
    assert r.sq == 2 / (2 + 1e-6) and r.sq < 1.0


def test_both_empty_pq_is_nan():
    r = panoptic_quality(canvas(), canvas())
    assert math.isnan(r.pq) and math.isnan(r.dq) and math.isnan(r.sq)
    assert (r.tp, r.fp, r.fn, r.n_true, r.n_pred) == (0, 0, 0, 0, 0)


def test_one_side_empty_pq_is_zero():
    full = canvas()
    full[1:4, 1:4] = 3
    for true, pred, counts in ((full, canvas(), (0, 0, 1)), (canvas(), full, (0, 1, 0))):
        r = panoptic_quality(true, pred)
        assert (r.pq, r.dq, r.sq) == (0.0, 0.0, 0.0)
        assert (r.tp, r.fp, r.fn) == counts


def test_low_match_iou_uses_the_assignment():
    """match_iou < 0.5: Hungarian on -IoU, then keep IoU > match_iou (one GT, two preds at IoU 0.3 and 0.4)."""
    true, pred = canvas(), canvas()
    true[0:10, 0:10] = 1
    pred[0:3, 0:10] = 1  # IoU 0.3
    pred[3:7, 0:10] = 2  # IoU 0.4
    r = panoptic_quality(true, pred, match_iou=0.25)
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)
    assert r.paired_pred.tolist() == [2] and r.sum_iou == 0.4
    assert panoptic_quality(true, pred, match_iou=0.5).tp == 0
    with pytest.raises(ValueError, match="non-negative"):
        panoptic_quality(true, pred, match_iou=-0.1)


def test_multiclass_pq_masks_by_type():
    true, pred = canvas(), canvas()
    true[0:4, 0:4] = 1
    true[10:14, 0:4] = 2
    ttype = np.where(true == 1, 1, np.where(true == 2, 2, 0))
    pred[0:4, 0:4] = 7
    pred[10:14, 0:4] = 8
    ptype = np.where(pred > 0, 1, 0)  # the second nucleus is predicted as class 1
    res = multiclass_pq(true, ttype, pred, ptype, [1, 2, 3])
    assert (res[1].tp, res[1].fp, res[1].fn) == (1, 1, 0)
    assert (res[2].tp, res[2].fp, res[2].fn) == (0, 0, 1)
    assert math.isnan(res[3].pq)  # class absent on both sides: both maps empty


# ------------------------------------------------------------------------------------------- AJI / AJI+
def _tie_maps():
    """One GT (200 px) overlapped by A (60 px inside, IoU 0.3) and B (75 in + 50 out, IoU 75/250 = 0.3)."""
    true, pred = canvas(), canvas()
    true[0:10, 0:20] = 1
    pred[0:3, 0:20] = 1  # A, smaller id
    pred[3:8, 5:30] = 2  # B
    return true, pred


def test_aji_exact_iou_tie_goes_to_the_larger_union():
    true, pred = _tie_maps()
    assert 60 / 200 == 75 / 250  # bit-identical IoU ...
    assert 75 / (250 + 1e-6) > 60 / (200 + 1e-6)  # ... but the reference's epsilon prefers the larger union
    r = aggregated_jaccard_index(true, pred)
    assert r.paired_pred.tolist() == [2]
    assert (r.intersection, r.union) == (75, 250 + 60)  # A is unpaired: its area joins the union
    assert r.value == 75 / 310


def test_aji_bit_identical_scores_go_to_the_lowest_remapped_id():
    true, pred = canvas(), canvas()
    true[0:2, 0:10] = 1
    pred[0:2, 0:5] = 9  # left half, larger original id
    pred[0:2, 5:10] = 4  # right half, smaller original id -> remapped index 0 -> argmax picks it
    r = aggregated_jaccard_index(true, pred)
    assert r.paired_pred.tolist() == [4]
    assert r.value == 10 / (20 + 10)


def test_aji_prediction_shared_by_two_gt_counts_twice_aji_plus_once():
    true, pred = canvas(), canvas()
    true[0:4, 0:4] = 1  # 16 px
    true[0:4, 4:8] = 2  # 16 px
    pred[0:4, 0:8] = 5  # 32 px, covers both
    aji = aggregated_jaccard_index(true, pred)
    assert aji.paired_pred.tolist() == [5, 5]
    assert (aji.intersection, aji.union) == (32, 64)
    assert aji.value == 0.5
    plus = aggregated_jaccard_index_plus(true, pred)
    assert len(plus.paired_pred) == 1
    assert (plus.intersection, plus.union) == (16, 32 + 16)
    assert plus.value == 16 / 48


def test_aji_edge_cases():
    full = canvas()
    full[1:4, 1:4] = 3
    assert math.isnan(aggregated_jaccard_index(full, canvas()).value)  # reference raises (argmax of empty)
    assert math.isnan(aggregated_jaccard_index(canvas(), canvas()).value)
    assert aggregated_jaccard_index(canvas(), full).value == 0.0
    assert aggregated_jaccard_index_plus(full, canvas()).value == 0.0
    assert aggregated_jaccard_index_plus(canvas(), full).value == 0.0
    assert math.isnan(aggregated_jaccard_index_plus(canvas(), canvas()).value)


def test_dice():
    true, pred = canvas((4, 4)), canvas((4, 4))
    true[0, :] = 1
    pred[0, :2] = 2
    pred[1, :2] = 3
    assert dice(true, pred) == 2 * 2 / (4 + 4)
    assert math.isnan(dice(canvas(), canvas()))
    assert dice(true, canvas((4, 4))) == 0.0


# ------------------------------------------------------------------------------------------- textbook cross-check
def _loop_reference(true, pred):
    """Textbook per-pair loop with boolean masks, following the HoVer-Net functions step by step."""
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [i for i in np.unique(pred) if i]
    inter = np.zeros((len(t_ids), len(p_ids)))
    union = np.zeros((len(t_ids), len(p_ids)))
    for a, ti in enumerate(t_ids):
        for b, pj in enumerate(p_ids):
            g, p = true == ti, pred == pj
            if np.any(g & p):
                inter[a, b] = np.sum(g & p)
                union[a, b] = np.sum(g | p)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    tp = int(np.sum(iou > 0.5))
    fp, fn = len(p_ids) - tp, len(t_ids) - tp
    sq = iou[iou > 0.5].sum() / (tp + 1e-6)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    t_area = [np.sum(true == i) for i in t_ids]
    p_area = [np.sum(pred == j) for j in p_ids]
    score = inter / (union + 1e-6)
    best = np.argmax(score, axis=1)
    paired = np.flatnonzero(score.max(axis=1) > 0)
    c = inter[paired, best[paired]].sum()
    u = union[paired, best[paired]].sum()
    u += sum(t_area[a] for a in range(len(t_ids)) if a not in set(paired))
    u += sum(p_area[b] for b in range(len(p_ids)) if b not in set(best[paired]))
    rows, cols = linear_sum_assignment(-score)
    keep = score[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    c2, u2 = inter[rows, cols].sum(), union[rows, cols].sum()
    u2 += sum(t_area[a] for a in range(len(t_ids)) if a not in set(rows))
    u2 += sum(p_area[b] for b in range(len(p_ids)) if b not in set(cols))
    return dict(pq=dq * sq, dq=dq, sq=sq, tp=tp, aji=c / u, aji_plus=c2 / u2)


def _blobs(rng, shape, n, max_id):
    m = np.zeros(shape, np.int32)
    ids = rng.choice(np.arange(1, max_id), size=n, replace=False)
    for i in ids:
        y, x = rng.randint(0, shape[0] - 9), rng.randint(0, shape[1] - 9)
        h, w = rng.randint(3, 10), rng.randint(3, 10)
        m[y:y + h, x:x + w] = i
    return m


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_pairwise_loop(seed):
    rng = np.random.RandomState(seed)
    true = _blobs(rng, (64, 64), 25, 1000)
    pred = np.roll(true, (rng.randint(-1, 2), rng.randint(-1, 2)), axis=(0, 1))
    pred = np.where(pred > 0, pred * 7 + 3, _blobs(rng, (64, 64), 8, 50))
    ref = _loop_reference(true, pred)
    assert ref["tp"] >= 5  # a non-trivial case
    r = panoptic_quality(true, pred)
    assert (r.tp, r.pq, r.dq, r.sq) == pytest.approx((ref["tp"], ref["pq"], ref["dq"], ref["sq"]), abs=1e-12)
    assert aggregated_jaccard_index(true, pred).value == pytest.approx(ref["aji"], abs=1e-12)
    assert aggregated_jaccard_index_plus(true, pred).value == pytest.approx(ref["aji_plus"], abs=1e-12)


def test_blockwise_assignment_gives_the_dense_optimum(monkeypatch, golden_cases):
    """Above DENSE_ASSIGNMENT_LIMIT the AJI+ assignment is solved per overlap component: same values here."""
    dense = [aggregated_jaccard_index_plus(c["true_inst"], c["pred_inst"]).value for c in golden_cases[5:25]]
    monkeypatch.setattr(inst_mod, "DENSE_ASSIGNMENT_LIMIT", 0)
    blocks = [aggregated_jaccard_index_plus(c["true_inst"], c["pred_inst"]).value for c in golden_cases[5:25]]
    assert blocks == pytest.approx(dense, abs=1e-15)
