"""Starting a run from given weights (``--init`` / ``init:``) and fixing its validation images (``val_ids:``)."""

import dataclasses
import json
from pathlib import Path

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
    # a shipped model by its name, as --model takes it; a missing file stays a missing file
    shipped = init_weights("prompter", "default")
    assert shipped.keys() == init_weights("prompter", "promptnucseg_cpu").keys() and len(shipped) > 10
    with pytest.raises(InputError, match="unknown model 'nonesuch'"):
        init_weights("prompter", "nonesuch")
    with pytest.raises(InputError, match=r"missing\.pt"):
        init_weights("prompter", "missing.pt")
    # another architecture's model: the error says what the folder holds
    with pytest.raises(InputError, match=r"no cellvit weights here.*it holds prompter\.pt, segmentor\.pt"):
        init_weights("cellvit", "default")
    # a segmentor fine-tuned from a packed model rebuilds that model's network (no config needed)
    from karyo.config import from_dict
    from karyo.models.segmentor import Segmentor, SegmentorConfig
    from karyo.train.api import init_model_config

    net = Segmentor(from_dict(SegmentorConfig, init_model_config("segmentor", "default")))
    net.load_state_dict(init_weights("segmentor", "default"))  # strict: the same network


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
    # "--resume, same command": the --init the run started from is accepted (one finished epoch more), another not
    rerun = train("prompter", None, second, config=cfg, progress=False, resume=True, init=str(first) + "/",
                  train_overrides={"lr": 0.0, "epochs": 2})
    assert len(rerun.history) == 2
    assert json.loads((second / "train_config.json").read_text())["init"] == str(first)  # kept for the next resume
    again = train("prompter", None, second, config=cfg, progress=False, resume=True, init=str(first),
                  train_overrides={"lr": 0.0, "epochs": 3})
    assert len(again.history) == 3
    with pytest.raises(InputError, match="a resumed run keeps the network it started with; --init would change"):
        train("prompter", None, second, config=cfg, progress=False, resume=True, init=str(tmp_path))
    # Without init the same settings give other (random) weights: the equality above is not trivial.
    third = tmp_path / "third"
    settings = {"epochs": 1, "batch_size": 2, "lr": 0.0, "seed": 5}
    train("prompter", None, third, config=_config(tmp_path, disc_layout, train=settings), progress=False)
    fresh = _exported(third)
    assert not all(torch.equal(fresh[k], start[k]) for k in start)


