"""karyo.models.segmentor (SAM architecture) and segmentor_train (PromptNucSeg prompts and loss)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from karyo.config import from_dict, to_dict
from karyo.errors import InputError
from karyo.models.segmentor import (
    DecodeOutput,
    Segmentor,
    SegmentorConfig,
    load_sam_checkpoint,
    masks_to_image,
    paste_masks,
    segmentor_config,
)
from karyo.models.segmentor_train import (
    BACKGROUND_ID,
    crop_targets,
    sample_background_prompts,
    sample_prompt_batch,
    sample_prompts,
    segmentor_loss,
)

# ------------------------------------------------------------------------------------------ official SAM layout


def official_sam_vit_b_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the official ``sam_vit_b_01ec64.pth``, written out from the published architecture
    (ViT-B/16 at 1024 px: width 768, 12 blocks, 12 heads of 64, 14×14 windows except blocks 2, 5, 8, 11; prompt
    width 256; two-way transformer depth 2, MLP 2048, 8 heads, attention downsample 2; mask_in_chans 16)."""
    k: dict[str, tuple[int, ...]] = {
        "image_encoder.pos_embed": (1, 64, 64, 768),
        "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "image_encoder.patch_embed.proj.bias": (768,),
    }
    for i in range(12):
        p = f"image_encoder.blocks.{i}."
        rel = 127 if i in (2, 5, 8, 11) else 27  # 2·64−1 for global blocks, 2·14−1 for windowed ones
        k.update({
            p + "norm1.weight": (768,), p + "norm1.bias": (768,),
            p + "attn.rel_pos_h": (rel, 64), p + "attn.rel_pos_w": (rel, 64),
            p + "attn.qkv.weight": (2304, 768), p + "attn.qkv.bias": (2304,),
            p + "attn.proj.weight": (768, 768), p + "attn.proj.bias": (768,),
            p + "norm2.weight": (768,), p + "norm2.bias": (768,),
            p + "mlp.lin1.weight": (3072, 768), p + "mlp.lin1.bias": (3072,),
            p + "mlp.lin2.weight": (768, 3072), p + "mlp.lin2.bias": (768,),
        })
    k.update({
        "image_encoder.neck.0.weight": (256, 768, 1, 1),
        "image_encoder.neck.1.weight": (256,), "image_encoder.neck.1.bias": (256,),
        "image_encoder.neck.2.weight": (256, 256, 3, 3),
        "image_encoder.neck.3.weight": (256,), "image_encoder.neck.3.bias": (256,),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
        "prompt_encoder.point_embeddings.0.weight": (1, 256),
        "prompt_encoder.point_embeddings.1.weight": (1, 256),
        "prompt_encoder.point_embeddings.2.weight": (1, 256),
        "prompt_encoder.point_embeddings.3.weight": (1, 256),
        "prompt_encoder.not_a_point_embed.weight": (1, 256),
        "prompt_encoder.mask_downscaling.0.weight": (4, 1, 2, 2), "prompt_encoder.mask_downscaling.0.bias": (4,),
        "prompt_encoder.mask_downscaling.1.weight": (4,), "prompt_encoder.mask_downscaling.1.bias": (4,),
        "prompt_encoder.mask_downscaling.3.weight": (16, 4, 2, 2), "prompt_encoder.mask_downscaling.3.bias": (16,),
        "prompt_encoder.mask_downscaling.4.weight": (16,), "prompt_encoder.mask_downscaling.4.bias": (16,),
        "prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
        "prompt_encoder.mask_downscaling.6.bias": (256,),
        "prompt_encoder.no_mask_embed.weight": (1, 256),
    })

    def attention(prefix: str, internal: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            k[f"{prefix}.{proj}.weight"] = (internal, 256)
            k[f"{prefix}.{proj}.bias"] = (internal,)
        k[f"{prefix}.out_proj.weight"] = (256, internal)
        k[f"{prefix}.out_proj.bias"] = (256,)

    for i in range(2):
        p = f"mask_decoder.transformer.layers.{i}"
        attention(p + ".self_attn", 256)
        attention(p + ".cross_attn_token_to_image", 128)
        attention(p + ".cross_attn_image_to_token", 128)
        for n in range(1, 5):
            k[f"{p}.norm{n}.weight"] = (256,)
            k[f"{p}.norm{n}.bias"] = (256,)
        k.update({f"{p}.mlp.lin1.weight": (2048, 256), f"{p}.mlp.lin1.bias": (2048,),
                  f"{p}.mlp.lin2.weight": (256, 2048), f"{p}.mlp.lin2.bias": (256,)})
    attention("mask_decoder.transformer.final_attn_token_to_image", 128)
    k.update({
        "mask_decoder.transformer.norm_final_attn.weight": (256,),
        "mask_decoder.transformer.norm_final_attn.bias": (256,),
        "mask_decoder.iou_token.weight": (1, 256),
        "mask_decoder.mask_tokens.weight": (4, 256),
        "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2), "mask_decoder.output_upscaling.0.bias": (64,),
        "mask_decoder.output_upscaling.1.weight": (64,), "mask_decoder.output_upscaling.1.bias": (64,),
        "mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2), "mask_decoder.output_upscaling.3.bias": (32,),
    })
    for i in range(4):
        p = f"mask_decoder.output_hypernetworks_mlps.{i}.layers"
        k.update({f"{p}.0.weight": (256, 256), f"{p}.0.bias": (256,), f"{p}.1.weight": (256, 256),
                  f"{p}.1.bias": (256,), f"{p}.2.weight": (32, 256), f"{p}.2.bias": (32,)})
    p = "mask_decoder.iou_prediction_head.layers"
    k.update({f"{p}.0.weight": (256, 256), f"{p}.0.bias": (256,), f"{p}.1.weight": (256, 256),
              f"{p}.1.bias": (256,), f"{p}.2.weight": (4, 256), f"{p}.2.bias": (4,)})
    return k


def test_vit_b_state_dict_is_the_official_sam_layout(tmp_path):
    official = official_sam_vit_b_keys()
    assert len(official) == 314
    buffers = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"}
    n_params = sum(int(np.prod(s)) for k, s in official.items() if k not in buffers)
    assert n_params == 93_735_472  # SAM ViT-B's parameter count (93.7M)
    with torch.device("meta"):  # layout only: no memory, no initialisation cost
        model = Segmentor(segmentor_config("vit_b"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(official), (sorted(set(ours) - set(official)), sorted(set(official) - set(ours)))
    assert ours == official
    assert "pixel_mean" not in ours and "pixel_std" not in ours

    g = torch.Generator().manual_seed(0)
    checkpoint = {key: torch.randn(shape, generator=g) for key, shape in official.items()}
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(checkpoint, path)
    model = model.to_empty(device="cpu")
    report = load_sam_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    loaded = model.state_dict()
    for key, value in checkpoint.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize(("name", "dim", "depth", "head_dim", "global_idx"), [
    ("vit_l", 1024, 24, 64, (5, 11, 17, 23)),
    ("vit_h", 1280, 32, 80, (7, 15, 23, 31)),
])
def test_vit_l_and_vit_h_shapes_follow_the_official_checkpoints(name, dim, depth, head_dim, global_idx):
    cfg = segmentor_config(name)
    enc = cfg.encoder
    assert (enc.embed_dim, enc.depth, enc.embed_dim // enc.num_heads, enc.global_attn_indexes) == \
        (dim, depth, head_dim, global_idx)
    assert (enc.img_size, enc.patch_size, enc.window_size, cfg.prompt_dim) == (1024, 16, 14, 256)
    with torch.device("meta"):  # shapes only, nothing allocated
        sd = {k: tuple(v.shape) for k, v in Segmentor(cfg).state_dict().items()}
    assert sd["image_encoder.pos_embed"] == (1, 64, 64, dim)
    assert sd["image_encoder.patch_embed.proj.weight"] == (dim, 3, 16, 16)
    assert sd[f"image_encoder.blocks.{global_idx[-1]}.attn.rel_pos_h"] == (127, head_dim)
    assert sd["image_encoder.blocks.0.attn.rel_pos_w"] == (27, head_dim)
    assert sd[f"image_encoder.blocks.{depth - 1}.attn.qkv.weight"] == (3 * dim, dim)
    assert sd[f"image_encoder.blocks.{depth - 1}.mlp.lin1.weight"] == (4 * dim, dim)
    assert f"image_encoder.blocks.{depth}.norm1.weight" not in sd
    assert sd["image_encoder.neck.0.weight"] == (256, dim, 1, 1)
    assert sd["mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight"] == (128, 256)
    assert len(sd) == 3 + 14 * depth + 6 + 17 + 120


def test_load_sam_checkpoint_reports_shape_mismatch_by_key(tmp_path):
    torch.manual_seed(0)
    model = Segmentor(segmentor_config("tiny"))
    sd = model.state_dict()
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(sd, tmp_path / "ckpt.pth")
    with pytest.raises(InputError, match=r"ckpt\.pth: mask_decoder\.iou_token\.weight: checkpoint shape \(1, 7\)"):
        load_sam_checkpoint(model, tmp_path / "ckpt.pth")
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, tmp_path / "ckpt.pth")
    with pytest.raises(InputError, match="missing"):
        load_sam_checkpoint(model, tmp_path / "ckpt.pth")
    assert load_sam_checkpoint(model, tmp_path / "ckpt.pth", strict=False).missing == \
        ["mask_decoder.iou_token.weight"]


# -------------------------------------------------------------------------------------------- config and shapes


def test_config_json_round_trip_and_presets():
    cfg = segmentor_config("small")
    data = json.loads(json.dumps(to_dict(cfg)))
    again = from_dict(SegmentorConfig, data)
    assert again == cfg and isinstance(again.encoder.global_attn_indexes, tuple)
    assert (cfg.encoder.patch_embed, cfg.encoder.patch_size, cfg.encoder.embed_dim, cfg.prompt_dim) == \
        ("stem", 8, 192, 128)
    with pytest.raises(ValueError, match="in_chans"):
        SegmentorConfig(in_chans=1)
    with pytest.raises(ValueError, match="unknown segmentor preset"):
        segmentor_config("vit_x")


def test_small_preset_shapes():
    torch.manual_seed(0)
    model = Segmentor(segmentor_config("small")).eval()
    assert model.stride_out == 2 and model.patch_size == 8
    with torch.no_grad():
        emb = model.embed(torch.randn(1, 3, 256, 256))
        assert emb.shape == (1, 128, 32, 32)
        pts = torch.tensor([[[100.0, 120.0], [130.0, 120.0]]])
        out = model.decode(emb, torch.tensor([0]), pts, torch.tensor([[1, 0]]), multimask=True)
    assert out.mask_logits.shape == (1, 3, 48, 48) and out.iou_pred.shape == (1, 3)
    x0, y0, x1, y1 = out.window_xyxy[0].tolist()
    assert (x1 - x0, y1 - y0) == (96, 96) and x0 <= 100 < x1 and y0 <= 120 < y1


@pytest.fixture(scope="module")
def tiny() -> Segmentor:
    torch.manual_seed(0)
    model = Segmentor(segmentor_config("tiny")).eval()
    with torch.no_grad():  # SAM zero-initialises nothing here, but make every parameter clearly non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_embed_pads_to_a_multiple_of_the_patch(tiny):
    with torch.no_grad():
        emb = tiny.embed(torch.randn(2, 3, 60, 70))
    assert emb.shape == (2, 32, 8, 9)


def test_local_window_decode_equals_global_decode_when_the_window_spans_everything(tiny):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    pts = torch.tensor([[[10.0, 12.0], [30.0, 12.0]], [[50.0, 40.0], [0.0, 0.0]], [[33.0, 60.0], [20, 50]]])
    lab = torch.tensor([[1, 0], [1, -1], [1, 0]])
    idx = torch.tensor([0, 1, 1])
    covering = Segmentor(dataclasses.replace(tiny.config, decode_window=8)).eval()  # 8×8-token embedding
    whole = Segmentor(dataclasses.replace(tiny.config, decode_window=0)).eval()
    covering.load_state_dict(tiny.state_dict())
    whole.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        emb = tiny.embed(images)
        a = covering.decode(emb, idx, pts, lab, multimask=True)
        b = whole.decode(emb, idx, pts, lab, multimask=True)
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.iou_pred, b.iou_pred)
    assert a.window_xyxy.tolist() == b.window_xyxy.tolist() == [[0, 0, 64, 64]] * 3
    assert a.mask_logits.shape == (3, 3, 32, 32) and a.stride_out == 2


def test_local_window_decode_equals_decoding_the_cropped_embedding(tiny):
    """A 6×6-token window must be exactly SAM's decoder run on that crop with the PE at the crop's positions."""
    torch.manual_seed(2)
    with torch.no_grad():
        emb = tiny.embed(torch.randn(2, 3, 64, 64))
        pts = torch.tensor([[[5.0, 60.0], [20.0, 50.0]], [[40.0, 30.0], [45.0, 30.0]]])
        lab = torch.tensor([[1, 0], [0, 1]])  # second prompt: the positive point comes second
        out = tiny.decode(emb, torch.tensor([0, 1]), pts, lab)
        assert out.window_xyxy.tolist() == [[0, 16, 48, 64], [16, 8, 64, 56]]  # clamped; centred on (45, 30)
        pe = tiny.prompt_encoder.dense_pe(8, 8)
        sparse = tiny.prompt_encoder.embed_points(pts, lab, (64, 64))
        dense = tiny.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        for i, (x0, y0, x1, y1) in enumerate((out.window_xyxy // 8).tolist()):
            src = emb[i:i + 1, :, y0:y1, x0:x1] + dense
            masks, iou = tiny.mask_decoder(src, pe[None, :, y0:y1, x0:x1], sparse[i:i + 1])
            torch.testing.assert_close(out.mask_logits[i], masks[0, :1])
            torch.testing.assert_close(out.iou_pred[i], iou[0, :1])


def test_detail_branch_starts_from_the_masks_of_weights_without_it(tiny):
    """Warm-started from a segmentor without the branch, the zero-initialised fusion leaves every output as it was."""
    from karyo.train.loop import load_init_state

    detailed = Segmentor(dataclasses.replace(tiny.config, detail_dim=4)).eval()
    load_init_state(detailed, tiny.state_dict(), "tiny.pt")
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 64)
    pts = torch.tensor([[[10.0, 12.0], [30.0, 12.0]], [[50.0, 40.0], [0.0, 0.0]]])
    lab = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        emb = detailed.embed(images)
        a, b = tiny(images, torch.tensor([0, 1]), pts, lab), detailed(images, torch.tensor([0, 1]), pts, lab)
    assert emb.shape == (2, 32 + 4 * 16, 8, 8)  # 4 channels of 4×4 detail pixels per token
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.iou_pred, b.iou_pred)
    with pytest.raises(InputError, match="missing"):  # anything else missing is still refused
        load_init_state(detailed, {k: v for k, v in tiny.state_dict().items() if "iou_token" not in k}, "tiny.pt")
    with pytest.raises(ValueError, match="detail_dim"):
        dataclasses.replace(tiny.config, detail_dim=-1)


def test_detail_branch_decodes_each_window_with_the_detail_under_it(tiny):
    """The detail folded into the embedding's channels must come back, per window, as the detail map's own pixels."""
    torch.manual_seed(5)
    model = Segmentor(dataclasses.replace(tiny.config, detail_dim=4)).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)  # fusion no longer zero
        images = torch.randn(2, 3, 64, 64)
        pts = torch.tensor([[[5.0, 60.0], [20.0, 50.0]], [[40.0, 30.0], [45.0, 30.0]]])
        lab = torch.tensor([[1, 0], [0, 1]])
        out = model.decode(model.embed(images), torch.tensor([0, 1]), pts, lab)
        vit = model.image_encoder(images)
        detail = model.detail_encoder(images)  # stride 2: 32×32 for 64×64 pixels
        pe = model.prompt_encoder.dense_pe(8, 8)
        sparse = model.prompt_encoder.embed_points(pts, lab, (64, 64))
        dense = model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        for i, (x0, y0, x1, y1) in enumerate(out.window_xyxy.tolist()):
            t = slice(y0 // 8, y1 // 8), slice(x0 // 8, x1 // 8)
            masks, _ = model.mask_decoder(vit[i:i + 1, :, t[0], t[1]] + dense, pe[None, :, t[0], t[1]],
                                          sparse[i:i + 1], detail[i:i + 1, :, y0 // 2:y1 // 2, x0 // 2:x1 // 2])
            torch.testing.assert_close(out.mask_logits[i], masks[0, :1])
        plain = tiny.decode(tiny.embed(images), torch.tensor([0, 1]), pts, lab)
        skipped = model.decode(model.embed(images), torch.tensor([0, 1]), pts, lab, detail=False)
        torch.nn.init.zeros_(model.mask_decoder.detail_fuse.weight)
        torch.nn.init.zeros_(model.mask_decoder.detail_fuse.bias)
        zero_fusion = model.decode(model.embed(images), torch.tensor([0, 1]), pts, lab)
    assert not torch.allclose(out.mask_logits, plain.mask_logits)
    assert not torch.allclose(out.mask_logits, skipped.mask_logits)
    torch.testing.assert_close(skipped.mask_logits, zero_fusion.mask_logits)  # detail=False: no fusion at all
    torch.testing.assert_close(skipped.iou_pred, zero_fusion.iou_pred)


def test_detail_branch_trains(one_thread):
    """Gradients reach the zero-initialised fusion at once and the detail stem after one step."""
    torch.manual_seed(6)
    model = Segmentor(segmentor_config("tiny", detail_dim=4))
    inst = _discs((64, 64), [(20, 20), (40, 40)], 6)
    image = torch.randn(1, 3, 64, 64)
    points, labels, ids = (torch.from_numpy(a) for a in sample_prompts(inst, z=2, k_neg=1, jitter_px=0.0, rng=0))
    idx = torch.zeros(len(ids), dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(2):
        out = model(image, idx, points, labels)
        target = crop_targets(torch.from_numpy(inst)[None].long(), idx, ids, out.window_xyxy, out.stride_out)
        opt.zero_grad()
        segmentor_loss(out.mask_logits, target, out.iou_pred)["loss"].backward()
        grads.append((model.mask_decoder.detail_fuse.weight.grad.abs().sum().item(),
                      model.detail_encoder[0].weight.grad.abs().sum().item()))
        opt.step()
    assert grads[0][0] > 0 and grads[0][1] == 0  # fusion weights zero: no gradient through them yet
    assert grads[1][1] > 0


def test_prompts_of_several_images_decode_in_one_batch(tiny):
    torch.manual_seed(3)
    with torch.no_grad():
        emb = tiny.embed(torch.randn(3, 3, 64, 64))
        pts = torch.tensor([[[20.0, 20.0]], [[40.0, 44.0]], [[8.0, 50.0]]])
        lab = torch.ones(3, 1, dtype=torch.long)
        together = tiny.decode(emb, torch.tensor([2, 0, 2]), pts, lab)
        alone = tiny.decode(emb[2:3], torch.tensor([0]), pts[2:3], lab[2:3])
        other = tiny.decode(emb[1:2], torch.tensor([0]), pts[2:3], lab[2:3])
    torch.testing.assert_close(together.mask_logits[2], alone.mask_logits[0])
    assert not torch.allclose(together.mask_logits[2], other.mask_logits[0])


def test_prompt_encoder_semantics(tiny):
    pe = tiny.prompt_encoder
    pts = torch.tensor([[[11.5, 3.0], [11.5, 3.0], [11.5, 3.0]]])
    emb = pe.embed_points(pts, torch.tensor([[1, 0, -1]]), (64, 64))
    assert emb.shape == (1, 4, 32)  # SAM appends one padding token when there are no boxes
    torch.testing.assert_close(emb[0, 2], pe.not_a_point_embed.weight[0])
    torch.testing.assert_close(emb[0, 3], pe.not_a_point_embed.weight[0])
    pos_minus_neg = pe.point_embeddings[1].weight[0] - pe.point_embeddings[0].weight[0]
    torch.testing.assert_close(emb[0, 0] - emb[0, 1], pos_minus_neg)
    # a point at a token centre gets exactly the dense encoding of that token (pixel x = (j + 0.5)·p − 0.5)
    dense = pe.dense_pe(8, 8)
    centre = torch.tensor([[[5 * 8 + 3.5, 2 * 8 + 3.5]]])
    raw = pe.pe_layer.points(centre + 0.5, (64, 64))
    torch.testing.assert_close(raw[0, 0], dense[:, 2, 5])


def test_masks_to_image_upsamples_and_paste_crops_at_the_border():
    logits = torch.full((2, 1, 4, 4), -5.0)
    logits[0, 0, 1:3, 1:3] = 5.0
    logits[1, 0, 1, 1] = 5.0
    out = DecodeOutput(logits, torch.zeros(2, 1), torch.tensor([[4, 2, 12, 10], [-3, 6, 5, 14]]), stride_out=2)
    wm = masks_to_image(out, (12, 10))
    assert wm.masks.shape == (2, 1, 8, 8)
    full = paste_masks(wm, (12, 10))
    assert full.shape == (2, 1, 12, 10)
    fg = full[0, 0] > 0
    assert fg[4:8, 6:10].all() and fg.sum() == 16  # window logit pixels 1..2 → input pixels 2..5 + (4, 2) offset
    assert torch.isinf(full[0, 0, 0, 0]) and full[0, 0, 0, 0] < 0  # outside the window: no evidence
    fg1 = full[1, 0] > 0
    # logit (1, 1) → window pixels 2..3 → image x −1..0, y 8..9: the border crops x = −1 away
    assert fg1.sum() == 2 and fg1[8:10, 0].all()
    probs = paste_masks(masks_to_image(out, (12, 10), probabilities=True))  # shape remembered from masks_to_image
    assert probs.min() >= 0 and probs[0, 0, 0, 0] == 0 and probs.max() <= 1


# ---------------------------------------------------------------------------------------------- training utils


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, np.int32)
    for i, (cx, cy) in enumerate(centres, start=1):
        inst[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = i * 10  # ids need not be consecutive
    return inst


def test_sample_prompts_geometry():
    centres = [(20, 20), (40, 22), (22, 45), (90, 90)]
    inst = _discs((110, 110), centres, 6)
    # a C-shaped nucleus whose centroid lies outside it
    yy, xx = np.mgrid[:110, :110]
    ring = ((xx - 80) ** 2 + (yy - 30) ** 2 <= 12**2) & ((xx - 80) ** 2 + (yy - 30) ** 2 >= 8**2) & (xx < 88)
    inst[ring] = 77
    assert inst[30, 80] == 0
    points, labels, ids = sample_prompts(inst, z=25, k_neg=1, jitter_px=2.0, rng=0)
    assert points.shape == (5, 2, 2) and labels.shape == (5, 2) and sorted(ids.tolist()) == [10, 20, 30, 40, 77]
    centroid = {i: (float(xx[inst == i].mean()), float(yy[inst == i].mean())) for i in ids.tolist()}
    for pts, (lp, ln), nid in zip(points, labels, ids, strict=True):
        px, py = pts[0]
        assert lp == 1
        assert inst[int(np.floor(py + 0.5)), int(np.floor(px + 0.5))] == nid  # the positive lies in its nucleus
        if nid != 77:
            assert abs(px - centroid[nid][0]) <= 2 and abs(py - centroid[nid][1]) <= 2  # jitter ≤ 2 px
        others = {i: np.hypot(c[0] - centroid[nid][0], c[1] - centroid[nid][1]) for i, c in centroid.items()
                  if i != nid}
        nearest = min(others, key=others.get)
        assert ln == 0
        if nearest != 77:
            np.testing.assert_allclose(points[list(ids).index(nid), 1], centroid[nearest], atol=1e-4)
    # deterministic given the generator; z smaller than the number of nuclei samples without replacement
    again = sample_prompts(inst, z=25, k_neg=1, jitter_px=2.0, rng=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (points, labels, ids), strict=True))
    p3, _, ids3 = sample_prompts(inst, z=3, rng=1)
    assert len(set(ids3.tolist())) == 3 and p3.shape == (3, 2, 2)


def test_sample_prompts_pads_when_no_neighbour_exists():
    inst = _discs((40, 40), [(20, 20)], 5)
    points, labels, ids = sample_prompts(inst, z=25, k_neg=2, jitter_px=0.0, rng=0)
    assert ids.tolist() == [10] and labels.tolist() == [[1, -1, -1]]
    np.testing.assert_allclose(points[0, 0], (20, 20))
    empty = sample_prompts(np.zeros((8, 8), np.int32), z=25, k_neg=1)
    assert empty[0].shape == (0, 2, 2) and empty[1].shape == (0, 2) and empty[2].shape == (0,)
    batch = sample_prompt_batch(np.stack([inst, np.zeros_like(inst), inst]), z=5, rng=0)
    assert batch.image_index.tolist() == [0, 2] and batch.points.dtype == torch.float32


GRID_CENTRES = [(12 + 16 * i, 12 + 16 * j) for i in range(6) for j in range(6)]


def _prompts_when_off(inst: np.ndarray, jitter_px: float, **off) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompts of a 36-nucleus grid; an option set to its off value must replay the plain random stream."""
    plain = sample_prompts(inst, z=36, k_neg=1, jitter_px=jitter_px, rng=3)
    same = sample_prompts(inst, z=36, k_neg=1, jitter_px=jitter_px, rng=3, **off)
    assert all(np.array_equal(a, b) for a, b in zip(plain, same, strict=True))
    return plain


def test_negative_dropout_trains_some_prompts_without_negatives():
    inst = _discs((104, 104), GRID_CENTRES, 5)
    plain = _prompts_when_off(inst, 1.0, negative_dropout=0.0)
    assert (plain[1][:, 1] == 0).all()
    points, labels, _ = sample_prompts(inst, z=36, k_neg=1, jitter_px=1.0, rng=3, negative_dropout=0.5)
    dropped = labels[:, 1] == -1
    assert 8 <= dropped.sum() <= 28 and (labels[:, 0] == 1).all()
    assert (points[dropped, 1] == 0).all()  # padding points sit at (0, 0), as for a missing neighbour
    assert (sample_prompts(inst, z=36, rng=0, negative_dropout=1.0)[1][:, 1] == -1).all()
    with pytest.raises(ValueError, match="negative_dropout"):
        sample_prompts(inst, negative_dropout=1.5)


def test_inside_share_draws_positives_anywhere_in_the_nucleus():
    centres = GRID_CENTRES
    inst = _discs((104, 104), centres, 6)
    plain = _prompts_when_off(inst, 0.0, inside_share=0.0)
    points, _, ids = sample_prompts(inst, z=36, k_neg=1, jitter_px=0.0, rng=3, inside_share=1.0)
    xy = points[:, 0]
    assert (inst[xy[:, 1].astype(int), xy[:, 0].astype(int)] == ids).all()  # on its own nucleus
    centre = np.array([centres[i // 10 - 1] for i in ids], np.float32)
    offset = np.linalg.norm(xy - centre, axis=1)
    assert (np.linalg.norm(plain[0][:, 0] - np.array([centres[i // 10 - 1] for i in plain[2]]), axis=1) < 1e-4).all()
    assert 2.5 < offset.mean() < 5.5 and offset.max() > 4.5  # uniform on a radius-6 disc: mean distance 4
    with pytest.raises(ValueError, match="inside_share"):
        sample_prompts(inst, inside_share=1.5)


def test_background_prompts_lie_away_from_nuclei_with_nearest_negatives():
    inst = _discs((80, 80), [(20, 20), (60, 20), (40, 60)], 6)
    intensity = -np.mgrid[:80, :80][0].astype(float)  # darker towards the bottom
    points, labels, ids = sample_background_prompts(inst, 10, k_neg=2, rng=0, intensity=intensity, margin_px=4)
    assert points.shape == (10, 3, 2) and (ids == BACKGROUND_ID).all() and (labels[:, 0] == 1).all()
    ny, nx = np.nonzero(inst)
    for (x, y), negs in zip(points[:, 0], points[:, 1:], strict=True):
        assert ((nx - x) ** 2 + (ny - y) ** 2).min() >= 4**2  # margin_px from every nucleus pixel
        dist = {c: (x - c[0]) ** 2 + (y - c[1]) ** 2 for c in [(20, 20), (60, 20), (40, 60)]}
        assert [tuple(n) for n in negs.tolist()] == sorted(dist, key=dist.get)[:2]  # the two nearest nuclei
    assert (points[:, 0, 1] >= 70).sum() >= 5  # half from the darkest tenth of the ~5,600 eligible pixels
    # nothing eligible, no nuclei, none asked
    assert len(sample_background_prompts(np.ones((10, 10), np.int32), 5)[0]) == 0
    empty = sample_background_prompts(np.zeros((10, 10), np.int32), 5, k_neg=1, rng=0)
    assert len(empty[0]) == 5 and (empty[1][:, 1] == -1).all()
    assert sample_background_prompts(inst, 0)[0].shape == (0, 2, 2)
    with pytest.raises(ValueError, match="intensity"):
        sample_background_prompts(inst, 3, intensity=np.ones((5, 5)))


def test_prompt_batch_with_background_keeps_the_nucleus_stream_and_gets_empty_targets():
    inst = _discs((64, 64), [(16, 16), (44, 40)], 6)
    plain = sample_prompt_batch(np.stack([inst, inst]), z=5, rng=1)
    mixed = sample_prompt_batch(np.stack([inst, inst]), z=5, rng=1, background=3)
    assert len(mixed.instance_ids) == len(plain.instance_ids) + 6
    torch.testing.assert_close(mixed.points[:2], plain.points[:2])  # image 0's nucleus prompts come first
    assert (mixed.instance_ids == BACKGROUND_ID).tolist() == [False] * 2 + [True] * 3 + [False] * 2 + [True] * 3
    assert mixed.image_index.tolist() == [0] * 5 + [1] * 5
    windows = torch.tensor([[0, 0, 16, 16]] * len(mixed.instance_ids))
    target = crop_targets(torch.from_numpy(inst)[None].expand(2, -1, -1), mixed.image_index, mixed.instance_ids,
                          windows, 2)
    background = mixed.instance_ids == BACKGROUND_ID
    assert target[background].sum() == 0 and target[~background].sum() > 0


def test_background_prompts_teach_an_empty_mask_and_a_low_iou(one_thread):
    """Overfit the tiny preset on four discs with nucleus prompts plus background prompts: a prompt on the
    background must then give (almost) no mask and a lower predicted IoU than a prompt on a disc, while disc
    prompts still segment their disc."""
    torch.manual_seed(0)
    centres = [(16, 16), (44, 18), (18, 46), (46, 44)]
    inst = _discs((64, 64), centres, 7)
    grey = np.where(inst > 0, 200.0, 60.0)
    model = Segmentor(segmentor_config("tiny"))
    image = model.normalize(torch.tensor(np.stack([grey, grey * 0.8, grey * 0.9]), dtype=torch.float32)[None])
    inst_t = torch.from_numpy(inst)[None].long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(120):
        pb = sample_prompt_batch(inst[None], z=4, k_neg=1, jitter_px=1.0, rng=step, background=4)
        out = model(image, pb.image_index, pb.points, pb.labels)
        target = crop_targets(inst_t, pb.image_index, pb.instance_ids, out.window_xyxy, out.stride_out)
        loss = segmentor_loss(out.mask_logits, target, out.iou_pred)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    points = torch.tensor([[[16.0, 16.0], [44.0, 18.0]], [[31.0, 31.0], [16.0, 16.0]], [[4.0, 60.0], [18.0, 46.0]]])
    labels = torch.tensor([[1, 0], [1, 0], [1, 0]])
    with torch.no_grad():
        out = model(image, torch.zeros(3, dtype=torch.long), points, labels)
    masks = paste_masks(masks_to_image(out, (64, 64)), (64, 64))[:, 0] > model.config.mask_threshold
    disc = torch.from_numpy(inst == inst[16, 16])
    assert (masks[0] & disc).sum() / (masks[0] | disc).sum() > 0.7
    assert masks[1].sum() < 0.1 * disc.sum() and masks[2].sum() < 0.1 * disc.sum()
    assert out.iou_pred[1:, 0].max() < 0.5 < out.iou_pred[0, 0]


def test_crop_targets_area_downsamples_inside_the_window():
    inst = torch.zeros(1, 16, 16, dtype=torch.int64)
    inst[0, 4:8, 6:12] = 3
    inst[0, 0:2, 0:2] = 5
    target = crop_targets(inst, torch.tensor([0, 0]), torch.tensor([3, 5]),
                          torch.tensor([[4, 2, 12, 10], [-4, -4, 4, 4]]), stride_out=2)
    assert target.shape == (2, 4, 4)
    expected = torch.zeros(4, 4)
    expected[1:3, 1:4] = 1  # rows 4..7 → 1..2, cols 6..11 → 1..3 of the (x0=4, y0=2) window
    torch.testing.assert_close(target[0], expected)
    expected = torch.zeros(4, 4)
    expected[2, 2] = 1  # the window starts 4 px before the image: nucleus 5 (pixels 0..1) is logit pixel (2, 2)
    torch.testing.assert_close(target[1], expected)
    half = torch.zeros(1, 4, 4, dtype=torch.int64)
    half[0, 0, 0:2] = 1  # 2 of the 4 pixels of logit pixel (0, 0): ≥ 0.5 → foreground
    half[0, 2, 2] = 1  # 1 of 4 → background
    t = crop_targets(half, torch.tensor([0]), torch.tensor([1]), torch.tensor([[0, 0, 4, 4]]), 2)
    assert t[0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_segmentor_loss_values():
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    good = (target * 2 - 1)[:, None] * 20
    perfect = segmentor_loss(good, target, torch.ones(2, 1))
    assert perfect["focal"] < 1e-6 and perfect["dice"] < 0.02 and perfect["iou"] == 0
    bad = segmentor_loss(-good, target, torch.ones(2, 1))
    assert bad["dice"] > 0.95 and bad["iou"] == 1.0  # predicted IoU 1, actual IoU 0
    assert bad["loss"] > 20 * bad["focal"]
    torch.testing.assert_close(bad["loss"], 20 * bad["focal"] + bad["dice"] + bad["iou"])
    # multimask: only the best of the M masks gets the mask loss; the IoU head is trained on all of them
    multi = segmentor_loss(torch.cat([-good, good], dim=1), target, torch.tensor([[0.0, 1.0]] * 2))
    assert multi["focal"] < 1e-6 and multi["iou"] == 0
    # gradients flow to the logits and the IoU prediction
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    iou = torch.full((2, 1), 0.5, requires_grad=True)
    segmentor_loss(logits, target, iou)["loss"].backward()
    assert logits.grad.abs().sum() > 0 and iou.grad.abs().sum() > 0
    empty = segmentor_loss(torch.zeros(0, 1, 4, 4), torch.zeros(0, 4, 4), torch.zeros(0, 1))
    assert empty["loss"] == 0
    # a background prompt (empty target): an empty mask is right, and the IoU head must say 0, not 1
    nothing = segmentor_loss(-torch.full((1, 1, 8, 8), 20.0), torch.zeros(1, 8, 8), torch.zeros(1, 1))
    assert nothing["iou"] == 0 and nothing["focal"] < 1e-6 and nothing["dice"] == 0
    confident = segmentor_loss(-torch.full((1, 1, 8, 8), 20.0), torch.zeros(1, 8, 8), torch.ones(1, 1))
    assert confident["iou"] == 1.0
    blob = segmentor_loss(torch.full((1, 1, 8, 8), 20.0), torch.zeros(1, 8, 8), torch.zeros(1, 1))
    assert blob["dice"] == 0 and blob["focal"] > 10  # no dice on an empty target: focal alone


def test_overfits_one_image_prompt_selects_its_nucleus(one_thread):
    """Train the tiny preset on one synthetic image (four discs) with positive + nearest-negative prompts: the
    prompt on a disc must then segment that disc and not its neighbour."""
    torch.manual_seed(0)
    h = w = 64
    centres = [(16, 16), (36, 18), (20, 44), (46, 44)]
    inst = _discs((h, w), centres, 7)
    grey = np.where(inst > 0, 200.0, 60.0)
    model = Segmentor(segmentor_config("tiny"))
    image = model.normalize(torch.tensor(np.stack([grey, grey * 0.8, grey * 0.9]), dtype=torch.float32)[None])
    points, labels, ids = sample_prompts(inst, z=25, k_neg=1, jitter_px=0.0, rng=0)
    order = np.argsort(ids)
    points, labels, ids = (torch.from_numpy(a[order]) for a in (points, labels, ids))
    idx = torch.zeros(len(ids), dtype=torch.long)
    inst_t = torch.from_numpy(inst)[None].long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        out = model(image, idx, points, labels)
        loss = segmentor_loss(out.mask_logits, crop_targets(inst_t, idx, ids, out.window_xyxy, out.stride_out),
                              out.iou_pred)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(image, idx[:2], points[:2], labels[:2])  # prompts on disc 10 (negative on 20) and vice versa
    masks = paste_masks(masks_to_image(out, (h, w)), (h, w))[:, 0] > model.config.mask_threshold
    for k, (own, neighbour) in enumerate([(10, 20), (20, 10)]):
        disc, other = torch.from_numpy(inst == own), torch.from_numpy(inst == neighbour)
        iou = (masks[k] & disc).sum() / (masks[k] | disc).sum()
        assert iou > 0.7, (k, float(iou))
        assert (masks[k] & other).sum() < 0.05 * other.sum()
