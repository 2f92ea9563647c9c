"""The duplicate judge: pair features by hand, the greedy suppression, and how mask_candidates uses it."""

import numpy as np
import pytest
import torch
from tests.models.test_promptnucseg import image, tiny_model

from karyo.infer.assemble import suppress_pairs
from karyo.models.duplicates import DUPLICATE_FEATURES, DuplicateJudgeConfig, mask_pairs


def _pair() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Mask 0: rows 2–7, columns 2–7 at 0.9 except column 6 at 0.3 (a dip: 30 px above 0.5); mask 1: rows 2–7,
    columns 4–9 at 0.8 (36 px); mask 2 far away. Points (5, 5), (7, 5), (45, 45)."""
    probs = torch.zeros(3, 12, 12)
    probs[0, 2:8, 2:8] = 0.9
    probs[0, :, 6] = torch.where(probs[0, :, 6] > 0, 0.3, 0.0)
    probs[1, 2:8, 2:8] = 0.8
    probs[2, 2:8, 2:8] = 0.9
    windows = torch.tensor([[0, 0, 12, 12], [2, 0, 14, 12], [40, 40, 52, 52]])
    return probs, windows, np.array([[5.0, 5.0], [7.0, 5.0], [45.0, 45.0]])


def test_pair_features_by_hand():
    probs, windows, pts = _pair()
    pairs = mask_pairs(probs, windows, pts, scores=np.array([0.5, 0.9, 0.7]),
                       prompter_scores=np.array([0.6, 0.95, 0.8]), predicted_iou=np.array([0.7, 0.9, 0.8]))
    assert pairs.better.tolist() == [1] and pairs.worse.tolist() == [0]  # mask 2 overlaps nothing
    assert pairs.features.shape == (1, len(DUPLICATE_FEATURES))
    # intersection: columns 4, 5, 7 of rows 2–7 = 18 px, of the smaller mask's 30
    expected = [18 / 30, 0.8, 2 / np.sqrt(30), 0.7, 0.6, 0.8, 0.3]
    np.testing.assert_allclose(pairs.features[0], expected, rtol=1e-6)
    # the better mask ranks first whichever index it has
    again = mask_pairs(probs, windows, pts, np.array([0.9, 0.5, 0.7]), np.ones(3), np.ones(3))
    assert again.better.tolist() == [0] and again.worse.tolist() == [1]
    assert again.features[0, 1] == pytest.approx(0.9)  # now mask 0's probability at point (7, 5)
    np.testing.assert_allclose(again.features[0, 5:], [0.3, 0.8], rtol=1e-6)
    assert len(mask_pairs(probs, windows, pts, np.ones(3), np.ones(3), np.ones(3), min_overlap=0.7).better) == 0
    none = mask_pairs(probs[2:], windows[2:], pts[2:], np.ones(1), np.ones(1), np.ones(1))
    assert none.features.shape == (0, len(DUPLICATE_FEATURES))


def test_suppress_pairs_is_greedy_by_score():
    # 0 drops 1; 1 would drop 2 but is gone; 2 drops 3. Listed out of order on purpose.
    keep = suppress_pairs(4, np.array([2, 1, 0]), np.array([3, 2, 1]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert keep.tolist() == [0, 2]
    assert suppress_pairs(3, np.zeros(0, int), np.zeros(0, int), np.ones(3)).tolist() == [0, 1, 2]


def _judge(bias: float) -> DuplicateJudgeConfig:
    return DuplicateJudgeConfig(bias=bias)  # zero weights: the same probability for every pair


def test_config_needs_a_judge_and_one_rule():
    with pytest.raises(ValueError, match="fitted duplicate judge"):
        tiny_model(min_duplicate_probability=0.5)
    with pytest.raises(ValueError, match="not both"):
        tiny_model(duplicate_judge=_judge(0.0), min_duplicate_probability=0.5, mask_nms_overlap=0.2)
    with pytest.raises(ValueError, match="features"):
        DuplicateJudgeConfig(features=["overlap"])
    assert DuplicateJudgeConfig().probability(np.zeros((2, len(DUPLICATE_FEATURES)))).tolist() == [0.5, 0.5]


def test_mask_candidates_drop_what_the_judge_calls_duplicates():
    pts = np.array([[30.0, 30.0], [33.0, 31.0], [90.0, 60.0]], np.float32)  # the tiny model's masks overlap

    def kept(bias: float, threshold: float | None, overlap: float | None = None) -> np.ndarray:
        model = tiny_model(min_area=1, min_kept_fraction=0.0, duplicate_judge=_judge(bias),
                           min_duplicate_probability=threshold, mask_nms_overlap=overlap)
        c = model.mask_candidates(model.prepare(image()), pts, np.array([1, 2, 1]),
                                  np.array([0.9, 0.5, 0.7], np.float32), np.zeros((0, 2), np.float32))
        return c.prompter_scores

    np.testing.assert_allclose(kept(-20.0, 0.5), [0.9, 0.5, 0.7])  # never a duplicate: all three stay
    judged = kept(20.0, 0.5)  # always: the better-scored of the overlapping pair survives; the far point stays
    np.testing.assert_allclose(judged, [0.9, 0.7])
    np.testing.assert_allclose(kept(0.0, 0.6), [0.9, 0.5, 0.7])  # P = 0.5 is below the threshold
    np.testing.assert_allclose(kept(20.0, None), [0.9, 0.5, 0.7])  # the judge alone does nothing
    np.testing.assert_allclose(kept(20.0, None, overlap=0.2), judged)  # these masks overlap by either rule


def test_config_with_a_judge_round_trips(tmp_path):
    import karyo

    judge = DuplicateJudgeConfig(weights=[1.0, 0, 0, 0, 0, 0, 0], bias=-0.5, fit={"pairs": 3})
    model = tiny_model(min_area=1, min_kept_fraction=0.0, duplicate_judge=judge, min_duplicate_probability=0.4,
                       score_threshold=0.0)
    model.save(tmp_path / "m")
    again = karyo.load(tmp_path / "m")
    assert again.config == model.config and isinstance(again.config.duplicate_judge, DuplicateJudgeConfig)
    np.testing.assert_array_equal(model.segment(image()).instances, again.segment(image()).instances)


def test_user_given_points_are_never_judged_duplicates():
    """Each point a user gives stands for a nucleus: segment(points=...) skips duplicate removal, by judge or by
    overlap, while the same points detected would lose one."""
    model = tiny_model(min_area=1, min_kept_fraction=0.0, duplicate_judge=_judge(20.0), min_duplicate_probability=0.5)
    made = []
    original = model.mask_candidates
    model.mask_candidates = lambda *a, **k: made.append(original(*a, **k)) or made[-1]
    try:
        model.segment(image(), points=[(30.0, 30.0), (35.0, 31.0)])
    finally:
        del model.mask_candidates
    assert len(made[0].scores) == 2
    prep = model.prepare(image())
    pts = np.array([[30.0, 30.0], [35.0, 31.0]], np.float32)
    detected = model.mask_candidates(prep, pts, np.array([1, 1]), np.array([0.9, 0.5], np.float32),
                                     np.zeros((0, 2), np.float32))
    assert len(detected.scores) == 1
