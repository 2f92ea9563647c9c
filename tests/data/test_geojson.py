"""QuPath GeoJSON built from the contours of real NuCLS nuclei (QuPath's pixel-edge coordinates)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import find_contours

from karyo.data.datasets import detect_format, open_dataset
from karyo.data.geojson import GeoJsonFolder, read_geojson
from karyo.data.layout import LayoutDataset
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data

CLASS_MAP = {"Non-Tumor": 1, "Tumor": 2}


def ring(mask: np.ndarray) -> list[list[float]]:
    """The outer contour of a mask as a closed QuPath ring: pixel centres sit at +0.5."""
    contour = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1 + 0.5
    xy = np.column_stack([contour[:, 1], contour[:, 0]]).round(3)
    return [*xy.tolist(), xy[0].tolist()]


def feature(rings, name=None, object_type="detection", multi=False, nucleus=None):
    geom = {"type": "MultiPolygon" if multi else "Polygon", "coordinates": rings}
    props = {"objectType": object_type}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    out = {"type": "Feature", "id": "x", "geometry": geom, "properties": props}
    if nucleus is not None:
        out["nucleusGeometry"] = {"type": "Polygon", "coordinates": nucleus}
    return out


def collection(sample) -> dict:
    names = {v: k for k, v in CLASS_MAP.items()}
    feats = [feature([[[0, 0], [256, 0], [256, 256], [0, 256], [0, 0]]], "Tumor", "annotation")]  # tissue region
    feats += [feature([ring(sample.instances == k)], names[sample.classes[k]])
              for k in range(1, sample.n_instances + 1)]
    return {"type": "FeatureCollection", "features": feats}


def iou_per_instance(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    both = np.bincount(a[(a == b) & (a > 0)], minlength=n + 1)[1:]
    union = np.bincount(a.ravel(), minlength=n + 1)[1:] + np.bincount(b.ravel(), minlength=n + 1)[1:] - both
    return both / union


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def nucls(shared_data):
    return LayoutDataset(shared_data / "nucls_examples", ids=["test_3", "train_2"])


def test_feature_collection_and_bare_list(tmp_path, nucls):
    for sample in nucls:
        n = sample.n_instances
        assert all(ndi.label(sample.instances == k)[1] == 1 for k in range(1, n + 1))
        data = collection(sample)
        (tmp_path / "fc.geojson").write_text(json.dumps(data))
        (tmp_path / "list.geojson").write_text(json.dumps(data["features"]))
        for name in ("fc.geojson", "list.geojson"):
            inst, classes, names = read_geojson(tmp_path / name, sample.shape, CLASS_MAP)
            assert inst.max() == n  # the tissue annotation was skipped
            assert iou_per_instance(inst, sample.instances, n).min() > 0.9
            assert classes == sample.classes
            assert names == {1: "Non-Tumor", 2: "Tumor"}
        # Without a class map, ids follow the sorted names; with every object type, the annotation is painted
        # first and the nuclei over it.
        _, classes, names = read_geojson(tmp_path / "fc.geojson", sample.shape)
        assert names == {1: "Non-Tumor", 2: "Tumor"} and classes == sample.classes
        inst, _, _ = read_geojson(tmp_path / "fc.geojson", sample.shape, object_types=None)
        assert inst.max() == n + 1 and np.all(inst > 0)
    # Hand-drawn nuclei are annotations: with no detections in the file, annotations are the nuclei.
    for f in data["features"][1:]:
        f["properties"]["objectType"] = "annotation"
    (tmp_path / "hand.geojson").write_text(json.dumps(data["features"][1:]))
    inst, classes, _ = read_geojson(tmp_path / "hand.geojson", sample.shape, CLASS_MAP)
    assert inst.max() == n and classes == sample.classes


def test_holes_multipolygons_and_cells(tmp_path, nucls):
    s = nucls[0]
    big = np.argsort(np.bincount(s.instances.ravel())[1:])[::-1][:3] + 1  # the three largest nuclei
    a, b, c = (s.instances == k for k in big)
    core = ndi.binary_erosion(a, iterations=3)
    assert core.sum() > 10
    feats = [
        feature([ring(a), ring(core)], "Tumor"),                       # a nucleus with a hole
        feature([[ring(b)], [ring(c)]], "Non-Tumor", multi=True),        # two parts, one object
        feature([ring(ndi.binary_dilation(b, iterations=6))], "Tumor", "cell", nucleus=[ring(b)]),
    ]
    (tmp_path / "x.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    inst, classes, _ = read_geojson(tmp_path / "x.geojson", s.shape, CLASS_MAP)
    assert mask_iou(inst == 1, a & ~core) > 0.9
    assert not np.any(inst[core])
    # The cell's nucleus (b) was painted last, over the MultiPolygon's first part.
    assert mask_iou(inst == 2, c) > 0.9
    assert mask_iou(inst == 3, b) > 0.9
    assert classes == {1: 2, 2: 1, 3: 2}
    cells, _, _ = read_geojson(tmp_path / "x.geojson", s.shape, CLASS_MAP, nucleus=False)
    assert (cells == 3).sum() > b.sum() + 100  # the whole cell outline


def test_folder_and_open_dataset(tmp_path, nucls, shared_data):
    for s in nucls:
        shutil.copy(shared_data / "nucls_examples/images" / f"{s.name}.png", tmp_path)
        (tmp_path / f"{s.name}.geojson").write_text(json.dumps(collection(s)))
    assert detect_format(tmp_path) == "geojson"
    ds = open_dataset(tmp_path)
    assert isinstance(ds, GeoJsonFolder) and ds.ids == ["test_3", "train_2"]
    assert ds.class_names == {1: "Non-Tumor", 2: "Tumor"}
    for got, ref in zip(ds, nucls, strict=True):
        np.testing.assert_array_equal(got.image, ref.image)
        assert got.classes == ref.classes
        assert iou_per_instance(got.instances, ref.instances, ref.n_instances).min() > 0.9


def test_bad_geojson(tmp_path, nucls):
    s = nucls[0]
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(collection(s))[:500])
    with pytest.raises(InputError, match=r"a\.geojson: cannot read GeoJSON"):
        read_geojson(path, s.shape)
    path.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(InputError, match=r"a\.geojson: expected a FeatureCollection, a Feature or a list"):
        read_geojson(path, s.shape)
    path.write_text(json.dumps(collection(s)))
    with pytest.raises(InputError, match=r"a\.geojson: classification name\(s\) \['Non-Tumor'\] not in the class map"):
        read_geojson(path, s.shape, {"Tumor": 1})
    bad = collection(s)
    bad["features"][1]["geometry"]["coordinates"] = [[[1, 2], [3]]]
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"a\.geojson: feature 1: malformed Polygon coordinates"):
        read_geojson(path, s.shape)
