import numpy as np
import torch

from karyo.infer.assemble import assemble_instances, largest_piece
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
