"""The stain-agnostic recipe: Lovász hinge against hand-computed cases, the combined loss, gradient accumulation vs a
large batch, an AMP step on CPU, the plateau schedule, the seed's metric table, ``karyo train stain_agnostic`` with
named channels, and a fluorescence end-to-end run on real DSB2018 images with a quality floor."""

import json
import math
import time

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from torch import nn

import karyo
from karyo.data.augment import AugmentConfig
from karyo.infer.binary import BinaryConfig
from karyo.models.adapter import AdapterConfig
from karyo.models.cellvit import CellViTConfig, CellViTModel
from karyo.train.loop import TrainConfig, fit
from karyo.train.stain_agnostic import (
    SeedMetrics,
    StainAgnosticSettings,
    StainAgnosticTask,
    hash_split,
    lovasz_grad,
    lovasz_hinge,
    stain_agnostic_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- Lovász


def test_lovasz_hinge_hand_computed():
    """labels (1, 1, 0), scores (1.0, -0.5, 0.25): hinge errors (0, 1.5, 1.25); sorted decreasingly the pixels are
    (1, 2, 0) with labels (1, 0, 1). |gt| = 2; intersections 2 − cumsum(1, 1, 2) = (1, 1, 0); unions
    2 + cumsum(0, 1, 1) = (2, 3, 3); Jaccard losses (1/2, 2/3, 1); gradient (1/2, 1/6, 1/3).
    Loss = 1.5·1/2 + 1.25·1/6 + 0·1/3 = 0.958333…; d loss/d s_i = −y*_i g_i where the error is positive."""
    gt_sorted = torch.tensor([1.0, 0.0, 1.0])
    torch.testing.assert_close(lovasz_grad(gt_sorted), torch.tensor([0.5, 1 / 6, 1 / 3]))
    s = torch.tensor([[1.0, -0.5, 0.25]], requires_grad=True)
    loss = lovasz_hinge(s, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(0.75 + 1.25 / 6, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.0, -0.5, 1 / 6]]))


def test_lovasz_hinge_equals_the_jaccard_loss_on_binary_errors():
    """Berman et al.'s key property: for errors in {0, 1} the Lovász extension is the Jaccard loss of the set of
    mispredicted pixels. Labels (1, 1, 0, 0), scores (1, 0, 0, −1): errors (0, 1, 1, 0), i.e. pixel 1 (a nucleus)
    missed and pixel 2 (background) taken as nucleus → IoU = |{0}| / |{0, 1, 2}| = 1/3, loss 2/3."""
    loss = lovasz_hinge(torch.tensor([[1.0, 0.0, 0.0, -1.0]]), torch.tensor([[1, 1, 0, 0]]))
    assert loss.item() == pytest.approx(2 / 3, abs=1e-6)
    # confident and right everywhere: 0; per image vs pooled over the batch
    assert lovasz_hinge(torch.tensor([[2.0, -3.0]]), torch.tensor([[1, 0]])).item() == 0.0
    s = torch.tensor([[1.0, -0.5, 0.25], [1.0, 0.0, 0.0]])
    y = torch.tensor([[1, 1, 0], [1, 1, 0]])
    per = [lovasz_hinge(s[i:i + 1], y[i:i + 1]).item() for i in range(2)]
    assert lovasz_hinge(s, y).item() == pytest.approx(np.mean(per))
    assert lovasz_hinge(s, y, per_image=False).item() != pytest.approx(np.mean(per))


def test_combined_loss_is_0_7_lovasz_plus_0_3_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8)
    fg = (torch.rand(2, 8, 8) > 0.6).long()
    out = stain_agnostic_loss(logits, fg)
    ce = F.cross_entropy(logits, fg)
    lov = lovasz_hinge(logits[:, 1] - logits[:, 0], fg)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["lovasz"], lov)
    torch.testing.assert_close(out["loss"], 0.7 * lov + 0.3 * ce)


