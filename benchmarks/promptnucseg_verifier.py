"""Which masks should PromptNucSeg's verifier learn to call nuclei? Validation and dense tissue, per label.

    python -m benchmarks.promptnucseg_verifier --model promptnucseg_cpu --run runs/default_prompter_continue

The verifier (:mod:`karyo.models.verifier`) is fitted on a prompter run's training images; a mask is labelled a
nucleus when it overlaps an annotated one at IoU above a threshold (``--labels``). For each threshold this report
fits a verifier on the training images *without* a dense sample (every ``--every``-th CoNSeP training patch, as
in ``benchmarks.promptnucseg_density``), then scores the model's own point settings with each ``min_verified``
on the run's validation images and on that dense sample (out of sample for the verifier; the networks trained on
it, so read only differences). HoVer-Net metrics: PQ and AJI averaged over images, F1d pooled.

Test splits are not used.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

import karyo
from benchmarks._report import publish_model_report
from benchmarks.promptnucseg_density import dense_sample, floats, report_arguments
from karyo.metrics.evaluate import ImagePair, evaluate
from karyo.train.pack import training_samples, validation_samples
from karyo.train.verifier import fit_verifier


def pq_aji_f1d(model, samples: list) -> tuple[float, float, float]:
    """Mean PQ and AJI over ``samples`` and their pooled detection F1 (the cells of these reports)."""
    rep = evaluate([ImagePair(name=s.name, true_inst=s.instances, pred_inst=model.segment(s.image).instances)
                    for s in samples])
    return rep.instance["pq"], rep.instance["aji"], rep.detection.f1_d


def held_out_samples(run_dir: Path, every: int) -> tuple[list, list, list]:
    """(fit on, validation, dense sample) of a prompter run: its training images without the dense sample (what a
    learned filter is fitted on), and the validation images and dense sample that hold nuclei (what it is scored on)."""
    train = training_samples(run_dir)
    dense = dense_sample(train, every)
    held_out = {s.name for s in dense}
    has_nuclei = lambda s: s.instances is not None and s.instances.max() > 0  # noqa: E731
    return ([s for s in train if s.name not in held_out],
            [s for s in validation_samples(run_dir) if has_nuclei(s)], [s for s in dense if has_nuclei(s)])


def score_cells(row: dict) -> str:
    """A row's validation and dense (PQ, AJI, F1d) as table cells."""
    return " | ".join(f"{v:.4f}" for v in (*row["val"], *row["dense"]))


def run(model_name: str, run_dir: Path, every: int, labels: list[float], levels: list[float]) -> dict:
    model = karyo.load(model_name)
    base = model.config
    fit_on, val, dense = held_out_samples(run_dir, every)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        model.config = replace(base, min_verified=None)
        rows.append({"label": None, "min_verified": None, "val": pq_aji_f1d(model, val),
                     "dense": pq_aji_f1d(model, dense)})
        for label in labels:
            verifier = fit_verifier(model, fit_on, log=lambda _: None, match_iou=label)
            for level in levels:
                model.config = replace(base, verifier=verifier, min_verified=level)
                rows.append({"label": label, "min_verified": level, "val": pq_aji_f1d(model, val),
                             "dense": pq_aji_f1d(model, dense)})
    model.config = base
    own = {k: getattr(base, k) for k in ("score_threshold", "nms_radius_px", "mask_nms_overlap",
                                         "min_duplicate_probability", "refine_points", "mask_threshold")}
    return {"rows": rows, "own": own, "n_val": len(val), "n_dense": len(dense), "n_fit": len(fit_on),
            "seconds": time.perf_counter() - t0}


def markdown(model_name: str, r: dict) -> str:
    lines = [f"Model `{model_name}`, point settings {r['own']}. Each verifier fitted on {r['n_fit']} training images "
             f"(without the dense sample); scored on {r['n_val']} validation images and {r['n_dense']} dense CoNSeP "
             "training patches (out of sample for the verifier, trained on by the networks: read differences).", "",
             "| label: mask IoU with a nucleus > | `min_verified` | validation PQ | AJI | F1d | dense PQ | AJI | F1d |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        head = "(no verifier) | " if row["label"] is None else f"{row['label']} | {row['min_verified']}"
        lines.append(f"| {head} | {score_cells(row)} |")
    return "\n".join(lines)


def main() -> None:
    ap = report_arguments(__doc__.splitlines()[0])
    ap.add_argument("--labels", type=floats, default="0.5,0.3,0.1", help="IoU thresholds that label a mask a nucleus")
    ap.add_argument("--min-verified", type=floats, default="0.3,0.4,0.5", help="verifier probability floors to score")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.run, args.every, args.labels, args.min_verified)
    publish_model_report(markdown(args.model, result), args.model,
                         "PromptNucSeg mask verifier: which masks to call nuclei ({model})",
                         "benchmarks.promptnucseg_verifier", write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
