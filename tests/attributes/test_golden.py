"""Golden attribute table of one real CoNSeP patch (train_26_003: 22 nuclei, 3 classes, 2 of them flagged).

How the fixture was checked. ``fixtures/consep_train_26_003.csv`` was written once by ``measure_nuclei`` (default
Macenko normaliser and options; values with 10 significant digits). It is trusted because
:func:`test_fixture_matches_an_independent_implementation` recomputes it here, nucleus by nucleus, with plain
scikit-image/scipy code that shares nothing with karyo's vectorised implementation except the hematoxylin
channel: regionprops for area, perimeter, convex area, axes, extent; ``binary_erosion``/``binary_dilation`` for
M', the k×k core and the boundary band; ``skimage.filters.sobel`` for the gradient; z-scores over the valid
nuclei; brute-force centroid distances. That check covers all 22 nuclei (the brief asked for at least 3). I also
read the table against the image: nucleus 1 (601 px, an "other" cell) is the largest and palest
(color_z −1.94); the two flagged nuclei (4, 19) touch the top/right border, and 19 has 8 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.filters import sobel
from skimage.measure import regionprops

from karyo.attributes import measure_nuclei
from karyo.stain import hematoxylin

FIXTURE = Path(__file__).parent / "fixtures" / "consep_train_26_003.csv"
pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def sample(shared_data):
    from karyo.data.layout import LayoutDataset

    ds = LayoutDataset(shared_data / "consep", ids=["train_26_003"])
    return ds[0]


@pytest.fixture(scope="module")
def golden() -> pd.DataFrame:
    return pd.read_csv(FIXTURE).set_index("Identifier.Label")


def test_table_equals_golden_fixture(sample, golden):
    df = measure_nuclei(sample.image, sample.instances, sample.classes, class_names=sample.class_names)
    df = df.set_index("Identifier.Label")
    assert df.index.tolist() == golden.index.tolist()
    for col in golden.columns:
        got, want = df[col].to_numpy(), golden[col].to_numpy()
        if want.dtype == bool:
            assert got.tolist() == want.tolist(), col
        else:
            assert got.astype(float) == pytest.approx(want.astype(float), rel=1e-7, abs=1e-9, nan_ok=True), col


def _independent(image: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    h = hematoxylin(image).astype(np.float64)
    grad = sobel(h)
    height, width = labels.shape
    rows = []
    for p in regionprops(labels):
        mask = labels == p.label
        area = p.area
        d_eq = math.sqrt(4 * area / math.pi)
        er3 = ndi.binary_erosion(mask, np.ones((3, 3)), border_value=0)
        mprime = er3 if (area >= 30 and er3.any()) else mask
        k = int(np.clip(round(0.08 * d_eq), 2, 6))
        core = ndi.binary_erosion(mask, np.ones((k, k)), border_value=0)
        rim = mask & ~core
        band = ndi.binary_dilation(mask, np.ones((3, 3))) ^ er3
        r0, c0, r1, c1 = p.bbox
        rows.append({
            "Identifier.Label": p.label, "Identifier.CentroidX": p.centroid[1], "Identifier.CentroidY": p.centroid[0],
            "Size.Area": area, "Size.Perimeter": p.perimeter, "Size.ConvexHullArea": p.area_convex,
            "Size.EquivalentDiameter": d_eq, "Shape.Solidity": area / max(p.area_convex, 1e-6),
            "Shape.PerimeterRatio": p.perimeter / (2 * math.pi * d_eq / 2), "Shape.Eccentricity": p.eccentricity,
            "Shape.Extent": area / ((r1 - r0) * (c1 - c0)),
            "Shape.AspectRatio": p.axis_major_length / p.axis_minor_length,
            "c": h[mprime].mean(), "t": h[mprime].var(),
            "delta": h[core].mean() - h[rim].mean() if core.any() and rim.any() else np.nan,
            "Boundary.GradientMean": grad[band].mean(),
            "Flag.Truncated": r0 == 0 or c0 == 0 or r1 == height or c1 == width, "Flag.Small": area < 10,
        })
    df = pd.DataFrame(rows).set_index("Identifier.Label")
    df["Flag.Valid"] = ~df["Flag.Truncated"] & ~df["Flag.Small"]
    valid = df["Flag.Valid"].to_numpy()
    sigma_c = df["c"][valid].std(ddof=0) + 1e-6
    sigma_t = df["t"][valid].std(ddof=0) + 1e-6
    df["Color.HematoxylinZ"] = (df["c"] - df["c"][valid].mean()) / sigma_c
    df["Texture.HematoxylinVarianceZ"] = (df["t"] - df["t"][valid].mean()) / sigma_t
    df["Color.CoreRimContrastZ"] = df["delta"] / sigma_c
    xy = df[["Identifier.CentroidX", "Identifier.CentroidY"]].to_numpy()
    dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    df["Density.NearestNeighborDistance"] = dist.min(axis=1)
    return df.rename(columns={"c": "Color.HematoxylinRaw", "t": "Texture.HematoxylinVarianceRaw"})


def test_fixture_matches_an_independent_implementation(sample, golden):
    ref = _independent(sample.image, sample.instances)
    assert ref.index.tolist() == golden.index.tolist()
    for col in golden.columns:
        if col == "Class.Id":
            continue
        want = golden[col].to_numpy()
        if want.dtype == bool:
            assert ref[col].tolist() == want.tolist(), col
        else:
            # float32 hematoxylin: intensity statistics agree to ~1e-6 relative
            assert ref[col].to_numpy(dtype=float) == pytest.approx(want.astype(float), rel=2e-6, abs=1e-6), col
    assert golden.loc[[4, 19], "Flag.Valid"].tolist() == [False, False]
    assert golden["Class.Id"].tolist() == [sample.classes[i] for i in golden.index]
