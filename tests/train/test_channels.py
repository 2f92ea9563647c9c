"""Channel adapters in training (``karyo train TASK --channels``): the helpers, and every adapter-capable task
trained on two-channel OME-TIFF data (CD45, DAPI) with an adapter for DAPI alone, then run on images by name."""

import json

import numpy as np
import pytest
import torch
import yaml

import karyo
from karyo.data.augment import AugmentConfig
from karyo.data.layout import LayoutDataset
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.models.cellvit import CellViTConfig
from karyo.models.monch import MONCHConfig
from karyo.models.prompter import PrompterConfig
from karyo.models.segmentor import segmentor_config
from karyo.models.unet import UNetConfig
from karyo.train.api import train
from karyo.train.channels import (
    adapt_training_data,
    channel_summary,
    fit_channel_stats,
    map_samples,
    mark_missing,
    parse_channels,
    with_adapter,
)
from karyo.train.pack import pack_promptnucseg

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_STEP = {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 1, "warmup_epochs": 0}
SMALL_AUG = {"crop_size": 64, "p_elastic": 0.0, "p_grid_shuffle": 0.0}


def _config(tmp_path, name: str, model: dict, **extra) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": model, "train": ONE_STEP, "augment": SMALL_AUG, "val_fraction": 0.34,
                                    **extra}))
    return str(path)


def test_parse_channels_and_mark_missing():
    assert parse_channels("8") == 8 and parse_channels(8) == 8 and parse_channels(None) is None
    assert parse_channels("DAPI, CD45") == ("DAPI", "CD45") and parse_channels(["DAPI"]) == ("DAPI",)
    with pytest.raises(InputError, match="channel count or comma-separated"):
        parse_channels(" , ")
    x = torch.zeros(2, 3, 2, 2)
    marked = mark_missing(x, np.array([[True, False, True], [True, True, True]]))
    assert torch.isnan(marked[0, 1]).all() and not torch.isnan(marked[1]).any() and not torch.isnan(marked[0, 0]).any()


@pytest.mark.parametrize("config", [PrompterConfig(), segmentor_config("tiny"), CellViTConfig(),
                                    MONCHConfig(num_classes=2)], ids=["prompter", "segmentor", "cellvit", "monch"])
def test_with_adapter_fits_every_adapter_network(config):
    aug = AugmentConfig(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), fallback_mean=0.25, fallback_std=0.125)
    cfg = with_adapter(config, ("DAPI", "CD45"), aug)
    assert cfg.adapter.channel_names == ("DAPI", "CD45") and cfg.adapter.in_channels == 2
    assert cfg.in_chans == 3 and cfg.adapter.out_channels == 3
    # the adapter normalises with the statistics the training data get (2 channels: the fallback), the backbone
    # input statistics are the 3-channel ones
    assert cfg.adapter.pixel_mean == (0.25, 0.25) and cfg.adapter.pixel_std == (0.125, 0.125)
    assert cfg.pixel_mean == (0.1, 0.2, 0.3)
    assert with_adapter(cfg, 4).adapter.in_channels == 4  # re-targeting keeps the adapter's other settings
    assert with_adapter(cfg, 4).adapter.hidden == cfg.adapter.hidden


