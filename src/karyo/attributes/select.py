"""Attribute selection by class separability with a redundancy penalty (IVAAN supplement B.2).

For every candidate metric m and class pair (i, j): Cohen's d with the pooled unbiased SD (B.2 eq. d_ij, s_p);
S_global(m) = median over pairs of |d| (B.2 eq. S_global); S_class(m, c) = median over j ≠ c of |d_cj| (eq.
S_class); S_overall = α S_global + (1 − α) mean_c S_class (eq. S_overall). Greedy selection: m_1 = argmax
S_overall, then m_k = argmax J(m | A) = S_overall(m) − λ R(m | A), with R = mean |Pearson ρ| between m and the
already selected metrics over all nuclei (eq. R(m | A), J(m | A)).

Data choices (the paper does not state them): missing values (NaN, e.g. core_contrast_z of a nucleus without a
core) are left out per metric — per class for d, pairwise-complete for ρ. A class with fewer than
``min_class_size`` values of a metric gives NaN for its pairs; a pair with pooled SD 0 gives |d| = 0 when the
means are equal and +inf (perfect separation) otherwise; medians and means skip NaN, and a metric whose
S_overall is NaN is never selected. ρ is taken as 0 when undefined (a constant metric). Ties go to the earlier
candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from karyo.attributes import names as N


@dataclass
class SelectionResult:
    """Everything the selection computed; ``table`` has one row per candidate metric."""

    table: pd.DataFrame
    selected: list[str]
    pairwise_d: pd.DataFrame  # |d| per metric (rows) and class pair (columns)
    correlation: pd.DataFrame  # Pearson ρ between metrics
    greedy: pd.DataFrame  # J(m | A) of every candidate at every step (NaN once selected)
    class_counts: dict[str, int] = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def selected_paper_names(self) -> list[str]:
        return [N.paper_name(c) for c in self.selected]


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """Cohen's d of two samples with the pooled unbiased SD (B.2); NaN if a sample has < 2 values, ±inf if
    both are constant and differ."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if x.size < 2 or y.size < 2:
        return float("nan")
    return float(_d_from_stats(x.size, x.mean(), x.var(ddof=1), y.size, y.mean(), y.var(ddof=1)))


