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


def qupath_measurements(values: Mapping[str, object]) -> dict[str, float]:
    """Measurements as QuPath reads them: numbers only (it converts each to a double, so a null or a boolean stops
    the import). NaN (not measurable) is left out, as QuPath shows a missing measurement; booleans become 0/1."""
    out = {}
    for name, value in values.items():
        if isinstance(value, (bool, np.bool_, int, np.integer)):
            out[name] = int(value)
        elif value is not None and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def nucleus_features(instances: np.ndarray, *, classes: Mapping[int, int] | None = None,
                     class_names: Mapping[int, str] | None = None, scores: Mapping[int, float] | None = None,
                     measurements=None, properties: Mapping[int, Mapping] | None = None,
                     offset: tuple[float, float] = (0.0, 0.0), image_name: str = "",
                     simplify: float = 0.0) -> list[dict]:
    """Build one GeoJSON Feature per instance.

    ``measurements`` is a pandas DataFrame indexed by instance id whose numeric columns become QuPath
    measurements (:func:`qupath_measurements`: NaN left out, flags 0/1); ``properties`` adds arbitrary extra
    properties per instance.
    """
    polys = instance_polygons(instances, simplify=simplify, offset=offset)
    table = None
    if measurements is not None and len(measurements):
        numeric = measurements.select_dtypes(include=["number", "bool"])
        table = {int(k): qupath_measurements(row.to_dict()) for k, row in numeric.iterrows()}
    features = []
    for label, poly in polys.items():
        props: dict = {"objectType": "detection", "instance_id": int(label)}
        if classes is not None and int(classes.get(label, 0)):  # 0: unclassified, no QuPath class "class 0"
            cid = int(classes[label])
            name = (class_names or {}).get(cid, f"class {cid}")
            props["classification"] = {"name": name, "color": list(class_color(cid, name))}
        meas = dict(table.get(int(label), {})) if table else {}
        if scores is not None and label in scores:
            meas.update(qupath_measurements({"Detection probability": scores[label]}))
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


def geometry_feature(geometry, *, feature_id: str, class_id: int = 0, class_name: str | None = None,
                     measurements: Mapping[str, float] | None = None,
                     properties: Mapping[str, object] | None = None) -> dict:
    """One QuPath detection Feature from a shapely geometry (whole-slide export, where there is no instance map).

    ``class_id`` 0 means unclassified (no ``classification``); measurements as :func:`qupath_measurements`.
    """
    props: dict = {"objectType": "detection"}
    if class_id:
        name = class_name or f"class {class_id}"
        props["classification"] = {"name": name, "color": list(class_color(int(class_id), name))}
    if measurements:
        props["measurements"] = qupath_measurements(measurements)
    if properties:
        props.update({k: _clean(v) for k, v in properties.items()})
    return {"type": "Feature", "id": feature_id, "geometry": mapping(geometry), "properties": props}


class GeoJSONWriter:
    """A FeatureCollection written one feature at a time, so memory does not grow with the number of nuclei.

    Writes to ``path`` directly: callers that need atomicity write to a temporary path and rename it after
    :meth:`close` (as :func:`write_geojson` does). ``close`` completes the collection; a writer left unclosed
    leaves an invalid file, never a valid-looking truncated one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  (closed by close())
        self._fh.write('{"type": "FeatureCollection", "features": [')
        self.count = 0

    def write(self, feature: dict) -> None:
        # json.dumps runs the C encoder; json.dump(fh) would take the pure-Python path (10× slower)
        self._fh.write((",\n" if self.count else "\n") + json.dumps(feature, allow_nan=False))
        self.count += 1

    def close(self) -> Path:
        if not self._fh.closed:
            self._fh.write("\n]}\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        return self.path

    def abort(self) -> None:
        """Close without completing (the file is left invalid; the caller deletes it). Never raises: it runs while
        another error (often a full disk, which the close's flush would hit again) is being reported."""
        import contextlib

        with contextlib.suppress(Exception):
            self._fh.close()  # the handle is closed even when the flush inside it fails

    def __enter__(self) -> GeoJSONWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
