"""Prompt file, sentence generation from levels, and fitted level thresholds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from karyo.attributes.names import B1_ATTRIBUTES, PAPER_SELECTION
from karyo.errors import InputError
from karyo.text import (
    PROMPTS_FILE,
    LevelModel,
    class_prompts,
    class_prompts_for,
    describe,
    level_words,
    load_prompts,
    prompts_version,
)


def test_prompt_file_is_versioned_and_covers_every_b1_attribute():
    raw = yaml.safe_load(PROMPTS_FILE.read_text(encoding="utf-8"))
    assert isinstance(raw["version"], int) and prompts_version() == raw["version"]
    for col in B1_ATTRIBUTES:
        words = level_words(col)
        assert len(words) == 3 and len(set(words)) == 3, col


def test_sentence_from_levels_matches_the_example():
    levels = {"Size.EquivalentDiameter": 2, "Shape.Eccentricity": 0, "Color.HematoxylinZ": 2,
              "Shape.PerimeterRatio": 0}
    assert describe(levels) == "a large, round, darkly stained nucleus with a smooth contour"
    levels = {"size": 0, "eccentricity": 2, "color_z": 0, "perim_ratio": 2}
    assert describe(levels) == "a small, elongated, lightly stained nucleus with an irregular contour"


def test_sentence_articles_phrases_and_missing_levels():
    assert describe({"Shape.Eccentricity": 1}) == "an oval nucleus"
    assert describe({"Shape.PerimeterRatio": 1, "Texture.HematoxylinVarianceZ": 2, "Boundary.GradientMean": 2}) == (
        "a nucleus with a slightly irregular contour, coarse chromatin and a sharp boundary")
    assert describe({"Size.EquivalentDiameter": -1, "Shape.Eccentricity": 0}) == "a round nucleus"
    assert describe({"Size.EquivalentDiameter": -1}) == "a nucleus"
    assert describe({"Size.EquivalentDiameter": 1}, class_name="epithelial") == (
        "a medium-sized epithelial nucleus")
    assert describe({}, class_name="inflammatory") == "an inflammatory nucleus"


def test_class_prompts_cover_the_datasets():
    pannuke = class_prompts("pannuke")
    assert set(pannuke) == {"neoplastic", "inflammatory", "connective", "dead", "epithelial", "background"}
    consep = class_prompts("consep")
    assert set(consep) == {"other", "inflammatory", "epithelial", "spindle-shaped", "background"}
    for name in ("nucls", "pannuke_breast_demo"):
        assert len(class_prompts(name)) == 3
    for sets in load_prompts()["class_prompts"].values():
        for sentences in sets.values():
            assert len(sentences) >= 3 and len(set(sentences)) == len(sentences)
    with pytest.raises(KeyError, match="available"):
        class_prompts("monuseg")


def test_class_prompts_match_the_shared_datasets_class_names(shared_data):
    for folder, key in (("consep", "consep"), ("nucls_examples", "nucls"),
                        ("pannuke_breast_demo", "pannuke_breast_demo")):
        names = {int(k): v for k, v in json.loads((shared_data / folder / "classes.json").read_text()).items()}
        by_id = class_prompts_for(names, key)
        assert set(by_id) == {0, *names}


def _train(seed: int = 0, n: int = 900) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cls = np.where(np.arange(n) % 3 == 0, "big", "small")
    size = np.where(cls == "big", 20.0, 10.0) + rng.normal(size=n)
    return pd.DataFrame({"Size.EquivalentDiameter": size, "Shape.Eccentricity": rng.uniform(0, 1, n),
                         "Color.HematoxylinZ": rng.normal(size=n), "Shape.PerimeterRatio": rng.uniform(1, 1.3, n),
                         "Class.Name": cls, "Flag.Valid": True})


def test_global_levels_are_tertiles_of_the_training_values():
    df = _train()
    model = LevelModel.fit(df)
    assert model.attributes == list(PAPER_SELECTION)
    lev = model.levels(df)
    for col in model.attributes:
        counts = np.bincount(lev[col], minlength=3)
        assert counts.tolist() == pytest.approx([300, 300, 300], abs=2), col
        cuts = model.thresholds[col]["*"]
        assert cuts == pytest.approx(np.quantile(df[col], [1 / 3, 2 / 3]).tolist())
    # a value equal to a cut goes to the upper level; NaN has no level
    probe = df.iloc[:3].copy()
    probe["Shape.Eccentricity"] = [model.thresholds["Shape.Eccentricity"]["*"][0], np.nan, -5.0]
    assert model.levels(probe)["Shape.Eccentricity"].tolist() == [1, -1, 0]


def test_per_class_levels_and_fallback_for_unknown_classes():
    df = _train()
    model = LevelModel.fit(df, mode="per_class")
    lev = model.levels(df)
    for name in ("big", "small"):
        counts = np.bincount(lev.loc[df["Class.Name"] == name, "Size.EquivalentDiameter"], minlength=3)
        assert counts.min() >= counts.sum() / 3 - 2  # tertiles within each class
    unseen = df.iloc[:1].assign(**{"Class.Name": "never-seen"})
    glob = LevelModel.fit(df).levels(unseen)
    assert model.levels(unseen).equals(glob)


def test_level_model_json_round_trip(tmp_path):
    model = LevelModel.fit(_train(), mode="per_class")
    path = model.save(tmp_path / "levels.json")
    again = LevelModel.load(path)
    assert again == model
    df = _train(1)
    assert again.sentences(df).equals(model.sentences(df))
    with pytest.raises(InputError):
        LevelModel.from_json('{"attributes": []}')
    with pytest.raises(InputError, match="not found"):
        LevelModel.load(tmp_path / "missing.json")


def test_sentences_per_nucleus():
    df = _train()
    s = LevelModel.fit(df).sentences(df)
    assert len(s) == len(df) and s.name == "Text.Prompt"
    assert s.str.endswith("contour").all() and s.str.contains("nucleus").all()
    assert 20 <= s.nunique() <= 81  # 3 levels × 4 attributes
    with_cls = LevelModel.fit(df).sentences(df, with_class=True)
    assert with_cls.str.contains("big nucleus|small nucleus").all()


def test_an_attribute_without_words_is_refused_with_the_ones_that_have_them_as_the_cli_help_lists():
    import typer

    from karyo.attributes import names as N
    from karyo.cli import app
    from karyo.text.prompts import level_words, load_prompts

    described = [N.paper_name(c) for c in load_prompts()["attributes"]]
    with pytest.raises(KeyError, match="the attributes it describes: " + ", ".join(described)):
        level_words("Size.Perimeter")
    with pytest.raises(KeyError, match="no level words for 'foo' in the prompts file; the attributes it describes"):
        level_words("foo")  # not the generic "unknown attribute ... such as <a column without words>"
    [option] = [p for p in typer.main.get_command(app).commands["attributes"].params if p.name == "prompt_attributes"]
    help_text = " ".join(option.help.split())
    assert "the prompts have words for (paper name or column): " + ", ".join(described) + "." in help_text
