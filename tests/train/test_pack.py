"""Threshold tuning when packing PromptNucSeg: the cached search must score exactly what segment() gives."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from karyo.data.sample import Sample
from karyo.models.prompter import PrompterConfig
from karyo.models.promptnucseg import PromptNucSegConfig, PromptNucSegModel
from karyo.models.segmentor import segmentor_config
from karyo.train.pack import mean_pq, tune_thresholds


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
    cfg = PromptNucSegConfig(prompter=PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16,
                                                     head_hidden=16, num_classes=1, class_names={1: "n"}),
                             segmentor=segmentor_config("tiny"), tile_size=64, tile_overlap=16, min_area=1,
                             min_kept_fraction=0.0)
    model = PromptNucSegModel(cfg)
    samples = _samples(model)
    assert samples[0].instances.max() > 0
    grid = {"score_threshold": (0.0, 0.45), "nms_radius_px": (4.0, 12.0), "mask_threshold": (0.3, 0.5),
            "refine_points": (0, 1)}
    best, rows = tune_thresholds(model, samples, grid, log=lambda _: None)
    assert len(rows) == 16
    assert model.config == cfg  # the model itself is left as it was
    for r in rows:
        model.config = replace(cfg, score_threshold=r["score_threshold"], nms_radius_px=r["nms_radius_px"],
                               mask_threshold=r["mask_threshold"], refine_points=r["refine_points"])
        assert r["val_pq"] == pytest.approx(mean_pq(model, samples), abs=1e-12)
    assert max(r["val_pq"] for r in rows) == pytest.approx(
        next(r["val_pq"] for r in rows if (r["score_threshold"], r["nms_radius_px"], r["mask_threshold"],
                                            r["refine_points"])
             == (best.score_threshold, best.nms_radius_px, best.mask_threshold, best.refine_points)))
    assert len({r["val_pq"] for r in rows}) > 1  # the settings matter on these images
    assert (best.score_threshold, best.nms_radius_px, best.mask_threshold, best.refine_points) == (0.0, 4.0, 0.3, 0)
    model.config = cfg


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
