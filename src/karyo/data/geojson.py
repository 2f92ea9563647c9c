"""QuPath GeoJSON nuclei (reading) and the polygon rasteriser the polygon formats share.

QuPath exports a FeatureCollection (or a bare list of Features); each nucleus is a Polygon or MultiPolygon
whose ``properties.objectType`` is ``detection`` or ``cell`` (a cell also carries ``nucleusGeometry``), or
``annotation`` when drawn by hand, and whose ``properties.classification.name`` is its class. QuPath puts
pixel edges on integer coordinates (pixel (r, c) covers [c, c+1)×[r, r+1)), so a pixel belongs to a polygon
when its centre (c+0.5, r+0.5) lies inside.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

from karyo.data.io import IMAGE_SUFFIXES, read_image_meta
from karyo.data.sample import Sample, SampleSequence, relabel_sequential
from karyo.errors import InputError

QUPATH_PIXEL_CENTRE = 0.5  # QuPath coordinate of a pixel's centre relative to its index
NUCLEUS_OBJECT_TYPES = ("detection", "cell")


def polygon_pixels(rings: Sequence[np.ndarray], shape: tuple[int, int], centre: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels inside ``rings[0]`` (x, y vertices) and outside the holes ``rings[1:]``.

    ``centre`` is the coordinate of pixel (0, 0)'s centre: 0 for MoNuSeg/COCO-style vertices, 0.5 for QuPath.
    """
    exterior = np.asarray(rings[0], dtype=np.float64)
    rr, cc = draw_polygon(exterior[:, 1] - centre, exterior[:, 0] - centre, shape)
    if len(rings) == 1 or rr.size == 0:
        return rr, cc
    r0, c0 = rr.min(), cc.min()
    keep = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), dtype=bool)
    keep[rr - r0, cc - c0] = True
    for hole in rings[1:]:
        hole = np.asarray(hole, dtype=np.float64)
        hr, hc = draw_polygon(hole[:, 1] - centre - r0, hole[:, 0] - centre - c0, keep.shape)
        keep[hr, hc] = False
    rr, cc = np.nonzero(keep)
    return rr + r0, cc + c0


