"""Does tiling a slide cost accuracy at the seams? Whole images in one pass vs `karyo wsi` tile by tile.

    python -m benchmarks.wsi_seams --model promptnucseg_cpu --threads 2

Each MoNuSeg test image (1000² px at 40x, 0.25 µm/px) is written as a tiled TIFF stating that resolution and run
through the whole-slide engine (tissue detection off so every pixel is covered) with the tilings of ``RUNS``,
the seam merge on (the default) and off; its nuclei are drawn back from the polygons of ``nuclei.parquet``.
The same image segmented in one ``model.segment`` call is the reference a perfect stitch reproduces. Duplicates
are pairs of output nuclei whose polygons share at least half of the smaller one (within one model call there are
none: an instance map cannot overlap itself).

The test images are used to measure the stitching, not to choose anything: the merge rule (half of the smaller
polygon, the larger kept) was fixed before this ran.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
import tifffile
import torch
from skimage.draw import polygon as draw_polygon

import karyo
from benchmarks._report import invocation, publish
from karyo.data.layout import LayoutDataset
from karyo.infer.tissue import TissueOptions
from karyo.infer.wsi import WSIOptions, run_wsi
from karyo.metrics import aggregated_jaccard_index, panoptic_quality

MPP = 0.25
#: The whole-slide runs compared: (tile, overlap, merge seams). 512/128 has the same share of overlap as 256/64
#: (a step of 3/4 of the tile) with twice the context at every tile edge.
RUNS = {"wsi_256": (256, 64, True), "wsi_256_unmerged": (256, 64, False), "wsi_512": (512, 128, True)}


def draw_nuclei(parquet: Path, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """The output polygons (pixel edges, level-0) drawn as an instance map (a pixel belongs to a polygon when its
    centre does; later nuclei over earlier ones), and how many pairs of them are duplicates."""
    polys = shapely.from_wkb(pq.read_table(parquet, columns=["polygon_wkb"]).column(0).to_numpy(zero_copy_only=False))
    out = np.zeros(shape, np.int32)
    for k, poly in enumerate(polys, start=1):
        for part in getattr(poly, "geoms", [poly]):
            x, y = np.asarray(part.exterior.coords).T
            rr, cc = draw_polygon(y - 0.5, x - 0.5, shape)
            out[rr, cc] = k
    tree = shapely.STRtree(polys)
    left, right = tree.query(polys, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    shared = shapely.area(shapely.intersection(polys[left], polys[right]))
    smaller = np.minimum(shapely.area(polys[left]), shapely.area(polys[right]))
    return out, int(np.count_nonzero(shared >= 0.5 * smaller))


def run(model_name: str, data: Path) -> dict:
    model = karyo.load(model_name)
    ds = LayoutDataset(data)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(ds)):
            s = ds[i]
            image = s.image[..., :3]
            path = Path(tmp) / f"{s.name}.tif"
            tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb",
                             resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
            one = model.segment(image, mpp=MPP).instances
            row = {"name": s.name, "nuclei": int(s.instances.max() > 0 and len(np.unique(s.instances)) - 1),
                   "one_pass": (panoptic_quality(s.instances, one).pq, aggregated_jaccard_index(s.instances, one).value,
                                len(np.unique(one)) - 1, 0)}
            for key, (tile, overlap, merge) in RUNS.items():
                out = Path(tmp) / f"{s.name}_{key}"
                result = run_wsi(path, model, out, workers=0, options=WSIOptions(
                    tile=tile, overlap=overlap, attributes=False, merge_seams=merge,
                    tissue=TissueOptions(enabled=False)))
                drawn, duplicates = draw_nuclei(out / "nuclei.parquet", s.instances.shape)
                row[key] = (panoptic_quality(s.instances, drawn).pq,
                                       aggregated_jaccard_index(s.instances, drawn).value,
                                       result.summary["nuclei"]["total"], duplicates)
            rows.append(row)
            print(row["name"], {k: v for k, v in row.items() if k.startswith(("one", "wsi"))}, flush=True)
    return {"rows": rows, "seconds": time.perf_counter() - t0, "model": model_name}


def markdown(r: dict) -> str:
    rows = r["rows"]
    lines = [f"Model `{r['model']}`; {len(rows)} MoNuSeg test images (1000² px, 0.25 µm/px). PQ and AJI: mean over "
             "images (HoVer-Net definitions).", "",
             "| segmented | PQ | AJI | nuclei | duplicate pairs |", "|---|---|---|---|---|"]
    for key, label in (("one_pass", "whole image, one `model.segment` call"),
                       ("wsi_256", "`karyo wsi`, tiles 256 / overlap 64, seams merged"),
                       ("wsi_256_unmerged", "`karyo wsi`, tiles 256 / overlap 64, seams not merged"),
                       ("wsi_512", "`karyo wsi`, tiles 512 / overlap 128, seams merged")):
        vals = np.array([row[key] for row in rows], np.float64)
        lines.append(f"| {label} | {vals[:, 0].mean():.4f} | {vals[:, 1].mean():.4f} | {int(vals[:, 2].sum()):,} "
                     f"| {int(vals[:, 3].sum())} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="promptnucseg_cpu")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/monuseg_test"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.data)
    publish(markdown(result), "wsi_seams", "Whole-slide seams: one pass vs tiles (MoNuSeg test)",
            "benchmarks.wsi_seams", write=not args.no_docs)
    print(f"({result['seconds']:.0f} s; {invocation('benchmarks.wsi_seams')})")


if __name__ == "__main__":
    main()
