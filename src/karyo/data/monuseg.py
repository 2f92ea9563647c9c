"""MoNuSeg's Aperio ImageScope XML annotations (``<Region><Vertices><Vertex X= Y=/>``) and release folders.

Each Region is one nucleus; vertices are (column, row) pixel coordinates. Regions are rasterised with
``skimage.draw.polygon`` in file order, later ones overwriting earlier ones; nuclei left without pixels are
dropped and the rest numbered 1..N — the rule ../shared/data/monuseg_test was converted with.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from karyo.data.geojson import paint_instances
from karyo.data.io import IMAGE_SUFFIXES, check_file, read_image_meta
from karyo.data.sample import Sample, SampleSequence
from karyo.errors import InputError

# Preferred image for a stem when a folder holds several: the original TIFF first.
_IMAGE_ORDER = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


def read_monuseg_regions(path: str | os.PathLike) -> tuple[list[np.ndarray], float | None]:
    """The Regions of an Aperio XML as (K×2 x, y) vertex arrays in file order, and its MicronsPerPixel."""
    path = Path(path)
    check_file(path, "an XML annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise InputError(path, f"malformed XML ({exc})") from None
    regions = []
    for k, region in enumerate(root.iter("Region")):
        try:
            verts = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError) as exc:
            raise InputError(path, f"region {k + 1} (Id {region.get('Id')}): bad vertex ({exc!r})") from None
        regions.append(np.asarray(verts, dtype=np.float64).reshape(-1, 2))
    mpp_text = root.get("MicronsPerPixel")
    try:
        mpp = float(mpp_text) if mpp_text else None
    except ValueError:
        mpp = None
    return regions, mpp


def read_monuseg_xml(path: str | os.PathLike, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Rasterise an Aperio XML to an H×W instance map (ids 1..N in file order) → (instances, mpp or None)."""
    regions, mpp = read_monuseg_regions(path)
    instances, _ = paint_instances(([[r]] if len(r) >= 3 else [] for r in regions), shape)
    return instances, mpp


class MoNuSegFolder(SampleSequence):
    """MoNuSeg images paired with their XML annotations by file stem.

    Works on the test release (``<id>.tif`` beside ``<id>.xml``), the training release
    (``Tissue Images/`` and ``Annotations/``) or any folder holding both up to one level down.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._pairs = monuseg_pairs(self.root)
        if not self._pairs:
            raise InputError(self.root, "no MoNuSeg .xml annotations found")
        self._ids = [xml.stem for _, xml in self._pairs]

    def _load(self, i: int) -> Sample:
        img_path, xml_path = self._pairs[i]
        image, meta = read_image_meta(img_path)
        instances, mpp = read_monuseg_xml(xml_path, image.shape[:2])
        return Sample(image=image, instances=instances, name=xml_path.stem, mpp=mpp or meta["mpp"],
                      source=str(img_path), meta={"annotation": str(xml_path)})


def monuseg_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, xml) pairs under ``root`` (itself and one level down); an xml without its image is an error."""
    if not root.is_dir():
        return []
    files = [p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    xmls = sorted((p for p in files if p.suffix.lower() == ".xml"), key=lambda p: p.stem)
    images: dict[str, Path] = {}
    for p in sorted(files, key=lambda p: _IMAGE_ORDER.index(p.suffix.lower()) if p.suffix.lower() in _IMAGE_ORDER
                    else len(_IMAGE_ORDER)):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(p.stem, p)
    missing = [x for x in xmls if x.stem not in images]
    if missing:
        raise InputError(missing[0], f"no image named {missing[0].stem}.tif/.png beside this annotation")
    return [(images[x.stem], x) for x in xmls]
