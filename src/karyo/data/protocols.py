"""PanNuke evaluation protocols as data, and their application to a per-patch metadata table.

Two protocols:

* ``pannuke-official``: the three fold rotations of the PanNuke benchmark (Gamper et al. 2020), as used
  by HoVer-Net, CellViT and most later work. Split k is (train, val, test) =
  1: (fold 1, fold 2, fold 3), 2: (fold 2, fold 1, fold 3), 3: (fold 3, fold 2, fold 1).
  Folds are the release's 1-based ``Fold 1..3`` (CellViT's ``fold0..2`` are the same folds minus one).
* ``ivaan-organ-groups``: IVAAN's cross-organ 4-fold cross-validation (supplementary section A): the
  19 tissues fall into 4 groups balanced by dead nuclei; split k tests on group k (all three folds) and
  trains on the other three groups. The paper defines no validation set, so ``val`` is ``None``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from karyo.data.pannuke import PANNUKE_TISSUES
from karyo.errors import InputError

if TYPE_CHECKING:  # pandas costs ~0.2 s to import; only metadata functions need it
    import pandas as pd

OFFICIAL_ROTATIONS: tuple[tuple[int, int, int], ...] = ((1, 2, 3), (2, 1, 3), (3, 2, 1))  # (train, val, test)

# IVAAN's group lists, in the paper's words → the PanNuke tissue names of the metadata.
IVAAN_GROUPS_AS_WRITTEN: dict[int, tuple[str, ...]] = {
    1: ("lung", "bladder", "kidney", "prostate"),
    2: ("colon", "skin", "pancreatic", "liver", "testis"),
    3: ("uterus", "esophagus", "ovarian", "thyroid", "bile duct"),
    4: ("stomach", "head & neck", "cervix", "breast", "adrenal gland"),
}
_PAPER_TO_PANNUKE = {"bile duct": "Bile-duct", "head & neck": "HeadNeck", "adrenal gland": "Adrenal_gland"}
IVAAN_ORGAN_GROUPS: dict[int, tuple[str, ...]] = {
    g: tuple(_PAPER_TO_PANNUKE.get(name, name.capitalize()) for name in names)
    for g, names in IVAAN_GROUPS_AS_WRITTEN.items()
}


def _check_groups() -> None:
    """Every PanNuke tissue in exactly one group: a typo here would silently drop a tissue."""
    listed = [t for names in IVAAN_ORGAN_GROUPS.values() for t in names]
    if sorted(listed) != sorted(PANNUKE_TISSUES):
        raise RuntimeError(f"IVAAN organ groups do not cover the 19 PanNuke tissues exactly once: "
                           f"extra {sorted(set(listed) - set(PANNUKE_TISSUES))}, missing "
                           f"{sorted(set(PANNUKE_TISSUES) - set(listed))}, {len(listed)} listed")


_check_groups()


@dataclass(frozen=True)
class Selection:
    """Which patches a split takes: those in ``folds`` and with a tissue in ``tissues`` (None = any)."""

    folds: tuple[int, ...] | None = None
    tissues: frozenset[str] | None = None

    def mask(self, table: pd.DataFrame) -> np.ndarray:
        keep = np.ones(len(table), dtype=bool)
        if self.folds is not None:
            keep &= table["pannuke_fold"].isin(self.folds).to_numpy()
        if self.tissues is not None:
            keep &= table["tissue"].isin(self.tissues).to_numpy()
        return keep


@dataclass(frozen=True)
class ProtocolSplit:
    """One train/val/test assignment of a protocol; ``index`` is the 1-based fold rotation or test group."""

    protocol: str
    index: int
    train: Selection
    val: Selection | None
    test: Selection


def pannuke_official_splits() -> list[ProtocolSplit]:
    return [ProtocolSplit("pannuke-official", k, Selection(folds=(tr,)), Selection(folds=(va,)), Selection(folds=(te,)))
            for k, (tr, va, te) in enumerate(OFFICIAL_ROTATIONS, start=1)]


def ivaan_organ_group_splits() -> list[ProtocolSplit]:
    splits = []
    for k, group in IVAAN_ORGAN_GROUPS.items():
        rest = frozenset(t for g, names in IVAAN_ORGAN_GROUPS.items() if g != k for t in names)
        splits.append(ProtocolSplit("ivaan-organ-groups", k, Selection(tissues=rest), None,
                                    Selection(tissues=frozenset(group))))
    return splits


PROTOCOLS = {"pannuke-official": pannuke_official_splits, "ivaan-organ-groups": ivaan_organ_group_splits}


def protocol_splits(name: str) -> list[ProtocolSplit]:
    """All splits of a protocol by name (``pannuke-official`` or ``ivaan-organ-groups``)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]()


