"""Discrete attribute levels (quantile bins fitted on training nuclei) and the per-nucleus sentences they give.

An attribute with n level words gets n bins cut at the training quantiles 1/n, …, (n−1)/n; a value is in level
``searchsorted(thresholds, value, side="right")`` (so a value equal to a threshold goes to the upper bin), and
a missing value (NaN) has level −1 and is left out of the sentence. ``mode="per_class"`` fits the thresholds
on each class separately ("large" then means large for that class); a class unseen in training, or seen with
fewer than ``min_class_count`` values, uses the global thresholds.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from karyo.attributes import names as N
from karyo.data.io import write_text
from karyo.errors import InputError
from karyo.text.prompts import describe, level_words, prompts_version

GLOBAL = "*"


@dataclass
class LevelModel:
    """Fitted level thresholds: ``thresholds[attribute][class name or "*"]`` = ascending cut points."""

    attributes: list[str]
    thresholds: dict[str, dict[str, list[float]]]
    mode: str = "global"
    class_column: str = N.CLASS_NAME
    prompts_version: int = 1
    n_train: int = 0
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, df: pd.DataFrame, attributes: Sequence[str] = N.PAPER_SELECTION, *, mode: str = "global",
            class_column: str = N.CLASS_NAME, valid_only: bool = True, min_class_count: int = 10
            ) -> LevelModel:
        """Fit the thresholds on a training attribute table (flagged nuclei left out by default)."""
        if mode not in ("global", "per_class"):
            raise ValueError("mode must be 'global' or 'per_class'")
        cols = [N.resolve(a) for a in attributes]
        rows = df[df["Flag.Valid"].to_numpy(dtype=bool)] if valid_only and "Flag.Valid" in df.columns else df
        if mode == "per_class" and class_column not in rows.columns:
            raise KeyError(f"per-class levels need the class column {class_column!r}")
        if len(rows) < min_class_count:
            warnings.warn(f"attribute levels fitted on {len(rows)} nuclei: the words (small ... large, pale ... dark) "
                          f"compare each nucleus with so few others that they say little; fit them on a dataset and "
                          f"reuse its levels.json (--levels)", stacklevel=2)
        thresholds: dict[str, dict[str, list[float]]] = {}
        for col in cols:
            n_levels = len(level_words(col))
            qs = np.arange(1, n_levels) / n_levels
            values = rows[col].to_numpy(dtype=np.float64)
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                raise ValueError(f"no finite training values for {col!r}")
            per = {GLOBAL: np.quantile(finite, qs).tolist()}
            if mode == "per_class":
                labels = rows[class_column].astype(str).to_numpy()
                for name in sorted(set(labels) - {""}):
                    v = values[(labels == name) & np.isfinite(values)]
                    if v.size >= min_class_count:
                        per[name] = np.quantile(v, qs).tolist()
            thresholds[col] = per
        return cls(attributes=cols, thresholds=thresholds, mode=mode, class_column=class_column,
                   prompts_version=prompts_version(), n_train=len(rows))

    def levels(self, df: pd.DataFrame) -> pd.DataFrame:
        """Level index per nucleus and attribute (−1 where the value is missing)."""
        out = {}
        classes = (df[self.class_column].astype(str).to_numpy()
                   if self.mode == "per_class" and self.class_column in df.columns else None)
        for col in self.attributes:
            if col not in df.columns:
                raise KeyError(f"table has no column {col!r}")
            values = df[col].to_numpy(dtype=np.float64)
            per = self.thresholds[col]
            lev = np.searchsorted(np.asarray(per[GLOBAL]), values, side="right")
            if classes is not None:
                for name, cuts in per.items():
                    if name != GLOBAL:
                        sel = classes == name
                        lev[sel] = np.searchsorted(np.asarray(cuts), values[sel], side="right")
            lev = np.where(np.isnan(values), -1, lev)
            out[col] = lev.astype(np.int64)
        return pd.DataFrame(out, index=df.index)

    def sentences(self, df: pd.DataFrame, *, with_class: bool = False) -> pd.Series:
        """One sentence per nucleus (distinct level combinations are described once)."""
        lev = self.levels(df)
        if with_class:
            lev = lev.assign(_cls=df[self.class_column].astype(str).to_numpy())
        keys = [tuple(r) for r in lev.itertuples(index=False, name=None)]
        cache: dict[tuple, str] = {}
        out = []
        for key in keys:
            text = cache.get(key)
            if text is None:
                levels = dict(zip(self.attributes, key[:len(self.attributes)], strict=True))
                cls_name = key[-1] if with_class else None
                text = cache[key] = describe(levels, class_name=cls_name or None)
            out.append(text)
        return pd.Series(out, index=df.index, name="Text.Prompt", dtype=object)

    # ------------------------------------------------------------------------------------------ saving
    def to_json(self) -> str:
        return json.dumps({"format": "karyo.text.LevelModel", **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> LevelModel:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, f"not a level model JSON ({exc})") from None
        if data.pop("format", None) != "karyo.text.LevelModel":
            raise InputError(source, "not a karyo level model (missing format tag)")
        model = cls(**data)
        for col in model.attributes:
            if col not in model.thresholds or GLOBAL not in model.thresholds[col]:
                raise InputError(source, f"level model lacks the global thresholds of {col!r}")
        return model

    def save(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LevelModel:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "level model file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(path, "not a level model: a levels.json that karyo attributes wrote is UTF-8 JSON, "
                                   "this file is binary") from None
        model = cls.from_json(text, str(path))
        current = prompts_version()
        if model.prompts_version != current:
            warnings.warn(f"{path}: fitted with prompts version {model.prompts_version}, the installed prompts "
                          f"are version {current}; sentences may differ from training", stacklevel=2)
        return model
