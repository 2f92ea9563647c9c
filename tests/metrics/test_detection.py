"""Known-answer tests of the centroid detection / classification F1 (HoVer-Net run_nuclei_type_stat rules)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from karyo.metrics.detection import NucleiTypeStats, instance_points, labels_at, pair_coordinates


def test_centroids_and_majority_type():
    inst = np.zeros((10, 10), np.int32)
    inst[0:2, 0:4] = 9  # centre x = 1.5, y = 0.5
    inst[5:8, 6:7] = 3  # centre x = 6, y = 6
    types = np.zeros_like(inst)
    types[0:2, 0:4] = 2
    types[0, 0:3] = 4  # 3 px of type 4, 5 px of type 2 -> 2
    types[5:8, 6] = [1, 0, 0]  # one typed pixel -> type 1 (background does not vote)
    pts = instance_points(inst, types)
    assert pts.ids.tolist() == [3, 9]
    assert pts.xy.dtype == np.float32
    assert pts.xy.tolist() == [[6.0, 6.0], [1.5, 0.5]]
    assert pts.types.tolist() == [1, 2]
    assert instance_points(inst).types.tolist() == [0, 0]


def test_majority_type_ties_go_to_the_smaller_class():
    inst = np.ones((1, 4), np.int32)
    assert instance_points(inst, np.array([[3, 3, 2, 2]])).types.tolist() == [2]


def test_pair_radius_is_inclusive():
    a = np.array([[25.0, 155.0], [25.0, 205.0]], np.float32)
    b = np.array([[37.0, 155.0], [37.5, 205.0]], np.float32)
    p = pair_coordinates(a, b, 12)
    assert p.paired.tolist() == [[0, 0]]  # distance 12 kept, 12.5 dropped
    assert p.unpaired_a.tolist() == [1] and p.unpaired_b.tolist() == [1]


def test_hungarian_minimises_total_distance_before_the_radius():
    a = np.array([[160, 230], [173, 230]], np.float32)
    b = np.array([[160, 218], [161, 230]], np.float32)
    p = pair_coordinates(a, b, 12)
    # a1-b2 (1) + a2-b1 (17.7) beats a1-b1 (12) + a2-b2 (12); the 17.7 pair is then dropped
    assert p.paired.tolist() == [[0, 1]]
    assert p.unpaired_a.tolist() == [1] and p.unpaired_b.tolist() == [0]


def test_f1_type_formula_by_hand():
    s = NucleiTypeStats()
    # image 1: three pairs (types 1-1, 1-2, 2-2), one unpaired GT of type 1, one unpaired pred of type 2
    s.add_points([[0, 0], [50, 0], [100, 0], [150, 150]], [1, 1, 2, 1],
                 [[1, 0], [51, 0], [101, 0], [300, 300]], [1, 2, 2, 2])
    r = s.compute([1, 2])
    assert (r.tp, r.fp, r.fn) == (3, 1, 1)
    assert r.f1_d == 6 / 8
    assert r.acc_type == 2 / 3
    # type 1: TP 1, FP 0, FN 1 (the 1-2 pair), FPd 0, FNd 1 -> 2 / (2 + 2 + 1)
    assert r.f1_type[1] == 2 / 5
    # type 2: TP 1, FP 1, FN 0, FPd 1, FNd 0 -> 2 / (2 + 2 + 1)
    assert r.f1_type[2] == 2 / 5
    assert r.precision_d == 3 / 4 and r.recall_d == 3 / 4


def test_dummy_point_for_an_empty_image():
    s = NucleiTypeStats()
    s.add_points(np.zeros((0, 2)), [], [[5, 5], [100, 100]], [3, 3])  # empty GT: dummy (0,0) type 0
    r = s.compute()
    assert list(r.f1_type) == [0]  # default type list = GT types, i.e. the dummy type
    assert (r.tp, r.fp, r.fn) == (1, 1, 0)  # the dummy pairs with the prediction at distance 7.07
    assert r.acc_type == 0.0
    no_dummy = NucleiTypeStats(dummy_for_empty=False)
    no_dummy.add_points(np.zeros((0, 2)), [], [[5, 5]], [3])
    assert math.isnan(no_dummy.compute().f1_d)  # no pair anywhere: the reference would raise


def test_add_maps_uses_centroids_and_types():
    true = np.zeros((40, 40), np.int32)
    true[0:5, 0:5] = 1
    true[20:25, 20:25] = 2
    pred = np.roll(true, 3, axis=1) * 10
    s = NucleiTypeStats()
    s.add(true, (true > 0) * 1, pred, (pred > 0) * 2)
    r = s.compute([1, 2])
    assert r.f1_d == 1.0 and r.acc_type == 0.0
    assert r.f1_type == {1: 0.0, 2: 0.0}


def test_mismatched_points_and_types_raise():
    with pytest.raises(ValueError, match="points"):
        NucleiTypeStats().add_points([[0, 0]], [1, 2], [[0, 0]], [1])


def test_labels_at_rounds_to_the_nearest_pixel_and_clips_to_the_map():
    inst = np.zeros((4, 5), np.int32)
    inst[1, 2] = 7
    inst[3, 4] = 9
    xy = np.array([[2.4, 0.6],  # rounds to (2, 1)
                   [1.49, 1.0],  # rounds to (1, 1): background
                   [6.0, 9.0],  # off the map: clipped to the corner (4, 3)
                   [-3.0, 1.2]])  # clipped to column 0
    np.testing.assert_array_equal(labels_at(inst, xy), [7, 0, 9, 0])
    assert labels_at(inst, np.zeros((0, 2))).shape == (0,)
