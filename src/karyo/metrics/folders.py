"""Evaluate a folder of predictions against a ground-truth dataset (what ``karyo evaluate`` runs)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from karyo.data.datasets import open_dataset
from karyo.data.layout import LayoutDataset
from karyo.data.sample import nuclei_phrase, type_map
from karyo.errors import InputError
from karyo.metrics.evaluate import EvaluationReport, ImagePair, evaluate
from karyo.metrics.semantic import SemanticMetrics, SemanticReport, semantic_metrics

#: Ground-truth pixels of a nucleus without a class: scored neither as background nor as any class.
UNCLASSIFIED = -1


def _labels(dataset, i: int):
    """Instance map, classes and name of item i, without decoding the image where the format allows."""
    if isinstance(dataset, LayoutDataset):
        inst, classes = dataset.labels(i)
        return inst, classes, dataset.ids[i], dataset.tissue_of(dataset.ids[i])
    sample = dataset[i]
    return sample.instances, sample.classes, sample.name, sample.tissue


def evaluate_folders(true: str | os.PathLike, pred: str | os.PathLike, *, split: str | None = None,
                     true_format: str = "auto", missing: str = "error",
                     on_image: Callable[[int, int], None] | None = None) -> EvaluationReport:
    """Pair every ground-truth image with ``PRED/instances/<id>.*`` (+ ``PRED/classes/<id>.csv``) and evaluate.
    ``true`` is any dataset :func:`~karyo.data.datasets.open_dataset` reads, or a labels-only folder in karyo's
    output layout (``instances/`` without ``images/``: one model's output as the reference for another's).

    ``missing="error"`` refuses a ground-truth image without a prediction; ``"empty"`` scores it as an
    empty prediction (every nucleus missed); ``"skip"`` scores only the images that have one (a few images
    segmented out of a dataset). ``on_image(done, total)`` reports progress.
    """
    truth = _open_truth(true, true_format, split, missing)
    pred_root = Path(pred)
    if not (pred_root / "instances").is_dir():
        if (pred_root / "nuclei.parquet").is_file():
            raise InputError(pred_root, "a karyo wsi output (nuclei.parquet): evaluate scores instance maps, as "
                                        "karyo segment writes them (instances/<id>.png); segment the annotated "
                                        "regions with karyo segment instead")
        if (pred_root / "semantic").is_dir():
            raise InputError(pred_root, "class maps only (semantic/, from karyo segment --task semantic): score "
                                        "them with karyo evaluate --task semantic")
        raise InputError(pred_root, "no instances/ folder: expected karyo's output layout "
                                    "(instances/<id>.png, optional classes/<id>.csv)")
    preds = LayoutDataset(pred_root)
    pred_index = {name: i for i, name in enumerate(preds.ids)}
    names = list(truth.ids)
    scored, notes = _scored_images(names, pred_index, missing, pred_root, "instances/<id>.png", split)
    true_names = truth.class_names or {}
    relabel, classes_off = _class_relabelling(true_names, preds.class_names or {})
    if true_names and not preds.class_names and (pred_root / "classes").is_dir():
        notes.append(_ids_taken_note(true_names))
    if classes_off:
        notes.append(f"classification metrics skipped: the prediction's classes {sorted(preds.class_names.values())} "
                     f"are not the ground truth's {sorted(true_names.values())}")

    def pairs() -> Iterator[ImagePair]:
        for done, i in enumerate(scored, start=1):
            t_inst, t_cls, name, tissue = _labels(truth, i)
            if t_inst is None:
                raise InputError(Path(true), f"{name}: ground truth has no instance map (a karyo layout keeps them "
                                             f"in instances/<id>.png or .tif beside images/; see docs/data.md)")
            if t_cls is not None:
                unclassified[0] += int(np.count_nonzero(np.unique(t_inst))) - sum(1 for c in t_cls.values() if c)
            if name in pred_index:
                p_inst, p_cls, _, _ = _labels(preds, pred_index[name])
                if classes_off:
                    p_cls = None
                elif p_cls is not None and relabel:
                    p_cls = {k: relabel.get(v, v) for k, v in p_cls.items()}
            else:
                p_inst, p_cls = np.zeros_like(t_inst), ({} if t_cls is not None else None)
            if p_inst.shape != t_inst.shape:
                if isinstance(truth, LayoutDataset):  # the ground truth's own map may be what does not fit
                    truth.check_against_image(name, t_inst.shape)
                raise InputError(pred_root / "instances" / name, f"prediction shape {p_inst.shape} differs from "
                                                                 f"ground truth {t_inst.shape}")
            yield ImagePair(name=name, true_inst=t_inst, pred_inst=p_inst, tissue=tissue,
                            true_type=None if t_cls is None else type_map(t_inst, t_cls),
                            pred_type=None if p_cls is None else type_map(p_inst, p_cls))
            if on_image is not None:
                on_image(done, len(scored))

    unclassified = [0]  # ground-truth nuclei without a class (no CSV row, or class 0), counted as pairs are read
    report = evaluate(pairs(), class_names=true_names or None)
    if unclassified[0] and report.classified:
        verb = "has" if unclassified[0] == 1 else "have"
        notes.append(f"{nuclei_phrase(unclassified[0])} of the ground truth {verb} no class (no row in "
                     f"classes/<id>.csv, or class 0): counted for detection and segmentation, not classification")
    later = tuple(n for n in report.notes if not (classes_off and n.startswith("classification metrics skipped")))
    return dataclasses.replace(report, notes=(*notes, *later)) if notes else report  # one reason per skip


def evaluate_semantic_folders(true: str | os.PathLike, pred: str | os.PathLike, *, split: str | None = None,
                              true_format: str = "auto", missing: str = "error",
                              on_image: Callable[[int, int], None] | None = None) -> SemanticReport:
    """Pair every ground-truth image with the class map ``PRED/semantic/<id>.png`` (what ``karyo segment --task
    semantic`` writes) and score pixels: :class:`~karyo.metrics.semantic.SemanticReport`. The ground-truth class
    map paints each nucleus with its class; nuclei without one are left out of the count (neither background nor
    a class). Classes are matched by name (``classes.json`` on both sides); without classes on either side, or
    with other class names, nucleus against background is scored instead, and a note says so. ``missing`` and
    ``on_image`` as in :func:`evaluate_folders`."""
    from karyo.data.io import image_stem, list_images, read_class_map
    from karyo.data.layout import read_class_names

    truth = _open_truth(true, true_format, split, missing)
    pred_root = Path(pred)
    if not (pred_root / "semantic").is_dir():
        raise InputError(pred_root, "no semantic/ folder: expected the class maps of karyo segment --task semantic "
                                    "(semantic/<id>.png); instance maps are scored without --task semantic")
    pred_files = {image_stem(p): p for p in list_images(pred_root / "semantic")}
    names = list(truth.ids)
    scored, notes = _scored_images(names, pred_files, missing, pred_root, "semantic/<id>.png", split)
    true_names = truth.class_names or {}
    names_path = pred_root / "classes.json"
    pred_names = read_class_names(names_path) if names_path.is_file() else {}
    # a first pass for the class ids the maps use (the second reads them again: a dataset's maps need not fit)
    used = {name: set(np.unique(read_class_map(pred_files[name])).tolist()) - {0}
            for name in (names[i] for i in scored) if name in pred_files}
    present = sorted(set().union(*used.values())) if used else []
    if pred_names:
        unnamed = [c for c in present if c not in pred_names]
        if unnamed:
            example = next(pred_files[n] for n, ids in used.items() if unnamed[0] in ids)
            raise InputError(names_path, f"names no class {unnamed[0]}, which the class maps hold (e.g. {example})")
        pred_names = {c: pred_names[c] for c in present}  # a name no map uses cannot disagree with the truth
    elif true_names and present:  # as instance evaluation does: the ids are taken to be the ground truth's
        if max(present) > max(true_names):
            raise InputError(pred_root, f"the class maps hold class {max(present)}, the ground truth names only "
                                        f"{sorted(true_names)}; add {names_path.name} to name the classes")
        notes.append(_ids_taken_note(true_names))
        pred_names = {c: true_names[c] for c in present if c in true_names}
    relabel, classes_off = _class_relabelling(true_names, pred_names)
    binary = classes_off or not true_names or (not pred_names and bool(present))
    if classes_off:
        notes.append(f"class maps scored as nucleus against background: the prediction's classes "
                     f"{sorted(pred_names.values())} are not the ground truth's {sorted(true_names.values())}")
    elif binary and not true_names:
        notes.append("class maps scored as nucleus against background: the ground truth names no classes")
    num_classes = 1 if binary else max(true_names)
    pooled = SemanticMetrics(num_classes=num_classes, ignore_index=UNCLASSIFIED)
    rows, unclassified = [], 0
    for done, i in enumerate(scored, start=1):
        t_inst, t_cls, name, tissue = _labels(truth, i)
        if t_inst is None:
            raise InputError(Path(true), f"{name}: ground truth has no instance map")
        if binary or t_cls is None:
            t_map = (t_inst > 0).astype(np.int64) if binary else np.where(t_inst > 0, UNCLASSIFIED, 0)
        else:
            t_map = type_map(t_inst, t_cls).astype(np.int64)
            t_map[(t_inst > 0) & (t_map == 0)] = UNCLASSIFIED
        unclassified += int(np.count_nonzero(t_map == UNCLASSIFIED))
        if name in pred_files:
            path = pred_files[name]
            p_map = read_class_map(path)
            if p_map.shape != t_map.shape:
                if isinstance(truth, LayoutDataset):
                    truth.check_against_image(name, t_inst.shape)
                raise InputError(path, f"class map shape {p_map.shape} differs from ground truth {t_map.shape}")
            if binary:
                p_map = (p_map > 0).astype(np.int64)
            else:
                lut = np.arange(max(max(present, default=0), num_classes) + 1)
                for k, v in relabel.items():
                    lut[k] = v
                p_map = lut[p_map]
        else:
            p_map = np.zeros_like(t_map)
        try:
            one = semantic_metrics(t_map, p_map, num_classes=num_classes, ignore_index=UNCLASSIFIED)
        except InputError as exc:
            raise InputError(pred_files.get(name, pred_root), exc.problem) from None
        pooled.update(t_map, p_map)
        rows.append({"name": name, "tissue": tissue, "pixel_accuracy": one.pixel_accuracy, "mean_iou": one.mean_iou,
                     "fwiou": one.fwiou})
        if on_image is not None:
            on_image(done, len(scored))
    if unclassified and not binary:
        notes.append(f"{unclassified} ground-truth pixel(s) of nuclei without a class are left out of the count")
    return SemanticReport(n_images=len(scored), result=pooled.compute(), class_names=dict(true_names),
                          binary=binary, per_image=pd.DataFrame(rows), notes=tuple(notes))


def _ids_taken_note(true_names: dict[int, str]) -> str:
    return (f"the prediction has no classes.json: its class ids are taken to be the ground truth's "
            f"({', '.join(f'{k} {v}' for k, v in sorted(true_names.items()))}); add classes.json to match them by "
            f"name")


def _open_truth(true: str | os.PathLike, true_format: str, split: str | None, missing: str):
    if missing not in ("error", "empty", "skip"):
        raise InputError(None, f"missing must be 'error', 'empty' or 'skip', got {missing!r}")
    true_root = Path(true)
    if true_format == "auto" and (true_root / "instances").is_dir() and not (true_root / "images").is_dir():
        return LayoutDataset(true_root, split=split)  # labels only: e.g. another model's output, as reference
    return open_dataset(true, format=true_format, split=split)


def _scored_images(names: list[str], pred_index: dict[str, object], missing: str, pred_root: Path, layout: str,
                   split: str | None = None) -> tuple[list[int], list[str]]:
    """(indices of the ground-truth images to score, notes), applying ``missing`` to those without a prediction."""
    absent = [n for n in names if n not in pred_index]
    if absent and missing == "error":
        unmatched = sorted(set(pred_index) - set(names))
        others = (f"; the predictions' ids that match no ground truth are e.g. {unmatched[:3]} (ids are file names "
                  f"without suffix, e.g. {layout})" if unmatched else "")
        raise InputError(pred_root, f"no prediction for {len(absent)} of {len(names)} image(s), e.g. "
                                    f"{absent[:3]}{others} (use --missing empty to score them as empty, --missing "
                                    f"skip to score only the predicted ones)")
    if missing == "skip" and len(absent) == len(names):
        raise InputError(pred_root, f"no prediction for any of the {len(names)} ground-truth image(s)")
    scored = [i for i, n in enumerate(names) if missing != "skip" or n in pred_index]
    notes = []
    extra = sorted(set(pred_index) - set(names))
    if extra:  # a misnamed prediction would otherwise vanish without a word
        where = f" of split {split!r} (images of other splits, or misnamed)" if split else ""
        notes.append(f"{len(extra)} prediction(s) match no ground-truth image{where} and are not scored, e.g. "
                     f"{extra[:3]} (ids are file names without suffix, e.g. {layout})")
    if missing == "skip" and len(scored) < len(names):
        notes.append(f"{len(names) - len(scored)} of {len(names)} ground-truth image(s) have no prediction and are "
                     f"left out (--missing skip)")
    return scored, notes


def _class_relabelling(true_names: dict[int, str], pred_names: dict[int, str]) -> tuple[dict[int, int], bool]:
    """({prediction class id: ground-truth id}, whether to skip classification): classes are matched by name
    (case-insensitive); a prediction whose class names are not all among the ground truth's is not scored for
    classes at all, rather than pairing, say, "inflammatory" with "Non-neoplastic" because both are id 2."""
    if not true_names or not pred_names:
        return {}, False
    by_name = {v.strip().lower(): k for k, v in true_names.items()}
    relabel = {k: by_name.get(v.strip().lower()) for k, v in pred_names.items()}
    if any(v is None for v in relabel.values()):
        return {}, True
    return {k: v for k, v in relabel.items() if k != v}, False
