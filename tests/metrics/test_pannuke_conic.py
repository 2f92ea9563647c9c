"""Known-answer tests of the PanNuke NaN rules / aggregation and the CoNIC pooling and R²."""

from __future__ import annotations

import math

import numpy as np
import pytest

from karyo.metrics.conic import conic_aggregate, conic_image_stats, conic_pq, r2_score
from karyo.metrics.pannuke import PanNukeImageResult, pannuke_aggregate, pannuke_image

NAN = float("nan")


def two_nuclei():
    inst = np.zeros((30, 30), np.int32)
    inst[0:10, 0:10] = 1
    inst[15:25, 15:25] = 2
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, 0))
    return inst, types


def test_pannuke_class_absent_from_gt_is_nan_even_with_fps():
    ti, tt = two_nuclei()
    pi = ti.copy()
    pi[0:3, 20:23] = 7  # an FP of class 3, absent from the GT
    pt = np.where(pi == 7, 3, tt)
    r = pannuke_image(ti, tt, pi, pt, classes=(1, 2, 3))
    assert r.class_pq[1] == pytest.approx(1.0, abs=1e-5) and r.class_pq[2] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(r.class_pq[3])
    assert r.mpq == pytest.approx((r.class_pq[1] + r.class_pq[2]) / 2, abs=1e-15)
    assert r.bpq < r.mpq  # the FP does count class-agnostically
    empty = pannuke_image(np.zeros_like(ti), np.zeros_like(tt), pi, pt, classes=(1, 2, 3))
    assert math.isnan(empty.mpq) and math.isnan(empty.bpq)
    missed = pannuke_image(ti, tt, np.zeros_like(pi), np.zeros_like(pt), classes=(1, 2))
    assert missed.class_pq == {1: 0.0, 2: 0.0} and missed.bpq == 0.0


def test_pannuke_aggregation_means_per_tissue_then_over_tissues():
    ims = [PanNukeImageResult({1: 0.2, 2: NAN}, 0.2, 0.4),
           PanNukeImageResult({1: 0.4, 2: 0.6}, 0.5, 0.6),
           PanNukeImageResult({1: NAN, 2: 1.0}, 1.0, 0.9),
           PanNukeImageResult({1: NAN, 2: NAN}, NAN, NAN)]
    r = pannuke_aggregate(ims, ["A", "A", "B", "B"])
    assert r.tissue_mpq == {"A": pytest.approx(0.35), "B": 1.0}
    assert r.tissue_bpq == {"A": pytest.approx(0.5), "B": 0.9}
    assert r.mpq == pytest.approx((0.35 + 1.0) / 2)  # not the mean over images (0.5667)
    assert r.bpq == pytest.approx((0.5 + 0.9) / 2)
    assert r.class_pq == {1: pytest.approx(0.3), 2: pytest.approx(0.8)}  # over all images, not per tissue
    no_tissue = pannuke_aggregate(ims)
    assert list(no_tissue.tissue_mpq) == ["(none)"]


def test_conic_pq_has_the_dq_epsilon_and_zero_for_empty():
    ti, _ = two_nuclei()
    r = conic_pq(ti, ti)
    assert r.dq == 2 / (2 + 1e-6)
    assert r.pq == r.dq * 2 / (2 + 1e-6)
    assert conic_pq(np.zeros_like(ti), np.zeros_like(ti)).pq == 0.0


def test_conic_pooling_by_hand():
    ti, tt = two_nuclei()
    pi = ti.copy()
    pi[15:25, 15:20] = 0  # nucleus 2 predicted half -> IoU 0.5 -> no match
    a = conic_image_stats(ti, tt, pi, tt, classes=(1, 2, 3))
    assert a.class_stats.tolist() == [[1, 0, 0, 1.0], [0, 1, 1, 0.0], [0, 0, 0, 0.0]]
    b = conic_image_stats(ti, tt, ti, tt, classes=(1, 2, 3))
    res = conic_aggregate([a, b])
    assert res.class_totals.tolist() == [[2, 0, 0, 2.0], [1, 1, 1, 1.0], [0, 0, 0, 0.0]]
    pq1 = (2 / (2 + 1e-6)) * (2 / (2 + 1e-6))
    pq2 = (1 / (1 + 1 + 1e-6)) * (1 / (1 + 1e-6))
    assert res.class_pq_plus == {1: pq1, 2: pq2, 3: 0.0}  # a class with nothing anywhere counts as 0
    assert res.mpq_plus == pytest.approx((pq1 + pq2) / 3, abs=1e-15)
    assert res.binary_pq == pytest.approx((a.binary.pq + b.binary.pq) / 2, abs=1e-15)
    assert res.class_r2[3] == 1.0  # constant and perfectly predicted


def test_r2_score_matches_sklearn_conventions():
    # sklearn's documented example: r2_score([3, -0.5, 2, 7], [2.5, 0.0, 2, 8]) = 0.948...
    assert r2_score([3, -0.5, 2, 7], [2.5, 0.0, 2, 8]) == pytest.approx(0.9486081370449679, abs=1e-15)
    assert r2_score([2, 2, 2], [2, 2, 2]) == 1.0
    assert r2_score([2, 2, 2], [2, 3, 2]) == 0.0
    assert math.isnan(r2_score([1], [1]))
