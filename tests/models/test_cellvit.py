"""CellViT-style model: both encoders' shapes, HV targets, losses, weight loading, tiling, the model folder."""

import numpy as np
import pytest
import torch

import karyo
from karyo.errors import InputError
from karyo.models.cellvit import (
    CellViT,
    CellViTConfig,
    CellViTMaps,
    CellViTModel,
    cellvit_loss,
    cellvit_targets,
    hv_maps,
    msge_loss,
    sobel_hv,
)
from karyo.models.convnext import ConvNeXt
from karyo.models.vit import ViT, ViTConfig, timm_to_vit, vit_to_timm

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_VIT = ViTConfig(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
                     out_indices=(0, 1, 2, 3))


def vit_config(**kw) -> CellViTConfig:
    return CellViTConfig(encoder="vit", vit=TINY_VIT, stem_dims=(8,), decoder_dims=(32, 16, 16, 8),
                         shared_stages=0, **kw)


def convnext_config(**kw) -> CellViTConfig:
    return CellViTConfig(encoder="convnext", convnext="atto", stem_dims=(8, 8), decoder_dims=(32, 16, 16, 8, 8),
                         **kw)


# ------------------------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("make", [vit_config, convnext_config], ids=["vit", "convnext"])
def test_both_encoders_give_full_resolution_maps(make):
    torch.manual_seed(0)
    net = CellViT(make(num_classes=3, num_tissues=4)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = net(x)
    assert out["np"].shape == (2, 2, 64, 96)
    assert out["hv"].shape == (2, 2, 64, 96)
    assert out["nt"].shape == (2, 4, 64, 96)
    assert out["tissue"].shape == (2, 4)
    assert all(torch.isfinite(v).all() for v in out.values())
    # skips come from the encoder: changing the input changes every branch
    with torch.no_grad():
        out2 = net(x + 1.0)
    assert all(not torch.allclose(out[k], out2[k]) for k in out)


def test_vit_skips_come_from_the_intermediate_blocks():
    net = CellViT(vit_config())
    assert isinstance(net.encoder, ViT) and net.encoder.config.out_indices == (0, 1, 2, 3)
    seen = []
    hooks = [net.encoder.blocks[i].register_forward_hook(lambda m, i, o: seen.append(o.shape)) for i in range(4)]
    net(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [(1, 2, 2, 32)] * 4
    # z1..z3 are brought to strides 2, 4, 8 by 3, 2, 1 transposed-conv blocks
    assert [len(a) for a in net.skip_adapters] == [1, 2, 3]


def test_shared_stages_and_presets():
    cfg = CellViTConfig.preset("cpu", num_classes=4)
    net = CellViT(cfg)
    assert isinstance(net.encoder, ConvNeXt)
    assert len(net.shared) == 4 and all(len(b.stages) == 1 for b in net.branches.values())
    assert net.branches["nt"].head.out_channels == 5
    sam = CellViTConfig.preset("sam_b")
    assert sam.vit.window_size == 14 and sam.vit.out_indices == (2, 5, 8, 11) and sam.shared_stages == 0
    assert CellViTConfig.preset("vit256").vit.embed_dim == 384


def test_config_validation_and_input_checks():
    with pytest.raises(InputError, match="decoder_dims"):
        CellViTConfig(decoder_dims=(8, 8))
    with pytest.raises(InputError, match="patch_size 16"):
        CellViTConfig(encoder="vit", vit=ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                   out_indices=(0, 1, 1, 1)), stem_dims=(8,),
                      decoder_dims=(8, 8, 8, 8))
    with pytest.raises(InputError, match="energy"):
        CellViTConfig(energy="magic")
    with pytest.raises(InputError, match="multiples of 32"):
        CellViT(convnext_config())(torch.zeros(1, 3, 48, 64))


def test_config_json_round_trip_with_nested_vit():
    from karyo.config import from_dict, to_dict

    cfg = vit_config(num_classes=2, class_names={1: "a", 2: "b"})
    assert from_dict(CellViTConfig, to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------------------------------ weights


def test_timm_layout_vit_weights_load_into_the_encoder(tmp_path):
    """A random timm-layout checkpoint → the CellViT encoder → back to timm: identical tensors."""
    torch.manual_seed(1)
    src = ViT(TINY_VIT)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    timm_sd = vit_to_timm(src.state_dict())
    assert "blocks.0.mlp.fc1.weight" in timm_sd and timm_sd["pos_embed"].shape == (1, 16, 32)
    torch.save({"model": {**timm_sd, "head.weight": torch.zeros(10, 32)}}, tmp_path / "timm.pth")
    net = CellViT(vit_config())
    report = net.load_encoder_weights(tmp_path / "timm.pth")
    assert report.layout == "timm" and report.missing == [] and report.unexpected == ["head.weight"]
    back = vit_to_timm(net.encoder.state_dict())
    assert back.keys() == timm_sd.keys()
    for k in timm_sd:
        torch.testing.assert_close(back[k], timm_sd[k], rtol=0, atol=0, msg=k)
    assert timm_to_vit(back).keys() == net.encoder.state_dict().keys()


def test_convnext_weights_load_into_the_encoder(tmp_path):
    torch.manual_seed(2)
    src = ConvNeXt(convnext_config().convnext_config())
    torch.save({"model": src.state_dict()}, tmp_path / "convnext.pth")
    net = CellViT(convnext_config())
    report = net.load_encoder_weights(tmp_path / "convnext.pth")
    assert report.layout == "official"
    for k, v in src.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[k], v, rtol=0, atol=0)


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def test_model_folder_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = CellViTModel(convnext_config(num_classes=2, class_names={1: "a", 2: "b"}, np_threshold=0.3,
                                         min_area=1, min_marker_area=1))
    for m in model.net.modules():  # non-trivial BatchNorm statistics, so that they must be saved too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    img = rgb(64, 96)
    x = model._prepare(img, "")
    maps = model.predict_maps(x)
    res = model.segment(img)
    assert res.n_nuclei > 0
    assert set(res.classes.values()) <= {0, 1, 2} and all(0 <= s <= 1 for s in res.scores.values())
    model.save(tmp_path / "m")
    again = karyo.load(tmp_path / "m")
    assert isinstance(again, CellViTModel) and again.config == model.config
    maps2 = again.predict_maps(again._prepare(img, ""))
    for a, b in ((maps.np_prob, maps2.np_prob), (maps.hv, maps2.hv), (maps.nt_prob, maps2.nt_prob)):
        np.testing.assert_array_equal(a, b)
    res2 = again.segment(img)
    np.testing.assert_array_equal(res.instances, res2.instances)
    assert res.classes == res2.classes and res.scores == res2.scores
    assert res2.class_names == {1: "a", 2: "b"}


# ------------------------------------------------------------------------------------------------------ tiling


def test_tiled_blending_has_no_seams(monkeypatch):
    """With a per-pixel 'network' the blended tiles must equal the untiled maps exactly."""
    model = CellViTModel(convnext_config(tile_size=64, tile_overlap=16, tile_batch=3))

    def pointwise(batch):
        b = batch.float()
        p = torch.sigmoid(b[:, 0])
        nt = torch.softmax(b[:, :2] * 3.0, dim=1)
        return p, torch.tanh(b[:, 1:3]), nt, None

    monkeypatch.setattr(model, "_forward", pointwise)
    x = torch.randn(1, 3, 150, 200)
    tiled = model.predict_maps(x)
    p, hv, nt, _ = pointwise(x)
    np.testing.assert_allclose(tiled.np_prob, p[0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(tiled.hv, hv[0].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(tiled.nt_prob, nt[0].numpy(), rtol=0, atol=1e-6)


def test_tiled_inference_matches_one_pass_of_the_real_network():
    torch.manual_seed(0)
    small = CellViTModel(convnext_config(tile_size=96, tile_overlap=32))
    big = CellViTModel(convnext_config(tile_size=256, tile_overlap=32))
    big.net.load_state_dict(small.net.state_dict())
    x = torch.randn(1, 3, 160, 224)
    tiled, whole = small.predict_maps(x), big.predict_maps(x)
    assert tiled.np_prob.shape == whole.np_prob.shape == (160, 224)
    # the receptive field is larger than a tile, so values differ a little; the blend keeps them close
    assert np.abs(tiled.np_prob - whole.np_prob).mean() < 0.05
    assert np.corrcoef(tiled.hv.ravel(), whole.hv.ravel())[0, 1] > 0.8


def ideal_maps(inst: np.ndarray, types: np.ndarray, k: int) -> CellViTMaps:
    nt = np.eye(k, dtype=np.float32)[types].transpose(2, 0, 1)
    return CellViTMaps((inst > 0).astype(np.float32), hv_maps(inst), nt)


def two_discs(h: int = 64, w: int = 96) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    inst = np.zeros((h, w), np.int32)
    inst[(yy - 20) ** 2 + (xx - 20) ** 2 <= 64] = 1
    inst[(yy - 40) ** 2 + (xx - 70) ** 2 <= 81] = 2
    types = np.where(inst == 1, 2, np.where(inst == 2, 1, 0))
    return inst, types


def test_points_select_nuclei_and_mpp_rescaling(monkeypatch):
    model = CellViTModel(convnext_config(num_classes=2))
    inst, types = two_discs()
    monkeypatch.setattr(model, "predict_maps", lambda x: ideal_maps(inst, types, 3)
                        if x.shape[2:] == inst.shape else pytest.fail(f"unexpected size {tuple(x.shape)}"))
    img = rgb(64, 96)
    full = model.segment(img)
    assert full.n_nuclei == 2 and sorted(full.classes.values()) == [1, 2]
    assert all(s == pytest.approx(1.0) for s in full.scores.values())
    one = model.segment(img, points=[(70, 40)])
    assert one.n_nuclei == 1 and np.array_equal(one.instances > 0, inst == 2) and one.classes == {1: 1}
    assert model.segment(img, points=[(50, 5)]).n_nuclei == 0  # a point on background selects nothing
    neg = model.segment(img, negative=[(20, 20)])
    assert neg.n_nuclei == 1 and neg.classes == {1: 1}
    # mpp 0.5 on a 0.25 µm/px model: the image is upsampled ×2 for the network and the result brought back
    monkeypatch.setattr(model, "predict_maps", lambda x: ideal_maps(np.kron(inst, np.ones((2, 2), np.int32)),
                                                                     np.kron(types, np.ones((2, 2), np.int64)), 3))
    half = model.segment(rgb(64, 96)[:, :, :], mpp=0.5, points=[(70, 40)])
    assert half.instances.shape == (64, 96) and half.n_nuclei == 1
    assert (half.instances[inst == 2] == 1).mean() > 0.95


def test_grayscale_input_and_wrong_channels():
    model = CellViTModel(convnext_config())
    assert model.segment(rgb(64, 64)[..., :1]).instances.shape == (64, 64)
    with pytest.raises(InputError, match="3-channel"):
        model.segment(np.zeros((64, 64, 5), np.uint8))


# ------------------------------------------------------------------------------------------------------ targets


def test_hv_maps_on_hand_made_instances():
    inst = np.zeros((40, 50), np.int32)
    inst[5:16, 4:15] = 1  # 11×11 square, centre (9, 10) in (x, y)
    inst[22:31, 10:31] = 2  # 9×21 rectangle, centre (20, 26)
    inst[22:31, 31:36] = 3  # touches 2 on the right
    hv = hv_maps(inst)
    assert hv.shape == (2, 40, 50) and hv.dtype == np.float32
    assert hv.min() >= -1.0 and hv.max() <= 1.0
    assert np.all(hv[:, inst == 0] == 0)
    # zero at the (rounded) centre of mass
    assert hv[0, 10, 9] == 0 and hv[1, 10, 9] == 0
    assert hv[0, 26, 20] == 0 and hv[1, 26, 20] == 0
    # left negative / right positive, above negative / below positive, each side reaching ±1
    sq_h, sq_v = hv[0, 5:16, 4:15], hv[1, 5:16, 4:15]
    assert np.all(sq_h[:, :5] < 0) and np.all(sq_h[:, 6:] > 0)
    assert np.all(sq_v[:5] < 0) and np.all(sq_v[6:] > 0)
    np.testing.assert_allclose(sq_h[0], np.linspace(-1, 1, 11), atol=1e-6)
    rect_h = hv[0, 26, 10:31]
    np.testing.assert_allclose(rect_h, np.linspace(-1, 1, 21), atol=1e-6)
    # two touching nuclei: the map jumps from +1 to −1 across their border
    assert hv[0, 26, 30] == pytest.approx(1.0) and hv[0, 26, 31] == pytest.approx(-1.0)
    # sides are scaled separately (an off-centre mass: 3 columns left of the centre, 1 right)
    asym = np.zeros((5, 8), np.int32)
    asym[2, 1:6] = 1
    asym[1:4, 1] = 1  # extra mass on the left pulls the centre to x = 2
    h = hv_maps(asym)[0]
    assert h[2, 1] == pytest.approx(-1.0) and h[2, 2] == 0 and h[2, 5] == pytest.approx(1.0)
    assert h[2, 4] == pytest.approx(2 / 3)


def reference_hv(inst: np.ndarray) -> np.ndarray:
    """Straightforward per-nucleus version of the same definition."""
    out = np.zeros((2, *inst.shape), np.float64)
    for i in np.unique(inst[inst > 0]):
        ys, xs = np.nonzero(inst == i)
        for ch, c in ((0, xs), (1, ys)):
            d = c - np.floor(c.mean() + 0.5)
            v = np.zeros_like(d, dtype=np.float64)
            if (d < 0).any():
                v[d < 0] = d[d < 0] / -d.min()
            if (d > 0).any():
                v[d > 0] = d[d > 0] / d.max()
            out[ch, ys, xs] = v
    return out


def test_hv_maps_match_a_per_nucleus_reference():
    rng = np.random.default_rng(3)
    inst = np.zeros((80, 80), np.int32)
    for i in range(1, 30):
        y, x = rng.integers(0, 72, 2)
        h, w = rng.integers(2, 9, 2)
        inst[y:y + h, x:x + w] = i
    np.testing.assert_allclose(hv_maps(inst), reference_hv(inst), atol=1e-6)


# ------------------------------------------------------------------------------------------------------- losses


def test_sobel_kernel_scale_and_msge():
    ramp = torch.arange(12, dtype=torch.float32).repeat(12, 1)  # f(x, y) = x
    hv = torch.stack([ramp, ramp.t()])[None]
    g = sobel_hv(hv)
    # HoVer-Net's 5×5 kernel x/(x²+y²) has gain Σ x²/(x²+y²) = 12 on a unit ramp
    torch.testing.assert_close(g[0, :, 2:-2, 2:-2], torch.full((2, 8, 8), 12.0))
    focus = torch.zeros(1, 12, 12, dtype=torch.bool)
    focus[0, 4:8, 4:8] = True
    assert msge_loss(hv, hv, focus) == 0
    assert msge_loss(hv * 2, hv, focus) == pytest.approx(144.0)


def test_loss_terms_on_perfect_and_wrong_predictions():
    inst, types = two_discs()
    types[inst == 1] = 0  # nucleus 1 has an unknown class: ignored by NT
    t = cellvit_targets(torch.from_numpy(inst)[None].long(), torch.from_numpy(types)[None].long())
    assert (t["nt"][0][torch.from_numpy(inst == 1)] == -100).all()
    assert (t["nt"][0][torch.from_numpy(inst == 2)] == 1).all()
    big = 30.0
    perfect = {"np": (torch.nn.functional.one_hot(t["np"], 2).permute(0, 3, 1, 2).float() - 0.5) * big,
               "hv": t["hv"].clone(),
               "nt": (torch.nn.functional.one_hot(t["nt"].clamp(min=0), 3).permute(0, 3, 1, 2).float() - 0.5) * big}
    cfg = CellViTConfig(num_classes=2, loss_np_focal=1.0)
    good = cellvit_loss(perfect, t, cfg)
    assert good["hv_mse"] == 0 and good["hv_msge"] == 0
    assert good["np_ce"] < 1e-6 and good["nt_ce"] < 1e-6 and good["np_focal"] < 1e-6
    assert good["np_dice"] < 1e-3 and good["nt_dice"] < 1e-3
    bad = cellvit_loss({k: -v for k, v in perfect.items()}, t, cfg)
    assert bad["loss"] > 100 * good["loss"] + 1
    # the weights combine the terms
    w = {"np_ce": 1, "np_dice": 1, "np_focal": 1, "hv_mse": 1, "hv_msge": 2, "nt_ce": 1, "nt_dice": 1}
    torch.testing.assert_close(bad["loss"], sum(w[k] * bad[k] for k in w))
    # nuclei-only data (every class unknown): NT learns background only; nucleus pixels get no NT gradient
    t0 = cellvit_targets(torch.from_numpy(inst)[None].long(), None)
    nuclei = torch.from_numpy(inst > 0)
    assert (t0["nt"][0][nuclei] == -100).all() and (t0["nt"][0][~nuclei] == 0).all()
    out = {k: v.clone().requires_grad_() for k, v in perfect.items()}
    res = cellvit_loss(out, t0, cfg)
    res["loss"].backward()
    assert (out["nt"].grad[0][:, nuclei] == 0).all() and (out["nt"].grad[0][:, ~nuclei] != 0).any()


def test_tissue_loss_ignores_unknown_tissues():
    cfg = CellViTConfig(num_tissues=3)
    inst, _ = two_discs()
    t = cellvit_targets(torch.from_numpy(inst)[None].long(), None)
    out = {"np": torch.zeros(1, 2, 64, 96), "hv": torch.zeros(1, 2, 64, 96), "nt": torch.zeros(1, 2, 64, 96),
           "tissue": torch.tensor([[5.0, 0.0, 0.0]])}
    assert cellvit_loss(out, t, cfg, torch.tensor([0]))["tissue"] < 0.02
    assert cellvit_loss(out, t, cfg, torch.tensor([1]))["tissue"] > 4.0
    assert cellvit_loss(out, t, cfg, torch.tensor([-100]))["tissue"] == 0
