"""PanNuke protocols end to end: train and evaluate IVAAN (or the PromptNucSeg baseline) per fold or organ group.

``karyo benchmark pannuke --root PANNUKE_DIR --protocol three-fold|organ-groups --out DIR`` runs, for every
split of the protocol (:mod:`karyo.data.protocols`):

1. train the IVAAN prompter (``method="ivaan"``) or the plain prompter through the same code path with every
   IVAAN switch off (``method="prompter"``, PromptNucSeg's prompter) on the split's training patches;
2. train a promptable segmentor on the same patches (or reuse ``segmentor=PATH`` for every split);
3. segment the test patches with the assembled :class:`~karyo.models.ivaan.IVAANModel` and score them with
   :func:`karyo.metrics.evaluate.evaluate`: PanNuke mPQ and bPQ, image-mean PQ and AJI (IVAAN Table 1 reports
   mPQ, PQ and AJI), plus detection F1d and per-class PQ.

Protocols: ``three-fold`` = the official rotation (train, val, test) = (1, 2, 3), (2, 1, 3), (3, 2, 1);
``organ-groups`` = IVAAN supplementary A's 4 organ groups (test on one group, train on the other three). IVAAN
defines no validation set for the organ groups: ``val_fraction`` of the training patches (seeded, whole patches)
is held out for checkpoint selection — a stated deviation. A validation fold (three-fold) is subsampled to
``val_limit`` patches to keep per-epoch validation affordable on CPU (0 = all).

Every split writes ``OUT/<split>/result.json``; a finished split is skipped and an interrupted training resumes,
so re-running the same command continues. ``OUT/summary.json`` and ``OUT/summary.md`` hold the per-split values
with mean and std (population std, ddof = 0: this reproduces the std row of IVAAN's Table 1 from its rows).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from karyo.config import from_dict, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.io import write_text
from karyo.data.pannuke import PANNUKE_CLASS_NAMES, PanNukeFold, find_pannuke_folds, no_release_here
from karyo.data.protocols import OFFICIAL_ROTATIONS, ProtocolSplit, apply_protocol, protocol_splits
from karyo.data.sample import ConcatSamples
from karyo.errors import InputError
from karyo.metrics._util import to_builtin

PROTOCOL_NAMES = {"three-fold": "pannuke-official", "organ-groups": "ivaan-organ-groups",
                  "pannuke-official": "pannuke-official", "ivaan-organ-groups": "ivaan-organ-groups"}
METHODS = ("ivaan", "prompter")
METRICS = (("mpq", "mPQ"), ("bpq", "bPQ"), ("pq", "PQ"), ("aji", "AJI"), ("f1_d", "F1d"))
#: IVAAN Table 1 (supplement A), for the report: {metric: {method: (group 1..4)}}.
IVAAN_TABLE1 = {"mpq": {"PromptNucSeg": (0.276, 0.233, 0.315, 0.326), "IVAAN": (0.317, 0.293, 0.335, 0.343)},
                "pq": {"PromptNucSeg": (0.647, 0.577, 0.651, 0.625), "IVAAN": (0.649, 0.610, 0.664, 0.649)},
                "aji": {"PromptNucSeg": (0.662, 0.581, 0.665, 0.638), "IVAAN": (0.688, 0.612, 0.682, 0.671)}}


@dataclass
class PanNukeBenchmarkConfig:
    """What to train per split. ``model``: the IVAAN model section (as in a ``karyo train ivaan`` config:
    IVAAN fields and a ``prompter`` mapping); ``segmentor``: ``preset`` + overrides of
    :func:`karyo.models.segmentor.segmentor_config`; ``train``/``segmentor_train``: TrainConfig fields;
    ``augment``: AugmentConfig fields; ``settings``: SegmentorTrainSettings fields; ``inference``:
    PromptNucSegConfig inference fields (thresholds, tiling)."""

    model: dict = field(default_factory=lambda: {"prompter": {"preset": "pannuke"}})
    segmentor: dict = field(default_factory=lambda: {"preset": "small"})
    train: dict = field(default_factory=lambda: {"epochs": 100, "batch_size": 8, "optimizer": "adamw",
                                                 "lr": 1e-4, "weight_decay": 0.01, "warmup_epochs": 2})
    segmentor_train: dict = field(default_factory=lambda: {"epochs": 60, "batch_size": 4, "optimizer": "adamw",
                                                           "lr": 3e-4, "weight_decay": 0.01, "warmup_epochs": 2})
    augment: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    inference: dict = field(default_factory=dict)
    val_fraction: float = 0.1
    val_limit: int = 256


def load_benchmark_config(path: str | os.PathLike | None) -> PanNukeBenchmarkConfig:
    if path is None:
        return PanNukeBenchmarkConfig()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return from_dict(PanNukeBenchmarkConfig, data, path)


def open_release(root: str | os.PathLike) -> tuple[ConcatSamples, dict[tuple[int, int], int], Any]:
    """All folds under ``root`` as one sequence, {(fold, index): position} and the metadata table."""
    import pandas as pd

    found = find_pannuke_folds(root)
    if not found:
        raise InputError(root, no_release_here(root))
    folds = [PanNukeFold(path, k) for k, path in found.items()]
    meta = pd.concat([f.metadata() for f in folds], ignore_index=True)
    position, offset = {}, 0
    for f in folds:
        for i in range(len(f)):
            position[(f.fold, i)] = offset + i
        offset += len(f)
    return ConcatSamples(folds), position, meta


def split_name(split: ProtocolSplit) -> str:
    return f"fold{split.index}" if split.protocol == "pannuke-official" else f"group{split.index}"


def split_parts(split: ProtocolSplit, meta, val_fraction: float, val_limit: int, seed: int
                ) -> dict[str, list[tuple[int, int]]]:
    """(fold, index) lists of train/val/test; a protocol without validation gets a seeded random
    ``val_fraction`` of the training patches; validation is capped at ``val_limit`` patches."""
    parts = apply_protocol(split, meta)
    rng = np.random.default_rng(seed)
    if not parts["val"] and val_fraction > 0 and len(parts["train"]) > 1:
        n_val = max(1, round(val_fraction * len(parts["train"])))
        pick = set(rng.permutation(len(parts["train"]))[:n_val].tolist())
        parts["val"] = [p for i, p in enumerate(parts["train"]) if i in pick]
        parts["train"] = [p for i, p in enumerate(parts["train"]) if i not in pick]
    if val_limit and len(parts["val"]) > val_limit:
        keep = np.sort(rng.permutation(len(parts["val"]))[:val_limit])
        parts["val"] = [parts["val"][i] for i in keep]
    return parts


def _train_overrides(base: dict, epochs: int | None, max_steps: int | None, seed: int | None) -> dict:
    out = dict(base)
    if epochs is not None:
        out["epochs"] = epochs
    if max_steps is not None:
        out["max_steps_per_epoch"] = max_steps
    if seed is not None:
        out["seed"] = seed
    return out


def _fit(task, tcfg, run_dir: Path, model_cfg, progress: bool) -> None:
    from karyo.train.loop import fit

    saved = run_dir / "train_config.json"
    if saved.is_file():  # a run of this split from before: finished, or to resume; either way, of these settings
        _refuse_other_settings(run_dir, {"train": json.loads(saved.read_text()).get("train")},
                               {"train": to_dict(tcfg)})
    if (run_dir / "model").is_dir() and (run_dir / "summary.json").is_file():
        return  # finished earlier
    fit(task, tcfg, run_dir, resume=(run_dir / "last.pt").is_file(), model_config=model_cfg, progress=progress)


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "(all)"]


def _refuse_other_settings(folder: Path, before: Any, now: Any) -> None:
    """A folder of an earlier run is reused (a finished split skipped, a training resumed) only when it was made
    with these settings: otherwise the summary would report old numbers under the new settings."""
    changed = _differences(to_builtin(before), to_builtin(now))  # as result.json reads back
    if changed:
        listed = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise InputError(folder, f"made by an earlier run with other settings (they differ in {listed}): give "
                                 f"another --out, or delete this folder to redo it")


def evaluate_split(model, samples: Sequence, on_image: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Segment ``samples`` with ``model`` and score them (PanNuke mPQ/bPQ, image-mean PQ and AJI, F1d)."""
    from karyo.metrics.evaluate import ImagePair, evaluate

    pairs = []
    for i in range(len(samples)):
        s = samples[i]
        res = model.segment(s.image, name=s.name)
        pairs.append(ImagePair(name=s.name, true_inst=s.instances, pred_inst=res.instances,
                               true_type=s.type_map(), pred_type=res.to_sample().type_map(), tissue=s.tissue))
        if on_image is not None:
            on_image(i)
    report = evaluate(pairs, class_names=PANNUKE_CLASS_NAMES)
    p = report.pannuke
    values = {"mpq": p.mpq, "bpq": p.bpq, "pq": report.instance["pq"], "aji": report.instance["aji"],
              "f1_d": report.detection.f1_d, "n_test": len(pairs),
              "class_pq": {PANNUKE_CLASS_NAMES.get(c, str(c)): v for c, v in p.class_pq.items()}}
    return to_builtin(values)


