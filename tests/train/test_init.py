"""Starting a run from given weights (``--init`` / ``init:``) and fixing its validation images (``val_ids:``)."""

import dataclasses
import json

import pytest
import torch
import yaml
from tests.train.test_train import AUG, tiny_prompter

from karyo.errors import InputError
from karyo.models.prompter import Prompter
from karyo.train.api import init_weights, train


def _config(tmp_path, data, **extra) -> str:
    model = {k: v for k, v in dataclasses.asdict(tiny_prompter()).items() if k != "adapter"}
    cfg = {"task": "prompter", "data": [f"{data}:train"], "model": model,
           "augment": {k: getattr(AUG, k) for k in ("crop_size", "p_grid_shuffle", "p_elastic", "p_superpixels")},
           "train": {"epochs": 1, "batch_size": 2, "lr": 3e-3, "warmup_epochs": 0, "threads": 1}, **extra}
    path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _exported(run) -> dict:
    return torch.load(run / "model" / "prompter.pt", map_location="cpu", weights_only=True)


def test_init_weights_reads_a_file_a_run_and_a_packed_model(tmp_path):
    state = Prompter(tiny_prompter()).state_dict()
    (tmp_path / "run").mkdir()
    (tmp_path / "packed").mkdir()
    torch.save({"model": state, "epoch": 3}, tmp_path / "run" / "best.pt")
    torch.save(state, tmp_path / "packed" / "prompter.pt")
    for source in (tmp_path / "run" / "best.pt", tmp_path / "run", tmp_path / "packed"):
        got = init_weights("prompter", source)
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], state[k]) for k in state)
    with pytest.raises(InputError, match=r"segmentor\.pt"):
        init_weights("segmentor", tmp_path / "packed")


def test_run_starts_from_init_weights_on_the_given_validation_images(tmp_path, disc_layout, one_thread):
    first = tmp_path / "first"
    train("prompter", None, first, config=_config(tmp_path, disc_layout), progress=False)
    start = _exported(first)
    # Learning rate 0: the weights cannot move, so the second run must export exactly what it started from.
    cfg = _config(tmp_path, disc_layout, init=str(first), val_ids=["syn_3_000", "syn_3_001"])
    second = tmp_path / "second"
    train("prompter", None, second, config=cfg, progress=False, train_overrides={"lr": 0.0})
    end = _exported(second)
    assert all(torch.equal(end[k], start[k]) for k in start)
    saved = json.loads((second / "train_config.json").read_text())
    assert saved["val_ids"] == ["syn_3_000", "syn_3_001"] and saved["init"] == str(first)
    # Without init the same settings give other (random) weights: the equality above is not trivial.
    third = tmp_path / "third"
    train("prompter", None, third, config=_config(tmp_path, disc_layout, train={"epochs": 1, "lr": 0.0, "seed": 5}),
          progress=False)
    fresh = _exported(third)
    assert not all(torch.equal(fresh[k], start[k]) for k in start)


def test_init_weights_of_another_network_are_refused_naming_the_file(tmp_path, disc_layout):
    other = Prompter(dataclasses.replace(tiny_prompter(), fpn_dim=24)).state_dict()
    torch.save(other, tmp_path / "other.pt")
    cfg = _config(tmp_path, disc_layout, init=str(tmp_path / "other.pt"))
    with pytest.raises(InputError, match=r"other\.pt.*do not fit"):
        train("prompter", None, tmp_path / "run", config=cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_init_without_the_optional_mask_head_trains_it_fresh(tmp_path):
    from karyo.train.loop import load_init_state

    plain = Prompter(tiny_prompter()).state_dict()
    with_head = Prompter(dataclasses.replace(tiny_prompter(), mask_loss_weight=1.0))
    fresh_head = {k: v.clone() for k, v in with_head.state_dict().items() if k.startswith("mask_head.")}
    load_init_state(with_head, plain, tmp_path / "plain.pt")
    state = with_head.state_dict()
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    assert all(torch.equal(state[k], fresh_head[k]) for k in fresh_head)
    # Only the optional head may be missing; other gaps and extra keys are still refused, naming the file.
    gap = {k: v for k, v in plain.items() if not k.startswith("cls_head.")}
    with pytest.raises(InputError, match=r"gap\.pt.*missing cls_head"):
        load_init_state(Prompter(tiny_prompter()), gap, tmp_path / "gap.pt")
    with pytest.raises(InputError, match=r"extra\.pt.*unexpected mask_head"):
        load_init_state(Prompter(tiny_prompter()), with_head.state_dict(), tmp_path / "extra.pt")


def test_unknown_validation_ids_are_refused(tmp_path, disc_layout):
    with pytest.raises(InputError, match="not in the training data"):
        train("prompter", None, tmp_path / "run", config=_config(tmp_path, disc_layout, val_ids=["syn_9_000"]),
              progress=False)
    with pytest.raises(InputError, match="quote numeric ids"):
        train("prompter", None, tmp_path / "run", config=_config(tmp_path, disc_layout, val_ids=[68]),
              progress=False)


def test_optional_modules_train_at_their_own_learning_rate(tmp_path, disc_layout, one_thread):
    """``optional_lr_mult`` scales the lr of the modules under ``optional_init_prefixes`` only, and a resumed run
    rebuilds the same optimiser groups from the config."""
    from karyo.train.loop import TrainConfig, parameter_groups

    model = Prompter(dataclasses.replace(tiny_prompter(), mask_loss_weight=1.0))
    head = {id(p) for p in model.mask_head.parameters()}
    base, added = parameter_groups(model, TrainConfig(optional_lr_mult=10.0))
    assert {id(p) for p in added["params"]} == head and added["lr_mult"] == 10.0
    assert not head & {id(p) for p in base["params"]} and base["lr_mult"] == 1.0
    assert len(base["params"]) + len(added["params"]) == len(list(model.parameters()))
    assert len(parameter_groups(model, TrainConfig())) == 1  # the default keeps one group
    assert len(parameter_groups(Prompter(tiny_prompter()), TrainConfig(optional_lr_mult=10.0))) == 1  # no head
    with pytest.raises(ValueError, match="optional_lr_mult"):
        parameter_groups(model, TrainConfig(optional_lr_mult=0.0))
    train_cfg = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "warmup_epochs": 0, "threads": 1,
                 "schedule": "constant", "optional_lr_mult": 10.0, "max_steps_per_epoch": 2}
    cfg = _config(tmp_path, disc_layout, train=train_cfg)
    with open(cfg) as f:
        doc = yaml.safe_load(f)
    doc["model"]["mask_loss_weight"] = 1.0
    with open(cfg, "w") as f:
        yaml.safe_dump(doc, f)
    run = tmp_path / "run"
    train("prompter", None, run, config=cfg, progress=False, train_overrides={"epochs": 1})
    train("prompter", None, run, config=cfg, progress=False, resume=True)
    groups = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-2])
