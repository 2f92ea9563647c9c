"""HoVer-Net post-processing: ideal maps of real CoNSeP patches come back as their instances; class vote; energy."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from karyo.infer.hovernet import hovernet_energy, hovernet_instances, hovernet_postprocess, instance_classes
from karyo.metrics.instance import panoptic_quality
from karyo.models.cellvit import hv_maps


def consep_patches(root, n: int):
    from karyo.data.layout import LayoutDataset

    ds = LayoutDataset(root / "consep", split="test")
    step = len(ds) // n
    return [ds[i] for i in range(0, step * n, step)]


@pytest.mark.shared_data
def test_ideal_maps_of_real_consep_patches_give_back_their_instances(shared_data):
    """The GT's own NP mask and HV maps → post-processing → PQ against that GT, over 20 spread test patches."""
    pqs, class_acc, scores = [], [], []
    for s in consep_patches(shared_data, 20):
        inst = s.instances
        types = s.type_map()
        nt = np.eye(5, dtype=np.float32)[types].transpose(2, 0, 1)  # one-hot NT "probabilities"
        res = hovernet_postprocess((inst > 0).astype(np.float32), hv_maps(inst), nt)
        pqs.append(panoptic_quality(inst, res.instances).pq)
        # each predicted instance's class is the GT class it mostly covers
        for i, c in res.classes.items():
            vals, counts = np.unique(types[res.instances == i], return_counts=True)
            class_acc.append(c == vals[np.argmax(counts)])
        scores += list(res.scores.values())
    assert np.mean(pqs) > 0.95, np.round(pqs, 3)
    assert min(pqs) > 0.8
    assert np.mean(class_acc) > 0.99
    assert 0.95 < np.mean(scores) <= 1.0  # one-hot NT: the score is the winning class's share of the pixels


def discs(centres, radius, shape=(64, 64)) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2) & (inst == 0)] = i
    return inst


@pytest.mark.parametrize("params", [{}, {"energy": "hovernet", "sobel_ksize": 21, "energy_threshold": 0.4,
                                         "marker_open_radius": 2}], ids=["slope", "hovernet"])
def test_touching_nuclei_are_separated(params):
    inst = discs([(20, 20), (20, 36), (44, 30)], 9)  # 1 and 2 overlap in a 2-px-wide band → they touch
    assert len(np.unique(inst[18:23, 27:30])) == 2
    pred = hovernet_instances((inst > 0).astype(np.float32), hv_maps(inst), **params)
    assert pred.max() == 3
    assert panoptic_quality(inst, pred).pq > 0.9


def test_energy_is_high_only_on_borders_between_nuclei():
    inst = discs([(32, 22), (32, 40)], 9)
    hv = hv_maps(inst)
    e = hovernet_energy(hv, inst > 0, sobel_ksize=3)
    border = np.zeros_like(inst, bool)
    border[:, 30:33] = True
    assert e[~(inst > 0)].max() == 0
    assert e[(inst > 0) & border].max() > 0.5  # H jumps from +1 to −1 between the two nuclei
    interior = ndi.binary_erosion(inst > 0, iterations=2) & ~border  # away from every edge (HV falls to 0 there)
    assert interior.sum() > 250
    assert e[interior].max() == 0  # inside, H rises along x and V along y: no falling slope
    with pytest.raises(ValueError, match="energy"):
        hovernet_energy(hv, inst > 0, mode="magic")


def test_class_vote_and_score():
    inst = np.zeros((10, 10), np.int32)
    inst[0:4, 0:5] = 7  # 20 px
    inst[6:9, 6:9] = 9  # 9 px
    nt = np.zeros((3, 10, 10), np.float32)
    nt[0] = 1.0
    block = nt[:, 0:4, 0:5]
    block[:] = 0
    block[2, :, :3] = 0.8  # 12 px vote class 2 (p 0.8)
    block[1, :, :3] = 0.2
    block[1, :, 3:] = 0.6  # 8 px vote class 1; their class-2 probability is 0.4
    block[2, :, 3:] = 0.4
    classes, scores = instance_classes(inst, nt)
    assert classes == {7: 2, 9: 0}  # 9 is all background votes: unclassified
    assert scores[7] == pytest.approx((12 * 0.8 + 8 * 0.4) / 20)
    assert scores[9] == pytest.approx(0.0)  # nothing says it is a nucleus
    # background votes do not win when any class has one
    nt[:, 6:9, 6:9] = np.array([0.6, 0.4, 0.0])[:, None, None]
    nt[:, 6, 6] = [0.3, 0.7, 0.0]
    classes, scores = instance_classes(inst, nt)
    assert classes[9] == 1 and scores[9] == pytest.approx((8 * 0.4 + 0.7) / 9)


def test_without_nt_scores_are_the_np_probability_and_empty_maps_work():
    inst = discs([(16, 16)], 6, (32, 32))
    prob = np.where(inst > 0, 0.9, 0.1).astype(np.float32)
    res = hovernet_postprocess(prob, hv_maps(inst))
    assert res.classes == {1: 0} and res.scores[1] == pytest.approx(0.9)
    empty = hovernet_postprocess(np.zeros((32, 32), np.float32), np.zeros((2, 32, 32), np.float32))
    assert empty.instances.max() == 0 and empty.classes == {} and empty.instances.dtype == np.int32
    with pytest.raises(ValueError, match="2×H×W"):
        hovernet_instances(prob, np.zeros((2, 16, 16)))


def test_small_objects_are_removed():
    inst = discs([(16, 16)], 6, (32, 48))
    inst[2:4, 40:43] = 2  # 6 px
    pred = hovernet_instances((inst > 0).astype(np.float32), hv_maps(inst), min_area=10)
    assert pred.max() == 1 and np.array_equal(pred > 0, inst == 1)
