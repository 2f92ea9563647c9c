"""QuPath-compatible GeoJSON: one Feature per nucleus, objectType "detection", classification when known.

The layout follows what QuPath ≥ 0.4 writes and reads: ``properties.objectType``,
``properties.classification = {"name", "color"}`` and ``properties.measurements = {name: value}``.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from shapely.geometry import mapping

from karyo.data.io import atomic_path
from karyo.export.colors import class_color
from karyo.export.polygons import instance_polygons

_NAMESPACE = uuid.UUID("6f1c7c52-3c63-4a8e-9a52-7d0d0a4b5a11")


def _clean(value):
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if not math.isfinite(v) else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def nucleus_features(instances: np.ndarray, *, classes: Mapping[int, int] | None = None,
                     class_names: Mapping[int, str] | None = None, scores: Mapping[int, float] | None = None,
                     measurements=None, properties: Mapping[int, Mapping] | None = None,
                     offset: tuple[float, float] = (0.0, 0.0), image_name: str = "",
                     simplify: float = 0.0) -> list[dict]:
    """Build one GeoJSON Feature per instance.

    ``measurements`` is a pandas DataFrame indexed by instance id whose numeric columns become QuPath
    measurements (NaN is written as null); ``properties`` adds arbitrary extra properties per instance.
    """
    polys = instance_polygons(instances, simplify=simplify, offset=offset)
    table = None
    if measurements is not None and len(measurements):
        numeric = measurements.select_dtypes(include=["number", "bool"])
        table = {int(k): {c: _clean(v) for c, v in row.items()} for k, row in numeric.iterrows()}
    features = []
    for label, poly in polys.items():
        props: dict = {"objectType": "detection", "instance_id": int(label)}
        if classes is not None and label in classes:
            cid = int(classes[label])
            name = (class_names or {}).get(cid, f"class {cid}")
            props["classification"] = {"name": name, "color": list(class_color(cid, name))}
        meas = dict(table.get(int(label), {})) if table else {}
        if scores is not None and label in scores:
            meas["Detection probability"] = _clean(scores[label])
        if meas:
            props["measurements"] = meas
        if properties is not None and label in properties:
            props.update({k: _clean(v) for k, v in properties[label].items()})
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}:{offset[0]}:{offset[1]}:{label}")),
            "geometry": mapping(poly),
            "properties": props,
        })
    return features


def write_geojson(path: str | os.PathLike, features: Iterable[dict]) -> Path:
    """Write a FeatureCollection atomically; features are streamed, so a generator keeps memory flat."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for i, feature in enumerate(features):
            fh.write(",\n" if i else "\n")
            json.dump(feature, fh, allow_nan=False)
        fh.write("\n]}\n")
    return path
