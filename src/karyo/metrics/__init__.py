"""Nucleus metrics that reproduce the reference implementations exactly, vectorised.

* :mod:`~karyo.metrics.instance` — HoVer-Net PQ/DQ/SQ, AJI, AJI+, Dice, per-class PQ, ``remap_label``;
* :mod:`~karyo.metrics.pannuke` — PanNuke mPQ / bPQ; :mod:`~karyo.metrics.conic` — CoNIC mPQ+, binary PQ, R²;
* :mod:`~karyo.metrics.detection` — HoVer-Net centroid detection F1_d and classification F1_c;
* :mod:`~karyo.metrics.matching` — precision/recall/F1 at IoU thresholds, F1-mean, mAP (DSB2018 / StarDist);
* :mod:`~karyo.metrics.semantic` — pixel accuracy, IoU, precision, recall, F1, FWIoU from a confusion matrix;
* :mod:`~karyo.metrics.evaluate` — the dataset-level evaluator used by ``karyo evaluate``; call it as
  ``karyo.metrics.evaluate.evaluate(pairs, ...)`` (the function is not re-exported here, so that
  ``karyo.metrics.evaluate`` stays the module).

Where a reference raises (e.g. PQ with both maps empty, AJI with an empty prediction) the value is NaN.
"""

from karyo.metrics.conic import (
    ConicImageStats,
    ConicResult,
    conic_aggregate,
    conic_image_stats,
    conic_pq,
    r2_score,
)
from karyo.metrics.detection import (
    CoordinatePairing,
    DetectionResult,
    InstancePoints,
    NucleiTypeStats,
    instance_points,
    pair_coordinates,
)
from karyo.metrics.evaluate import EvaluationReport, ImagePair
from karyo.metrics.instance import (
    AJIResult,
    Contingency,
    PQResult,
    aggregated_jaccard_index,
    aggregated_jaccard_index_plus,
    class_instance_map,
    contingency,
    dice,
    multiclass_pq,
    panoptic_quality,
    remap_label,
)
from karyo.metrics.matching import IOU_THRESHOLDS, ThresholdMatching, match_at_thresholds
from karyo.metrics.pannuke import (
    PANNUKE_CLASS_NAMES,
    PanNukeImageResult,
    PanNukeResult,
    pannuke_aggregate,
    pannuke_image,
)
from karyo.metrics.semantic import SemanticMetrics, SemanticResult, confusion_matrix, semantic_metrics

__all__ = [
    "IOU_THRESHOLDS",
    "PANNUKE_CLASS_NAMES",
    "AJIResult",
    "ConicImageStats",
    "ConicResult",
    "Contingency",
    "CoordinatePairing",
    "DetectionResult",
    "EvaluationReport",
    "ImagePair",
    "InstancePoints",
    "NucleiTypeStats",
    "PQResult",
    "PanNukeImageResult",
    "PanNukeResult",
    "SemanticMetrics",
    "SemanticResult",
    "ThresholdMatching",
    "aggregated_jaccard_index",
    "aggregated_jaccard_index_plus",
    "class_instance_map",
    "confusion_matrix",
    "conic_aggregate",
    "conic_image_stats",
    "conic_pq",
    "contingency",
    "dice",
    "instance_points",
    "match_at_thresholds",
    "multiclass_pq",
    "pair_coordinates",
    "pannuke_aggregate",
    "pannuke_image",
    "panoptic_quality",
    "r2_score",
    "remap_label",
    "semantic_metrics",
]
