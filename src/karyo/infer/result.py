"""What every instance model returns: one instance map plus per-instance class and score."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from karyo.data.sample import Sample, keep_instances, nuclei_phrase
from karyo.metrics.detection import labels_at


@dataclass(eq=False)  # compared by identity: a generated __eq__ over the instance array raises
class SegmentationResult:
    """Nuclei found in one image.

    ``instances`` is H×W int32 (0 = background, ids 1..N); ``classes`` and ``scores`` map instance id to
    the predicted class id and the model's confidence in [0, 1]; ``class_names`` maps class id to name.
    ``mpp``: µm per pixel of ``instances`` when the caller gave it (the table then adds ``area_um2``).
    ``properties`` (optional) maps instance id to extra per-nucleus values (e.g. IVAAN's predicted attribute
    levels and description); :meth:`table` adds one column per key and the GeoJSON writer adds them to the
    feature properties. ``prompted``: the nuclei were segmented at given points, so every row of the table has a
    ``point_index`` column, even a table with no row (a script reading it needs the same columns either way).
    """

    instances: np.ndarray
    classes: dict[int, int] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    class_names: dict[int, str] | None = None
    name: str = ""
    model: str = ""
    properties: dict[int, dict] | None = None
    mpp: float | None = None
    prompted: bool = False

    def __post_init__(self) -> None:  # plain ints and floats, so the dicts compare, print and json.dump as documented
        self.classes = {int(k): int(v) for k, v in self.classes.items()}
        self.scores = {int(k): float(v) for k, v in self.scores.items()}
        if self.class_names is not None:
            self.class_names = {int(k): str(v) for k, v in self.class_names.items()}
        if self.properties is not None:
            self.properties = {int(k): v for k, v in self.properties.items()}

    @property
    def n_nuclei(self) -> int:
        return len(np.unique(self.instances)) - int((self.instances == 0).any())

    def __repr__(self) -> str:  # the dataclass default prints every nucleus' class and score
        h, w = self.instances.shape[:2]
        counts: dict[str, int] = {}
        for c in self.classes.values():
            label = (self.class_names or {}).get(c, f"class {c}")
            counts[label] = counts.get(label, 0) + 1
        per_class = f", {dict(sorted(counts.items()))}" if counts else ""
        named = f" {self.name!r}" if self.name else ""
        kind = type(self).__name__
        return f"<{kind}{named}: {nuclei_phrase(self.n_nuclei)} in {w}×{h} px{per_class}, model {self.model!r}>"

    def save(self, out_dir: str | os.PathLike, image: np.ndarray | None = None, *, stem: str | None = None,
             outputs: Iterable[str] | None = None) -> dict[str, Path]:
        """Write what ``karyo segment`` writes (instance map, class CSV, table, overlay when ``image`` is given,
        QuPath GeoJSON) into ``out_dir``; returns {output kind: path}. See
        :func:`karyo.export.writers.save_result`."""
        from karyo.export.writers import ALL_OUTPUTS, save_result

        if not (stem or self.name):
            from karyo.errors import InputError

            raise InputError(None, "this result has no name to write its files under: pass stem=... (or segment "
                                   "with name=...)")
        if isinstance(outputs, str):  # "table" or "table,geojson", as --outputs takes them; not its letters
            outputs = [kind.strip() for kind in outputs.split(",") if kind.strip()]
        if outputs is not None and not list(outputs):
            from karyo.errors import InputError

            raise InputError(None, f"outputs names nothing to write; choose from {', '.join(ALL_OUTPUTS)}")
        return save_result(self, out_dir, image, stem=stem, outputs=ALL_OUTPUTS if outputs is None else outputs)

    def table(self) -> pd.DataFrame:
        """One row per nucleus: id, centroid (x, y), area (and ``area_um2`` when ``mpp`` is known), bounding box,
        class and score, then a column per key of ``properties`` (e.g. ``point_index`` for clicked nuclei)."""
        ids = np.unique(self.instances)
        ids = ids[ids > 0]
        if ids.size == 0:
            empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in _TABLE_COLUMNS.items()})
            if self.mpp is not None:
                empty.insert(empty.columns.get_loc("area") + 1, "area_um2", pd.Series(dtype="float64"))
            if self.prompted:
                empty["point_index"] = pd.Series(dtype="int64")
            return empty
        area = ndi.sum_labels(np.ones_like(self.instances), self.instances, ids)
        cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(np.ones_like(self.instances),
                                                                  self.instances, ids), strict=True))
        slices = ndi.find_objects(self.instances)
        boxes = np.array([[slices[i - 1][1].start, slices[i - 1][0].start, slices[i - 1][1].stop,
                           slices[i - 1][0].stop] for i in ids])
        names = self.class_names or {}
        cls = [self.classes.get(int(i), 0) for i in ids]
        return pd.DataFrame({
            "instance_id": ids.astype(np.int64),
            "centroid_x": cx, "centroid_y": cy,
            "area": area.astype(np.int64),
            **({"area_um2": area * self.mpp ** 2} if self.mpp is not None else {}),
            "bbox_x0": boxes[:, 0], "bbox_y0": boxes[:, 1], "bbox_x1": boxes[:, 2], "bbox_y1": boxes[:, 3],
            "class_id": np.asarray(cls, dtype=np.int64),
            "class_name": [names.get(c, "") if c else "" for c in cls],
            "score": np.asarray([self.scores.get(int(i), np.nan) for i in ids], dtype=np.float64),
            **self._property_columns(ids),
        })

    def _property_columns(self, ids: np.ndarray) -> dict[str, list]:
        """One column per key of ``properties`` (None where an instance lacks it), keys in first-seen order."""
        if not self.properties:
            return {}
        keys: dict[str, None] = {}
        for props in self.properties.values():
            keys.update(dict.fromkeys(props))
        reserved = {*_TABLE_COLUMNS, "area_um2"}
        return {(k if k not in reserved else f"property_{k}"):
                [self.properties.get(int(i), {}).get(k) for i in ids] for k in keys}

    def class_map(self) -> np.ndarray:
        """H×W int32 map of class ids (0 = background or unclassified): per-class masks are ``class_map() == c``."""
        from karyo.data.sample import type_map

        return type_map(self.instances, self.classes)

    def overlay(self, image: np.ndarray, thickness: int = 1) -> np.ndarray:
        """``image`` as uint8 RGB with each nucleus outlined in its class colour (what ``karyo segment`` writes to
        ``overlays/``), e.g. for ``plt.imshow`` in a notebook."""
        from karyo.export.overlay import draw_overlay

        return draw_overlay(image, self.instances, self.classes, self.class_names, thickness=thickness)

    def to_sample(self, image: np.ndarray | None = None) -> Sample:
        """The result as a :class:`Sample` (e.g. to evaluate it against ground truth)."""
        img = image if image is not None else np.zeros((*self.instances.shape, 1), np.uint8)
        return Sample(image=img, instances=self.instances, classes=dict(self.classes) or None, name=self.name,
                      class_names=self.class_names)


_TABLE_COLUMNS = {"instance_id": "int64", "centroid_x": "float64", "centroid_y": "float64", "area": "int64",
                  "bbox_x0": "int64", "bbox_y0": "int64", "bbox_x1": "int64", "bbox_y1": "int64",
                  "class_id": "int64", "class_name": "object", "score": "float64"}


def tag_prompted(result: SegmentationResult, points: np.ndarray | None) -> SegmentationResult:
    """Give each nucleus under a prompt point the property ``point_index``: the 0-based index of the first of
    ``points`` (x, y, the image's pixels) that lies on it, so a caller can tell which click became which
    nucleus (instance ids are not the points' order: points whose mask fails are dropped). The table and the
    GeoJSON carry it as a column / property. Returns ``result``, changed in place."""
    if points is None:
        return result
    result.prompted = True
    if len(points) == 0:
        return result
    under = labels_at(result.instances, points)
    props = {k: dict(v) for k, v in (result.properties or {}).items()}
    for index, instance in enumerate(under.tolist()):
        if instance > 0 and "point_index" not in props.get(instance, {}):
            props.setdefault(instance, {})["point_index"] = index
    result.properties = props or None
    return result


def drop_unprompted(result: SegmentationResult, points) -> SegmentationResult:
    """Only the nuclei under ``points`` (x, y, the image's pixels), ids renumbered 1..N in their order: a prompt
    whose mask missed its own point (a click on background can give a sliver beside it) gave no nucleus the
    caller asked for, and a row without ``point_index`` cannot be traced to a click. Changed in place."""
    if points is None:
        return result
    return _keep_instances(result, _ids_under(result.instances, points))


def drop_negated(result: SegmentationResult, negative) -> SegmentationResult:
    """Every nucleus but those under ``negative`` points (automatic segmentation with some nuclei clicked away,
    as CellViT's and HoVer-Net's selection does); ids renumbered 1..N. Changed in place."""
    if negative is None or len(negative) == 0:
        return result
    present = set(np.unique(result.instances).tolist()) - {0}
    return _keep_instances(result, present - _ids_under(result.instances, negative))


def _ids_under(instances: np.ndarray, points) -> set[int]:
    return set(labels_at(instances, points).tolist()) - {0}


def _keep_instances(result: SegmentationResult, keep: set[int]) -> SegmentationResult:
    present = np.unique(result.instances)
    if all(int(i) in keep for i in present if i):
        return result
    result.instances, new = keep_instances(result.instances, keep)
    result.classes = {new[k]: v for k, v in result.classes.items() if k in new}
    result.scores = {new[k]: v for k, v in result.scores.items() if k in new}
    if result.properties is not None:
        result.properties = {new[k]: v for k, v in result.properties.items() if k in new} or None
    ids = getattr(result, "embedding_ids", None)  # IVAAN results: one embedding row per instance id
    if ids is not None:
        rows = [r for r, i in enumerate(np.asarray(ids).tolist()) if int(i) in new]
        result.embeddings = np.asarray(result.embeddings)[rows]
        result.embedding_ids = np.array([new[int(ids[r])] for r in rows], np.int64)
    return result


def finish(result: SegmentationResult, points: np.ndarray | None, mpp: float | None) -> SegmentationResult:
    """What every model's ``segment`` does last: record the image's ``mpp`` and tag prompted nuclei
    (:func:`tag_prompted`)."""
    result.mpp = None if mpp is None else float(mpp)
    return tag_prompted(result, points)
