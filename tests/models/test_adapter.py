"""Channel adapter: shapes and the residual rule, channel-name mapping and pooling, missing-channel fills, and the
adapter plugged into CellViT, the PromptNucSeg networks and MONCH without changing their state-dict keys."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from karyo.errors import InputError
from karyo.infer.prepare import model_input, select_channels
from karyo.models.adapter import (
    AdapterConfig,
    ChannelAdapter,
    ChannelWarning,
    apply_channels,
    duplicate_channels,
    load_backbone_state,
    map_channels,
    plan_channels,
)
from karyo.models.cellvit import CellViT, CellViTConfig, CellViTModel
from karyo.models.monch import MONCH, MONCHConfig
from karyo.models.prompter import Prompter, PrompterConfig
from karyo.models.promptnucseg import PromptNucSegConfig
from karyo.models.segmentor import Segmentor, segmentor_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ------------------------------------------------------------------------------------------------ module


@pytest.mark.parametrize("n", [1, 2, 8, 40])
def test_any_channel_count_becomes_three_without_residual(n):
    ad = ChannelAdapter(AdapterConfig(in_channels=n, hidden=8)).eval()
    assert not ad.config.residual
    y = ad(torch.randn(2, n, 20, 24))
    assert y.shape == (2, 3, 20, 24)
    convs = [m for m in ad.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (1, 1)]
    assert [c.in_channels for c in convs] == [n, 8, 8] and convs[-1].out_channels == 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ad.modules()) == 2


def test_residual_exactly_when_in_equals_out_and_identity_at_initialisation():
    ad = ChannelAdapter(AdapterConfig(in_channels=3, hidden=8)).eval()
    assert ad.config.residual
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ad(x), x, rtol=0, atol=0)  # zero-initialised projection: identity
    _randomise(ad)
    torch.testing.assert_close(ad(x), x + ad.proj(ad.body(x)))  # the residual connection
    ad4 = ChannelAdapter(AdapterConfig(in_channels=4, out_channels=4, hidden=8)).eval()
    assert ad4.config.residual and ad4(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)


def test_wrong_input_channel_count_is_an_error():
    with pytest.raises(InputError, match="B×2×H×W"):
        ChannelAdapter(AdapterConfig(in_channels=2))(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="unique"):
        AdapterConfig(in_channels=2, channel_names=("DAPI", "dapi"))
    with pytest.raises(InputError, match="1 channel_names for 2"):
        AdapterConfig(in_channels=2, channel_names=("DAPI",))


def test_missing_channel_fills():
    x = torch.randn(1, 3, 6, 6)
    xm = x.clone()
    xm[:, 1] = float("nan")
    for rule, want in [("zero", torch.zeros(6, 6)), ("mean", (x[0, 0] + x[0, 2]) / 2)]:
        ad = ChannelAdapter(AdapterConfig(in_channels=3, missing=rule)).eval()
        filled = ad.fill_missing(xm, ad.missing_mask(xm))
        torch.testing.assert_close(filled[0, 1], want)
        torch.testing.assert_close(filled[0, [0, 2]], x[0, [0, 2]])
    ad = ChannelAdapter(AdapterConfig(in_channels=3, missing="embedding")).eval()
    with torch.no_grad():
        ad.missing_embed.copy_(torch.tensor([0.0, 0.7, 0.0]))
    torch.testing.assert_close(ad.fill_missing(xm, ad.missing_mask(xm))[0, 1], torch.full((6, 6), 0.7))
    # the embedding is learned: the loss reaches it
    ad(xm).sum().backward()
    assert ad.missing_embed.grad is not None and ad.missing_embed.grad[1] != 0 and ad.missing_embed.grad[0] == 0


def test_channel_dropout_only_in_training_and_never_all_channels():
    ad = ChannelAdapter(AdapterConfig(in_channels=3, channel_dropout=0.9))
    x = torch.randn(64, 3, 4, 4)
    torch.manual_seed(0)
    miss = ad.train().missing_mask(x)
    assert miss.any() and not miss.all(1).any()
    assert 0.5 < miss.float().mean() < 0.67  # ~0.9 per channel, capped at 2 of 3
    assert not ad.eval().missing_mask(x).any()


# ------------------------------------------------------------------------------------------------ mapping


def test_named_mapping_reorders_ignores_extra_and_marks_missing():
    cfg = AdapterConfig.for_channels(["DAPI", "CD45"])
    with pytest.warns(ChannelWarning, match=r"\['Ki67'\] not used"):
        plan = plan_channels(3, cfg, [" cd45", "Ki67", "dapi "])
    assert plan.mode == "named" and plan.sources == ((2,), (0,)) and plan.ignored == (1,)
    with pytest.warns(ChannelWarning, match=r"\['CD45'\] missing"):
        plan = plan_channels(1, cfg, ["DAPI"])
    assert plan.sources == ((0,), ()) and plan.missing == (1,) and plan.present.tolist() == [True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_channels(2, cfg, ["DAPI", "CD45"]).mode == "identity"
    with pytest.warns(ChannelWarning, match=r"no channel name of the image \(\['CD3', 'PanCK'\]\) matches the "
                                            r"model's.*probably not what they are"):
        plan_channels(2, cfg, ["CD3", "PanCK"])
    with pytest.warns(ChannelWarning, match=r"names no channels: they are taken by position as the model's "
                                            r"\['DAPI', 'CD45'\]"):
        assert plan_channels(2, cfg, None).mode == "identity"  # unnamed, same count: by position, said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_channels(3, AdapterConfig(in_channels=3), None).mode == "identity"  # nothing to name
    img = np.stack([np.full((2, 2), v, np.uint16) for v in (10, 20, 30)], axis=2)
    out, present = map_channels(img, cfg, ["CD45", "Ki67", "DAPI"], warn=False)
    assert out.dtype == np.uint16 and out[0, 0].tolist() == [30, 10] and present.all()


def test_unnamed_pooling_is_adaptive_average_pooling_over_channels():
    rng = np.random.default_rng(0)
    for c, n in [(8, 3), (5, 3), (1, 3), (2, 3), (3, 1), (40, 3)]:
        img = rng.random((4, 5, c)).astype(np.float32)
        cfg = AdapterConfig(in_channels=n)
        with pytest.warns(ChannelWarning, match="pooled"):
            out, present = map_channels(img, cfg)
        ref = F.adaptive_avg_pool1d(torch.from_numpy(img).reshape(-1, 1, c), n).reshape(4, 5, n).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-6)
        assert present.all()
    gray = rng.integers(0, 256, (3, 3, 1), dtype=np.uint8)
    out = apply_channels(gray, plan_channels(1, AdapterConfig(in_channels=3), warn=False))
    assert (out == gray).all()  # 1 → 3 repeats the channel


def test_an_unnamed_image_with_fewer_channels_fills_a_named_model_by_position():
    """A DAPI-only PNG given to a DAPI,CD45 model is its DAPI, with CD45 missing: not pooled into both."""
    cfg = AdapterConfig(in_channels=2, channel_names=("DAPI", "CD45"))
    dapi = np.full((2, 2, 1), 7, np.uint8)
    with pytest.warns(ChannelWarning,
                      match=r"its one channel is taken by position as the model's \['DAPI'\]; \['CD45'\] missing"):
        out, present = map_channels(dapi, cfg)
    assert present.tolist() == [True, False] and out[0, 0].tolist() == [7, 0]
    with pytest.warns(ChannelWarning, match="pooled"):  # an unnamed model has no first channel to give it to
        assert map_channels(dapi, AdapterConfig(in_channels=2))[1].all()


def test_no_matching_name_falls_back_to_position_with_a_warning():
    cfg = AdapterConfig.for_channels(["DAPI", "CD45"])
    with pytest.warns(ChannelWarning, match="no channel name"):
        plan = plan_channels(2, cfg, ["Hoechst", "CD3"])
    assert plan.mode == "identity"


def test_model_output_is_invariant_to_channel_order_by_name_and_to_extra_channels():
    torch.manual_seed(0)
    cfg = CellViTConfig(stem_dims=(8, 8), decoder_dims=(16, 16, 8, 8, 8),
                        adapter=AdapterConfig.for_channels(["DAPI", "CD45", "PanCK"], hidden=8))
    model = CellViTModel(cfg)
    _randomise(model.net.adapter)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 65535, (32, 32, 3), dtype=np.uint16)
    names = ("DAPI", "CD45", "PanCK")
    ref = model._forward(model._prepare(img, "", names))[0]
    perm = [2, 0, 1]
    shuffled = model._forward(model._prepare(img[..., perm], "", [names[i] for i in perm]))[0]
    torch.testing.assert_close(shuffled, ref, rtol=0, atol=0)
    extra = np.concatenate([img, rng.integers(0, 65535, (32, 32, 1), dtype=np.uint16)], axis=2)
    with pytest.warns(ChannelWarning, match="ignored"):
        out = model._forward(model._prepare(extra, "", [*names, "CD8"]))[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_missing_channel_in_model_input_equals_the_fill_value():
    """'zero' fill = the channel at its training mean; the whole model sees the same input either way."""
    torch.manual_seed(0)
    ad = AdapterConfig.for_channels(["DAPI", "CD45"], hidden=8, missing="zero", pixel_mean=(0.3, 0.4),
                                    pixel_std=(0.2, 0.25))
    model = CellViTModel(CellViTConfig(stem_dims=(8, 8), decoder_dims=(16, 16, 8, 8, 8), adapter=ad))
    _randomise(model.net.adapter)
    dapi = np.random.default_rng(0).random((32, 32, 1)).astype(np.float32)
    with pytest.warns(ChannelWarning, match="missing"):
        x = model_input(dapi, 3, (0.5,) * 3, (0.5,) * 3, adapter=ad, channel_names=["DAPI"])
    assert torch.isnan(x[0, 1]).all() and torch.isfinite(x[0, 0]).all()
    with pytest.warns(ChannelWarning, match="missing"):
        miss = model._forward(model._prepare(dapi, "", ["DAPI"]))[0]
    at_mean = np.concatenate([dapi, np.full_like(dapi, 0.4)], axis=2)
    full = model._forward(model._prepare(at_mean, "", ["DAPI", "CD45"]))[0]
    assert torch.isfinite(miss).all()
    torch.testing.assert_close(miss, full, rtol=1e-5, atol=1e-6)


def test_segment_takes_channel_names():
    torch.manual_seed(0)
    cfg = CellViTConfig(stem_dims=(8, 8), decoder_dims=(16, 16, 8, 8, 8),
                        adapter=AdapterConfig.for_channels(["DAPI"], hidden=8))
    img = np.zeros((40, 40, 2), np.uint8)
    with pytest.warns(ChannelWarning, match=r"\['CD45'\] not used"):
        res = CellViTModel(cfg).segment(img, channel_names=("CD45", "DAPI"))
    assert res.instances.shape == (40, 40)


def test_select_channels_by_name_and_index():
    img = np.stack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3)], axis=2)
    sel, names = select_channels(img, ("DAPI", "CD45", "CD8"), "cd8, DAPI")
    assert sel[0, 0].tolist() == [3, 1] and names == ("CD8", "DAPI")
    sel, names = select_channels(img, None, "2,0")
    assert sel[0, 0].tolist() == [3, 1] and names is None
    with pytest.raises(InputError, match="'Ki67' not found"):
        select_channels(img, ("DAPI", "CD45", "CD8"), "Ki67")
    with pytest.raises(InputError, match=r"channel\(s\) 2, cd8 selected more than once"):  # by index and by name
        select_channels(img, ("DAPI", "CD45", "CD8"), "2,cd8")


def test_naive_duplication_repeats_or_truncates():
    img = np.arange(8, dtype=np.uint8).reshape(1, 1, 8)
    assert duplicate_channels(img).tolist() == [[[0, 1, 2]]]
    assert duplicate_channels(img[..., :1]).tolist() == [[[0, 0, 0]]]
    assert duplicate_channels(img[..., :2]).tolist() == [[[0, 1, 0]]]


# ------------------------------------------------------------------------------------------- plugged in


def _keys(net: torch.nn.Module) -> set[str]:
    return set(net.state_dict())


def test_cellvit_with_adapter_is_adapter_plus_the_unchanged_backbone():
    base = dict(stem_dims=(8, 8), decoder_dims=(16, 16, 8, 8, 8))
    plain = CellViT(CellViTConfig(**base))
    assert not any(k.startswith("adapter") for k in _keys(plain))
    net = CellViT(CellViTConfig(**base, adapter=AdapterConfig(in_channels=5, hidden=8))).eval()
    assert {k for k in _keys(net) if not k.startswith("adapter.")} == _keys(plain)
    missing = load_backbone_state(net, plain.state_dict())
    assert missing and all(k.startswith("adapter.") for k in missing)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)
    out = net(torch.randn(1, 5, 64, 64))
    assert out["np"].shape == (1, 2, 64, 64)
    with pytest.raises(InputError, match=r"adapter\.out_channels"):
        CellViTConfig(**base, adapter=AdapterConfig(in_channels=5, out_channels=4))


def test_prompter_segmentor_and_monch_take_an_adapter():
    ad = AdapterConfig(in_channels=2, hidden=4)
    p_plain, p = Prompter(PrompterConfig.preset("cpu")), Prompter(PrompterConfig.preset("cpu", adapter=ad)).eval()
    assert {k for k in _keys(p) if not k.startswith("adapter.")} == _keys(p_plain)
    assert not any(k.startswith("adapter") for k in _keys(p_plain))
    assert p(torch.randn(1, 2, 64, 64))["logits"].shape[0] == 1
    s_plain, s = Segmentor(segmentor_config("tiny")), Segmentor(segmentor_config("tiny", adapter=ad)).eval()
    assert {k for k in _keys(s) if not k.startswith("adapter.")} == _keys(s_plain)
    assert s.embed(torch.randn(1, 2, 64, 64)).shape[0] == 1
    assert s.pixel_mean.shape == (2, 1, 1)  # normalisation follows the adapter's channels
    m_plain = MONCH(MONCHConfig.preset("cpu", num_classes=2))
    m = MONCH(MONCHConfig.preset("cpu", num_classes=2, adapter=ad)).eval()
    assert {k for k in _keys(m) if not k.startswith("adapter.")} == _keys(m_plain)
    with torch.no_grad():
        assert m(torch.randn(1, 2, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="must agree"):
        PromptNucSegConfig(prompter=PrompterConfig.preset("cpu", adapter=ad), segmentor=segmentor_config("tiny"))
