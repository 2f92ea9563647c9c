"""open_dataset's format detection and the plain image folder, on the real shared data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from karyo.data.datasets import detect_format, open_dataset
from karyo.data.folder import ImageFolder
from karyo.data.layout import LayoutDataset
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data


@pytest.mark.parametrize("name", ["consep", "monuseg_test", "nucls_examples", "pannuke_breast_demo",
                                  "dsb2018_fluo_subset"])
def test_shared_datasets_are_layouts(shared_data, name):
    assert detect_format(shared_data / name) == "layout"
    ds = open_dataset(shared_data / name, split="test")
    assert isinstance(ds, LayoutDataset) and len(ds) > 0
    assert all(ds.split_of(i) == "test" for i in ds.ids)


def test_image_folder(shared_data, tmp_path):
    folder = shared_data / "dsb2018_fluo_subset/images"
    assert detect_format(folder) == "folder"
    ds = open_dataset(folder)
    assert isinstance(ds, ImageFolder) and len(ds) == 120
    s = ds[0]
    ref = LayoutDataset(shared_data / "dsb2018_fluo_subset")[0]
    assert s.name == ref.name and s.instances is None and s.classes is None
    np.testing.assert_array_equal(s.image, ref.image)
    one = open_dataset(folder / f"{ref.name}.png")
    assert one.ids == [ref.name]
    # Recursive: ids are relative paths.
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(folder / f"{ref.name}.png", tmp_path / sub / "x.png")
    assert ImageFolder(tmp_path, recursive=True).ids == ["a/x", "b/x"]
    shutil.copy(folder / f"{ref.name}.png", tmp_path / "a/x.jpg")
    with pytest.raises(InputError, match=r"several images named 'x'"):
        ImageFolder(tmp_path / "a")


def test_detection_errors(tmp_path):
    with pytest.raises(InputError, match=r"nope: dataset path not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"cannot tell the dataset format: expected a karyo layout"):
        open_dataset(tmp_path)
    with pytest.raises(InputError, match=r"notes\.txt: cannot tell the dataset format of this file"):
        open_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="unknown dataset format 'zarr'"):
        open_dataset(tmp_path, format="zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no image files"):
        open_dataset(tmp_path / "empty", format="folder")


def test_split_only_where_the_format_has_them(shared_data):
    with pytest.raises(InputError, match="the folder format has no splits; got split='train'"):
        open_dataset(shared_data / "consep/images", split="train")
