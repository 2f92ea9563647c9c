"""Which PromptNucSeg model (prompter + segmentor) does better, judged on one set of validation images.

    python -m benchmarks.promptnucseg_prompters --run runs/prompter_pico promptnucseg_cpu runs/pack_pico

``karyo pack`` tunes each model on the validation images of *its own* prompter run, so two prompters trained with
different validation splits cannot be compared from their ``tuning.json``. Here every model (a registry name or a
model folder) is tuned with the same grid and NMS radius cap as ``karyo pack`` on the validation images of
``--run``, and reported at its best setting: mean PQ and AJI, and detection F1 of the instance centroids (paired
within 12 px, pooled). A model whose networks trained on some of these images is favoured by them: a model that
beats it anyway is better; the reverse proves nothing. Test splits are not used.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import publish
from karyo.metrics.detection import instance_points, pair_coordinates
from karyo.metrics.instance import aggregated_jaccard_index, panoptic_quality
from karyo.train.pack import (
    RESOLVE_KEYS,
    TUNING_GRID,
    nms_radius_limit,
    training_samples,
    tune_thresholds,
    validation_samples,
)


def compare(models: list[str], run: Path, limit: int | None = None) -> dict:
    samples = [s for s in validation_samples(run) if s.instances is not None and s.instances.max() > 0][:limit]
    rows = {}
    for name in models:
        t0 = time.perf_counter()
        model = karyo.load(name)
        cap = nms_radius_limit(training_samples(run), model.config.mpp)
        model.config, _ = tune_thresholds(model, samples, log=lambda _: None, max_nms_radius_px=cap)
        pq, aji, tp, fp, fn = [], [], 0, 0, 0
        with torch.no_grad():
            for s in samples:
                pred = model.segment(s.image, mpp=None).instances
                pq.append(panoptic_quality(s.instances, pred).pq)
                aji.append(aggregated_jaccard_index(s.instances, pred).value)
                pairing = pair_coordinates(instance_points(s.instances).xy, instance_points(pred).xy, 12.0)
                tp += len(pairing.paired)
                fn += len(pairing.unpaired_a)
                fp += len(pairing.unpaired_b)
        setting = {k: getattr(model.config, k) for k in TUNING_GRID if k not in RESOLVE_KEYS}
        setting.update({k: getattr(model.config, k) for k in RESOLVE_KEYS})
        rows[name] = {"pq": float(np.mean(pq)), "aji": float(np.nanmean(aji)), "f1d": 2 * tp / max(2 * tp + fp + fn, 1),
                      "setting": setting, "nms_cap": cap, "seconds": time.perf_counter() - t0}
    return {"n_images": len(samples), "rows": rows}


def markdown(run: Path, r: dict) -> str:
    lines = [f"Each model tuned (grid of `karyo pack`, NMS radius capped at the 10% quantile of nearest-neighbour "
             f"spacing in the run's training images) on the {r['n_images']} validation images of `{run}`. AJI skips "
             f"images with no predicted nucleus (NaN, as the reference and `karyo evaluate`). Only models none of "
             f"whose networks trained on these images compare fairly here.", "",
             "| model | PQ | AJI | F1d | best setting |", "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        setting = ", ".join(f"{k} {v}" for k, v in row["setting"].items())
        lines.append(f"| `{name}` | {row['pq']:.4f} | {row['aji']:.4f} | {row['f1d']:.4f} | {setting} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="registry names or model folders")
    ap.add_argument("--run", type=Path, required=True, help="prompter run whose validation images judge")
    ap.add_argument("--limit", type=int, default=None, help="first N validation images (smoke runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(args.models, args.run, args.limit)
    publish(markdown(args.run, result), f"promptnucseg_prompters_{args.run.name}",
            f"PromptNucSeg models on the validation images of {args.run.name}", "benchmarks.promptnucseg_prompters",
            write=not args.no_docs)


if __name__ == "__main__":
    main()
