"""The CLI end to end (typer's CliRunner), each command beside its Python twin."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import karyo
from karyo.cli import app
from karyo.data.io import read_instances
from karyo.data.layout import LayoutDataset, write_layout_sample

runner = CliRunner()


def test_segment_sample_writes_every_output(tmp_path):
    res = runner.invoke(app, ["segment", "--sample", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    inst = read_instances(tmp_path / "instances" / "he_breast_nucls.png")
    n = len(np.unique(inst)) - 1
    assert n > 20  # the sample tile holds ~60 nuclei
    geo = json.loads((tmp_path / "geojson" / "he_breast_nucls.geojson").read_text())
    assert len(geo["features"]) == n
    assert all(f["properties"]["objectType"] == "detection" for f in geo["features"])
    assert (tmp_path / "overlays" / "he_breast_nucls.png").is_file()
    table = pd.read_csv(tmp_path / "tables" / "he_breast_nucls.csv")
    assert len(table) == n
    # The CLI and the API give the same instance map.
    api = karyo.load("default").segment(karyo.read_image(karyo.samples.sample_path()))
    np.testing.assert_array_equal(api.instances, inst)


def test_segment_then_evaluate_real_consep(shared_data, tmp_path):
    ids = ["test_1_005", "test_3_010", "test_7_002"]
    truth = tmp_path / "truth"
    for s in LayoutDataset(shared_data / "consep", ids=ids):
        write_layout_sample(truth, s)
    images = [str(truth / "images" / f"{i}.png") for i in ids]
    res = runner.invoke(app, ["segment", *images, "--model", "classical", "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "pred" / "evaluation.json").read_text())
    assert report["n_images"] == 3
    # The classical baseline's floor on these CoNSeP patches (it scores PQ ≈ 0.2 on CoNSeP test overall).
    assert report["instance"]["pq"] > 0.12
    assert report["detection"]["f1_d"] > 0.45
    per_image = pd.read_csv(tmp_path / "pred" / "evaluation.csv")
    assert per_image.name.tolist() == ids


def test_segment_uses_the_resolution_the_file_states(tmp_path):
    """A tile saved at half the model's magnification, with its resolution in the PNG: karyo resamples it and
    finds about the nuclei of the full-resolution tile; the same pixels without a resolution lose most of them."""
    from PIL import Image
    from skimage.transform import rescale

    from karyo.samples import sample_path

    native = karyo.read_image(sample_path())
    half = (rescale(native, 0.5, channel_axis=2, anti_aliasing=True, preserve_range=True) + 0.5).astype(np.uint8)
    mpp = 2 * karyo.load("default").config.mpp
    Image.fromarray(half).save(tmp_path / "stated.png", dpi=(25400 / mpp, 25400 / mpp))
    Image.fromarray(half).save(tmp_path / "silent.png")
    counts = {}
    for name in ("stated", "silent"):
        res = runner.invoke(app, ["segment", str(tmp_path / f"{name}.png"), "--out", str(tmp_path / name),
                                  "--outputs", "instances"])
        assert res.exit_code == 0, res.output
        assert ("as the files state it (stated.png 0.5)" in res.output) == (name == "stated")
        assert ("state no resolution: taken to be the model's 0.25" in res.output) == (name == "silent")
        instances = read_instances(tmp_path / name / "instances" / f"{name}.png")
        assert instances.shape == half.shape[:2]
        counts[name] = len(np.unique(instances)) - 1
    full = karyo.load("default").segment(native).n_nuclei
    assert 0.7 * full <= counts["stated"] <= 1.3 * full
    assert counts["silent"] < 0.5 * full


def test_segment_points_csv(tmp_path):
    from karyo.samples import sample_path

    full = karyo.load("classical").segment(karyo.read_image(sample_path())).table()
    pts = full[["centroid_x", "centroid_y"]].head(3).rename(columns={"centroid_x": "x", "centroid_y": "y"})
    pts.to_csv(tmp_path / "points.csv", index=False)
    res = runner.invoke(app, ["segment", str(sample_path()), "--points", str(tmp_path / "points.csv"),
                              "--model", "classical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    inst = read_instances(tmp_path / "o" / "instances" / "he_breast_nucls.png")
    assert len(np.unique(inst)) - 1 == 3
    # which point became which nucleus: the nucleus under each point carries that point's index
    table = pd.read_csv(tmp_path / "o" / "tables" / "he_breast_nucls.csv")
    for index, (x, y) in enumerate(pts[["x", "y"]].to_numpy()):
        under = inst[round(y), round(x)]
        assert table.loc[table.instance_id == under, "point_index"].item() == index
    # QuPath's tab-separated point export (upper-case headers too); a click on background is named, not dropped
    from scipy import ndimage as ndi

    auto = karyo.load("default").segment(karyo.read_image(sample_path()))
    far = np.unravel_index(int(ndi.distance_transform_edt(auto.instances == 0).argmax()), auto.instances.shape)
    rows = [*(f"{x:.1f}\t{y:.1f}\tTumor\tPoint" for x, y in auto.table()[["centroid_x", "centroid_y"]].to_numpy()[:3]),
            f"{far[1]}\t{far[0]}\t\t"]
    (tmp_path / "qupath.tsv").write_text("X\tY\tclass\tname\n" + "\n".join(rows) + "\n")
    res = runner.invoke(app, ["segment", str(sample_path()), "--points", str(tmp_path / "qupath.tsv"),
                              "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert f"note: 1 of 4 point(s) gave no nucleus under themselves, so no row (point_index 3 ({far[1]}, {far[0]})" \
        in said


def test_segment_names_outputs_by_their_whole_stem_and_refuses_collisions(tmp_path):
    """``slide.A.png`` and ``slide.B.png`` must not both write ``slide.*``; two ``a.png`` from two folders into one
    --out are refused before any work."""
    from karyo.samples import sample_path

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("slide.A.png", "slide.B.png"):
        (folder / name).write_bytes(sample_path().read_bytes())
    res = runner.invoke(app, ["segment", str(folder), "--model", "classical", "--out", str(tmp_path / "o"),
                              "--outputs", "instances,table"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o" / "instances").iterdir()) == ["slide.A.png", "slide.B.png"]
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.png").write_bytes(sample_path().read_bytes())
    res = runner.invoke(app, ["segment", str(tmp_path / "x"), str(tmp_path / "y"), "--model", "classical",
                              "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "would overwrite" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(("points", "args", "message"), [
    ("x,y\n-50,-50\n", [], "points.csv: point 0 (-50, -50) lies outside"),
    ("x,y,label\n10,10,2\n", [], "label must be 1 (nucleus) or 0"),
    ("x,y\n1,\n", [], "points.csv: points CSV line 2 lacks x or y"),
    ("x,y,label\n1,1,1.0\n9,9,yes\n", [], "line 3: label must be 1 (nucleus) or 0 (not a nucleus), got 'yes'"),
    ("", [], "points CSV is empty"),
    ("\n", [], "points CSV is empty"),
    ("x,y\n20,20\n20,20\n", [], "is given 2 times"),
    ("x,y\n", [], "header but no points"),
    (None, ["--mpp", "-0.5"], "--mpp: mpp -0.5 µm/px is outside the plausible range"),
    (None, ["--mpp", "nan"], "outside the plausible range"),
    (None, ["--device", "gpu"], "unknown device 'gpu'"),
    (None, ["--outputs", ""], "--outputs names nothing to write"),
    ("\ufeffx,y\n300,300\n", [], "points.csv: point 0 (300, 300) lies outside"),  # Excel's BOM: x is read
    ("x,y\n20,20\n21,20\n", [], "points.csv: points 0 (20, 20) and 1 (21, 20) are 1 px apart"),
    ("x;z\n20;20\n", [], "needs columns x,y (and optionally label), separated by commas, tabs or semicolons"),
])
def test_segment_refuses_bad_prompts_and_options_before_writing(tmp_path, points, args, message):
    from karyo.samples import sample_path

    extra = list(args)
    if points is not None:
        (tmp_path / "points.csv").write_text(points)
        extra += ["--points", str(tmp_path / "points.csv")]
    out = tmp_path / "o"
    model = "classical"  # it runs on no torch device, but a bad --device is refused for it too
    res = runner.invoke(app, ["segment", str(sample_path()), "--model", model, "--out", str(out), *extra])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_segment_notes_a_one_channel_image_by_its_file(tmp_path):
    """A grayscale or fluorescence image given to the H&E model is read as gray H&E: say so, naming the file,
    once, as a note (not a Python warning with a source line)."""
    from PIL import Image

    from karyo.samples import sample_path

    Image.open(sample_path()).convert("L").save(tmp_path / "gray.png")
    res = runner.invoke(app, ["segment", str(tmp_path / "gray.png"), "--out", str(tmp_path / "o"),
                              "--outputs", "instances"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"note: {tmp_path / 'gray.png'}: one channel given to a model trained on RGB H&E" in text
    assert "UserWarning" not in res.output


def test_segment_reads_12_bit_camera_data_on_its_own_range_with_bits(tmp_path):
    """12-bit data in a 16-bit TIFF looks 16x too dark: the note says --bits 12, which segments it as the 8-bit
    original is segmented; values the bit depth cannot hold are refused."""
    import tifffile

    from karyo.samples import sample_path

    rgb = karyo.read_image(sample_path())
    tifffile.imwrite(tmp_path / "cam.tif", (rgb.astype(np.uint32) * 4095 // 255).astype(np.uint16), photometric="rgb")
    dark = runner.invoke(app, ["segment", str(tmp_path / "cam.tif"), "--out",
                               str(tmp_path / "a"), "--outputs", "instances"])
    assert "pass --bits 12 (karyo segment, karyo attributes" in " ".join(dark.output.split())
    res = runner.invoke(app, ["segment", str(tmp_path / "cam.tif"), "--bits", "12", "--out",
                              str(tmp_path / "b"), "--outputs", "instances"])
    runner.invoke(app, ["segment", str(sample_path()), "--out", str(tmp_path / "c"),
                        "--outputs", "instances"])
    assert res.exit_code == 0 and "darker" not in res.output, res.output
    bright = read_instances(tmp_path / "b" / "instances" / "cam.png")
    original = read_instances(next((tmp_path / "c" / "instances").glob("*.png")))
    assert len(np.unique(bright)) == pytest.approx(len(np.unique(original)), rel=0.05)
    assert len(np.unique(read_instances(tmp_path / "a" / "instances" / "cam.png"))) < len(np.unique(original)) / 2
    eight = runner.invoke(app, ["segment", str(sample_path()), "--bits", "12", "--out", str(tmp_path / "e"),
                                "--outputs", "instances"])
    assert eight.exit_code == 0 and "8-bit, so --bits 12 (for 16-bit files) does not apply" in eight.output
    res = runner.invoke(app, ["segment", str(tmp_path / "cam.tif"), "--bits", "10", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "values reach 4095, more than 10-bit data can hold (1023)" in res.output
    assert not (tmp_path / "d" / "instances").exists()


def test_segment_out_must_be_a_folder(tmp_path):
    from karyo.samples import sample_path

    (tmp_path / "afile").write_text("")
    res = runner.invoke(app, ["segment", str(sample_path()), "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "--out must be a folder" in res.output


def test_segment_without_nuclei_still_evaluates(tmp_path):
    """A blank tile gives no nucleus; its (header-only) class CSV keeps ``karyo evaluate`` working on the folder."""
    from karyo.samples import sample_path

    truth = tmp_path / "truth"
    sample = karyo.read_image(sample_path())
    blank = np.full_like(sample, 255)
    for name, img in (("tile", sample), ("blank", blank)):
        write_layout_sample(truth, karyo.Sample(image=img, instances=np.zeros(img.shape[:2], np.int32), name=name))
    res = runner.invoke(app, ["segment", str(truth / "images"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    blank_classes = pd.read_csv(tmp_path / "p" / "classes" / "blank.csv")
    assert list(blank_classes.columns) == ["instance_id", "class_id"] and len(blank_classes) == 0
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    # the folder rewritten by a model without classes: no class names are left for class files that are gone
    assert (tmp_path / "p" / "classes.json").is_file()
    res = runner.invoke(app, ["segment", str(truth / "images"), "--model", "classical", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "p" / "classes.json").exists() and not any((tmp_path / "p" / "classes").glob("*"))
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("content", "message"), [
    (b"", "file is empty"),
    (b"this is not a png", "cannot decode image"),
])
def test_bad_image_clear_error_no_output(tmp_path, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    out = tmp_path / "out"
    res = runner.invoke(app, ["segment", str(bad), "--out", str(out)])
    assert res.exit_code == 2
    assert "bad.png" in res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_truncated_png_clear_error(tmp_path):
    from karyo.samples import sample_path

    data = sample_path().read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["segment", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "cut.png" in res.output


def test_evaluate_missing_predictions_named(tmp_path):
    truth = tmp_path / "t"
    img = np.zeros((16, 16, 3), np.uint8)
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 1
    write_layout_sample(truth, karyo.Sample(image=img, instances=inst, name="a"), split="test")
    write_layout_sample(truth, karyo.Sample(image=img, instances=inst, name="b"), split="train")
    pred = tmp_path / "p"
    (pred / "instances").mkdir(parents=True)
    from karyo.data.io import write_instances

    write_instances(pred / "instances" / "a.png", inst)
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred)])
    assert res.exit_code == 2
    assert "no prediction for 1 of 2" in res.output
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred), "--missing", "empty"])
    assert res.exit_code == 0, res.output
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["instance"]["pq"] == pytest.approx((1 / (1 + 1e-6) + 0) / 2)
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred), "--missing", "skip"])
    assert res.exit_code == 0, res.output
    report = json.loads((pred / "evaluation.json").read_text())
    assert report["n_images"] == 1 and report["instance"]["pq"] == pytest.approx(1 / (1 + 1e-6))
    assert "1 of 2 ground-truth image(s) have no prediction and are left out" in report["notes"][0]
    write_instances(pred / "instances" / "a_typo.png", inst)  # a misnamed prediction is named, not dropped unseen
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred), "--missing", "skip"])
    assert "1 prediction(s) match no ground-truth image and are not scored, e.g. ['a_typo']" in " ".join(
        res.output.split())
    write_instances(pred / "instances" / "b.png", inst)
    res = runner.invoke(app, ["evaluate", "--true", str(truth), "--pred", str(pred), "--split", "test"])
    assert "2 prediction(s) match no ground-truth image of split 'test' (images of other splits, or misnamed) and " \
           "are not scored, e.g. ['a_typo', 'b']" in " ".join(res.output.split())
    empty = tmp_path / "dataset"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "x.png").write_bytes(b"")
    res = runner.invoke(app, ["segment", str(empty)])
    assert res.exit_code == 2 and f"a dataset folder? its images/ holds 1: pass {empty / 'images'}" in res.output
    assert len(res.output.strip().splitlines()) == 1  # one line in a log, long paths not wrapped


def test_evaluate_matches_classes_by_name_and_skips_foreign_ones(tmp_path):
    """Predictions with the ground truth's class names under other ids are relabelled by name; predictions
    with other class names (a CoNSeP model on PanNuke) get no class metrics and a note, not id-by-id pairing."""
    from karyo.metrics.folders import evaluate_folders

    img = np.zeros((16, 16, 3), np.uint8)
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6], inst[9:14, 9:14] = 1, 2
    write_layout_sample(tmp_path / "t", karyo.Sample(image=img, instances=inst, classes={1: 1, 2: 2}, name="a",
                                                     class_names={1: "tumour", 2: "immune"}))
    swapped = karyo.Sample(image=img, instances=inst, classes={1: 2, 2: 1}, name="a",
                           class_names={1: "immune", 2: "Tumour"})
    write_layout_sample(tmp_path / "same", swapped)
    report = evaluate_folders(tmp_path / "t", tmp_path / "same")
    assert report.classified and report.detection.f1_type[1] == pytest.approx(1.0)
    other = karyo.Sample(image=img, instances=inst, classes={1: 1, 2: 2}, name="a",
                         class_names={1: "other", 2: "inflammatory"})
    write_layout_sample(tmp_path / "other", other)
    report = evaluate_folders(tmp_path / "t", tmp_path / "other")
    assert not report.classified
    assert report.notes[0].startswith("classification metrics skipped: the prediction's classes")
    assert sum(n.startswith("classification metrics skipped") for n in report.notes) == 1  # one reason, once
    (tmp_path / "other" / "classes.json").unlink()  # no names: ids taken as the ground truth's, and said so
    report = evaluate_folders(tmp_path / "t", tmp_path / "other")
    assert report.classified and "no classes.json: its class ids are taken to be the ground truth's (1 tumour, " \
        "2 immune)" in report.notes[0]


def test_evaluate_blames_a_ground_truth_mask_that_does_not_fit_its_own_image(tmp_path):
    """Whether or not class CSVs come first (a cropped map loses the ids its CSV names)."""
    from karyo.data.io import write_instances
    from karyo.errors import InputError
    from karyo.metrics.folders import evaluate_folders

    img = np.zeros((16, 16, 3), np.uint8)
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6] = 1
    write_layout_sample(tmp_path / "t", karyo.Sample(image=img, instances=inst, name="a"))
    write_layout_sample(tmp_path / "p", karyo.Sample(image=img, instances=inst, name="a"), image=False)
    write_instances(tmp_path / "t" / "instances" / "a.png", inst[:12])  # the annotation is cropped
    with pytest.raises(InputError, match=r"t/instances/a\.png: instance map shape 16×12 differs from image shape "
                                         r"16×16 \(a\.png\)"):
        evaluate_folders(tmp_path / "t", tmp_path / "p")
    classified = karyo.Sample(image=img, instances=inst, classes={1: 1}, class_names={1: "tumour"}, name="a")
    write_layout_sample(tmp_path / "t", classified)
    cropped = np.zeros_like(inst)
    cropped[12:, 12:] = 1  # the nucleus is cut away: classes/a.csv names an id the map no longer holds
    write_instances(tmp_path / "t" / "instances" / "a.png", cropped[:12])
    with pytest.raises(InputError, match=r"t/instances/a\.png: instance map shape 16×12 differs from image shape"):
        evaluate_folders(tmp_path / "t", tmp_path / "p")
    write_instances(tmp_path / "t" / "instances" / "a.png", inst)
    write_instances(tmp_path / "p" / "instances" / "a.png", inst[:12])  # now the prediction is wrong
    with pytest.raises(InputError, match=r"p/instances/a: prediction shape \(12, 16\) differs"):
        evaluate_folders(tmp_path / "t", tmp_path / "p")


def test_evaluate_notes_unclassified_truth_and_names_unmatched_prediction_ids(tmp_path):
    from karyo.errors import InputError
    from karyo.metrics.folders import evaluate_folders

    img = np.zeros((16, 16, 3), np.uint8)
    inst = np.zeros((16, 16), np.int32)
    inst[2:6, 2:6], inst[9:14, 9:14] = 1, 2
    write_layout_sample(tmp_path / "t", karyo.Sample(image=img, instances=inst, classes={1: 1, 2: 2}, name="a",
                                                     class_names={1: "tumour", 2: "immune"}))
    write_layout_sample(tmp_path / "p", karyo.Sample(image=img, instances=inst, classes={1: 1, 2: 2}, name="a",
                                                     class_names={1: "tumour", 2: "immune"}), image=False)
    (tmp_path / "t" / "classes" / "a.csv").write_text("instance_id,class_id\n1,1\n")  # nucleus 2 lost its row
    report = evaluate_folders(tmp_path / "t", tmp_path / "p")
    assert "1 nucleus of the ground truth has no class" in " ".join(report.notes)
    (tmp_path / "wsi").mkdir()
    (tmp_path / "wsi" / "nuclei.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"a karyo wsi output \(nuclei\.parquet\): evaluate scores instance maps"):
        evaluate_folders(tmp_path / "t", tmp_path / "wsi")
    (tmp_path / "p" / "instances" / "a.png").rename(tmp_path / "p" / "instances" / "a_mask.png")
    with pytest.raises(InputError, match=r"p/instances/a\.png: instance map not found; a_mask\.png is there: the "
                                         r"instance map must be named by its image's id exactly"):
        evaluate_folders(tmp_path / "t", tmp_path / "p")  # split.csv names id a
    (tmp_path / "p" / "split.csv").unlink()
    for f in (tmp_path / "p" / "classes").iterdir():
        f.unlink()
    with pytest.raises(InputError, match=r"no prediction for 1 of 1 image\(s\), e\.g\. \['a'\]; the predictions' "
                                         r"ids that match no ground truth are e\.g\. \['a_mask'\]"):
        evaluate_folders(tmp_path / "t", tmp_path / "p")


def test_models_lists_default():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    assert "default" in res.output
    assert "classical" in res.output


def test_segment_inputs_named_twice_and_a_bad_one_after_good_ones(tmp_path):
    """One file given twice is segmented once; an image that fails after others says what was written; --outputs
    does not pretend to apply to semantic output."""
    from karyo.samples import sample_path

    tile = str(sample_path())
    res = runner.invoke(app, ["segment", tile, tile, "--model", "classical", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "in 1 image(s)" in res.output
    (tmp_path / "bad.png").write_bytes(b"not a png")
    res = runner.invoke(app, ["segment", tile, str(tmp_path / "bad.png"), "--model", "classical",
                              "--out", str(tmp_path / "m")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "bad.png: cannot decode image" in text
    assert f"(the 1 image(s) before it were segmented into {tmp_path / 'm'}/; the rest were not)" in text
    res = runner.invoke(app, ["segment", tile, "--task", "semantic", "--outputs", "overlay", "--out",
                              str(tmp_path / "s")])
    assert res.exit_code == 2 and "--task semantic always writes" in " ".join(res.output.split())


def test_one_models_output_is_the_reference_for_anothers(tmp_path):
    """`karyo evaluate --true A --pred B` with two segment outputs (no images/ in either): agreement scores."""
    from karyo.samples import sample_path

    for model, out in (("classical", "a"), ("classical", "b")):
        res = runner.invoke(app, ["segment", str(sample_path()), "--model", model, "--out", str(tmp_path / out)])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--true", str(tmp_path / "a"), "--pred", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert report["instance"]["pq"] == pytest.approx(1.0)  # the same model agrees with itself exactly


def test_train_says_which_runs_need_packing_before_segment_takes_them(tmp_path):
    from karyo.cli import _trained_next_step

    assert _trained_next_step("prompter", tmp_path / "p").endswith(
        f"karyo pack promptnucseg --prompter {tmp_path / 'p'} --segmentor SEGMENTOR_RUN_OR_MODEL --out DIR")
    assert "karyo pack ivaan --run" in _trained_next_step("ivaan", tmp_path / "i")
    monch = _trained_next_step("monch", tmp_path / "m")
    assert monch.startswith(f"model → {tmp_path / 'm' / 'model'}") and "pack" not in monch
    assert f"karyo segment IMAGE --model {tmp_path / 'm' / 'model'}" in monch  # runnable once IMAGE is filled in
    (tmp_path / "f").mkdir()  # fine-tuned from a shipped model: its segmentor is the one to pair with
    (tmp_path / "f" / "train_config.json").write_text(json.dumps({"task": "prompter", "init": "default"}))
    assert _trained_next_step("prompter", tmp_path / "f").endswith("--segmentor default --out DIR")


def test_help_and_the_light_api_do_not_import_torch():
    """``karyo --help`` answers at once: torch, albumentations and pandas are imported when a command needs them."""
    import subprocess
    import sys

    code = ("import sys, karyo, karyo.cli, karyo.data, karyo.data.sample; "
            "print(sorted(m for m in ('torch', 'albumentations', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    code = ("import sys, karyo; "
            "print(karyo.read_image.__module__, karyo.load.__module__, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["karyo.data.io", "karyo.models.registry", "True"]
