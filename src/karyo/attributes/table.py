"""Attribute tables of many images (optionally on several processes) and their files: Parquet, CSV, GeoJSON."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from karyo.attributes import names as N
from karyo.attributes.measure import (
    AttributeOptions,
    add_classes,
    add_micron_columns,
    empty_columns,
    gray_stack_names,
    measure_arrays,
)
from karyo.data.io import atomic_path
from karyo.data.sample import Sample, SampleSequence, is_marker_image
from karyo.export.writers import CSV_FLOAT_FORMAT
from karyo.stain.macenko import MacenkoNormalizer


def measure_samples(samples: Sequence[Sample] | Iterable[Sample], *, n_jobs: int = 1,
                    normalizer: MacenkoNormalizer | None = None, options: AttributeOptions | None = None,
                    chunk_size: int = 16, nuclear_channel: str | int | None = None) -> pd.DataFrame:
    """One attribute table for many annotated samples (``Identifier.Image`` = sample name).

    Samples without an instance map are skipped. ``n_jobs > 1`` measures chunks of images on that many
    processes; a lazy :class:`~karyo.data.sample.SampleSequence` (e.g. ``LayoutDataset``) is then decoded in
    the workers too. Class columns are added when any sample has classes. Marker images are measured on
    ``nuclear_channel`` (see :func:`karyo.data.sample.nuclear_channel_index`); RGB and one-channel images
    of the same dataset are measured as usual.
    """
    if n_jobs > 1 and isinstance(samples, Sequence) and len(samples) > 1:
        n = len(samples)
        chunks = [list(range(i, min(i + chunk_size, n))) for i in range(0, n, chunk_size)]
        fork = "fork" in mp.get_all_start_methods()
        lazy = isinstance(samples, SampleSequence)
        global _FORKED
        # With fork, workers inherit in-memory samples copy-on-write; only indices and results are pickled.
        _FORKED = samples if fork else None
        try:
            ctx = mp.get_context("fork") if fork else None
            with ProcessPoolExecutor(max_workers=min(n_jobs, len(chunks)), mp_context=ctx) as pool:
                futures = [pool.submit(_measure_chunk, None if fork else (samples if lazy else
                                       [samples[i] for i in c]), c if (fork or lazy) else None,
                                       normalizer, options, nuclear_channel) for c in chunks]
                parts = [part for f in futures for part in f.result()]
        finally:
            _FORKED = None
    else:
        parts = _measure_chunk(samples, None, normalizer, options, nuclear_channel)
    return concat_parts(parts)


_FORKED = None


def _measure_chunk(samples, indices, normalizer, options, nuclear_channel=None) -> list[tuple]:
    if samples is None:
        samples = _FORKED
    items = (samples[i] for i in indices) if indices is not None else iter(samples)
    out = []
    for s in items:
        if s.instances is None:
            continue
        names = gray_stack_names(s.image, s.channel_names, (s.meta or {}).get("photometric"))
        markers = is_marker_image(s.image.shape[2], names)
        cols = measure_arrays(s.image, s.instances, normalizer=normalizer, options=options,
                              source=s.source or s.name or None, channel_names=names,
                              nuclear_channel=nuclear_channel if markers else None)  # H&E images stay H&E
        out.append((s.name, cols, s.classes, s.class_names, s.mpp))
    return out


def concat_parts(parts: list[tuple]) -> pd.DataFrame:
    """Join per-image column dicts (``(name, cols, classes, class_names[, mpp])``) into one table; when any image
    states its resolution the µm columns are added (NaN for the images that do not)."""
    if not parts:
        df = pd.DataFrame(empty_columns())
        df.insert(0, N.IMAGE, pd.Series([], dtype=object))
        return df
    sizes = [len(p[1]["Identifier.Label"]) for p in parts]
    data = {N.IMAGE: np.repeat(np.array([p[0] for p in parts], dtype=object), sizes)}
    for c in N.ALL_COLUMNS:
        data[c] = np.concatenate([p[1][c] for p in parts])
    extra = list(dict.fromkeys(c for p in parts for c in p[1] if c not in N.ALL_COLUMNS))  # marker columns
    for c in extra:  # NaN (or "" for text) for the images without that column
        text = any(c in p[1] and np.asarray(p[1][c]).dtype == object for p in parts)
        data[c] = np.concatenate([np.asarray(p[1][c], object if text else np.float64) if c in p[1]
                                  else np.full(n, "" if text else np.nan, object if text else np.float64)
                                  for p, n in zip(parts, sizes, strict=True)])
    df = pd.DataFrame(data)
    mpps = [p[4] if len(p) > 4 and p[4] is not None else np.nan for p in parts]
    if np.isfinite(mpps).any():
        add_micron_columns(df, np.repeat(np.asarray(mpps, dtype=np.float64), sizes))
    if any(p[2] is not None for p in parts):
        cid = np.concatenate([_class_ids(p[1]["Identifier.Label"], p[2]) for p in parts]).astype(np.int32)
        names: dict[int, str] = {}
        for p in parts:
            names.update(p[3] or {})
        df[N.CLASS_ID] = cid
        lut = {c: (names.get(c, f"class {c}") if c else "") for c in np.unique(cid).tolist()}
        df[N.CLASS_NAME] = pd.Series(cid).map(lut).to_numpy(dtype=object)
    return df


def _class_ids(labels: np.ndarray, classes: Mapping[int, int] | None) -> np.ndarray:
    if not classes or labels.size == 0:
        return np.zeros(labels.size, dtype=np.int32)
    top = max(int(labels.max()), max(classes))
    lut = np.zeros(top + 1, dtype=np.int32)
    for k, v in classes.items():
        lut[int(k)] = int(v)
    return lut[labels]


def analysis_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The nuclei IVAAN analyses (B.1): not truncated by the image border and at least 10 px."""
    return df[df["Flag.Valid"].to_numpy(dtype=bool)]


