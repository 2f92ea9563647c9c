"""Dataset-level evaluation behind ``karyo evaluate``: every instance and classification metric in one pass.

Per image: HoVer-Net PQ/DQ/SQ, AJI, AJI+, Dice; F1/precision/recall at the IoU thresholds, F1-mean and mAP; and,
when both sides carry classes, the PanNuke per-class PQ / mPQ / bPQ and the CoNIC binary PQ. One contingency table
per image (and per class) feeds all of them. Dataset aggregates:

* ``instance``: mean over images of the HoVer-Net metrics, each skipping the images where it is NaN;
  ``instance_complete_cases``: the mean over the images where none of them is NaN, i.e. what HoVer-Net's
  ``run_nuclei_inst_stat`` prints for the images on which no reference function raises;
* ``matching``: counts pooled over the dataset at each IoU threshold (StarDist ``matching_dataset``);
* ``detection``: HoVer-Net ``run_nuclei_type_stat`` (F1_d always; type accuracy and F1_c with classes);
* ``pannuke``: PanNuke mPQ / bPQ / per-class PQ / per-tissue values; ``conic``: CoNIC mPQ+, PQ+ per class, binary
  PQ, R² of counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.metrics._util import NAN, nanmean, to_builtin
from karyo.metrics.conic import ConicImageStats, ConicResult, conic_aggregate, conic_image_stats_from_pq
from karyo.metrics.detection import DETECTION_RADIUS, DetectionResult, NucleiTypeStats
from karyo.metrics.instance import (
    aji_from_contingency,
    aji_plus_from_contingency,
    contingency,
    dice,
    multiclass_pq,
    pq_from_contingency,
)
from karyo.metrics.matching import IOU_THRESHOLDS, ThresholdMatching, matching_from_contingency
from karyo.metrics.pannuke import (
    NO_TISSUE,
    PanNukeImageResult,
    PanNukeResult,
    pannuke_aggregate,
    pannuke_image_from_pq,
)

__all__ = ["INSTANCE_METRICS", "EvaluationReport", "ImagePair", "as_image_pair", "evaluate"]

#: The HoVer-Net per-image metrics averaged in ``EvaluationReport.instance``.
INSTANCE_METRICS = ("pq", "dq", "sq", "aji", "aji_plus", "dice")
SUMMARY_COLUMNS = ("group", "metric", "value")


@dataclass(frozen=True)
class ImagePair:
    """A ground-truth / prediction pair of one image. Type maps are H×W class maps (0 = background) or None."""

    name: str
    true_inst: np.ndarray
    pred_inst: np.ndarray
    true_type: np.ndarray | None = None
    pred_type: np.ndarray | None = None
    tissue: str | None = None


def _sample_type(sample: Sample) -> np.ndarray | None:
    return sample.type_map() if sample.classes is not None else None


def as_image_pair(item: Any, index: int = 0) -> ImagePair:
    """Accept an :class:`ImagePair`, a ``(true Sample, pred Sample)`` tuple, a mapping with the keys ``name``,
    ``tissue``, ``true_inst``, ``true_type``, ``pred_inst``, ``pred_type`` (as ``make_cases`` yields), or any object
    with those attributes."""
    if isinstance(item, ImagePair):
        return item
    if isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(s, Sample) for s in item):
        true, pred = item
        if true.instances is None or pred.instances is None:
            raise InputError(true.source or true.name or None, "both samples of a pair need an instance map")
        return ImagePair(name=true.name or pred.name or f"image_{index}", true_inst=true.instances,
                         pred_inst=pred.instances, true_type=_sample_type(true), pred_type=_sample_type(pred),
                         tissue=true.tissue if true.tissue is not None else pred.tissue)
    get = (lambda k: item.get(k)) if isinstance(item, Mapping) else (lambda k: getattr(item, k, None))
    true_inst, pred_inst = get("true_inst"), get("pred_inst")
    if true_inst is None or pred_inst is None:
        raise InputError(None, f"pair {index}: needs true_inst and pred_inst (got {type(item).__name__})")
    return ImagePair(name=str(get("name") or f"image_{index}"), true_inst=np.asarray(true_inst),
                     pred_inst=np.asarray(pred_inst), true_type=get("true_type"), pred_type=get("pred_type"),
                     tissue=get("tissue"))


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields explicitly
class EvaluationReport:
    """Everything :func:`evaluate` computed. Per-class dicts of the result objects are keyed by class id."""

    n_images: int
    classes: tuple[int, ...]
    class_names: dict[int, str]
    classified: bool
    per_image: pd.DataFrame
    per_class: pd.DataFrame
    per_tissue: pd.DataFrame
    instance: dict[str, float]
    instance_complete_cases: dict[str, float]
    matching: ThresholdMatching
    detection: DetectionResult
    pannuke: PanNukeResult | None = None
    conic: ConicResult | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def _name(self, c: int) -> str:
        return self.class_names.get(c, str(c))

    def _by_name(self, d: Mapping[int, Any]) -> dict[str, Any]:
        return {self._name(c): v for c, v in d.items()}

    def matching_dict(self) -> dict[str, Any]:
        m = self.matching
        out: dict[str, Any] = {"f1_mean": m.f1_mean, "map": m.map, "n_true": m.n_true, "n_pred": m.n_pred}
        for key in ("tp", "fp", "fn", "precision", "recall", "f1", "ap"):
            out[key] = {f"{t:g}": v for t, v in zip(m.thresholds, getattr(m, key).tolist(), strict=True)}
        return out

    def detection_dict(self) -> dict[str, Any]:
        d = self.detection
        out: dict[str, Any] = {"f1_d": d.f1_d, "precision_d": d.precision_d, "recall_d": d.recall_d,
                               "tp": d.tp, "fp": d.fp, "fn": d.fn}
        if self.classified:
            out["acc_type"] = d.acc_type
            out["f1_type"] = self._by_name(d.f1_type)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (NaN → None, numpy → Python, per-class values keyed by class name)."""
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "classes": list(self.classes),
            "class_names": {str(c): self._name(c) for c in self.classes},
            "classified": self.classified,
            "instance": self.instance,
            "instance_complete_cases": self.instance_complete_cases,
            "matching": self.matching_dict(),
            "detection": self.detection_dict(),
            "notes": list(self.notes),
        }
        if self.pannuke is not None:
            p = self.pannuke
            out["pannuke"] = {"mpq": p.mpq, "bpq": p.bpq, "class_pq": self._by_name(p.class_pq),
                              "tissue_mpq": p.tissue_mpq, "tissue_bpq": p.tissue_bpq}
        if self.conic is not None:
            c = self.conic
            totals = {self._name(k): dict(zip(("tp", "fp", "fn", "sum_iou"), row, strict=True))
                      for k, row in zip(c.classes, c.class_totals.tolist(), strict=True)}
            out["conic"] = {"mpq_plus": c.mpq_plus, "class_pq_plus": self._by_name(c.class_pq_plus),
                            "class_totals": totals, "binary_pq": c.binary_pq, "r2": c.r2,
                            "class_r2": self._by_name(c.class_r2)}
        out["per_class"] = self.per_class.to_dict(orient="records")
        out["per_tissue"] = self.per_tissue.to_dict(orient="records")
        out["per_image"] = self.per_image.to_dict(orient="records")
        return to_builtin(out)

    def summary_table(self) -> list[tuple[str, str, str]]:
        """Rows ``(group, metric, value)`` for a printed table (values formatted to 4 decimals, NaN as "n/a")."""
        def fmt(v: float | None) -> str:
            return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"

        rows: list[tuple[str, str, str]] = []
        inst = self.instance
        for key, label in (("pq", "PQ"), ("dq", "DQ"), ("sq", "SQ"), ("aji", "AJI"), ("aji_plus", "AJI+"),
                           ("dice", "Dice")):
            rows.append(("instance (mean over images)", label, fmt(inst[key])))
        m = self.matching
        if 0.5 in m.thresholds:
            rows.append(("matching (pooled)", "F1@0.5", fmt(m.at(0.5)["f1"])))
        rows.append(("matching (pooled)", f"F1-mean@{m.thresholds[0]:g}:{m.thresholds[-1]:g}", fmt(m.f1_mean)))
        rows.append(("matching (pooled)", f"mAP@{m.thresholds[0]:g}:{m.thresholds[-1]:g}", fmt(m.map)))
        d = self.detection
        rows += [("detection (HoVer-Net)", "F1d", fmt(d.f1_d)),
                 ("detection (HoVer-Net)", "precision", fmt(d.precision_d)),
                 ("detection (HoVer-Net)", "recall", fmt(d.recall_d))]
        if self.classified:
            rows.append(("classification (HoVer-Net)", "type accuracy", fmt(d.acc_type)))
            rows += [("classification (HoVer-Net)", f"F1c {self._name(c)}", fmt(v)) for c, v in d.f1_type.items()]
        if self.pannuke is not None:
            p = self.pannuke
            rows += [("PanNuke", "mPQ", fmt(p.mpq)), ("PanNuke", "bPQ", fmt(p.bpq))]
            rows += [("PanNuke", f"PQ {self._name(c)}", fmt(v)) for c, v in p.class_pq.items()]
        if self.conic is not None:
            c = self.conic
            rows += [("CoNIC", "mPQ+", fmt(c.mpq_plus)), ("CoNIC", "PQ (binary)", fmt(c.binary_pq)),
                     ("CoNIC", "R2", fmt(c.r2))]
            rows += [("CoNIC", f"PQ+ {self._name(k)}", fmt(v)) for k, v in c.class_pq_plus.items()]
        return rows


