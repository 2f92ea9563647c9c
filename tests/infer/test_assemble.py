import numpy as np
import pytest
import torch

from karyo.infer.assemble import assemble_instances, largest_piece, stability_scores, suppress_duplicate_masks
from karyo.infer.postprocess import remove_small_instances


def test_overlap_goes_to_the_more_confident_prompt():
    probs = torch.zeros(2, 10, 10)
    probs[0, 2:8, 2:8] = 0.9  # window at x0 = 0
    probs[1, 2:8, 2:8] = 0.6  # window at x0 = 3 → covers x 5..10
    win = torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10]])
    a = assemble_instances(probs, win, (12, 16), min_area=1)
    assert a.prompt_index.tolist() == [0, 1]
    assert (a.instances[2:8, 2:8] == 1).all()  # prompt 0 keeps its whole mask (higher probability)
    assert (a.instances[2:8, 8:11] == 2).all()  # prompt 1 keeps only what prompt 0 did not claim
    assert a.mask_area.tolist() == [36, 36]


def test_duplicate_prompt_is_dropped_and_windows_clip_at_border():
    probs = torch.zeros(3, 8, 8)
    probs[0, 1:7, 1:7] = 0.95
    probs[1, 1:7, 1:7] = 0.90  # same nucleus, same window: loses everything → dropped
    probs[2, 0:4, 0:4] = 0.8  # window starts outside the image: only the inside part counts
    win = torch.tensor([[4, 4, 12, 12], [4, 4, 12, 12], [-2, -2, 6, 6]])
    a = assemble_instances(probs, win, (12, 12), min_area=1)
    assert a.prompt_index.tolist() == [0, 2]
    assert (a.instances == 2).sum() == 4  # the 2×2 of the 4×4 mask that lies inside the image
    assert a.mask_area.tolist() == [36, 4]


def test_ties_break_by_score_and_threshold_applies():
    probs = torch.full((2, 4, 4), 0.7)
    win = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]])
    a = assemble_instances(probs, win, (4, 4), scores=np.array([0.1, 0.9]), min_area=1, min_kept_fraction=0.0)
    assert a.prompt_index.tolist() == [1]
    empty = assemble_instances(probs * 0.5, win, (4, 4), threshold=0.5)
    assert empty.instances.max() == 0


def test_largest_piece_and_small_removal():
    lab = np.array([[1, 1, 0, 1],
                    [1, 0, 0, 0],
                    [0, 2, 2, 0],
                    [3, 0, 2, 0]])
    out = largest_piece(lab)
    assert out[0, 3] == 0 and out[0, 0] == 1 and out[3, 0] == 3
    assert remove_small_instances(out, 2).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 2, 2, 0], [0, 0, 2, 0]]


def _greedy_mask_nms_reference(probs, windows, scores, threshold, max_overlap):
    """The definition, pixel by pixel on a canvas: slow and obvious."""
    off = -int(windows[:, :2].min())
    size = int(windows[:, 2:].max()) + off
    canvas = np.zeros((len(probs), size, size), bool)
    for k, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        canvas[k, y0 + off:y1 + off, x0 + off:x1 + off] = probs[k].numpy() > threshold
    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if all((canvas[i] & canvas[j]).sum() <= max_overlap * max(min(canvas[i].sum(), canvas[j].sum()), 1)
               for j in kept):
            kept.append(int(i))
    return sorted(kept)


def test_mask_nms_matches_its_definition_on_random_windows():
    rng = np.random.default_rng(3)
    for trial in range(20):
        p = int(rng.integers(2, 25))
        probs = torch.from_numpy(rng.random((p, 12, 12)).astype(np.float32))
        probs[:, :, :3] = 0  # uneven shapes
        xy = rng.integers(-5, 30, size=(p, 2))
        windows = torch.from_numpy(np.c_[xy, xy + 12])
        scores = rng.random(p)
        for max_overlap in (0.2, 0.5, 0.8):
            got = suppress_duplicate_masks(probs, windows, scores, threshold=0.6, max_overlap=max_overlap)
            assert got.tolist() == _greedy_mask_nms_reference(probs, windows, scores, 0.6, max_overlap), trial


def test_mask_nms_drops_the_lower_scored_duplicate_only():
    probs = torch.zeros(4, 10, 10)
    probs[0, 2:8, 2:8] = 0.9  # A
    probs[1, 3:8, 3:8] = 0.8  # B: inside A
    probs[2, 2:8, 2:8] = 0.9  # C: A's shape, in a window far away
    probs[3, 2:8, 2:8] = 0.9  # D: A's shape shifted 4 px right: overlap 2/6 of it
    win = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [40, 0, 50, 10], [4, 0, 14, 10]])
    scores = np.array([0.5, 0.9, 0.1, 0.3])
    keep = suppress_duplicate_masks(probs, win, scores, max_overlap=0.5)
    assert keep.tolist() == [1, 2, 3]  # A lies around the better-scored B; C and D are other nuclei
    assert suppress_duplicate_masks(probs, win, scores, max_overlap=1.0).tolist() == [0, 1, 2, 3]
    assert suppress_duplicate_masks(probs[:1], win[:1], np.ones(1)).tolist() == [0]


def test_stability_is_the_iou_of_the_masks_a_logit_above_and_below_the_threshold():
    probs = torch.full((3, 8, 8), 0.1)
    probs[0, :2] = 0.95  # 16 px certain
    probs[0, 2:4] = 0.6  # 16 px between sigmoid(-1) = 0.27 and sigmoid(1) = 0.73: unstable
    probs[1, :4] = 0.8  # 32 px, all certain at threshold 0.5
    # mask 2 stays empty
    np.testing.assert_allclose(stability_scores(probs, 0.5), [0.5, 1.0, 0.0])
    # around threshold 0.7 (logit 0.85) the band is (0.46, 0.86): 0.8 is no longer certain
    np.testing.assert_allclose(stability_scores(probs, 0.7), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(stability_scores(probs, 0.5, offset=0.3), [1.0, 1.0, 0.0])  # band (0.43, 0.57)
    with pytest.raises(ValueError, match="mask threshold"):
        stability_scores(probs, 1.0)
