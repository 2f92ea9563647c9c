"""COCO instance annotations: RLE (uncompressed counts list or compressed string) and polygon segmentations.

``category_id`` becomes the class of each instance and ``categories`` the class names. Annotations of an
image are painted in ascending annotation id, later over earlier; instances left without pixels are dropped
and the rest numbered 1..N (the rule ../shared/data/pannuke_breast_demo was converted with).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from karyo.data.geojson import polygon_pixels
from karyo.data.io import read_image_meta
from karyo.data.sample import Sample, SampleSequence, relabel_sequential
from karyo.errors import InputError


def rle_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string to run lengths.

    Each run length is written in 5-bit groups, least significant first, as characters from '0' (48);
    bit 0x20 of a character says another group follows and bit 0x10 of the last group is the sign. From
    the fourth run on, the stored value is the difference to the run two places before.
    """
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("compressed RLE string ends inside a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(data[p])!r} cannot occur in a compressed RLE string")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_decode(rle: dict, source: str | None = None) -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": [...] or "..."}`` → H×W bool mask.

    Runs alternate background/foreground starting with background, over the pixels in column-major order.
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
        runs = np.asarray(rle_counts_from_string(counts) if isinstance(counts, str | bytes) else counts,
                          dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(source, f"malformed RLE ({exc!r})") from None
    if runs.ndim != 1 or np.any(runs < 0) or runs.sum() != h * w:
        raise InputError(source, f"RLE runs sum to {int(runs.sum()) if runs.ndim == 1 else '?'}, "
                                 f"not {h}×{w} = {h * w} pixels")
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(w, h).T


class CocoDataset(SampleSequence):
    """A COCO instances json and its images, as a lazy sequence of :class:`Sample`.

    Images are found by ``file_name`` under ``image_dir`` (default: the json's folder, then its
    ``images/`` subfolder). Category ids are the class ids when all are ≥ 1, else renumbered 1..C in order.
    """

    def __init__(self, path: str | os.PathLike, image_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "COCO json not found")
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(self.path, f"cannot read COCO json ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise InputError(self.path, "not a COCO json (no 'images' list)")
        self.image_dirs = [Path(image_dir)] if image_dir is not None else [self.path.parent,
                                                                             self.path.parent / "images"]
        cats = sorted(int(c["id"]) for c in data.get("categories", []))
        self._cat_to_class = {c: c for c in cats} if all(c >= 1 for c in cats) else \
            {c: i for i, c in enumerate(cats, start=1)}
        self.class_names = {self._cat_to_class[int(c["id"])]: str(c.get("name", c["id"]))
                            for c in data.get("categories", [])} or None
        self._images = data["images"]
        self._ids = [Path(im["file_name"]).stem for im in self._images]
        self._anns: dict[int, list[dict]] = {int(im["id"]): [] for im in self._images}
        for ann in data.get("annotations", []):
            if int(ann["image_id"]) in self._anns:
                self._anns[int(ann["image_id"])].append(ann)
        for anns in self._anns.values():
            anns.sort(key=lambda a: a.get("id", 0))

    def image_path(self, i: int) -> Path:
        name = self._images[i]["file_name"]
        for folder in self.image_dirs:
            for candidate in (folder / name, folder / Path(name).name):
                if candidate.is_file():
                    return candidate
        raise InputError(self.image_dirs[0] / name, f"image of COCO entry {self._images[i]['id']} not found "
                                                    f"(looked in {', '.join(map(str, self.image_dirs))})")

    def labels(self, i: int, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, dict[int, int]]:
        """Instance map and classes of image ``i`` (shape from the json's height/width when not given)."""
        entry = self._images[i]
        if shape is None:
            shape = (int(entry["height"]), int(entry["width"]))
        where = f"{self.path} (image {entry['id']})"
        canvas = np.zeros(shape, dtype=np.int32)
        cats = []
        for n, ann in enumerate(self._anns[int(entry["id"])], start=1):
            seg = ann.get("segmentation")
            if isinstance(seg, dict):
                mask = rle_decode(seg, f"{where}, annotation {ann.get('id')}")
                if mask.shape != tuple(shape):
                    raise InputError(self.path, f"annotation {ann.get('id')}: RLE size {mask.shape} differs from "
                                                f"image {tuple(shape)}")
                canvas[mask] = n
            elif isinstance(seg, list):
                for poly in seg:
                    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                    if len(xy) >= 3:
                        rr, cc = polygon_pixels([xy], shape)
                        canvas[rr, cc] = n
            else:
                raise InputError(self.path, f"annotation {ann.get('id')}: no segmentation")
            cats.append(ann.get("category_id"))
        instances, lut = relabel_sequential(canvas, len(cats))
        classes = {int(lut[n]): self._class_of(c, where) for n, c in enumerate(cats, start=1)
                   if lut[n] > 0 and c is not None}
        return instances, classes

    def _class_of(self, category: int, where: str) -> int:
        if int(category) not in self._cat_to_class:
            raise InputError(where, f"category_id {category} not among the categories {sorted(self._cat_to_class)}")
        return self._cat_to_class[int(category)]

    def _load(self, i: int) -> Sample:
        path = self.image_path(i)
        image, meta = read_image_meta(path)
        instances, classes = self.labels(i, image.shape[:2])
        return Sample(image=image, instances=instances, classes=classes, name=Path(self._images[i]["file_name"]).stem,
                      class_names=self.class_names, mpp=meta["mpp"], channel_names=meta["channel_names"],
                      source=str(path), meta={"coco_id": self._images[i]["id"]})
