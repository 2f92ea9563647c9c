"""B.1 attributes on hand-made shapes with known answers, and agreement with scikit-image's regionprops."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from skimage.filters import sobel
from skimage.measure import perimeter, regionprops

from karyo.attributes import AttributeOptions, measure_arrays, measure_nuclei
from karyo.attributes.measure import nearest_neighbour_distance
from karyo.attributes.names import ALL_COLUMNS, PAPER_NAMES, resolve
from karyo.errors import InputError


def _gray(shape, value=200):
    return np.full((*shape, 1), value, dtype=np.uint8)


def _rgb(shape, value=230):
    return np.full((*shape, 3), value, dtype=np.uint8)


def test_disk_is_round_convex_and_has_circle_perimeter():
    labels = np.zeros((80, 80), np.int32)
    labels[disk((40, 40), 20)] = 1
    row = measure_nuclei(_gray(labels.shape), labels).iloc[0]
    assert row["Shape.Eccentricity"] < 0.05
    assert row["Shape.Solidity"] > 0.98
    assert row["Size.EquivalentDiameter"] == pytest.approx(math.sqrt(4 * labels.sum() / math.pi))
    assert row["Size.EquivalentDiameter"] == pytest.approx(40.0, abs=1.0)
    # skimage's 4-neighbourhood perimeter estimate is ~5 % above the true circumference
    assert row["Shape.PerimeterRatio"] == pytest.approx(1.0, abs=0.08)
    assert row["Size.Perimeter"] == pytest.approx(perimeter(labels == 1, 4), rel=1e-12)
    assert row["Shape.AspectRatio"] == pytest.approx(1.0, abs=0.02)


def test_ellipse_with_known_axes():
    labels = np.zeros((100, 120), np.int32)
    labels[ellipse(50, 60, 15, 30)] = 1  # semi-axes: 15 rows, 30 columns → major along x
    row = measure_nuclei(_gray(labels.shape), labels).iloc[0]
    assert row["Size.MajorAxisLength"] == pytest.approx(60.0, abs=1.5)
    assert row["Size.MinorAxisLength"] == pytest.approx(30.0, abs=1.5)
    assert row["Shape.Eccentricity"] == pytest.approx(math.sqrt(1 - 0.25), abs=0.01)
    assert row["Shape.AspectRatio"] == pytest.approx(2.0, abs=0.05)
    assert abs(row["Orientation.Orientation"]) == pytest.approx(math.pi / 2, abs=1e-6)  # skimage convention
    rr, cc = np.nonzero(labels)
    assert row["Shape.Extent"] == labels.sum() / ((np.ptp(rr) + 1) * (np.ptp(cc) + 1))
    assert row["Shape.Extent"] == pytest.approx(math.pi / 4, abs=0.05)  # digital ellipse in its box


def test_square_has_extent_one():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 15:25] = 7
    row = measure_nuclei(_gray(labels.shape), labels).loc[7]
    assert row["Shape.Extent"] == 1.0
    assert row["Shape.Solidity"] == 1.0
    assert row["Shape.Eccentricity"] == pytest.approx(0.0, abs=1e-12)
    assert row["Size.Area"] == 100
    assert (row["Identifier.Xmin"], row["Identifier.Ymin"], row["Identifier.Xmax"], row["Identifier.Ymax"]) == (
        15, 10, 25, 20)
    assert (row["Identifier.CentroidX"], row["Identifier.CentroidY"]) == (19.5, 14.5)


def test_nearest_neighbour_distance_of_known_layout():
    labels = np.zeros((60, 100), np.int32)
    labels[18:23, 18:23] = 1  # centroid (x, y) = (20, 20)
    labels[18:23, 48:53] = 2  # (50, 20): 30 px from nucleus 1
    labels[38:43, 48:53] = 3  # (50, 40): 20 px from nucleus 2
    df = measure_nuclei(_gray(labels.shape), labels)
    assert df["Density.NearestNeighborDistance"].tolist() == pytest.approx([30.0, 20.0, 20.0])


def test_nearest_neighbour_kdtree_path_matches_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 1000, 600), rng.uniform(0, 1000, 600)
    d2 = (x[:, None] - x) ** 2 + (y[:, None] - y) ** 2
    np.fill_diagonal(d2, np.inf)
    assert nearest_neighbour_distance(x, y) == pytest.approx(np.sqrt(d2.min(axis=1)))


def _blobs(seed: int, shape=(128, 128), n=40) -> np.ndarray:
    """Random overlapping disks/ellipses painted in order: touching nuclei, concavities, holes, shared borders."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        a, b = rng.uniform(1, 12), rng.uniform(1, 12)
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rng.uniform(0, np.pi))
        labels[rr, cc] = i
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_morphology_equals_skimage_regionprops(seed):
    labels = _blobs(seed)
    df = measure_nuclei(_rgb(labels.shape), labels)
    props = regionprops(labels)
    assert df.index.tolist() == [p.label for p in props]
    for p in props:
        row = df.loc[p.label]
        assert row["Size.Area"] == p.area
        assert row["Size.ConvexHullArea"] == p.area_convex
        assert row["Shape.Solidity"] == pytest.approx(p.solidity, rel=1e-12)
        assert row["Size.Perimeter"] == pytest.approx(p.perimeter, rel=1e-9, abs=1e-9)
        assert row["Shape.Eccentricity"] == pytest.approx(p.eccentricity, abs=1e-9)
        assert row["Size.MajorAxisLength"] == pytest.approx(p.axis_major_length, rel=1e-9)
        assert row["Size.MinorAxisLength"] == pytest.approx(p.axis_minor_length, rel=1e-9, abs=1e-9)
        assert row["Shape.Extent"] == pytest.approx(p.extent, rel=1e-12)
        assert (row["Identifier.CentroidY"], row["Identifier.CentroidX"]) == pytest.approx(p.centroid)
        assert (row["Identifier.Ymin"], row["Identifier.Xmin"], row["Identifier.Ymax"],
                row["Identifier.Xmax"]) == p.bbox
        if p.axis_major_length - p.axis_minor_length > 1:
            delta = (row["Orientation.Orientation"] - p.orientation) % math.pi
            assert min(delta, math.pi - delta) < 1e-9


