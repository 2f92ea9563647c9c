"""Binary post-processing on hand-made probability maps: threshold, small objects and holes, touching discs split."""

import numpy as np
import pytest

from karyo.infer.binary import BinaryConfig, binary_instances, fill_small_holes, instance_scores, remove_small_objects
from karyo.metrics.instance import contingency

YY, XX = np.mgrid[:64, :80]


def disc(cy: float, cx: float, r: float) -> np.ndarray:
    return (YY - cy) ** 2 + (XX - cx) ** 2 <= r * r


def best_iou(pred: np.ndarray, mask: np.ndarray) -> float:
    ct = contingency(mask.astype(np.int32), pred)
    return float(ct.pair_iou.max()) if ct.pair_iou.size else 0.0


def test_touching_discs_are_split_by_the_watershed():
    a, b = disc(32, 28, 11), disc(32, 47, 11)  # centres 19 px apart: a 10 px wide neck
    prob = np.where(a | b, 0.9, 0.05).astype(np.float32)
    inst = binary_instances(prob)
    assert inst.dtype == np.int32 and inst.max() == 2 and set(np.unique(inst)) == {0, 1, 2}
    assert best_iou(inst, a) > 0.85 and best_iou(inst, b) > 0.85
    assert (inst[32, 28] != inst[32, 47]) and inst[32, 28] > 0 and inst[32, 47] > 0
    # the seed's plain connected components merge them
    merged = binary_instances(prob, BinaryConfig(watershed=False))
    assert merged.max() == 1


def test_single_and_elongated_objects_are_not_over_split():
    ellipse = ((YY - 32) / 8.0) ** 2 + ((XX - 40) / 20.0) ** 2 <= 1.0
    inst = binary_instances(np.where(ellipse | disc(10, 10, 6), 0.8, 0.0))
    assert inst.max() == 2
    assert best_iou(inst, ellipse) > 0.95


def test_threshold_is_0_3_and_inclusive():
    prob = np.zeros((64, 80), np.float32)
    prob[disc(20, 20, 8)] = 0.35
    prob[disc(20, 55, 8)] = 0.25
    prob[disc(45, 40, 8)] = 0.30
    inst = binary_instances(prob)
    assert inst.max() == 2 and inst[20, 20] > 0 and inst[45, 40] > 0 and inst[20, 55] == 0
    assert binary_instances(prob, BinaryConfig(threshold=0.2)).max() == 3


def test_small_objects_removed_and_small_holes_filled():
    mask = disc(30, 30, 12).copy()
    mask[29:32, 29:32] = False  # 9 px hole: filled
    ring = disc(30, 62, 14) & ~disc(30, 62, 7)  # 149 px hole: kept
    speck = np.zeros_like(mask)
    speck[5:10, 70:76] = True  # 30 px < 32: removed
    blob = np.zeros_like(mask)
    blob[55:61, 5:11] = True  # 36 px: kept
    full = mask | ring | speck | blob
    cleaned = fill_small_holes(remove_small_objects(full, 32), 32)
    assert cleaned[30, 30] and not cleaned[30, 62] and not cleaned[7, 72] and cleaned[57, 7]
    assert cleaned.sum() == (disc(30, 30, 12) | ring | blob).sum()
    inst = binary_instances(full.astype(np.float32))
    assert inst[7, 72] == 0 and inst[30, 30] > 0 and inst[30, 62] == 0
    corner = np.ones((10, 10), bool)
    corner[:2, :2] = False  # a 4 px background region touching the border is not a hole
    assert not fill_small_holes(corner, 32)[0, 0]


def test_empty_and_scores():
    assert binary_instances(np.zeros((16, 16))).max() == 0
    prob = np.where(disc(32, 28, 10), 0.8, 0.0)
    inst = binary_instances(prob)
    assert instance_scores(inst, prob) == {1: pytest.approx(0.8)}
    with pytest.raises(ValueError, match="threshold"):
        BinaryConfig(threshold=1.5)
