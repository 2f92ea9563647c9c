"""PanNuke's native release: per fold ``images.npy``, ``masks.npy`` and ``types.npy``.

``images.npy`` is N×256×256×3 (float64 holding 0..255 in the release, or uint8); ``masks.npy`` is N×256×256×6,
channels 0..4 holding the instance ids of the Neoplastic, Inflammatory, Connective, Dead and Epithelial
nuclei and channel 5 the background; ``types.npy`` holds the tissue name of each patch. Arrays are
memory-mapped, so opening a fold reads nothing until a patch is asked for.

Both the release layout (``Fold 1/images/fold1/images.npy``, ``Fold 1/masks/fold1/masks.npy``) and a flat
one (``fold1/images.npy``, ``fold1/masks.npy``, ``fold1/types.npy``) are found.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from karyo.data.io import check_file
from karyo.data.sample import ConcatSamples, Sample, SampleSequence, validate_instances
from karyo.errors import InputError

if TYPE_CHECKING:  # pandas costs ~0.2 s to import; only metadata functions need it
    import pandas as pd

PANNUKE_CLASS_NAMES: dict[int, str] = {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead",
                                       5: "epithelial"}
# Tissue names exactly as the release's types.npy and CellViT's types.csv spell them.
PANNUKE_TISSUES: tuple[str, ...] = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck", "Kidney",
    "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis", "Thyroid", "Uterus",
)
PANNUKE_MPP = 0.25  # 40x scans
_FOLD_RE = re.compile(r"fold[\s_-]*(\d+)", re.IGNORECASE)


def pannuke_masks_to_instances(mask: np.ndarray, source: str | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """One PanNuke H×W×6 (or ×5) mask → (instance map with ids 1..N, {id: class 1..5}).

    Ids restart in each channel of the release, so ids are made unique per (channel, id) pair, numbered in
    that order. Where channels overlap (rare), the later channel wins, as when painting them in order.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.shape[2] < 5:
        raise InputError(source, f"PanNuke mask must be H×W×6 (5 class channels + background), got {mask.shape}")
    per_class = np.stack([validate_instances(mask[..., c], None, source) for c in range(5)], axis=-1)
    nonzero = per_class > 0
    channel = 4 - np.argmax(nonzero[..., ::-1], axis=-1)
    ids = np.take_along_axis(per_class, channel[..., None], axis=-1)[..., 0]
    fg = nonzero.any(axis=-1)
    keys, inverse = np.unique((channel[fg].astype(np.int64) << 32) | ids[fg], return_inverse=True)
    instances = np.zeros(mask.shape[:2], dtype=np.int32)
    instances[fg] = inverse.astype(np.int32) + 1
    classes = dict(zip(range(1, len(keys) + 1), ((keys >> 32) + 1).tolist(), strict=True))
    return instances, classes


