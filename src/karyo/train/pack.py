"""Turn training runs into a model folder: ``karyo pack promptnucseg --prompter RUN --segmentor RUN --out DIR``.

Inference thresholds (prompter score, point NMS radius, mask probability) are tuned on the prompter run's
*validation* images and shipped in the model's config (as StarDist ships ``thresholds.json``); test data are
never used. Weights are stored in float16 (half the size, no measurable change in output) and loaded as
float32.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from karyo.config import from_dict, load_json
from karyo.errors import InputError
from karyo.metrics.instance import panoptic_quality
from karyo.models.prompter import PrompterConfig
from karyo.models.promptnucseg import PromptNucSegConfig, PromptNucSegModel
from karyo.models.segmentor import SegmentorConfig
from karyo.models.vit import read_state_dict
from karyo.train.data import load_specs

TUNING_GRID = {"score_threshold": (0.4, 0.5, 0.6, 0.7), "nms_radius_px": (10.0, 16.0, 20.0, 24.0),
               "mask_threshold": (0.4, 0.5, 0.6), "refine_points": (0, 1, 2)}


def _run_model(run: str | os.PathLike, name: str) -> tuple[dict, dict]:
    folder = Path(run) / "model"
    meta_path = folder / f"{name}.json"
    if not meta_path.is_file():
        raise InputError(folder, f"no {name}.json: is this a finished {name} run (karyo train {name})?")
    return load_json(meta_path), read_state_dict(folder / f"{name}.pt")


def load_segmentor(source: str | os.PathLike) -> tuple[SegmentorConfig, int, dict]:
    """(config, K negatives, weights) of a segmentor: a ``karyo train segmentor`` run, its ``model`` folder, or a
    packed PromptNucSeg/IVAAN model folder (re-packing a shipped model with a new prompter keeps its segmentor)."""
    folder = Path(source)
    if (folder / "model" / "segmentor.json").is_file():
        folder = folder / "model"
    if (folder / "segmentor.json").is_file():
        meta = load_json(folder / "segmentor.json")
        cfg, negatives = meta["config"], meta.get("settings", {}).get("negatives", 1)
    elif (folder / "config.json").is_file() and (folder / "segmentor.pt").is_file():
        data = load_json(folder / "config.json").get("config", {})
        if "segmentor" not in data:
            raise InputError(folder, "config.json holds no segmentor (is this a PromptNucSeg/IVAAN model folder?)")
        cfg, negatives = data["segmentor"], data.get("negatives", 1)
    else:
        raise InputError(folder, "no segmentor here (a segmentor run, segmentor.json + segmentor.pt, or a model "
                                 "folder)")
    return from_dict(SegmentorConfig, cfg), int(negatives), read_state_dict(folder / "segmentor.pt")


def validation_samples(run: str | os.PathLike) -> list:
    """The validation images of a training run, exactly as it held them out."""
    saved = load_json(Path(run) / "train_config.json")
    names = {int(k): v for k, v in (saved.get("model", {}).get("class_names") or {}).items()}
    samples = load_specs(saved["data"], names or None)
    index = {n: i for i, n in enumerate(samples.ids)}
    return [samples[index[i]] for i in saved["val_ids"] if i in index]


def mean_pq(model: PromptNucSegModel, samples: list) -> float:
    values = []
    for s in samples:
        if s.instances is None or s.instances.max() == 0:
            continue
        values.append(panoptic_quality(s.instances, model.segment(s.image, mpp=None).instances).pq)
    return float(np.mean(values)) if values else float("nan")


def tune_thresholds(model: PromptNucSegModel, samples: list, grid: dict | None = None,
                    log=print) -> tuple[PromptNucSegConfig, list[dict]]:
    """Grid search of the inference thresholds on validation images; returns the best config and all rows
    (mean PQ over images with nuclei). Each image's networks run once: the prompter's outputs and the
    segmentor's tile embeddings are reused for every (score threshold, NMS radius), whose masks are reused for
    every mask threshold; results equal :func:`mean_pq` with each setting."""
    grid = {**TUNING_GRID, **(grid or {})}
    point_settings = list(itertools.product(grid["refine_points"], grid["score_threshold"], grid["nms_radius_px"]))
    pq: dict[tuple, list[float]] = {}
    no_neg = np.zeros((0, 2), np.float32)
    with torch.no_grad():
        for sample in samples:
            if sample.instances is None or sample.instances.max() == 0:
                continue
            prep = model.prepare(sample.image, mpp=None)
            for refine, score_threshold, nms in point_settings:
                candidates = model.mask_candidates(prep, *model.detect(prep, score_threshold, nms), no_neg,
                                                   refine_points=int(refine))
                for mask_threshold in grid["mask_threshold"]:
                    pred = model.resolve(prep, candidates, mask_threshold).instances
                    key = (score_threshold, nms, mask_threshold, int(refine))
                    pq.setdefault(key, []).append(panoptic_quality(sample.instances, pred).pq)
    keys = ("score_threshold", "nms_radius_px", "mask_threshold", "refine_points")
    rows = [{**dict(zip(keys, k, strict=True)), "val_pq": float(np.mean(v))} for k, v in pq.items()]
    for r in rows:
        log(f"  score {r['score_threshold']}, nms {r['nms_radius_px']} px, mask {r['mask_threshold']}, "
            f"refine {r['refine_points']}: PQ {r['val_pq']:.4f}")
    if not rows:
        return model.config, rows
    best = max(rows, key=lambda r: r["val_pq"])
    return replace(model.config, **{k: best[k] for k in keys}), rows


def pack_promptnucseg(prompter_run: str | os.PathLike, segmentor_run: str | os.PathLike,
                      out: str | os.PathLike, *, tune: bool = True, log=print) -> PromptNucSegModel:
    """Build a PromptNucSeg model folder from a prompter run and a segmentor (run or model folder, see
    :func:`load_segmentor`)."""
    p_meta, p_state = _run_model(prompter_run, "prompter")
    s_cfg, negatives, s_state = load_segmentor(segmentor_run)
    p_cfg = from_dict(PrompterConfig, p_meta["config"])
    cfg = PromptNucSegConfig(prompter=p_cfg, segmentor=s_cfg, mpp=p_cfg.mpp, class_names=dict(p_cfg.class_names),
                             negatives=negatives)
    model = PromptNucSegModel(cfg)
    model.prompter.load_state_dict(p_state)
    model.segmentor.load_state_dict(s_state)
    rows: list[dict] = []
    if tune:
        samples = validation_samples(prompter_run)
        log(f"tuning thresholds on {len(samples)} validation images of {prompter_run}")
        model.config, rows = tune_thresholds(model, samples, log=log)
    out = Path(out)
    model.save(out)
    _halve(out)
    if rows:
        (out / "tuning.json").write_text(json.dumps({"grid": TUNING_GRID, "rows": rows}, indent=1) + "\n")
    return model


def pack_cellvit(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A CellViT model folder from a finished ``karyo train cellvit`` run, weights in float16."""
    from karyo.train.cellvit import WEIGHTS_FILE, export_cellvit_model

    folder = Path(export_cellvit_model(run, out))
    _halve(folder, (WEIGHTS_FILE,))
    return folder


def _halve(folder: Path, names: tuple[str, ...] = ("prompter.pt", "segmentor.pt")) -> None:
    """Store weights as float16 (loading casts back to the model's float32)."""
    from karyo.data.io import atomic_path

    for name in names:
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        with atomic_path(folder / name) as tmp:
            torch.save(half, tmp)
