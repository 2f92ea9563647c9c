"""karyo.models.monch / unet and the semantic writer: shapes through every block, the MGFE pieces (FFT high-pass,
dilated k-NN, graph convolution), the text-conditioned dynamic head, the loss, instance seeding, tiling, model
folders, CLIP-layout weight loading and ``karyo segment --task semantic``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from karyo.cli import app
from karyo.data.io import read_image, write_image
from karyo.export.semantic import class_palette, save_semantic, semantic_overlay
from karyo.models.base import load_model_dir
from karyo.models.monch import (
    MONCH,
    ConvBranch,
    DynamicConvHead,
    HighFrequencyEnhancement,
    MONCHConfig,
    MONCHModel,
    SemanticSegmentation,
    dilated_knn,
    high_pass,
    max_relative_graph_conv,
    per_class_bce,
    seed_instances,
    tiled_probabilities,
    with_ablation,
)
from karyo.models.unet import UNet, UNetConfig, UNetModel, unet_width_for
from karyo.models.vit import ViT, ViTConfig, vit_to_clip, vit_to_timm

NAMES = {1: "inflammatory", 2: "epithelial"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes) -> MONCHConfig:
    enc = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=True, pre_norm=True,
                    final_norm=True, act="quick_gelu", norm_eps=1e-5, patch_embed="stem")
    base = dict(encoder=enc, num_classes=2, class_names=NAMES, text_dim=16, sentences_per_class=3, dim=16, heads=2,
                decoder_channels=(8, 8), detail_channels=8, head_channels=4, tile_size=64, tile_overlap=16)
    base.update(changes)
    return MONCHConfig(**base)


def tiny_net(seed: int = 0, **changes) -> MONCH:
    torch.manual_seed(seed)
    net = MONCH(tiny(**changes))
    g = torch.Generator().manual_seed(seed + 1)
    net.set_text_embeddings(torch.randn(3, 3, 16, generator=g))
    return net.eval()


# ----------------------------------------------------------------------------------------------------- shapes


def test_shapes_through_every_block():
    net = tiny_net()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = net.features(x)
    expected = {
        "F_m": (2, 16, 8, 8), "F_f": (2, 16, 16, 16), "F_c": (2, 16, 4, 4),  # eq. 1: W, 2W, W/2
        "F_h": (2, 16, 16, 16), "F_v": (2, 16, 8, 8), "F_t": (2, 16, 4, 4),  # MGFE keeps each grain's size
        "text": (9, 16),  # (N+1)·S sentence tokens of F^T
        "blend": (2, 16, 16, 16),
        "X_v": (2, 16, 16, 16), "X_t": (2, 16, 16, 16), "X_T": (2, 16, 16, 16), "X_blend": (2, 16, 16, 16),
        "merged": (2, 16, 16, 16), "decoded": (2, 4, 64, 64), "logits": (2, 3, 64, 64),
    }
    assert {k: tuple(v.shape) for k, v in f.items()} == expected
    assert torch.isfinite(f["logits"]).all()
    tokens = net.encoder.forward_features(x)
    assert tokens.features.shape == (2, 8, 8, 32) and tokens.cls.shape == (2, 32)
    with pytest.raises(Exception, match="multiples of 16"):
        net(torch.randn(1, 3, 56, 64))


@pytest.mark.parametrize("name", ["no_mgfe", "no_ppd", "no_hf", "no_conv", "no_topo"])
def test_ablations(name):
    full, net = tiny_net(), MONCH(with_ablation(tiny(), name))
    net.set_text_embeddings(full.text_embeddings)
    with torch.no_grad():
        f = net.features(torch.randn(1, 3, 64, 64))
    assert f["logits"].shape == (1, 3, 64, 64)
    if name == "no_mgfe":  # Table 3: the encoder's multi-grained features go straight to the PPD
        assert f["F_h"] is f["F_f"] and f["F_v"] is f["F_m"] and f["F_t"] is f["F_c"]
    if name == "no_ppd":  # Table 3: no cross-attention stages, no text tokens; the FPN fuses the enhanced features
        assert not any(k.startswith("X_") for k in f) and "text" not in f and not hasattr(net, "stages")
    if name == "no_hf":  # Table 4 "×": the block is replaced by a convolution block
        assert isinstance(net.hf, ConvBranch)
    if name == "no_topo":
        assert isinstance(net.topo, ConvBranch)
    if name == "no_conv":
        assert f["F_v"] is f["F_m"] and not hasattr(net, "conv_branch")
    n_full = sum(p.numel() for p in full.parameters())
    assert sum(p.numel() for p in net.parameters()) != n_full


def test_missing_ppd_stage_passes_its_query_on():
    net = tiny_net(ppd_stages=("v", "t", "blend"))  # Table 5, q_t → F^T removed
    with torch.no_grad():
        f = net.features(torch.randn(1, 3, 64, 64))
    assert "X_T" not in f and set(net.stages) == {"v", "t", "blend"}
    with pytest.raises(ValueError, match="unknown PPD stage"):
        tiny(ppd_stages=("v", "x"))


# ------------------------------------------------------------------------------------------------------- MGFE


def test_fft_high_pass_removes_a_constant_image():
    const = torch.full((1, 2, 16, 16), 3.7)
    assert torch.allclose(high_pass(const, 0.1), torch.zeros_like(const), atol=1e-5)
    assert torch.allclose(high_pass(const, 0.0), torch.zeros_like(const), atol=1e-5)  # DC always removed
    i = torch.arange(16.0)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).expand(1, 2, 16, 16)  # Nyquist in both axes: radius √2
    assert torch.allclose(high_pass(checker, 0.9), checker, atol=1e-5)
    slow = torch.cos(2 * torch.pi * i / 16)[None, :].expand(1, 1, 16, 16)  # 1/16 cycle/px: radius 0.125
    assert torch.allclose(high_pass(slow, 0.2), torch.zeros_like(slow), atol=1e-5)
    assert torch.allclose(high_pass(slow, 0.1), slow, atol=1e-5)
    hf = HighFrequencyEnhancement(2, 0.1)  # eq. 4: F^h = refine(F^-1(H(F(F^f)))) + F^f
    torch.testing.assert_close(hf(const), const)
    assert not torch.allclose(hf(checker), checker)


def _circle(angles) -> torch.Tensor:
    a = torch.as_tensor(angles, dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()])[None]  # 1×2×N unit features: distance grows with the angle gap


def test_dilated_knn_hand_checked():
    x = _circle([0.0, 0.1, 0.3, 0.7, 1.5])  # all pairwise gaps distinct
    idx = dilated_knn(x, k=2, dilation=2)[0].tolist()
    # node 0: by distance 0,1,2,3,4 → ranks 0 and 2; node 2: 2,1,0,3,4 → 2, 0; node 4: 4,3,2,1,0 → 4, 2
    assert idx[0] == [0, 2] and idx[2] == [2, 0] and idx[4] == [4, 2]
    assert dilated_knn(x, k=3, dilation=1)[0].tolist()[3] == [3, 2, 1]  # gaps 0, 0.4, 0.6 (then 0.7, 0.8)


@pytest.mark.parametrize(("k", "d", "d_eff"), [(3, 2, 2), (4, 3, 3), (9, 1, 1), (9, 2, 1)])
def test_dilated_knn_on_a_tiny_grid(k, d, d_eff):
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2.5, 16))
    fmap = _circle(angles).reshape(1, 2, 4, 4)  # a 4×4 feature map; tokens in row-major order
    got = dilated_knn(fmap.flatten(2), k, d)[0].numpy()
    gaps = np.abs(angles[:, None] - angles[None, :])
    want = np.argsort(gaps, axis=1, kind="stable")[:, : k * d_eff : d_eff]  # 9·2 > 16 nodes: dilation shrinks to 1
    np.testing.assert_array_equal(got, want)
    assert (got[:, 0] == np.arange(16)).all()  # every node is its own nearest neighbour


def test_max_relative_graph_conv():
    x = torch.tensor([[[1.0, 5.0, 2.0]]])
    idx = torch.tensor([[[0, 1], [1, 2], [2, 0]]])
    out = max_relative_graph_conv(x, idx)
    # node 0: max(1-1, 5-1) = 4; node 1: max(5-5, 2-5) = 0; node 2: max(2-2, 1-2) = 0
    torch.testing.assert_close(out, torch.tensor([[[1.0, 5.0, 2.0], [4.0, 0.0, 0.0]]]))


# ------------------------------------------------------------------------------------------------------- head


def test_dynamic_conv_depends_on_the_text_embeddings():
    torch.manual_seed(0)
    head = DynamicConvHead(text_dim=8, image_dim=6, dim=8, channels=4, layers=3, num_masks=2)
    feat, image = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    t1 = torch.randn(2, 8)
    t2 = t1.clone()
    t2[1] = torch.randn(8)  # another description for class 1 only
    o1, o2 = head(feat, t1, image), head(feat, t2, image)
    assert o1.shape == (2, 2, 5, 5)
    torch.testing.assert_close(o1[:, 0], o2[:, 0])  # class 0's mask is written by class 0's text alone
    assert (o1[:, 1] - o2[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(head.forward_grouped(feat, t1, image), o1, rtol=1e-5, atol=1e-5)  # eq. 8 literally
    o3 = head(feat, t1, torch.randn(2, 6))  # the controller also sees the image (per-image weights)
    assert (o3 - o1).abs().max() > 1e-4


def test_per_class_bce_and_unknown_class_nuclei():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 0.0]], [[-3.0, 1.0]]]])  # 1×3×1×2
    types = torch.tensor([[[1, 0]]])
    want = F.binary_cross_entropy_with_logits(logits, torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]], [[0.0, 0.0]]]]))
    torch.testing.assert_close(per_class_bce(logits, types), want)
    # pixel 1 is a nucleus of unknown class: background target 0 there, class channels ignored
    inst = torch.tensor([[[1, 2]]])
    target = torch.tensor([0.0, 0.0, 1.0, 0.0])  # bg@0, bg@1, c1@0, c2@0
    kept = logits.permute(1, 0, 2, 3).reshape(-1)[[0, 1, 2, 4]]
    torch.testing.assert_close(per_class_bce(logits, types, inst), F.binary_cross_entropy_with_logits(kept, target))


# ------------------------------------------------------------------------------------------------- inference


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_semantic_to_instance_seeding_on_a_hand_made_map():
    cm = np.zeros((64, 64), np.int32)
    cm[_disc(cm.shape, 20, 18, 8) | _disc(cm.shape, 20, 33, 8)] = 1  # two touching nuclei of class 1
    cm[_disc(cm.shape, 46, 46, 7)] = 2  # one class-2 nucleus ...
    cm[44:47, 44:47] = 1  # ... with a few mislabelled pixels: the majority wins
    cm[5, 60:63] = 2  # a 3-px fragment: below min_area
    inst, classes, scores = seed_instances(cm, min_area=10, min_distance=4)
    assert len(classes) == 3 and sorted(classes.values()) == [1, 1, 2]
    left, right, low = inst[20, 14], inst[20, 37], inst[46, 46]
    assert len({left, right, low}) == 3 and 0 not in (left, right, low)
    assert classes[int(left)] == 1 and classes[int(right)] == 1 and classes[int(low)] == 2
    assert inst[5, 61] == 0 and (inst > 0).sum() == (cm > 0).sum() - 3
    assert abs(int((inst == left).sum()) - int((inst == right).sum())) < 0.1 * (inst == left).sum()
    assert set(scores.values()) == {1.0}
    prob = np.zeros((3, 64, 64), np.float32)
    prob[1], prob[2] = 0.8, 0.6
    _, _, scores = seed_instances(cm, prob, min_area=10)
    assert sorted(round(v, 6) for v in scores.values()) == [0.6, 0.8, 0.8]
    empty = seed_instances(np.zeros((8, 8), np.int32))
    assert empty[0].max() == 0 and empty[1] == {}


def test_area_table_values():
    cm = np.zeros((10, 10), np.int32)
    cm[0:2, 0:2] = 1  # 4 px, one region
    cm[5, 5] = cm[8, 8] = 2  # 2 px, two regions
    prob = np.full((3, 10, 10), 0.5, np.float32)
    prob[1, 0:2, 0:2] = 0.9
    res = SemanticSegmentation(cm, prob, {1: "a", 2: "b"}, mpp=0.5)
    t = res.area_table().set_index("class_id")
    assert t.loc[1, "pixels"] == 4 and t.loc[2, "pixels"] == 2 and t.loc[1, "class_name"] == "a"
    assert t.loc[1, "fraction_of_image"] == pytest.approx(0.04)
    assert t.loc[2, "fraction_of_nuclei"] == pytest.approx(2 / 6)
    assert t.loc[1, "area_um2"] == pytest.approx(1.0) and t.loc[2, "regions"] == 2
    assert t.loc[1, "mean_probability"] == pytest.approx(0.9)
    assert "area_um2" not in SemanticSegmentation(cm, prob, {1: "a", 2: "b"}).area_table().columns  # unknown mpp


def test_tiled_probabilities_equal_one_pass_for_a_pointwise_net():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 4, 1)
    x = torch.randn(1, 3, 100, 140)
    tiled = tiled_probabilities(net, x, tile=32, overlap=8, multiple=16)
    torch.testing.assert_close(tiled, torch.sigmoid(net(x))[0], rtol=1e-5, atol=1e-6)
    small = tiled_probabilities(net, x[..., :40, :50], tile=64, multiple=16)  # one padded pass
    torch.testing.assert_close(small, torch.sigmoid(net(x[..., :40, :50]))[0], rtol=1e-5, atol=1e-6)


def test_monch_model_folder_round_trip_and_instance_api(tmp_path):
    model = MONCHModel(tiny(), net=tiny_net(3))
    image = np.random.default_rng(0).integers(0, 255, (80, 72, 3), dtype=np.uint8)
    sem = model.segment_semantic(image, name="x")
    assert sem.class_map.shape == (80, 72) and sem.probabilities.shape == (3, 80, 72)
    np.testing.assert_array_equal(sem.class_map, sem.probabilities.argmax(0))
    assert sem.class_names == NAMES and sem.mpp is None  # not stated: not assumed
    assert model.segment_semantic(image, mpp=0.5).mpp == 0.5
    model.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["arch"] == "monch"
    again = load_model_dir(tmp_path / "m")
    np.testing.assert_allclose(again.segment_semantic(image).probabilities, sem.probabilities, atol=1e-6)
    torch.testing.assert_close(again.net.text_embeddings, model.net.text_embeddings)  # text saved with weights
    res = model.segment(image, name="x")
    assert res.instances.shape == (80, 72) and set(res.classes.values()) <= {1, 2}
    assert model.segment_semantic(image, mpp=0.5).class_map.shape == (80, 72)  # resampled and back
    with pytest.raises(Exception, match="not promptable"):
        model.segment(image, points=[(1.0, 2.0)])


def test_image_encoder_loads_clip_and_conch_layouts(tmp_path):
    enc = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=True, pre_norm=True,
                    final_norm=True, act="quick_gelu", norm_eps=1e-5, patch_bias=False, proj_dim=16)
    torch.manual_seed(1)
    src = ViT(enc)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    clip = vit_to_clip(src.state_dict())
    clip["transformer.resblocks.0.ln_1.weight"] = torch.ones(8)  # a text-tower key: ignored
    torch.save(clip, tmp_path / "clip.pt")
    net = MONCH(tiny(encoder=enc))
    report = net.load_image_encoder(tmp_path / "clip.pt")
    assert report.layout == "clip" and not report.missing and not report.unexpected
    for k, v in src.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[k], v, msg=k)
    timm_like = dataclass_replace(enc, pre_norm=False, act="gelu", norm_eps=1e-6, patch_bias=True, proj_dim=0)
    src2 = ViT(timm_like)
    torch.save({f"visual.trunk.{k}": v for k, v in vit_to_timm(src2.state_dict()).items()}, tmp_path / "conch.pt")
    net2 = MONCH(tiny(encoder=timm_like))
    report = net2.load_image_encoder(tmp_path / "conch.pt", layout="timm", strip_prefix="visual.trunk.")
    assert not report.missing
    torch.testing.assert_close(net2.encoder.pos_embed, src2.pos_embed)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_presets_follow_the_paper_backbones():
    clip = MONCHConfig.preset("clip_vit_b16")
    assert clip.encoder.embed_dim == 768 and clip.encoder.patch_size == 16 and not clip.encoder.patch_bias
    assert clip.pixel_mean[0] == pytest.approx(0.4815, abs=1e-4)
    assert MONCHConfig.preset("plip_vit_b32").decoder_channels == (48, 32, 24, 12)  # one more ×2 stage
    cpu = MONCHConfig.preset("cpu", num_classes=5)
    assert cpu.num_classes == 5 and cpu.encoder.patch_size == 16


# ------------------------------------------------------------------------------------------------------ U-Net


def test_unet_shapes_width_matching_and_folder(tmp_path):
    cfg = UNetConfig(num_classes=2, width=4, depth=3, class_names=NAMES)
    net = UNet(cfg)
    assert net(torch.randn(2, 3, 32, 40)).shape == (2, 3, 32, 40)
    target = sum(p.numel() for p in MONCH(tiny()).parameters())
    w = unet_width_for(target, num_classes=2, depth=3)
    counts = {d: sum(p.numel() for p in UNet(UNetConfig(num_classes=2, depth=3, width=d)).parameters())
              for d in (w - 1, w, w + 1)}
    assert abs(counts[w] - target) <= min(abs(counts[w - 1] - target), abs(counts[w + 1] - target))
    model = UNetModel(cfg, net=net)
    model.save(tmp_path / "u")
    image = np.random.default_rng(1).integers(0, 255, (40, 36, 3), dtype=np.uint8)
    np.testing.assert_allclose(load_model_dir(tmp_path / "u").predict_probabilities(image),
                               model.predict_probabilities(image), atol=1e-6)


# --------------------------------------------------------------------------------------------- writer and CLI


def test_semantic_overlay_colours():
    image = np.full((6, 6, 3), 200, np.uint8)
    cm = np.zeros((6, 6), np.int32)
    cm[1:5, 1:5] = 2
    out = semantic_overlay(image, cm, {2: "epithelial"}, alpha=0.5)
    lut = class_palette(2, {2: "epithelial"})
    assert (out[0, 0] == 200).all()  # background untouched
    assert (out[1, 1] == lut[2]).all()  # boundary: the class colour
    np.testing.assert_array_equal(out[2, 2], ((200 + lut[2].astype(int)) / 2 + 0.5).astype(np.uint8))  # tint


def test_cli_segment_task_semantic_writes_three_outputs(tmp_path):
    model = MONCHModel(tiny(), net=tiny_net(5))
    model.save(tmp_path / "model")
    image = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    write_image(tmp_path / "tile.png", image)
    res = CliRunner().invoke(app, ["segment", str(tmp_path / "tile.png"), "--model", str(tmp_path / "model"),
                                   "--task", "semantic", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    class_map = read_image(out / "semantic" / "tile.png")[..., 0]
    want = model.segment_semantic(image)
    np.testing.assert_array_equal(class_map, want.class_map)
    assert read_image(out / "semantic_overlays" / "tile.png").shape == (64, 64, 3)
    rows = list(csv.DictReader((out / "semantic_areas" / "tile.csv").open()))
    assert [int(r["class_id"]) for r in rows] == [1, 2]
    assert [int(r["pixels"]) for r in rows] == [int((want.class_map == c).sum()) for c in (1, 2)]
    assert json.loads((out / "classes.json").read_text()) == {"1": "inflammatory", "2": "epithelial"}
    written = save_semantic(want, tmp_path / "py", image, stem="tile")  # the Python twin writes the same files
    assert sorted(written) == ["areas", "class_map", "class_names", "overlay"]
    bad = CliRunner().invoke(app, ["segment", str(tmp_path / "tile.png"), "--task", "semantic",
                                   "--out", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "no semantic output" in bad.output
    bad = CliRunner().invoke(app, ["segment", str(tmp_path / "tile.png"), "--task", "panoptic"])
    assert bad.exit_code == 2
    inst = CliRunner().invoke(app, ["segment", str(tmp_path / "tile.png"), "--model", str(tmp_path / "model"),
                                    "--out", str(tmp_path / "o3")])  # instances from a semantic model: said so
    assert inst.exit_code == 0, inst.output
    assert "monch is a semantic model" in " ".join(inst.output.split())
