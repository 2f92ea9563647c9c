"""Write a segmentation result to disk in karyo's output layout (the shared dataset layout, so that
``karyo evaluate --pred OUT`` reads it back):

    OUT/instances/<stem>.png     16-bit instance map (TIFF when ids exceed 65535)
    OUT/classes/<stem>.csv       instance_id,class_id   (when the model classifies)
    OUT/classes.json             {class_id: name}
    OUT/tables/<stem>.csv        one row per nucleus: id, centroid, area, bbox, class id and name, score
    OUT/overlays/<stem>.png      outlines coloured by class
    OUT/geojson/<stem>.geojson   QuPath detections with classification and measurements

Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from karyo.data.io import IMAGE_SUFFIXES, image_stem, write_image, write_instances, write_text
from karyo.errors import InputError
from karyo.export.geojson import nucleus_features, write_geojson
from karyo.export.overlay import draw_overlay
from karyo.infer.result import SegmentationResult

ALL_OUTPUTS = ("instances", "classes", "table", "overlay", "geojson")

#: Enough digits for slide coordinates of 10⁶ px to a thousandth of a pixel (``%.6g`` rounded them to whole pixels).
CSV_FLOAT_FORMAT = "%.10g"


def write_table_csv(path: str | os.PathLike, table) -> Path:
    buf = io.StringIO()
    table.to_csv(buf, index=False, float_format=CSV_FLOAT_FORMAT)
    return write_text(path, buf.getvalue())


def save_result(result: SegmentationResult, out_dir: str | os.PathLike, image: np.ndarray | None = None, *,
                stem: str | None = None, outputs: Iterable[str] = ALL_OUTPUTS, measurements=None,
                properties=None) -> dict[str, Path]:
    """Write the requested outputs of one image; returns {output kind: path}."""
    out = Path(out_dir)
    name = stem or result.name or "image"
    if name != Path(name).name or name in (".", ".."):
        raise InputError(None, f"name {name!r} cannot be a file name in {out} (no folders in it)")
    # "x.tif" writes x.png, the id karyo evaluate pairs with ground truth x; "slide.A" (a stem already) stays
    stem = image_stem(name) if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    outputs = set(outputs)
    unknown = outputs - set(ALL_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown output kind(s) {sorted(unknown)}; choose from {ALL_OUTPUTS}")
    if "overlay" in outputs and image is None and outputs != set(ALL_OUTPUTS):
        raise InputError(None, "the overlay needs the image: pass it (result.save(out, image, ...))")
    if image is not None and np.shape(image)[:2] != result.instances.shape:  # before anything is written
        raise InputError(None, f"the image ({np.shape(image)[1]}×{np.shape(image)[0]} px) is not the one segmented "
                               f"({result.instances.shape[1]}×{result.instances.shape[0]} px)")
    written: dict[str, Path] = {}
    if "instances" in outputs:
        suffix, other = (".png", ".tif") if result.instances.max(initial=0) <= 65535 else (".tif", ".png")
        written["instances"] = write_instances(out / "instances" / f"{stem}{suffix}", result.instances)
        (out / "instances" / f"{stem}{other}").unlink(missing_ok=True)  # an earlier run's map under the other suffix
    table = result.table() if {"classes", "table"} & outputs else None
    if "classes" in outputs:
        classes_csv = out / "classes" / f"{stem}.csv"
        if result.classes or result.class_names:  # header-only when a classifying model finds no nucleus
            written["classes"] = write_table_csv(classes_csv, table[["instance_id", "class_id"]])
        else:  # an earlier run's classes must not be read as those of these instances
            classes_csv.unlink(missing_ok=True)
        if result.class_names:
            names = {str(k): v for k, v in sorted(result.class_names.items())}
            written["class_names"] = write_text(out / "classes.json", json.dumps(names, indent=1) + "\n")
    if "table" in outputs:
        written["table"] = write_table_csv(out / "tables" / f"{stem}.csv", table)
    if "overlay" in outputs and image is not None:
        overlay = draw_overlay(image, result.instances, result.classes, result.class_names)
        written["overlay"] = write_image(out / "overlays" / f"{stem}.png", overlay)
    if "geojson" in outputs:
        if result.properties:  # per-nucleus values the model attached (e.g. IVAAN's levels); explicit ones win
            properties = {k: {**result.properties.get(k, {}), **(properties or {}).get(k, {})}
                          for k in set(result.properties) | set(properties or {})}
        if result.mpp is not None and result.n_nuclei:  # QuPath shows it beside its own measurements
            table = table if table is not None else result.table()
            area = pd.DataFrame({"Area µm^2": table["area_um2"].to_numpy()}, index=table["instance_id"].to_numpy())
            measurements = area if measurements is None else area.join(measurements, how="outer")
        features = nucleus_features(result.instances, classes=result.classes, class_names=result.class_names,
                                    scores=result.scores, measurements=measurements, properties=properties,
                                    image_name=stem)
        written["geojson"] = write_geojson(out / "geojson" / f"{stem}.geojson", features)
    return written