def _uniform_strings(table: pa.Table) -> pa.Table:
    """Text columns as Arrow ``string`` whatever pandas inferred (``large_string``, or ``null`` for a table with
    no rows), so that the files of many images read as one dataset."""
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) or pa.types.is_null(f.type)
              else f for f in table.schema]
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


def write_table(df: pd.DataFrame, path: str | os.PathLike, formats: Iterable[str] = ("parquet", "csv")
                ) -> list[Path]:
    """Write the table as ``<path>.parquet`` and/or ``<path>.csv`` (each atomically); returns the files."""
    stem = Path(path)
    if stem.suffix in (".parquet", ".csv"):
        stem = stem.with_suffix("")
    written = []
    # the id the segment tables, instance maps and GeoJSON use, as a column to join on (Identifier.Label holds it
    # too, under HistomicsTK's name)
    table = df.reset_index(drop=isinstance(df.index, pd.RangeIndex))
    if "instance_id" not in table.columns and "Identifier.Label" in table.columns:  # a dataset's rows: join on
        table.insert(0, "instance_id", table["Identifier.Label"])                   # (Identifier.Image, instance_id)
    for fmt in formats:
        target = stem.with_name(stem.name + "." + fmt)
        with atomic_path(target) as tmp:
            if fmt == "parquet":
                pq.write_table(_uniform_strings(pa.Table.from_pandas(table, preserve_index=False)), tmp)
            elif fmt == "csv":
                table.to_csv(tmp, index=False, float_format=CSV_FLOAT_FORMAT)
            else:
                raise ValueError(f"unknown table format {fmt!r} (parquet or csv)")
        written.append(target)
    return written


def nucleus_geojson(path: str | os.PathLike, instances: np.ndarray, table: pd.DataFrame, *,
                    classes: Mapping[int, int] | None = None, class_names: Mapping[int, str] | None = None,
                    prompts: Mapping[int, str] | None = None, image_name: str = "") -> Path:
    """QuPath GeoJSON of one image with every numeric column of ``table`` as measurements."""
    from karyo.export.geojson import nucleus_features, write_geojson

    meas = table.set_index("Identifier.Label", drop=False) if table.index.name != "instance_id" else table
    meas = meas.drop(columns=[c for c in (N.CLASS_ID,) if c in meas.columns])
    props = {int(k): {"prompt": v} for k, v in prompts.items()} if prompts else None
    features = nucleus_features(instances, classes=classes, class_names=class_names, measurements=meas,
                                properties=props, image_name=image_name)
    return write_geojson(path, features)


__all__ = ["add_classes", "analysis_rows", "concat_parts", "measure_samples", "nucleus_geojson", "write_table"]
