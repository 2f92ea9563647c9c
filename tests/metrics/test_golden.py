"""Golden test: karyo.metrics against the numbers the unmodified reference code produced (../shared/golden).

null in golden.json means NaN, or that the reference raised; both must come out as NaN here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from karyo.metrics.conic import conic_aggregate, conic_image_stats
from karyo.metrics.detection import NucleiTypeStats, instance_points, pair_coordinates
from karyo.metrics.instance import (
    aggregated_jaccard_index,
    aggregated_jaccard_index_plus,
    dice,
    panoptic_quality,
)
from karyo.metrics.pannuke import pannuke_aggregate, pannuke_image

TOL = 1e-9
PANNUKE_NAMES = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead", 5: "Non-Neoplastic"}
CLASSES = (1, 2, 3, 4, 5)


def check(got, want, what: str) -> None:
    """Compare a value (or nested list) with a golden value; None/null must be NaN."""
    if isinstance(want, list):
        got = list(got)
        assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            check(g, w, f"{what}[{k}]")
        return
    got = float(got)
    if want is None:
        assert math.isnan(got), f"{what}: expected NaN (golden null), got {got!r}"
    else:
        assert not math.isnan(got), f"{what}: got NaN, expected {want!r}"
        assert abs(got - want) <= TOL, f"{what}: {got!r} != {want!r} (diff {got - want:.3e})"


@pytest.fixture(scope="module")
def per_case(golden_cases):
    """Per-case results of the public functions (computed once for all tests of this module)."""
    out = []
    for c in golden_cases:
        ti, tt, pi, pt = c["true_inst"], c["true_type"], c["pred_inst"], c["pred_type"]
        out.append({
            "pq": panoptic_quality(ti, pi),
            "aji": aggregated_jaccard_index(ti, pi).value,
            "aji_plus": aggregated_jaccard_index_plus(ti, pi).value,
            "dice": dice(ti, pi),
            "pannuke": pannuke_image(ti, tt, pi, pt, CLASSES),
            "conic": conic_image_stats(ti, tt, pi, pt, CLASSES),
        })
    return out


def test_golden_file_covers_cases_0_to_19(golden):
    assert [c["index"] for c in golden["cases"]] == list(range(20))


@pytest.mark.parametrize("i", range(20))
def test_hovernet_instance_per_case(i, golden, per_case):
    want = golden["cases"][i]["hovernet"]
    got = per_case[i]
    pq = got["pq"]
    for key in ("pq", "dq", "sq"):
        check(getattr(pq, key), want[key], f"case {i} {key}")
    for key in ("tp", "fp", "fn"):
        if want[key] is None:  # get_fast_pq raised (both maps empty): no counts to compare, PQ must be NaN
            assert "get_fast_pq" in want["reference_errors"] and math.isnan(pq.pq)
        else:
            assert getattr(pq, key) == want[key], f"case {i} {key}"
    for key in ("aji", "aji_plus", "dice"):
        check(got[key], want[key], f"case {i} {key}")


@pytest.mark.parametrize("i", range(20))
def test_pannuke_per_case(i, golden, per_case):
    want = golden["cases"][i]["pannuke"]
    got = per_case[i]["pannuke"]
    check([got.class_pq[c] for c in CLASSES], want["class_pq"], f"case {i} class_pq")
    check(got.mpq, want["mpq_image"], f"case {i} mpq_image")
    check(got.bpq, want["bpq_image"], f"case {i} bpq_image")


@pytest.mark.parametrize("i", range(20))
def test_conic_per_case(i, golden, per_case):
    want = golden["cases"][i]["conic"]
    got = per_case[i]["conic"]
    check(got.class_stats.tolist(), want["class_tp_fp_fn_sumiou"], f"case {i} class stats")
    check(got.binary.pq, want["binary_pq"], f"case {i} binary_pq")
    assert [got.binary.tp, got.binary.fp, got.binary.fn] == want["binary_tp_fp_fn"]
    assert got.counts_true.tolist() == want["counts_true"]
    assert got.counts_pred.tolist() == want["counts_pred"]


@pytest.mark.parametrize("i", range(20))
def test_pair_coordinates_per_case(i, golden, golden_cases):
    want = golden["cases"][i]["detection_pair_coordinates_r12"]
    c = golden_cases[i]
    pairing = pair_coordinates(instance_points(c["true_inst"]).xy, instance_points(c["pred_inst"]).xy, 12)
    assert len(pairing.paired) == want["paired"]
    assert len(pairing.unpaired_a) == want["unpaired_true"]
    assert len(pairing.unpaired_b) == want["unpaired_pred"]


def test_pannuke_dataset(golden, golden_cases, per_case):
    want = golden["dataset"]["pannuke"]
    res = pannuke_aggregate([r["pannuke"] for r in per_case], [c["tissue"] for c in golden_cases], CLASSES)
    check(res.mpq, want["mPQ"], "mPQ")
    check(res.bpq, want["bPQ"], "bPQ")
    assert {PANNUKE_NAMES[c] for c in CLASSES} == set(want["class_PQ"])
    for c in CLASSES:
        check(res.class_pq[c], want["class_PQ"][PANNUKE_NAMES[c]], f"class_PQ {PANNUKE_NAMES[c]}")
    assert set(res.tissue_mpq) == set(want["tissue_mPQ"]) == set(want["tissue_bPQ"])
    for tissue in want["tissue_mPQ"]:
        check(res.tissue_mpq[tissue], want["tissue_mPQ"][tissue], f"tissue_mPQ {tissue}")
        check(res.tissue_bpq[tissue], want["tissue_bPQ"][tissue], f"tissue_bPQ {tissue}")


def test_conic_dataset(golden, per_case):
    want = golden["dataset"]["conic"]
    res = conic_aggregate([r["conic"] for r in per_case])
    check(res.mpq_plus, want["mPQ_plus"], "mPQ_plus")
    check([res.class_pq_plus[c] for c in CLASSES], want["class_PQ_plus"], "class_PQ_plus")
    check(res.class_totals.tolist(), want["class_totals_tp_fp_fn_sumiou"], "class totals")
    check(res.binary_pq, want["binary_pq_mean_over_images"], "binary pq")
    check(res.r2, want["multi_r2"], "multi_r2")
    check([res.class_r2[c] for c in CLASSES], want["class_r2"], "class_r2")


def test_conic_dataset_with_the_scripts_six_classes(golden, golden_cases):
    """The unmodified script hard-codes 6 classes: the empty 6th class adds PQ+ 0 and an R² of 1.0."""
    want = golden["dataset"]["conic"]
    six = conic_aggregate([conic_image_stats(c["true_inst"], c["true_type"], c["pred_inst"], c["pred_type"],
                                             (*CLASSES, 6)) for c in golden_cases])
    check(six.mpq_plus, want["script_nr_classes6_multi_pq_plus"], "6-class multi_pq+")
    check(six.r2, want["script_regression_6cols_multi_r2"], "6-column multi_r2")
    assert six.class_pq_plus[6] == 0.0


def _type_stats(cases, type_uid_list):
    stats = NucleiTypeStats(radius=12)
    for c in cases:
        stats.add(c["true_inst"], c["true_type"], c["pred_inst"], c["pred_type"])
    return stats.compute(type_uid_list)


def test_detection_all_cases(golden, golden_cases):
    want = golden["dataset"]["hovernet_detection"]["all_cases"]
    res = _type_stats(golden_cases, list(CLASSES))
    check(res.f1_d, want["f1_detection"], "f1_d")
    check(res.acc_type, want["type_accuracy"], "acc_type")
    assert set(want["f1_type"]) == {str(c) for c in CLASSES}
    for c in CLASSES:
        check(res.f1_type[c], want["f1_type"][str(c)], f"f1_type {c}")


def test_detection_default_type_list_includes_dummy_type_0(golden, golden_cases):
    """type_uid_list=None scores the GT types, including the dummy type 0 of the empty images."""
    want = golden["dataset"]["hovernet_detection"]["all_cases_default_type_uid_list_raw_results_list"]
    res = _type_stats(golden_cases, None)
    assert list(res.f1_type) == [0, *CLASSES]
    check([res.f1_d, res.acc_type, *res.f1_type.values()], want, "raw results_list")


def test_detection_nonempty_cases(golden, golden_cases):
    det = golden["dataset"]["hovernet_detection"]
    idx = det["nonempty_case_indices"]
    assert all(np.any(golden_cases[i]["true_inst"]) and np.any(golden_cases[i]["pred_inst"]) for i in idx)
    res = _type_stats([golden_cases[i] for i in idx], list(CLASSES))
    want = det["nonempty_cases"]
    check(res.f1_d, want["f1_detection"], "f1_d")
    check(res.acc_type, want["type_accuracy"], "acc_type")
    for c in CLASSES:
        check(res.f1_type[c], want["f1_type"][str(c)], f"f1_type {c}")


def test_hovernet_instance_mean_over_valid_cases(golden, per_case):
    want = golden["dataset"]["hovernet_instance_mean_over_valid_cases"]
    values = {k: [] for k in ("pq", "dq", "sq", "aji", "aji_plus", "dice")}
    valid = []
    for i, r in enumerate(per_case):
        row = {"pq": r["pq"].pq, "dq": r["pq"].dq, "sq": r["pq"].sq, "aji": r["aji"], "aji_plus": r["aji_plus"],
               "dice": r["dice"]}
        # the reference raises exactly where karyo returns NaN for PQ or AJI
        if math.isnan(row["pq"]) or math.isnan(row["aji"]):
            continue
        valid.append(i)
        for k, v in row.items():
            values[k].append(v)
    assert valid == want["case_indices"]
    for k, v in values.items():
        check(np.mean(v), want[k], f"mean {k}")
