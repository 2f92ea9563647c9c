"""MoNuSeg Aperio XML, written in tmp by tracing the contours of a real MoNuSeg test image's nuclei."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import find_contours

from karyo.data.datasets import detect_format, open_dataset
from karyo.data.layout import LayoutDataset
from karyo.data.monuseg import MoNuSegFolder, read_monuseg_xml
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data

IMAGE_ID = "TCGA-69-7764-01A-01-TS1"  # 441 nuclei; one holds a later nucleus inside it, two are fragmented


def trace(instances: np.ndarray) -> list[np.ndarray]:
    """One (x, y) polygon per instance in id order: the outer contour of its largest filled component.

    find_contours at 0.5 runs half-way between inside and outside pixel centres, so rasterising it again
    selects the same pixel centres.
    """
    polygons = []
    for k, sl in enumerate(ndi.find_objects(instances), start=1):
        mask = instances[sl] == k
        labels, n = ndi.label(mask)
        if n > 1:
            mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        contour = max(find_contours(np.pad(ndi.binary_fill_holes(mask), 1).astype(float), 0.5), key=len)
        polygons.append(np.column_stack([contour[:, 1] - 1 + sl[1].start, contour[:, 0] - 1 + sl[0].start]))
    return polygons


def aperio_xml(polygons: list[np.ndarray], mpp: float = 0.2527) -> str:
    regions = []
    for k, poly in enumerate(polygons, start=1):
        verts = "\n".join(f'<Vertex X="{x:.6f}" Y="{y:.6f}" Z="0"/>' for x, y in poly)
        regions.append(f'<Region Id="{k}" Type="0" Zoom="1" Selected="0" NegativeROA="0" DisplayId="{k}">\n'
                       f"<Attributes/>\n<Vertices>\n{verts}\n</Vertices>\n</Region>")
    return (f'<?xml version="1.0"?>\n<Annotations MicronsPerPixel="{mpp:.6f}">\n'
            '<Annotation Id="1" Name="" ReadOnly="0" LineColor="65280" Visible="1">\n'
            '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>\n<Regions>\n'
            '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>'
            "</RegionAttributeHeaders>\n" + "\n".join(regions) + "\n</Regions>\n</Annotation>\n</Annotations>\n")


@pytest.fixture(scope="module")
def case(tmp_path_factory, shared_data):
    sample = LayoutDataset(shared_data / "monuseg_test", ids=[IMAGE_ID])[0]
    root = tmp_path_factory.mktemp("monuseg")
    polygons = trace(sample.instances)
    (root / f"{IMAGE_ID}.xml").write_text(aperio_xml(polygons))
    tifffile.imwrite(root / f"{IMAGE_ID}.tif", sample.image, photometric="rgb", compression="lzw")
    return root, sample, polygons


def ious(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """IoU of instance k in ``a`` with instance k in ``b``, k = 1..n (one joint histogram)."""
    both = np.bincount(a[(a == b) & (a > 0)], minlength=n + 1)[1:]
    area_a = np.bincount(a.ravel(), minlength=n + 1)[1:]
    area_b = np.bincount(b.ravel(), minlength=n + 1)[1:]
    return both / (area_a + area_b - both)


def test_xml_recovers_instances(case):
    root, sample, _ = case
    inst, mpp = read_monuseg_xml(root / f"{IMAGE_ID}.xml", sample.shape)
    assert mpp == pytest.approx(0.2527)
    assert inst.max() == sample.n_instances == 441  # ids 1..N in file order, none lost
    score = ious(inst, sample.instances, 441)
    fragmented = [k for k, sl in enumerate(ndi.find_objects(sample.instances), start=1)
                  if ndi.label(sample.instances[sl] == k)[1] > 1]
    whole = np.setdiff1d(np.arange(1, 442), fragmented)
    assert len(fragmented) == 2
    assert score[whole - 1].min() > 0.9
    assert np.mean(inst == sample.instances) > 0.999


def test_file_order_later_overwrites_earlier(case, tmp_path):
    _, sample, polygons = case
    # Two real nucleus outlines, the second moved so that it straddles the first one's edge, then the first
    # again: the first copy ends fully covered (dropped), the second keeps what the third leaves of it.
    a, b = polygons[9], polygons[20]
    b = b - b.mean(axis=0) + a[0]
    (tmp_path / "order.xml").write_text(aperio_xml([a, b, a]))
    inst, _ = read_monuseg_xml(tmp_path / "order.xml", sample.shape)
    (tmp_path / "a.xml").write_text(aperio_xml([a]))
    (tmp_path / "b.xml").write_text(aperio_xml([b]))
    alone_a = read_monuseg_xml(tmp_path / "a.xml", sample.shape)[0] > 0
    alone_b = read_monuseg_xml(tmp_path / "b.xml", sample.shape)[0] > 0
    assert np.any(alone_a & alone_b) and np.any(alone_b & ~alone_a)
    assert inst.max() == 2
    np.testing.assert_array_equal(inst == 2, alone_a)
    np.testing.assert_array_equal(inst == 1, alone_b & ~alone_a)


def test_folders_and_open_dataset(case, tmp_path):
    root, sample, _ = case
    assert detect_format(root) == "monuseg"
    ds = open_dataset(root)
    assert isinstance(ds, MoNuSegFolder) and ds.ids == [IMAGE_ID]
    s = ds[0]
    np.testing.assert_array_equal(s.image, sample.image)
    assert s.mpp == pytest.approx(0.2527) and s.classes is None and s.n_instances == 441
    # The training release layout: 'Tissue Images/' + 'Annotations/'.
    (tmp_path / "Tissue Images").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Tissue Images" / f"{IMAGE_ID}.tif").write_bytes((root / f"{IMAGE_ID}.tif").read_bytes())
    (tmp_path / "Annotations" / f"{IMAGE_ID}.xml").write_bytes((root / f"{IMAGE_ID}.xml").read_bytes())
    np.testing.assert_array_equal(MoNuSegFolder(tmp_path)[0].instances, s.instances)
    with pytest.raises(InputError, match="the monuseg format has no splits"):
        open_dataset(root, split="test")


def test_bad_xml(case, tmp_path):
    root, sample, _ = case
    text = (root / f"{IMAGE_ID}.xml").read_text()
    (tmp_path / "cut.xml").write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match=r"cut\.xml: malformed XML"):
        read_monuseg_xml(tmp_path / "cut.xml", sample.shape)
    (tmp_path / "noy.xml").write_text(text.replace(' Y="', ' Q="', 1))
    with pytest.raises(InputError, match=r"noy\.xml: region 1 \(Id 1\): bad vertex \(KeyError\('Y'\)\)"):
        read_monuseg_xml(tmp_path / "noy.xml", sample.shape)
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely/lonely.xml").write_text(text)
    with pytest.raises(InputError, match=r"lonely\.xml: no image named lonely\.tif/\.png beside this annotation"):
        MoNuSegFolder(tmp_path / "lonely")