def test_ids_need_not_be_contiguous_and_may_be_huge():
    labels = np.zeros((40, 40), np.int64)
    labels[5:15, 5:15] = 3
    labels[20:30, 20:32] = 2_000_000_000
    df = measure_nuclei(_gray(labels.shape), labels)
    assert df.index.tolist() == [3, 2_000_000_000]
    assert df["Size.Area"].tolist() == [100, 120]


def _reference(h: np.ndarray, labels: np.ndarray, label: int, erode_min_area: int = 30) -> dict:
    """Straightforward per-nucleus B.1 colour/texture/core/boundary values with scipy and skimage."""
    mask = labels == label
    area = int(mask.sum())
    d_eq = math.sqrt(4 * area / math.pi)
    er3 = ndi.binary_erosion(mask, np.ones((3, 3)), border_value=0)
    mprime = er3 if (area >= erode_min_area and er3.any()) else mask
    k = int(np.clip(round(0.08 * d_eq), 2, 6))
    core = ndi.binary_erosion(mask, np.ones((k, k)), border_value=0)  # centre k//2, as skimage
    rim = mask & ~core
    band = ndi.binary_dilation(mask, np.ones((3, 3))) ^ er3
    grad = sobel(h.astype(np.float64))
    return {"c": h[mprime].mean(), "t": h[mprime].var(), "k": k,
            "delta": h[core].mean() - h[rim].mean() if core.any() and rim.any() else np.nan,
            "g": grad[band].mean()}


