"""Prompt texts: the versioned ``prompts.yaml`` (level words, sentence template, class descriptions) and the
sentence of a nucleus built from its attribute levels."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from karyo.attributes import names as N

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")


@functools.lru_cache(maxsize=8)
def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    _check(data, path)
    return data


def load_prompts(path: str | os.PathLike | None = None) -> dict:
    """The prompt data (parsed and checked); ``path`` defaults to the bundled ``prompts.yaml``."""
    return _load(str(Path(path) if path is not None else PROMPTS_FILE))


def prompts_version(path: str | os.PathLike | None = None) -> int:
    return int(load_prompts(path)["version"])


def _check(data: dict, path: str) -> None:
    if not isinstance(data, dict) or "version" not in data:
        raise ValueError(f"{path}: prompt file needs a top-level 'version' key")
    for key in ("sentence", "attributes", "class_prompts"):
        if key not in data:
            raise ValueError(f"{path}: missing section {key!r}")
    for attr, spec in data["attributes"].items():
        words = spec.get("levels")
        if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}: attribute {attr!r} needs a list of at least two level words")
        if spec.get("position") not in ("adjective", "phrase"):
            raise ValueError(f"{path}: attribute {attr!r} position must be 'adjective' or 'phrase'")


def level_words(attribute: str, path: str | os.PathLike | None = None) -> list[str]:
    """Words of an attribute's levels, lowest first (attribute as column, paper name or alias)."""
    described = load_prompts(path)["attributes"]
    try:
        col = N.resolve(attribute)
    except KeyError:
        col = None
    spec = described.get(col) if col is not None else None
    if spec is None:
        raise KeyError(f"no level words for {attribute!r} in the prompts file; the attributes it describes: "
                       f"{', '.join(N.paper_name(c) for c in described)}")
    return list(spec["levels"])


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join_phrases(items: Sequence[str]) -> str:
    if not items:
        return ""
    if len(items) == 1:
        return " with " + items[0]
    return " with " + ", ".join(items[:-1]) + " and " + items[-1]


def describe(levels: Mapping[str, int], class_name: str | None = None,
             path: str | os.PathLike | None = None) -> str:
    """Sentence for one nucleus from ``{attribute column: level index}`` (a negative level is left out).

    Adjectives appear in the order of ``levels``: {"Size.EquivalentDiameter": 2, "Shape.Eccentricity": 0,
    "Color.HematoxylinZ": 2, "Shape.PerimeterRatio": 0} → "a large, round, darkly stained nucleus with a smooth
    contour".
    """
    data = load_prompts(path)
    adjectives, phrases = [], []
    for attr, level in levels.items():
        if level is None or int(level) < 0:
            continue
        spec = data["attributes"][N.resolve(attr)]
        word = spec["levels"][int(level)]
        (adjectives if spec["position"] == "adjective" else phrases).append(word)
    sent = data["sentence"]
    if not adjectives and not phrases:
        if class_name:
            return sent["fallback_with_class"].format(article=_article(class_name), class_name=class_name)
        return sent["fallback"]
    template = sent["template_with_class"] if class_name else sent["template"]
    adj = ", ".join(adjectives)
    first = adj or class_name or "nucleus"
    text = template.format(article=_article(first), adjectives=adj, class_name=class_name or "",
                           phrases=_join_phrases(phrases))
    return " ".join(text.split())


def class_prompts(dataset: str, path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Class description sentences of a dataset (``pannuke``, ``consep``, ``nucls``, ``pannuke_breast_demo``),
    including ``background``."""
    sets = load_prompts(path)["class_prompts"]
    key = dataset.lower()
    if key not in sets:
        raise KeyError(f"no class prompts for dataset {dataset!r}; available: {', '.join(sorted(sets))}")
    return {str(k): list(v) for k, v in sets[key].items()}


def class_prompts_for(class_names: Mapping[int, str], dataset: str,
                      path: str | os.PathLike | None = None) -> dict[int, list[str]]:
    """Class descriptions keyed by class id (0 = background), matching names case-insensitively."""
    table = {k.lower(): v for k, v in class_prompts(dataset, path).items()}
    out: dict[int, list[str]] = {0: table["background"]}
    for cid, name in class_names.items():
        if name.lower() not in table:
            raise KeyError(f"dataset {dataset!r} prompts have no class {name!r}; have {sorted(table)}")
        out[int(cid)] = table[name.lower()]
    return out
