"""COCO json (uncompressed and compressed RLE, polygons) built from the real pannuke_breast_demo nuclei."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import find_contours

from karyo.data.coco import CocoDataset, rle_counts_from_string, rle_decode
from karyo.data.datasets import detect_format, open_dataset
from karyo.data.layout import LayoutDataset
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data


def runs_of(mask: np.ndarray) -> list[int]:
    """Run lengths over the column-major pixels, starting with a (possibly empty) background run."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def compress(counts: list[int]) -> str:
    """COCO's compressed RLE string (the encoder twin of the decoder under test, written from the spec)."""
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            out.append(chr(c + (0x20 if more else 0) + 48))
    return "".join(out)


def coco_json(ds: LayoutDataset, kind: str) -> dict:
    images, anns, ann_id = [], [], 1
    for img_id, s in enumerate(ds, start=1):
        h, w = s.shape
        images.append({"id": img_id, "file_name": f"{s.name}.png", "height": h, "width": w})
        for k in range(1, s.n_instances + 1):
            mask = s.instances == k
            if kind == "polygon":
                contour = max(find_contours(np.pad(mask, 1).astype(float), 0.5), key=len) - 1
                seg = [np.column_stack([contour[:, 1], contour[:, 0]]).ravel().round(2).tolist()]
            else:
                counts = runs_of(mask)
                # Alternate the two RLE flavours so both are read within one file.
                seg = {"size": [h, w], "counts": compress(counts) if (kind == "compressed" or ann_id % 2) else counts}
            anns.append({"id": ann_id, "image_id": img_id, "category_id": s.classes[k], "segmentation": seg,
                         "iscrowd": 0, "area": int(mask.sum())})
            ann_id += 1
    cats = [{"id": c, "name": n, "supercategory": "nucleus"} for c, n in ds.class_names.items()]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture(scope="module")
def demo(shared_data):
    return LayoutDataset(shared_data / "pannuke_breast_demo")


def test_compressed_string_known_answer():
    # Hand-encoded from the format: 0 → '0'; 5 → '5'; 40 = 8 + 1·32 → chr(48+8+32) 'X', '1';
    # 4th run 3 is stored as 3 - 5 = -2 → 30 with the sign bit → 'N'; 5th run 100 as 100 - 40 = 60 → 'l', '1'.
    assert rle_counts_from_string("05X1Nl1") == [0, 5, 40, 3, 100]
    assert rle_counts_from_string(b"05X1Nl1") == [0, 5, 40, 3, 100]
    mask = rle_decode({"size": [2, 3], "counts": [1, 2, 3]})  # column-major: (1,0), (0,1) set
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, False]])


@pytest.mark.parametrize("kind", ["mixed", "compressed"])
def test_rle_recovers_instances_exactly(tmp_path, shared_data, demo, kind):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_json(demo, kind)))
    coco = CocoDataset(path, image_dir=shared_data / "pannuke_breast_demo/images")
    assert coco.class_names == {1: "Neoplastic", 2: "Non-neoplastic"}
    assert coco.ids == demo.ids
    total = 0
    for got, ref in zip(coco, demo, strict=True):
        np.testing.assert_array_equal(got.image, ref.image)
        np.testing.assert_array_equal(got.instances, ref.instances)
        assert got.classes == ref.classes
        total += got.n_instances
    assert total == 631


def test_polygons_recover_instances(tmp_path, shared_data, demo):
    path = tmp_path / "poly.json"
    path.write_text(json.dumps(coco_json(demo, "polygon")))
    coco = CocoDataset(path, image_dir=shared_data / "pannuke_breast_demo/images")
    worst = 1.0
    for k in range(len(demo)):
        got, _ = coco.labels(k)
        ref = demo[k]
        n = ref.n_instances
        both = np.bincount(got[(got == ref.instances) & (got > 0)], minlength=n + 1)[1:]
        union = np.bincount(got.ravel(), minlength=n + 1)[1:] + np.bincount(ref.instances.ravel(), minlength=n + 1)[1:]
        single = [ndi.label(ref.instances == i)[1] == 1 for i in range(1, n + 1)]
        worst = min(worst, (both / (union - both))[single].min())
        assert got.max() == n
    assert worst > 0.9


def test_category_ids_and_open_dataset(tmp_path, shared_data, demo):
    data = coco_json(LayoutDataset(shared_data / "pannuke_breast_demo", ids=demo.ids[:2]), "compressed")
    for c in data["categories"]:
        c["id"] -= 1  # 0-based categories are renumbered 1..C
    for a in data["annotations"]:
        a["category_id"] -= 1
    (tmp_path / "images").mkdir()
    for im in data["images"]:
        shutil.copy(shared_data / "pannuke_breast_demo/images" / im["file_name"], tmp_path / "images")
    (tmp_path / "instances.json").write_text(json.dumps(data))
    assert detect_format(tmp_path) == "coco" and detect_format(tmp_path / "instances.json") == "coco"
    ds = open_dataset(tmp_path)
    assert ds.class_names == {1: "Neoplastic", 2: "Non-neoplastic"}
    assert ds[1].classes == demo[1].classes


# --- bad input ---------------------------------------------------------------------------------------------

def test_bad_coco(tmp_path, shared_data, demo):
    data = coco_json(LayoutDataset(shared_data / "pannuke_breast_demo", ids=demo.ids[:1]), "compressed")
    images = shared_data / "pannuke_breast_demo/images"
    path = tmp_path / "a.json"

    def write_and_load(d):
        path.write_text(json.dumps(d))
        return CocoDataset(path, image_dir=images)

    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segmentation"]["counts"] = [2, 3]
    with pytest.raises(InputError, match=r"a\.json \(image 1\), annotation 1: RLE runs sum to 5, not 256×256 = 65536"):
        write_and_load(bad)[0]
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segmentation"]["counts"] = "05X1N~"
    with pytest.raises(InputError, match=r"annotation 1: malformed RLE .*cannot occur in a compressed RLE"):
        write_and_load(bad)[0]
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 7
    with pytest.raises(InputError, match=r"a\.json \(image 1\): category_id 7 not among the categories \[1, 2\]"):
        write_and_load(bad)[0]
    bad = json.loads(json.dumps(data))
    bad["images"][0]["file_name"] = "missing.png"
    with pytest.raises(InputError, match=r"missing\.png: image of COCO entry 1 not found"):
        write_and_load(bad)[0]
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segmentation"]["size"] = [128, 512]
    with pytest.raises(InputError, match=r"a\.json: annotation 1: RLE size \(128, 512\) differs from image"):
        write_and_load(bad)[0]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(InputError, match=r"a\.json: not a COCO json \(no 'images' list\)"):
        open_dataset(path)
    path.write_text('{"images": [')
    with pytest.raises(InputError, match=r"a\.json: cannot read COCO json"):
        CocoDataset(path)