def _d_from_stats(n_i, mu_i, var_i, n_j, mu_j, var_j):
    n_i, n_j = np.asarray(n_i, dtype=np.float64), np.asarray(n_j, dtype=np.float64)
    pooled = np.sqrt(((n_i - 1.0) * var_i + (n_j - 1.0) * var_j) / (n_i + n_j - 2.0))  # B.2 eq. s_p
    diff = np.asarray(mu_i - mu_j, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = diff / pooled  # B.2 eq. d_ij
    return np.where(pooled > 0, d, np.where(diff == 0, 0.0, np.copysign(np.inf, diff)))


def select_attributes(df: pd.DataFrame, attributes: Sequence[str] = N.B1_ATTRIBUTES, *,
                      class_column: str = N.CLASS_NAME, k: int = 4, alpha: float = 0.5, lam: float = 0.4,
                      valid_only: bool = True, min_class_size: int = 2) -> SelectionResult:
    """Run the B.2 selection on an attribute table with a class column.

    ``attributes`` are columns of ``df`` (any numeric metric), paper names (``color_z``) or aliases (``size``);
    rows with an empty or
    missing class, and (``valid_only``) rows flagged as truncated or small, are left out.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1 (the number of attributes to select), got {k}")
    if lam < 0:
        raise ValueError("lam (λ) must be >= 0")
    cols = [a if a in df.columns else N.resolve(a) for a in attributes]
    if len(set(cols)) != len(cols):
        raise ValueError("an attribute is listed twice")
    missing = [c for c in [*cols, class_column] if c not in df.columns]
    if missing:
        raise KeyError(f"table has no column(s) {missing}")
    rows = df
    if valid_only and "Flag.Valid" in df.columns:
        rows = rows[rows["Flag.Valid"].to_numpy(dtype=bool)]
    labels = rows[class_column]
    keep = labels.notna() & (labels.astype(str) != "") & (labels.astype(str) != "0")
    rows, labels = rows[keep], labels[keep].astype(str)
    classes = sorted(labels.unique().tolist())
    if len(classes) < 2:
        raise ValueError(f"need at least two classes to measure separability, found {classes}")
    sizes = labels.value_counts()
    if int((sizes >= min_class_size).sum()) < 2:  # no pair of classes has a Cohen's d: nothing to rank
        counts = ", ".join(f"{c} {int(sizes[c])}" for c in classes)
        raise ValueError(f"need at least two classes with {min_class_size} or more valid nuclei each to measure "
                         f"separability; valid nuclei per class: {counts}")
    k = min(int(k), len(cols))
    values = rows[cols].astype(np.float64)

    grouped = values.groupby(labels.to_numpy())
    n_c = grouped.count().reindex(classes)
    mu_c = grouped.mean().reindex(classes)
    var_c = grouped.var(ddof=1).reindex(classes)

    pairs = list(combinations(range(len(classes)), 2))
    pair_names = [f"{classes[i]} vs {classes[j]}" for i, j in pairs]
    absd = np.full((len(cols), len(pairs)), np.nan)
    for p, (i, j) in enumerate(pairs):
        ni, nj = n_c.iloc[i].to_numpy(), n_c.iloc[j].to_numpy()
        d = _d_from_stats(ni, mu_c.iloc[i].to_numpy(), var_c.iloc[i].to_numpy(), nj, mu_c.iloc[j].to_numpy(),
                          var_c.iloc[j].to_numpy())
        ok = (ni >= min_class_size) & (nj >= min_class_size)
        absd[:, p] = np.where(ok, np.abs(d), np.nan)

    s_global = _nanmedian_rows(absd)  # B.2 eq. S_global
    s_class = np.full((len(cols), len(classes)), np.nan)
    for c in range(len(classes)):
        involved = [p for p, (i, j) in enumerate(pairs) if c in (i, j)]
        s_class[:, c] = _nanmedian_rows(absd[:, involved])  # B.2 eq. S_class
    s_overall = alpha * s_global + (1.0 - alpha) * _nanmean_rows(s_class)  # B.2 eq. S_overall

    corr = values.corr(method="pearson", min_periods=3)
    rho = np.nan_to_num(np.abs(corr.to_numpy()), nan=0.0)

    selected: list[int] = []
    greedy = np.full((len(cols), k), np.nan)
    r_at = np.full(len(cols), np.nan)
    j_at = np.full(len(cols), np.nan)
    for step in range(k):
        red = rho[:, selected].mean(axis=1) if selected else np.zeros(len(cols))  # B.2 eq. R(m | A)
        objective = s_overall - lam * red  # B.2 eq. J(m | A)
        objective[selected] = np.nan
        greedy[:, step] = objective
        if np.all(np.isnan(objective)):
            break
        best = int(np.nanargmax(objective))
        r_at[best], j_at[best] = red[best], objective[best]
        selected.append(best)

    order = np.full(len(cols), np.nan)
    order[selected] = np.arange(1, len(selected) + 1)
    table = pd.DataFrame({"attribute": cols, "paper_name": [N.paper_name(c) for c in cols],
                          "S_global": s_global, **{f"S_class[{c}]": s_class[:, i] for i, c in enumerate(classes)},
                          "S_overall": s_overall, "selected": order, "R_at_selection": r_at,
                          "J_at_selection": j_at})
    table = table.set_index("attribute")
    return SelectionResult(
        table=table,
        selected=[cols[i] for i in selected],
        pairwise_d=pd.DataFrame(absd, index=pd.Index(cols, name="attribute"), columns=pair_names),
        correlation=corr,
        greedy=pd.DataFrame(greedy, index=pd.Index(cols, name="attribute"),
                            columns=[f"J@{s + 1}" for s in range(k)]),
        class_counts={c: int((labels == c).sum()) for c in classes},
        params={"k": k, "alpha": alpha, "lam": lam, "valid_only": valid_only, "min_class_size": min_class_size,
                "n_nuclei": len(rows)},
    )


def _nanmedian_rows(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[0], np.nan)
    for r in range(a.shape[0]):
        v = a[r][~np.isnan(a[r])]
        if v.size:
            out[r] = np.median(v)
    return out


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[0], np.nan)
    for r in range(a.shape[0]):
        v = a[r][~np.isnan(a[r])]
        if v.size:
            out[r] = v.mean()
    return out
