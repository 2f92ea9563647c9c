"""CellViT training: a short real run lowers the loss and exports a loadable model; validation scores; karyo train."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import karyo
from karyo.data.augment import AugmentConfig
from karyo.data.sample import Sample
from karyo.models.cellvit import CellViTConfig, CellViTModel, cellvit_targets
from karyo.train.cellvit import CellViTTask, cellvit_config, export_cellvit_model, validate_cellvit
from karyo.train.loop import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


def disc_samples(n: int, size: int = 64, seed: int = 0) -> list[Sample]:
    """Synthetic H&E-like tiles: purple discs of 2 classes (small = 1, large = 2) on pink, two of them touching."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for k in range(n):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = (235, 190, 215)
        inst = np.zeros((size, size), np.int32)
        classes = {}
        for i, (cy, cx) in enumerate([(16, 16), (16, 30), (48, 16), (48, 48)], 1):
            r = 5 if (i + k) % 2 else 8
            m = ((yy - cy - rng.integers(-2, 3)) ** 2 + (xx - cx - rng.integers(-2, 3)) ** 2 <= r * r) & (inst == 0)
            img[m] = (70, 40, 130) if r == 5 else (110, 60, 150)
            inst[m] = i
            classes[i] = 1 if r == 5 else 2
        out.append(Sample(image=img, instances=inst, classes=classes, name=f"syn_{k // 2}_{k % 2:03d}"))
    return out


def tiny_config(**kw) -> CellViTConfig:
    return CellViTConfig(encoder="convnext", convnext="atto", stem_dims=(8, 8), decoder_dims=(32, 16, 16, 8, 8),
                         num_classes=2, class_names={1: "small", 2: "large"}, **kw)


AUG = AugmentConfig(crop_size=64, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0)


def test_short_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path):
    samples = disc_samples(8)
    task = CellViTTask(tiny_config(), AUG, samples[:6], samples[6:])
    res = fit(task, TrainConfig(epochs=6, batch_size=3, lr=3e-3, seed=0, warmup_epochs=0, optimizer="adamw"),
              tmp_path / "run", progress=False)
    losses = [row["train_loss"] for row in res.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert res.history[-1]["train_hv_mse"] < res.history[0]["train_hv_mse"]
    last = res.history[-1]
    assert {"val_pq", "val_aji", "val_f1_d", "val_score"} <= set(last) and last["val_score"] == last["val_pq"]
    assert last["val_pq"] > 0.5  # the post-processed predictions already find and outline most discs
    meta = json.loads((tmp_path / "run" / "model" / "cellvit.json").read_text())
    assert meta["config"]["num_classes"] == 2 and meta["config"]["pixel_mean"] == list(AUG.mean)
    folder = export_cellvit_model(tmp_path / "run", tmp_path / "pack")
    model = karyo.load(folder)
    assert isinstance(model, CellViTModel) and model.class_names == {1: "small", 2: "large"}
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)["model"]
    for k, v in model.net.state_dict().items():
        torch.testing.assert_close(v, best[k], rtol=0, atol=0)
    out = model.segment(samples[6].image)
    assert out.instances.shape == (64, 64)
    # the CLI twin: karyo pack cellvit --run RUN --out DIR
    from typer.testing import CliRunner

    from karyo.cli import app

    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "p2")])
    assert res.exit_code == 0, res.output
    packed = karyo.load(tmp_path / "p2")  # weights stored in float16, loaded as float32
    for k, v in packed.net.state_dict().items():
        want = best[k].half().float() if best[k].is_floating_point() else best[k]
        torch.testing.assert_close(v, want, rtol=0, atol=0)
    res = CliRunner().invoke(app, ["pack", "cellvit", "--out", str(tmp_path / "p3")])
    assert res.exit_code != 0 and "needs --run" in res.output


class PerfectNet(nn.Module):
    """Returns confident logits of the ground truth of the validation images, in order (a stand-in network)."""

    def __init__(self, truths: list[tuple[np.ndarray, np.ndarray]], pad: int):
        super().__init__()
        self.truths = iter(truths)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = []
        for _ in range(x.shape[0]):
            inst, types = next(self.truths)
            h, w = inst.shape
            inst = np.pad(inst, ((0, x.shape[2] - h), (0, x.shape[3] - w)))
            types = np.pad(types, ((0, x.shape[2] - h), (0, x.shape[3] - w)))
            t = cellvit_targets(inst[None], types[None])
            onehot = nn.functional.one_hot
            outs.append({"np": onehot(t["np"], 2).permute(0, 3, 1, 2).float() * 20,
                         "hv": t["hv"], "nt": onehot(t["nt"].clamp(min=0), 3).permute(0, 3, 1, 2).float() * 20})
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def test_validation_of_perfect_predictions_scores_one():
    samples = [Sample(image=s.image[:60, :56], instances=s.instances[:60, :56], classes=s.classes, name=s.name)
               for s in disc_samples(3)]  # 60×56 images are padded to 64×64 for the network and cropped back
    cfg = tiny_config()
    task = CellViTTask(cfg, AUG, samples, samples)
    truths = [(s.instances, s.type_map()) for s in samples]
    metrics = validate_cellvit(PerfectNet(truths, cfg.stride), task.val_set, task.config, torch.device("cpu"))
    # every nucleus found (DQ = 1); the watershed may move a pixel or two of the border between touching discs
    assert metrics["pq"] > 0.99 and metrics["aji"] > 0.98
    assert metrics["f1_d"] == 1.0 and metrics["f1_c1"] == 1.0 and metrics["f1_c2"] == 1.0
    assert metrics["score"] == metrics["pq"]


def test_cellvit_config_from_a_run_config():
    cfg = cellvit_config({"preset": "cpu", "loss_hv_msge": 8.0}, class_names={1: "a", 3: "c"},
                         augment=AugmentConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    assert cfg.num_classes == 3 and cfg.class_names == {1: "a", 3: "c"} and cfg.loss_hv_msge == 8.0
    assert cfg.pixel_mean == (0.5, 0.5, 0.5) and cfg.pixel_std == (0.25, 0.25, 0.25)
    from karyo.config import to_dict

    assert cellvit_config(to_dict(cfg)) == cfg  # a saved full config (resume) rebuilds itself
    with pytest.raises(karyo.InputError, match="unknown CellViT preset"):
        cellvit_config({"preset": "huge"})


def test_karyo_train_cellvit_from_a_config_file(tmp_path):
    from karyo.data.layout import write_layout_sample
    from karyo.train.api import train

    for s in disc_samples(6):
        write_layout_sample(tmp_path / "data", Sample(s.image, s.instances, s.classes, name=s.name,
                                                       class_names={1: "small", 2: "large"}), split="train")
    cfg = {"task": "cellvit", "data": [f"{tmp_path / 'data'}:train"], "val_fraction": 0.34,
           "model": {"preset": "cpu", "stem_dims": [8, 8], "decoder_dims": [32, 16, 16, 8, 8]},
           "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 2, "warmup_epochs": 0},
           "augment": {"crop_size": 64, "p_grid_shuffle": 0.0, "p_elastic": 0.0}}
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    res = train("cellvit", None, tmp_path / "run", config=tmp_path / "run.yaml", progress=False)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["task"] == "cellvit" and saved["model"]["num_classes"] == 2
    assert saved["model"]["decoder_dims"] == [32, 16, 16, 8, 8]
    assert (tmp_path / "run" / "model" / "cellvit.pt").is_file()
    assert len(res.history) == 1 and "val_pq" in res.history[0]
