"""Training data: several datasets mixed into one, their classes mapped onto the model's, and a
validation split that never shares a source image with training.

A data spec is written ``PATH[:SPLIT][@CLASSES]`` on the command line, e.g.
``../shared/data/consep:train`` (classes kept), ``../shared/data/nucls_examples:train@none`` (nuclei only:
classes not used for the class head), ``data/x@1=3,2=0`` (dataset class 1 → model class 3, 2 → unknown).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from karyo.data.datasets import open_dataset
from karyo.data.sample import ConcatSamples, Sample, SampleSequence
from karyo.errors import InputError


@dataclass
class DataSpec:
    """One training dataset: where it is, which split, and how its classes map onto the model's.

    ``classes``: ``"keep"`` (dataset ids are model ids), ``"none"`` (every nucleus has unknown class 0: it
    trains detection and segmentation, not classification), or an explicit ``class_map``.
    """

    path: str
    split: str | None = None
    classes: str = "keep"
    class_map: dict[int, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        classes, class_map = "keep", {}
        if "@" in text:
            text, spec = text.rsplit("@", 1)
            if spec in ("keep", "none"):
                classes = spec
            else:
                classes = "map"
                try:
                    class_map = {int(a): int(b) for a, b in (p.split("=") for p in spec.split(",") if p)}
                except ValueError:
                    raise InputError(None, f"class map must look like 1=3,2=0; got {spec!r}") from None
        split = None
        m = re.fullmatch(r"(.*?):([A-Za-z0-9_,-]+)", text)
        if m and not Path(text).exists():
            text, split = m.group(1), m.group(2)
        return cls(path=text, split=split, classes=classes, class_map=class_map)

    def __str__(self) -> str:
        out = self.path + (f":{self.split}" if self.split else "")
        if self.classes == "none":
            return out + "@none"
        if self.classes == "map":
            return out + "@" + ",".join(f"{a}={b}" for a, b in sorted(self.class_map.items()))
        return out


class MappedSamples(SampleSequence):
    """A dataset whose class ids are translated to the model's (0 = unknown class) on the fly."""

    def __init__(self, base: SampleSequence, spec: DataSpec, class_names: dict[int, str] | None):
        self.base, self.spec = base, spec
        self.class_names = class_names
        self._ids = list(base.ids)

    def _load(self, i: int) -> Sample:
        s = self.base[i]
        if s.instances is None:
            raise InputError(s.source or s.name, "training needs an instance map of this image (in a karyo layout: "
                                                 "instances/<id>.png or .tif beside images/; docs/data.md)")
        ids = np.unique(s.instances)
        ids = ids[ids > 0].tolist()
        if self.spec.classes == "none" or s.classes is None:
            classes = dict.fromkeys(ids, 0)
        elif self.spec.classes == "map":
            classes = {k: self.spec.class_map.get(v, 0) for k, v in s.classes.items()}
            classes.update({k: 0 for k in ids if k not in classes})
        else:
            classes = {k: s.classes.get(k, 0) for k in ids}
        return Sample(image=s.image, instances=s.instances, classes=classes, name=s.name, tissue=s.tissue,
                      class_names=None, mpp=s.mpp, channel_names=s.channel_names, source=s.source,
                      meta={**s.meta, "dataset": self.spec.path})


def load_specs(specs: Sequence[DataSpec | str], class_names: dict[int, str] | None = None) -> SampleSequence:
    """Open every spec and concatenate them (lazily) with classes mapped onto the model's."""
    parts = []
    for spec in specs:
        spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
        parts.append(MappedSamples(open_dataset(spec.path, split=spec.split), spec, class_names))
    if not parts:
        raise InputError(None, "no training data given")
    return parts[0] if len(parts) == 1 else ConcatSamples(parts)


def test_images_trained_on(specs: Sequence[DataSpec]) -> list[str]:
    """A note per dataset given without ``:SPLIT`` whose split.csv marks images ``test``: all of its images train,
    those too, which is what a user asking for the whole folder means only sometimes (karyo's own configs do
    it on purpose for ``pannuke_breast_demo``, which has no train split)."""
    from karyo.data.layout import LayoutDataset

    lines = []
    for spec in specs:
        if spec.split is not None:
            continue
        try:
            splits = LayoutDataset(spec.path).splits
        except (InputError, OSError):
            continue  # another format, or not there: open_dataset says so when the data are read
        tests = len(splits.get("test", []))
        if tests:
            only_train = DataSpec(path=spec.path, split="train", classes=spec.classes, class_map=spec.class_map)
            lines.append(f"note: {spec.path}: no :SPLIT given, so all its images are used (for training and "
                         f"validation), including the {tests} its split.csv marks test; give {only_train} to "
                         f"leave those out")
    return lines


def source_group(name: str) -> str:
    """The source image a patch was cut from: ``train_12_003`` → ``train_12`` (CoNSeP's naming); names without
    a numeric patch suffix are their own group.

    Groups are not qualified by dataset, so equal names from two datasets share a group (NuCLS ``train_2`` and
    CoNSeP's ``train_2_*`` patches). That only holds them out together and never lets a source image straddle
    the split; qualifying them would redraw the split of every config that relies on ``val_fraction``."""
    m = re.fullmatch(r"(.+)_\d+", name)
    return m.group(1) if m and re.search(r"_\d+$", m.group(1)) else name


def group_split(names: Sequence[str], val_fraction: float, seed: int = 0,
                item_classes: Sequence[set[int]] | None = None, tries: int = 500) -> tuple[list[int], list[int]]:
    """Indices (train, val) with whole source images held out, so neighbouring patches never straddle the
    split. Deterministic for a seed.

    With ``item_classes`` (the class ids present in each item), the held-out groups are redrawn (seed, seed + 1,
    ...) until both sides contain every class that occurs in at least two groups: a validation set without the
    largest class cannot select a classifier. The first draw that covers most classes wins if none covers all.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    group_of = [source_group(n) for n in names]
    groups = sorted(set(group_of))
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and n_val == 0 and len(groups) > 1:
        n_val = 1
    group_classes: dict[str, set[int]] = {g: set() for g in groups}
    if item_classes is not None:
        for g, cls in zip(group_of, item_classes, strict=True):
            group_classes[g] |= {int(c) for c in cls if c > 0}
    counts: dict[int, int] = {}
    for cls in group_classes.values():
        for c in cls:
            counts[c] = counts.get(c, 0) + 1
    required = {c for c, k in counts.items() if k >= 2}

    def draw(k: int) -> set[str]:
        order = np.random.default_rng(seed + k).permutation(len(groups))
        return {groups[i] for i in order[:n_val]}

    best, best_cover = draw(0), -1
    for k in range(tries if required else 1):
        val_groups = draw(k)
        in_val = set().union(*(group_classes[g] for g in val_groups)) if val_groups else set()
        in_train = set().union(*(group_classes[g] for g in groups if g not in val_groups))
        cover = len(required & in_val & in_train)
        if cover > best_cover:
            best, best_cover = val_groups, cover
        if cover == len(required):
            break
    train = [i for i, g in enumerate(group_of) if g not in best]
    val = [i for i, g in enumerate(group_of) if g in best]
    return train, val


def describe(specs: Sequence[DataSpec]) -> list[str]:
    return [str(s) for s in specs]


def existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(p, "not found")
    return p