def test_appearance_attributes_match_a_per_nucleus_reference():
    labels = _blobs(7, n=30)
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (*labels.shape, 1), dtype=np.uint8)
    h = img[..., 0].astype(np.float32) / 255.0
    cols = measure_arrays(img, labels)
    valid = cols["Flag.Valid"]
    ref = {int(lab): _reference(h, labels, int(lab)) for lab in cols["Identifier.Label"]}
    c_raw = np.array([ref[int(lab)]["c"] for lab in cols["Identifier.Label"]])
    t_raw = np.array([ref[int(lab)]["t"] for lab in cols["Identifier.Label"]])
    assert cols["Color.HematoxylinRaw"] == pytest.approx(c_raw, rel=1e-5)
    assert cols["Texture.HematoxylinVarianceRaw"] == pytest.approx(t_raw, rel=1e-4)
    sigma_c = c_raw[valid].std() + 1e-6
    sigma_t = t_raw[valid].std() + 1e-6
    assert cols["Color.HematoxylinZ"] == pytest.approx((c_raw - c_raw[valid].mean()) / sigma_c, abs=1e-4)
    assert cols["Texture.HematoxylinVarianceZ"] == pytest.approx((t_raw - t_raw[valid].mean()) / sigma_t,
                                                                 abs=1e-4)
    delta = np.array([ref[int(lab)]["delta"] for lab in cols["Identifier.Label"]])
    assert cols["Color.CoreRimContrastZ"] == pytest.approx(delta / sigma_c, abs=1e-4, nan_ok=True)
    grad = np.array([ref[int(lab)]["g"] for lab in cols["Identifier.Label"]])
    assert cols["Boundary.GradientMean"] == pytest.approx(grad, rel=1e-5)
    assert {ref[k]["k"] for k in ref} >= {2}  # small nuclei use the minimum core erosion


def test_core_contrast_for_every_erosion_size():
    labels = np.zeros((230, 230), np.int32)
    centres = [(30, 30), (30, 90), (40, 175), (130, 50), (150, 160)]
    for i, (radius, centre) in enumerate(zip([9, 20, 25, 30, 40], centres, strict=True), start=1):
        labels[disk(centre, radius, shape=labels.shape)] = i  # d_eq ≈ 18, 40, 50, 60, 80 → k = 2, 3, 4, 5, 6
    img = np.random.default_rng(4).integers(0, 256, (*labels.shape, 1), dtype=np.uint8)
    h = img[..., 0] / 255.0
    df = measure_nuclei(img, labels)
    ref = {lab: _reference(h, labels, lab) for lab in df.index}
    assert [ref[lab]["k"] for lab in df.index] == [2, 3, 4, 5, 6]
    sigma_c = df["Color.HematoxylinRaw"].std(ddof=0) + 1e-6
    expected = [ref[lab]["delta"] / sigma_c for lab in df.index]
    assert df["Color.CoreRimContrastZ"].tolist() == pytest.approx(expected, rel=1e-5)


def test_core_contrast_sign_and_erosion_size():
    labels = np.zeros((90, 90), np.int32)
    labels[disk((45, 45), 30)] = 1  # d_eq ≈ 60 → k = clip(round(4.8), 2, 6) = 5
    labels[5:12, 5:12] = 2  # a second nucleus, so σ_c is defined
    img = np.full((*labels.shape, 1), 50, dtype=np.uint8)
    img[disk((45, 45), 20)] = 250  # bright (high "stain") core, darker rim
    df = measure_nuclei(img, labels)
    assert df.loc[1, "Color.CoreRimContrastZ"] > 0
    ref = _reference(img[..., 0] / 255.0, labels, 1)
    assert ref["k"] == 5
    img2 = 300 - img.astype(np.int32)
    df2 = measure_nuclei(np.clip(img2, 0, 255).astype(np.uint8), labels)
    assert df2.loc[1, "Color.CoreRimContrastZ"] < 0


def test_zscores_have_mean_zero_and_unit_std_over_valid_nuclei():
    labels = _blobs(11, shape=(200, 200), n=80)
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    df = measure_nuclei(img, labels)
    valid = df[df["Flag.Valid"]]
    assert len(valid) > 20
    for col in ("Color.HematoxylinZ", "Texture.HematoxylinVarianceZ"):
        assert valid[col].mean() == pytest.approx(0.0, abs=1e-9)
        assert valid[col].std(ddof=0) == pytest.approx(1.0, abs=1e-4)
    every = measure_nuclei(img, labels, options=AttributeOptions(zscore_population="all"))
    assert every["Color.HematoxylinZ"].mean() == pytest.approx(0.0, abs=1e-9)


def test_flags_for_truncated_and_small_nuclei():
    labels = np.zeros((50, 50), np.int32)
    labels[0:6, 10:16] = 1  # touches the top border
    labels[20:23, 20:23] = 2  # 9 px < 10
    labels[30:40, 30:40] = 3
    labels[44:50, 44:50] = 4  # touches bottom/right border
    df = measure_nuclei(_gray(labels.shape), labels)
    assert df["Flag.Truncated"].tolist() == [True, False, False, True]
    assert df["Flag.Small"].tolist() == [False, True, False, False]
    assert df["Flag.Valid"].tolist() == [False, False, True, False]


