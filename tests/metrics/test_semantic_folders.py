"""``karyo evaluate --task semantic``: class maps scored by pixels against an instance-and-class ground truth."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from karyo.cli import app
from karyo.data.io import write_image
from karyo.data.layout import write_layout_sample
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.metrics.folders import evaluate_folders, evaluate_semantic_folders


@pytest.fixture
def truth(tmp_path):
    """One 6×6 image: nucleus 1 (class 1 "tumour", 4 px), nucleus 2 (class 2 "lymphocyte", 4 px), nucleus 3 without
    a class (2 px)."""
    inst = np.zeros((6, 6), np.int32)
    inst[0:2, 0:2] = 1
    inst[3:5, 3:5] = 2
    inst[5, 0:2] = 3
    image = np.full((6, 6, 3), 200, np.uint8)
    write_layout_sample(tmp_path / "gt", Sample(image=image, instances=inst, classes={1: 1, 2: 2}, name="a",
                                                class_names={1: "tumour", 2: "lymphocyte"}), split="test")
    return tmp_path / "gt"


def _prediction(root, class_map, names):
    write_image(root / "semantic" / "a.png", class_map.astype(np.uint8))
    if names is not None:
        (root / "classes.json").write_text(json.dumps({str(k): v for k, v in names.items()}))
    return root


def test_class_maps_are_scored_by_pixels_with_classes_matched_by_name(truth, tmp_path):
    cm = np.zeros((6, 6), np.uint8)
    cm[0:2, 0:2] = 2            # nucleus 1 (tumour) all right: the prediction numbers tumour 2
    cm[3:5, 3:4] = 1            # half of nucleus 2 (lymphocyte), the other half missed
    cm[0, 5] = 1                # one background pixel called lymphocyte
    cm[5, 0:2] = 2              # the unclassified nucleus: not counted either way
    pred = _prediction(tmp_path / "pred", cm, {1: "Lymphocyte", 2: "tumour"})
    report = evaluate_semantic_folders(truth, pred)
    r = report.result
    # truth rows (bg, tumour, lymphocyte) × predicted columns, 34 counted pixels (2 unclassified left out)
    np.testing.assert_array_equal(r.confusion, [[25, 0, 1], [0, 4, 0], [2, 0, 2]])
    assert r.pixel_accuracy == pytest.approx(31 / 34)
    assert r.iou == pytest.approx({1: 1.0, 2: 2 / 5})
    assert r.f1[2] == pytest.approx(4 / 7) and r.precision[2] == pytest.approx(2 / 3) and r.recall[2] == 0.5
    assert r.fwiou == pytest.approx(0.5 * 1.0 + 0.5 * 0.4)
    assert not report.binary and report.n_images == 1
    assert report.per_class["name"].tolist() == ["tumour", "lymphocyte"]
    assert any("2 ground-truth pixel(s) of nuclei without a class" in n for n in report.notes)
    out = report.to_dict()
    assert out["mean_iou"] == pytest.approx(0.7) and out["per_image"][0]["name"] == "a"


def test_without_matching_class_names_nuclei_are_scored_against_background(truth, tmp_path):
    cm = np.zeros((6, 6), np.uint8)
    cm[0:2, 0:2] = 3
    pred = _prediction(tmp_path / "pred", cm, {3: "mitosis"})
    report = evaluate_semantic_folders(truth, pred)
    assert report.binary and report.result.iou == pytest.approx({1: 4 / 10})
    assert "not the ground truth's" in report.notes[0]
    with pytest.raises(InputError, match=r"class maps only \(semantic/.*--task semantic"):
        evaluate_folders(truth, pred)
    with pytest.raises(InputError, match="no semantic/ folder"):
        evaluate_semantic_folders(truth, tmp_path)


def test_cli_scores_a_semantic_output_folder_by_itself(truth, tmp_path):
    cm = np.zeros((6, 6), np.uint8)
    cm[0:2, 0:2] = 1
    cm[3:5, 3:5] = 2
    pred = _prediction(tmp_path / "pred", cm, {1: "tumour", 2: "lymphocyte"})
    res = CliRunner().invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred)])
    assert res.exit_code == 0, res.output
    saved = json.loads((pred / "evaluation.json").read_text())
    assert saved["task"] == "semantic" and saved["pixel_accuracy"] == 1.0 and saved["mean_iou"] == 1.0
    assert "IoU lymphocyte" in res.output
    (pred / "semantic" / "a.png").unlink()
    write_image(pred / "semantic" / "b.png", cm)
    res = CliRunner().invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred), "--task", "semantic"])
    assert res.exit_code == 2 and "no prediction for 1 of 1 image(s)" in res.output
    assert "semantic/<id>.png" in res.output


def test_class_maps_are_read_by_index_and_their_names_checked(truth, tmp_path):
    """A palette PNG gives its indices (not colours); a colour image, an id classes.json does not name, and a
    missing classes.json are each handled as evaluate does for instances."""
    from PIL import Image

    cm = np.zeros((6, 6), np.uint8)
    cm[0:2, 0:2] = 1
    cm[3:5, 3:5] = 2
    pred = _prediction(tmp_path / "pal", cm, {1: "tumour", 2: "lymphocyte", 7: "necrosis"})  # 7: never used
    palette = Image.fromarray(cm, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(pred / "semantic" / "a.png")
    report = evaluate_semantic_folders(truth, pred)
    assert not report.binary and report.result.iou == pytest.approx({1: 1.0, 2: 1.0})
    (pred / "classes.json").write_text(json.dumps({"1": "tumour"}))
    with pytest.raises(InputError, match=r"classes\.json: names no class 2, which the class maps hold"):
        evaluate_semantic_folders(truth, pred)
    (pred / "classes.json").unlink()
    report = evaluate_semantic_folders(truth, pred)
    assert not report.binary and report.result.iou == pytest.approx({1: 1.0, 2: 1.0})
    assert "no classes.json: its class ids are taken to be the ground truth's (1 tumour, 2 lymphocyte)" in \
        report.notes[0]
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[0:2, 0:2] = (255, 0, 0)
    write_image(pred / "semantic" / "a.png", colour)
    with pytest.raises(InputError, match=r"a\.png: a class map holds one class id per pixel, this has 3 different"):
        evaluate_semantic_folders(truth, pred)
    assert ("pixels (pooled over images)", "precision tumour", "1.0000") in report.summary_table()