# -------------------------------------------------------------------------------------------- training loop


class TinyTask:
    """A 2-layer MLP regression: the loader cuts a fixed dataset in order into batches of ``cfg.batch_size``."""

    name = "tiny"

    def __init__(self, n: int = 30, record: list | None = None, scores: list[float] | None = None):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)
        self.record, self.scores = record, scores

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))

    def train_loader(self, epoch, cfg):
        b = cfg.batch_size
        return [(self.x[i:i + b], self.y[i:i + b]) for i in range(0, len(self.x), b)]

    def loss(self, model, batch, device):
        if self.record is not None:
            self.record.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        x, y = batch
        return {"loss": F.mse_loss(model(x).float(), y)}

    def validate(self, model, device):
        if self.scores is not None:
            return {"score": self.scores.pop(0)}
        return {"score": -float(F.mse_loss(model(self.x), self.y))}

    def export(self, model, directory):
        directory.mkdir(parents=True, exist_ok=True)


def _weights(run) -> dict:
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_gradient_accumulation_equals_a_large_batch(tmp_path):
    """30 samples: batches of 12 (12, 12, 6) vs batches of 3 accumulated 4 at a time (4, 4, 2 — the short last
    group rescaled to a mean); cosine schedule with warm-up, so the per-step learning rates must agree too."""
    common = dict(epochs=3, lr=1e-2, warmup_epochs=1, schedule="cosine", seed=3, grad_clip=1.0)
    fit(TinyTask(), TrainConfig(batch_size=12, **common), tmp_path / "big", progress=False)
    res = fit(TinyTask(), TrainConfig(batch_size=3, accumulate_steps=4, **common), tmp_path / "acc", progress=False)
    big, acc = _weights(tmp_path / "big"), _weights(tmp_path / "acc")
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)
    assert res.history[0]["train_loss"] > res.history[-1]["train_loss"]
    # without accumulation the small batches take 10 steps an epoch: a different result
    fit(TinyTask(), TrainConfig(batch_size=3, **common), tmp_path / "small", progress=False)
    assert not torch.allclose(_weights(tmp_path / "small")["0.weight"], big["0.weight"], atol=1e-4)


def test_amp_step_runs_on_cpu_in_bfloat16(tmp_path):
    record: list = []
    res = fit(TinyTask(record=record), TrainConfig(epochs=1, batch_size=6, lr=1e-2, amp=True, warmup_epochs=0),
              tmp_path / "amp", progress=False)
    assert record and all(r == (True, torch.bfloat16) for r in record)
    assert math.isfinite(res.history[0]["train_loss"])
    w = _weights(tmp_path / "amp")
    assert all(v.dtype == torch.float32 for v in w.values())
    record.clear()
    fit(TinyTask(record=record), TrainConfig(epochs=1, batch_size=6), tmp_path / "fp32", progress=False)
    assert not any(r[0] for r in record)


