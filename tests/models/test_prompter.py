"""PromptNucSeg/P2PNet prompter: anchor geometry, FPN sampling, Hungarian matching, loss, NMS, and real training."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from karyo.config import from_dict, to_dict
from karyo.errors import InputError
from karyo.models.fpn import FPN
from karyo.models.losses import binary_focal
from karyo.models.prompter import (
    PROMPTER_PRESETS,
    Prompter,
    PrompterConfig,
    anchor_points,
    decode_points,
    hungarian_match,
    point_nms,
    prompter_loss,
)

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16, head_hidden=16)


def logits_from_probs(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


# ------------------------------------------------------------------------------------------------ geometry


def test_anchor_grid_stride_8_on_256():
    a = anchor_points(256, 256, 8)
    assert a.shape == (32 * 32, 2)
    assert a[0].tolist() == [4.0, 4.0]
    assert a[1].tolist() == [12.0, 4.0]  # x runs fastest (row-major)
    assert a[32].tolist() == [4.0, 12.0]
    assert a[-1].tolist() == [252.0, 252.0]


def test_anchor_grid_stride_16_non_square():
    a = anchor_points(64, 96, 16)  # H = 64, W = 96
    assert a.shape == (4 * 6, 2)
    assert a[5].tolist() == [88.0, 8.0]
    assert a[6].tolist() == [8.0, 24.0]
    assert a[-1].tolist() == [88.0, 56.0]
    xs, ys = torch.unique(a[:, 0]), torch.unique(a[:, 1])
    assert xs.tolist() == [8.0, 24.0, 40.0, 56.0, 72.0, 88.0]
    assert ys.tolist() == [8.0, 24.0, 40.0, 56.0]


def test_anchor_grid_four_per_cell():
    a = anchor_points(32, 32, 8, per_cell=4)
    assert a.shape == (16 * 4, 2)
    assert a[:4].tolist() == [[2.0, 2.0], [6.0, 2.0], [2.0, 6.0], [6.0, 6.0]]
    assert a[4:8].tolist() == [[10.0, 2.0], [14.0, 2.0], [10.0, 6.0], [14.0, 6.0]]


@pytest.mark.parametrize(("levels", "stride", "h", "w"), [(3, 8, 64, 96), (4, 16, 64, 96), (3, 8, 256, 256)])
def test_prompter_output_geometry(levels, stride, h, w):
    torch.manual_seed(0)
    cfg = PrompterConfig(**TINY, levels=levels, anchor_stride=stride, num_classes=3,
                         class_names={1: "a", 2: "b", 3: "c"})
    model = Prompter(cfg).eval()
    out = model(torch.randn(2, 3, h, w))
    n = (h // stride) * (w // stride)
    assert out["points"].shape == (2, n, 2)
    assert out["logits"].shape == (2, n, 4)
    # the regression head's last layer starts at zero, so an untrained prompter predicts exactly its anchors
    assert torch.equal(out["points"][1], anchor_points(h, w, stride))


def test_fpn_levels_and_anchor_centre_sampling():
    torch.manual_seed(0)
    chans = (8, 16, 24, 32)
    feats = [torch.randn(1, c, 128 // s, 96 // s) for c, s in zip(chans, (4, 8, 16, 32), strict=True)]
    fpn3 = FPN(chans, 16, levels=3, anchor_stride=8)
    assert fpn3.level_strides == (4, 8, 16)
    assert [tuple(p.shape) for p in fpn3.pyramid(feats)] == [(1, 16, 32, 24), (1, 16, 16, 12), (1, 16, 8, 6)]
    fpn4 = FPN(chans, 16, levels=4, anchor_stride=16)
    assert fpn4.level_strides == (4, 8, 16, 32)
    assert fpn4(feats).shape == (1, 16, 8, 6)
    # The fused map reads every level at the anchor pixel positions: compare with grid_sample at those points.
    levels = fpn4.pyramid(feats)
    anchors = anchor_points(128, 96, 16)
    grid = torch.stack((anchors[:, 0] / 96 * 2 - 1, anchors[:, 1] / 128 * 2 - 1), -1).view(1, 8, 6, 2)
    sampled = [F.grid_sample(lv, grid, mode="bilinear", padding_mode="border", align_corners=False) for lv in levels]
    expected = fpn4.fuse(torch.cat(sampled, 1))
    assert torch.allclose(fpn4(feats), expected, atol=1e-5)
    with pytest.raises(InputError, match="anchor stride"):
        FPN(chans, 16, levels=3, anchor_stride=12)


def test_input_validation_and_n_channels():
    model = Prompter(PrompterConfig(**TINY, in_chans=1, pixel_mean=(0.5,), pixel_std=(0.25,))).eval()
    x = model.normalize(torch.full((1, 1, 64, 64), 0.75))
    assert torch.allclose(x, torch.ones_like(x))
    assert model(x)["points"].shape == (1, 64, 2)
    with pytest.raises(InputError, match="multiples of 32"):
        model(torch.zeros(1, 1, 48, 64))
    with pytest.raises(InputError, match=r"B×1×H×W"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InputError, match="pixel_mean"):
        PrompterConfig(in_chans=1)
    with pytest.raises(InputError, match="square"):
        PrompterConfig(anchors_per_cell=2)
    with pytest.raises(InputError, match="anchor_stride"):
        PrompterConfig(anchor_stride=12)
    with pytest.raises(InputError, match="levels L"):
        PrompterConfig(levels=5)


def test_backbone_weights_load_into_a_grey_prompter(tmp_path):
    torch.manual_seed(1)
    rgb = Prompter(PrompterConfig(**TINY))
    torch.save({"model": rgb.backbone.state_dict()}, tmp_path / "backbone.pth")
    grey = Prompter(PrompterConfig(**TINY, in_chans=1, pixel_mean=(0.5,), pixel_std=(0.2,)))
    report = grey.load_backbone_weights(tmp_path / "backbone.pth")
    assert report.adapted == ("downsample_layers.0.0.weight",)
    assert torch.equal(grey.backbone.stages[3][0].pwconv2.weight, rgb.backbone.stages[3][0].pwconv2.weight)
    assert torch.allclose(grey.backbone.downsample_layers[0][0].weight[:, 0],
                          rgb.backbone.downsample_layers[0][0].weight.sum(1))


# ------------------------------------------------------------------------------------------------ matching


def test_hungarian_pairs_by_distance():
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    logits = torch.zeros(3, 3)  # equal class probabilities: distance decides
    a, g = hungarian_match(points, logits, torch.tensor([[19.0, 1.0], [1.0, 1.0]]), torch.tensor([1, 2]), alpha=0.1)
    assert a.tolist() == [0, 2] and g.tolist() == [1, 0]


def test_hungarian_more_gt_than_anchors_and_vice_versa():
    points = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    gt = torch.tensor([[50.0, 0.0], [99.0, 0.0], [1.0, 0.0]])
    a, g = hungarian_match(points, torch.zeros(2, 2), gt, torch.tensor([1, 1, 1]))
    assert a.tolist() == [0, 1] and g.tolist() == [2, 1]
    # four anchors, one GT: only the closest anchor is assigned
    points = torch.tensor([[0.0, 0.0], [30.0, 0.0], [60.0, 5.0], [61.0, 0.0]])
    a, g = hungarian_match(points, torch.zeros(4, 2), torch.tensor([[60.0, 1.0]]), torch.tensor([1]))
    assert a.tolist() == [3] and g.tolist() == [0]
    a, g = hungarian_match(points, torch.zeros(4, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert a.numel() == 0 and g.numel() == 0


def test_hungarian_one_to_many_keeps_near_anchors_and_the_cheapest():
    anchors = anchor_points(32, 32, 8)  # 4×4 anchors at 4, 12, 20, 28
    gt, cls = torch.tensor([[12.0, 12.0], [28.0, 28.0]]), torch.tensor([1, 1])
    a, g = hungarian_match(anchors, torch.zeros(16, 2), gt, cls)
    assert a.tolist() == [5, 15] and g.tolist() == [0, 1]
    # three per nucleus: the anchor on each and two 8 px neighbours (ties broken by the solver)
    a, g = hungarian_match(anchors, torch.zeros(16, 2), gt, cls, per_nucleus=3)
    assert g.tolist().count(0) == 3 and g.tolist().count(1) == 3 and {5, 15} <= set(a.tolist())
    assert torch.all(torch.linalg.norm(anchors[a] - gt[g], dim=1) <= 8.0)
    # five per nucleus: nucleus 0 has four 8 px neighbours; the corner nucleus only two (farther ones dropped)
    a, g = hungarian_match(anchors, torch.zeros(16, 2), gt, cls, per_nucleus=5)
    assert sorted(a[g == 0].tolist()) == [1, 4, 5, 6, 9] and sorted(a[g == 1].tolist()) == [11, 14, 15]
    # a lone far anchor is still the cheapest for its nucleus, so it is kept
    a, g = hungarian_match(torch.tensor([[0.0, 0.0], [40.0, 0.0]]), torch.zeros(2, 2), torch.tensor([[20.0, 0.0]]),
                           torch.tensor([1]), per_nucleus=2)
    assert a.numel() == 1 and g.tolist() == [0]


def test_hungarian_alpha_trades_distance_against_class_probability():
    points = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # 1 px and 5 px from the GT at the origin
    logits = logits_from_probs([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05]])  # near anchor: p(class 1) = 0.1; far: 0.9
    gt, cls = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    # α = 0.1: costs 0.1 − 0.1 = 0.0 vs 0.5 − 0.9 = −0.4 → the confident far anchor wins
    assert hungarian_match(points, logits, gt, cls, alpha=0.1)[0].tolist() == [1]
    # α = 1: costs 1 − 0.1 = 0.9 vs 5 − 0.9 = 4.1 → the near anchor wins
    assert hungarian_match(points, logits, gt, cls, alpha=1.0)[0].tolist() == [0]


def test_hungarian_unknown_class_uses_foreground_probability():
    points = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    # anchor 0: p_bg 0.9, p1 0.05 (foreground 0.1); anchor 1: p_bg 0.1 but its mass is on class 2 (p1 ≈ 0)
    logits = logits_from_probs([[0.9, 0.05, 0.05], [0.1, 1e-6, 0.9 - 1e-6]])
    gt = torch.tensor([[0.0, 0.0]])
    # unknown class: costs 0.1 − 0.1 = 0 vs 0.3 − 0.9 = −0.6 → anchor 1
    assert hungarian_match(points, logits, gt, torch.tensor([0]), alpha=0.1)[0].tolist() == [1]
    # known class 1: costs 0.1 − 0.05 = 0.05 vs 0.3 − 0 = 0.3 → anchor 0
    assert hungarian_match(points, logits, gt, torch.tensor([1]), alpha=0.1)[0].tolist() == [0]
    with pytest.raises(InputError, match=r"0\.\.2"):
        hungarian_match(points, logits, gt, torch.tensor([3]))


def test_hungarian_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        points, gt = torch.rand(5, 2, generator=g) * 40, torch.rand(4, 2, generator=g) * 40
        logits = torch.randn(5, 4, generator=g)
        cls = torch.randint(0, 4, (4,), generator=g)
        probs = logits.softmax(-1)
        cost = 0.1 * torch.cdist(points, gt) - torch.stack(
            [1 - probs[:, 0] if c == 0 else probs[:, c] for c in cls.tolist()], 1)
        best = min(sum(cost[p[j], j].item() for j in range(4)) for p in itertools.permutations(range(5), 4))
        a, gi = hungarian_match(points, logits, gt, cls)
        assert cost[a, gi].sum().item() == pytest.approx(best, abs=1e-5)
        assert sorted(gi.tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------- loss


def test_loss_perfect_prediction_is_near_zero():
    cfg = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"})
    gt = torch.tensor([[10.0, 12.0], [40.5, 3.25]])
    points = torch.tensor([[[10.0, 12.0], [25.0, 25.0], [40.5, 3.25], [60.0, 60.0]]])
    big = 30.0
    logits = torch.tensor([[[0, 0, big], [big, 0, 0], [0, big, 0], [big, 0, 0]]], dtype=torch.float32)
    out = prompter_loss({"points": points, "logits": logits}, [{"points": gt, "classes": torch.tensor([2, 1])}], cfg)
    assert out["n_matched"] == 2
    assert out["reg"].item() == 0.0
    assert out["cls"].item() < 1e-10
    assert out["loss"].item() < 1e-10


def test_loss_background_weight_and_regression_units():
    beta, gamma = 0.4, 5e-3
    cfg = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"}, beta=beta, gamma=gamma)
    points = torch.tensor([[[0.0, 0.0], [50.0, 50.0], [100.0, 0.0]]])
    probs = [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1], [0.6, 0.1, 0.3]]
    logits = logits_from_probs([probs])
    gt = torch.tensor([[3.0, 4.0], [100.0, 1.0]])  # matched to anchors 0 (error 3, 4 → 25) and 2 (error 1 → 1)
    out = prompter_loss({"points": points, "logits": logits}, [{"points": gt, "classes": torch.tensor([1, 2])}], cfg)
    assert out["n_matched"] == 2
    assert out["reg"].item() == pytest.approx((25.0 + 1.0) / 2)
    ce = -math.log(0.5) - math.log(0.3) + beta * -math.log(0.7)
    expected_cls = ce / (1 + 1 + beta)
    assert out["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected_cls + gamma * 13.0, rel=1e-5)
    # a larger β weighs the background anchor more: the loss moves toward its (larger) CE
    out2 = prompter_loss({"points": points, "logits": logits}, [{"points": gt, "classes": torch.tensor([1, 2])}],
                         PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"}, beta=1.0))
    assert out2["cls"].item() == pytest.approx((-math.log(0.5) - math.log(0.3) - math.log(0.7)) / 3, rel=1e-5)
    # one-to-many: the anchor at (50, 50) is 47 px from both nuclei, beyond λ, so it stays background
    many = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"}, beta=beta, matches_per_nucleus=3)
    out3 = prompter_loss({"points": points, "logits": logits}, [{"points": gt, "classes": torch.tensor([1, 2])}], many)
    assert out3["n_matched"] == 2 and out3["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    near = torch.tensor([[[0.0, 0.0], [5.0, 4.0], [100.0, 0.0], [60.0, 60.0]]])  # anchor 1 now 2 px from nucleus 0
    four = logits_from_probs([[*probs, [0.7, 0.2, 0.1]]])
    out4 = prompter_loss({"points": near, "logits": four}, [{"points": gt, "classes": torch.tensor([1, 2])}], many)
    assert out4["n_matched"] == 3
    assert out4["reg"].item() == pytest.approx((25.0 + 4.0 + 1.0) / 3)
    ce4 = -math.log(0.5) - math.log(0.2) - math.log(0.3) + beta * -math.log(0.7)
    assert out4["cls"].item() == pytest.approx(ce4 / (3 + beta), rel=1e-5)


def test_mask_head_trains_only_in_training_mode_and_adds_its_weighted_loss():
    torch.manual_seed(0)
    cfg = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"}, mask_loss_weight=0.5)
    model = Prompter(cfg).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["mask_logits"].shape == (2, 1, 16, 16)  # stride 4
    foreground = torch.zeros(64, 64, dtype=torch.bool)
    foreground[20:40, 10:30] = True
    targets = [{"points": torch.tensor([[20.0, 30.0]]), "classes": torch.tensor([1]), "foreground": foreground}] * 2
    losses = prompter_loss(out, targets, cfg)
    upsampled = F.interpolate(out["mask_logits"], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    mask = binary_focal(upsampled, foreground.expand(2, 64, 64).float()).mean()
    assert losses["mask"].item() == pytest.approx(mask.item(), rel=1e-6) and mask.item() > 0
    assert losses["loss"].item() == pytest.approx(
        (losses["cls"] + cfg.gamma * losses["reg"] + 0.5 * mask).item(), rel=1e-6)
    losses["loss"].backward()
    assert model.mask_head[0].weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="foreground"):
        prompter_loss(out, [{k: v for k, v in t.items() if k != "foreground"} for t in targets], cfg)
    assert "mask_logits" not in model.eval()(torch.randn(1, 3, 64, 64))  # inference skips the head
    assert Prompter(PrompterConfig(**TINY)).mask_head is None
    with pytest.raises(InputError, match="mask_loss_weight"):
        PrompterConfig(**TINY, mask_loss_weight=-1.0)


def test_loss_unknown_class_and_empty_images():
    cfg = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"}, beta=0.25)
    points = torch.tensor([[[0.0, 0.0], [50.0, 50.0]], [[0.0, 0.0], [50.0, 50.0]]])
    probs = [[0.3, 0.2, 0.5], [0.9, 0.05, 0.05]]
    logits = logits_from_probs([probs, probs])
    targets = [{"points": torch.tensor([[0.0, 0.0]]), "classes": torch.tensor([0])},  # unknown class
               {"points": torch.zeros(0, 2), "classes": torch.zeros(0, dtype=torch.long)}]  # no nuclei
    out = prompter_loss({"points": points, "logits": logits}, targets, cfg)
    assert out["n_matched"] == 1
    assert out["reg"].item() == 0.0
    # image 0: matched unknown → −log(1 − 0.3); its other anchor and both anchors of image 1 are background
    expected = (-math.log(0.7) + 0.25 * (-math.log(0.9) - math.log(0.3) - math.log(0.9))) / (1 + 3 * 0.25)
    assert out["cls"].item() == pytest.approx(expected, rel=1e-5)
    only_empty = prompter_loss({"points": points[1:], "logits": logits[1:]}, targets[1:], cfg)
    assert only_empty["n_matched"] == 0
    assert only_empty["cls"].item() == pytest.approx((-math.log(0.9) - math.log(0.3)) / 2, rel=1e-5)


def test_loss_backpropagates_through_the_model():
    torch.manual_seed(0)
    cfg = PrompterConfig(**TINY, num_classes=2, class_names={1: "a", 2: "b"})
    model = Prompter(cfg)
    out = model(torch.randn(1, 3, 64, 64))
    loss = prompter_loss(out, [{"points": torch.tensor([[20.0, 30.0]]), "classes": torch.tensor([2])}], cfg)
    loss["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.downsample_layers[0][0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- decoding


def test_point_nms_is_greedy():
    pts = np.array([[0, 0], [3, 0], [7, 0], [20, 0], [22, 0]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95, 0.5])
    # (3,0) is dropped by (0,0); (7,0) is 7 px from (0,0) and only near the dropped (3,0), so it stays
    assert point_nms(pts, scores, 5.0).tolist() == [3, 0, 2]
    assert point_nms(pts, scores, 0.0).tolist() == [3, 0, 1, 2, 4]
    assert point_nms(pts[:0], scores[:0], 5.0).tolist() == []


def test_decode_points_threshold_nms_and_classes():
    points = torch.tensor([[[10.0, 10.0], [12.0, 10.0], [40.0, 40.0], [70.0, 5.0]]])
    probs = [[0.1, 0.6, 0.3], [0.2, 0.4, 0.4], [0.3, 0.14, 0.56], [0.6, 0.2, 0.2]]
    out = {"points": points, "logits": logits_from_probs([probs])}
    (pred,) = decode_points(out, score_threshold=0.5, nms_radius_px=5.0)
    np.testing.assert_allclose(pred.points, [[10, 10], [40, 40]])
    np.testing.assert_allclose(pred.scores, [0.9, 0.7], rtol=1e-6)
    assert pred.classes.tolist() == [1, 2]
    np.testing.assert_allclose(pred.class_probs, [[0.6 / 0.9, 0.3 / 0.9], [0.2, 0.8]], rtol=1e-5)
    assert pred.points.dtype == np.float32
    (all_pred,) = decode_points(out, score_threshold=0.3)
    assert len(all_pred) == 4 and all_pred.classes.tolist() == [1, 1, 2, 1]  # tie (0.4, 0.4) → first class
    (none,) = decode_points(out, score_threshold=0.95)
    assert len(none) == 0 and none.class_probs.shape == (0, 2)


# -------------------------------------------------------------------------------------------------- config


def test_config_round_trip_and_presets():
    cfg = PrompterConfig.preset("pannuke")
    assert (cfg.backbone, cfg.levels, cfg.anchor_stride, cfg.beta, cfg.num_classes) == ("small", 3, 8, 0.4, 5)
    assert cfg.class_names[1] == "neoplastic"
    kumar, cpm = PrompterConfig.preset("kumar"), PrompterConfig.preset("cpm")
    assert (kumar.levels, kumar.anchor_stride, kumar.beta) == (4, 16, 0.2)
    assert (cpm.levels, cpm.anchor_stride, cpm.beta) == (4, 16, 0.25)
    assert cfg.alpha == 0.1 and cfg.gamma == 5e-3 and cfg.pixel_mean == (0.485, 0.456, 0.406)
    assert set(PROMPTER_PRESETS) >= {"cpu", "pannuke", "kumar", "cpm"}
    custom = PrompterConfig(**TINY, in_chans=2, pixel_mean=(0.1, 0.2), pixel_std=(0.3, 0.4), num_classes=2,
                            class_names={1: "tumour", 2: "immune"}, anchors_per_cell=4)
    data = to_dict(custom)
    assert data["class_names"] == {"1": "tumour", "2": "immune"}
    assert from_dict(PrompterConfig, data) == custom
    assert from_dict(PrompterConfig, to_dict(cfg)) == cfg
    assert Prompter(custom).backbone.config.dims == (8, 16, 24, 32)


def test_deterministic_given_seed():
    cfg = PrompterConfig(**TINY)
    x = torch.randn(1, 3, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        model = Prompter(cfg).eval()
        outs.append(model(x))
    assert torch.equal(outs[0]["logits"], outs[1]["logits"])
    assert torch.equal(outs[0]["points"], outs[1]["points"])


# -------------------------------------------------------------------------------------------------- training


def _disc_image(size: int, centres: np.ndarray, classes: np.ndarray, radius: float = 7.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, the convention of the (x, y) targets
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.92, 0.88, 0.90)  # bright background
    colours = {1: (0.25, 0.15, 0.45), 2: (0.55, 0.20, 0.20)}  # dark blue-purple vs dark red nuclei
    for (cx, cy), c in zip(centres, classes, strict=True):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = colours[int(c)]
    return img


def test_cpu_preset_overfits_one_synthetic_image():
    torch.manual_seed(0)
    centres = np.array([[22.3, 19.6], [70.5, 26.2], [105.1, 40.7], [37.6, 66.4], [88.2, 84.9], [24.8, 106.3],
                        [61.7, 101.5]], np.float32)
    classes = np.array([1, 2, 1, 2, 1, 2, 1])
    cfg = PrompterConfig.preset("cpu", num_classes=2, class_names={1: "purple", 2: "red"}, dropout=0.0)
    model = Prompter(cfg)
    image = torch.from_numpy(_disc_image(128, centres, classes)).permute(2, 0, 1)[None]
    x = model.normalize(image)
    targets = [{"points": torch.from_numpy(centres), "classes": torch.from_numpy(classes)}]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    first = None
    for _ in range(60):
        loss = prompter_loss(model(x), targets, cfg)
        first = first if first is not None else loss["loss"].item()
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    assert loss["loss"].item() < 0.05 * first
    model.eval()
    with torch.no_grad():
        (pred,) = decode_points(model(x), score_threshold=0.5, nms_radius_px=6.0)
    assert len(pred) == len(centres)  # no missed and no spurious nuclei
    dist = np.linalg.norm(pred.points[:, None] - centres[None], axis=-1)
    nearest = dist.argmin(0)
    assert sorted(nearest.tolist()) == list(range(len(centres)))  # one prediction per disc
    assert dist[nearest, np.arange(len(centres))].max() < 3.0
    assert pred.classes[nearest].tolist() == classes.tolist()
