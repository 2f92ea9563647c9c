import json

import numpy as np
import pandas as pd
import pytest

from karyo.data.io import read_image, read_instances
from karyo.errors import InputError
from karyo.export.overlay import draw_overlay
from karyo.export.writers import save_result
from karyo.infer.result import SegmentationResult


def _result():
    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12] = 1
    inst[16:28, 16:28] = 2
    return SegmentationResult(inst, classes={1: 1, 2: 2}, scores={1: 0.5, 2: 0.75},
                              class_names={1: "neoplastic", 2: "inflammatory"}, name="t")


def test_overlay_colours_boundaries_by_class():
    img = np.full((32, 32, 3), 128, np.uint8)
    ov = draw_overlay(img, _result().instances, {1: 1, 2: 2}, {1: "neoplastic", 2: "inflammatory"})
    assert tuple(ov[4, 4]) == (255, 0, 0)  # boundary of nucleus 1
    assert tuple(ov[16, 20]) == (0, 200, 0)  # boundary of nucleus 2
    assert tuple(ov[8, 8]) == (128, 128, 128)  # inside untouched
    assert tuple(ov[0, 0]) == (128, 128, 128)


def test_overlay_of_grayscale_16bit():
    img = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32, 1) * 60)
    ov = draw_overlay(img, _result().instances)
    assert ov.shape == (32, 32, 3) and ov.dtype == np.uint8
    assert tuple(ov[4, 4]) == (255, 255, 0)


def test_save_result_layout_round_trip(tmp_path):
    res = _result()
    img = np.zeros((32, 32, 3), np.uint8)
    written = save_result(res, tmp_path, img)
    assert set(written) == {"instances", "classes", "class_names", "table", "overlay", "geojson"}
    np.testing.assert_array_equal(read_instances(written["instances"]), res.instances)
    classes = pd.read_csv(written["classes"])
    assert list(classes.columns) == ["instance_id", "class_id"]
    assert classes.class_id.tolist() == [1, 2]
    table = pd.read_csv(written["table"])
    assert table.class_name.tolist() == ["neoplastic", "inflammatory"]
    assert table.score.tolist() == [0.5, 0.75]
    assert json.loads(written["class_names"].read_text()) == {"1": "neoplastic", "2": "inflammatory"}
    assert read_image(written["overlay"]).shape == (32, 32, 3)
    assert len(json.loads(written["geojson"].read_text())["features"]) == 2


def test_table_values():
    t = _result().table()
    assert t.instance_id.tolist() == [1, 2]
    assert t.area.tolist() == [64, 144]
    np.testing.assert_allclose(t.centroid_x, [7.5, 21.5])
    assert t[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].iloc[1].tolist() == [16, 16, 28, 28]
    empty = SegmentationResult(np.zeros((4, 4), np.int32)).table()
    assert len(empty) == 0 and "centroid_x" in empty.columns


def test_save_result_without_nuclei_and_over_an_earlier_run(tmp_path):
    """A classifying model that finds nothing still writes a (header-only) class CSV, and a rerun into the same
    folder leaves no earlier class CSV beside maps it does not describe (``karyo evaluate`` would pair them)."""
    img = np.zeros((32, 32, 3), np.uint8)
    save_result(_result(), tmp_path, img, stem="a")
    assert len(pd.read_csv(tmp_path / "classes" / "a.csv")) == 2
    nothing = SegmentationResult(np.zeros((32, 32), np.int32), class_names={1: "neoplastic", 2: "inflammatory"})
    written = save_result(nothing, tmp_path, img, stem="a")
    empty = pd.read_csv(written["classes"])
    assert list(empty.columns) == ["instance_id", "class_id"] and len(empty) == 0
    unclassified = SegmentationResult(_result().instances)  # e.g. a model without classes, rerun into `tmp_path`
    written = save_result(unclassified, tmp_path, img, stem="a")
    assert "classes" not in written and not (tmp_path / "classes" / "a.csv").exists()