def summarize(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """Mean and population std (ddof = 0, as IVAAN's Table 1) of each metric over the splits."""
    out = {}
    for key, _ in METRICS:
        vals = np.array([r[key] for r in rows if r.get(key) is not None], np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = {"mean": float(vals.mean()) if vals.size else None,
                    "std": float(vals.std(ddof=0)) if vals.size else None}
    return out


def _fmt(v, digits: int = 3) -> str:
    """A metric for people: "n/a" where it is undefined (e.g. AJI of a model that found nothing)."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _split_label(row: dict) -> str:
    """``fold1`` is the first rotation, not the fold it tests: "1 (1/2/3)" for train Fold 1, validate 2, test 3."""
    index = int(str(row["split"]).removeprefix("fold"))
    train, val, test = OFFICIAL_ROTATIONS[index - 1]
    return f"{index} ({train}/{val}/{test})"


def markdown_table(protocol: str, method: str, rows: list[dict], summary: dict) -> str:
    fmt = _fmt

    official = protocol == "pannuke-official"
    label = "Rotation (train/val/test folds)" if official else "Test group"
    lines = [f"| {label} | " + " | ".join(name for _, name in METRICS) + " | test patches |",
             "|---" * (len(METRICS) + 2) + "|"]
    for r in rows:
        lines.append(f"| {_split_label(r) if official else r['split']} | "
                     + " | ".join(fmt(r.get(k)) for k, _ in METRICS) + f" | {r['n_test']} |")
    lines.append("| Mean | " + " | ".join(fmt(summary[k]["mean"]) for k, _ in METRICS) + " | |")
    lines.append("| std | " + " | ".join(fmt(summary[k]["std"]) for k, _ in METRICS) + " | |")
    head = (f"PanNuke, protocol `{protocol}`, method `{method}`. mPQ: mean of class-wise PQ (PanNuke); bPQ: "
            f"binary PQ (PanNuke); PQ: image-wise mean PQ; AJI: image-wise mean; std: population (ddof = 0), "
            f"as IVAAN's Table 1.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def run_pannuke_benchmark(root: str | os.PathLike, protocol: str, out: str | os.PathLike, *,
                          config: PanNukeBenchmarkConfig | str | os.PathLike | None = None,
                          method: str = "ivaan", epochs: int | None = None, segmentor_epochs: int | None = None,
                          max_steps: int | None = None, seed: int | None = None,
                          segmentor: str | os.PathLike | None = None, splits: Sequence[int] | None = None,
                          test_limit: int | None = None, encoder: Any | None = None, progress: bool = False,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a PanNuke protocol (module docstring); returns the summary written to ``OUT/summary.json``."""
    from karyo.models.segmentor import segmentor_config
    from karyo.train.ivaan import IVAANTask, ivaan_config, pack_ivaan
    from karyo.train.loop import TrainConfig
    from karyo.train.segmentor import SegmentorTask, SegmentorTrainSettings

    if protocol not in PROTOCOL_NAMES:
        raise InputError(None, f"unknown protocol {protocol!r}; choose three-fold or organ-groups")
    if method not in METHODS:
        raise InputError(None, f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = config if isinstance(config, PanNukeBenchmarkConfig) else load_benchmark_config(config)
    name = PROTOCOL_NAMES[protocol]
    out = Path(out)
    samples, position, meta = open_release(root)
    all_splits = protocol_splits(name)
    chosen = [s for s in all_splits if splits is None or s.index in set(splits)]
    if not chosen:
        raise InputError(None, f"no split among {list(splits or [])}; {name} has {[s.index for s in all_splits]}")
    tcfg = from_dict(TrainConfig, _train_overrides(cfg.train, epochs, max_steps, seed))
    scfg = from_dict(TrainConfig, _train_overrides(cfg.segmentor_train, segmentor_epochs or epochs, max_steps, seed))
    augment = AugmentConfig.from_dict({"seed": tcfg.seed, **cfg.augment})
    model_section = dict(cfg.model)
    if method == "prompter":
        model_section.update(align=False, attribute_prediction=False, text_classification=False)
    if segmentor is not None:  # refused now, not after the first split's prompter has trained
        from karyo.train.pack import load_segmentor

        load_segmentor(segmentor)
    # what actually runs: the config's training sections with the command's overrides applied, and the rest
    ran = {**to_dict(cfg), "train": to_dict(tcfg), "segmentor_train": to_dict(scfg)}
    if segmentor is not None:  # no segmentor trains: its sections would only make reruns differ for nothing
        for key in ("segmentor", "segmentor_train", "settings"):
            ran.pop(key, None)
    run_settings = to_builtin({"method": method, "config": ran, "test_limit": test_limit,
                               "segmentor": str(segmentor) if segmentor is not None else None})
    rows = []
    for split in chosen:
        sname = split_name(split)
        folder = out / sname
        result_path = folder / "result.json"
        if result_path.is_file():
            row = json.loads(result_path.read_text())
            _refuse_other_settings(folder, row.get("settings"), run_settings)
            rows.append(row)
            log(f"{sname}: done earlier with these settings, skipped")
            continue
        parts = split_parts(split, meta, cfg.val_fraction, cfg.val_limit, tcfg.seed)
        missing = sorted({f for p in parts.values() for f, _ in p} - {f for f, _ in position})
        if missing or not parts["train"] or not parts["test"]:
            raise InputError(root, f"{sname}: empty train or test split (folds here: "
                                   f"{sorted({f for f, _ in position})})")
        train_s = samples[[position[p] for p in parts["train"]]]
        val_s = samples[[position[p] for p in parts["val"]]] if parts["val"] else train_s[:1]
        test_s = samples[[position[p] for p in parts["test"]]]
        if test_limit:
            test_s = test_s[:test_limit]
        log(f"{sname}: train {len(train_s)}, val {len(parts['val'])}, test {len(test_s)} patches")
        ivaan_cfg = ivaan_config(model_section, PANNUKE_CLASS_NAMES)
        task = IVAANTask(ivaan_cfg, augment, train_s, val_s, encoder=encoder)
        _fit(task, tcfg, folder / "ivaan", ivaan_cfg, progress)
        seg_dir = Path(segmentor) if segmentor is not None else folder / "segmentor"
        if segmentor is None:
            sec = dict(cfg.segmentor)
            seg_cfg = segmentor_config(sec.pop("preset", "small"), **sec)
            settings = from_dict(SegmentorTrainSettings, cfg.settings)
            _fit(SegmentorTask(seg_cfg, augment, settings, train_s, val_s, seed=scfg.seed), scfg, seg_dir,
                 seg_cfg, progress)
        model = pack_ivaan(folder / "ivaan", seg_dir, log=log)
        if cfg.inference:
            from dataclasses import replace

            model.config = replace(model.config, **cfg.inference)
        row = {"split": sname, "protocol": name, "method": method, **evaluate_split(model, test_s),
               "n_train": len(train_s), "n_val": len(parts["val"]), "test_folds": list(split.test.folds or ()),
               "test_tissues": sorted(set(meta.set_index(["pannuke_fold", "index"]).loc[parts["test"], "tissue"])),
               "settings": run_settings}
        write_text(result_path, json.dumps(row, indent=1) + "\n")
        rows.append(row)
        log(f"{sname}: mPQ {_fmt(row['mpq'], 4)}, PQ {_fmt(row['pq'], 4)}, AJI {_fmt(row['aji'], 4)}")
    rows.sort(key=lambda r: r["split"])
    summary = {"protocol": name, "method": method, "splits": rows, "summary": summarize(rows),
               "config": run_settings["config"],
               "segmentor": str(segmentor) if segmentor is not None else "trained per split",
               "test_limit": test_limit, "complete": len(rows) == len(all_splits)}
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_text(out / "summary.md", markdown_table(name, method, rows, summary["summary"]))
    return summary


__all__ = ["IVAAN_TABLE1", "PROTOCOL_NAMES", "PanNukeBenchmarkConfig", "evaluate_split", "load_benchmark_config",
           "markdown_table", "open_release", "run_pannuke_benchmark", "split_parts", "summarize"]
