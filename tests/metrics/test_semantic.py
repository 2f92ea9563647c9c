"""Known-answer tests of the confusion-matrix semantic metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from karyo.errors import InputError
from karyo.metrics.semantic import SemanticMetrics, confusion_matrix, semantic_metrics

TRUE = np.array([[0, 0, 1, 1],
                 [0, 2, 2, 1],
                 [0, 2, 2, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 1, 1],
                 [2, 2, 2, 0]])


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(TRUE, PRED, num_classes=3)
    assert conf.tolist() == [[3, 1, 1, 0],
                             [0, 3, 0, 0],
                             [0, 1, 3, 0],
                             [0, 0, 0, 0]]


def test_metrics_by_hand():
    r = semantic_metrics(TRUE, PRED, num_classes=3)
    assert r.classes == (1, 2, 3)
    assert r.pixel_accuracy == 9 / 12
    # class 1: TP 3, FP 2, FN 0; class 2: TP 3, FP 1, FN 1; class 3 absent from both
    assert r.iou[1] == 3 / 5 and r.iou[2] == 3 / 5 and math.isnan(r.iou[3])
    assert r.precision[1] == 3 / 5 and r.precision[2] == 3 / 4 and math.isnan(r.precision[3])
    assert r.recall[1] == 1.0 and r.recall[2] == 3 / 4 and math.isnan(r.recall[3])
    assert r.f1[1] == 6 / 8 and r.f1[2] == 6 / 8 and math.isnan(r.f1[3])
    assert r.support == {1: 3, 2: 4, 3: 0}
    assert r.mean_iou == pytest.approx(3 / 5, abs=1e-15)
    assert r.fwiou == pytest.approx(3 / 7 * 3 / 5 + 4 / 7 * 3 / 5, abs=1e-15)


def test_include_background():
    r = semantic_metrics(TRUE, PRED, include_background=True)
    assert r.classes == (0, 1, 2)
    assert r.iou[0] == 3 / 5  # TP 3, FP 0, FN 2
    assert r.fwiou == pytest.approx(5 / 12 * 3 / 5 + 3 / 12 * 3 / 5 + 4 / 12 * 3 / 5, abs=1e-15)


def test_accumulation_equals_one_big_map():
    acc = SemanticMetrics()  # grows to the largest label seen
    acc.update(TRUE, PRED)
    acc.update(np.array([[3, 3]]), np.array([[3, 0]]))
    joint = semantic_metrics(np.concatenate([TRUE.ravel(), [3, 3]]), np.concatenate([PRED.ravel(), [3, 0]]))
    got = acc.compute()
    np.testing.assert_array_equal(got.confusion, joint.confusion)
    assert got.iou == joint.iou and got.fwiou == joint.fwiou
    assert got.iou[3] == 0.5
    acc.reset()
    assert acc.confusion.sum() == 0


def test_ignore_index_and_bad_labels():
    r = semantic_metrics(np.array([0, 1, 255]), np.array([0, 1, 1]), num_classes=1, ignore_index=255)
    assert r.confusion.tolist() == [[1, 0], [0, 1]]
    with pytest.raises(InputError, match="exceeds"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), num_classes=3)
    with pytest.raises(InputError, match="negative"):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]))
    with pytest.raises(InputError, match="integer"):
        confusion_matrix(np.array([0.5]), np.array([0]))


def test_fwiou_weights_by_true_frequency():
    r = semantic_metrics(np.array([1, 1, 1, 1, 2, 2, 0]), np.array([1, 1, 0, 0, 2, 1, 0]))
    assert r.iou == {1: 2 / 5, 2: 1 / 2}
    assert r.fwiou == pytest.approx(4 / 6 * 2 / 5 + 2 / 6 * 1 / 2, abs=1e-15)
    assert r.mean_iou == pytest.approx((2 / 5 + 1 / 2) / 2, abs=1e-15)
