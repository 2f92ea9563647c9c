"""The PromptNucSeg model object: weights round trip, prompts, tiling, mpp handling."""

import dataclasses

import numpy as np
import pytest
import torch

import karyo
from karyo.infer.assemble import suppress_duplicate_masks
from karyo.models.prompter import PrompterConfig
from karyo.models.promptnucseg import MaskCandidates, PromptNucSegConfig, PromptNucSegModel, _mask_centroids
from karyo.models.segmentor import segmentor_config


def tiny_model(**kw) -> PromptNucSegModel:
    torch.manual_seed(0)
    cfg = PromptNucSegConfig(
        prompter=PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16, head_hidden=16,
                                num_classes=2, class_names={1: "a", 2: "b"}),
        segmentor=segmentor_config("tiny"), tile_size=64, tile_overlap=16, **kw)
    return PromptNucSegModel(cfg)


def image(h=96, w=128):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def filter_given_to_resolve(model: PromptNucSegModel, name: str) -> list:
    """The ``name`` filter that segment() hands resolve(): for detected points, then for user-given points."""
    calls = []
    resolve = model.resolve

    def spy(*args, **kw):
        calls.append(kw.get(name))
        return resolve(*args, **kw)

    model.resolve = spy
    try:
        model.segment(image())
        model.segment(image(), points=[(20, 20)])
    finally:
        del model.resolve
    return calls


def test_weights_round_trip_gives_same_output(tmp_path):
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0)
    res = model.segment(image())
    assert res.n_nuclei > 0  # thresholds at 0: the untrained model still produces instances
    model.save(tmp_path / "m")
    again = karyo.load(tmp_path / "m")
    assert isinstance(again, PromptNucSegModel)
    assert again.config == model.config
    res2 = again.segment(image())
    np.testing.assert_array_equal(res.instances, res2.instances)
    assert res.classes == res2.classes
    assert set(res.classes.values()) <= {1, 2}
    assert all(0 <= s <= 1 for s in res.scores.values())


def test_points_segment_only_those_nuclei():
    model = tiny_model(mask_threshold=0.3, min_area=1, min_kept_fraction=0.0)
    res = model.segment(image(), points=[(20, 20), (100, 60)], negative=[(60, 60)])
    assert res.n_nuclei <= 2
    assert set(res.scores) == set(res.classes)


def test_mpp_rescaling_keeps_output_shape():
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1)
    res = model.segment(image(100, 90), mpp=0.5)
    assert res.instances.shape == (100, 90)


def test_grayscale_and_wrong_channels():
    model = tiny_model()
    assert model.segment(image()[..., :1]).instances.shape == (96, 128)
    with pytest.raises(karyo.InputError, match="3-channel"):
        model.segment(np.zeros((64, 64, 5), np.uint8))


def test_mask_centroids_in_image_coordinates():
    from karyo.models.promptnucseg import _mask_centroids

    probs = torch.zeros(2, 16, 16)
    probs[0, 2:7, 4:9] = 0.9  # 5×5 square, centre (x 6, y 4) in the window
    probs[1, 0, 0] = 0.9  # one pixel: below min_area, the point stays
    windows = torch.tensor([[10, 20, 26, 36], [0, 0, 16, 16]])
    pts = np.array([[12.0, 22.0], [3.0, 3.0]], np.float32)
    out = _mask_centroids(probs, windows, pts, 0.5, min_area=4)
    np.testing.assert_allclose(out, [[16.0, 24.0], [3.0, 3.0]])


def test_refinement_merges_points_that_meet_on_one_nucleus():
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0, refine_points=2,
                       refine_merge_px=3.0)
    prep = model.prepare(image())
    pts = np.array([[40.0, 40.0], [40.0, 40.0], [100.0, 70.0]], np.float32)  # a duplicate pair + one other
    candidates = model.mask_candidates(prep, pts, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7], np.float32),
                                       np.zeros((0, 2), np.float32))
    assert list(candidates.classes) == [1, 1]  # the better-scored duplicate is kept, in input order
    unmerged = dataclasses.replace(model.config, refine_merge_px=0.0)
    model.config = unmerged
    assert len(model.mask_candidates(prep, pts, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7], np.float32),
                                     np.zeros((0, 2), np.float32)).scores) == 3


