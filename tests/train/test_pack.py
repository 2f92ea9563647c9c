"""Threshold tuning when packing PromptNucSeg: the cached search must score exactly what segment() gives."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from karyo.data.sample import Sample
from karyo.models.prompter import PrompterConfig
from karyo.models.promptnucseg import PromptNucSegConfig, PromptNucSegModel
from karyo.models.segmentor import segmentor_config
from karyo.train.pack import mean_pq, select_setting, tune_thresholds


def _tiny_config(**kw) -> PromptNucSegConfig:
    return PromptNucSegConfig(prompter=PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16,
                                                      head_hidden=16, num_classes=1, class_names={1: "n"}),
                              segmentor=segmentor_config("tiny"), tile_size=64, tile_overlap=16, min_area=1,
                              min_kept_fraction=0.0, **kw)


def _samples(model: PromptNucSegModel) -> list[Sample]:
    """Random images whose 'truth' is the model's own output at one setting, so PQ varies across the grid."""
    rng = np.random.default_rng(1)
    truth_model = PromptNucSegModel(replace(model.config, score_threshold=0.0, nms_radius_px=4.0, mask_threshold=0.3))
    truth_model.prompter.load_state_dict(model.prompter.state_dict())
    truth_model.segmentor.load_state_dict(model.segmentor.state_dict())
    out = []
    for k in range(2):
        img = rng.integers(0, 255, size=(80, 96, 3), dtype=np.uint8)
        out.append(Sample(img, truth_model.segment(img).instances, name=f"s{k}"))
    out.append(Sample(img, np.zeros((80, 96), np.int32), name="empty"))  # skipped: no nuclei
    return out


def test_cached_tuning_equals_segment_per_setting():
    torch.manual_seed(0)
    cfg = _tiny_config()
    model = PromptNucSegModel(cfg)
    samples = _samples(model)
    assert samples[0].instances.max() > 0
    grid = {"score_threshold": (0.0, 0.45), "nms_radius_px": (4.0, 12.0), "mask_nms_overlap": (None, 0.3),
            "refine_points": (0, 1), "mask_threshold": (0.3, 0.5), "min_stability": (None, 0.5)}
    best, rows = tune_thresholds(model, samples, grid, log=lambda _: None)
    assert len(rows) == 64
    assert model.config == cfg  # the model itself is left as it was
    keys = list(grid)
    best_row = max(rows, key=lambda r: r["val_pq"])
    for r in [best_row, *rows[::5]]:  # every fifth setting, and the best, recomputed with segment()
        model.config = replace(cfg, **{k: r[k] for k in keys})
        assert r["val_pq"] == pytest.approx(mean_pq(model, samples), abs=1e-12)
    model.config = cfg
    chosen = select_setting(rows)
    assert all(getattr(best, k) == chosen[k] for k in keys)
    assert len({r["val_pq"] for r in rows}) > 1  # the settings matter on these images
    # The truth was made with score 0, NMS 4, mask 0.3, no refinement, no duplicate handling, no stability filter.
    assert (best_row["score_threshold"], best_row["nms_radius_px"], best_row["mask_threshold"],
            best_row["refine_points"], best_row["min_stability"]) == (0.0, 4.0, 0.3, 0, None)
    assert best_row["se_vs_best"] == 0.0
    # prompts: the points decoded over all passes, counted here by hand for two settings
    counted = []
    decode = model._decode
    model._decode = lambda prep, pts, *a, **k: counted.append(len(pts)) or decode(prep, pts, *a, **k)
    try:
        for r in (best_row, next(r for r in rows if r["refine_points"] == 1 and r["mask_nms_overlap"] == 0.3)):
            counted.clear()
            model.config = replace(cfg, **{k: r[k] for k in keys})
            per_image = []
            for s in samples[:2]:
                model.segment(s.image)
                per_image.append(sum(counted))
                counted.clear()
            assert r["prompts"] == pytest.approx(np.mean(per_image))
            assert r["prompts"] > 0
    finally:
        model._decode = decode
        model.config = cfg
    assert {r["val_pq"] for r in rows if r["min_stability"] == 0.5} != {r["val_pq"] for r in rows
                                                                          if r["min_stability"] is None}
    capped, capped_rows = tune_thresholds(model, samples[:1], grid, log=lambda _: None, max_nms_radius_px=8.0)
    assert {r["nms_radius_px"] for r in capped_rows} == {4.0} and capped.nms_radius_px == 4.0
    _, floor_rows = tune_thresholds(model, samples[:1], grid, log=lambda _: None, max_nms_radius_px=1.0)
    assert {r["nms_radius_px"] for r in floor_rows} == {4.0}  # the grid's smallest radius always stays