def test_small_nucleus_uses_uneroded_mask():
    labels = np.zeros((30, 30), np.int32)
    labels[10:15, 10:15] = 1  # 25 px < 30: M' = M
    labels[5:8, 20:23] = 2
    img = np.zeros((30, 30, 1), np.uint8)
    img[10:15, 10:15, 0] = 255
    img[12, 12, 0] = 0  # the only pixel of the 3×3 erosion
    df = measure_nuclei(img, labels)
    assert df.loc[1, "Color.HematoxylinRaw"] == pytest.approx(24 / 25)


def test_single_pixel_and_line_nuclei_do_not_crash():
    labels = np.zeros((20, 20), np.int32)
    labels[5, 5] = 1
    labels[10, 2:15] = 2
    df = measure_nuclei(_gray(labels.shape), labels)
    assert df.loc[1, "Size.ConvexHullArea"] == 1
    assert df.loc[1, "Shape.Eccentricity"] == 0.0
    assert np.isnan(df.loc[2, "Shape.AspectRatio"])  # minor axis 0
    assert df.loc[2, "Shape.Eccentricity"] == 1.0


# ------------------------------------------------------------------------------------------- bad input
def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="differs from image shape"):
        measure_nuclei(_rgb((10, 10)), np.zeros((10, 12), np.int32), source="x.png")


def test_empty_mask_gives_an_empty_table_with_all_columns():
    df = measure_nuclei(_rgb((16, 16)), np.zeros((16, 16), np.int32))
    assert len(df) == 0
    assert list(df.columns) == list(ALL_COLUMNS)


def test_single_nucleus_has_zero_z_scores_and_nan_where_undefined():
    labels = np.zeros((30, 30), np.int32)
    labels[8:20, 8:20] = 1
    rng = np.random.default_rng(0)
    df = measure_nuclei(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8), labels)
    row = df.iloc[0]
    assert row["Color.HematoxylinZ"] == 0.0
    assert row["Texture.HematoxylinVarianceZ"] == 0.0
    assert np.isnan(row["Color.CoreRimContrastZ"])  # Δ/(0 + 1e-6) is meaningless
    assert np.isnan(row["Density.NearestNeighborDistance"])


def test_one_valid_nucleus_falls_back_to_all_nuclei_for_z_scores():
    labels = np.zeros((40, 40), np.int32)
    labels[10:25, 10:25] = 1  # the only valid nucleus
    labels[0:6, 30:36] = 2  # truncated
    labels[34:40, 0:8] = 3  # truncated
    img = np.zeros((40, 40, 1), np.uint8)
    img[labels == 1] = 200
    img[labels == 2] = 100
    img[labels == 3] = 30
    df = measure_nuclei(img, labels)
    assert df["Flag.Valid"].tolist() == [True, False, False]
    c = df["Color.HematoxylinRaw"].to_numpy()
    assert df["Color.HematoxylinZ"].to_numpy() == pytest.approx((c - c.mean()) / (c.std() + 1e-6))
    assert np.isfinite(df["Color.CoreRimContrastZ"]).all()


def test_all_white_image_gives_finite_values():
    labels = _blobs(5, shape=(64, 64), n=10)
    df = measure_nuclei(np.full((64, 64, 3), 255, np.uint8), labels)
    for col in ("Color.HematoxylinZ", "Texture.HematoxylinVarianceZ", "Boundary.GradientMean",
                "Nucleus.Hematoxylin.Mean"):
        assert np.all(np.isfinite(df[col])), col
    assert (df["Nucleus.Hematoxylin.Mean"] == 0).all()


def test_two_channel_image_is_measured_as_markers():
    """Two channels are neither RGB nor one stain: markers, measured on the named nuclear channel."""
    labels = _blobs(2, shape=(64, 64), n=6)
    image = np.stack([np.full((64, 64), 9, np.uint8), (labels > 0).astype(np.uint8) * 200], axis=-1)
    df = measure_nuclei(image, labels, channel_names=["Ki67", "Hoechst 33342"])
    assert (df["Marker.Ki67.Mean"] == 9).all() and (df["Marker.Hoechst 33342.Mean"] == 200).all()
    assert np.allclose(df["Nucleus.Intensity.Mean"], 200)  # the nuclear channel (Hoechst), scaled to 0..255
    with pytest.raises(InputError, match="1 channel names for an image with 2 channels"):
        measure_nuclei(image, labels, channel_names=["DAPI"])


