"""MONCH, its ablations and the U-Net baseline on CoNSeP test (issue 6; MONCH Tables 1–4), into docs/benchmarks.md.

    python -m benchmarks.monch --smoke            # pipeline check: 2 steps per run; measures step/epoch time
    python -m benchmarks.monch --jobs 2           # train (resumable, finished runs skipped) + evaluate all 7
    python -m benchmarks.monch --only monch,unet  # a subset

Runs: ``configs/monch_cpu.yaml`` as is (MONCH), with one switch changed (w/o MGFE, w/o PPD, w/o HF, w/o Conv,
w/o Topo; MONCH Tables 3–4), and ``configs/unet_cpu.yaml`` (U-Net, same parameter budget). Same data, seed,
optimiser, schedule and epochs for all. Each run lives in ``RUNS/<name>`` (``runs/bench_monch`` by default): an
interrupted benchmark resumes from ``last.pt``; a run with ``summary.json`` is not retrained.

Evaluation on the test split only (never used for selection: the best epoch is chosen on the validation split):
PA, per-class IoU / precision / recall / F1, mean IoU, FWIoU (``karyo.metrics.semantic``; one confusion matrix over
all test pixels), per tissue where the test data has tissues (PanNuke), PQ / AJI / F1d of the instances seeded
from the semantic map, and the forward time per 256² tile on this CPU. PanNuke protocol: ``--data
PANNUKE:fold1,fold2 --test PANNUKE:fold3 --runs runs/bench_monch_pannuke_3`` (and the other two rotations).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks._report import update_section

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "monch": ("monch", {}, "MONCH"),
    "no_mgfe": ("monch", {"mgfe": False}, "w/o MGFE"),
    "no_ppd": ("monch", {"ppd": False}, "w/o PPD"),
    "no_hf": ("monch", {"hf": False}, "w/o HF (conv block)"),
    "no_conv": ("monch", {"conv": False}, "w/o Conv"),
    "no_topo": ("monch", {"topo": False}, "w/o Topo (conv block)"),
    "unet": ("unet", {}, "U-Net"),
}
IGNORE = 255
CPU_HOURS_TARGET = 4.0  # the whole set should fit in a few CPU hours


# ----------------------------------------------------------------------------------------------------- training


def run_config(key: str, runs: Path, epochs: int | None, smoke: bool, data: list[str] | None) -> Path:
    """Write the run config of variant ``key`` (base config + its ablation switch) and return its path."""
    task, changes, _ = VARIANTS[key]
    cfg = yaml.safe_load((REPO / "configs" / f"{task}_cpu.yaml").read_text())
    cfg["data"] = [_abs_spec(s) for s in (data or cfg["data"])]
    cfg["model"] = {**(cfg.get("model") or {}), **changes}
    if epochs:
        cfg["train"]["epochs"] = epochs
        cfg["train"]["step_epochs"] = max(1, round(0.75 * epochs))
    if smoke:
        cfg["train"].update(epochs=1, max_steps_per_epoch=2)
    path = runs / "configs" / f"{key}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _abs_spec(spec: str) -> str:
    """Data specs in the configs are relative to the repository root; make them work from any directory."""
    return str(REPO / spec) if spec.startswith("../") else spec


def train_variant(key: str, runs: str, epochs: int | None, smoke: bool, data: list[str] | None,
                  progress: bool) -> str:
    from karyo.train.api import train

    runs_p = Path(runs)
    out = runs_p / key
    if (out / "summary.json").is_file():
        return f"{key}: finished earlier, skipped"
    t0 = time.perf_counter()
    task = VARIANTS[key][0]
    if (out / "last.pt").is_file():
        train(task, None, out, resume=True, progress=progress,
              train_overrides={"epochs": epochs} if epochs else None)
    else:
        train(task, None, out, config=run_config(key, runs_p, epochs, smoke, data), progress=progress)
    return f"{key}: trained in {time.perf_counter() - t0:.0f} s"


# --------------------------------------------------------------------------------------------------- evaluation


def _test_samples(spec: str, limit: int | None):
    from karyo.data.datasets import open_dataset
    from karyo.train.data import DataSpec

    s = DataSpec.parse(_abs_spec(spec))
    ds = open_dataset(s.path, split=s.split)
    n = len(ds) if limit is None else min(limit, len(ds))
    return ds, [ds[i] for i in range(n)]


def evaluate_variant(run_dir: Path, samples, class_names: dict[int, str]) -> dict:
    """Semantic metrics (overall and per tissue) and seeded-instance metrics of one trained run.

    The confusion matrices and instance scores are cached in ``RUN/eval_test.json``, keyed by the test images
    and the model's weights file, so the report can be rebuilt (or runs evaluated while others still train)
    without predicting again."""
    from karyo.metrics.semantic import SemanticMetrics
    from karyo.models import load
    from karyo.train.monch import semantic_scores

    model = load(run_dir / "model")
    n_cls = model.config.num_classes
    weights = sorted((run_dir / "model").glob("*.pt"))
    key = {"images": [s.name for s in samples], "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns)
                                                            for w in weights]}
    cache = run_dir / "eval_test.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("key") != json.loads(json.dumps(key)):
        saved = {"key": key, **_predict_and_score(model, samples, class_names)}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved) + "\n")
        tmp.replace(cache)

    def metrics(confusion) -> SemanticMetrics:
        m = SemanticMetrics(num_classes=n_cls, ignore_index=IGNORE)
        m.confusion = np.asarray(confusion, dtype=np.int64)
        return m

    res = metrics(saved["confusion"]).compute()
    summary = json.loads((run_dir / "summary.json").read_text())
    hist = _history(run_dir)
    return {
        "scores": semantic_scores(res), "result": res,
        "tissues": {t: semantic_scores(metrics(c).compute()) for t, c in sorted(saved["tissues"].items())},
        "pq": saved["pq"], "aji": saved["aji"], "f1d": saved["f1d"], "mpq": saved["mpq"],
        "params": sum(p.numel() for p in model.net.parameters()),
        "best_epoch": summary["best_epoch"] + 1, "val_score": summary["best_score"],
        "epochs": len(hist), "epoch_seconds": statistics.mean(r["seconds"] for r in hist) if hist else math.nan,
        "model": model,
    }


def _predict_and_score(model, samples, class_names: dict[int, str]) -> dict:
    """Confusion matrices (all test pixels, and per tissue) and seeded-instance PQ / AJI / F1d / mPQ."""
    from karyo.data.sample import type_map
    from karyo.metrics.evaluate import ImagePair, evaluate
    from karyo.metrics.semantic import SemanticMetrics
    from karyo.models.monch import seed_instances

    n_cls = model.config.num_classes
    overall = SemanticMetrics(num_classes=n_cls, ignore_index=IGNORE)
    tissues: dict[str, SemanticMetrics] = {}
    pairs = []
    cfg = model.config
    for s in samples:
        sem = model.segment_semantic(s.image, name=s.name)
        tm = s.type_map()
        truth = np.where((s.instances > 0) & (tm == 0), IGNORE, tm)
        overall.update(truth, sem.class_map)
        if s.tissue:
            tissues.setdefault(s.tissue, SemanticMetrics(num_classes=n_cls, ignore_index=IGNORE)).update(
                truth, sem.class_map)
        inst, classes, _ = seed_instances(sem.class_map, sem.probabilities, min_area=cfg.min_area,
                                          min_distance=cfg.marker_min_distance, distance_smooth=cfg.distance_smooth)
        pairs.append(ImagePair(name=s.name, true_inst=s.instances, pred_inst=inst, true_type=tm,
                               pred_type=type_map(inst, classes), tissue=s.tissue))
    rep = evaluate(pairs, class_names=class_names)
    return {"confusion": overall.confusion.tolist(), "tissues": {t: m.confusion.tolist() for t, m in tissues.items()},
            "pq": float(rep.instance["pq"]), "aji": float(rep.instance["aji"]), "f1d": float(rep.detection.f1_d),
            "mpq": float(rep.pannuke.mpq) if rep.pannuke is not None else math.nan}


def _history(run_dir: Path) -> list[dict]:
    import csv

    path = run_dir / "history.csv"
    if not path.is_file():
        return []
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in rows]


# ------------------------------------------------------------------------------------------------------- timing


def time_forward(net: torch.nn.Module, threads: int, reps: int = 10, size: int = 256) -> dict[str, float]:
    """Median wall and process-CPU milliseconds of one forward pass on a size² tile (no grad)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    net.eval()
    x = torch.randn(1, 3, size, size)
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(reps + 2):
            w0, c0 = time.perf_counter(), time.process_time()
            net(x)
            if i >= 2:
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
    torch.set_num_threads(old)
    return {"wall_ms": 1000 * statistics.median(wall), "cpu_ms": 1000 * statistics.median(cpu)}


