"""Does tiling a slide cost accuracy at the seams? Whole images in one pass vs `karyo wsi` tile by tile.

    python -m benchmarks.wsi_seams --model promptnucseg_cpu --threads 2 --images validation
    python -m benchmarks.wsi_seams --model promptnucseg_cpu --threads 2 --images monuseg

``validation``: the CoNSeP source images a prompter run held out (``--run``), each rebuilt as a 1024² mosaic
of its 16 patches (a 4×4 grid that does not overlap; a nucleus cut by a patch border stays two annotated pieces,
for every way of segmenting alike). This is where the tiling defaults are chosen. ``monuseg``: the 14 MoNuSeg
test images, to confirm on other organs; nothing is chosen on them.

Each image (40x, 0.25 µm/px) is written as a tiled TIFF stating that resolution and run
through the whole-slide engine (tissue detection off so every pixel is covered) with the tilings of ``RUNS``,
the seam merge on (the default) and off; its nuclei are drawn back from the polygons of ``nuclei.parquet``.
The same image segmented in one ``model.segment`` call is the reference a perfect stitch reproduces. Duplicates
are pairs of output nuclei whose polygons share at least half of the smaller one (within one model call there are
none: an instance map cannot overlap itself).

The merge rule (half of the smaller polygon, the larger kept) was fixed before this ran.
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


def validation_mosaics(run_dir: Path) -> list:
    """The CoNSeP source images whose 16 patches are all among the run's validation images, as 1024² mosaics."""
    from karyo.data.sample import Sample
    from karyo.train.pack import validation_samples

    by_source: dict[str, dict[int, object]] = {}
    for s in validation_samples(run_dir):
        source, _, k = s.name.rpartition("_")
        if source.startswith(("train_", "test_")) and k.isdigit():
            by_source.setdefault(source, {})[int(k)] = s
    mosaics = []
    for source, patches in sorted(by_source.items()):
        if sorted(patches) != list(range(16)):
            continue
        rows_img, rows_inst, offset = [], [], 0
        for r in range(4):
            row_img, row_inst = [], []
            for c in range(4):
                p = patches[4 * r + c]
                inst = p.instances.astype(np.int32)
                row_inst.append(np.where(inst > 0, inst + offset, 0))
                offset += int(inst.max())
                row_img.append(p.image[..., :3])
            rows_img.append(np.concatenate(row_img, axis=1))
            rows_inst.append(np.concatenate(row_inst, axis=1))
        mosaics.append(Sample(image=np.concatenate(rows_img), instances=np.concatenate(rows_inst), name=source))
    return mosaics


def run(model_name: str, images: str, run_dir: Path, data: Path) -> dict:
    model = karyo.load(model_name)
    if images == "validation":
        samples = validation_mosaics(run_dir)
    else:
        ds = LayoutDataset(data)
        samples = [ds[i] for i in range(len(ds))]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for s in samples:
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
    return {"rows": rows, "seconds": time.perf_counter() - t0, "model": model_name, "images": images}


def markdown(r: dict) -> str:
    rows = r["rows"]
    what = ("CoNSeP validation source images rebuilt from their patches (1024² px)" if r["images"] == "validation"
            else "MoNuSeg test images (1000² px)")
    lines = [f"Model `{r['model']}`; {len(rows)} {what}, 0.25 µm/px. PQ and AJI: mean over images (HoVer-Net "
             "definitions).", "",
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
    ap.add_argument("--images", choices=("validation", "monuseg"), default="validation")
    ap.add_argument("--run", type=Path, default=Path("runs/default_prompter_continue"),
                    help="validation: the prompter run whose held-out CoNSeP images to rebuild")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/monuseg_test"), help="monuseg: its folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.images, args.run, args.data)
    title = {"validation": "CoNSeP validation mosaics", "monuseg": "MoNuSeg test"}[args.images]
    publish(markdown(result), f"wsi_seams_{args.images}", f"Whole-slide seams: one pass vs tiles ({title})",
            "benchmarks.wsi_seams", write=not args.no_docs)
    print(f"({result['seconds']:.0f} s; {invocation('benchmarks.wsi_seams')})")


if __name__ == "__main__":
    main()
