"""ConvNeXt backbone: shapes, the official/timm key layouts (written out by hand here), channel adaptation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from karyo.errors import InputError
from karyo.models.convnext import (
    ConvNeXt,
    ConvNeXtConfig,
    adapt_input_channels,
    convert_timm_state_dict,
    load_convnext_weights,
)

DEPTHS = (1, 1, 2, 1)
DIMS = (8, 16, 24, 32)


def tiny(**kw) -> ConvNeXt:
    return ConvNeXt(ConvNeXtConfig(depths=DEPTHS, dims=DIMS, **kw))


def _block(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.dwconv.weight": (d, 1, 7, 7), f"{prefix}.dwconv.bias": (d,),
        f"{prefix}.norm.weight": (d,), f"{prefix}.norm.bias": (d,),
        f"{prefix}.pwconv1.weight": (4 * d, d), f"{prefix}.pwconv1.bias": (4 * d,),
        f"{prefix}.pwconv2.weight": (d, 4 * d), f"{prefix}.pwconv2.bias": (d,),
        f"{prefix}.gamma": (d,),
    }


# The official facebookresearch/ConvNeXt layout for depths (1, 1, 2, 1), dims (8, 16, 24, 32), 3 input channels,
# written from the architecture description (stem conv + LN, LN + 2×2 conv downsamplers, blocks), not from our module.
OFFICIAL_SHAPES: dict[str, tuple[int, ...]] = {
    "downsample_layers.0.0.weight": (8, 3, 4, 4), "downsample_layers.0.0.bias": (8,),
    "downsample_layers.0.1.weight": (8,), "downsample_layers.0.1.bias": (8,),
    "downsample_layers.1.0.weight": (8,), "downsample_layers.1.0.bias": (8,),
    "downsample_layers.1.1.weight": (16, 8, 2, 2), "downsample_layers.1.1.bias": (16,),
    "downsample_layers.2.0.weight": (16,), "downsample_layers.2.0.bias": (16,),
    "downsample_layers.2.1.weight": (24, 16, 2, 2), "downsample_layers.2.1.bias": (24,),
    "downsample_layers.3.0.weight": (24,), "downsample_layers.3.0.bias": (24,),
    "downsample_layers.3.1.weight": (32, 24, 2, 2), "downsample_layers.3.1.bias": (32,),
    **_block("stages.0.0", 8),
    **_block("stages.1.0", 16),
    **_block("stages.2.0", 24),
    **_block("stages.2.1", 24),
    **_block("stages.3.0", 32),
}
CLASSIFIER_SHAPES = {"norm.weight": (32,), "norm.bias": (32,), "head.weight": (10, 32), "head.bias": (10,)}


def random_official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in {**OFFICIAL_SHAPES, **CLASSIFIER_SHAPES}.items()}


def to_timm(official: dict[str, torch.Tensor], conv_mlp: bool = False) -> dict[str, torch.Tensor]:
    """Hand-written official → timm renaming (the inverse of what the loader must do)."""
    out = {
        "stem.0.weight": official["downsample_layers.0.0.weight"],
        "stem.0.bias": official["downsample_layers.0.0.bias"],
        "stem.1.weight": official["downsample_layers.0.1.weight"],
        "stem.1.bias": official["downsample_layers.0.1.bias"],
        "head.norm.weight": official["norm.weight"], "head.norm.bias": official["norm.bias"],
        "head.fc.weight": official["head.weight"], "head.fc.bias": official["head.bias"],
    }
    for i in (1, 2, 3):
        for a in ("0", "1"):
            for p in ("weight", "bias"):
                out[f"stages.{i}.downsample.{a}.{p}"] = official[f"downsample_layers.{i}.{a}.{p}"]
    names = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            for ours, theirs in names.items():
                for p in ("weight", "bias"):
                    value = official[f"stages.{i}.{j}.{ours}.{p}"]
                    if conv_mlp and ours.startswith("pwconv") and p == "weight":
                        value = value[:, :, None, None]
                    out[f"stages.{i}.blocks.{j}.{theirs}.{p}"] = value
            out[f"stages.{i}.blocks.{j}.gamma"] = official[f"stages.{i}.{j}.gamma"]
    return out


def test_stage_shapes_and_strides():
    model = tiny().eval()
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 16, 24), (2, 16, 8, 12), (2, 24, 4, 6), (2, 32, 2, 3)]
    assert model.strides == (4, 8, 16, 32)
    assert model.out_channels == DIMS


def test_parameter_names_match_official_layout():
    state = tiny().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == OFFICIAL_SHAPES


def test_presets_and_published_parameter_count():
    assert ConvNeXtConfig.preset("small").depths == (3, 3, 27, 3)
    assert ConvNeXtConfig.preset("small").dims == (96, 192, 384, 768)
    assert ConvNeXtConfig.preset("nano").depths == (2, 2, 8, 2)
    assert ConvNeXtConfig.preset("femto").dims == (48, 96, 192, 384)
    assert ConvNeXtConfig.preset("pico", in_chans=1).in_chans == 1
    # ConvNeXt-T has 28,589,128 parameters as published ("28M"); minus the final LN(768) and the 768→1000 head:
    tiny_t = ConvNeXt(ConvNeXtConfig.preset("tiny"))
    assert sum(p.numel() for p in tiny_t.parameters()) == 28_589_128 - 2 * 768 - (768 * 1000 + 1000)
    with pytest.raises(InputError, match="unknown ConvNeXt preset"):
        ConvNeXtConfig.preset("huge")
    with pytest.raises(InputError, match="4 depths"):
        ConvNeXtConfig(depths=(1, 1, 1), dims=(8, 16, 24))


def test_layer_scale_and_determinism():
    assert not any("gamma" in k for k in tiny(layer_scale_init=0.0).state_dict())
    torch.manual_seed(3)
    a = tiny(drop_path_rate=0.2)
    torch.manual_seed(3)
    b = tiny(drop_path_rate=0.2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a.eval()(x)[-1], a(x)[-1])  # drop path is off in eval mode
    gammas = [blk.gamma for stage in a.stages for blk in stage]
    assert all(torch.allclose(g, torch.full_like(g, 1e-6)) for g in gammas)
    assert [blk.drop_path.p for stage in a.stages for blk in stage] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def _assert_loaded(model: ConvNeXt, official: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    for key in OFFICIAL_SHAPES:
        assert torch.equal(state[key], official[key]), key


def test_load_official_layout_with_model_wrapper(tmp_path):
    official = random_official_state()
    path = tmp_path / "convnext_official.pth"
    torch.save({"model": official, "epoch": 3}, path)
    model = tiny()
    report = load_convnext_weights(model, path)
    _assert_loaded(model, official)
    assert report.layout == "official"
    assert report.ignored == ("head.bias", "head.weight", "norm.bias", "norm.weight")
    assert report.adapted == ()


def test_load_plain_official_state_dict(tmp_path):
    official = random_official_state(1)
    torch.save(official, tmp_path / "plain.pth")
    model = tiny()
    load_convnext_weights(model, tmp_path / "plain.pth")
    _assert_loaded(model, official)


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_load_timm_layout(tmp_path, conv_mlp):
    official = random_official_state(2)
    torch.save(to_timm(official, conv_mlp), tmp_path / "timm.pth")
    model = tiny()
    report = load_convnext_weights(model, tmp_path / "timm.pth")
    _assert_loaded(model, official)
    assert report.layout == "timm"
    assert set(report.ignored) == {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"}


def test_timm_key_mapping_is_exact():
    official = random_official_state(4)
    converted = convert_timm_state_dict(to_timm(official))
    assert set(converted) == set(OFFICIAL_SHAPES)
    with pytest.raises(InputError, match=r"stages\.0\.blocks\.0\.mlp\.grn\.weight"):
        convert_timm_state_dict({"stages.0.blocks.0.mlp.grn.weight": torch.zeros(8)})


def test_adapt_input_channels_rule():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    one = adapt_input_channels(w, 1)
    assert torch.equal(one[:, 0], w.sum(1))
    four = adapt_input_channels(w, 4)
    assert four.shape == (2, 4, 2, 2)
    assert torch.allclose(four[:, 2], w.sum(1) / 4)
    assert torch.allclose(four.sum(1), w.sum(1))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_load_rgb_weights_into_other_channel_count(tmp_path, in_chans):
    official = random_official_state(5)
    torch.save({"model": official}, tmp_path / "rgb.pth")
    rgb, other = tiny(), tiny(in_chans=in_chans)
    load_convnext_weights(rgb, tmp_path / "rgb.pth")
    report = load_convnext_weights(other, tmp_path / "rgb.pth")
    assert report.adapted == ("downsample_layers.0.0.weight",)
    # Documented invariant: a grey image on every channel gives the same stem response as before.
    grey = torch.rand(1, 1, 32, 32)
    stem_rgb = F.conv2d(grey.repeat(1, 3, 1, 1), rgb.downsample_layers[0][0].weight, rgb.downsample_layers[0][0].bias,
                        stride=4)
    stem_new = F.conv2d(grey.repeat(1, in_chans, 1, 1), other.downsample_layers[0][0].weight,
                        other.downsample_layers[0][0].bias, stride=4)
    assert torch.allclose(stem_rgb, stem_new, atol=1e-5)
    rgb.eval(), other.eval()
    out_rgb = rgb(grey.repeat(1, 3, 1, 1))[-1]
    out_new = other(grey.repeat(1, in_chans, 1, 1))[-1]
    assert torch.allclose(out_rgb, out_new, atol=1e-4)


def test_shape_mismatch_and_bad_files(tmp_path):
    official = random_official_state(6)
    official["stages.2.1.pwconv1.weight"] = torch.zeros(96, 23)
    torch.save(official, tmp_path / "bad_shape.pth")
    with pytest.raises(InputError, match=r"bad_shape\.pth.*stages\.2\.1\.pwconv1\.weight.*\(96, 23\)"):
        load_convnext_weights(tiny(), tmp_path / "bad_shape.pth")

    official = random_official_state(6)
    del official["stages.2.1.gamma"]
    torch.save(official, tmp_path / "missing.pth")
    with pytest.raises(InputError, match=r"missing key 'stages\.2\.1\.gamma'"):
        load_convnext_weights(tiny(), tmp_path / "missing.pth")

    official = random_official_state(6)
    official["stages.2.2.gamma"] = torch.zeros(24)  # a deeper network's block
    torch.save(official, tmp_path / "deeper.pth")
    with pytest.raises(InputError, match=r"unexpected key 'stages\.2\.2\.gamma'"):
        load_convnext_weights(tiny(), tmp_path / "deeper.pth")

    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not ConvNeXt weights"):
        load_convnext_weights(tiny(), tmp_path / "other.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read PyTorch weights"):
        load_convnext_weights(tiny(), tmp_path / "garbage.pth")

    with pytest.raises(InputError, match="file not found"):
        load_convnext_weights(tiny(), tmp_path / "absent.pth")
