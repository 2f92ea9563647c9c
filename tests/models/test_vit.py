"""karyo.models.vit: shapes, windowed vs global attention, relative / absolute position resampling, checkpoint
layouts (SAM identity, timm, OpenAI CLIP) and the loader."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from karyo.config import from_dict, to_dict
from karyo.errors import InputError
from karyo.models.layers import DropPath, LayerNorm2d, QuickGELU
from karyo.models.vit import (
    ViT,
    ViTConfig,
    clip_to_vit,
    detect_layout,
    get_rel_pos,
    load_vit_weights,
    rel_pos_bias,
    timm_to_vit,
    vit_to_clip,
    vit_to_timm,
    window_partition,
    window_unpartition,
)

SAM_LIKE = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, use_rel_pos=True,
                     window_size=3, global_attn_indexes=(1,), out_indices=(0, 1, 2))
TIMM_LIKE = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, class_token=True,
                      final_norm=True)
CLIP_LIKE = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, class_token=True,
                      pre_norm=True, final_norm=True, proj_dim=16, patch_bias=False, act="quick_gelu",
                      norm_eps=1e-5)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with random values (zero-initialised ones included, so nothing is trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def test_shapes_through_every_block():
    torch.manual_seed(0)
    model = _randomise(ViT(SAM_LIKE), 0)
    x = torch.randn(2, 3, 64, 64)
    tokens = model.patch_embed(x)
    assert tokens.shape == (2, 8, 8, 32)
    tokens = tokens + model.pos_embed
    for i, blk in enumerate(model.blocks):
        assert blk.window_size == (0 if i == 1 else 3)
        expected_rel = 2 * (8 if i == 1 else 3) - 1  # global blocks: the 8×8 grid, windowed: the window
        assert blk.attn.rel_pos_h.shape == (expected_rel, 16) and blk.attn.rel_pos_w.shape == (expected_rel, 16)
        tokens = blk(tokens)
        assert tokens.shape == (2, 8, 8, 32)
    final, inter = model(x)
    assert final.shape == (2, 8, 8, 32)
    assert [t.shape for t in inter] == [(2, 8, 8, 32)] * 3
    torch.testing.assert_close(inter[-1], final)  # no final norm: the last block's output is the feature map
    torch.testing.assert_close(final, tokens)


def test_stem_patch_embedding_reaches_the_patch_stride():
    cfg = dataclasses.replace(SAM_LIKE, patch_embed="stem", out_indices=())
    model = ViT(cfg)
    names = [n for n, _ in model.patch_embed.named_parameters()]
    assert "proj.weight" in names and any(n.startswith("stem.") for n in names)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 8, 6, 32)
    with pytest.raises(ValueError, match="power-of-two"):
        ViTConfig(patch_size=12, img_size=48, patch_embed="stem")


def test_class_token_model_returns_cls_and_spatial_map():
    model = _randomise(ViT(CLIP_LIKE), 1)
    out = model.forward_features(torch.randn(2, 3, 32, 32))
    assert out.features.shape == (2, 4, 4, 32) and out.cls.shape == (2, 32)
    assert model.encode(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(class_token=True, use_rel_pos=True)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 7, 5, 3)
    windows, pad_hw = window_partition(x, 3)
    assert pad_hw == (9, 6) and windows.shape == (2 * 3 * 2, 3, 3, 3)
    torch.testing.assert_close(windows[0], x[0, :3, :3])  # first window = top-left corner
    assert windows[-1, 1:].abs().sum() == 0  # bottom-right window is mostly padding
    torch.testing.assert_close(window_unpartition(windows, 3, pad_hw, (7, 5)), x)


def test_window_attention_equals_global_when_the_window_covers_the_grid():
    cfg_win = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True,
                        window_size=8)  # 8×8 tokens: one window holds everything
    cfg_glob = dataclasses.replace(cfg_win, window_size=0)
    win = _randomise(ViT(cfg_win), 3)
    glob = ViT(cfg_glob).eval()
    glob.load_state_dict(win.state_dict())  # same parameter shapes: rel-pos tables are 2·8−1 long in both
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(win(x), glob(x), atol=1e-5, rtol=1e-5)
    # a window smaller than the grid really does change the result (the test above is not vacuous)
    small = ViT(dataclasses.replace(cfg_win, window_size=4, use_rel_pos=False)).eval()
    ref = ViT(dataclasses.replace(cfg_glob, use_rel_pos=False)).eval()
    ref.load_state_dict(small.state_dict())
    assert not torch.allclose(small(x), ref(x), atol=1e-4)


def _brute_force_rel_bias(q, table_h, table_w, h, w):
    """Bias[n, m] = q_n·R_h[qy−ky] + q_n·R_w[qx−kx], written out with loops (MViTv2 / SAM definition)."""
    b, nh, n, _ = q.shape
    out = torch.zeros(b, nh, n, n)
    for qi in range(n):
        qy, qx = divmod(qi, w)
        for ki in range(n):
            ky, kx = divmod(ki, w)
            out[:, :, qi, ki] = (q[:, :, qi] * table_h[qy - ky + h - 1]).sum(-1) + \
                (q[:, :, qi] * table_w[qx - kx + w - 1]).sum(-1)
    return out


def test_decomposed_rel_pos_matches_definition():
    torch.manual_seed(0)
    h, w, hd = 3, 4, 5
    q = torch.randn(1, 2, h * w, hd)
    th, tw = torch.randn(2 * h - 1, hd), torch.randn(2 * w - 1, hd)
    torch.testing.assert_close(rel_pos_bias(q, th, tw, (h, w)), _brute_force_rel_bias(q, th, tw, h, w))


def test_rel_pos_table_is_resampled_linearly_to_a_new_size():
    table = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2)  # offsets −3..3 for size 4
    direct = get_rel_pos(4, table)
    assert direct[0, 3, 0] == 0 and direct[3, 0, 0] == 6 and direct[2, 2, 0] == 3  # q−k+3
    resized = get_rel_pos(8, table)  # 15 offsets for size 8, linearly resampled from 7
    expected = F.interpolate(table.t()[None], size=15, mode="linear").squeeze(0).t()
    idx = torch.arange(8)
    torch.testing.assert_close(resized, expected[idx[:, None] - idx[None, :] + 7])
    assert resized[0, 0, 0] == expected[7, 0]  # zero offset maps to the centre of the resampled table
    const = get_rel_pos(8, torch.full((7, 2), 0.3))
    torch.testing.assert_close(const, torch.full((8, 8, 2), 0.3))  # resampling keeps a constant table constant


def test_abs_pos_embed_is_interpolated_bicubically_for_other_input_sizes():
    model = _randomise(ViT(dataclasses.replace(SAM_LIKE, out_indices=())), 4)
    assert model.pos_embed.shape == (1, 8, 8, 32)
    assert model.pos_embed_at(8, 8) is model.pos_embed
    pos = model.pos_embed_at(12, 6)
    expected = F.interpolate(model.pos_embed.permute(0, 3, 1, 2), size=(12, 6), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(pos, expected)
    with torch.no_grad():
        model.pos_embed.fill_(0.7)
    torch.testing.assert_close(model.pos_embed_at(16, 16), torch.full((1, 16, 16, 32), 0.7))
    assert model(torch.randn(1, 3, 96, 48)).shape == (1, 12, 6, 32)  # rel-pos tables resampled too


def test_timm_round_trip_gives_identical_outputs(tmp_path):
    src = _randomise(ViT(TIMM_LIKE), 5)
    timm_sd = vit_to_timm(src.state_dict())
    # the exported dict is in timm's layout
    assert timm_sd["pos_embed"].shape == (1, 1 + 16, 32) and timm_sd["cls_token"].shape == (1, 1, 32)
    assert timm_sd["blocks.1.mlp.fc1.weight"].shape == (128, 32)
    assert {"norm.weight", "patch_embed.proj.bias", "blocks.0.attn.qkv.weight"} <= set(timm_sd)
    assert not any("lin1" in k or k == "cls_pos_embed" for k in timm_sd)
    assert detect_layout(timm_sd) == "timm"
    dst = _randomise(ViT(TIMM_LIKE), 6)
    dst.load_state_dict(timm_to_vit(timm_sd))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.encode(x), src.encode(x))
    # the same through a file and the auto-detecting loader, with a classifier head it has no place for
    torch.save({"model": {**timm_sd, "head.weight": torch.zeros(10, 32)}}, tmp_path / "timm.pth")
    dst2 = _randomise(ViT(TIMM_LIKE), 7)
    report = load_vit_weights(dst2, tmp_path / "timm.pth")
    assert report.layout == "timm" and report.missing == [] and report.unexpected == ["head.weight"]
    torch.testing.assert_close(dst2.forward_features(x).features, src.forward_features(x).features)


def _reference_clip_tower(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """OpenAI CLIP's VisionTransformer forward written directly on the ``visual.*`` tensors, with PyTorch's own
    ``nn.MultiheadAttention`` — an implementation independent of karyo's ViT."""
    v = {k[len("visual."):]: t for k, t in sd.items()}
    width = v["class_embedding"].shape[0]
    x = F.conv2d(x, v["conv1.weight"], stride=v["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + v["positional_embedding"]
    x = F.layer_norm(x, (width,), v["ln_pre.weight"], v["ln_pre.bias"], 1e-5)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in v:
        p = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(width, heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": v[p + "attn.in_proj_weight"],
                             "in_proj_bias": v[p + "attn.in_proj_bias"],
                             "out_proj.weight": v[p + "attn.out_proj.weight"],
                             "out_proj.bias": v[p + "attn.out_proj.bias"]})
        y = F.layer_norm(x, (width,), v[p + "ln_1.weight"], v[p + "ln_1.bias"], 1e-5)
        x = x + mha(y, y, y, need_weights=False)[0]
        y = F.layer_norm(x, (width,), v[p + "ln_2.weight"], v[p + "ln_2.bias"], 1e-5)
        y = F.linear(y, v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        y = F.linear(QuickGELU()(y), v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
        x = x + y
        i += 1
    cls = F.layer_norm(x[:, 0], (width,), v["ln_post.weight"], v["ln_post.bias"], 1e-5)
    return cls @ v["proj"]


def test_clip_round_trip_and_equivalence_with_an_independent_clip_forward(tmp_path):
    src = _randomise(ViT(CLIP_LIKE), 8)
    clip_sd = vit_to_clip(src.state_dict())
    assert clip_sd["visual.class_embedding"].shape == (32,)
    assert clip_sd["visual.positional_embedding"].shape == (17, 32)
    assert clip_sd["visual.proj"].shape == (32, 16)
    assert clip_sd["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert "visual.conv1.bias" not in clip_sd and "visual.ln_post.weight" in clip_sd
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src.encode(x), _reference_clip_tower(clip_sd, x, heads=4), atol=1e-5,
                                   rtol=1e-4)
    dst = _randomise(ViT(CLIP_LIKE), 9)
    dst.load_state_dict(clip_to_vit(clip_sd))
    torch.testing.assert_close(dst.encode(x), src.encode(x))
    # a full CLIP checkpoint: the text tower's keys are ignored, not reported as unexpected
    full = {**clip_sd, "token_embedding.weight": torch.zeros(5, 8), "logit_scale": torch.tensor(1.0)}
    torch.save(full, tmp_path / "clip.pt")
    dst2 = _randomise(ViT(CLIP_LIKE), 10)
    report = load_vit_weights(dst2, tmp_path / "clip.pt")
    assert report.layout == "clip" and not report.missing and not report.unexpected
    assert sorted(report.ignored) == ["logit_scale", "token_embedding.weight"]
    torch.testing.assert_close(dst2.encode(x), src.encode(x))


def test_quick_gelu_is_selectable_and_changes_the_output():
    gelu = _randomise(ViT(dataclasses.replace(CLIP_LIKE, act="gelu")), 11)
    quick = ViT(CLIP_LIKE).eval()
    quick.load_state_dict(gelu.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert isinstance(quick.blocks[0].mlp.act, QuickGELU)
    assert not torch.allclose(gelu.encode(x), quick.encode(x), atol=1e-4)


def test_exports_refuse_what_the_foreign_layout_cannot_hold():
    with pytest.raises(ValueError, match="rel_pos"):
        vit_to_timm(ViT(SAM_LIKE).state_dict())
    with pytest.raises(ValueError, match="class token"):
        vit_to_clip(ViT(SAM_LIKE).state_dict())
    with pytest.raises(ValueError, match=r"patch_embed\.proj\.bias"):
        vit_to_clip(ViT(dataclasses.replace(CLIP_LIKE, patch_bias=True)).state_dict())


def test_sam_layout_loads_the_encoder_part_and_ignores_the_rest(tmp_path):
    cfg = dataclasses.replace(SAM_LIKE, out_indices=())
    src = _randomise(ViT(cfg), 12)
    sam_sd = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    sam_sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 8)
    torch.save(sam_sd, tmp_path / "sam.pth")
    dst = _randomise(ViT(cfg), 13)
    report = load_vit_weights(dst, tmp_path / "sam.pth")
    assert report.layout == "sam" and not report.missing and not report.unexpected
    assert report.ignored == ["mask_decoder.iou_token.weight"]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_loader_errors_name_the_file_and_the_key(tmp_path):
    cfg = dataclasses.replace(SAM_LIKE, out_indices=())
    sd = ViT(cfg).state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"bad\.pth: blocks\.0\.attn\.qkv\.weight: checkpoint shape \(3, 3\)"):
        load_vit_weights(ViT(cfg), tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not found"):
        load_vit_weights(ViT(cfg), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth: cannot read"):
        load_vit_weights(ViT(cfg), tmp_path / "junk.pth")
    partial = {k: v for k, v in ViT(cfg).state_dict().items() if not k.startswith("blocks.2")}
    torch.save(partial, tmp_path / "partial.pth")
    report = load_vit_weights(ViT(cfg), tmp_path / "partial.pth")
    assert report.missing and all(k.startswith("blocks.2.") for k in report.missing)
    with pytest.raises(InputError, match="missing"):
        load_vit_weights(ViT(cfg), tmp_path / "partial.pth", strict=True)


def test_safetensors_checkpoint_and_clear_error_without_the_package(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SAM_LIKE, out_indices=())
    src = _randomise(ViT(cfg), 14)
    path = tmp_path / "w.safetensors"
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = _randomise(ViT(cfg), 15)
    assert load_vit_weights(dst, path).layout == "karyo"
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # make the import fail
    with pytest.raises(InputError, match="needs the 'safetensors' package"):
        load_vit_weights(dst, path)


def test_config_json_round_trip_rebuilds_the_same_architecture():
    data = json.loads(json.dumps(to_dict(SAM_LIKE)))
    cfg = from_dict(ViTConfig, data)
    assert cfg == SAM_LIKE and isinstance(cfg.global_attn_indexes, tuple)
    a, b = ViT(SAM_LIKE), ViT(cfg)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_deterministic_given_the_torch_seed():
    torch.manual_seed(123)
    a = ViT(SAM_LIKE)
    torch.manual_seed(123)
    b = ViT(SAM_LIKE)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_drop_path_and_layernorm2d():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    y = dp(x)
    kept = (y[:, 0] != 0).float().mean()
    assert 0.45 < kept < 0.55 and torch.allclose(y[y != 0], torch.tensor(2.0))  # rescaled by 1/(1−p)
    assert torch.equal(dp.eval()(x), x)
    ln = LayerNorm2d(6)
    z = torch.randn(2, 6, 3, 5)
    torch.testing.assert_close(ln(z), F.layer_norm(z.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2))