class PanNukeArrays(SampleSequence):
    """PanNuke patches held in arrays (memory-mapped or not) as a lazy sequence of :class:`Sample`."""

    class_names = PANNUKE_CLASS_NAMES

    def __init__(self, images: np.ndarray, masks: np.ndarray, types: np.ndarray | list[str] | None = None,
                 fold: int | None = None, source: str | None = None, masks_source: str | None = None):
        self.fold = fold
        self.source = source
        self.masks_source = masks_source or source
        if images.ndim != 4 or images.shape[3] != 3:
            raise InputError(source, f"PanNuke images must be N×H×W×3, got shape {images.shape}")
        if 0 in images.shape:
            raise InputError(source, f"PanNuke images are empty (shape {images.shape})")
        if images.dtype != np.uint8 and images.dtype.kind != "f":
            raise InputError(source, f"PanNuke images must be uint8 or float 0..255, got {images.dtype}")
        if masks.ndim != 4 or masks.shape[:3] != images.shape[:3] or masks.shape[3] not in (5, 6):
            raise InputError(self.masks_source, f"PanNuke masks must be N×H×W×6 matching images "
                                                f"{images.shape[:3]}, got {masks.shape}")
        tissues = None if types is None else [str(t) for t in np.asarray(types).reshape(-1)]
        if tissues is not None and len(tissues) != len(images):
            raise InputError(source, f"{len(tissues)} tissue types for {len(images)} patches")
        self.images, self.masks, self.tissues = images, masks, tissues
        prefix = f"fold{fold}_" if fold is not None else ""
        self._ids = [f"{prefix}{i}" for i in range(len(images))]

    def _load(self, i: int) -> Sample:
        where = f"{self.source or 'PanNuke images'}[{i}]"
        image = np.asarray(self.images[i])
        if image.dtype != np.uint8:
            if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
                raise InputError(where, "PanNuke float image values must lie in 0..255")
            image = np.round(image).astype(np.uint8)
        instances, classes = pannuke_masks_to_instances(np.asarray(self.masks[i]),
                                                        f"{self.masks_source or 'PanNuke masks'}[{i}]")
        return Sample(image=image, instances=instances, classes=classes, name=self._ids[i],
                      tissue=None if self.tissues is None else self.tissues[i], class_names=dict(PANNUKE_CLASS_NAMES),
                      mpp=PANNUKE_MPP, source=where, meta={"fold": self.fold, "index": i})

    def metadata(self) -> pd.DataFrame:
        """One row per patch in the schema of ``pannuke_patches.csv`` (``pannuke_fold``, ``index``, ``tissue``),
        so :func:`karyo.data.protocols.apply_protocol` works on a fold opened from disk."""
        if self.tissues is None:
            raise InputError(self.source, "no types.npy: the tissue of each patch is unknown")
        import pandas as pd

        return pd.DataFrame({"pannuke_fold": self.fold, "index": np.arange(len(self)), "tissue": self.tissues})


def pannuke_from_arrays(images: np.ndarray, masks: np.ndarray, types: np.ndarray | list[str] | None = None,
                        fold: int | None = None) -> PanNukeArrays:
    """PanNuke arrays already in memory (e.g. loaded by the caller) as a lazy sequence of Samples."""
    return PanNukeArrays(np.asarray(images), np.asarray(masks), types, fold)


