"""Training: a real short run lowers the loss, resume equals an uninterrupted run, runs are reproducible."""

import json

import numpy as np
import pytest
import torch

from karyo.data.augment import AugmentConfig
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.models.prompter import PrompterConfig
from karyo.models.segmentor import segmentor_config
from karyo.train.data import DataSpec, group_split, source_group
from karyo.train.loop import TrainConfig, fit, lr_factor
from karyo.train.prompter import PrompterTask
from karyo.train.segmentor import SegmentorTask, SegmentorTrainSettings


def disc_samples(n: int, size: int = 64, seed: int = 0) -> list[Sample]:
    """Synthetic H&E-like tiles: purple discs of 2 classes (small = 1, large = 2) on pink."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for k in range(n):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = (235, 190, 215)
        inst = np.zeros((size, size), np.int32)
        classes = {}
        for i, (cy, cx) in enumerate([(16, 16), (16, 48), (48, 16), (48, 48)], 1):
            r = 5 if (i + k) % 2 else 8
            m = (yy - cy - rng.integers(-3, 4)) ** 2 + (xx - cx - rng.integers(-3, 4)) ** 2 <= r * r
            img[m] = (70, 40, 130) if r == 5 else (110, 60, 150)
            inst[m] = i
            classes[i] = 1 if r == 5 else 2
        out.append(Sample(image=img, instances=inst, classes=classes, name=f"syn_{k // 2}_{k % 2:03d}"))
    return out


def tiny_prompter() -> PrompterConfig:
    return PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16, head_hidden=16, num_classes=2,
                          class_names={1: "small", 2: "large"}, dropout=0.0)


AUG = AugmentConfig(crop_size=64, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]



def test_resume_equals_uninterrupted_run(tmp_path, one_thread):
    samples = disc_samples(8)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, seed=3, warmup_epochs=0)

    def task():
        return PrompterTask(tiny_prompter(), AUG, samples[:6], samples[6:])

    fit(task(), cfg, tmp_path / "a", progress=False)
    fit(task(), TrainConfig(**{**cfg.__dict__, "epochs": 1}), tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="already holds a run"):
        fit(task(), cfg, tmp_path / "b", progress=False)
    fit(task(), cfg, tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist_a = (tmp_path / "a" / "history.csv").read_text().splitlines()
    hist_b = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert [r.split(",")[:4] for r in hist_a] == [r.split(",")[:4] for r in hist_b]


def test_prompter_training_lowers_loss_and_exports(tmp_path, one_thread):
    samples = disc_samples(8)
    task = PrompterTask(tiny_prompter(), AUG, samples[:6], samples[6:])
    res = fit(task, TrainConfig(epochs=6, batch_size=3, lr=3e-3, seed=0, warmup_epochs=0), tmp_path, progress=False)
    losses = [row["train_loss"] for row in res.history]
    assert losses[-1] < 0.6 * losses[0]
    assert (tmp_path / "model" / "prompter.pt").is_file()
    meta = json.loads((tmp_path / "model" / "prompter.json").read_text())
    assert meta["config"]["num_classes"] == 2
    assert {"val_f1_d", "val_score"} <= set(res.history[-1])


def test_segmentor_training_lowers_loss(tmp_path, one_thread):
    samples = disc_samples(6)
    task = SegmentorTask(segmentor_config("tiny"), AUG, SegmentorTrainSettings(nuclei_per_image=4), samples[:4],
                         samples[4:], seed=0)
    res = fit(task, TrainConfig(epochs=8, batch_size=2, lr=3e-3, seed=0, warmup_epochs=0), tmp_path,
              progress=False)
    losses = [row["train_loss"] for row in res.history]
    assert losses[-1] < 0.7 * losses[0]
    assert res.history[-1]["val_pq_oracle"] >= 0.0
    assert (tmp_path / "model" / "segmentor.pt").is_file()


def test_segmentor_training_with_background_prompts_reports_their_rejection(tmp_path, one_thread):
    """The learning itself is tested on the model (tests/models/test_segmentor.py); here the task wiring: the
    prompts reach the loss, validation reports how the predicted IoU ranks them, the setting is saved."""
    samples = disc_samples(6)
    settings = SegmentorTrainSettings(nuclei_per_image=4, background_prompts=4)
    task = SegmentorTask(segmentor_config("tiny"), AUG, settings, samples[:4], samples[4:], seed=0)
    res = fit(task, TrainConfig(epochs=2, batch_size=2, lr=3e-3, seed=0, warmup_epochs=0), tmp_path,
              progress=False)
    last = res.history[-1]
    assert 0.0 <= last["val_background_auc"] <= 1.0 and 0.0 <= last["val_background_iou"] <= 1.0
    assert json.loads((tmp_path / "model" / "segmentor.json").read_text())["settings"]["background_prompts"] == 4
    plain = fit(SegmentorTask(segmentor_config("tiny"), AUG, SegmentorTrainSettings(nuclei_per_image=4),
                              samples[:4], samples[4:], seed=0),
                TrainConfig(epochs=2, batch_size=2, lr=3e-3, seed=0, warmup_epochs=0), tmp_path / "plain",
                progress=False)
    assert "val_background_auc" not in plain.history[-1]
    assert plain.history[0]["train_loss"] != res.history[0]["train_loss"]  # the extra prompts were trained


def test_lr_schedule_shapes():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    assert lr_factor(0, cfg) < 0.01
    assert lr_factor(1, cfg) == pytest.approx(0.5)
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(0.02)
    step = TrainConfig(epochs=10, warmup_epochs=0, schedule="step", step_epochs=3, step_gamma=0.1)
    assert [lr_factor(e, step) for e in (0, 2.9, 3, 6)] == pytest.approx([1, 1, 0.1, 0.01])


def test_group_split_holds_out_whole_source_images():
    names = [f"train_{t}_{k:03d}" for t in range(10) for k in range(16)] + ["00000001", "00000002"]
    tr, va = group_split(names, 0.2, seed=1)
    assert sorted(tr + va) == list(range(len(names)))
    val_groups = {source_group(names[i]) for i in va}
    assert not val_groups & {source_group(names[i]) for i in tr}
    assert len(val_groups) == round(0.2 * 12)
    assert group_split(names, 0.2, seed=1) == (tr, va)


def test_group_split_keeps_equal_names_from_two_datasets_together():
    # NuCLS' whole image "train_2" and CoNSeP image 2's patches share a group name: they go to one side.
    names = [f"train_{t}_{k:03d}" for t in range(6) for k in range(4)] + ["train_2", "00000068"]
    for seed in range(8):
        tr, va = group_split(names, 0.3, seed=seed)
        side = va if names.index("train_2") in va else tr
        assert {names.index(f"train_2_{k:03d}") for k in range(4)} <= set(side)


def test_data_spec_parsing():
    assert str(DataSpec.parse("data/consep:train")) == "data/consep:train"
    s = DataSpec.parse("x/y:test@1=3,2=0")
    assert (s.path, s.split, s.classes, s.class_map) == ("x/y", "test", "map", {1: 3, 2: 0})
    assert DataSpec.parse("z@none").classes == "none"


def test_group_split_covers_every_class_on_both_sides():
    # 12 source images; class 3 lives in only two of them, class 2 in three.
    names = [f"train_{t}_{k:03d}" for t in range(12) for k in range(4)]
    classes = [{1, 3} if t in (0, 7) else {1, 2} if t in (3, 5, 9) else {1} for t in range(12) for _ in range(4)]
    tr, va = group_split(names, 0.25, seed=0, item_classes=classes)
    val_cls = set().union(*(classes[i] for i in va))
    train_cls = set().union(*(classes[i] for i in tr))
    assert {1, 2, 3} <= val_cls
    assert {1, 2, 3} <= train_cls
    assert not {source_group(names[i]) for i in va} & {source_group(names[i]) for i in tr}


def test_a_run_without_any_validation_score_says_so(tmp_path, one_thread):
    """Validation that never gives a finite score (nothing detected: F1 undefined) exports the last weights and
    writes standard JSON, not -Infinity for a best score at epoch -1."""
    class NoScore:
        name = "toy"

        def model(self):
            return torch.nn.Linear(2, 1)

        def train_loader(self, epoch, cfg):
            return [torch.ones(4, 2)]

        def loss(self, model, batch, device):
            return {"loss": model(batch.to(device)).pow(2).mean()}

        def validate(self, model, device):
            return {"score": float("nan")}

        def export(self, model, directory):
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), directory / "toy.pt")

    result = fit(NoScore(), TrainConfig(epochs=2, batch_size=1, warmup_epochs=0, threads=1), tmp_path / "run",
                 progress=False)
    assert result.best_epoch == -1 and (tmp_path / "run" / "model" / "toy.pt").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # strict JSON: no -Infinity
    assert summary["best_score"] is None and summary["best_epoch"] is None


def test_a_dataset_without_split_notes_the_test_images_it_trains_on(tmp_path):
    from karyo.data.layout import write_layout_sample
    from karyo.train.data import test_images_trained_on

    root = tmp_path / "data"
    for i, s in enumerate(disc_samples(4)):
        write_layout_sample(root, s, split="test" if i == 3 else "train")
    lines = test_images_trained_on([DataSpec.parse(f"{root}@none"), DataSpec.parse(f"{root}:train")])
    assert lines == [f"note: {root}: no :SPLIT given, so all its images are used (for training and validation), "
                     f"including the 1 its split.csv marks test; give {root}:train@none to leave those out"]
    assert test_images_trained_on([DataSpec.parse(str(tmp_path / "absent"))]) == []
