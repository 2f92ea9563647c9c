"""IVAAN ablation on CoNSeP (train → test): prompter alone vs + alignment vs + attribute prediction, 3 seeds.

    python -m benchmarks.ivaan_ablation                              # 3 variants × 3 seeds, resumable
    python -m benchmarks.ivaan_ablation --seeds 1 2                  # e.g. in a second process (runs are locked)
    python -m benchmarks.ivaan_ablation --variants align_attr_b2 textcls align_attr_b2_w1   # follow-ups
    python -m benchmarks.ivaan_ablation --variants align_attr_pc align_tau001   # level fitting, temperature
    python -m benchmarks.ivaan_ablation --smoke --runs /tmp/ivaan_smoke    # 1 seed, 1 epoch, 3 steps, 8 test images

Every variant trains with ``karyo train ivaan --config configs/ivaan_ablation_<variant>.yaml --seed S`` into
``RUNS/<variant>_s<S>`` (same data, backbone, budget and seed; only the IVAAN switches differ). A finished run is
skipped, an interrupted one resumes, and a run being trained by another process (lock file with a live pid) is
left alone, so two processes with different ``--seeds`` can share the 2 cores.

Evaluation on the 224 CoNSeP test patches (never used for training or selection): with the default segmentor
(``runs/default_segmentor/model``, or ``--segmentor``) every run becomes an IVAAN model (same segmentor and
inference settings for all variants) and is scored with ``karyo.metrics.evaluate``: HoVer-Net F1d and F1c per
class (centroid pairing within 12 px), PanNuke-style mPQ, image-mean PQ and AJI. Without a segmentor only the
point metrics (F1d, F1c) are computed from the prompter's points and mPQ/PQ/AJI are reported as n/a. Each run's
scores are cached in ``RUN/eval_consep_test.json``. The table gives mean ± sample std (ddof = 1) over seeds, the
min–max range, and each variant's difference from the prompter alone paired by seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import benchmarks._report as report
from karyo.data.layout import LayoutDataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
VARIANTS = {"prompter": "prompter alone", "align": "+ alignment (classes through text)",
            "align_attr": "+ alignment + attribute prediction (IVAAN)",
            "textcls": "classes through text, no alignment (follow-up)",
            "align_attr_b2": "IVAAN with CoNSeP's B.2 attributes (follow-up)",
            "align_attr_b2_w1": "align_attr_b2 with alignment and attribute loss weights 1.0 (follow-up)",
            "align_attr_pc": "IVAAN with attribute levels fitted per class (follow-up)",
            "align_tau001": "+ alignment, temperature started at 0.01 instead of 0.07 (follow-up)"}
DEFAULT_VARIANTS = ("prompter", "align", "align_attr")
DEFAULT_SEEDS = (0, 1, 2)
CLASS_NAMES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
METRICS = [("f1_d", "F1d"), *[(f"f1_c{c}", f"F1c {n}") for c, n in CLASS_NAMES.items()], ("f1_c_mean", "F1c mean"),
           ("mpq", "mPQ"), ("pq", "PQ"), ("aji", "AJI")]


# ------------------------------------------------------------------------------------------------ training


def _lock(path: Path) -> bool:
    """Create ``path`` holding our pid; False when another live process holds it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text().strip() or 0)
            os.kill(pid, 0)
            if _is_ablation(pid):
                return False  # alive
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        path.unlink(missing_ok=True)  # stale lock of a killed run (its pid dead or reused by another program)
        return _lock(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def _is_ablation(pid: int) -> bool:
    """Whether process ``pid`` runs this benchmark (where /proc tells; elsewhere any live pid counts)."""
    try:
        return b"ivaan_ablation" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()


def finished(run: Path) -> bool:
    return (run / "summary.json").is_file() and (run / "model" / "ivaan.pt").is_file()


def config_path(configs: Path, variant: str) -> Path:
    return configs / f"ivaan_ablation_{variant}.yaml"


def train_run(variant: str, seed: int, runs: Path, overrides: dict, configs: Path) -> Path | None:
    """Train (or resume) one run; None when another process is training it."""
    from karyo.train.api import train

    run = runs / f"{variant}_s{seed}"
    if finished(run):
        return run
    runs.mkdir(parents=True, exist_ok=True)
    lock = runs / f"{variant}_s{seed}.lock"
    if not _lock(lock):
        print(f"{run.name}: being trained by another process, skipped")
        return None
    try:
        resume = (run / "last.pt").is_file()
        print(f"{run.name}: {'resuming' if resume else 'training'}", flush=True)
        train("ivaan", None, run, config=config_path(configs, variant), resume=resume,
              train_overrides={"seed": seed, **overrides}, progress=True)
    finally:
        lock.unlink(missing_ok=True)
    return run


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_run(run: Path, test, segmentor: Path | None, limit: int | None) -> dict:
    """Scores of one finished run on the CoNSeP test patches (cached in the run folder)."""
    cache = run / "eval_consep_test.json"
    key = {"segmentor": str(segmentor) if segmentor else None, "n_images": len(test)}
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["scores"]
    t0 = time.perf_counter()
    scores = _with_masks(run, test, segmentor) if segmentor else _points_only(run, test)
    scores["eval_seconds"] = round(time.perf_counter() - t0, 1)
    if limit is None:
        cache.write_text(json.dumps({"key": key, "scores": scores}, indent=1) + "\n")
    return scores


def _with_masks(run: Path, test, segmentor: Path) -> dict:
    from karyo.metrics.evaluate import ImagePair, evaluate
    from karyo.train.ivaan import pack_ivaan

    model = pack_ivaan(run, segmentor, log=lambda m: None)
    pairs = []
    for i in range(len(test)):
        s = test[i]
        res = model.segment(s.image, name=s.name)
        pairs.append(ImagePair(name=s.name, true_inst=s.instances, pred_inst=res.instances, true_type=s.type_map(),
                               pred_type=res.to_sample().type_map(), tissue=s.tissue))
    rep = evaluate(pairs, class_names=CLASS_NAMES)
    d = rep.detection
    out = {"f1_d": d.f1_d, "acc_type": d.acc_type, "mpq": rep.pannuke.mpq, "pq": rep.instance["pq"],
           "aji": rep.instance["aji"]}
    out.update({f"f1_c{c}": v for c, v in d.f1_type.items()})
    f1c = [v for v in d.f1_type.values() if np.isfinite(v)]
    out["f1_c_mean"] = float(np.mean(f1c)) if f1c else float("nan")
    return {k: float(v) for k, v in out.items()}


def _points_only(run: Path, test) -> dict:
    from karyo.config import load_json
    from karyo.data.augment import AugmentConfig
    from karyo.data.dataset import NucleusDataset
    from karyo.train.ivaan import load_ivaan_run
    from karyo.train.prompter import validate_points

    net, _ = load_ivaan_run(run)
    augment = AugmentConfig.from_dict(load_json(run / "train_config.json")["augment"])
    ds = NucleusDataset(test, augment, train=False, pad_multiple=32)
    with torch.no_grad():
        out = validate_points(net, ds, torch.device("cpu"))
    out.update(mpq=float("nan"), pq=float("nan"), aji=float("nan"))
    return {k: float(v) for k, v in out.items() if k != "score"}


# -------------------------------------------------------------------------------------------------- report


def _fmt(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def markdown(results: dict[str, dict[int, dict]], masks: Path | None, epochs: int, seconds: dict[str, float],
             configured: int | None = None) -> str:
    variants = [v for v in results if results[v]]
    lines = ["| variant | seeds | " + " | ".join(name for _, name in METRICS) + " |",
             "|---" * (len(METRICS) + 2) + "|"]
    for v in variants:
        runs = results[v]
        cells = []
        for key, _ in METRICS:
            vals = np.array([r.get(key, np.nan) for r in runs.values()], float)
            vals = vals[np.isfinite(vals)]
            if not vals.size:
                cells.append("n/a")
                continue
            sd = f" ± {vals.std(ddof=1):.3f}" if vals.size > 1 else ""
            rng = f" ({vals.min():.3f}–{vals.max():.3f})" if vals.size > 1 else ""
            cells.append(f"{vals.mean():.3f}{sd}{rng}")
        lines.append(f"| {v}: {VARIANTS[v]} | {len(runs)} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    base = results.get("prompter", {})
    diff = []
    for v in variants:
        if v == "prompter":
            continue
        seeds = sorted(set(base) & set(results[v]))
        if not seeds:
            continue
        parts = []
        for key, name in (("f1_c_mean", "F1c mean"), ("mpq", "mPQ"), ("f1_d", "F1d")):
            d = np.array([results[v][s].get(key, np.nan) - base[s].get(key, np.nan) for s in seeds], float)
            if np.isfinite(d).all():
                parts.append(f"{name} {d.mean():+.3f} (per seed: " + ", ".join(f"{x:+.3f}" for x in d) + ")")
        diff.append(f"- {v} − prompter, paired by seed {seeds}: " + "; ".join(parts))
    per_seed = ["| run | " + " | ".join(name for _, name in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for v in variants:
        for s, r in sorted(results[v].items()):
            per_seed.append(f"| {v}_s{s} | " + " | ".join(_fmt(r.get(k, np.nan)) for k, _ in METRICS) + " |")
    timing = ", ".join(f"{v} {t:.0f} s" for v, t in seconds.items())
    short = (f" — shortened from the configs' {configured} by --epochs: a small budget (the shipped prompter "
             "trained 120), so the absolute numbers are far below the default model's and differences between "
             "variants are early-training differences" if configured and epochs and epochs < configured else "")
    notes = (f"CoNSeP test, 224 patches of 256² (14 held-out tiles). {epochs} epochs per run{short} (configs/"
             f"ivaan_ablation_*.yaml: data, backbone, optimiser and augmentation of configs/default_prompter.yaml). "
             + (f"Masks from the segmentor `{_rel(masks)}`, the same for every run; "
                "inference settings PromptNucSeg defaults (score ≥ 0.5, NMS 6 px, mask ≥ 0.5), not tuned. "
                if masks else "No trained segmentor was found: point metrics only (mPQ, PQ, AJI n/a). ")
             + "F1d/F1c: HoVer-Net centroid pairing within 12 px, pooled over images; mPQ: mean of class-wise PQ "
             "(PanNuke style); PQ, AJI: mean over images. Cells: mean ± sample std (ddof = 1) over seeds "
             "(min–max). " + (f"Mean training time per epoch (1 thread, from history.csv): {timing}." if timing
                              else ""))
    return "\n\n".join(part for part in (notes, body, "\n".join(diff), "Per run:", "\n".join(per_seed)) if part)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def epoch_seconds(run: Path) -> float | None:
    import csv

    path = run / "history.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    return float(np.mean([float(r["seconds"]) for r in rows])) if rows else None


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "ivaan_ablation")
    parser.add_argument("--configs", type=Path, default=REPO / "configs")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--segmentor", type=Path, default=REPO / "runs" / "default_segmentor" / "model",
                        help="segmentor run/model folder for masks (point metrics only when absent)")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke)")
    parser.add_argument("--limit", type=int, default=None, help="first N test images (smoke; not cached)")
    parser.add_argument("--no-train", action="store_true", help="only evaluate finished runs and report")
    parser.add_argument("--smoke", action="store_true",
                        help="1 seed, 1 epoch, 3 steps, 8 test images; docs/benchmarks.md untouched unless --doc")
    parser.add_argument("--doc", type=Path, default=None, help="write the section into this markdown file instead")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs = args.seeds[:1], args.epochs or 1
        args.max_steps, args.limit = args.max_steps or 3, args.limit or 8
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps_per_epoch", args.max_steps)) if v}
    if not args.no_train:
        for seed in args.seeds:
            for variant in args.variants:
                train_run(variant, seed, args.runs, overrides, args.configs)
    segmentor = args.segmentor if (args.segmentor / "segmentor.pt").is_file() or \
        (args.segmentor / "model" / "segmentor.pt").is_file() else None
    print(f"evaluating with {'segmentor ' + str(segmentor) if segmentor else 'point metrics only (no segmentor)'}")
    test = LayoutDataset(args.data / "consep", split="test")
    if args.limit:
        test = test[:args.limit]
    results: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    seconds = {}
    epochs = None
    for variant in args.variants:
        for seed in args.seeds:
            run = args.runs / f"{variant}_s{seed}"
            if not finished(run):
                print(f"{run.name}: not finished, left out of the table")
                continue
            results[variant][seed] = evaluate_run(run, test, segmentor, args.limit)
            epochs = json.loads((run / "train_config.json").read_text())["train"]["epochs"]
            print(f"{run.name}: " + ", ".join(f"{n} {_fmt(results[variant][seed].get(k, np.nan))}"
                                             for k, n in METRICS), flush=True)
        times = [t for t in (epoch_seconds(args.runs / f"{variant}_s{s}") for s in args.seeds) if t]
        if times:
            seconds[variant] = float(np.mean(times))
    body = markdown(results, segmentor, epochs or 0, seconds, configured_epochs(args.configs, args.variants))
    print(body)
    if args.doc is not None:
        report.DOC = args.doc
    if args.doc is not None or not (args.smoke or args.limit or args.max_steps):
        # Follow-up variants get their own section so that running them never replaces the main ablation table.
        main_set = set(DEFAULT_VARIANTS) <= set(args.variants)
        name, title = (("ivaan_ablation", "IVAAN ablation on CoNSeP (prompter vs + alignment vs + attribute "
                        "prediction)") if main_set else
                       ("ivaan_ablation_followup", "IVAAN ablation follow-ups on CoNSeP (" +
                        ", ".join(args.variants) + ")"))
        report.update_section(name, title, body, report.invocation("benchmarks.ivaan_ablation"))
    return results


def configured_epochs(configs: Path, variants: list[str]) -> int | None:
    """The epochs the variants' configs ask for (to flag a run shortened by --epochs in the report)."""
    from karyo.train.api import read_config_file

    values = {read_config_file(config_path(configs, v))["train"]["epochs"] for v in variants}
    return values.pop() if len(values) == 1 else None


if __name__ == "__main__":
    main()