def test_lovasz_warmup_starts_from_cross_entropy(make_fluorescence_discs):
    """λ ramps 0 → 0.7 over the warm-up epochs (the task's loss follows the epoch its loader serves); 0 (the
    default) is the seed's constant λ."""
    settings = StainAgnosticSettings(lovasz_warmup_epochs=3)
    assert [settings.lovasz_weight_at(e) for e in range(5)] == pytest.approx([0.0, 0.7 / 3, 1.4 / 3, 0.7, 0.7])
    assert StainAgnosticSettings().lovasz_weight_at(0) == 0.7
    with pytest.raises(ValueError, match="lovasz_warmup_epochs"):
        StainAgnosticSettings(lovasz_warmup_epochs=-1)
    with pytest.raises(ValueError, match="score must be one of"):
        StainAgnosticSettings(score="accuracy")
    samples = make_fluorescence_discs(3, channels=1)
    task = StainAgnosticTask(_tiny_config(AdapterConfig(in_channels=1, hidden=4)), AUG, samples[:2], samples[2:],
                             settings)
    torch.manual_seed(0)
    model = task.model()
    cfg = TrainConfig(batch_size=2)
    for epoch, weight in ((0, 0.0), (5, 0.7)):
        batch = next(iter(task.train_loader(epoch, cfg)))
        out = task.loss(model, batch, torch.device("cpu"))
        torch.testing.assert_close(out["loss"], weight * out["lovasz"] + (1 - weight) * out["ce"])
        assert out["lovasz"] > 0 and out["ce"] > 0


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_autocasts_only_where_the_hardware_is_native(tmp_path, monkeypatch, native):
    """``amp: auto`` is bf16 autocast on a CPU with AVX512-BF16/AMX and float32 elsewhere (emulated bf16 was 23×
    slower per step on an AVX2 CPU); ``amp: true`` always autocasts (above)."""
    import karyo.train.loop as loop

    monkeypatch.setattr(loop, "native_low_precision", lambda device: native)
    record: list = []
    fit(TinyTask(record=record), TrainConfig(epochs=1, batch_size=6, amp="auto", warmup_epochs=0),
        tmp_path / "auto", progress=False)
    assert record and all(r[0] is native for r in record)
    with pytest.raises(ValueError, match="amp must be true, false or"):
        fit(TinyTask(), TrainConfig(epochs=1, amp="yes"), tmp_path / "bad", progress=False)


def test_amp_step_of_the_recipe_on_cpu(tmp_path, make_fluorescence_discs):
    """One bf16-autocast step of the real task (adapter + CellViT + Lovász/CE) gives finite losses and updates."""
    samples = make_fluorescence_discs(4, channels=2)
    task = StainAgnosticTask(_tiny_config(AdapterConfig(in_channels=2, hidden=4)), AUG, samples[:3], samples[3:])
    res = fit(task, TrainConfig(epochs=1, batch_size=2, max_steps_per_epoch=1, amp=True, lr=1e-3, warmup_epochs=0),
              tmp_path / "run", progress=False)
    row = res.history[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["train_lovasz"]) and "val_f1_mean" in row


def test_plateau_schedule_halves_after_patience_and_resumes(tmp_path):
    cfg = TrainConfig(epochs=6, batch_size=10, lr=1e-2, warmup_epochs=0, schedule="plateau", plateau_patience=1,
                      plateau_factor=0.5)
    scores = [0.5, 0.5, 0.5, 0.5, 0.6, 0.6]
    res = fit(TinyTask(scores=list(scores)), cfg, tmp_path / "p", progress=False)
    # epoch 0 sets best; 1, 2 stall → halved after epoch 2; 3 stalls, 4 improves, 5 stalls
    assert [r["lr"] for r in res.history] == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3])
    state = torch.load(tmp_path / "p" / "last.pt", weights_only=True)
    assert state["plateau"] == {"scale": 0.5, "best": 0.6, "bad": 1}
    # interrupted after 3 epochs and resumed: the same trajectory
    fit(TinyTask(scores=scores[:3]), TrainConfig(**{**cfg.__dict__, "epochs": 3}), tmp_path / "r", progress=False)
    res2 = fit(TinyTask(scores=scores[3:]), cfg, tmp_path / "r", resume=True, progress=False)
    assert [r["lr"] for r in res2.history] == [r["lr"] for r in res.history]
    # the options off: the checkpoint holds exactly what it held before they existed
    fit(TinyTask(), TrainConfig(epochs=1, batch_size=10), tmp_path / "plain", progress=False)
    assert set(torch.load(tmp_path / "plain" / "last.pt", weights_only=True)) == {
        "model", "optimizer", "rng", "epoch", "history", "best_score", "best_epoch"}


# ------------------------------------------------------------------------------------------------- metrics


