"""CoNSeP .mat labels and release folders, written in tmp from real CoNSeP patches of ../shared/data.

The shared patches carry the merged 4 classes. To write the original 7 types, the merge is inverted by a
fixed rule on the instance id k: epithelial (3) → 3 if k is even else 4; spindle-shaped (4) → 5 + k % 3;
other and inflammatory stay 1 and 2. Merging those types again must give the shared classes back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from karyo.data.consep import CONSEP_NAMES, CONSEP_RAW_NAMES, ConsepFolder, read_consep_mat
from karyo.data.datasets import detect_format, open_dataset
from karyo.data.io import write_image
from karyo.data.layout import LayoutDataset
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data

IDS = {"train": ["train_1_004"], "test": ["test_4_012", "test_11_006"]}


def raw_types(classes: dict[int, int]) -> dict[int, int]:
    """Invert the 7→4 merge deterministically (see the module docstring)."""
    def raw(k: int, c: int) -> int:
        if c == 3:
            return 3 if k % 2 == 0 else 4
        if c == 4:
            return 5 + k % 3
        return c
    return {k: raw(k, c) for k, c in classes.items()}


def write_mat(path, sample, sparse: bool = False, with_inst_type: bool = True):
    """A HoVer-Net style label .mat (float64 arrays, as in the release) from a real sample.

    ``sparse`` scatters the ids (k → 7k + 3), as patches cut from the tiles have, with inst_type in ascending
    id order; otherwise ids are 1..N and inst_type row k-1 belongs to id k.
    """
    inst = sample.instances.astype(np.int64)
    ids = np.arange(1, inst.max() + 1)
    types = raw_types(sample.classes)
    inst_map = np.where(inst > 0, 7 * inst + 3, 0) if sparse else inst
    rows, cols = np.nonzero(inst)
    counts = np.bincount(inst[rows, cols], minlength=len(ids) + 1)[1:]
    centroid = np.column_stack([np.bincount(inst[rows, cols], cols, len(ids) + 1)[1:] / counts,
                                np.bincount(inst[rows, cols], rows, len(ids) + 1)[1:] / counts])
    lut = np.zeros(len(ids) + 1)
    lut[ids] = [types[k] for k in ids]
    mat = {"inst_map": inst_map.astype(np.float64), "type_map": lut[inst].astype(np.float64),
           "inst_centroid": centroid}
    if with_inst_type:
        mat["inst_type"] = np.array([types[k] for k in ids], dtype=np.float64).reshape(-1, 1)
    savemat(path, mat)


@pytest.fixture(scope="module")
def real(shared_data):
    return {id_: LayoutDataset(shared_data / "consep", ids=[id_])[0] for ids in IDS.values() for id_ in ids}


@pytest.mark.parametrize("sparse", [False, True])
def test_mat_merged_and_raw(tmp_path, real, sparse):
    s = real["test_4_012"]
    write_mat(tmp_path / "x.mat", s, sparse=sparse)
    inst, classes, names = read_consep_mat(tmp_path / "x.mat")
    np.testing.assert_array_equal(inst, s.instances)
    assert classes == s.classes and names == CONSEP_NAMES
    assert sorted(classes.values()).count(1) == 4  # the patch holds all four merged classes
    inst, raw, names = read_consep_mat(tmp_path / "x.mat", merge=False)
    assert raw == raw_types(s.classes) and names == CONSEP_RAW_NAMES
    assert set(raw.values()) >= {1, 2, 3, 4, 5, 6}


def test_mat_type_map_only(tmp_path, real):
    s = real["test_11_006"]
    write_mat(tmp_path / "x.mat", s, with_inst_type=False)
    inst, classes, _ = read_consep_mat(tmp_path / "x.mat")
    np.testing.assert_array_equal(inst, s.instances)
    assert classes == s.classes


def test_release_folder(tmp_path, real):
    for split, ids in IDS.items():
        for id_ in ids:
            # The release's images are PNG; an opaque RGBA image is read as RGB.
            rgba = np.dstack([real[id_].image, np.full(real[id_].shape, 255, np.uint8)])
            (tmp_path / split.capitalize() / "Images").mkdir(parents=True, exist_ok=True)
            (tmp_path / split.capitalize() / "Labels").mkdir(exist_ok=True)
            Image.fromarray(rgba).save(tmp_path / split.capitalize() / "Images" / f"{id_}.png")
            write_mat(tmp_path / split.capitalize() / "Labels" / f"{id_}.mat", real[id_])
    assert detect_format(tmp_path) == "consep"
    ds = open_dataset(tmp_path)
    assert ds.ids == ["test_11_006", "test_4_012", "train_1_004"]
    assert isinstance(ds, ConsepFolder) and ds.class_names == CONSEP_NAMES
    for s in ds:
        ref = real[s.name]
        np.testing.assert_array_equal(s.image, ref.image)
        np.testing.assert_array_equal(s.instances, ref.instances)
        assert s.classes == ref.classes and s.mpp == 0.25
        assert s.meta["split"] == ("train" if s.name.startswith("train") else "test")
    train = open_dataset(tmp_path, split="train")
    assert train.ids == ["train_1_004"]
    assert ConsepFolder(tmp_path / "Test", merge=False)[1].classes == raw_types(real["test_4_012"].classes)
    with pytest.raises(InputError, match=r"no split 'val'; splits here: \['test', 'train'\]"):
        open_dataset(tmp_path, split="val")


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_mats(tmp_path, real):
    s = real["test_4_012"]
    savemat(tmp_path / "noinst.mat", {"type_map": np.zeros((4, 4))})
    with pytest.raises(InputError, match=r"noinst\.mat: no 'inst_map' in the \.mat \(keys: \['type_map'\]\)"):
        read_consep_mat(tmp_path / "noinst.mat")
    savemat(tmp_path / "rows.mat", {"inst_map": s.instances.astype(float) * 7, "inst_type": np.ones((5, 1))})
    with pytest.raises(InputError, match=r"rows\.mat: inst_type has 5 rows for 33 instances"):
        read_consep_mat(tmp_path / "rows.mat")
    savemat(tmp_path / "type9.mat", {"inst_map": s.instances.astype(float),
                                     "inst_type": np.full((33, 1), 9.0)})
    with pytest.raises(InputError, match=r"type9\.mat: unknown CoNSeP type\(s\) \[9\]; expected 1\.\.7"):
        read_consep_mat(tmp_path / "type9.mat")
    savemat(tmp_path / "frac.mat", {"inst_map": s.instances / 2, "inst_type": np.ones((33, 1))})
    with pytest.raises(InputError, match=r"frac\.mat: instance map holds non-integer values"):
        read_consep_mat(tmp_path / "frac.mat")
    (tmp_path / "text.mat").write_text("inst_map = 1")
    with pytest.raises(InputError, match=r"text\.mat: cannot read \.mat"):
        read_consep_mat(tmp_path / "text.mat")
    write_mat(tmp_path / "good.mat", s)
    data = (tmp_path / "good.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.mat: cannot read \.mat"):
        read_consep_mat(tmp_path / "cut.mat")


def test_folder_label_image_mismatch(tmp_path, real):
    s = real["test_4_012"]
    (tmp_path / "Images").mkdir()
    (tmp_path / "Labels").mkdir()
    write_image(tmp_path / "Images/a.png", s.image[:128])
    write_mat(tmp_path / "Labels/a.mat", s)
    with pytest.raises(InputError, match=r"a\.mat: inst_map shape 256×256 differs from image a\.png 128×256"):
        ConsepFolder(tmp_path)[0]
    write_image(tmp_path / "Images/b.png", s.image)
    with pytest.raises(InputError, match=r"Labels/b\.mat: label file not found for b\.png"):
        ConsepFolder(tmp_path)