def apply_protocol(split: ProtocolSplit, table: pd.DataFrame) -> dict[str, list[tuple[int, int]]]:
    """{"train"|"val"|"test": [(fold, index), ...]} for the patches of ``table`` (columns ``pannuke_fold``,
    ``index``, ``tissue``, as from :func:`read_pannuke_metadata` or ``PanNukeFold.metadata()``).

    ``val`` is empty when the protocol defines none. Tissues outside the 19 PanNuke names are refused, since
    a misspelt tissue would otherwise fall out of every split.
    """
    missing = {"pannuke_fold", "index", "tissue"} - set(table.columns)
    if missing:
        raise ValueError(f"metadata table lacks column(s) {sorted(missing)}")
    unknown = sorted(set(table["tissue"]) - set(PANNUKE_TISSUES))
    if unknown:
        raise ValueError(f"unknown tissue name(s) {unknown}; PanNuke names: {list(PANNUKE_TISSUES)}")
    table = table.sort_values(["pannuke_fold", "index"])
    keys = list(zip(table["pannuke_fold"].astype(int).tolist(), table["index"].astype(int).tolist(), strict=True))
    out = {}
    for part in ("train", "val", "test"):
        sel = getattr(split, part)
        mask = np.zeros(len(table), dtype=bool) if sel is None else sel.mask(table)
        out[part] = [k for k, m in zip(keys, mask.tolist(), strict=True) if m]
    return out


_CELLVIT_NAME = re.compile(r"^(\d+)_(\d+)\.png$")


def read_pannuke_metadata(path: str | os.PathLike) -> pd.DataFrame:
    """Per-patch PanNuke metadata: ``pannuke_patches.csv`` (or the folder holding it).

    Returns its columns plus ``index`` (the patch's position in its fold's arrays), parsed from the CellViT
    image name ``<fold-1>_<index>.png``.
    """
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "pannuke_patches.csv"
    if not path.is_file():
        raise InputError(path, "PanNuke metadata file not found")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read metadata CSV ({exc})") from None
    need = {"pannuke_fold", "image", "tissue"}
    if not need <= set(table.columns):
        raise InputError(path, f"needs columns {sorted(need)}, got {list(table.columns)}")
    parts = table["image"].astype(str).str.extract(_CELLVIT_NAME)
    if parts.isna().any().any():
        bad = table["image"][parts.isna().any(axis=1)].iloc[0]
        raise InputError(path, f"image name {bad!r} is not '<fold>_<index>.png'")
    if not np.array_equal(parts[0].astype(int) + 1, table["pannuke_fold"]):
        raise InputError(path, "image name fold prefixes (CellViT, 0-based) disagree with pannuke_fold")
    table["index"] = parts[1].astype(int)
    unknown = sorted(set(table["tissue"]) - set(PANNUKE_TISSUES))
    if unknown:
        raise InputError(path, f"unknown tissue name(s) {unknown}")
    if table.duplicated(["pannuke_fold", "index"]).any():
        raise InputError(path, "a (fold, index) patch is listed twice")
    return table
