"""PanNuke protocols on the real per-patch metadata (7,901 patches of ../shared/data/pannuke_meta)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from karyo.data.pannuke import PANNUKE_TISSUES
from karyo.data.protocols import (
    IVAAN_ORGAN_GROUPS,
    apply_protocol,
    ivaan_organ_group_splits,
    pannuke_official_splits,
    protocol_splits,
    read_pannuke_metadata,
)
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def meta(shared_data):
    return read_pannuke_metadata(shared_data / "pannuke_meta")


def test_metadata_indices_are_array_positions(meta):
    assert len(meta) == 7901
    for fold, n in {1: 2656, 2: 2523, 3: 2722}.items():
        idx = np.sort(meta.loc[meta.pannuke_fold == fold, "index"].to_numpy())
        np.testing.assert_array_equal(idx, np.arange(n))  # every position 0..N-1 of the fold's arrays, once
    assert set(meta.tissue) == set(PANNUKE_TISSUES)
    row = meta[meta.image == "0_100.png"].iloc[0]
    assert (row.pannuke_fold, row["index"], row.tissue) == (1, 100, "Breast")


def test_official_rotations(meta):
    splits = pannuke_official_splits()
    assert [(s.index, s.train.folds, s.val.folds, s.test.folds) for s in splits] == [
        (1, (1,), (2,), (3,)), (2, (2,), (1,), (3,)), (3, (3,), (2,), (1,))]
    sizes = {1: 2656, 2: 2523, 3: 2722}
    for s in splits:
        parts = apply_protocol(s, meta)
        assert {k: len(v) for k, v in parts.items()} == {
            "train": sizes[s.train.folds[0]], "val": sizes[s.val.folds[0]], "test": sizes[s.test.folds[0]]}
        assert {f for f, _ in parts["test"]} == set(s.test.folds)
        everything = parts["train"] + parts["val"] + parts["test"]
        assert len(set(everything)) == len(everything) == 7901


def test_ivaan_groups_spelled_as_in_metadata(meta):
    listed = [t for names in IVAAN_ORGAN_GROUPS.values() for t in names]
    assert len(listed) == 19 and set(listed) == set(meta.tissue)
    assert {"Bile-duct", "HeadNeck", "Adrenal_gland", "Pancreatic"} <= set(listed)
    assert IVAAN_ORGAN_GROUPS[4] == ("Stomach", "HeadNeck", "Cervix", "Breast", "Adrenal_gland")


def test_ivaan_organ_group_cv(meta):
    splits = ivaan_organ_group_splits()
    assert [s.index for s in splits] == [1, 2, 3, 4] and all(s.val is None for s in splits)
    tissue_of = dict(zip(zip(meta.pannuke_fold, meta["index"], strict=True), meta.tissue, strict=True))
    dead_of = dict(zip(zip(meta.pannuke_fold, meta["index"], strict=True), meta.Dead, strict=True))
    tested: list[tuple[int, int]] = []
    dead = []
    for s in splits:
        parts = apply_protocol(s, meta)
        assert parts["val"] == []
        assert len(parts["train"]) + len(parts["test"]) == 7901
        train_t = {tissue_of[k] for k in parts["train"]}
        test_t = {tissue_of[k] for k in parts["test"]}
        assert not train_t & test_t
        assert test_t == set(IVAAN_ORGAN_GROUPS[s.index])
        assert {f for f, _ in parts["test"]} == {1, 2, 3}  # a group is tested on all three folds
        tested += parts["test"]
        dead.append(sum(dead_of[k] for k in parts["test"]))
    # Hand sums of the per-tissue patch counts (e.g. group 1 = Lung 184 + Bladder 146 + Kidney 134 + Prostate 182).
    sizes = [len(apply_protocol(s, meta)["test"]) for s in splits]
    assert sizes == [646, 2242, 1402, 3611]
    assert len(tested) == len(set(tested)) == 7901  # every patch in exactly one test group
    # IVAAN grouped organs by dead nuclei (~5000, 1500, 1000, 1000): group 1 dominates, the others are close.
    assert dead == [1729, 523, 319, 337]


def test_unknown_protocol_and_bad_tables(meta, tmp_path):
    with pytest.raises(ValueError, match="unknown protocol 'loo'"):
        protocol_splits("loo")
    assert len(protocol_splits("ivaan-organ-groups")) == 4
    bad = meta.copy()
    bad.loc[0, "tissue"] = "Head&Neck"
    with pytest.raises(ValueError, match=r"unknown tissue name\(s\) \['Head&Neck'\]"):
        apply_protocol(pannuke_official_splits()[0], bad)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['index'\]"):
        apply_protocol(pannuke_official_splits()[0], meta.drop(columns="index"))
    path = tmp_path / "m.csv"
    pd.DataFrame({"pannuke_fold": [1], "image": ["1_0.png"], "tissue": ["Breast"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"m\.csv: image name fold prefixes .* disagree with pannuke_fold"):
        read_pannuke_metadata(path)
    pd.DataFrame({"pannuke_fold": [1], "image": ["0_0.png"], "tissue": ["Brain"]}).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"m\.csv: unknown tissue name\(s\) \['Brain'\]"):
        read_pannuke_metadata(path)