def test_select_setting_takes_the_fewest_prompts_within_one_standard_error():
    rows = [dict(a=1, val_pq=0.50, se_vs_best=0.0, prompts=80.0),
            dict(a=2, val_pq=0.49, se_vs_best=0.012, prompts=60.0),  # tied: 0.01 ≤ 0.012
            dict(a=3, val_pq=0.48, se_vs_best=0.015, prompts=60.0),  # tied, same prompts, lower PQ
            dict(a=4, val_pq=0.47, se_vs_best=0.035, prompts=50.0),  # tied (0.03 ≤ 0.035), fewest prompts
            dict(a=5, val_pq=0.46, se_vs_best=0.03, prompts=40.0)]  # 0.04 > 0.03: worse, however fast
    assert select_setting(rows)["a"] == 4
    assert select_setting([r for r in rows if r["a"] != 4])["a"] == 2
    assert select_setting(rows[:1])["a"] == 1
    old_layout = [{"a": r["a"], "val_pq": r["val_pq"]} for r in rows]  # tuning.json before these columns
    assert select_setting(old_layout)["a"] == 1


def test_nms_radius_limit_is_a_quantile_of_nearest_neighbour_spacing():
    from karyo.train.pack import nms_radius_limit

    inst = np.zeros((60, 100), np.int32)
    # Centres at x = 10, 20, 50, 90 (nearest-neighbour distances 10, 10, 30, 40), 3×3 squares.
    for k, x in enumerate((10, 20, 50, 90), start=1):
        inst[29:32, x - 1:x + 2] = k
    samples = [Sample(np.zeros((60, 100, 3), np.uint8), inst, name="a", mpp=0.5),
               Sample(np.zeros((60, 100, 3), np.uint8), np.zeros((60, 100), np.int32), name="empty")]
    # At 0.25 µm/px model pixels the 0.5 µm/px distances double: 20, 20, 60, 80.
    assert nms_radius_limit(samples, mpp=0.25, quantile=0.5) == pytest.approx(40.0)
    assert nms_radius_limit(samples, mpp=0.5, quantile=0.0) == pytest.approx(10.0)
    assert nms_radius_limit(samples[1:], mpp=0.25) == float("inf")


def test_load_segmentor_reads_a_packed_model_folder(tmp_path):
    """Re-packing with a new prompter keeps a shipped model's segmentor: config, K and weights come back."""
    from karyo.errors import InputError
    from karyo.train.pack import load_segmentor

    torch.manual_seed(0)
    cfg = PromptNucSegConfig(prompter=PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16,
                                                     head_hidden=16, num_classes=1, class_names={1: "n"}),
                             segmentor=segmentor_config("tiny"), negatives=2)
    model = PromptNucSegModel(cfg)
    model.save(tmp_path / "packed")
    s_cfg, negatives, state = load_segmentor(tmp_path / "packed")
    assert s_cfg == cfg.segmentor and negatives == 2
    expected = model.segmentor.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no segmentor here"):
        load_segmentor(tmp_path / "empty")