class PanNukeFold(PanNukeArrays):
    """One fold of the PanNuke release on disk (a fold folder, or the folder holding its .npy files)."""

    def __init__(self, path: str | os.PathLike, fold: int | None = None):
        files = find_pannuke_files(path)
        images = _load_npy(files["images"], mmap=True)
        masks = _load_npy(files["masks"], mmap=True)
        types = _load_npy(files["types"], mmap=False) if "types" in files else None
        self.path = Path(path) if Path(path).is_dir() else Path(path).parent
        if fold is None:  # look only below the fold folder and at its own name, not at unrelated parents
            fold = fold_number(files["images"].relative_to(self.path)) or fold_number(self.path.name)
        super().__init__(images, masks, types, fold,
                         source=str(files["images"]), masks_source=str(files["masks"]))

    def __getstate__(self) -> dict:
        # Pickling a memmap copies the whole array: send the paths to DataLoader workers instead.
        state = self.__dict__.copy()
        state["images"] = state["masks"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = _load_npy(Path(self.source), mmap=True)
        self.masks = _load_npy(Path(self.masks_source), mmap=True)


def find_pannuke_files(path: str | os.PathLike) -> dict[str, Path]:
    """Locate ``images.npy``, ``masks.npy`` and (optional) ``types.npy`` of one fold, up to 3 folders deep.

    ``path`` is a fold folder or one of its .npy files (then the nearest parent holding both arrays is used).
    """
    path = Path(path)
    if path.is_file():
        for parent in list(path.parents)[:3]:
            if _fold_files(parent).keys() >= {"images", "masks"}:
                path = parent
                break
        else:
            path = path.parent
    if not path.is_dir():
        raise InputError(path, "PanNuke fold folder not found")
    found = _fold_files(path)
    for key, hits in found.items():
        if isinstance(hits, list):
            raise InputError(path, f"several {key}.npy files ({', '.join(str(h.relative_to(path)) for h in hits)}); "
                                   "open one fold at a time, or open the release root with open_dataset")
    for key in ("images", "masks"):
        if key not in found:
            raise InputError(path, f"no {key}.npy found (expected e.g. 'Fold 1/{key}/fold1/{key}.npy' or "
                                   f"'fold1/{key}.npy')")
    return found


def _fold_files(path: Path) -> dict:
    """{key: path} for each array found once below ``path``, {key: [paths]} when found several times."""
    found: dict = {}
    for key in ("images", "masks", "types"):
        hits = _glob_depth(path, f"{key}.npy", 3)
        if hits:
            found[key] = hits[0] if len(hits) == 1 else hits
    return found


def find_pannuke_folds(root: str | os.PathLike) -> dict[int, Path]:
    """{fold number: fold folder} for a release root holding several folds (``Fold 1``, ``fold2``, ...)."""
    root = Path(root)
    folds: dict[int, Path] = {}
    for hit in _glob_depth(root, "images.npy", 4):
        rel = hit.relative_to(root)
        folder = root / rel.parts[0] if len(rel.parts) > 1 else root
        number = fold_number(rel) or fold_number(root.name)
        if number is None:
            raise InputError(hit, "cannot tell which fold this is (no 'fold<k>' in its path)")
        if folds.get(number, folder) != folder:
            raise InputError(root, f"fold {number} found twice: {folds[number]} and {folder}")
        folds[number] = folder
    return dict(sorted(folds.items()))


def open_pannuke(root: str | os.PathLike, folds: list[int] | None = None) -> SampleSequence:
    """A PanNuke fold (folder or one of its .npy files), or a release root with several folds (optionally
    only ``folds``)."""
    if Path(root).is_file():
        fold = PanNukeFold(root)
        if folds is not None and folds != [fold.fold]:
            raise InputError(root, f"this is fold {fold.fold}, not {folds}")
        return fold
    found = find_pannuke_folds(root)
    if not found:
        raise InputError(root, no_release_here(root))
    wanted = list(found) if folds is None else folds
    missing = [f for f in wanted if f not in found]
    if missing:
        raise InputError(root, f"no fold {missing}; folds here: {list(found)}")
    if len(found) == 1 and folds is None:
        return PanNukeFold(next(iter(found.values())), next(iter(found)))
    return ConcatSamples([PanNukeFold(found[f], f) for f in wanted])


def fold_number(path: str | os.PathLike) -> int | None:
    """The fold number written in a path ('Fold 1', 'fold1', 'fold_2'), deepest mention first."""
    for part in reversed(Path(path).parts):
        m = _FOLD_RE.search(part)
        if m:
            return int(m.group(1))
    return None


def _glob_depth(root: Path, name: str, depth: int) -> list[Path]:
    hits: list[Path] = []
    for d in range(depth + 1):
        hits += sorted(p for p in root.glob("/".join(["*"] * d + [name])) if p.is_file())
    return hits


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    check_file(path, "a .npy file")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise InputError(path, "holds Python objects (pickled); save it as a plain string or number array"
                             ) from None
        raise InputError(path, f"cannot read .npy ({exc})") from None
    except (OSError, EOFError) as exc:
        raise InputError(path, f"cannot read .npy ({exc}); the file is corrupt or truncated") from None


def no_release_here(root: str | os.PathLike) -> str:
    """Why ``root`` is not a PanNuke release, for the error message."""
    root = Path(root)
    if not root.exists():
        return "folder not found"
    if (root / "images").is_dir() and ((root / "split.csv").is_file() or (root / "instances").is_dir()):
        return ("a karyo layout folder, not the PanNuke release: the benchmark needs the release's Fold 1..3 "
                "(images.npy, masks.npy, types.npy per fold)")
    return "no PanNuke images.npy found (the release's Fold 1..3 hold images.npy, masks.npy and types.npy)"
