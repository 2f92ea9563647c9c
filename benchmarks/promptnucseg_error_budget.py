"""Where PromptNucSeg loses PQ: the prompter's points against oracle-corrected points, on validation images.

    python -m benchmarks.promptnucseg_error_budget --model promptnucseg_cpu \
        --val-config configs/default_prompter_continue.yaml

The segmentor, overlap resolution and inference settings stay fixed; only the prompts change:

* prompter — the model's own points (as ``segment``);
* + centred — every prompter point paired with a nucleus (HoVer-Net pairing, ≤ 12 px) moved onto that nucleus'
  centroid: what perfect localisation would give;
* − false positives — unpaired prompter points removed: perfect precision;
* + missed nuclei — the centroids of unpaired nuclei added: perfect recall;
* ground-truth centroids — all three at once (the segmentor's ceiling).

The gap between rows says which part of the prompter to improve. A second table says where the false positives
come from: each unpaired prompter point is a *duplicate* (it lies in a nucleus that has a paired point: an
elongated nucleus found twice), lies *on a missed nucleus* (paired to nothing by the ≤ 12 px rule), or lies *off
nuclei* (background, or what the annotators left out), with each source image's share of the "− false positives"
PQ gain. Validation images only (the ``val_ids`` of a run
config): test splits are never used to choose what to work on.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import publish_model_report
from karyo.data.sample import Sample, SampleSequence
from karyo.metrics.detection import (
    CoordinatePairing,
    InstancePoints,
    instance_points,
    labels_at,
    pair_coordinates,
)
from karyo.metrics.evaluate import ImagePair, evaluate
from karyo.models.promptnucseg import PreparedImage
from karyo.train.api import read_config_file
from karyo.train.data import DataSpec, load_specs, source_group

CONDITIONS = ("prompter", "+ centred", "− false positives", "+ missed nuclei", "ground-truth centroids")
POINT_KINDS = ("off nuclei", "duplicate", "on a missed nucleus")


def unpaired_point_kinds(xy: np.ndarray, instances: np.ndarray, paired_ids: set[int]) -> list[str]:
    """The :data:`POINT_KINDS` entry of each unpaired prompter point (x, y in the instance map's pixels)."""
    return [POINT_KINDS[0] if g == 0 else POINT_KINDS[1] if int(g) in paired_ids else POINT_KINDS[2]
            for g in labels_at(instances, xy)]


def prompts(condition: str, pts: np.ndarray, cls: np.ndarray, score: np.ndarray, gt_xy: np.ndarray,
            pairing: CoordinatePairing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prompt points (x, y), classes and scores of one condition (see the module docstring); ``pairing`` is
    ``pair_coordinates(gt_xy, pts)``."""
    if condition == "ground-truth centroids":
        n = len(gt_xy)
        return gt_xy.astype(np.float32), np.zeros(n, np.int64), np.ones(n, np.float32)
    gt_i, pred_i = pairing.paired[:, 0], pairing.paired[:, 1]
    if condition == "prompter":
        return pts, cls, score
    if condition == "+ centred":
        moved = pts.copy()
        moved[pred_i] = gt_xy[gt_i]
        return moved, cls, score
    if condition == "− false positives":
        keep = np.sort(pred_i)
        return pts[keep], cls[keep], score[keep]
    if condition == "+ missed nuclei":
        missed = gt_xy[pairing.unpaired_a].astype(np.float32)
        fill = float(np.median(score)) if len(score) else 1.0
        return (np.concatenate([pts, missed]), np.concatenate([cls, np.zeros(len(missed), cls.dtype)]),
                np.concatenate([score, np.full(len(missed), fill, np.float32)]))
    raise ValueError(f"unknown condition {condition!r}")


def config_split(config: Path) -> tuple[SampleSequence, list[int], list[int]]:
    """A run config's data, and the indices of its training images and of its validation images (``val_ids``)."""
    cfg = read_config_file(config)
    if not cfg.get("val_ids"):
        raise SystemExit(f"{config}: no val_ids (the validation images)")
    samples = load_specs([DataSpec.parse(s) for s in cfg["data"]])
    held = set(cfg["val_ids"])
    return (samples, [i for i, n in enumerate(samples.ids) if n not in held],
            [i for i, n in enumerate(samples.ids) if n in held])


def detect_with_truth(model, sample: Sample) -> tuple[PreparedImage, np.ndarray, np.ndarray, np.ndarray,
                                                     InstancePoints, np.ndarray]:
    """(prepared image, points, classes, scores) as ``segment`` detects them at the model's settings, and the
    annotated nuclei's centroids, also in model pixels."""
    mc = model.config
    with torch.no_grad():
        prep = model.prepare(sample.image, mpp=sample.mpp, name=sample.name)
    pts, cls, score = model.detect(prep, mc.score_threshold, mc.nms_radius_px)
    truth = instance_points(sample.instances)
    return prep, pts, cls, score, truth, truth.xy * prep.scale


def run(model_name: str, val_config: Path, limit: int | None = None) -> dict:
    samples, _, index = config_split(val_config)
    index = index[:limit]
    model = karyo.load(model_name)
    mc = model.config
    pairs: dict[str, list[ImagePair]] = {c: [] for c in CONDITIONS}
    offsets: list[np.ndarray] = []
    sources: dict[str, dict] = {}
    t0 = time.perf_counter()
    for i in index:
        sample = samples[i]
        prep, pts, cls, score, truth, gt_xy = detect_with_truth(model, sample)
        with torch.no_grad():
            pairing = pair_coordinates(gt_xy, pts)
            offsets.append(np.linalg.norm(pts[pairing.paired[:, 1]] - gt_xy[pairing.paired[:, 0]], axis=1))
            src = sources.setdefault(source_group(sample.name), {"images": 0, "pq_gain": 0.0,
                                                                  **dict.fromkeys(POINT_KINDS, 0)})
            src["images"] += 1
            for kind in unpaired_point_kinds(pts[pairing.unpaired_b] / prep.scale, sample.instances,
                                             {int(g) for g in truth.ids[pairing.paired[:, 0]]}):
                src[kind] += 1
            for c in CONDITIONS:
                p, k, s = prompts(c, pts, cls, score, gt_xy, pairing)
                res = model.resolve(prep, model.mask_candidates(prep, p, k, s, np.zeros((0, 2), np.float32)),
                                    mc.mask_threshold, min_stability=mc.min_stability,
                                    min_verified=mc.min_verified, name=sample.name)
                pairs[c].append(ImagePair(name=sample.name, true_inst=sample.instances, pred_inst=res.instances))
    reports = {c: evaluate(pairs[c]) for c in CONDITIONS}
    rows = {c: {**{k: rep.instance[k] for k in ("pq", "dq", "sq", "aji")}, "f1_d": rep.detection.f1_d}
            for c, rep in reports.items()}
    before, after = reports["prompter"].per_image, reports["− false positives"].per_image
    for name, n_true, gain in zip(before["name"], before["n_true"], after["pq"] - before["pq"], strict=True):
        if n_true > 0:  # mean_pq's convention: images with nuclei
            sources[source_group(name)]["pq_gain"] += float(gain)
    dist = np.concatenate(offsets) if offsets else np.zeros(0)
    return {"rows": rows, "images": len(index), "seconds": time.perf_counter() - t0, "sources": sources,
            "offset_px": {"mean": float(dist.mean()) if len(dist) else float("nan"),
                          "median": float(np.median(dist)) if len(dist) else float("nan"),
                          "p90": float(np.percentile(dist, 90)) if len(dist) else float("nan")},
            "settings": {k: getattr(mc, k) for k in ("score_threshold", "nms_radius_px", "mask_nms_overlap",
                                                      "min_duplicate_probability", "refine_points", "mask_threshold",
                                                      "min_stability", "min_verified")}}


def markdown(model_name: str, result: dict) -> str:
    lines = [f"Model `{model_name}`, {result['images']} validation images, inference settings {result['settings']}.",
             "", "| prompts | PQ | DQ | SQ | AJI | F1d |", "|---|---|---|---|---|---|"]
    for c, r in result["rows"].items():
        lines.append(f"| {c} | {r['pq']:.4f} | {r['dq']:.4f} | {r['sq']:.4f} | {r['aji']:.4f} | {r['f1_d']:.4f} |")
    o = result["offset_px"]
    lines += ["", f"Distance of paired prompter points from their nucleus' centroid: mean {o['mean']:.2f} px, "
                  f"median {o['median']:.2f} px, 90th percentile {o['p90']:.2f} px (model pixels)."]
    sources = result.get("sources", {})
    total = sum(v["pq_gain"] for v in sources.values())
    lines += ["", "Unpaired prompter points by kind, and each source image's share of the summed per-image PQ gain "
                  "of removing them:", "", "| source image | patches | " + " | ".join(POINT_KINDS)
              + " | share of the − FP gain |", "|---|---|---|---|---|---|"]
    for name, v in sorted(sources.items(), key=lambda kv: -kv[1]["pq_gain"]):
        share = v["pq_gain"] / total if total else float("nan")
        lines.append(f"| {name} | {v['images']} | " + " | ".join(str(v[k]) for k in POINT_KINDS)
                     + f" | {share:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="promptnucseg_cpu")
    ap.add_argument("--val-config", type=Path, default=Path("configs/default_prompter_continue.yaml"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.val_config, args.limit)
    publish_model_report(markdown(args.model, result), args.model, "PromptNucSeg error budget (validation): {model}",
                         "benchmarks.promptnucseg_error_budget", write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
