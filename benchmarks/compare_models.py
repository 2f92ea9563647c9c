"""Side by side: the test-set reports that ``benchmarks.evaluate_model --json`` wrote for several models.

    python -m benchmarks.compare_models promptnucseg_cpu=runs/eval_promptnucseg_cpu.json \\
        cellvit_cpu=runs/eval_cellvit_cpu.json --throughput promptnucseg_cpu=5.90 cellvit_cpu=12.44

Nothing is re-measured: metrics come from the JSON reports (each model's own section above gives its command);
``--throughput`` takes the 1-thread tiles/s of each model's throughput section, so all columns stay traceable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._report import publish


def table(reports: dict[str, dict], throughput: dict[str, str]) -> str:
    first = next(iter(reports.values()))
    classes = list(first["CoNSeP test"]["detection"]["f1_type"])
    head = (["model", "CoNSeP PQ", "AJI", "F1d", *[f"F1c {c}" for c in classes], "mPQ", "MoNuSeg PQ", "MoNuSeg AJI"]
            + (["tiles/s (1 thread)"] if throughput else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        c, m = rep["CoNSeP test"], rep["MoNuSeg test"]
        cells = [f"`{name}`", f"{c['instance']['pq']:.4f}", f"{c['instance']['aji']:.4f}",
                 f"{c['detection']['f1_d']:.4f}", *[f"{c['detection']['f1_type'].get(k, float('nan')):.4f}"
                                                     for k in classes],
                 f"{c['pannuke']['mpq']:.4f}" if c.get("pannuke") else "n/a",
                 f"{m['instance']['pq']:.4f}", f"{m['instance']['aji']:.4f}"]
        if throughput:
            cells.append(throughput.get(name, "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="NAME=PATH of an evaluate_model --json report")
    parser.add_argument("--throughput", nargs="*", default=[], help="NAME=TILES_PER_S from the throughput sections")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    reports = {k: json.loads(Path(v).read_text()) for k, v in (r.split("=", 1) for r in args.reports)}
    throughput = dict(t.split("=", 1) for t in args.throughput)
    body = (table(reports, throughput) + "\n\nCoNSeP test: 224 patches; MoNuSeg test: 14 images, zero-shot. "
            "Metric definitions as in the models' own sections.")
    publish(body, "compare_models", "Trained models side by side (CoNSeP test, MoNuSeg test)",
            "benchmarks.compare_models", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