def paint_instances(shapes: Iterable[Sequence[Sequence[np.ndarray]]], shape: tuple[int, int], centre: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Paint polygons in order (later ones overwrite earlier ones); each item is one instance given as a list
    of polygons (a MultiPolygon), each polygon a list of rings.

    Returns the instance map relabelled 1..N (instances left without pixels dropped) and, for each input
    item, its final id (0 when dropped).
    """
    canvas = np.zeros(shape, dtype=np.int32)
    n = 0
    for n, polygons in enumerate(shapes, start=1):
        for rings in polygons:
            rr, cc = polygon_pixels(rings, shape, centre)
            canvas[rr, cc] = n
    instances, lut = relabel_sequential(canvas, n)
    return instances, lut[1:]


def read_geojson(path: str | os.PathLike, shape: tuple[int, int], class_map: Mapping[str, int] | None = None,
                 object_types: Sequence[str] | str | None = "auto", nucleus: bool = True
                 ) -> tuple[np.ndarray, dict[int, int], dict[int, str]]:
    """Rasterise QuPath GeoJSON nuclei → (instance map 1..N, {id: class}, {class id: name}).

    ``class_map`` maps classification names to class ids (a name missing from it is an error); without it,
    ids 1..C follow the sorted names found. Features whose ``objectType`` is not in ``object_types`` are
    skipped (``None`` keeps all; features without an objectType are always kept). The default ``"auto"``
    keeps detections and cells when the file has any — QuPath's region annotations around them are not
    nuclei — and otherwise annotations, as hand-drawn nuclei are. For QuPath cells, ``nucleus=True`` takes
    ``nucleusGeometry`` instead of the cell boundary. Holes are respected; features are painted in file
    order, later over earlier.
    """
    path = Path(path)
    features = _read_features(path)
    types = [(f.get("properties") or {}).get("objectType", f.get("objectType")) for f in features]
    if object_types == "auto":
        object_types = NUCLEUS_OBJECT_TYPES if set(types) & set(NUCLEUS_OBJECT_TYPES) else ("annotation",)
    kept: list[tuple[list[list[np.ndarray]], str | None]] = []
    for k, (feat, otype) in enumerate(zip(features, types, strict=True)):
        props = feat.get("properties") or {}
        if object_types is not None and otype is not None and otype not in object_types:
            continue
        geom = feat.get("nucleusGeometry") if nucleus and feat.get("nucleusGeometry") else feat.get("geometry")
        polygons = _polygons(geom, path, k)
        if polygons:
            kept.append((polygons, _class_name(props)))
    names = sorted({c for _, c in kept if c is not None})
    if class_map is None:
        class_map = {name: i for i, name in enumerate(names, start=1)}
    else:
        unknown = [c for c in names if c not in class_map]
        if unknown:
            raise InputError(path, f"classification name(s) {unknown} not in the class map {dict(class_map)}")
    instances, final = paint_instances((p for p, _ in kept), shape, QUPATH_PIXEL_CENTRE)
    classes = {int(i): int(class_map[c]) for i, (_, c) in zip(final.tolist(), kept, strict=True)
               if i > 0 and c is not None}
    return instances, classes, {int(v): k for k, v in sorted(class_map.items(), key=lambda kv: kv[1])}


def geojson_class_names(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Sorted classification names used in some GeoJSON files (to build one class map for a folder)."""
    names: set[str] = set()
    for path in paths:
        for feat in _read_features(Path(path)):
            name = _class_name(feat.get("properties") or {})
            if name is not None:
                names.add(name)
    return sorted(names)


def _read_features(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(path, "GeoJSON file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"cannot read GeoJSON ({exc})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) for f in data):
        raise InputError(path, "expected a FeatureCollection, a Feature or a list of Features")
    return data


def _polygons(geom: dict | None, path: Path, k: int) -> list[list[np.ndarray]]:
    """A Polygon/MultiPolygon as a list of polygons, each a list of (K×2 x, y) rings; other types → []."""
    if not geom:
        return []
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind not in ("Polygon", "MultiPolygon"):
        return []
    polys = [coords] if kind == "Polygon" else coords
    try:
        out = [[np.asarray(ring, dtype=np.float64)[:, :2] for ring in poly] for poly in polys]
    except (TypeError, ValueError, IndexError):
        raise InputError(path, f"feature {k}: malformed {kind} coordinates") from None
    return [rings for rings in out if rings and len(rings[0]) >= 3]


def _class_name(props: dict) -> str | None:
    cls = props.get("classification")
    if isinstance(cls, dict):
        return cls.get("name")
    return cls if isinstance(cls, str) else None


class GeoJsonFolder(SampleSequence):
    """Images with a QuPath GeoJSON of the same stem beside them (``<id>.png`` + ``<id>.geojson``/.json).

    One class map serves the whole folder: ``class_map`` or the sorted names found in all its files.
    """

    def __init__(self, root: str | os.PathLike, class_map: Mapping[str, int] | None = None,
                 object_types: Sequence[str] | str | None = "auto"):
        self.root = Path(root)
        self._pairs = geojson_pairs(self.root)
        if not self._pairs:
            raise InputError(self.root, "no image with a .geojson of the same name")
        self._ids = [img.stem for img, _ in self._pairs]
        if class_map is None:
            class_map = {n: i for i, n in enumerate(geojson_class_names(g for _, g in self._pairs), start=1)}
        self.class_map = dict(class_map)
        self.object_types = object_types
        self.class_names = {v: k for k, v in sorted(self.class_map.items(), key=lambda kv: kv[1])} or None

    def _load(self, i: int) -> Sample:
        img_path, geo_path = self._pairs[i]
        image, meta = read_image_meta(img_path)
        instances, classes, _ = read_geojson(geo_path, image.shape[:2], self.class_map, self.object_types)
        return Sample(image=image, instances=instances, classes=classes, name=img_path.stem,
                      class_names=self.class_names, mpp=meta["mpp"], channel_names=meta["channel_names"],
                      source=str(img_path))


def geojson_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, GeoJSON) pairs of a folder, matched by stem."""
    if not root.is_dir():
        return []
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    geo = {p.stem: p for p in files if p.suffix.lower() == ".geojson"}
    return [(p, geo[p.stem]) for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in geo]