def test_result_save_mirrors_the_cli_and_repr_is_a_summary(tmp_path):
    res = _result()
    written = res.save(tmp_path, np.zeros((32, 32, 3), np.uint8))
    assert set(written) == {"instances", "classes", "class_names", "table", "overlay", "geojson"}
    assert written["instances"] == tmp_path / "instances" / "t.png"
    assert set(res.save(tmp_path / "b", outputs=["instances"])) == {"instances"}
    assert set(res.save(tmp_path / "s", outputs="table, geojson")) == {"table", "geojson"}  # as --outputs reads it
    with pytest.raises(InputError, match="outputs names nothing to write"):
        res.save(tmp_path / "e", outputs="")
    with pytest.raises(InputError, match="no name to write its files under: pass stem="):
        SegmentationResult(res.instances).save(tmp_path / "c")  # not silently as image.*
    assert not (tmp_path / "c").exists()
    assert repr(res) == "<SegmentationResult 't': 2 nuclei in 32×32 px, {'inflammatory': 1, 'neoplastic': 1}, model ''>"


def test_known_resolution_adds_areas_in_square_microns(tmp_path):
    res = _result()
    assert "area_um2" not in res.table().columns
    res.mpp = 0.5
    table = res.table()
    assert table.area_um2.tolist() == [64 * 0.25, 144 * 0.25]
    assert list(table.columns).index("area_um2") == list(table.columns).index("area") + 1
    written = save_result(res, tmp_path, outputs=["geojson", "table"])
    features = json.loads(written["geojson"].read_text())["features"]
    assert [f["properties"]["measurements"]["Area µm^2"] for f in features] == [16.0, 36.0]
    assert "area_um2" in SegmentationResult(np.zeros((4, 4), np.int32), mpp=0.5).table().columns


def test_results_hold_plain_ints_and_print_short():
    """Whatever integer types a model used, the documented dicts hold int keys (json.dumps works), and a result
    with embeddings prints as one line."""
    import json

    from karyo.models.ivaan import IVAANResult

    m = np.zeros((6, 6), np.int32)
    m[1:3, 1:3] = 1
    res = IVAANResult(m, classes={np.int64(1): np.int32(2)}, scores={np.int64(1): np.float32(0.5)},
                      class_names={np.int64(2): "b"}, embeddings=np.zeros((1, 384), np.float32),
                      embedding_ids=np.array([1]), model="ivaan")
    assert json.dumps(res.classes) == '{"1": 2}' and type(next(iter(res.scores.values()))) is float
    assert repr(res) == "<IVAANResult: 1 nucleus in 6×6 px, {'b': 1}, model 'ivaan'>"


def test_save_names_files_by_the_image_id_and_refuses_paths(tmp_path):
    import os

    import numpy as np
    import pytest

    from karyo.errors import InputError
    from karyo.infer.result import SegmentationResult

    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 2:5] = 1
    result = SegmentationResult(inst, classes={1: 1}, scores={1: 0.9}, name="x.tif")
    result.save(tmp_path)
    assert os.listdir(tmp_path / "instances") == ["x.png"]  # the id evaluate pairs with ground truth x
    for bad in ("../escape", "sub/dir"):
        with pytest.raises(InputError, match="cannot be a file name"):
            result.save(tmp_path, stem=bad)
    with pytest.raises(InputError, match="the overlay needs the image"):
        result.save(tmp_path, outputs=["overlay"])


def test_result_gives_its_class_map_and_overlay_for_a_notebook(tmp_path):
    import numpy as np

    from karyo.data.io import read_image
    from karyo.infer.result import SegmentationResult

    inst = np.zeros((12, 12), np.int32)
    inst[1:5, 1:5], inst[6:11, 6:11] = 1, 2
    result = SegmentationResult(inst, classes={1: 2, 2: 1}, scores={1: 0.9, 2: 0.8}, name="n",
                                class_names={1: "tumour", 2: "immune"})
    cmap = result.class_map()
    assert cmap[2, 2] == 2 and cmap[8, 8] == 1 and cmap[0, 0] == 0
    image = np.full((12, 12, 3), 200, np.uint8)
    saved = result.save(tmp_path, image, outputs=["overlay"])
    np.testing.assert_array_equal(result.overlay(image), read_image(saved["overlay"]))  # as karyo segment draws it
    import pytest

    from karyo.errors import InputError

    with pytest.raises(InputError, match=r"the image \(12×10 px\) is not the one segmented \(12×12 px\)"):
        result.save(tmp_path / "wrong", image[:10])
    assert not (tmp_path / "wrong").exists()  # refused before anything was written
    with pytest.raises(InputError, match="is not the one segmented"):
        result.overlay(image[:10])
