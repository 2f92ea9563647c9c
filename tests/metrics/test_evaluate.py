"""The dataset evaluator: it must reproduce the golden dataset numbers and accept the documented inputs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.metrics.evaluate import EvaluationReport, ImagePair, evaluate
from karyo.metrics.instance import panoptic_quality

NAMES = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead", 5: "Non-Neoplastic"}
TOL = 1e-9


@pytest.fixture(scope="module")
def report(golden_cases) -> EvaluationReport:
    return evaluate(golden_cases, class_names=NAMES)


def close(a, b) -> bool:
    return abs(a - b) <= TOL


def test_report_reproduces_golden_dataset_values(report, golden):
    d = golden["dataset"]
    assert report.classified and report.classes == (1, 2, 3, 4, 5) and report.n_images == 40
    p = report.pannuke
    assert close(p.mpq, d["pannuke"]["mPQ"]) and close(p.bpq, d["pannuke"]["bPQ"])
    assert all(close(p.class_pq[c], d["pannuke"]["class_PQ"][n]) for c, n in NAMES.items())
    assert all(close(p.tissue_mpq[t], v) for t, v in d["pannuke"]["tissue_mPQ"].items())
    assert all(close(p.tissue_bpq[t], v) for t, v in d["pannuke"]["tissue_bPQ"].items())
    c = report.conic
    assert close(c.mpq_plus, d["conic"]["mPQ_plus"])
    assert all(close(c.class_pq_plus[k], v) for k, v in zip(NAMES, d["conic"]["class_PQ_plus"], strict=True))
    np.testing.assert_allclose(c.class_totals, d["conic"]["class_totals_tp_fp_fn_sumiou"], rtol=0, atol=TOL)
    assert close(c.binary_pq, d["conic"]["binary_pq_mean_over_images"])
    assert close(c.r2, d["conic"]["multi_r2"])
    det = d["hovernet_detection"]["all_cases"]
    assert close(report.detection.f1_d, det["f1_detection"])
    assert close(report.detection.acc_type, det["type_accuracy"])
    assert all(close(report.detection.f1_type[int(k)], v) for k, v in det["f1_type"].items())
    inst = d["hovernet_instance_mean_over_valid_cases"]
    assert report.instance_complete_cases["n_images"] == len(inst["case_indices"])
    assert all(close(report.instance_complete_cases[k], inst[k]) for k in ("pq", "dq", "sq", "aji", "aji_plus", "dice"))


def test_per_image_frame_matches_golden_cases(report, golden):
    df = report.per_image
    assert len(df) == 40 and list(df["name"][:3]) == [c["name"] for c in golden["cases"][:3]]
    for case in golden["cases"]:
        row = df.iloc[case["index"]]
        for key in ("pq", "aji", "aji_plus", "dice"):
            want = case["hovernet"][key]
            assert (math.isnan(row[key]) if want is None else close(row[key], want)), (case["index"], key)
        want = case["pannuke"]["mpq_image"]
        assert math.isnan(row["mpq"]) if want is None else close(row["mpq"], want)
        assert close(row["conic_pq"], case["conic"]["binary_pq"])
        for c, name in NAMES.items():
            want = case["pannuke"]["class_pq"][c - 1]
            assert math.isnan(row[f"pq_{name}"]) if want is None else close(row[f"pq_{name}"], want)


def test_instance_means_skip_nan_per_metric(report):
    df = report.per_image
    for key in ("pq", "aji", "dice", "f1_mean", "map"):
        assert close(report.instance[key], float(df[key].dropna().mean()))
    # case 3 (empty prediction) has PQ 0 but AJI NaN: it counts in the PQ mean only
    assert df["pq"].notna().sum() == 39 and df["aji"].notna().sum() == 38


def test_pooled_matching_and_tables(report):
    m = report.matching
    assert m.tp.sum() > 0 and m.n_true == int(report.per_image["n_true"].sum())
    assert m.tp[0] == int(report.per_image["tp"].sum())  # IoU > 0.5 matches are the PQ matches
    assert list(report.per_tissue["tissue"]) == ["Breast", "Colon", "Kidney", "Lung"]
    assert list(report.per_class["name"]) == list(NAMES.values())
    rows = report.summary_table()
    assert all(len(r) == 3 and all(isinstance(x, str) for x in r) for r in rows)
    assert ("PanNuke", "mPQ", f"{report.pannuke.mpq:.4f}") in rows


def test_to_dict_is_json_with_nan_as_none(report):
    d = report.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["pannuke"]["class_pq"]["Neoplastic"] == pytest.approx(report.pannuke.class_pq[1], abs=1e-15)
    assert back["per_image"][4]["pq"] is None  # both maps empty
    assert back["conic"]["class_totals"]["Dead"]["tp"] == report.conic.class_totals[3, 0]
    assert set(back["matching"]["f1"]) == {"0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"}


def test_sample_pairs_give_the_same_numbers(golden_cases):
    cases = golden_cases[5:12]
    samples = []
    for c in cases:
        pairs = []
        for side in ("true", "pred"):
            inst, typ = c[f"{side}_inst"], c[f"{side}_type"]
            ids = np.unique(inst[inst > 0])
            classes = {int(i): int(typ[inst == i][0]) for i in ids}
            pairs.append(Sample(image=np.zeros((*inst.shape, 3), np.uint8), instances=inst, classes=classes,
                                name=c["name"], tissue=c["tissue"] if side == "true" else None,
                                class_names=NAMES))
        samples.append(tuple(pairs))
    from_samples = evaluate(samples)  # class names come from the samples
    from_dicts = evaluate(cases, class_names=NAMES)
    assert from_samples.class_names == NAMES
    assert from_samples.to_dict()["pannuke"] == from_dicts.to_dict()["pannuke"]
    assert from_samples.to_dict()["conic"] == from_dicts.to_dict()["conic"]
    assert from_samples.instance == from_dicts.instance


def test_class_agnostic_predictions_skip_classification(golden_cases):
    @dataclass
    class Pair:
        name: str
        true_inst: np.ndarray
        pred_inst: np.ndarray
        true_type: np.ndarray | None = None
        pred_type: np.ndarray | None = None

    pairs = [Pair(c["name"], c["true_inst"], c["pred_inst"], c["true_type"]) for c in golden_cases[10:14]]
    r = evaluate(pairs)
    assert not r.classified and r.pannuke is None and r.conic is None
    assert r.per_class.empty and "acc_type" not in r.to_dict()["detection"]
    assert 0 < r.detection.f1_d < 1
    assert close(r.instance["pq"], np.mean([panoptic_quality(p.true_inst, p.pred_inst).pq for p in pairs]))
    assert r.notes and "classification" in r.notes[0]
    assert list(r.per_tissue["tissue"]) == ["(none)"]


def test_mixed_classes_are_reported_and_explicit_classes_used(golden_cases):
    c = golden_cases[6]
    typed = ImagePair("a", c["true_inst"], c["pred_inst"], c["true_type"], c["pred_type"])
    untyped = ImagePair("b", c["true_inst"], c["pred_inst"])
    r = evaluate([typed, untyped])
    assert not r.classified and "only 1 of 2" in r.notes[0]
    r = evaluate([typed], classes=[3, 7])
    assert r.classes == (3, 7) and list(r.per_class["class_id"]) == [3, 7]
    assert math.isnan(r.pannuke.class_pq[7]) and r.conic.class_pq_plus[7] == 0.0


def test_images_without_any_prediction_are_named_in_the_aji_note():
    """AJI follows the reference (no value without predictions, so the image leaves the mean) and a note says
    what counting it as 0 would give: one perfect and one unpredicted image read AJI 1.0 otherwise unexplained."""
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6], inst[9:14, 9:14] = 1, 2
    r = evaluate([ImagePair("seen", inst, inst), ImagePair("missed", inst, np.zeros_like(inst))])
    assert r.instance["aji"] == pytest.approx(1.0) and r.instance["aji_plus"] == pytest.approx(0.5)
    note = next(n for n in r.notes if n.startswith("AJI:"))
    assert "1 image(s)" in note and note.endswith("AJI would be 0.5000")
    assert not any(n.startswith("AJI:") for n in evaluate([ImagePair("seen", inst, inst)]).notes)
    # F1d's dummy point for the empty side is the reference's; the note says why an empty prediction scores
    dummy = next(n for n in r.notes if n.startswith("F1d/F1c:"))
    assert dummy.startswith("F1d/F1c: 1 image(s) have nuclei on one side only") and "(0, 0)" in dummy
    assert not any(n.startswith("F1d") for n in evaluate([ImagePair("seen", inst, inst)]).notes)


def test_bad_input():
    with pytest.raises(InputError, match="no image pairs"):
        evaluate([])
    with pytest.raises(InputError, match="true_inst"):
        evaluate([{"name": "x"}])
    with pytest.raises(InputError, match=r"^img7: .*differ in shape"):
        evaluate([ImagePair("img7", np.zeros((4, 4), int), np.zeros((4, 5), int))])
