"""Duplicates by overlap or by the learned judge? PromptNucSeg on validation images and in dense tissue.

    python -m benchmarks.promptnucseg_duplicates --model promptnucseg_cpu --run runs/default_prompter_continue

Before negatives are chosen, PromptNucSeg drops the worse of two masks that it takes for one nucleus found twice
(:meth:`karyo.models.promptnucseg.PromptNucSegModel.mask_candidates`): by their overlap alone
(``mask_nms_overlap``), or by the duplicate judge (:mod:`karyo.models.duplicates`, ``min_duplicate_probability``).
This report fits a judge on the run's training images *without* a dense sample (every ``--every``-th CoNSeP
training patch, as in ``benchmarks.promptnucseg_density``), then scores the model's other settings with each rule
on the run's validation images and on that dense sample (out of sample for the judge; the networks trained on it,
so read only differences). HoVer-Net metrics: PQ and AJI averaged over images, F1d pooled.

Test splits are not used.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

import karyo
from benchmarks._report import publish_model_report
from benchmarks.promptnucseg_density import floats, report_arguments
from benchmarks.promptnucseg_verifier import held_out_samples, pq_aji_f1d, score_cells
from karyo.train.verifier import fit_duplicate_judge


def run(model_name: str, run_dir: Path, every: int, overlaps: list[float], levels: list[float]) -> dict:
    model = karyo.load(model_name)
    base = model.config
    fit_on, val, dense = held_out_samples(run_dir, every)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        judge = fit_duplicate_judge(model, fit_on, log=lambda _: None)
        changes = [("overlap", v, {"mask_nms_overlap": v, "min_duplicate_probability": None}) for v in overlaps]
        changes += [("judge", v, {"mask_nms_overlap": None, "duplicate_judge": judge, "min_duplicate_probability": v})
                    for v in levels]
        for rule, value, change in changes:
            model.config = replace(base, **change)
            rows.append({"rule": rule, "value": value, "val": pq_aji_f1d(model, val),
                         "dense": pq_aji_f1d(model, dense)})
    model.config = base
    own = {k: getattr(base, k) for k in ("score_threshold", "nms_radius_px", "refine_points", "mask_threshold",
                                         "min_verified")}
    return {"rows": rows, "own": own, "n_val": len(val), "n_dense": len(dense), "n_fit": len(fit_on),
            "fit": judge.fit, "seconds": time.perf_counter() - t0}


def markdown(model_name: str, r: dict) -> str:
    fit = r["fit"]
    lines = [f"Model `{model_name}`, other settings {r['own']}. The judge fitted on {r['n_fit']} training images "
             f"(without the dense sample): {fit['pairs']} mask pairs, {fit['duplicate_fraction']:.0%} duplicates, "
             f"training ROC AUC {fit['train_auc_judge']:.3f} (overlap alone {fit['train_auc_overlap']:.3f}). "
             f"Scored on {r['n_val']} validation images and {r['n_dense']} dense CoNSeP training patches.", "",
             "| duplicates by | validation PQ | AJI | F1d | dense PQ | AJI | F1d |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        head = (f"overlap > {row['value']} of the smaller mask" if row["rule"] == "overlap"
                else f"judge, P ≥ {row['value']}")
        lines.append(f"| {head} | {score_cells(row)} |")
    return "\n".join(lines)


def main() -> None:
    ap = report_arguments(__doc__.splitlines()[0])
    ap.add_argument("--overlaps", type=floats, default="0.2,0.3", help="mask_nms_overlap values to score")
    ap.add_argument("--levels", type=floats, default="0.3,0.4,0.5,0.6",
                    help="min_duplicate_probability values to score")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.run, args.every, args.overlaps, args.levels)
    publish_model_report(markdown(args.model, result), args.model,
                         "PromptNucSeg duplicates: overlap or judge ({model})", "benchmarks.promptnucseg_duplicates",
                         write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