def _default_classes(pairs: Sequence[ImagePair], class_names: Mapping[int, str] | None) -> tuple[int, ...]:
    found: set[int] = set()
    for p in pairs:
        if p.true_type is not None:
            found.update(int(v) for v in np.unique(np.asarray(p.true_type)) if v != 0)
    found.update(int(k) for k in (class_names or {}))
    return tuple(sorted(found))


def evaluate(pairs: Iterable[Any], class_names: Mapping[int, str] | None = None,
             classes: Sequence[int] | None = None, match_iou: float = 0.5,
             iou_thresholds: Sequence[float] = IOU_THRESHOLDS, radius: float = DETECTION_RADIUS) -> EvaluationReport:
    """Evaluate predictions against ground truth over a dataset (see the module docstring for what is computed).

    ``pairs`` yields anything :func:`as_image_pair` accepts. ``classes`` lists the class ids to score (default:
    the classes present in the GT type maps, plus the keys of ``class_names``); classification metrics are computed
    only when every pair has type maps on both sides. ``match_iou`` is the PQ matching threshold (0.5 in all
    references); ``radius`` the detection pairing radius in pixels (12 in HoVer-Net).
    """
    items: list[ImagePair] = []
    for i, item in enumerate(pairs):
        if (class_names is None and isinstance(item, tuple | list) and item and isinstance(item[0], Sample)
                and item[0].class_names):
            class_names = item[0].class_names  # the GT samples' own class names, unless given
        items.append(as_image_pair(item, i))
    if not items:
        raise InputError(None, "no image pairs to evaluate")
    notes: list[str] = []
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    n_typed = sum(p.true_type is not None and p.pred_type is not None for p in items)
    classified = n_typed == len(items)
    if 0 < n_typed < len(items):
        notes.append(f"classification metrics skipped: only {n_typed} of {len(items)} pairs have classes on both sides")
    cls = tuple(int(c) for c in classes) if classes is not None else _default_classes(items, names)
    if classified and not cls:
        classified = False
        notes.append("classification metrics skipped: no class ids found")
    if not classified and n_typed == 0:
        notes.append("classification metrics skipped: no pair has classes on both sides")

    det = NucleiTypeStats(radius=radius)
    rows: list[dict[str, Any]] = []
    matchings: list[ThresholdMatching] = []
    pannuke_imgs: list[PanNukeImageResult] = []
    conic_imgs: list[ConicImageStats] = []

    def one(item: ImagePair) -> dict[str, Any]:
        """Per-image metrics (one contingency table feeds all instance metrics); accumulates dataset state."""
        ct = contingency(item.true_inst, item.pred_inst)
        pq = pq_from_contingency(ct, match_iou)
        m = matching_from_contingency(ct, iou_thresholds)
        matchings.append(m)
        row: dict[str, Any] = {
            "name": item.name, "tissue": item.tissue, "n_true": ct.n_true, "n_pred": ct.n_pred,
            "tp": pq.tp, "fp": pq.fp, "fn": pq.fn, "dq": pq.dq, "sq": pq.sq, "pq": pq.pq,
            "aji": aji_from_contingency(ct).value, "aji_plus": aji_plus_from_contingency(ct).value,
            "dice": dice(item.true_inst, item.pred_inst),
        }
        if 0.5 in m.thresholds:
            at = m.at(0.5)
            row.update({"precision@0.5": at["precision"], "recall@0.5": at["recall"], "f1@0.5": at["f1"]})
        row.update({"f1_mean": m.f1_mean, "map": m.map})
        if classified:
            det.add(item.true_inst, item.true_type, item.pred_inst, item.pred_type)
            per_class = multiclass_pq(item.true_inst, item.true_type, item.pred_inst, item.pred_type, cls, match_iou)
            pn = pannuke_image_from_pq(per_class, pq)
            cn = conic_image_stats_from_pq(per_class, pq)
            pannuke_imgs.append(pn)
            conic_imgs.append(cn)
            row.update({"mpq": pn.mpq, "bpq": pn.bpq, "conic_pq": cn.binary.pq})
            row.update({f"pq_{names.get(c, str(c))}": v for c, v in pn.class_pq.items()})
        else:
            det.add(item.true_inst, None, item.pred_inst, None)
        return row

    for item in items:
        try:
            rows.append(one(item))
        except InputError as exc:  # name the image in the message (the CLI prints it without a traceback)
            raise InputError(item.name, exc.problem) from None

    per_image = pd.DataFrame(rows)
    instance = {k: nanmean(per_image[k]) for k in (*INSTANCE_METRICS, "f1_mean", "map")}
    complete = per_image[list(INSTANCE_METRICS)].notna().all(axis=1).to_numpy()
    instance_complete = {k: (float(per_image.loc[complete, k].mean()) if complete.any() else NAN)
                         for k in INSTANCE_METRICS}
    instance_complete["n_images"] = int(complete.sum())
    lacking = per_image["aji"].isna() & (per_image["n_true"] > 0)
    if lacking.any():  # AJI's reference raises without predictions; say what the mean leaves out
        literal = float(per_image["aji"].where(~lacking, 0.0).mean())
        notes.append(f"AJI: {int(lacking.sum())} image(s) with annotated nuclei but no predicted one have no value "
                     f"(HoVer-Net's implementation raises there) and are left out of the mean; counted as 0 (the "
                     f"definition read literally, as AJI+ does) AJI would be {literal:.4f}")
    one_sided = int(((per_image["n_true"] == 0) != (per_image["n_pred"] == 0)).sum())
    if one_sided:
        notes.append(f"F1d/F1c: {one_sided} image(s) have nuclei on one side only; as in HoVer-Net's implementation "
                     f"the empty side gets a dummy point at (0, 0), which counts as one false positive or negative "
                     f"(or, near a nucleus in the image's corner, a match)")
    detection = det.compute(list(cls) if classified else None)

    pannuke = conic = None
    class_rows: list[dict[str, Any]] = []
    if classified:
        pannuke = pannuke_aggregate(pannuke_imgs, [p.tissue for p in items], cls)
        conic = conic_aggregate(conic_imgs)
        counts_true = np.sum([c.counts_true for c in conic_imgs], axis=0)
        counts_pred = np.sum([c.counts_pred for c in conic_imgs], axis=0)
        for k, c in enumerate(cls):
            tp, fp, fn, s = conic.class_totals[k].tolist()
            class_rows.append({"class_id": c, "name": names.get(c, str(c)), "n_true": int(counts_true[k]),
                               "n_pred": int(counts_pred[k]), "pannuke_pq": pannuke.class_pq[c],
                               "conic_pq_plus": conic.class_pq_plus[c], "tp": int(tp), "fp": int(fp), "fn": int(fn),
                               "sum_iou": s, "r2": conic.class_r2[c], "f1_type": detection.f1_type[c]})
    per_class = pd.DataFrame(class_rows, columns=["class_id", "name", "n_true", "n_pred", "pannuke_pq",
                                                  "conic_pq_plus", "tp", "fp", "fn", "sum_iou", "r2", "f1_type"])

    tissue_key = per_image["tissue"].map(lambda t: NO_TISSUE if t is None else str(t))
    tissue_rows = []
    for tissue in sorted(set(tissue_key)):
        sub = per_image[(tissue_key == tissue).to_numpy()]
        trow: dict[str, Any] = {"tissue": tissue, "n_images": len(sub)}
        trow.update({k: nanmean(sub[k]) for k in INSTANCE_METRICS})
        if pannuke is not None:
            trow.update({"mpq": pannuke.tissue_mpq[tissue], "bpq": pannuke.tissue_bpq[tissue]})
        tissue_rows.append(trow)
    per_tissue = pd.DataFrame(tissue_rows)

    return EvaluationReport(n_images=len(items), classes=cls, class_names=names, classified=classified,
                            per_image=per_image, per_class=per_class, per_tissue=per_tissue, instance=instance,
                            instance_complete_cases=instance_complete, matching=ThresholdMatching.pool(matchings),
                            detection=detection, pannuke=pannuke, conic=conic, notes=tuple(notes))