def test_cli_pack_promptnucseg_tunes_under_the_spacing_cap(tmp_path, disc_layout, one_thread, monkeypatch):
    """karyo pack promptnucseg end to end: a prompter run + a model folder's segmentor → a loadable model whose
    NMS radius respects the cap measured on the run's training annotations."""

    from tests.train.test_init import _config
    from typer.testing import CliRunner

    import karyo
    from karyo.cli import app
    from karyo.train import pack
    from karyo.train.api import train

    run = tmp_path / "prompter_run"
    train("prompter", None, run, config=_config(tmp_path, disc_layout, val_ids=["syn_3_000", "syn_3_001"]),
          progress=False)
    seg = PromptNucSegModel(PromptNucSegConfig(segmentor=segmentor_config("tiny")))
    seg.save(tmp_path / "seg")
    monkeypatch.setattr(pack, "TUNING_GRID", {"score_threshold": (0.3,), "nms_radius_px": (2.0, 4.0, 500.0),
                                              "mask_nms_overlap": (None, 0.3), "refine_points": (0,),
                                              "mask_threshold": (0.5,)})
    res = CliRunner().invoke(app, ["pack", "promptnucseg", "--prompter", str(run), "--segmentor", str(tmp_path / "seg"),
                                   "--out", str(tmp_path / "model")])
    assert res.exit_code == 0, res.output
    assert "model →" in res.output
    assert "verifier fitted on 6 images" in res.output  # the run's training images with nuclei
    header, rows = pack.read_tuning(tmp_path / "model" / "tuning.json")
    limit = pack.nms_radius_limit(pack.training_samples(run), 0.25)
    assert header["max_nms_radius_px"] == pytest.approx(limit) and 4.0 < limit < 500.0
    assert {r["nms_radius_px"] for r in rows} == {2.0, 4.0}  # 500 px is above the cap
    assert {r["mask_nms_overlap"] for r in rows} == {None, 0.3} and all(0 <= r["val_pq"] <= 1 for r in rows)
    model = karyo.load(tmp_path / "model")
    assert model.config.nms_radius_px in (2.0, 4.0) and model.config.score_threshold == 0.3
    assert model.config.verifier is not None and model.config.verifier.fit["images"] == 6
    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(run), "--prompter", str(run),
                                   "--out", str(tmp_path / "c")])  # an option of another architecture
    assert res.exit_code == 2 and "karyo pack cellvit takes --run, not --prompter" in res.output
    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(run), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "is a prompter run, not a cellvit run" in res.output
    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(run), "--no-tune", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "takes --run, not --tune/--no-tune" in res.output
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tile_query_large.csv").write_text("rank\n")  # another command's folder
    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(run), "--out", str(tmp_path / "results")])
    assert res.exit_code == 2 and "holds other files and is no model folder" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["query", str(tmp_path / "results" / "x.png"), "large", "--model",
                                   str(tmp_path / "model"), "--out", str(tmp_path / "model")])
    assert res.exit_code == 2 and "is a model folder; write the query's files elsewhere" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["pack", "unet", "--run", str(run), "--out", str(tmp_path / "u")])
    assert res.exit_code == 2 and "unet runs need no packing: their model is RUN/model" in " ".join(res.output.split())
    (tmp_path / "cv0").mkdir()
    (tmp_path / "cv0" / "train_config.json").write_text('{"task": "cellvit"}')
    res = CliRunner().invoke(app, ["pack", "promptnucseg", "--prompter", str(tmp_path / "cv0"), "--segmentor", str(run),
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "is a cellvit run, not a prompter run" in " ".join(res.output.split())
    interrupted = tmp_path / "cv"  # checkpoints, no exported network: say to resume it
    interrupted.mkdir()
    (interrupted / "train_config.json").write_text('{"task": "cellvit"}')
    (interrupted / "last.pt").write_bytes(b"")
    res = CliRunner().invoke(app, ["pack", "cellvit", "--run", str(interrupted), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "it was interrupted; finish it with karyo train" in " ".join(res.output.split())

    def cannot_fit(*args, **kwargs):
        raise pack.VerifierFitError("the verifier needs candidates that are nuclei and candidates that are not")

    monkeypatch.setattr(pack, "fit_verifier", cannot_fit)
    logs = []
    plain = pack.pack_promptnucseg(run, tmp_path / "seg", tmp_path / "model2", log=logs.append)
    assert plain.config.verifier is None and plain.config.min_verified is None
    assert any(m.startswith("no verifier: the verifier needs") for m in logs)  # packed all the same


def test_cached_tuning_with_a_verifier_equals_segment():
    from karyo.models.verifier import VerifierConfig

    torch.manual_seed(0)
    verifier = VerifierConfig(mean=[0, 0, 0, 0, 0.5, 0], scale=[1, 1, 1, 1, 0.05, 1], weights=[0, 0, 0, 0, 1, 0])
    cfg = _tiny_config(verifier=verifier)
    model = PromptNucSegModel(cfg)
    samples = _samples(model)
    grid = {"score_threshold": (0.0,), "nms_radius_px": (4.0,), "mask_nms_overlap": (None,), "refine_points": (0,),
            "mask_threshold": (0.3,), "min_verified": (None, 0.4, 0.6)}
    _, rows = tune_thresholds(model, samples, grid, log=lambda _: None)
    assert [r["min_verified"] for r in rows] == [None, 0.4, 0.6]
    for r in rows:
        model.config = replace(cfg, min_verified=r["min_verified"], mask_threshold=0.3, score_threshold=0.0,
                               nms_radius_px=4.0, mask_nms_overlap=None, refine_points=0)
        assert r["val_pq"] == pytest.approx(mean_pq(model, samples), abs=1e-12)
    assert len({r["val_pq"] for r in rows}) > 1  # the verifier removes instances here
    model.config = replace(cfg, verifier=None)
    _, plain = tune_thresholds(model, samples, grid, log=lambda _: None)
    assert [r["min_verified"] for r in plain] == [None]  # without a verifier there is nothing to tune


def test_cached_tuning_with_a_duplicate_judge_equals_segment():
    from karyo.models.duplicates import DuplicateJudgeConfig

    torch.manual_seed(0)
    judge = DuplicateJudgeConfig(weights=[4.0, 0, 0, 0, 0, 0, 0], bias=-2.0)  # P > 0.5 above overlap 0.5
    cfg = _tiny_config(duplicate_judge=judge)
    model = PromptNucSegModel(cfg)
    samples = _samples(model)
    grid = {"score_threshold": (0.0,), "nms_radius_px": (4.0,), "mask_nms_overlap": (None, 0.3), "refine_points": (0,),
            "mask_threshold": (0.3,), "min_duplicate_probability": (None, 0.3, 0.9)}
    _, rows = tune_thresholds(model, samples, grid, log=lambda _: None)
    # never both rules at once: 2 overlap settings without the judge, 2 judge settings without overlap
    assert [(r["mask_nms_overlap"], r["min_duplicate_probability"]) for r in rows] == [
        (None, None), (None, 0.3), (None, 0.9), (0.3, None)]
    for r in rows:
        model.config = replace(cfg, mask_nms_overlap=r["mask_nms_overlap"], score_threshold=0.0, nms_radius_px=4.0,
                               min_duplicate_probability=r["min_duplicate_probability"], mask_threshold=0.3,
                               refine_points=0)
        assert r["val_pq"] == pytest.approx(mean_pq(model, samples), abs=1e-12)
    assert rows[1]["prompts"] < rows[2]["prompts"]  # the stricter the judge, the more points it drops
    model.config = replace(cfg, duplicate_judge=None)
    _, plain = tune_thresholds(model, samples, grid, log=lambda _: None)
    assert {r["min_duplicate_probability"] for r in plain} == {None}  # nothing to judge with


def test_tuning_says_when_the_prompter_looks_untrained():
    """A smoke run's prompter fires on every anchor: tuning it decodes them all for every setting (the IVAAN
    review waited 10 minutes on one image without a line), so the first image says so."""
    from types import SimpleNamespace

    from karyo.train.pack import _note_untrained_prompter

    instances = np.zeros((64, 64), np.int32)
    instances[2:6, 2:6], instances[10:14, 10:14] = 1, 2
    settings = [{"score_threshold": s, "nms_radius_px": r} for s in (0.3, 0.7) for r in (6.0, 20.0)]

    def tune_with(found: int) -> tuple[list, list[str]]:
        asked, lines = [], []
        model = SimpleNamespace(detect=lambda prep, t, r: asked.append((t, r)) or (np.zeros((found, 2)),))
        _note_untrained_prompter(model, None, SimpleNamespace(instances=instances, name="v1"), settings, lines.append)
        return asked, lines

    asked, lines = tune_with(1024)
    assert asked == [(0.7, 6.0)]  # the strictest score, with the NMS that hides least
    assert lines[0].startswith("note: the prompter finds 1024 points at score ≥ 0.7 on v1, which has 2 annotated "
                               "nuclei: it looks untrained") and "--no-tune" in lines[0]
    assert tune_with(60)[1] == []  # a trained prompter on a dense image: no note


def test_a_run_whose_relative_data_is_not_found_from_here_says_where_it_is_read_from(tmp_path):
    from karyo.errors import InputError
    from karyo.train.pack import training_samples

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"data": ["tiny:train"], "val_ids": []}))
    with pytest.raises(InputError, match=r"the run's data 'tiny' is not found from .*: run pack from the folder the "
                                         r"run was trained in \(or pack with --no-tune"):
        training_samples(tmp_path / "run")