def test_fit_channel_stats_per_channel_skipping_absent_channels():
    """Each channel's 1–99th percentile range (on the pipeline's [0, 1] scale) → [−1, 1]; a channel a sample lacks
    does not count, one no sample has keeps the fallback."""
    a = np.zeros((4, 4, 2), np.uint8)
    a[..., 0], a[:2, :, 1] = 51, 255  # channel 0 ≡ 0.2; channel 1: half 1.0, half 0.0
    b = np.full((4, 4, 2), 255, np.uint8)  # its channel 1 is marked absent (held 0/NaN by the mapping)
    samples = [Sample(image=a, instances=np.zeros((4, 4), np.int32)),
               Sample(image=b, instances=np.zeros((4, 4), np.int32))]
    fitted = fit_channel_stats(AugmentConfig(fit_stats=True), samples, np.array([[True, True], [True, False]]))
    np.testing.assert_allclose(fitted.mean, (0.6, 0.5))
    np.testing.assert_allclose(fitted.std, (0.4, 0.5))
    assert fitted.channel_stats(2) == (fitted.mean, fitted.std)
    lacking = fit_channel_stats(AugmentConfig(fit_stats=True, fallback_mean=0.25, fallback_std=0.125), samples,
                                np.array([[True, False], [True, False]]))
    assert lacking.mean[1] == 0.25 and lacking.std[1] == 0.125
    # 16-bit images scale by their dtype maximum, as prepare_image does
    c = Sample(image=np.full((4, 4, 2), 65535 // 5, np.uint16), instances=np.zeros((4, 4), np.int32))
    on = AugmentConfig(fit_stats=True)
    np.testing.assert_allclose(fit_channel_stats(on, [c]).mean, (0.2, 0.2), atol=1e-4)
    np.testing.assert_allclose(fit_channel_stats(on, [c]).std, (1e-3, 1e-3))  # floor, no 0 division
    # three channels with ImageNet's defaults are fitted too (behind an adapter they may be DAPI, CD45, PanCK)
    three = Sample(image=np.stack([np.full((4, 4), v, np.uint8) for v in (51, 102, 255)], -1),
                   instances=np.zeros((4, 4), np.int32))
    np.testing.assert_allclose(fit_channel_stats(on, [three]).mean, (0.2, 0.4, 1.0), atol=1e-6)
    # statistics the config chose, or fitting switched off: unchanged
    chosen = AugmentConfig(fit_stats=True, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    assert fit_channel_stats(chosen, [three]) == chosen
    assert fit_channel_stats(AugmentConfig(fit_stats=True, mean=(0.3,), std=(0.2,)), [three]).mean == (0.3,)
    assert fit_channel_stats(AugmentConfig(), samples) == AugmentConfig()  # off by default


def test_adapter_training_normalises_with_the_data_statistics(ome_layout):
    """With ``fit_stats`` the adapter (and the returned augmentation) carry the training data's statistics; without,
    the fallback as before."""
    samples = list(LayoutDataset(ome_layout, split="train"))
    cfg, aug, train_s, _ = adapt_training_data(PrompterConfig(), "DAPI", AugmentConfig(fit_stats=True), samples,
                                               samples[:1])
    assert train_s[0].image.shape[2] == 1
    dapi = np.concatenate([s.image[..., 1].ravel() for s in samples]) / 255.0
    lo, hi = np.percentile(dapi, (1, 99))
    np.testing.assert_allclose(cfg.adapter.pixel_mean, ((lo + hi) / 2,), rtol=1e-5)
    np.testing.assert_allclose(cfg.adapter.pixel_std, ((hi - lo) / 2,), rtol=1e-5)
    assert aug.channel_stats(1) == (cfg.adapter.pixel_mean, cfg.adapter.pixel_std)
    assert cfg.pixel_mean == AugmentConfig().mean  # the backbone's 3-channel statistics are untouched
    plain = adapt_training_data(PrompterConfig(), "DAPI", AugmentConfig(), samples, samples[:1])[0]
    assert plain.adapter.pixel_mean == (0.5,) and plain.adapter.pixel_std == (0.5,)


def test_map_samples_by_name_and_refuses_mismatched_data_without_adapter(ome_layout):
    samples = [s for s in LayoutDataset(ome_layout, split="train")]
    cfg = with_adapter(PrompterConfig(), ("DAPI",), AugmentConfig())
    mapped, present = map_samples(samples, cfg.adapter)
    assert mapped[0].image.shape[2] == 1 and present.all() and mapped[0].channel_names == ("DAPI",)
    np.testing.assert_array_equal(mapped[0].image[..., 0], samples[0].image[..., 1])  # DAPI is the 2nd channel
    with pytest.raises(InputError, match="has 2 channels, the model takes 3"):
        map_samples(samples, None, 3)
    # unnamed data cannot be matched to named adapter channels: refused, not pooled into every one of them
    gray = Sample(image=samples[0].image[..., 1:2], instances=samples[0].instances, name="gray_000")
    named = with_adapter(PrompterConfig(), ("DAPI", "CD45"), AugmentConfig())
    with pytest.raises(InputError, match=r"gray_000: its 1 channel\(s\) have no names.*--channels 1"):
        map_samples([gray], named.adapter)
    mapped, present = map_samples([gray], cfg.adapter)  # one unnamed channel for one named: taken by position
    assert present.all() and mapped[0].channel_names == ("DAPI",)


def test_channel_summary_says_how_the_training_images_meet_the_adapter(ome_layout):
    """What a run assumed about its images' channels, in one line: matched by name, by position, missing, pooled."""
    samples = [s for s in LayoutDataset(ome_layout, split="train")][:2]  # channels CD45, DAPI
    image = samples[0].image
    gray = Sample(image=image[..., 1:2], instances=samples[0].instances, name="gray_000")
    three = Sample(image=np.dstack([image, image[..., :1]]), instances=samples[0].instances, name="three_000")
    named = with_adapter(PrompterConfig(), ("DAPI", "Ki67"), AugmentConfig()).adapter
    assert channel_summary(named, samples) == ("channels: the network takes DAPI, Ki67 by name: 2 of 2 image(s) "
                                               "matched by name; 2 lack some (filled by the adapter's "
                                               f"'{named.missing}' rule); 2 have channels the network ignores")
    unnamed = with_adapter(PrompterConfig(), 2, AugmentConfig()).adapter
    assert channel_summary(unnamed, [*samples, gray, three]) == (
        "channels: the network takes 2 unnamed channel(s): 2 of 4 image(s) have exactly as many; 2 with 1/3 "
        "channel(s) pooled onto them (channel average)")


def test_prompter_and_segmentor_with_channels_pack_into_a_dapi_promptnucseg(ome_layout, tmp_path):
    """Both networks of PromptNucSeg take an adapter for the DAPI channel; the packed model segments OME-TIFF tiles
    whose channels come in another order (mapped by name)."""
    data = [f"{ome_layout}:train"]
    tiny_prompter = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "fpn_dim": 16, "head_hidden": 16,
                     "dropout": 0.0}
    said: list[str] = []
    train("prompter", data, tmp_path / "p", config=_config(tmp_path, "p", tiny_prompter), channels="DAPI",
          progress=False, on_split=said.append)
    n = len(LayoutDataset(ome_layout, split="train"))
    assert f"channels: the network takes DAPI by name: {n} of {n} image(s) matched by name; {n} have channels the " \
           "network ignores" in said
    train("segmentor", data, tmp_path / "s", config=_config(tmp_path, "s", {"preset": "tiny"},
                                                             settings={"nuclei_per_image": 4}),
          channels="DAPI", progress=False)
    for run, name in ((tmp_path / "p", "prompter"), (tmp_path / "s", "segmentor")):
        saved = json.loads((run / "train_config.json").read_text())
        assert saved["task"] == name and saved["model"]["adapter"]["channel_names"] == ["DAPI"]
    model = pack_promptnucseg(tmp_path / "p", tmp_path / "s", tmp_path / "model", tune=False)
    assert model.prompter.adapter is not None and model.segmentor.adapter is not None
    loaded = karyo.load(tmp_path / "model")
    sample = LayoutDataset(ome_layout, split="train")[0]
    assert sample.channel_names == ("CD45", "DAPI")
    result = loaded.segment(sample.image, channel_names=sample.channel_names)
    assert result.instances.shape == sample.image.shape[:2]
    # the same pixels with the channels swapped (named accordingly) are the same input to the networks
    swapped = loaded.segment(sample.image[..., ::-1].copy(), channel_names=("DAPI", "CD45"))
    np.testing.assert_array_equal(result.instances, swapped.instances)
    # resuming keeps the adapter from the saved config (no --channels needed)
    resumed = train("prompter", None, tmp_path / "p", resume=True, train_overrides={"epochs": 2}, progress=False)
    assert [r["epoch"] for r in resumed.history] == [0, 1]


def test_monch_with_channels_runs_semantic_segmentation_on_named_channels(ome_layout, tmp_path):
    encoder = dict(img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=True, pre_norm=True,
                   final_norm=True, act="quick_gelu", norm_eps=1e-5, patch_embed="stem")
    model_section = {"encoder": encoder, "dim": 32, "heads": 4, "decoder_channels": [16, 16], "detail_channels": 8}
    train("monch", [f"{ome_layout}:train"], tmp_path / "m", channels="DAPI", progress=False,
          config=_config(tmp_path, "m", model_section, settings={"text_encoder": "random"}))
    model = karyo.load(tmp_path / "m" / "model")
    assert model.config.adapter.channel_names == ("DAPI",) and model.config.num_classes == 4
    sample = LayoutDataset(ome_layout, split="train")[0]
    sem = model.segment_semantic(sample.image, channel_names=sample.channel_names)
    assert sem.probabilities.shape == (5, 64, 64) and sem.class_map.shape == (64, 64)
    assert sem.probabilities.min() >= 0.0 and sem.probabilities.max() <= 1.0  # per-class sigmoids (MONCH §3.4)
    swapped = model.segment_semantic(sample.image[..., ::-1].copy(), channel_names=("DAPI", "CD45"))
    np.testing.assert_array_equal(sem.probabilities, swapped.probabilities)


def test_channels_refused_where_no_adapter_fits(ome_layout, tmp_path):
    with pytest.raises(InputError, match="--channels applies to the prompter, segmentor, cellvit, monch"):
        train("ivaan", [f"{ome_layout}:train"], tmp_path / "i", channels="DAPI", progress=False)
    with pytest.raises(InputError, match="UNetConfig has none"):
        adapt_training_data(UNetConfig(), "DAPI", AugmentConfig(), [], [])
    with pytest.raises(InputError, match="not unet"):
        train("unet", [f"{ome_layout}:train"], tmp_path / "u", channels="DAPI", progress=False,
              config=_config(tmp_path, "u", {"width": 4, "depth": 3}))
    # a network without adapters is told to take the channels itself, not to use --channels it refuses
    with pytest.raises(InputError, match=r"has 2 channels, the model takes 3: set 'model: \{in_chans: 2\}'"):
        train("unet", [f"{ome_layout}:train"], tmp_path / "u", progress=False,
              config=_config(tmp_path, "u", {"width": 4, "depth": 3}))
    train("unet", [f"{ome_layout}:train"], tmp_path / "u2", progress=False,  # and the hint works
          config=_config(tmp_path, "u2", {"width": 4, "depth": 3, "in_chans": 2}))
    assert (tmp_path / "u2" / "best.pt").is_file()
    with pytest.raises(InputError, match="has 2 channels, the model takes 3: give it a channel adapter"):
        train("prompter", [f"{ome_layout}:train"], tmp_path / "p", progress=False,
              config=_config(tmp_path, "p", {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "fpn_dim": 16,
                                              "head_hidden": 16}))


def test_the_shipped_rgb_model_is_fine_tuned_behind_a_new_channel_adapter(ome_layout, tmp_path, caplog):
    """--init default --channels DAPI: the adapter starts afresh, the network behind it keeps the shipped weights
    (it was refused: the weights have no adapter)."""
    import logging

    from karyo.train.api import init_weights

    with caplog.at_level(logging.WARNING):
        train("segmentor", [f"{ome_layout}:train"], tmp_path / "s", channels="DAPI", init="default",
              config=_config(tmp_path, "s", {}, settings={"nuclei_per_image": 4}), progress=False)
    assert "the weights have no channel adapter (a network for RGB); the channel adapter starts afresh" in caplog.text
    trained = torch.load(tmp_path / "s" / "model" / "segmentor.pt", map_location="cpu", weights_only=True)
    shipped = init_weights("segmentor", "default")
    assert any(k.startswith("adapter.") for k in trained) and not any(k.startswith("adapter.") for k in shipped)
    key = next(k for k in shipped if k.startswith("image_encoder") and shipped[k].ndim == 4)
    assert torch.allclose(trained[key].float(), shipped[key].float(), atol=0.05)  # fine-tuned one step, not new


def test_pack_refuses_networks_for_other_channels_and_untuned_keeps_the_init_models_settings(ome_layout, tmp_path):
    from karyo.errors import InputError
    from karyo.models.registry import load

    data = [f"{ome_layout}:train"]
    train("prompter", data, tmp_path / "p", channels="DAPI", init="default",
          config=_config(tmp_path, "p", {}), progress=False)
    with pytest.raises(InputError, match=r"default: takes RGB \(no channel adapter\), the prompter DAPI: pack a "
                                         r"prompter and a segmentor trained with the same --channels"):
        pack_promptnucseg(tmp_path / "p", "default", tmp_path / "never", tune=False)
    assert not (tmp_path / "never").exists()
    train("segmentor", data, tmp_path / "s", channels="DAPI", init="default",
          config=_config(tmp_path, "s", {}, settings={"nuclei_per_image": 4}), progress=False)
    said: list[str] = []
    model = pack_promptnucseg(tmp_path / "p", tmp_path / "s", tmp_path / "m", tune=False, log=said.append)
    shipped = load("default").config
    assert (model.config.score_threshold, model.config.nms_radius_px, model.config.refine_points) == (
        shipped.score_threshold, shipped.nms_radius_px, shipped.refine_points)
    assert model.config.verifier is None and model.config.min_verified is None
    assert any("the inference settings of default, the model the prompter started from" in m for m in said)


def test_pack_names_networks_for_the_same_channels_normalised_otherwise():
    """The rule PromptNucSegConfig enforces (adapters_agree) includes the pixel statistics: a pack of such networks
    is one line naming the segmentor, not the config's ValueError."""
    import dataclasses as dc

    from karyo.errors import InputError
    from karyo.train.pack import _check_same_channels

    p = with_adapter(PrompterConfig(), ("DAPI",), AugmentConfig())
    s = with_adapter(segmentor_config("tiny"), ("DAPI",), AugmentConfig())
    _check_same_channels(p, s, "seg_run")  # the same: nothing to say
    other = dc.replace(s, adapter=dc.replace(s.adapter, pixel_mean=(0.1,)))
    with pytest.raises(InputError, match=r"seg_run: takes DAPI as the prompter does, but with other pixel statistics"):
        _check_same_channels(p, other, "seg_run")
