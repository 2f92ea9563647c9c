import json

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import shape
from skimage.draw import disk

from karyo.export.geojson import nucleus_features, write_geojson
from karyo.export.polygons import instance_polygons


def _two_nuclei():
    m = np.zeros((64, 64), np.int32)
    m[5:15, 10:30] = 3  # rectangle 10×20
    rr, cc = disk((40, 40), 9, shape=m.shape)
    m[rr, cc] = 7
    return m


def test_polygons_follow_pixel_edges():
    m = _two_nuclei()
    polys = instance_polygons(m)
    assert sorted(polys) == [3, 7]
    rect = polys[3]
    # Marching squares cuts each corner by half a pixel triangle: area = 200 - 4 * 0.125.
    assert rect.area == pytest.approx(200 - 0.5)
    assert rect.bounds == (10.0, 5.0, 30.0, 15.0)
    # Disc: polygon area within half a pixel per boundary pixel of the pixel count.
    n = int((m == 7).sum())
    assert abs(polys[7].area - n) < 0.5 * 4 * 9


def test_table_centroids_are_pixel_indices_half_a_pixel_from_the_polygons():
    """The documented convention (README, ``attributes.names``): rows give pixel indices, polygons pixel edges."""
    from karyo.infer.result import SegmentationResult

    m = _two_nuclei()
    table = SegmentationResult(instances=m).table().set_index("instance_id")
    polys = instance_polygons(m)
    assert table.loc[3, ["centroid_x", "centroid_y"]].tolist() == [19.5, 9.5]  # mean of columns 10..29, rows 5..14
    for label in (3, 7):
        c = polys[label].centroid
        assert c.x == pytest.approx(table.loc[label, "centroid_x"] + 0.5, abs=0.02)
        assert c.y == pytest.approx(table.loc[label, "centroid_y"] + 0.5, abs=0.02)


def test_polygon_keeps_holes_and_offset():
    m = np.zeros((20, 20), np.int32)
    m[2:18, 2:18] = 1
    m[8:12, 8:12] = 0
    poly = instance_polygons(m, offset=(100, 50))[1]
    assert len(poly.interiors) == 1
    assert poly.bounds == (102.0, 52.0, 118.0, 68.0)
    assert poly.area < 256 - 16 + 1


def test_features_carry_class_score_measurements(tmp_path):
    m = _two_nuclei()
    meas = pd.DataFrame({"Size.Area": [200.0, np.nan], "Flag.Valid": [True, False]}, index=[3, 7])
    feats = nucleus_features(m, classes={3: 1, 7: 2}, class_names={1: "tumor", 2: "inflammatory"},
                             scores={3: 0.9}, measurements=meas, image_name="x")
    by_id = {f["properties"]["instance_id"]: f for f in feats}
    assert by_id[3]["properties"]["objectType"] == "detection"
    assert by_id[3]["properties"]["classification"] == {"name": "tumor", "color": [255, 0, 0]}
    assert by_id[3]["properties"]["measurements"] == {"Size.Area": 200.0, "Flag.Valid": 1, "Detection probability": 0.9}
    # QuPath reads every measurement as a double: NaN is left out, a flag is 0/1, never null or a boolean
    assert by_id[7]["properties"]["measurements"] == {"Flag.Valid": 0}
    path = write_geojson(tmp_path / "a.geojson", iter(feats))
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    assert shape(data["features"][0]["geometry"]).is_valid
    assert not list(tmp_path.glob(".*part*"))
    # class 0 is "unclassified" (e.g. a click no detection classified): no QuPath class named "class 0"
    unclassified = nucleus_features(m, classes={3: 0, 7: 2}, class_names={2: "inflammatory"})
    assert ["classification" in f["properties"] for f in unclassified] == [False, True]


def test_geojson_write_failure_leaves_nothing(tmp_path):
    def broken():
        yield {"type": "Feature", "geometry": None, "properties": {}}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_geojson(tmp_path / "b.geojson", broken())
    assert list(tmp_path.iterdir()) == []


def test_single_pixel_and_line_instances_get_polygons():
    m = np.zeros((10, 10), np.int32)
    m[2, 2] = 1
    m[5, 1:8] = 2
    polys = instance_polygons(m)
    # A lone pixel becomes the diamond through its edge midpoints, centred on the pixel centre.
    assert polys[1].area == pytest.approx(0.5)
    assert (polys[1].centroid.x, polys[1].centroid.y) == pytest.approx((2.5, 2.5))
    assert polys[2].area == pytest.approx(7.0 - 0.5)
