"""Does a PromptNucSeg inference setting chosen on validation images hold in dense tissue?

    python -m benchmarks.promptnucseg_density --model promptnucseg_cpu --run runs/default_prompter_continue

Threshold tuning (``karyo pack``) can only use a prompter run's validation images. When those are sparser than
the tissue a model meets, a point NMS radius that deletes touching neighbours costs little there and wins. This
report puts numbers on that:

* nucleus spacing: quantiles of the distance from each annotated nucleus to its nearest neighbour (model pixels),
  on the run's validation images and on its training images;
* mean PQ of a few inference settings on the validation images and on a dense sample of the *training* images
  (every ``--every``-th CoNSeP training patch). The networks trained on those, so their absolute PQ is
  optimistic; only the differences between settings are read, and no setting is chosen on them.

Test splits are not used.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import publish_model_report
from karyo.train.pack import mean_pq, nearest_neighbour_distances, training_samples, validation_samples

# Each row: a name and the inference settings it changes from the model's own config.
SETTINGS = {
    "NMS 20 px, no mask NMS (the 2026-12-06 morning settings)": {"nms_radius_px": 20.0, "mask_nms_overlap": None},
    "NMS 8 px, no mask NMS": {"nms_radius_px": 8.0, "mask_nms_overlap": None},
    "NMS 16 px, mask NMS 0.2 (validation's pick without the radius cap, 2026-12-06)": {"nms_radius_px": 16.0,
                                                                                          "mask_nms_overlap": 0.2},
    "score 0.5, NMS 8 px, mask NMS 0.3 (the 2026-12-06 evening settings)": {"score_threshold": 0.5,
                                                                            "nms_radius_px": 8.0,
                                                                            "mask_nms_overlap": 0.3},
    "score 0.4, NMS 6 px, mask NMS 0.2 (the detail model's best validation row, 2026-12-07)": {
        "score_threshold": 0.4, "nms_radius_px": 6.0, "mask_nms_overlap": 0.2},
    "score 0.5, NMS 8 px, mask NMS 0.2 (the detail model's pick, 2026-12-07 night)": {
        "score_threshold": 0.5, "nms_radius_px": 8.0, "mask_nms_overlap": 0.2},
}
# Rows above describe settings from before the mask verifier: they run without it. The verifier and the duplicate
# judge were fitted on the training images, so on the dense training sample their rows are in-sample.
SETTINGS = {name: {"min_verified": None, **change} for name, change in SETTINGS.items()}
SETTINGS["score 0.4, NMS 8 px, mask NMS 0.2, verifier 0.5 (the fifth segmentor schedule's pick, 2026-12-07)"] = {
    "score_threshold": 0.4, "nms_radius_px": 8.0, "mask_nms_overlap": 0.2, "refine_points": 1, "mask_threshold": 0.5,
    "min_verified": 0.5}
# Rows above judge duplicates by overlap alone (before the duplicate judge).
SETTINGS = {name: {"min_duplicate_probability": None, **change} for name, change in SETTINGS.items()}
SETTINGS["the model's own settings"] = {}


def dense_sample(train: list, every: int) -> list:
    """Every ``every``-th CoNSeP patch of a run's training images: the dense tissue these reports check."""
    return [s for s in train if s.name.startswith("train_")][::every]


def floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers ("0.3,0.4")."""
    return [float(v) for v in text.split(",")]


def report_arguments(description: str, dense: bool = True) -> argparse.ArgumentParser:
    """The options of the reports that read a prompter run's validation images (and, with ``dense``, its dense
    training sample)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="promptnucseg_cpu")
    ap.add_argument("--run", type=Path, default=Path("runs/default_prompter_continue"),
                    help="the prompter run whose validation/training images to use (its train_config.json)")
    if dense:
        ap.add_argument("--every", type=int, default=6, help="the dense sample: every n-th CoNSeP training patch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-docs", action="store_true")
    return ap


def run(model_name: str, run_dir: Path, every: int) -> dict:
    model = karyo.load(model_name)
    base = model.config
    val = validation_samples(run_dir)
    train = training_samples(run_dir)
    dense = dense_sample(train, every)
    t0 = time.perf_counter()
    quantiles = (0.05, 0.1, 0.25, 0.5)
    result = {"spacing": {name: (len(d), np.quantile(d, quantiles).tolist())
                          for name, d in (("validation", nearest_neighbour_distances(val, base.mpp)),
                                          ("training", nearest_neighbour_distances(train, base.mpp)),
                                          ("dense training sample", nearest_neighbour_distances(dense, base.mpp)))},
              "quantiles": quantiles, "rows": {}, "n_val": len(val), "n_dense": len(dense),
              "own": {k: getattr(base, k) for k in ("score_threshold", "nms_radius_px", "mask_nms_overlap",
                                                    "min_duplicate_probability", "refine_points", "mask_threshold",
                                                    "min_verified")}}
    with torch.no_grad():
        for name, change in SETTINGS.items():
            model.config = replace(base, **change)
            result["rows"][name] = (mean_pq(model, val), mean_pq(model, dense))
    model.config = base
    result["seconds"] = time.perf_counter() - t0
    return result


def markdown(model_name: str, r: dict) -> str:
    q = " | ".join(f"{int(v * 100)}%" for v in r["quantiles"])
    lines = [f"Model `{model_name}`; its own settings: {r['own']}.", "",
             "Distance from each annotated nucleus to its nearest neighbour (model pixels):", "",
             f"| images | nuclei | {q} |", "|---|---|" + "---|" * len(r["quantiles"])]
    for name, (n, values) in r["spacing"].items():
        lines.append(f"| {name} | {n} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += ["", f"Mean PQ ({r['n_val']} validation images; {r['n_dense']} CoNSeP training patches, trained on: "
                  "read the differences only):", "", "| settings | validation PQ | dense training sample PQ |",
              "|---|---|---|"]
    for name, (pv, pd) in r["rows"].items():
        lines.append(f"| {name} | {pv:.4f} | {pd:.4f} |")
    return "\n".join(lines)


def main() -> None:
    args = report_arguments(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.run, args.every)
    publish_model_report(markdown(args.model, result), args.model,
                         "PromptNucSeg inference settings in dense tissue: {model}", "benchmarks.promptnucseg_density",
                         write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
