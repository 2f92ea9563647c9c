"""PanNuke mPQ / bPQ, as PanNuke-metrics ``run.py:main`` computes them.

Reference: github.com/TissueImageAnalytics/PanNuke-metrics (``run.py``, ``utils.py``, commit c00014d). Per image and
class c the PQ of ``inst * (type == c)`` is taken (HoVer-Net ``get_fast_pq``), **NaN when the GT has no instance of
class c** (so false positives of a class absent from the GT are not penalised); the image mPQ is the nanmean of
the class values, the image bPQ the class-agnostic PQ (NaN for an empty GT). Tissue values are nanmeans over the
tissue's images, the dataset mPQ/bPQ the nanmean over the tissues present, and the per-class dataset PQ the
nanmean over *all* images (not per tissue first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from karyo.metrics._util import NAN, nanmean
from karyo.metrics.instance import PQResult, multiclass_pq, panoptic_quality

__all__ = [
    "NO_TISSUE",
    "PANNUKE_CLASS_NAMES",
    "PanNukeImageResult",
    "PanNukeResult",
    "pannuke_aggregate",
    "pannuke_image",
    "pannuke_image_from_pq",
]

#: PanNuke channel order (channel j holds class j+1).
PANNUKE_CLASS_NAMES: dict[int, str] = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead",
                                       5: "Non-Neoplastic"}
#: Tissue key used for images that carry no tissue label (they form one group of their own).
NO_TISSUE = "(none)"


@dataclass(frozen=True)
class PanNukeImageResult:
    """One image: ``class_pq[c]`` (NaN if class c is absent from the GT), ``mpq`` and ``bpq`` (NaN for empty GT)."""

    class_pq: dict[int, float]
    mpq: float
    bpq: float


@dataclass(frozen=True)
class PanNukeResult:
    """Dataset values: ``mpq``/``bpq`` (nanmean over tissues), ``class_pq`` (nanmean over all images), per tissue."""

    mpq: float
    bpq: float
    class_pq: dict[int, float]
    tissue_mpq: dict[str, float]
    tissue_bpq: dict[str, float]


def pannuke_image_from_pq(class_results: Mapping[int, PQResult], binary: PQResult) -> PanNukeImageResult:
    """Apply PanNuke's NaN rules to per-class and class-agnostic HoVer-Net PQ results of one image."""
    class_pq = {int(c): (r.pq if r.n_true > 0 else NAN) for c, r in class_results.items()}
    bpq = binary.pq if binary.n_true > 0 else NAN
    return PanNukeImageResult(class_pq=class_pq, mpq=nanmean(class_pq.values()), bpq=bpq)


def pannuke_image(true_inst: np.ndarray, true_type: np.ndarray, pred_inst: np.ndarray, pred_type: np.ndarray,
                  classes: Sequence[int] = (1, 2, 3, 4, 5)) -> PanNukeImageResult:
    """Per-image PanNuke values (the body of the image loop in ``run.py:main``).

    bPQ is computed on the instance maps as given; the reference rebuilds them from the class channels
    (``binarize``), which is the same map whenever every instance pixel carries one of ``classes``.
    """
    return pannuke_image_from_pq(multiclass_pq(true_inst, true_type, pred_inst, pred_type, classes),
                                 panoptic_quality(true_inst, pred_inst))


def pannuke_aggregate(images: Sequence[PanNukeImageResult], tissues: Sequence[str | None] | None = None,
                      classes: Sequence[int] | None = None) -> PanNukeResult:
    """Aggregate per-image results as ``run.py:main`` does (``tissues[i]`` names image i's tissue; None = one group)."""
    images = list(images)
    tissues = [None] * len(images) if tissues is None else list(tissues)
    if len(tissues) != len(images):
        raise ValueError(f"{len(images)} image results but {len(tissues)} tissue labels")
    if classes is None:
        classes = sorted({c for im in images for c in im.class_pq})
    class_pq = {int(c): nanmean(im.class_pq.get(c, NAN) for im in images) for c in classes}
    keys = [NO_TISSUE if t is None else str(t) for t in tissues]
    tissue_mpq: dict[str, float] = {}
    tissue_bpq: dict[str, float] = {}
    for tissue in sorted(set(keys)):
        members = [im for im, k in zip(images, keys, strict=True) if k == tissue]
        tissue_mpq[tissue] = nanmean(im.mpq for im in members)
        tissue_bpq[tissue] = nanmean(im.bpq for im in members)
    return PanNukeResult(mpq=nanmean(tissue_mpq.values()), bpq=nanmean(tissue_bpq.values()), class_pq=class_pq,
                         tissue_mpq=tissue_mpq, tissue_bpq=tissue_bpq)