def test_marker_columns_never_overwrite_each_other():
    """Repeated, blank and already-suffixed channel names each keep their own Marker.* columns."""
    from karyo.attributes.measure import marker_column_names

    assert marker_column_names(["DAPI", "DAPI", "DAPI#2", " ", "CD45.RO"], 5) == [
        "DAPI", "DAPI#2", "DAPI#2#2", "Channel3", "CD45.RO"]
    assert marker_column_names(None, 2) == ["Channel0", "Channel1"]
    labels = _blobs(2, shape=(64, 64), n=6)
    planes = [np.full((64, 64), v, np.uint8) for v in (10, 20, 30)]
    image = np.stack(planes, axis=-1)
    df = measure_nuclei(image, labels, channel_names=["DAPI", "DAPI", "DAPI#2"])
    assert [df[f"Marker.{n}.Mean"].iloc[0] for n in ("DAPI", "DAPI#2", "DAPI#2#2")] == [10, 20, 30]


def test_one_channel_images_keep_their_raw_intensity():
    """Nucleus.Intensity.Mean of a 16-bit channel is on its stretched 0–255 scale; the raw mean is Marker.*."""
    labels = _blobs(3, shape=(64, 64), n=6)
    plane = np.where(labels > 0, 1800, 300).astype(np.uint16)[..., None]
    df = measure_nuclei(plane, labels)
    assert (df["Marker.Channel0.Mean"] == 1800).all() and (df["Marker.Channel0.Std"] == 0).all()
    named = measure_nuclei(plane, labels, channel_names=["DAPI"])
    assert (named["Marker.DAPI.Mean"] == 1800).all()


