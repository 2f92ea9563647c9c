"""The models karyo ships: registry, checksums, and the default model end to end on real data."""

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

import karyo
from karyo.cli import app
from karyo.data.layout import LayoutDataset, write_layout_sample
from karyo.metrics.instance import panoptic_quality
from karyo.models import registry
from karyo.models.cellvit import CellViTModel
from karyo.models.promptnucseg import PromptNucSegModel
from karyo.train.pack import read_tuning, select_setting

runner = CliRunner()
PQ_FLOOR, F1D_FLOOR = 0.26, 0.55  # measured 0.322 and 0.661 on these three patches (2026-11-25)


def test_default_is_the_shipped_promptnucseg():
    assert registry.resolve("default")["name"] == "promptnucseg_cpu"
    model = karyo.load("default")
    assert isinstance(model, PromptNucSegModel)
    assert model.class_names == {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
    # thresholds come from the validation tuning shipped beside the weights
    folder = registry.resolve("default")["folder"]
    _, rows = read_tuning(registry.resources.files("karyo.models") / folder / "tuning.json")
    chosen = select_setting(rows)
    settings = {k: v for k, v in chosen.items() if k not in ("val_pq", "se_vs_best", "prompts")}
    assert {k: getattr(model.config, k) for k in settings} == settings


def test_damaged_weights_are_refused(tmp_path, monkeypatch):
    entry = registry.resolve("promptnucseg_cpu")
    source = registry.resources.files("karyo.models") / entry["folder"]
    copy = tmp_path / "pretrained" / "m"
    shutil.copytree(str(source), copy)
    raw = bytearray((copy / "segmentor.pt").read_bytes())
    raw[-100] ^= 0xFF
    (copy / "segmentor.pt").write_bytes(bytes(raw))
    fake = {"m": {**{k: v for k, v in entry.items() if k != "name"}, "folder": str(copy)}}
    monkeypatch.setattr(registry, "_registry", lambda: fake)
    with pytest.raises(karyo.InputError, match="checksum mismatch"):
        registry.load("m")


def test_load_and_segment_say_what_they_take_when_given_something_else(tmp_path):
    with pytest.raises(karyo.InputError, match=r"load takes a shipped model's name .* got int 123"):
        karyo.load(123)
    model = karyo.load("classical")
    with pytest.raises(karyo.InputError, match=r"got the file name 'tile\.png': read it first with karyo\.read_image"):
        model.segment("tile.png")
    with pytest.raises(karyo.InputError, match=r"no image given \(None\)"):
        model.segment(None)


def test_loading_a_training_run_says_how_to_get_a_model(tmp_path):
    """A prompter run (or its prompter export) is not a model: say so and how to pack one, not only
    "config.json: file not found"."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"task": "prompter"}))
    (run / "model" / "prompter.json").write_text("{}")
    with pytest.raises(karyo.InputError, match=r"a prompter training run, not a model; .*karyo pack promptnucseg"):
        karyo.load(run)
    with pytest.raises(karyo.InputError, match="the prompter of a training run, not a model"):
        karyo.load(run / "model")
    with pytest.raises(karyo.InputError, match="not a karyo model folder"):
        karyo.load(tmp_path)
    cellvit = tmp_path / "cv"  # a finished CellViT run: the run and its network both say how to pack them
    (cellvit / "model").mkdir(parents=True)
    (cellvit / "train_config.json").write_text(json.dumps({"task": "cellvit"}))
    (cellvit / "model" / "cellvit.json").write_text("{}")
    for folder in (cellvit, cellvit / "model"):
        with pytest.raises(karyo.InputError, match=rf"not a model yet: karyo pack cellvit --run {cellvit} --out"):
            karyo.load(folder)
    with pytest.raises(karyo.InputError, match=r"nowhere: model folder not found \(shipped models: .*default"):
        karyo.load(tmp_path / "nowhere")  # a path, not a name: not "unknown model"
    with pytest.raises(karyo.InputError, match="no model given"):
        karyo.load("")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(karyo.InputError, match=r"weights\.pt: a file, not a model: a model is a folder"):
        karyo.load(tmp_path / "weights.pt")


def test_cli_default_model_on_real_consep_patches(shared_data, tmp_path, one_thread):
    """`karyo segment` with the shipped model, then `karyo evaluate`, on three CoNSeP test patches (never used for
    training or model selection). Floors sit below what the model measures on them (see the model card)."""
    ids = ["test_1_005", "test_3_010", "test_7_002"]
    truth = tmp_path / "truth"
    for s in LayoutDataset(shared_data / "consep", ids=ids):
        write_layout_sample(truth, s)
    images = [str(truth / "images" / f"{i}.png") for i in ids]
    res = runner.invoke(app, ["segment", *images, "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    assert report["n_images"] == 3
    assert report["instance"]["pq"] > PQ_FLOOR
    assert report["detection"]["f1_d"] > F1D_FLOOR
    classes = pd.concat([pd.read_csv(p) for p in sorted((tmp_path / "pred" / "classes").glob("*.csv"))])
    assert set(classes.class_id) <= {1, 2, 3, 4} and classes.class_id.nunique() >= 2


def test_cellvit_cpu_ships_and_classifies_a_real_patch(shared_data, one_thread):
    model = karyo.load("cellvit_cpu")
    assert isinstance(model, CellViTModel)
    sample = LayoutDataset(shared_data / "consep", ids=["test_1_005"])[0]
    result = model.segment(sample.image)
    assert panoptic_quality(sample.instances, result.instances).pq > 0.2
    assert set(result.classes.values()) <= {1, 2, 3, 4} and len(result.classes) > 10
    result.to_sample()  # unclassified instances (class 0 from the NT vote) are valid