def time_train_step(task: str, batch: int, threads: int = 1, reps: int = 3) -> dict[str, float]:
    """Wall and CPU seconds of one optimisation step (batch × 256² crops) of the default-config network."""
    from karyo.models.monch import MONCH, MONCHConfig, per_class_bce
    from karyo.models.unet import UNet, UNetConfig

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if task == "monch":
        net: torch.nn.Module = MONCH(MONCHConfig.preset("cpu"))
        net.set_text_embeddings(torch.randn(5, 4, 384))
    else:
        net = UNet(UNetConfig(**yaml.safe_load((REPO / "configs" / "unet_cpu.yaml").read_text())["model"]))
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x, t = torch.randn(batch, 3, 256, 256), torch.randint(0, 5, (batch, 256, 256))
    wall, cpu = [], []
    net.train()
    for i in range(reps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = per_class_bce(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    torch.set_num_threads(old)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}


# ------------------------------------------------------------------------------------------------------ report


def _f(v: float, nd: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def markdown(results: dict[str, dict], class_names: dict[int, str], timing: dict, test_title: str) -> str:
    classes = sorted(class_names)
    lines = [f"### Test: {test_title}", "",
             "| model | params | epochs (best) | val F1 | PA | mIoU | FWIoU | mean F1 | mean precision | mean recall "
             "| PQ (seeded) | AJI | F1d | ms / 256² tile, 1 thread: wall / CPU |", "|" + "---|" * 14]
    for key, r in results.items():
        s = r["scores"]
        t = timing.get(key, {}).get("t1", {})
        lines.append(f"| {VARIANTS[key][2]} | {r['params']:,} | {r['epochs']} ({r['best_epoch']}) | "
                     f"{_f(r['val_score'])} | {_f(s['pa'])} | {_f(s['miou'])} | {_f(s['fwiou'])} | {_f(s['f1_mean'])} "
                     f"| {_f(s['precision_mean'])} | {_f(s['recall_mean'])} | {_f(r['pq'])} | {_f(r['aji'])} | "
                     f"{_f(r['f1d'])} | {_f(t.get('wall_ms', math.nan), 0)} / {_f(t.get('cpu_ms', math.nan), 0)} |")
    lines += ["", "Per class (MONCH Table 1 layout): IoU / precision / F1.", "",
              "| model | " + " | ".join(class_names[c] for c in classes) + " |", "|" + "---|" * (len(classes) + 1)]
    for key, r in results.items():
        res = r["result"]
        cells = [f"{_f(res.iou[c], 3)} / {_f(res.precision[c], 3)} / {_f(res.f1[c], 3)}" for c in classes]
        lines.append(f"| {VARIANTS[key][2]} | " + " | ".join(cells) + " |")
    tissue_rows = [(key, t, v) for key, r in results.items() for t, v in r["tissues"].items()]
    if tissue_rows:
        lines += ["", "Per tissue (MONCH Table 2 layout): mean IoU / FWIoU / mean F1.", "",
                  "| model | tissue | mIoU | FWIoU | mean F1 |", "|---|---|---|---|---|"]
        lines += [f"| {VARIANTS[k][2]} | {t} | {_f(v['miou'])} | {_f(v['fwiou'])} | {_f(v['f1_mean'])} |"
                  for k, t, v in tissue_rows]
    else:
        lines += ["", "Per tissue: the test data has no tissue labels (CoNSeP is all colorectal)."]
    if "monch" in results and "unet" in results:
        m, u = results["monch"]["scores"]["f1_mean"], results["unet"]["scores"]["f1_mean"]
        verdict = "beats" if m > u else "falls short of"
        lines += ["", f"**MONCH {verdict} the U-Net on mean F1 over classes by {abs(m - u):.4f} "
                      f"({m:.4f} vs {u:.4f}).**"]
    return "\n".join(lines)


def speed_table(results: dict[str, dict], timing: dict) -> str:
    """Parameters and forward time per 256² tile of every variant (meaningful even after a smoke run)."""
    lines = ["| model | params | forward per 256² tile, 1 thread: wall / CPU ms | 2 threads: wall ms |",
             "|---|---|---|---|"]
    for k, r in results.items():
        t1, t2 = timing[k]["t1"], timing[k]["t2"]
        lines.append(f"| {VARIANTS[k][2]} | {r['params']:,} | {t1['wall_ms']:.0f} / {t1['cpu_ms']:.0f} | "
                     f"{t2['wall_ms']:.0f} |")
    return "\n".join(lines)


def budget_text(step: dict[str, dict], n_train: int, n_val: int, batch: int, fwd_cpu_ms: dict[str, float],
                n_runs: int, jobs: int) -> tuple[str, int]:
    """Epoch time from the measured step time and the proposed epoch budget for ``CPU_HOURS_TARGET``."""
    steps = max(1, n_train // batch)
    lines = ["| network | train step (batch 8, 1 thread): wall / CPU s | epoch estimate (CPU s) |", "|---|---|---|"]
    epoch_cpu = {}
    for task, t in step.items():
        e = steps * t["cpu_s"] + n_val * fwd_cpu_ms[task] / 1000.0
        epoch_cpu[task] = e
        lines.append(f"| {task} | {t['wall_s']:.2f} / {t['cpu_s']:.2f} | {e:.0f} |")
    per_epoch_all = sum(epoch_cpu["monch" if k != "unet" else "unet"] for k in list(VARIANTS)[:n_runs])
    epochs = max(1, min(40, int(CPU_HOURS_TARGET * 3600 // per_epoch_all)))
    total_h = epochs * per_epoch_all / 3600
    lines += ["", f"{n_train} training and {n_val} validation tiles → {steps} steps per epoch. All {n_runs} runs: "
                  f"{per_epoch_all:.0f} CPU s per epoch together. **Proposed budget: {epochs} epochs** "
                  f"(paper: 40) → about {total_h:.1f} CPU hours, {total_h / max(1, jobs):.1f} h wall with "
                  f"`--jobs {jobs}` on an otherwise idle machine (CPU seconds are measured with "
                  "`time.process_time`, so they hold on a busy machine too; wall times do not)."]
    return "\n".join(lines), epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 training steps per run; no results, just a check")
    parser.add_argument("--runs", type=Path, default=None, help="run folder (default runs/bench_monch[_smoke])")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epochs (step decay at 3/4)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (each uses 1 thread)")
    parser.add_argument("--data", action="append", default=None, help="training data spec(s) replacing the configs'")
    parser.add_argument("--test", default="../shared/data/consep:test", help="test data spec")
    parser.add_argument("--limit", type=int, default=None, help="first N test images")
    parser.add_argument("--threads", type=int, default=2, help="threads for evaluation and the forward timing")
    parser.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args()
    np.seterr(all="ignore")
    load = os.getloadavg()[0]
    keys = [k.strip() for k in args.only.split(",")] if args.only else list(VARIANTS)
    unknown = sorted(set(keys) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    runs = args.runs or REPO / "runs" / ("bench_monch_smoke" if args.smoke else "bench_monch")
    limit = args.limit if args.limit is not None else (8 if args.smoke else None)

    # 1. train (resumable; finished runs skipped)
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(train_variant, k, str(runs), args.epochs, args.smoke, args.data, False) for k in keys]
            for f in cf.as_completed(futs):
                print(f.result(), flush=True)
    else:
        for k in keys:
            print(train_variant(k, str(runs), args.epochs, args.smoke, args.data, True), flush=True)

    # 2. evaluate on the test split
    torch.set_num_threads(args.threads)
    ds, samples = _test_samples(args.test, limit)
    class_names = dict(ds.class_names or {})
    results = {k: evaluate_variant(runs / k, samples, class_names) for k in keys}
    timing = {k: {"t1": time_forward(r["model"].net, 1), "t2": time_forward(r["model"].net, 2)}
              for k, r in results.items()}

    # 3. training speed and the epoch budget
    saved = json.loads((runs / keys[0] / "train_config.json").read_text())
    batch = int(saved["train"]["batch_size"])
    step = {t: time_train_step(t, batch) for t in ("monch", "unet")}
    fwd_cpu = {t: time_forward(_any(results, t), 1)["cpu_ms"] for t in ("monch", "unet")}
    budget, epochs = budget_text(step, saved["n_train"], saved["n_val"], batch, fwd_cpu, len(VARIANTS), 2)

    test_title = f"{args.test} ({len(samples)} tiles)"
    body = markdown(results, class_names, timing, test_title)
    two = ", ".join(f"{VARIANTS[k][2]} {v['t2']['wall_ms']:.0f}" for k, v in timing.items())
    notes = ("Forward time: median of 10 calls of `net(x)` on one 256² tile, wall / process CPU ms, on this CPU "
             f"(the paper: 214 ms for MONCH on an RTX 3090). With 2 threads, wall ms: {two}. 1-minute load average "
             f"when the benchmark started: {load:.2f} on {os.cpu_count()} cores (other processes inflate wall times; "
             "CPU times hold). Per-class F1/IoU pool all test pixels; PQ/AJI/F1d are of the instances seeded from "
             "the class map (connected components + distance-transform watershed, majority class).")
    print(body, "\n\n", budget, sep="")
    if args.smoke:
        doc = ("**Smoke run only** (1 epoch × 2 steps per run, 8 test tiles): the pipeline is checked, the metrics "
               "are not results yet and are not shown.\n\n" + speed_table(results, timing) + "\n\n" + notes +
               "\n\nTraining speed and the proposed budget:\n\n" + budget +
               f"\n\nFull run: `python -m benchmarks.monch --jobs 2 --epochs {epochs}`.")
    else:
        doc = body + "\n\n" + notes + "\n\nTraining speed:\n\n" + budget
    if not args.no_docs:
        cmd = "python -m benchmarks.monch" + (" --smoke" if args.smoke else f" --jobs {args.jobs}") + (
            f" --epochs {args.epochs}" if args.epochs else "")
        update_section("monch", "MONCH semantic segmentation: ablations and U-Net baseline (issue 6)", doc, cmd)


def _any(results: dict, task: str) -> torch.nn.Module:
    """A network of ``task`` for timing: an evaluated run's, else the default config's."""
    for k, r in results.items():
        if VARIANTS[k][0] == task:
            return r["model"].net
    from karyo.models.monch import MONCH, MONCHConfig
    from karyo.models.unet import UNet, UNetConfig

    return MONCH(MONCHConfig.preset("cpu")) if task == "monch" else UNet(UNetConfig())


if __name__ == "__main__":
    main()
