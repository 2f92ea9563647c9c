"""Known-answer tests of F1 / precision / recall at IoU thresholds, F1-mean and mAP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from karyo.metrics.matching import IOU_THRESHOLDS, ThresholdMatching, match_at_thresholds


def test_thresholds_are_the_usual_ten():
    assert IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@pytest.fixture
def maps():
    """Three GT squares matched with IoU 0.6, 0.8 and 0.96, one FN and two FPs."""
    true = np.zeros((60, 60), np.int32)
    pred = np.zeros((60, 60), np.int32)
    true[0:10, 0:10] = 1
    pred[0:6, 0:10] = 11  # IoU 60/100 = 0.6
    true[20:30, 0:10] = 2
    pred[20:28, 0:10] = 12  # IoU 0.8
    true[40:50, 0:25] = 3
    pred[40:50, 0:24] = 13  # IoU 240/250 = 0.96
    true[0:5, 40:45] = 4  # FN
    pred[20:25, 40:45] = 14  # FP
    pred[40:45, 40:45] = 15  # FP
    return true, pred


def test_counts_and_ratios_at_each_threshold(maps):
    r = match_at_thresholds(*maps)
    # IoU > t strictly: 0.6 is not matched at t = 0.6, 0.8 not at t = 0.8
    assert r.tp.tolist() == [3, 3, 2, 2, 2, 2, 1, 1, 1, 1]
    assert r.fp.tolist() == [3 - k + 2 for k in r.tp.tolist()]
    assert r.fn.tolist() == [4 - k for k in r.tp.tolist()]
    tp = np.array([3, 3, 2, 2, 2, 2, 1, 1, 1, 1])
    np.testing.assert_array_equal(r.precision, tp / 5)
    np.testing.assert_array_equal(r.recall, tp / 4)
    np.testing.assert_array_equal(r.f1, 2 * tp / (2 * tp + (5 - tp) + (4 - tp)))
    np.testing.assert_array_equal(r.ap, tp / (tp + (5 - tp) + (4 - tp)))
    assert r.f1_mean == pytest.approx(np.mean(2 * tp / (9.0)), abs=1e-15)
    assert r.map == pytest.approx(np.mean(tp / (9.0 - tp)), abs=1e-15)
    assert r.at(0.5) == {"precision": 0.6, "recall": 0.75, "f1": 6 / 9, "ap": 0.5}


def test_low_threshold_maximises_the_number_of_matches():
    true = np.zeros((20, 20), np.int32)
    pred = np.zeros((20, 20), np.int32)
    true[0:10, 0:10] = 1
    pred[0:3, 0:10] = 1  # IoU 0.3
    pred[3:7, 0:10] = 2  # IoU 0.4
    r = match_at_thresholds(true, pred, thresholds=(0.25, 0.35, 0.5))
    assert r.tp.tolist() == [1, 1, 0]
    assert r.fp.tolist() == [1, 1, 2]


def test_pool_adds_counts(maps):
    a = match_at_thresholds(*maps)
    b = match_at_thresholds(maps[0], np.zeros_like(maps[1]))
    pooled = ThresholdMatching.pool([a, b])
    assert pooled.tp.tolist() == a.tp.tolist()
    assert pooled.fn.tolist() == (a.fn + 4).tolist()
    assert (pooled.n_true, pooled.n_pred) == (8, 5)
    with pytest.raises(ValueError, match="different thresholds"):
        ThresholdMatching.pool([a, match_at_thresholds(*maps, thresholds=(0.5,))])


def test_empty_maps_give_nan_not_warnings():
    empty = np.zeros((8, 8), np.int32)
    r = match_at_thresholds(empty, empty)
    assert np.all(np.isnan(r.f1)) and math.isnan(r.f1_mean) and math.isnan(r.map)
    one = empty.copy()
    one[2:4, 2:4] = 1
    r = match_at_thresholds(one, empty)  # nothing predicted: precision undefined, recall 0
    assert np.all(np.isnan(r.precision)) and np.all(r.recall == 0) and r.f1_mean == 0.0


def test_thresholds_out_of_range_rejected(maps):
    with pytest.raises(ValueError, match="thresholds"):
        match_at_thresholds(*maps, thresholds=(1.0,))