def test_fluorescence_saved_as_rgb_is_measured_as_one_channel():
    """Equal R, G, B on a dark background: one fluorescence channel (bright = stained), with a warning; the same
    grey levels on a bright background (grey brightfield) stay RGB."""
    labels = _blobs(4, shape=(64, 64), n=6)
    grey = np.where(labels > 0, 200, 15).astype(np.uint8)
    one = measure_nuclei(grey[..., None], labels)
    with pytest.warns(UserWarning, match="R, G and B are equal and the background is dark"):
        rgb = measure_nuclei(np.repeat(grey[..., None], 3, axis=2), labels)
    pd.testing.assert_frame_equal(rgb, one)
    brightfield = np.repeat((255 - grey)[..., None], 3, axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf = measure_nuclei(brightfield, labels)
    assert "Marker.Channel0.Mean" not in bf.columns and np.isfinite(bf["Nucleus.Red.Mean"]).all()


def test_mpp_adds_the_micron_twins_as_the_cli_does():
    labels = _blobs(5, shape=(64, 64), n=6)
    px = measure_nuclei(_rgb(labels.shape), labels)
    um = measure_nuclei(_rgb(labels.shape), labels, mpp=0.5)
    assert "Size.Area_um2" not in px.columns
    np.testing.assert_allclose(um["Size.Area_um2"], px["Size.Area"] * 0.25)
    np.testing.assert_allclose(um["Size.Perimeter_um"], px["Size.Perimeter"] * 0.5)
    with pytest.raises(InputError, match="outside the plausible range"):
        measure_nuclei(_rgb(labels.shape), labels, mpp=-1)


def test_uint16_and_float_rgb_images_are_accepted():
    labels = _blobs(1, shape=(64, 64), n=8)
    img8 = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = measure_nuclei(img8, labels)
    b = measure_nuclei(img8.astype(np.uint16) * 257, labels)
    assert a["Color.HematoxylinRaw"].to_numpy() == pytest.approx(b["Color.HematoxylinRaw"].to_numpy())
    # float in [0, 1], as segment() takes it: the same table (it used to be stretched by its percentiles)
    pd.testing.assert_frame_equal(measure_nuclei(img8 / 255.0, labels), a)
    with pytest.raises(InputError, match=r"float images must hold values in \[0, 1\]"):
        measure_nuclei(img8.astype(np.float32), labels)


def test_paper_names_resolve_to_columns():
    assert resolve("size") == "Size.EquivalentDiameter"
    assert resolve("color_z") == "Color.HematoxylinZ"
    assert resolve("Shape.Solidity") == "Shape.Solidity"
    assert set(PAPER_NAMES.values()) <= set(ALL_COLUMNS)
    with pytest.raises(KeyError):
        resolve("colour")


def test_16_bit_planes_are_measured_on_a_fixed_scale_and_keep_their_grey_levels():
    """Files measure alike: uint16 257·v measures as uint8 v, and there is no per-image stretch (which made two
    images' intensities incomparable). A dim stain (DAPI at 1..108 of 65535) keeps its grey levels in float
    instead of rounding to 0 in 8 bits, and bits=12 reads 12-bit camera data on its own range."""
    labels = _blobs(3, shape=(64, 64), n=8)
    rng = np.random.default_rng(0)
    dapi = np.where(labels > 0, rng.integers(40, 109, labels.shape), rng.integers(1, 10, labels.shape))
    as8 = measure_nuclei(dapi.astype(np.uint8)[..., None], labels)
    floats = as8.select_dtypes("float").columns.drop(["Marker.Channel0.Mean", "Marker.Channel0.Std"])
    wide = measure_nuclei((dapi * 257).astype(np.uint16)[..., None], labels)
    np.testing.assert_allclose(wide[floats], as8[floats], rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"values only reach 108 \(of 65535\).*pass --bits"):
        dim = measure_nuclei(dapi.astype(np.uint16)[..., None], labels)
    np.testing.assert_allclose(dim["Color.HematoxylinRaw"], as8["Color.HematoxylinRaw"] / 257, rtol=1e-5)
    assert (dim["Texture.HematoxylinVarianceRaw"] > 0).all()
    twelve = measure_nuclei((dapi * 16).astype(np.uint16)[..., None], labels, bits=12)
    np.testing.assert_allclose(twelve["Color.HematoxylinRaw"], as8["Color.HematoxylinRaw"] * 255 * 16 / 4095,
                               rtol=1e-5)
    assert twelve["Marker.Channel0.Mean"].tolist() == pytest.approx((dim["Marker.Channel0.Mean"] * 16).tolist())


def test_grey_brightfield_is_measured_by_its_darkness_and_fluorescence_by_its_brightness():
    """One unnamed channel: dark nuclei on white (H&E saved as grey) are measured as stain = darkness, with a
    note; bright nuclei on black (DAPI) as they are. The hematoxylin levels then rank nuclei alike."""
    labels = _blobs(3, shape=(64, 64), n=8)
    rng = np.random.default_rng(1)
    stain = np.where(labels > 0, rng.integers(120, 220, labels.shape), rng.integers(0, 15, labels.shape))
    fluorescence = measure_nuclei(stain.astype(np.uint8)[..., None], labels)
    with pytest.warns(UserWarning, match="nuclei are darker than their background: measured as grey brightfield"):
        brightfield = measure_nuclei((255 - stain).astype(np.uint8)[..., None], labels)
    np.testing.assert_allclose(brightfield["Color.HematoxylinRaw"], fluorescence["Color.HematoxylinRaw"], rtol=1e-5)
    np.testing.assert_allclose(brightfield["Color.HematoxylinZ"], fluorescence["Color.HematoxylinZ"], atol=1e-5)
    with pytest.warns(UserWarning, match="darker than their background"):  # a dim 12-bit file is judged alike
        dim = measure_nuclei(((255 - stain) * 16).astype(np.uint16)[..., None], labels)
    np.testing.assert_allclose(dim["Color.HematoxylinZ"], fluorescence["Color.HematoxylinZ"], atol=0.01)  # σ + 1e-6


def test_classes_given_as_a_list_are_refused_with_what_is_expected():
    labels = np.zeros((40, 40), np.int32)
    labels[disk((20, 20), 6)] = 1
    with pytest.raises(InputError, match=r"classes must map each instance id to its class id .* got a list"):
        measure_nuclei(_rgb((40, 40)), labels, [1])
    assert measure_nuclei(_rgb((40, 40)), labels, {1: 2})["Class.Id"].tolist() == [2]