def test_init_weights_of_another_network_are_refused_naming_the_file(tmp_path, disc_layout):
    other = Prompter(dataclasses.replace(tiny_prompter(), fpn_dim=24)).state_dict()
    torch.save(other, tmp_path / "other.pt")
    cfg = _config(tmp_path, disc_layout, init=str(tmp_path / "other.pt"))
    with pytest.raises(InputError, match=r"other\.pt.*do not fit"):
        train("prompter", None, tmp_path / "run", config=cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    first = tmp_path / "first"  # a run of another network: named as such, not as a list of parameter names
    train("prompter", None, first, config=_config(tmp_path, disc_layout), progress=False)
    with pytest.raises(InputError, match=r"first: is a prompter run: its weights cannot start a segmentor network"):
        init_weights("segmentor", first)


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


def test_init_for_other_classes_restarts_only_the_class_layer(tmp_path):
    """Fine-tuning a model trained on 2 classes onto 4 (another taxonomy): the class layer starts afresh, every
    other weight comes from the init; a mismatch anywhere else is still refused."""
    from karyo.train.loop import load_init_state

    two = Prompter(tiny_prompter()).state_dict()
    four = Prompter(dataclasses.replace(tiny_prompter(), num_classes=4,
                                        class_names={1: "a", 2: "b", 3: "c", 4: "d"}))
    fresh = {k: v.clone() for k, v in four.state_dict().items()}
    restarted = load_init_state(four, two, tmp_path / "two.pt")
    assert restarted == ["cls_head.3.bias", "cls_head.3.weight"]
    state = four.state_dict()
    assert all(torch.equal(state[k], fresh[k]) for k in restarted)
    assert all(torch.equal(state[k], two[k]) for k in two if k not in restarted)
    wider = Prompter(dataclasses.replace(tiny_prompter(), head_hidden=32))
    with pytest.raises(InputError, match=r"two\.pt: these weights do not fit"):
        load_init_state(wider, two, tmp_path / "two.pt")


def test_init_trained_on_other_class_names_restarts_the_class_layer(tmp_path, disc_layout, one_thread):
    """Same class count, other taxonomy (e.g. 4 PanNuke classes onto 4 CoNSeP ones): the class layer is not
    carried over as if class 1 meant the same; the folder's recorded class names say so."""
    from karyo.train.api import init_class_names

    first = tmp_path / "first"
    train("prompter", None, first, config=_config(tmp_path, disc_layout), progress=False)
    saved = json.loads((first / "train_config.json").read_text())
    names = saved["model"]["class_names"]
    assert init_class_names("prompter", first) == names == init_class_names("prompter", first / "best.pt")
    start = _exported(first)
    lr0 = {"lr": 0.0}
    same = tmp_path / "same"  # the same names: everything is carried over
    train("prompter", None, same, config=_config(tmp_path, disc_layout, init=str(first)), progress=False,
          train_overrides=lr0)
    assert all(torch.equal(_exported(same)[k], start[k]) for k in start)
    assert "init_restarted" not in json.loads((same / "train_config.json").read_text())
    saved["model"]["class_names"] = {k: f"other {v}" for k, v in names.items()}
    (first / "train_config.json").write_text(json.dumps(saved))
    renamed = tmp_path / "renamed"
    said: list[str] = []
    train("prompter", None, renamed, config=_config(tmp_path, disc_layout, init=str(first)), progress=False,
          train_overrides=lr0, on_split=said.append)
    assert f"note: {first} was trained on the classes 1 other small, 2 other large; these data name 1 small, " \
           "2 large: its class layer starts afresh" in " ".join(said)
    end = _exported(renamed)
    restarted = json.loads((renamed / "train_config.json").read_text())["init_restarted"]
    assert restarted == ["cls_head.3.bias", "cls_head.3.weight"]
    assert all(torch.equal(end[k], start[k]) for k in start if k not in restarted)
    assert not torch.equal(end["cls_head.3.weight"], start["cls_head.3.weight"])
    # a bare file records no class names: nothing to compare, so the layer is kept
    assert init_class_names("prompter", first / "model" / "prompter.pt") is None


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


def test_config_values_are_typed_and_checked_before_a_run_folder_exists(tmp_path, disc_layout):
    """YAML reads ``1e-4`` (no dot) as a string: it is a number here. Settings that would train nothing or fail
    inside torch are one error naming the file and the key, and leave no run folder."""
    from karyo.config import from_dict
    from karyo.train.loop import TrainConfig

    assert from_dict(TrainConfig, {"lr": "1e-4", "epochs": 3.0}).lr == pytest.approx(1e-4)
    for bad, message in (({"epochs": "ten"}, r"cfg\.yaml: TrainConfig\.epochs: expected a number, got 'ten'"),
                         ({"epochs": 2.5}, "whole number"), ({"seed": [1]}, r"TrainConfig\.seed"),
                         ({"batch_size": True}, r"TrainConfig\.batch_size"),
                         ({"epochs": 0, "max_steps_per_epoch": -1}, r"epochs must be ≥ 1, got 0; max_steps_per_epoch"),
                         ({"optimizer": "sgd"}, "optimizer must be adam or adamw"), ({"lr": -1e-3}, "lr must be ≥ 0")):
        with pytest.raises(InputError, match=message):
            from_dict(TrainConfig, bad, "cfg.yaml")
    cfg = _config(tmp_path, disc_layout, train={"epochs": 0})
    with pytest.raises(InputError, match="epochs must be ≥ 1"):
        train("prompter", None, tmp_path / "never", config=cfg, progress=False)
    assert not (tmp_path / "never").exists()
    with pytest.raises(InputError, match=r"this config is for `karyo train prompter`, not segmentor"):
        train("segmentor", None, tmp_path / "never", config=_config(tmp_path, disc_layout), progress=False)


def test_resume_refuses_changed_settings(tmp_path, disc_layout, one_thread):
    """A resumed run continues with the settings it started with; a changed config or option is an error, not
    silently ignored (a config) or half applied (an option); --epochs may be raised."""
    cfg = _config(tmp_path, disc_layout)
    run = tmp_path / "run"
    train("prompter", None, run, config=cfg, progress=False)
    with pytest.raises(InputError, match=r"--lr, --max-steps would change them"):
        train("prompter", None, run, resume=True, progress=False,
              train_overrides={"lr": 0.05, "max_steps_per_epoch": 3, "epochs": 2})
    changed = _config(tmp_path, disc_layout, train={"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 0,
                                                    "threads": 1})
    with pytest.raises(InputError, match=r"differs from the run being resumed in train\.batch_size"):
        train("prompter", None, run, config=changed, resume=True, progress=False)
    wider = yaml.safe_load(Path(cfg).read_text())
    wider["model"]["fpn_dim"] = 24  # a changed network used to be ignored silently on resume
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    with pytest.raises(InputError, match=r"differs from the run being resumed in model\.fpn_dim"):
        train("prompter", None, run, config=tmp_path / "wider.yaml", resume=True, progress=False)
    cropped = yaml.safe_load(Path(cfg).read_text())
    cropped["augment"]["crop_size"] = 32
    (tmp_path / "cropped.yaml").write_text(yaml.safe_dump(cropped))
    with pytest.raises(InputError, match=r"differs from the run being resumed in augment\.crop_size"):
        train("prompter", None, run, config=tmp_path / "cropped.yaml", resume=True, progress=False)
    before = json.loads((run / "train_config.json").read_text())
    assert before["train"]["lr"] == pytest.approx(3e-3)  # the refused resumes changed nothing
    result = train("prompter", None, run, config=cfg, resume=True, progress=False, train_overrides={"epochs": 2})
    assert len(result.history) == 2
    from typer.testing import CliRunner

    from karyo.cli import app

    res = CliRunner().invoke(app, ["train", "prompter", "--out", str(run), "--resume", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert f"resuming {run} after epoch 2" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "prompter", "--out", str(run), "--resume"])  # finished: nothing to do
    said = " ".join(res.output.split())
    assert res.exit_code == 0 and f"{run} already finished 3 epoch(s) (of 3 asked): nothing to train" in said


def test_a_split_that_cannot_hold_out_whole_source_images_says_why(tmp_path, disc_layout):
    """Patches of one source image are held out together: with one source there is no split, and the message says
    so (raising val_fraction cannot help) and names val_ids; a split that works is reported in one line."""
    from tests.train.test_train import disc_samples

    from karyo.data.layout import write_layout_sample

    one = tmp_path / "one"
    for s in disc_samples(2):  # syn_0_000 and syn_0_001: one source image
        write_layout_sample(one, dataclasses.replace(s, class_names={1: "small", 2: "large"}), split="train")
    for fraction in (0.15, 0.9):
        with pytest.raises(InputError, match=r"cannot split 2 image\(s\) from 1 source image\(s\).*val_ids"):
            train("prompter", None, tmp_path / "run", config=_config(tmp_path, one, val_fraction=fraction),
                  progress=False)
    lines = []
    train("prompter", None, tmp_path / "ok", config=_config(tmp_path, disc_layout, val_fraction=0.25), progress=False,
          on_split=lines.append)
    stated = tmp_path / "stated"  # images that state 0.5 µm/px, a model config at 0.25: said, not ignored
    for s in disc_samples(8):
        write_layout_sample(stated, dataclasses.replace(s, class_names={1: "small", 2: "large"}, mpp=0.5),
                            split="train")
    said = []
    train("prompter", None, tmp_path / "ok_mpp", config=_config(tmp_path, stated, val_fraction=0.25), progress=False,
          on_split=said.append)
    assert said[-1].startswith("note: 8 of 8 image(s) state 0.5 µm/px, the model records 0.25 (its config's mpp)")
    assert lines == ["training on 6 image(s), validating on 2 (25%; 1 of 4 source images held out whole (patches "
                     "named <source>_<n> stay together), val_fraction 0.25); no image states its resolution: the "
                     "model records the config's µm/px (mpp), and inference resamples inputs that state another one "
                     "to it"]


def test_fewer_crops_than_the_batch_size_is_refused_before_anything_is_written(tmp_path, disc_layout):
    """Incomplete batches are dropped: 6 training tiles with batch size 8 would train nothing for every epoch."""
    with pytest.raises(InputError, match=r"6 training image\(s\) give 6 crop\(s\) per epoch, fewer than batch_size 8: "
                                         r"no training step would run; lower it \(--batch-size 6\)"):
        train("prompter", None, tmp_path / "run", config=_config(tmp_path, disc_layout, val_fraction=0.25),
              progress=False, train_overrides={"batch_size": 8})
    assert not (tmp_path / "run").exists()


def test_class_csvs_without_classes_json_are_refused_not_dropped(tmp_path, disc_layout):
    """Without classes.json the classes/ CSVs used to be ignored: the model trained with one class, silently."""
    (disc_layout / "classes.json").unlink()
    with pytest.raises(InputError, match=r"classes\.json: not found, but classes/ holds per-nucleus classes.*"
                                         r"--data .*data:train@none"):
        train("prompter", None, tmp_path / "run", config=_config(tmp_path, disc_layout), progress=False)
    assert not (tmp_path / "run").exists()


def test_init_on_the_same_class_names_numbered_otherwise_reorders_the_class_layer(tmp_path, disc_layout, one_thread):
    """Same taxonomy, other ids (e.g. sorted by name): the class layer's rows follow the names instead of
    starting afresh; every other weight is carried over unchanged."""
    first = tmp_path / "first"
    train("prompter", None, first, config=_config(tmp_path, disc_layout), progress=False)
    start = _exported(first)
    saved = json.loads((first / "train_config.json").read_text())
    saved["model"]["class_names"] = {"1": "large", "2": "small"}  # the init called class 1 "large"
    (first / "train_config.json").write_text(json.dumps(saved))
    second = tmp_path / "second"
    train("prompter", None, second, config=_config(tmp_path, disc_layout, init=str(first)), progress=False,
          train_overrides={"lr": 0.0})
    end = _exported(second)
    record = json.loads((second / "train_config.json").read_text())
    assert record["init_class_order"] == [0, 2, 1] and "init_restarted" not in record
    for key in ("cls_head.3.weight", "cls_head.3.bias"):
        torch.testing.assert_close(end[key], start[key][[0, 2, 1]], rtol=0, atol=0)
    assert all(torch.equal(end[k], start[k]) for k in start if not k.startswith("cls_head.3."))


def test_init_onto_data_without_classes_says_the_model_finds_nuclei_only(tmp_path, caplog):
    from karyo.train.loop import load_init_state

    two = Prompter(tiny_prompter()).state_dict()
    one = Prompter(dataclasses.replace(tiny_prompter(), num_classes=1, class_names={1: "nucleus"}))
    with caplog.at_level("WARNING"):
        assert load_init_state(one, two, tmp_path / "two.pt") == ["cls_head.3.bias", "cls_head.3.weight"]
    assert "two.pt: its class layer is not used (it starts afresh): these data have no classes, so the model " \
           "learns to find nuclei only (one class, 'nucleus')" in caplog.text


@pytest.mark.parametrize(("task", "section", "message"), [
    ("prompter", {"model": {"preset": "cpu", "fpn_dimm": 8}}, "fpn_dimm"),
    ("segmentor", {"model": {"presett": "small"}}, "presett"),
    ("segmentor", {"settings": {"negativez": 1}}, r"SegmentorTrainSettings field\(s\) \[.negativez.\]"),
    ("cellvit", {"model": {"preset": "cpu", "depthh": 2}}, "depthh"),
    ("unet", {"model": {"widthh": 2}}, "widthh"),
    ("stain_agnostic", {"settings": {"lovasz": 1}}, "lovasz"),
    ("prompter", {"train": {"device": "tpu"}}, r"cfg\.yaml: unknown device 'tpu'"),
    ("prompter", {"settings": {"nuclei_per_image": 25}}, r"cfg\.yaml: the prompter task takes no settings"),
    ("prompter", {"task": "segmentr"}, r"cfg\.yaml: unknown training task 'segmentr'"),
    ("prompter", {"init": "defualt"}, r"cfg\.yaml: unknown model 'defualt'"),
])
def test_config_mistakes_are_reported_before_the_data_are_read(tmp_path, disc_layout, monkeypatch, task, section,
                                                                message):
    """A typo in a model or settings section, or an unusable device, stops the run at once naming the file: not
    after minutes of reading a large dataset."""
    import karyo.train.api as api

    def never(*args, **kwargs):
        raise AssertionError("the data were read before the config was checked")

    monkeypatch.setattr(api, "load_specs", never)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": [f"{disc_layout}:train"], **section}))
    with pytest.raises(InputError, match=message):
        train(task, None, tmp_path / "never", config=str(path), progress=False)
    assert not (tmp_path / "never").exists()


def test_resume_refuses_another_preset_and_accepts_the_same(tmp_path, disc_layout, one_thread):
    """The saved run holds the fields a preset expanded to, not its name: the preset is expanded to compare."""
    def config(preset: str) -> Path:
        path = tmp_path / f"{preset}.yaml"
        path.write_text(yaml.safe_dump({"data": [f"{disc_layout}:train"], "model": {"preset": preset},
                                        "settings": {"nuclei_per_image": 4},
                                        "augment": {"crop_size": 64, "p_elastic": 0.0, "p_grid_shuffle": 0.0},
                                        "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 1,
                                                  "warmup_epochs": 0, "threads": 1}}))
        return path

    run = tmp_path / "run"
    train("segmentor", None, run, config=config("tiny"), progress=False)
    with pytest.raises(InputError, match=r"differs from the run being resumed in model\.preset"):
        train("segmentor", None, run, config=config("small"), resume=True, progress=False)
    result = train("segmentor", None, run, config=config("tiny"), resume=True, progress=False,
                   train_overrides={"epochs": 2})
    assert len(result.history) == 2
    changed = yaml.safe_load(config("tiny").read_text())
    changed["settings"]["nuclei_per_image"] = 6  # was ignored silently
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(InputError, match=r"differs from the run being resumed in settings\.nuclei_per_image"):
        train("segmentor", None, run, config=tmp_path / "changed.yaml", resume=True, progress=False)
    with pytest.raises(InputError, match=r"a resumed run keeps the network it started with; --init, --preset"):
        train("segmentor", None, run, resume=True, progress=False, init="default", preset="small")
    longer = yaml.safe_load(config("tiny").read_text())
    longer["train"]["epochs"] = 3  # raising epochs in the config works as --epochs does
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    assert len(train("segmentor", None, run, config=tmp_path / "longer.yaml", resume=True, progress=False
                     ).history) == 3


