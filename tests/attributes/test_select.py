"""IVAAN B.2 selection: Cohen's d, S_global/S_class/S_overall, redundancy, greedy J."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from karyo.attributes.select import cohens_d, select_attributes


def test_cohens_d_uses_pooled_unbiased_sd():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([3.0, 5.0, 7.0])
    sp = math.sqrt((3 * np.var(x, ddof=1) + 2 * np.var(y, ddof=1)) / 5)
    assert cohens_d(x, y) == pytest.approx((2.5 - 5.0) / sp)
    assert cohens_d(x, [1.0]) != cohens_d(x, [1.0])  # NaN: one value has no variance
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert cohens_d([2.0, 2.0], [1.0, 1.0]) == np.inf  # constant and different: perfect separation


def _table(columns: dict[str, np.ndarray], classes: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({**columns, "Class.Name": classes, "Flag.Valid": True})


def test_scores_follow_the_formulas_on_a_small_example():
    # class A: 0, 2   class B: 4, 6   class C: 1, 3 (each SD √2): |d| = A–B 2.83, A–C 0.71, B–C 2.12
    values = np.array([0.0, 2.0, 4.0, 6.0, 1.0, 3.0])
    classes = np.array(["A", "A", "B", "B", "C", "C"])
    other = np.array([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # no separation at all
    res = select_attributes(_table({"m": values, "z": other}, classes), ["m", "z"], k=2)
    s = math.sqrt(2.0)
    d_ab, d_ac, d_bc = 4 / s, 1 / s, 3 / s
    row = res.table.loc["m"]
    assert row["S_global"] == pytest.approx(d_bc)  # median of (2.83, 0.71, 2.12)
    assert row["S_class[A]"] == pytest.approx((d_ab + d_ac) / 2)
    assert row["S_class[B]"] == pytest.approx((d_ab + d_bc) / 2)
    assert row["S_class[C]"] == pytest.approx((d_ac + d_bc) / 2)
    mean_class = ((d_ab + d_ac) / 2 + (d_ab + d_bc) / 2 + (d_ac + d_bc) / 2) / 3
    assert row["S_overall"] == pytest.approx(0.5 * d_bc + 0.5 * mean_class)
    assert res.table.loc["z", "S_overall"] == 0.0
    assert res.selected == ["m", "z"]
    rho = abs(np.corrcoef(values, other)[0, 1])
    assert res.table.loc["z", "R_at_selection"] == pytest.approx(rho)
    assert res.table.loc["z", "J_at_selection"] == pytest.approx(0.0 - 0.4 * rho)
    assert res.pairwise_d.loc["m", "A vs B"] == pytest.approx(d_ab)


def _planted(seed: int = 0, n: int = 400) -> pd.DataFrame:
    """Four classes and three planted attributes, each separating them along an orthogonal contrast (so they
    are uncorrelated): a (S ≈ 3.3), b and c (S ≈ 3.2); a_twin = a + small noise (S ≈ 3.24, ρ(a, a_twin) ≈ 0.98);
    two pure-noise attributes (S ≈ 0)."""
    rng = np.random.default_rng(seed)
    code = np.repeat([0, 1, 2, 3], n)
    cls = np.array(["p", "q", "r", "s"])[code]
    a = np.array([0.0, 0.0, 3.3, 3.3])[code] + rng.normal(size=code.size)
    b = np.array([0.0, 3.2, 0.0, 3.2])[code] + rng.normal(size=code.size)
    c = np.array([0.0, 3.2, 3.2, 0.0])[code] + rng.normal(size=code.size)
    twin = a + 0.2 * rng.normal(size=code.size)
    return _table({"noise1": rng.normal(size=code.size), "a": a, "a_twin": twin, "b": b, "c": c,
                   "noise2": rng.normal(size=code.size)}, cls)


CANDIDATES = ["noise1", "a", "a_twin", "b", "c", "noise2"]


def test_planted_attributes_are_chosen_and_the_redundant_twin_is_not():
    df = _planted()
    res = select_attributes(df, CANDIDATES, k=3)
    assert res.selected == ["a", "b", "c"] or res.selected == ["a", "c", "b"]
    # the twin separates the classes almost as well as a, better than b and c ...
    s = res.table["S_overall"]
    assert s["a_twin"] > max(s["b"], s["c"])
    # ... so without the redundancy penalty it is picked second
    no_penalty = select_attributes(df, CANDIDATES, k=3, lam=0.0)
    assert no_penalty.selected[:2] == ["a", "a_twin"]
    # the full score table is returned, with every candidate and the greedy objective of every step
    assert list(res.table.index) == CANDIDATES
    assert res.greedy.shape == (6, 3)
    assert res.greedy.loc["a_twin", "J@2"] == pytest.approx(
        s["a_twin"] - 0.4 * abs(res.correlation.loc["a", "a_twin"]))
    assert res.table["selected"].notna().sum() == 3


def test_nan_values_and_rows_outside_the_analysis_are_left_out():
    df = _planted(1, n=100)
    df.loc[df.index[:50], "c"] = np.nan  # some missing values
    df["Flag.Valid"] = True
    df.loc[df.index[-10:], "Flag.Valid"] = False
    df.loc[df.index[-10:], "a"] = 1e6  # outliers on excluded rows must not matter
    res = select_attributes(df, ["a", "b", "c"], k=2)
    assert res.params["n_nuclei"] == 390
    assert np.isfinite(res.table["S_overall"]).all()
    assert res.table.loc["a", "S_overall"] > 1.5


def test_constant_attribute_and_single_class_are_handled():
    df = _planted(2, n=50)
    df["const"] = 1.0
    res = select_attributes(df, ["a", "const"], k=2)
    assert res.table.loc["const", "S_overall"] == 0.0
    with pytest.raises(ValueError, match="two classes"):
        select_attributes(df[df["Class.Name"] == "p"], ["a"])
    lone = pd.concat([df[df["Class.Name"] == "p"], df[df["Class.Name"] != "p"].iloc[:1]])  # a second class of one
    with pytest.raises(ValueError, match=r"two classes with 2 or more valid nuclei each.*class: p 50, q 1$"):
        select_attributes(lone, ["a"])
    with pytest.raises(ValueError, match="k must be at least 1"):
        select_attributes(df, ["a", "const"], k=0)


def test_paper_names_are_accepted(shared_data):
    from karyo.attributes.table import measure_samples
    from karyo.data.layout import LayoutDataset

    df = measure_samples(LayoutDataset(shared_data / "pannuke_breast_demo")[:6])
    res = select_attributes(df, ["size", "eccentricity", "color_z", "perim_ratio"], k=2)
    assert res.selected[0] == "Size.EquivalentDiameter"
    assert res.selected_paper_names[0] == "d_eq"
