"""LayoutDataset on the real shared datasets; write_layout_sample round trips; bad layout files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tifffile

from karyo.data.datasets import open_dataset
from karyo.data.layout import LayoutDataset, read_class_csv, write_layout_sample
from karyo.data.sample import Sample
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data


def _class_counts(ds):
    counts: dict[int, int] = {}
    for s in ds:
        for c in s.classes.values():
            counts[c] = counts.get(c, 0) + 1
    return counts


def test_nucls_counts_and_splits(shared_data):
    ds = LayoutDataset(shared_data / "nucls_examples")
    assert len(ds) == 15
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 10, "test": 5}
    assert ds.class_names == {1: "Non-Tumor", 2: "Tumor"}
    assert sum(s.n_instances for s in ds) == 640
    assert _class_counts(ds) == {1: 317, 2: 323}  # as README.md states
    s = ds[0]
    assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
    assert s.meta["split"] == ds.split_of(s.name)
    assert s.source.endswith(f"images/{s.name}.png")


def test_pannuke_demo_counts(shared_data):
    ds = LayoutDataset(shared_data / "pannuke_breast_demo")
    assert len(ds) == 25 and ds.splits.keys() == {"test"}
    assert _class_counts(ds) == {1: 216, 2: 415}


def test_consep_split_selection_and_ids(shared_data):
    root = shared_data / "consep"
    test = LayoutDataset(root, split="test")
    assert len(test) == 224 and all(i.startswith("test_") for i in test.ids)
    assert len(LayoutDataset(root, split="train")) == 432
    assert len(LayoutDataset(root, split=["train", "test"])) == 656
    picked = LayoutDataset(root, ids=["test_4_013", "test_4_012"])
    assert picked.ids == ["test_4_013", "test_4_012"]
    s = picked[1]
    assert s.name == "test_4_012" and s.n_instances == 33
    assert sorted(s.classes.values()).count(4) == 12  # 4 other, 1 inflammatory, 16 epithelial, 12 spindle
    inst, classes = picked.labels(1)
    np.testing.assert_array_equal(inst, s.instances)
    assert classes == s.classes
    assert picked[-1].name == "test_4_012"
    assert [x.name for x in test[2:4]] == test.ids[2:4]
    with pytest.raises(InputError, match=r"split\.csv: no split named 'val'; splits here: test, train"):
        LayoutDataset(root, split="val")
    with pytest.raises(InputError, match=r"unknown id\(s\) \['nope'\]"):
        LayoutDataset(root, ids=["nope"])


def test_monuseg_and_fluo(shared_data):
    mon = LayoutDataset(shared_data / "monuseg_test")
    assert [mon[0].n_instances, mon[1].n_instances] == [575, 818]  # SOURCE.txt per-image counts
    assert mon.class_names is None and mon[0].classes is None
    fluo = open_dataset(shared_data / "dsb2018_fluo_subset")
    assert isinstance(fluo, LayoutDataset) and len(fluo) == 120
    assert fluo[0].image.shape[2] == 1


def test_write_layout_roundtrip(tmp_path, shared_data):
    src = LayoutDataset(shared_data / "nucls_examples", ids=["train_1", "test_2"])
    for s in src:
        s.tissue, s.mpp = "Breast", 0.2
        write_layout_sample(tmp_path, s)
    back = LayoutDataset(tmp_path)
    assert back.ids == ["train_1", "test_2"]
    assert back.splits == {"train": ["train_1"], "test": ["test_2"]}
    assert back.class_names == src.class_names
    for a, b in zip(src, back, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.instances, b.instances)
        assert a.classes == b.classes
        assert (b.tissue, b.mpp) == ("Breast", 0.2)
    # Writing a sample again replaces its row and files.
    s = src[0]
    s.classes = {k: 3 - v for k, v in s.classes.items()}
    write_layout_sample(tmp_path, s, split="val")
    again = LayoutDataset(tmp_path)
    assert len(again) == 2 and again.split_of("train_1") == "val"
    assert again[0].classes == s.classes


def test_write_layout_multichannel_and_labels_only(tmp_path, shared_data):
    real = LayoutDataset(shared_data / "consep", ids=["test_4_012"])[0]
    stack = np.dstack([real.image, real.image[..., :1]]).astype(np.uint16) * 200
    s = Sample(image=stack, instances=real.instances, name="mx", channel_names=("R", "G", "B", "DAPI"), mpp=0.5)
    write_layout_sample(tmp_path / "mx", s)
    back = LayoutDataset(tmp_path / "mx")[0]
    assert back.source.endswith("images/mx.tif")
    np.testing.assert_array_equal(back.image, stack)
    assert back.channel_names == ("R", "G", "B", "DAPI") and back.mpp == 0.5
    # Predictions: labels only, read without an image.
    pred = Sample(image=real.image, instances=real.instances, classes=real.classes, name="test_4_012",
                  class_names=real.class_names)
    write_layout_sample(tmp_path / "pred", pred, image=False)
    ds = LayoutDataset(tmp_path / "pred")
    inst, classes = ds.labels(0)
    np.testing.assert_array_equal(inst, real.instances)
    assert classes == real.classes
    with pytest.raises(InputError, match=r"images/test_4_012\.png: image file not found"):
        ds[0]


def test_write_layout_refuses_conflicting_class_names(tmp_path, shared_data):
    s = LayoutDataset(shared_data / "nucls_examples", ids=["test_1"])[0]
    write_layout_sample(tmp_path, s)
    s2 = Sample(image=s.image, instances=s.instances, classes=s.classes, name="b",
                class_names={1: "Tumor", 2: "Non-Tumor"})
    with pytest.raises(InputError, match=r"classes\.json: holds class names"):
        write_layout_sample(tmp_path, s2)


# --- bad layout files --------------------------------------------------------------------------------------

@pytest.fixture
def small(tmp_path, shared_data):
    """Two real NuCLS samples written to a fresh layout folder, to be damaged by each test."""
    for s in LayoutDataset(shared_data / "nucls_examples", ids=["test_1", "test_2"]):
        write_layout_sample(tmp_path, s)
    return tmp_path


def test_missing_class_file(small):
    (small / "classes/test_2.csv").unlink()
    ds = LayoutDataset(small)
    assert ds[0].n_instances == 20
    with pytest.raises(InputError, match=r"classes/test_2\.csv: class file not found \(classes\.json exists"):
        ds[1]


def test_unknown_class_id(small):
    path = small / "classes/test_1.csv"
    lines = path.read_text().splitlines()
    lines[3] = "3,7"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"classes/test_1\.csv: unknown class id\(s\) \[7\]; known: \[1, 2\]"):
        LayoutDataset(small)[0]


@pytest.mark.parametrize(("text", "problem"), [
    ("id,class\n1,1\n", r"class CSV header must be 'instance_id,class_id', got 'id,class'"),
    ("instance_id,class_id\n1,one\n", r"class CSV holds a non-integer value"),
    ("instance_id,class_id\n1,1,1\n", r"line 2: expected 2 fields, got 3"),
    ("instance_id,class_id\n1,1\n1,2\n", r"instance id\(s\) listed more than once: \[1\]"),
    ("instance_id,class_id\n999,1\n", r"class rows name instance id\(s\) absent from the instance map: \[999\]"),
])
def test_malformed_class_csv(small, text, problem):
    (small / "classes/test_1.csv").write_text(text)
    with pytest.raises(InputError, match=r"classes/test_1\.csv: " + problem):
        LayoutDataset(small)[0]


def test_instance_map_shape_differs(small):
    from karyo.data.io import read_instances, write_instances

    inst = read_instances(small / "instances/test_1.png")
    write_instances(small / "instances/test_1.png", inst[:, :100])
    with pytest.raises(InputError, match=r"instances/test_1\.png: instance map shape 256×100 differs from image"):
        LayoutDataset(small)[0]


def test_negative_and_fractional_instance_tiff(small):
    from karyo.data.io import read_instances

    inst = read_instances(small / "instances/test_1.png")
    (small / "instances/test_1.png").unlink()
    tifffile.imwrite(small / "instances/test_1.tif", np.where(inst == 2, -2, inst))
    with pytest.raises(InputError, match=r"instances/test_1\.tif: instance map holds negative ids"):
        LayoutDataset(small)[0]
    tifffile.imwrite(small / "instances/test_1.tif", inst.astype(np.float32) / 2)
    with pytest.raises(InputError, match=r"instances/test_1\.tif: instance map holds non-integer values"):
        LayoutDataset(small)[0]


def test_missing_instance_map_and_truncated_image(small):
    (small / "instances/test_2.png").unlink()
    with pytest.raises(InputError, match=r"instances/test_2\.png: instance map not found"):
        LayoutDataset(small)[1]
    data = (small / "images/test_1.png").read_bytes()
    (small / "images/test_1.png").write_bytes(data[:500])
    with pytest.raises(InputError, match=r"images/test_1\.png: cannot decode image"):
        LayoutDataset(small)[0]


def test_bad_split_csv_and_duplicate_images(small):
    (small / "split.csv").write_text("name,split\ntest_1,test\n")
    with pytest.raises(InputError, match=r"split\.csv: needs an 'id' column"):
        LayoutDataset(small)
    (small / "split.csv").write_text("id,split\ntest_1,test\ntest_1,train\n")
    with pytest.raises(InputError, match=r"split\.csv: id 'test_1' is listed more than once"):
        LayoutDataset(small)
    (small / "split.csv").unlink()
    ds = LayoutDataset(small)  # without split.csv: the image names, no splits
    assert ds.ids == ["test_1", "test_2"] and ds.splits == {}
    tifffile.imwrite(small / "images/test_1.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"two files for id 'test_1'"):
        LayoutDataset(small)


def test_class_zero_means_unclassified():
    inst = np.zeros((8, 8), np.int32)
    inst[1:3, 1:3], inst[5:7, 5:7] = 1, 2
    s = Sample(np.zeros((8, 8, 3), np.uint8), inst, classes={1: 2, 2: 0}, class_names={1: "a", 2: "b"})
    assert s.classes == {1: 2}
    assert s.type_map()[6, 6] == 0 and s.type_map()[2, 2] == 2


def test_class_csv_checked_to_cover_its_instance_map(tmp_path):
    """``complete``: a class CSV that lists only some of the map's nuclei is another image's, not a partial one."""
    instances = np.zeros((8, 8), np.int32)
    instances[0:2, 0:2], instances[4:6, 4:6], instances[6:8, 0:2] = 1, 2, 3
    path = tmp_path / "c.csv"
    path.write_text("instance_id,class_id\n1,2\n2,0\n3,1\n")
    assert read_class_csv(path, instances, complete=True) == {1: 2, 3: 1}  # class 0: listed, unclassified
    path.write_text("instance_id,class_id\n1,2\n")
    assert read_class_csv(path, instances) == {1: 2}  # datasets may leave nuclei unclassified
    with pytest.raises(InputError, match=r"c\.csv: lists 1 instance\(s\) but the instance map holds 3; no row for "
                                         r"id\(s\) \[2, 3\]"):
        read_class_csv(path, instances, complete=True)


def test_ome_tiff_ids_and_split_csv_resolution_are_checked(tmp_path):
    """`images/mk1.ome.tif` is id mk1 (as `karyo segment` names its outputs); an implausible mpp in split.csv is
    refused naming the file, as --mpp is."""
    from karyo.data.io import write_instances

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    inst = np.zeros((16, 16), np.int32)
    inst[4:9, 4:9] = 1
    tifffile.imwrite(root / "images" / "mk1.ome.tif", np.zeros((2, 16, 16), np.uint16), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45"]}})
    write_instances(root / "instances" / "mk1.png", inst)
    ds = LayoutDataset(root)
    assert ds.ids == ["mk1"] and ds[0].channel_names == ("DAPI", "CD45")
    (root / "split.csv").write_text("id,split,mpp\nmk1,train,-0.25\n")
    with pytest.raises(InputError, match=r"split\.csv: mpp -0\.25 µm/px is outside the plausible range"):
        LayoutDataset(root)[0]


def test_a_sample_prints_one_line():
    m = np.zeros((8, 9), np.int32)
    m[1:3, 1:3] = 1
    sample = Sample(image=np.zeros((8, 9, 2), np.uint16), instances=m, name="t", mpp=0.25,
                    channel_names=("DAPI", "CD45"))
    assert repr(sample) == "<Sample 't': 9×8 px × 2 uint16, 1 nucleus, mpp 0.25, channels ('DAPI', 'CD45')>"
    assert repr(Sample(image=np.zeros((4, 4, 3), np.uint8))) == "<Sample: 4×4 px × 3 uint8, no annotation>"


def test_split_csv_mpp_that_differs_from_the_files_is_used_with_a_warning(tmp_path):
    """split.csv wins over what the file states (a user fixing a wrong header), but the disagreement is said."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    tifffile.imwrite(root / "images" / "a.ome.tif", np.zeros((3, 16, 16), np.uint8), ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    (root / "split.csv").write_text("id,split,mpp\na,train,0.25\n")
    with pytest.warns(UserWarning, match=r"split\.csv: id 'a': mpp 0\.25 was used; the file states 0\.5 µm/px "
                                         r"\(a\.ome\.tif\)"):
        assert LayoutDataset(root)[0].mpp == 0.25
    (root / "split.csv").write_text("id,split,mpp\na,train,0.5\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LayoutDataset(root)[0].mpp == 0.5