def test_seed_metrics_on_hand_made_maps():
    true = np.zeros((10, 10), np.int32)
    true[1:4, 1:4] = 1  # 9 px
    true[6:9, 6:9] = 2  # 9 px
    m = SeedMetrics()
    m.update(true, true)
    r = m.compute()
    assert all(r[k] == pytest.approx(1.0) for k in SeedMetrics.KEYS)
    pred = np.zeros_like(true)
    pred[1:4, 1:3] = 5  # 6 of nucleus 1: IoU 2/3
    pred[0:2, 7:10] = 7  # a false positive
    m = SeedMetrics()
    m.update(true, pred)
    r = m.compute()
    # pixels: TP 6, FP 6, FN 12, TN 76
    assert r["pixel_accuracy"] == pytest.approx(0.82) and r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(1 / 3) and r["f1"] == pytest.approx(0.4)
    # instances: 1 TP (IoU 2/3), 1 FP, 1 FN → F1@0.5 = DQ = 1/2, SQ = 2/3, PQ = 1/3
    assert r["f1_05"] == pytest.approx(0.5) and r["sq"] == pytest.approx(2 / 3, abs=1e-5)
    assert r["pq"] == pytest.approx(1 / 3, abs=1e-5)
    # the match survives thresholds 0.5, 0.55, 0.6, 0.65 (IoU 0.667): F1 0.5 four times, 0 six times
    assert r["f1_mean"] == pytest.approx(0.2) and r["map"] == pytest.approx(4 / 3 / 10)


def test_split_helpers():
    ids = [f"img{i}" for i in range(400)]
    split = hash_split(ids)
    assert split == hash_split(list(reversed(ids)))  # each id on its own
    frac = {k: sum(v == k for v in split.values()) / 400 for k in ("train", "val", "test")}
    assert 0.5 < frac["train"] < 0.7 and 0.12 < frac["val"] < 0.28 and 0.12 < frac["test"] < 0.28


# ---------------------------------------------------------------------------------------- task, CLI, real data

AUG = AugmentConfig(crop_size=64, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0)


def _tiny_config(adapter: AdapterConfig | None = None) -> CellViTConfig:
    return CellViTConfig(stem_dims=(8, 8), decoder_dims=(32, 16, 16, 8, 8), num_classes=1, adapter=adapter,
                         binary=BinaryConfig(min_size=8, hole_size=8))


def test_karyo_train_cellvit_with_channels(ome_layout, tmp_path):
    from karyo.train.api import train

    config = tmp_path / "c.yaml"
    config.write_text("model:\n  preset: cpu\n  stem_dims: [8, 8]\n  decoder_dims: [32, 16, 16, 8, 8]\n"
                      "train: {epochs: 1, batch_size: 2, max_steps_per_epoch: 1}\naugment: {crop_size: 64}\n"
                      "val_fraction: 0.34\n")
    train("cellvit", [f"{ome_layout}:train"], tmp_path / "run", config=config, channels="2", progress=False)
    meta = json.loads((tmp_path / "run" / "model" / "cellvit.json").read_text())
    assert meta["config"]["adapter"]["in_channels"] == 2 and meta["config"]["in_chans"] == 3