def _prompts_used(model: PromptNucSegModel, pts: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(negative − positive offsets P×2, negative labels P) that ``_decode`` hands the segmentor."""
    seen = []
    decode = model.segmentor.decode

    def spy(emb, slot, coords, labels, **kw):
        seen.append((coords.numpy().copy(), labels.numpy().copy()))
        return decode(emb, slot, coords, labels, **kw)

    model.segmentor.decode = spy
    try:
        model._decode(model.prepare(image()), pts, np.zeros((0, 2), np.float32), **kw)
    finally:
        model.segmentor.decode = decode
    coords = np.concatenate([c for c, _ in seen])
    labels = np.concatenate([lab for _, lab in seen])
    return coords[:, 1] - coords[:, 0], labels[:, 1]


def test_negative_prompt_is_the_nearest_other_point_or_padding():
    pts = np.array([[40.0, 40.0], [44.0, 40.0], [100.0, 70.0]], np.float32)
    offsets, labels = _prompts_used(tiny_model(), pts)
    assert labels.tolist() == [0, 0, 0]
    np.testing.assert_allclose(offsets, [[4, 0], [-4, 0], [-56, -30]])
    _, labels = _prompts_used(tiny_model(), pts, negatives=False)
    assert labels.tolist() == [-1, -1, -1]  # SAM's "not a point"


def test_mask_nms_removes_a_duplicate_point_before_negatives_are_chosen():
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0)
    prep = model.prepare(image())
    # A duplicate pair (1 px apart) and a point far away; the tiny random network's masks are blobs around
    # each point, so the pair's masks coincide.
    pts = np.array([[40.0, 40.0], [41.0, 40.0], [100.0, 70.0]], np.float32)
    args = (np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7], np.float32), np.zeros((0, 2), np.float32))
    assert len(model.mask_candidates(prep, pts, *args).scores) == 3
    probs, windows, _ = model._decode(prep, pts[:2], np.zeros((0, 2), np.float32), negatives=False)
    assert len(suppress_duplicate_masks(probs, windows, np.array([0.9, 0.8]), max_overlap=0.5)) == 1
    model.config = dataclasses.replace(model.config, mask_nms_overlap=0.5)
    kept = model.mask_candidates(prep, pts, *args)
    assert list(kept.classes) == [1, 1]  # the better-scored duplicate and the far point
    assert len(model.mask_candidates(prep, pts[[0, 2]], args[0][[0, 2]], args[1][[0, 2]], args[2]).scores) == 2


def test_mask_nms_masks_serve_as_the_first_refinement():
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0,
                       mask_nms_overlap=0.5, refine_points=1)
    prep = model.prepare(image())
    pts = np.array([[40.0, 40.0], [41.0, 40.0], [100.0, 70.0]], np.float32)
    no_neg = np.zeros((0, 2), np.float32)
    calls = []
    decode = model._decode

    def spy(prep_, pts_, neg_, negatives=True, detail=True):
        calls.append((pts_.copy(), negatives))
        return decode(prep_, pts_, neg_, negatives, detail)

    model._decode = spy
    kept = model.mask_candidates(prep, pts, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7], np.float32), no_neg)
    assert [neg for _, neg in calls] == [False, True]  # duplicate removal, then the final decode: no extra pass
    assert list(kept.classes) == [1, 1]
    probs, windows, _ = decode(prep, pts[[0, 2]], no_neg, negatives=False)
    centroids = _mask_centroids(probs, windows, pts[[0, 2]], 0.5, 1)
    np.testing.assert_allclose(calls[1][0], centroids, atol=1e-4)  # prompts moved to the alone-decoded masks
    assert not np.allclose(centroids, pts[[0, 2]])


def test_resolve_drops_unstable_masks_of_detected_points_only():
    model = tiny_model(min_area=1, min_kept_fraction=0.0, min_stability=0.6)
    prep = model.prepare(image())
    probs = torch.zeros(2, 12, 12)
    probs[0, 2:8, 2:8] = 0.99  # a confident nucleus
    probs[1, 2:8, 2:8] = 0.55  # a faint blob on background: nothing survives a one-logit shift up
    probs[1, 4:6, 4:6] = 0.99
    windows = torch.tensor([[10, 10, 22, 22], [60, 40, 72, 52]])
    candidates = MaskCandidates(probs, windows, np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    kept = model.resolve(prep, candidates, 0.5, min_stability=0.6)
    assert kept.n_nuclei == 1 and list(kept.classes.values()) == [1]
    assert model.resolve(prep, candidates, 0.5, min_stability=0.1).n_nuclei == 2  # 4 / 36 = 0.11 passes
    assert model.resolve(prep, candidates, 0.5).n_nuclei == 2  # off by default

    assert filter_given_to_resolve(model, "min_stability") == [0.6, None]  # the user vouches for their nuclei


@pytest.mark.parametrize("every_pass", [False, True])
def test_detail_branch_fuses_in_the_final_pass_unless_every_pass(every_pass):
    model = tiny_model(score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0,
                       mask_nms_overlap=0.5, refine_points=2, detail_every_pass=every_pass)
    model.config = dataclasses.replace(model.config,
                                       segmentor=dataclasses.replace(model.config.segmentor, detail_dim=4))
    model.segmentor = type(model.segmentor)(model.config.segmentor).eval()
    flags = []
    decode = model.segmentor.decode

    def spy(*args, **kw):
        flags.append(kw["detail"])
        return decode(*args, **kw)

    model.segmentor.decode = spy
    pts = np.array([[40.0, 40.0], [41.0, 40.0], [100.0, 70.0]], np.float32)
    model.mask_candidates(model.prepare(image()), pts, np.array([1, 2, 1]), np.array([0.9, 0.8, 0.7], np.float32),
                          np.zeros((0, 2), np.float32))
    # duplicate removal (also the first refinement), the second refinement, the final decode
    assert flags == ([True] * 3 if every_pass else [False, False, True])


def test_a_clicked_nucleus_gets_the_same_mask_whatever_else_is_clicked():
    """Clicks on 10 of the sample's nuclei: each mask as when clicked alone and as in automatic segmentation (the
    prompter's other detections are negatives, so a mask stops at unclicked neighbours; without them one mask
    took 3× its nucleus on a CoNSeP tile). A click on background gives no row that is not under it."""
    from scipy import ndimage as ndi

    from karyo.data.io import read_image
    from karyo.samples import sample_path

    img = read_image(sample_path())
    model = karyo.load("default")
    auto = model.segment(img)
    pts = [tuple(map(float, v)) for v in auto.table()[["centroid_x", "centroid_y"]].to_numpy()[:10]]
    together = model.segment(img, points=pts).table()
    assert together["point_index"].notna().all() and sorted(together["point_index"]) == list(range(10))
    areas = together.set_index("point_index")["area"]
    for k, p in enumerate(pts):
        alone = model.segment(img, points=[p]).table()["area"].iloc[0]
        on_auto = int((auto.instances == auto.instances[round(p[1]), round(p[0])]).sum())
        assert abs(areas[k] - alone) <= 0.15 * alone and abs(areas[k] - on_auto) <= 0.15 * on_auto, (k, p)
    with pytest.raises(karyo.InputError, match=r"points 0 \(.*\) and 1 \(.*\) are 2 px apart: one "
                                               r"nucleus clicked twice\?"):
        model.segment(img, points=[pts[0], (pts[0][0] + 2, pts[0][1])])
    # negative points alone take their nuclei out of the automatic result (as CellViT's do), not ignored
    without = model.segment(img, negative=pts[:2])
    assert without.n_nuclei == auto.n_nuclei - 2 and all(without.instances[round(y), round(x)] == 0 for x, y in pts[:2])
    assert without != auto and auto == auto  # results compare by identity, not by raising over their arrays
    far = ndi.distance_transform_edt(auto.instances == 0)
    y, x = np.unravel_index(int(far.argmax()), far.shape)
    background = model.segment(img, points=[(float(x), float(y))])
    assert all(background.instances[y, x] == i for i in background.classes)  # nothing beside the click


def test_a_click_off_centre_in_a_large_nucleus_gives_that_nucleus_and_its_class():
    """Clicks 11–15 px from the centre of the sample's six largest nuclei. The nucleus' own detected centre lay
    beyond the 12 px context radius, so it served as a negative prompt against its own nucleus: IoU 0.09–0.30 and
    no class on five of them (a first-time user's report). Now the clicks' masks decide which detections are
    their nucleus."""
    from scipy import ndimage as ndi

    from karyo.data.io import read_image
    from karyo.samples import sample_path

    img = read_image(sample_path())
    model = karyo.load("default")
    auto = model.segment(img)
    ious = []
    for _, row in auto.table().sort_values("area", ascending=False).head(6).iterrows():
        nucleus = auto.instances == row["instance_id"]
        yy, xx = np.nonzero(ndi.binary_erosion(nucleus, iterations=2))
        k = int(np.hypot(xx - row["centroid_x"], yy - row["centroid_y"]).argmax())
        clicked = model.segment(img, points=[(float(xx[k]), float(yy[k]))])
        got = int(clicked.instances[yy[k], xx[k]])
        mask = clicked.instances == got
        ious.append((mask & nucleus).sum() / (mask | nucleus).sum())
        assert got and clicked.classes[got] == auto.classes[int(row["instance_id"])]
    assert min(ious) > 0.5 and np.mean(ious) > 0.8, ious
