"""The mask verifier's features and probability, and how resolve() uses it."""

import dataclasses

import numpy as np
import pytest
import torch
from tests.models.test_promptnucseg import filter_given_to_resolve, image, tiny_model

from karyo.models.promptnucseg import MaskCandidates
from karyo.models.verifier import FEATURES, VerifierConfig, candidate_features


def _two_masks() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.zeros(2, 12, 12)
    probs[0, 2:8, 2:8] = 0.9  # a confident nucleus: 36 px at 0.9
    probs[1, 2:8, 2:8] = 0.6  # a faint blob with a bright core
    probs[1, 4:6, 4:6] = 0.99
    return probs, torch.tensor([[10, 10, 22, 22], [60, 40, 72, 52]])


def test_candidate_features_by_hand():
    probs, _ = _two_masks()
    f = candidate_features(probs, np.array([0.8, 0.5]), np.array([0.9, 0.6]), np.array([0.79, 0.69]))
    assert f.shape == (2, len(FEATURES))
    np.testing.assert_allclose(f[:, :3], [[0.8, 0.9, 0.79], [0.5, 0.6, 0.69]])
    np.testing.assert_allclose(f[:, 3], np.log1p([36, 36]))
    np.testing.assert_allclose(f[:, 4], [0.9, (32 * 0.6 + 4 * 0.99) / 36], rtol=1e-6)
    # stability: pixels above σ(+1) = 0.731 over pixels above σ(−1) = 0.269
    np.testing.assert_allclose(f[:, 5], [1.0, 4 / 36])


def test_probability_is_the_logistic_of_standardised_features():
    v = VerifierConfig(mean=[0, 0, 0, 0, 0.5, 0], scale=[1, 1, 1, 1, 0.1, 1], weights=[0, 0, 0, 0, 2.0, 0],
                       bias=-1.0)
    x = np.zeros((2, len(FEATURES)))
    x[:, 4] = [0.9, 0.5]
    np.testing.assert_allclose(v.probability(x), 1 / (1 + np.exp(-np.array([2.0 * 4 - 1, -1.0]))))
    with pytest.raises(ValueError, match="features"):
        VerifierConfig(features=["score"])
    with pytest.raises(ValueError, match="values each"):
        VerifierConfig(weights=[1.0])


def _faint_rejecting_model(**kw):
    # P(nucleus) > 0.5 exactly when the mean mask probability exceeds 0.8
    verifier = VerifierConfig(mean=[0, 0, 0, 0, 0.8, 0], scale=[1, 1, 1, 1, 0.01, 1], weights=[0, 0, 0, 0, 1, 0])
    return tiny_model(min_area=1, min_kept_fraction=0.0, verifier=verifier, **kw)


def test_resolve_drops_masks_the_verifier_rejects_for_detected_points_only():
    model = _faint_rejecting_model(min_verified=0.5)
    prep = model.prepare(image())
    probs, windows = _two_masks()
    candidates = MaskCandidates(probs, windows, np.array([0.9, 0.8], np.float32), np.array([1, 2]), 2,
                                np.array([0.95, 0.9], np.float32), np.array([0.9, 0.8], np.float32))
    kept = model.resolve(prep, candidates, 0.5, min_verified=0.5)
    assert kept.n_nuclei == 1 and list(kept.classes.values()) == [1]
    assert model.resolve(prep, candidates, 0.5).n_nuclei == 2  # no filter unless asked
    hand_made = dataclasses.replace(candidates, prompter_scores=None)
    with pytest.raises(ValueError, match="no prompter scores"):
        model.resolve(prep, hand_made, 0.5, min_verified=0.5)

    assert filter_given_to_resolve(model, "min_verified") == [0.5, None]  # the user vouches for their nuclei


def test_min_verified_needs_a_verifier():
    with pytest.raises(ValueError, match="fitted verifier"):
        tiny_model(min_verified=0.5)
    model = tiny_model()
    probs, windows = _two_masks()
    candidates = MaskCandidates(probs, windows, np.array([0.9, 0.8], np.float32), np.array([1, 2]), 2,
                                np.array([0.95, 0.9], np.float32), np.array([0.9, 0.8], np.float32))
    with pytest.raises(ValueError, match="fitted verifier"):
        model.resolve(model.prepare(image()), candidates, 0.5, min_verified=0.5)


def test_mask_candidates_carry_what_the_verifier_reads():
    model = tiny_model(min_area=1, min_kept_fraction=0.0)
    prep = model.prepare(image())
    pts = np.array([[30.0, 30.0], [90.0, 60.0]], np.float32)
    c = model.mask_candidates(prep, pts, np.array([1, 2]), np.array([0.9, 0.4], np.float32),
                              np.zeros((0, 2), np.float32))
    np.testing.assert_allclose(c.prompter_scores, [0.9, 0.4])
    np.testing.assert_allclose(c.scores, c.prompter_scores * np.sqrt(np.clip(c.predicted_iou, 1e-6, 1)), rtol=1e-6)
    sub = c.subset(np.array([1]))
    assert sub.decoded == c.decoded and sub.prompter_scores.tolist() == pytest.approx([0.4])
    np.testing.assert_allclose(sub.features, c.features[1:])


def test_config_with_verifier_round_trips(tmp_path):
    import karyo

    model = _faint_rejecting_model(min_verified=0.4, score_threshold=0.0, mask_threshold=0.3)
    model.save(tmp_path / "m")
    again = karyo.load(tmp_path / "m")
    assert again.config == model.config and isinstance(again.config.verifier, VerifierConfig)
    np.testing.assert_array_equal(model.segment(image()).instances, again.segment(image()).instances)