def test_a_run_that_is_all_warm_up_says_so(tmp_path, disc_layout, one_thread):
    """A one-epoch fine-tune with the default one warm-up epoch ran at 1e-3 of the learning rate throughout."""
    said: list[str] = []
    cfg = _config(tmp_path, disc_layout, train={"epochs": 1, "batch_size": 2, "lr": 3e-3, "warmup_epochs": 1,
                                                "threads": 1, "max_steps_per_epoch": 1})
    train("prompter", None, tmp_path / "run", config=cfg, progress=False, on_split=said.append)
    assert any(line.startswith("note: all 1 epoch(s) are warm-up (warmup_epochs 1: the learning rate starts at "
                               "3e-06") for line in said)


def test_data_mapped_onto_the_init_models_classes_train_with_its_names(tmp_path, disc_layout, one_thread):
    """``--data DIR@1=3,2=2 --init default``: the ids mapped onto are the shipped model's (epithelial,
    inflammatory), so its class layer is kept; the run used to build a one-class model and fail on id 3."""
    import torch

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"augment": {"crop_size": 64, "p_elastic": 0.0, "p_grid_shuffle": 0.0},
                                    "train": {"epochs": 1, "batch_size": 2, "max_steps_per_epoch": 1,
                                              "warmup_epochs": 0, "threads": 1}}))
    run = tmp_path / "run"
    train("prompter", [f"{disc_layout}:train@1=3,2=2"], run, config=path, init="default", progress=False)
    saved = json.loads((run / "train_config.json").read_text())["model"]["class_names"]
    assert saved == {"1": "other", "2": "inflammatory", "3": "epithelial", "4": "spindle-shaped"}
    exported = torch.load(run / "model" / "prompter.pt", map_location="cpu", weights_only=True)
    assert any(v.shape[0] == 5 for k, v in exported.items() if "cls" in k and v.ndim == 2)  # 4 classes + background
    with pytest.raises(InputError, match=r"maps onto class ids \[3\], which no dataset's classes.json and no --init"):
        train("prompter", [f"{disc_layout}:train@1=3"], tmp_path / "never", config=path, progress=False)
    with pytest.raises(InputError, match=r"maps onto class id\(s\) \[7\], not among the model's classes"):
        train("prompter", [f"{disc_layout}:train@1=7"], tmp_path / "never", config=path, init="default",
              progress=False)


def test_init_weights_that_do_not_fit_the_configured_network_are_refused_before_the_data(tmp_path, disc_layout,
                                                                                         monkeypatch):
    """configs/default_segmentor.yaml's ``preset: cpu`` has no detail branch, the shipped segmentor has one: said
    at once, with the way out, not after the data are read."""
    import karyo.train.api as api

    monkeypatch.setattr(api, "load_specs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("data read")))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": [f"{disc_layout}:train"], "model": {"preset": "cpu"}}))
    with pytest.raises(InputError, match=r"default: these weights do not fit the model the config builds: "
                                         r"unexpected .*detail.*; leave out the config's model: section "
                                         r"\(.*cfg\.yaml\)"):
        train("segmentor", None, tmp_path / "never", config=str(path), init="default", progress=False)
