"""CoNSeP labels (HoVer-Net's .mat files) and the CoNSeP release folder (``Images/*.png``, ``Labels/*.mat``).

A label .mat holds ``inst_map`` (H×W instance ids), ``inst_type`` (N×1, the 7 CoNSeP types of the N
instances), optionally ``inst_centroid`` (N×2, x, y) and ``type_map`` (H×W). By default the 7 types are
merged as HoVer-Net does for evaluation: 1 other; 2 inflammatory; 3, 4 → 3 epithelial;
5, 6, 7 → 4 spindle-shaped (the class ids and names of ../shared/data/consep).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from karyo.data.io import IMAGE_SUFFIXES, check_file, read_image_meta
from karyo.data.sample import Sample, SampleSequence, relabel_sequential, validate_instances
from karyo.errors import InputError

CONSEP_RAW_NAMES: dict[int, str] = {1: "other", 2: "inflammatory", 3: "healthy epithelial",
                                    4: "dysplastic/malignant epithelial", 5: "fibroblast", 6: "muscle",
                                    7: "endothelial"}
CONSEP_NAMES: dict[int, str] = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
CONSEP_MERGE: dict[int, int] = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
CONSEP_MPP = 0.25  # 40x


def read_consep_mat(path: str | os.PathLike, merge: bool = True
                    ) -> tuple[np.ndarray, dict[int, int], dict[int, str]]:
    """Read a CoNSeP label .mat → (instance map relabelled 1..N in ascending id order, classes, class names).

    ``inst_type`` row k belongs to instance id k+1 (HoVer-Net's convention, ids 1..N) when every id is at most
    its length; else, when it has one row per instance, to the instances in ascending id order (patches cut
    from the tiles keep sparse ids). Without ``inst_type`` the class of an instance is the majority of
    ``type_map`` under it. Type 0 means unclassified.
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    check_file(path, "a .mat label file")
    try:
        mat = loadmat(path)
    except (MatReadError, ValueError, OSError, TypeError, NotImplementedError) as exc:
        raise InputError(path, f"cannot read .mat ({exc}); the file is corrupt or not a MATLAB file") from None
    if "inst_map" not in mat:
        raise InputError(path, f"no 'inst_map' in the .mat (keys: {sorted(k for k in mat if not k.startswith('_'))})")
    inst_map = validate_instances(mat["inst_map"], None, str(path))
    instances, lut = relabel_sequential(inst_map)
    ids = np.flatnonzero(lut)  # the original ids, ascending
    if "inst_type" in mat:
        types = _integer_vector(mat["inst_type"], path, "inst_type")
        if ids.size and ids.max() <= len(types):
            per_instance = types[ids - 1]
        elif len(types) == len(ids):
            per_instance = types
        else:
            raise InputError(path, f"inst_type has {len(types)} rows for {len(ids)} instances "
                                   f"(ids up to {ids.max(initial=0)})")
    elif "type_map" in mat:
        type_map = validate_instances(mat["type_map"], inst_map.shape, str(path))
        per_instance = _majority(instances, type_map, len(ids))
    else:
        raise InputError(path, "neither 'inst_type' nor 'type_map' in the .mat")
    bad = sorted(set(per_instance.tolist()) - set(CONSEP_MERGE) - {0})
    if bad:
        raise InputError(path, f"unknown CoNSeP type(s) {bad}; expected 1..7")
    lut = np.array([0] + [CONSEP_MERGE[t] if merge else t for t in range(1, 8)], dtype=np.int64)
    merged = lut[per_instance]
    classes = {i: int(c) for i, c in enumerate(merged.tolist(), start=1) if c > 0}
    return instances, classes, dict(CONSEP_NAMES if merge else CONSEP_RAW_NAMES)


def _integer_vector(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    vec = np.asarray(arr).reshape(-1)
    if vec.dtype.kind not in "iuf" or (vec.dtype.kind == "f" and np.any(vec != np.round(vec))):
        raise InputError(path, f"'{key}' must hold integers, got {vec.dtype}")
    return vec.astype(np.int64)


def _majority(instances: np.ndarray, type_map: np.ndarray, n: int) -> np.ndarray:
    """Most frequent type_map value per instance (ties → lowest type), via one 2-D histogram."""
    k = int(type_map.max(initial=0)) + 1
    counts = np.bincount(instances.ravel().astype(np.int64) * k + type_map.ravel(), minlength=(n + 1) * k)
    counts = counts.reshape(n + 1, k)[1:]
    counts[:, 0] = 0  # background under an instance does not vote
    return np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0)


class ConsepFolder(SampleSequence):
    """A CoNSeP release folder as Samples: ``Images/<id>.png`` + ``Labels/<id>.mat`` (one split), or a root
    holding ``Train/`` and ``Test/`` such folders (``split`` = "train"/"test" picks one)."""

    def __init__(self, root: str | os.PathLike, split: str | None = None, merge: bool = True):
        self.root = Path(root)
        self.merge = merge
        self.class_names = dict(CONSEP_NAMES if merge else CONSEP_RAW_NAMES)
        parts = consep_split_folders(self.root)
        if not parts:
            raise InputError(self.root, "not a CoNSeP folder (expected Images/ and Labels/, or Train/ and Test/)")
        if split is not None:
            if split.lower() not in parts:
                raise InputError(self.root, f"no split {split!r}; splits here: {sorted(parts)}")
            parts = {split.lower(): parts[split.lower()]}
        self._items: list[tuple[str, Path, Path, str | None]] = []
        for name, folder in parts.items():
            labels = {p.stem: p for p in sorted((folder / "Labels").glob("*.mat"))}
            for img in sorted(p for p in (folder / "Images").iterdir()
                              if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
                if img.stem not in labels:
                    raise InputError(folder / "Labels" / f"{img.stem}.mat", "label file not found for "
                                                                            f"{img.name}")
                self._items.append((img.stem, img, labels[img.stem], None if name == "" else name))
        self._ids = [item[0] for item in self._items]

    def _load(self, i: int) -> Sample:
        name, img_path, mat_path, split = self._items[i]
        image, meta = read_image_meta(img_path)
        instances, classes, names = read_consep_mat(mat_path, self.merge)
        if instances.shape != image.shape[:2]:
            raise InputError(mat_path, f"inst_map shape {instances.shape[0]}×{instances.shape[1]} differs from "
                                       f"image {img_path.name} {image.shape[0]}×{image.shape[1]}")
        return Sample(image=image, instances=instances, classes=classes, name=name, class_names=names,
                      mpp=meta["mpp"] or CONSEP_MPP, source=str(img_path), meta={"split": split})


def consep_split_folders(root: Path) -> dict[str, Path]:
    """{"": root} for a single Images/+Labels/ folder, {"train": ..., "test": ...} for a release root."""
    def is_split(p: Path) -> bool:
        return (p / "Images").is_dir() and (p / "Labels").is_dir()

    if is_split(root):
        return {"": root}
    if not root.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir() and is_split(p)}

