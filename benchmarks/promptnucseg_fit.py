"""Is PromptNucSeg's prompter underfit or overfit: its detection on the images it trained on and on validation.

    python -m benchmarks.promptnucseg_fit --model promptnucseg_cpu --config configs/default_prompter_continue.yaml

The prompter's points (at the model's score threshold and NMS radius, as ``segment`` finds them) are paired with
the annotated nuclei (HoVer-Net pairing within 6 px and within 12 px). Training images are every ``--every``-th
image of the config's data that is not in its ``val_ids``; validation images are its ``val_ids``. Recall is also
given by nucleus area and by annotated class (nuclei of unknown class are left out of that table). Close values on
the two sets with a low training recall mean an underfit prompter (more training, capacity or a better target
helps); a much better training row means overfitting. Test splits are not used.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import publish_model_report
from benchmarks.promptnucseg_error_budget import config_split, detect_with_truth
from karyo.data.sample import SampleSequence
from karyo.metrics.detection import pair_coordinates

RADII = (6.0, 12.0)
AREA_EDGES = (0, 100, 200, 400, np.inf)  # model pixels² (0.25 µm/px: 100 px² ≈ 6.25 µm²)


def split_indices(config: Path, every: int) -> tuple[SampleSequence, dict[str, list[int]]]:
    samples, train, val = config_split(config)
    return samples, {"training": train[::every], "validation": val}


def detection_counts(model, samples, index: list[int]) -> dict:
    """Pooled TP/FP/FN per radius, and per nucleus (12 px): its area and class and whether a point paired with it."""
    counts = {r: np.zeros(3, np.int64) for r in RADII}
    areas, classes, found = [], [], []
    for i in index:
        sample = samples[i]
        prep, pts, _, _, truth, gt_xy = detect_with_truth(model, sample)
        pairings = {r: pair_coordinates(gt_xy, pts, r) for r in RADII}
        for r, pairing in pairings.items():
            counts[r] += (len(pairing.paired), len(pairing.unpaired_b), len(pairing.unpaired_a))
        hit = np.zeros(len(truth.ids), bool)
        hit[pairings[RADII[-1]].paired[:, 0]] = True
        area = np.bincount(sample.instances.ravel(), minlength=int(truth.ids.max(initial=0)) + 1)[truth.ids]
        areas.append(area * prep.scale ** 2)
        known = sample.classes or {}
        classes.append(np.array([known.get(int(k), 0) for k in truth.ids], np.int64))
        found.append(hit)
    return {"counts": counts, "area": np.concatenate(areas), "class": np.concatenate(classes),
            "found": np.concatenate(found), "images": len(index)}


def run(model_name: str, config: Path, every: int = 4, limit: int | None = None) -> dict:
    samples, splits = split_indices(config, every)
    model = karyo.load(model_name)
    t0 = time.perf_counter()
    result = {name: detection_counts(model, samples, index[:limit]) for name, index in splits.items()}
    return {"sets": result, "class_names": model.class_names or {}, "settings": model.config,
            "seconds": time.perf_counter() - t0}


def _prf(tp: int, fp: int, fn: int) -> str:
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return f"{p:.3f} | {r:.3f} | {2 * tp / max(2 * tp + fp + fn, 1):.3f}"


def _recall(found: np.ndarray) -> str:
    return f"{found.mean():.3f} ({found.size})" if found.size else "–"


def markdown(model_name: str, config: Path, every: int, r: dict) -> str:
    s, sets = r["settings"], r["sets"]
    lines = [f"Model `{model_name}` at its own settings (score ≥ {s.score_threshold}, point NMS {s.nms_radius_px} px); "
             f"images from `{config}`: every {every}th training image ({sets['training']['images']}) and all "
             f"{sets['validation']['images']} validation images.", "",
             "| images | radius | precision | recall | F1 |", "|---|---|---|---|---|"]
    for name, d in sets.items():
        lines += [f"| {name} | {rad:g} px | {_prf(*d['counts'][rad])} |" for rad in RADII]
    bins = list(itertools.pairwise(AREA_EDGES))
    heads = [f"{lo:g}–{hi:g} px²" if np.isfinite(hi) else f"≥ {lo:g} px²" for lo, hi in bins]
    lines += ["", "Recall (paired within 12 px; nuclei in brackets) by nucleus area:", "",
              "| images | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, d in sets.items():
        cells = [_recall(d["found"][(d["area"] >= lo) & (d["area"] < hi)]) for lo, hi in bins]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = r["class_names"]
    if names:
        lines += ["", "Recall by annotated class:", "", "| images | " + " | ".join(names.values()) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for name, d in sets.items():
            lines.append(f"| {name} | " + " | ".join(_recall(d["found"][d["class"] == c]) for c in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="promptnucseg_cpu")
    ap.add_argument("--config", type=Path, default=Path("configs/default_prompter_continue.yaml"),
                    help="a prompter run config: its data and val_ids")
    ap.add_argument("--every", type=int, default=4, help="use every N-th training image")
    ap.add_argument("--limit", type=int, default=None, help="first N images of each set (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.config, args.every, args.limit)
    publish_model_report(markdown(args.model, args.config, args.every, result), args.model,
                         "PromptNucSeg prompter fit (training against validation images): {model}",
                         "benchmarks.promptnucseg_fit", write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
