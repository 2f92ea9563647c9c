"""Measure → level → describe → write, for one image or a dataset folder (what ``karyo attributes`` runs)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from karyo.attributes import names as N
from karyo.attributes.measure import AttributeOptions, add_micron_columns, gray_stack_names, measure_nuclei
from karyo.attributes.table import measure_samples, nucleus_geojson, write_table
from karyo.errors import InputError
from karyo.stain.macenko import MacenkoNormalizer

PROMPT_COLUMN = "Text.Prompt"


@dataclass
class AttributeRun:
    """What a run wrote: the table, the level model and the files."""

    table: pd.DataFrame
    levels: object | None  # karyo.text.LevelModel
    files: list[Path] = field(default_factory=list)

    @property
    def n_nuclei(self) -> int:
        return len(self.table)


def _levels(table: pd.DataFrame, fit_rows: pd.DataFrame, levels, prompt_attributes: Sequence[str], mode: str):
    from karyo.text.levels import LevelModel

    if levels is None:
        if not len(fit_rows) or not fit_rows["Flag.Valid"].any():
            if len(table):
                warnings.warn("no nucleus is valid (at least 10 px and not cut by the image border) to fit the "
                              "prompt levels on: the sentences (Text.Prompt) are empty and no levels file is "
                              "written; pass --levels from a larger run to describe these nuclei", stacklevel=3)
            return None
        if mode == "per_class" and N.CLASS_NAME not in fit_rows.columns:
            warnings.warn("level mode per_class needs the nuclei's classes (--classes, or a dataset with "
                          "classes.json); the levels are fitted over all nuclei (global)", stacklevel=3)
            mode = "global"
        try:
            return LevelModel.fit(fit_rows, prompt_attributes, mode=mode)
        except (KeyError, ValueError) as exc:
            raise InputError(None, f"cannot fit the prompt levels: {exc.args[0] if exc.args else exc}") from None
    return levels if isinstance(levels, LevelModel) else LevelModel.load(levels)


def attributes_for_image(image_path: str | os.PathLike, instances_path: str | os.PathLike, out: str | os.PathLike,
                         *, classes_path: str | os.PathLike | None = None,
                         class_names: dict[int, str] | None = None, levels=None,
                         prompt_attributes: Sequence[str] = N.PAPER_SELECTION, level_mode: str = "global",
                         normalizer: MacenkoNormalizer | None = None, options: AttributeOptions | None = None,
                         geojson: bool = True, mpp: float | None = None,
                         nuclear_channel: str | int | None = None) -> AttributeRun:
    """Attributes, prompts and GeoJSON of one image. Without ``levels`` (a LevelModel or its JSON path) the
    levels are fitted on this image's own nuclei, so "large" means large within this image. Class names come
    from ``class_names`` or a ``classes.json`` beside the class CSV or one folder up (the dataset layout).
    ``mpp`` (µm/px; default: what the file states) adds the µm columns (``Size.Area_um2`` ...). A marker image
    is measured on its nuclear channel (``nuclear_channel``, else DAPI/Hoechst by name, else channel 0) and gets
    ``Marker.<channel>.Mean/Std`` columns (:mod:`karyo.attributes.measure`)."""
    from karyo.data.io import check_mpp, image_stem, mpp_override, read_image_meta, read_instances
    from karyo.data.layout import read_class_csv

    image_path = Path(image_path)
    out = Path(out)
    mpp = check_mpp(mpp, image_path)
    image, meta = read_image_meta(image_path)
    instances = read_instances(instances_path, image.shape[:2])
    classes = read_class_csv(classes_path, instances, complete=True) if classes_path is not None else None
    if classes is not None and class_names is None:
        class_names = _class_names_near(Path(classes_path))
    names = gray_stack_names(image, meta.get("channel_names"), meta.get("photometric"))
    table = measure_nuclei(image, instances, classes, class_names=class_names, normalizer=normalizer,
                           options=options, source=str(image_path), channel_names=names,
                           nuclear_channel=nuclear_channel)
    override = mpp_override(mpp, meta.get("mpp"))
    if override:
        warnings.warn(f"{image_path}: {override}", stacklevel=2)
    mpp = mpp or meta.get("mpp")
    if mpp is not None:
        add_micron_columns(table, mpp)
    model = _levels(table, table, levels, prompt_attributes, level_mode)
    if model is not None and len(table):
        table[PROMPT_COLUMN] = model.sentences(table).to_numpy()
    else:
        table[PROMPT_COLUMN] = pd.Series([""] * len(table), index=table.index, dtype=object)
    stem = image_stem(image_path)
    files = write_table(table, out / f"{stem}_attributes")
    if model is not None and levels is None:
        files.append(model.save(out / f"{stem}_levels.json"))
    if geojson:
        files.append(nucleus_geojson(out / f"{stem}.geojson", instances, table, classes=classes,
                                     class_names=class_names,
                                     prompts=dict(zip(table.index, table[PROMPT_COLUMN], strict=True)),
                                     image_name=stem))
    _remove_earlier_outputs([out / f"{stem}_levels.json", out / f"{stem}.geojson"], files, levels)
    return AttributeRun(table, model, files)


def _remove_earlier_outputs(candidates: Sequence[Path], written: Sequence[Path], levels) -> None:
    """karyo's own files that an earlier run left in ``out`` and this one did not rewrite (no GeoJSON asked for,
    no levels fitted): removed, so the folder describes one run, with a note; the levels file this run reads
    (``levels``) is kept."""
    reused = Path(levels).resolve() if isinstance(levels, str | os.PathLike) else None
    stale = [p for p in candidates if p.is_file() and p not in written and p.resolve() != reused]
    for path in stale:
        path.unlink()
    if stale:
        shown = ", ".join(p.name for p in stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        warnings.warn(f"{stale[0].parent}: removed {shown} of an earlier run, which this run did not write again",
                      stacklevel=3)


def _class_names_near(csv_path: Path) -> dict[int, str] | None:
    from karyo.data.layout import read_class_names

    for cand in (csv_path.parent / "classes.json", csv_path.parent.parent / "classes.json"):
        if cand.is_file():
            return read_class_names(cand)
    return None


def attributes_for_dataset(root: str | os.PathLike, out: str | os.PathLike, *, split: str | None = None,
                           levels=None, fit_split: str | None = "train",
                           prompt_attributes: Sequence[str] = N.PAPER_SELECTION, level_mode: str = "global",
                           n_jobs: int = 1, normalizer: MacenkoNormalizer | None = None,
                           options: AttributeOptions | None = None, geojson: bool = True,
                           progress=None, mpp: float | None = None,
                           nuclear_channel: str | int | None = None) -> AttributeRun:
    """Attributes of every annotated image of a dataset folder (karyo layout) → one table, one GeoJSON per
    image and a prompt per nucleus. Levels are fitted on the ``fit_split`` images when the dataset has that
    split, else on all measured images, and saved as ``levels.json``. The µm columns (``Size.Area_um2`` ...)
    use ``mpp`` for every image when given, else each image's own (``split.csv`` or its file), NaN if unknown.
    Marker images are measured on ``nuclear_channel`` (as in :func:`attributes_for_image`)."""
    from karyo.data.io import check_mpp
    from karyo.data.layout import LayoutDataset

    mpp = check_mpp(mpp, root)

    ds = LayoutDataset(root, split=split)
    if len(ds) == 0:
        raise InputError(root, "dataset has no images" + (f" in split {split!r}" if split else ""))
    out = Path(out)
    table = measure_samples(ds, n_jobs=n_jobs, normalizer=normalizer, options=options,
                            nuclear_channel=nuclear_channel)
    if not len(table):
        raise InputError(root, "no annotated nuclei found (instances/ missing or empty)")
    if mpp is not None:  # one stated resolution for all images, over what their files say
        table = table.drop(columns=[c for c in N.MICRON_COLUMNS.values() if c in table.columns])
        add_micron_columns(table, mpp)
    splits = pd.Series([ds.split_of(i) or "" for i in ds.ids], index=ds.ids)
    table.insert(1, N.SPLIT, splits.reindex(table[N.IMAGE]).to_numpy(dtype=object))
    fit_rows, fitted_on = table, None
    if levels is None and fit_split and (table[N.SPLIT] == fit_split).any():
        fit_rows, fitted_on = table[table[N.SPLIT] == fit_split], fit_split
    elif levels is None and fit_split and split is not None and split != fit_split:
        # measuring another split (e.g. test): the levels still come from the fit split, never from these images
        try:
            fit_ds = LayoutDataset(root, split=fit_split)
        except InputError:
            fit_ds = None
        if fit_ds is not None and len(fit_ds):
            measured = measure_samples(fit_ds, n_jobs=n_jobs, normalizer=normalizer, options=options,
                                       nuclear_channel=nuclear_channel)
            if len(measured):
                fit_rows, fitted_on = measured, fit_split
    model = _levels(table, fit_rows, levels, prompt_attributes, level_mode)
    table[PROMPT_COLUMN] = model.sentences(table).to_numpy() if model is not None else ""
    files = write_table(table, out / "attributes")
    if model is not None and levels is None:
        model.meta = {"dataset": str(root), "fit_split": fitted_on}
        files.append(model.save(out / "levels.json"))
    if geojson:
        groups = dict(list(table.groupby(N.IMAGE, sort=False)))
        for i, id_ in enumerate(ds.ids):
            rows = groups.get(id_)
            if rows is None:
                continue
            instances, classes = ds.labels(i)
            rows = rows.set_index("Identifier.Label", drop=False)
            rows.index.name = "instance_id"
            files.append(nucleus_geojson(out / "geojson" / f"{id_}.geojson", instances, rows, classes=classes,
                                         class_names=ds.class_names,
                                         prompts=dict(zip(rows.index, rows[PROMPT_COLUMN], strict=True)),
                                         image_name=id_))
            if progress is not None:
                progress(i)
    earlier = [out / "levels.json", *sorted((out / "geojson").glob("*.geojson"))]
    _remove_earlier_outputs(earlier, files, levels)
    return AttributeRun(table, model, files)


def select_for_dataset(root: str | os.PathLike, *, split: str | None = None, n_jobs: int = 1,
                       attributes: Sequence[str] = N.B1_ATTRIBUTES, k: int = 4, alpha: float = 0.5,
                       lam: float = 0.4, normalizer: MacenkoNormalizer | None = None):
    """Measure a labelled dataset folder and run the B.2 selection on it (what ``karyo select-attributes`` runs)."""
    from karyo.attributes.select import select_attributes
    from karyo.data.layout import LayoutDataset

    ds = LayoutDataset(root, split=split)
    if ds.class_names is None:
        raise InputError(root, "dataset has no classes.json: the selection needs class labels")
    table = measure_samples(ds, n_jobs=n_jobs, normalizer=normalizer)
    if not len(table) or N.CLASS_NAME not in table.columns:
        raise InputError(root, "no classified nuclei found")
    return select_attributes(table, attributes, k=k, alpha=alpha, lam=lam), table


def select_for_table(path: str | os.PathLike, *, attributes: Sequence[str] = N.B1_ATTRIBUTES, k: int = 4,
                     alpha: float = 0.5, lam: float = 0.4, split: str | None = None):
    """The B.2 selection on an attribute table that ``karyo attributes`` wrote (Parquet or CSV) with classes.
    ``split``: only the rows of that split (a dataset's table has ``Identifier.Split``), so that selecting on
    ``train`` never sees the test images' nuclei."""
    import pandas as pd

    from karyo.attributes.select import select_attributes
    from karyo.data.io import check_file

    path = Path(path)
    check_file(path)
    try:
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the attribute table ({exc})") from None
    if N.CLASS_NAME not in table.columns:
        raise InputError(path, f"the table has no {N.CLASS_NAME} column: the selection needs class labels (measure "
                               f"a dataset with classes.json, or give --classes to karyo attributes)")
    if split is not None:
        if N.SPLIT not in table.columns:
            raise InputError(path, f"the table has no {N.SPLIT} column to pick split {split!r} from (a dataset's "
                                   f"table has one; a single image's has not): leave out --split")
        present = sorted(table[N.SPLIT].dropna().astype(str).unique().tolist())
        if split not in present:
            raise InputError(path, f"no row of split {split!r}; the table's splits: {', '.join(present) or 'none'}")
        table = table[table[N.SPLIT].astype(str) == split]
    try:
        return select_attributes(table, attributes, k=k, alpha=alpha, lam=lam)
    except (KeyError, ValueError) as exc:
        raise InputError(path, str(exc.args[0]) if exc.args else str(exc)) from None