def test_karyo_train_stain_agnostic_with_named_channels(ome_layout, tmp_path):
    """``karyo train stain_agnostic --channels DAPI`` on OME-TIFF data named (CD45, DAPI): the adapter takes DAPI by
    name; the run exports a model folder that ``karyo segment`` opens and ``karyo evaluate`` scores."""
    from typer.testing import CliRunner

    from karyo.cli import app

    root = ome_layout
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  preset: cpu\n  stem_dims: [8, 8]\n  decoder_dims: [32, 16, 16, 8, 8]\n"
                      "  adapter: {hidden: 4}\ntrain: {epochs: 1, batch_size: 2, max_steps_per_epoch: 2, lr: 0.001, "
                      "schedule: plateau, accumulate_steps: 2, warmup_epochs: 0}\n"
                      "augment: {crop_size: 64, p_elastic: 0.0, p_grid_shuffle: 0.0}\nval_fraction: 0.34\n")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "stain_agnostic", "--data", f"{root}:train", "--config", str(config),
                                   "--out", str(run), "--channels", "DAPI"])
    assert res.exit_code == 0, res.output
    model = karyo.load(run / "model")
    assert isinstance(model, CellViTModel) and model.config.adapter.channel_names == ("DAPI",)
    assert model.config.binary is not None and model.config.adapter.hidden == 4
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["task"] == "stain_agnostic" and saved["settings"]["lovasz_weight"] == 0.7
    img = tifffile.imread(next((root / "images").glob("*.tif")))
    assert img.shape[0] == 2  # planar OME-TIFF as written
    seg = tmp_path / "seg"
    out = CliRunner().invoke(app, ["segment", str(root / "images"), "--model", str(run / "model"), "--out", str(seg),
                                   "--channels", "DAPI", "--outputs", "instances,table"])
    assert out.exit_code == 0, out.output
    assert len(list((seg / "instances").glob("*.png"))) == 6
    out = CliRunner().invoke(app, ["evaluate", "--true", str(root), "--pred", str(seg)])
    assert out.exit_code == 0, out.output
    report = json.loads((seg / "evaluation.json").read_text())
    assert report["n_images"] == 6 and "pq" in report["instance"]


@pytest.mark.shared_data
def test_fluorescence_end_to_end_on_dsb2018_beats_trivial_baselines(shared_data, tmp_path):
    """A tiny adapter (1 → 3) + CellViT trained for ~120 steps on 8 DSB2018 training images (hash split) reaches a
    PQ / F1@0.5 floor on 6 held-out test images that all-background and one-blob predictions cannot reach."""
    from karyo.data.datasets import open_dataset

    root = shared_data / "dsb2018_fluo_subset"
    if not root.is_dir():
        pytest.skip(f"DSB2018 fluorescence subset not found at {root}")
    t0 = time.perf_counter()
    ds = open_dataset(root)
    split = hash_split(ds.ids)
    train = [ds[i] for i, n in enumerate(ds.ids) if split[n] == "train"][:8]
    test = [ds[i] for i, n in enumerate(ds.ids) if split[n] == "test"][:6]
    assert all(s.image.shape[2] == 1 for s in train + test)
    aug = AugmentConfig(crop_size=128, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0,
                        p_sized_crop=0.0)
    cfg = _tiny_config(AdapterConfig(in_channels=1, hidden=8))
    task = StainAgnosticTask(cfg, aug, train, test)
    res = fit(task, TrainConfig(epochs=12, batch_size=4, lr=3e-3, warmup_epochs=0, schedule="constant", seed=0,
                                val_every=100, max_steps_per_epoch=10), tmp_path / "run", progress=False)
    model = karyo.load(tmp_path / "run" / "model")
    last = res.history[-1]
    assert last["train_loss"] < 0.6 * res.history[0]["train_loss"]
    assert last["val_f1_05"] > 0.3 and last["val_pq"] > 0.2, last
    # the same numbers from the exported model's own inference path (tiling, padding, binary post-processing)
    m = SeedMetrics()
    for s in test:
        m.update(s.instances, model.segment(s.image).instances)
    assert m.compute()["f1_05"] == pytest.approx(last["val_f1_05"], abs=0.05)
    trivial_bg, trivial_blob = SeedMetrics(), SeedMetrics()
    for s in test:
        trivial_bg.update(s.instances, np.zeros_like(s.instances))
        trivial_blob.update(s.instances, np.ones_like(s.instances))
    for t in (trivial_bg.compute(), trivial_blob.compute()):
        assert t["f1_05"] < 0.05 and t["pq"] < 0.05
    assert time.perf_counter() - t0 < 90
