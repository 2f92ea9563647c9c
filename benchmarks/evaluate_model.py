"""Evaluate a karyo model on the shared test sets and write its section of docs/benchmarks.md.

    python -m benchmarks.evaluate_model --model classical
    python -m benchmarks.evaluate_model --model default --name default

Datasets: CoNSeP test patches (224 × 256², 4 classes) and MoNuSeg test (14 × 1000², zero-shot). Only test
splits are evaluated here; models are never selected on these numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import invocation, update_section
from karyo.data.layout import LayoutDataset
from karyo.metrics.evaluate import ImagePair, evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"CoNSeP test": ("consep", "test"), "MoNuSeg test": ("monuseg_test", None)}


def run(model_name: str, root: Path, limit: int | None = None) -> dict:
    model = karyo.load(model_name)
    results = {}
    for title, (folder, split) in DATASETS.items():
        ds = LayoutDataset(root / folder, split=split)
        n = len(ds) if limit is None else min(limit, len(ds))
        pairs, seconds, pixels = [], 0.0, 0
        for i in range(n):
            sample = ds[i]
            t0 = time.perf_counter()
            res = model.segment(sample.image, mpp=sample.mpp, name=sample.name)
            seconds += time.perf_counter() - t0
            pixels += sample.image.shape[0] * sample.image.shape[1]
            has_cls = sample.classes is not None and bool(res.classes)
            pairs.append(ImagePair(name=sample.name, true_inst=sample.instances, pred_inst=res.instances,
                                   true_type=sample.type_map() if has_cls else None,
                                   pred_type=res.to_sample().type_map() if has_cls else None,
                                   tissue=sample.tissue))
        report = evaluate(pairs, class_names=ds.class_names if all(p.true_type is not None for p in pairs) else None)
        results[title] = {"report": report, "seconds": seconds, "images": n,
                          "tiles256_per_s": (pixels / 65536) / seconds}
    return results


def markdown(results: dict) -> str:
    lines = ["| dataset | images | PQ | DQ | SQ | AJI | AJI+ | Dice | F1d | F1@0.5 | 256² tiles/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    extra = []
    for title, r in results.items():
        rep = r["report"]
        i = rep.instance
        lines.append(f"| {title} | {r['images']} | {i['pq']:.4f} | {i['dq']:.4f} | {i['sq']:.4f} | {i['aji']:.4f} | "
                     f"{i['aji_plus']:.4f} | {i['dice']:.4f} | {rep.detection.f1_d:.4f} | "
                     f"{rep.matching.at(0.5)['f1']:.4f} | {r['tiles256_per_s']:.1f} |")
        if rep.classified:
            f1c = ", ".join(f"{rep.class_names.get(c, c)} {v:.4f}" for c, v in rep.detection.f1_type.items())
            extra.append(f"- {title}: F1c per class: {f1c}; type accuracy {rep.detection.acc_type:.4f}; "
                         f"PanNuke-style mPQ {rep.pannuke.mpq:.4f}; CoNIC mPQ+ {rep.conic.mpq_plus:.4f}")
    return "\n".join([*lines, "", *extra])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="classical")
    parser.add_argument("--name", default=None, help="section name in docs/benchmarks.md (default: the model)")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--limit", type=int, default=None, help="first N images per dataset (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the full reports here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    results = run(args.model, args.data, args.limit)
    body = markdown(results)
    print(body)
    name = args.name or args.model
    cmd = invocation("benchmarks.evaluate_model")
    if args.limit is None:
        update_section(f"model_{name}", f"Model `{name}` on the test sets", body +
                       "\n\nPQ/DQ/SQ/AJI/AJI+/Dice: HoVer-Net definitions, mean over images. F1d: HoVer-Net "
                       "centroid pairing within 12 px, pooled. F1@0.5: instance IoU > 0.5, pooled. Throughput: "
                       f"`model.segment` only (no file I/O), {args.threads} threads.", cmd)
    if args.json:
        args.json.write_text(json.dumps({t: r["report"].to_dict() for t, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
