"""Whole-slide inference at scale: peak memory, wall time against tissue area, and 1 vs 2 workers.

Data: a 20,000 × 20,000 px synthetic slide (0.25 µm/px, i.e. 5 × 5 mm) built from the 656 real CoNSeP H&E patches
(256², ../shared/data/consep): a random smooth field decides which 256² cells hold tissue (about half; the rest
is slightly noisy empty glass, so tissue detection matters), each tissue cell gets a random patch with a random
rotation/flip. It is written as a pyramidal tiled TIFF (JPEG tiles, levels ×1, ×4, ×16, pixel size in the
resolution tags) one tile at a time, never holding the slide in memory. The 5k² and 10k² slides are the top-left
crops of the same layout, so the runs differ in tissue area only.

Each run is ``karyo.infer.wsi.run_wsi(slide, "classical", out, workers=N)`` in a fresh process; a sampler polls
the memory of that process and all its descendants (dask nannies and workers) every 0.25 s. Reported: peak RSS
summed over the tree (counts shared pages once per process, so an upper bound) and peak PSS (shared pages split
between processes: the actual footprint), wall time, tiles/s, the per-stage sums from summary.json, and wall time
per mm² of tissue. Targets: peak RSS < 4 GiB; wall time linear in tissue area.

Run: ``python -m benchmarks.wsi_scale`` (all sizes, 1 and 2 workers), or e.g. ``--sizes 5000`` for a quick check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._report import update_section

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KARYO_SHARED", REPO.parent / "shared"))
CONSEP = SHARED / "data" / "consep"
MPP = 0.25
CELL = 256
FULL = 20_000
LEVELS = (4, 16)
GIB = 1024**3
RSS_TARGET = 4 * GIB


# ------------------------------------------------------------------------------------------------ the slide
class Layout:
    """Which 256² cell of the 20k² slide holds which patch (rotated/flipped), or glass. Crops share it."""

    def __init__(self, pool: list[np.ndarray], seed: int = 0):
        from scipy import ndimage as ndi

        rng = np.random.default_rng(seed)
        n = -(-FULL // CELL)
        field = ndi.gaussian_filter(rng.normal(size=(n, n)), 3.0)
        self.tissue = field > np.median(field)
        self.patch = rng.integers(0, len(pool), (n, n))
        self.turn = rng.integers(0, 4, (n, n))
        self.flip = rng.integers(0, 2, (n, n)).astype(bool)
        self.noise_seed = rng.integers(0, 2**31, (n, n))
        self.pool = pool

    def cell(self, i: int, j: int) -> np.ndarray:
        if not self.tissue[i, j]:
            rng = np.random.default_rng(int(self.noise_seed[i, j]))
            return np.clip(rng.normal(238.0, 2.5, (CELL, CELL, 3)), 0, 255).astype(np.uint8)
        img = np.rot90(self.pool[self.patch[i, j]], int(self.turn[i, j]))
        return np.ascontiguousarray(img[:, ::-1] if self.flip[i, j] else img)

    def region(self, y0: int, x0: int, size: int, limit: int) -> np.ndarray:
        """Level-0 pixels [y0, y0+size) × [x0, x0+size), glass-white beyond ``limit`` (the crop's edge)."""
        out = np.full((size, size, 3), 255, np.uint8)
        for i in range(y0 // CELL, min(-(-(y0 + size) // CELL), -(-limit // CELL))):
            for j in range(x0 // CELL, min(-(-(x0 + size) // CELL), -(-limit // CELL))):
                out[i * CELL - y0:(i + 1) * CELL - y0, j * CELL - x0:(j + 1) * CELL - x0] = self.cell(i, j)
        out[max(0, limit - y0):] = 255
        out[:, max(0, limit - x0):] = 255
        return out


def load_pool() -> list[np.ndarray]:
    from karyo.data.layout import LayoutDataset

    ds = LayoutDataset(CONSEP)
    return [ds[i].image[..., :3] for i in range(len(ds))]


def write_slide(path: Path, layout: Layout, size: int) -> dict:
    """Pyramidal JPEG-tiled TIFF of the top-left ``size``² of the layout, written tile by tile."""
    import tifffile

    def tiles(factor: int):
        span = CELL * factor
        for y in range(0, size, span):
            for x in range(0, size, span):
                reg = layout.region(y, x, span, size)
                if factor > 1:
                    reg = reg.reshape(CELL, factor, CELL, factor, 3).mean(axis=(1, 3), dtype=np.float32)
                    reg = np.round(reg).astype(np.uint8)
                yield reg

    tmp = path.with_suffix(".part.tif")
    opts = {"tile": (CELL, CELL), "photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 90}}
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(tiles(1), shape=(size, size, 3), dtype=np.uint8, subifds=len(LEVELS),
                  resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER", **opts)
        for f in LEVELS:
            n = -(-size // f)
            tif.write(tiles(f), shape=(n, n, 3), dtype=np.uint8, subfiletype=1, **opts)
    tmp.replace(path)
    cells = -(-size // CELL)
    return {"tissue_cells": float(layout.tissue[:cells, :cells].mean())}


# ------------------------------------------------------------------------------------------------ measuring
class TreeMemory(threading.Thread):
    """Peak RSS and PSS summed over a process and all its descendants, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            rss = pss = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_once(slide: Path, out: Path, workers: int) -> dict:
    code = ("import sys; from karyo.infer.wsi import run_wsi; "
            f"run_wsi({str(slide)!r}, 'classical', {str(out)!r}, workers={workers})")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mem = TreeMemory(proc.pid)
    mem.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    mem.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"run on {slide} with {workers} workers failed:\n{err.decode()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "peak_rss": mem.peak_rss, "peak_pss": mem.peak_pss, "processes": mem.peak_procs,
            "summary": summary}


# ------------------------------------------------------------------------------------------------ report
def report(rows: list[dict], command: str, load: tuple[float, float, float]) -> str:
    calibrated = rows[0]["summary"]["model"].get("calibrated_for_slide")
    lines = ["Slides: top-left crops of one 20,000² px synthetic slide (0.25 µm/px) tiled from the 656 real CoNSeP "
             "patches with random rotations/flips, about half empty glass; pyramidal JPEG-tiled TIFF. Model: "
             f"`classical` ({'threshold fixed per slide by for_slide' if calibrated else 'Otsu threshold per tile'}), "
             "tiles 256 px with 64 px overlap, per-nucleus attributes on. Each run is a fresh process; memory is "
             "sampled over it and all its descendants (dask nannies and workers).",
             "",
             "| slide | tissue mm² | tiles (tissue / all) | nuclei | workers | wall s | s per mm² tissue | tiles/s "
             "| peak RSS (tree) | peak PSS (tree) | read / model / post-process / write s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        t = s["timing_s"]
        area = s["tissue"]["area_mm2"]
        lines.append(
            f"| {r['size']:,}² | {area:.2f} | {s['tiling']['tiles_with_tissue']:,} / {s['tiling']['tiles_total']:,} "
            f"| {s['nuclei']['total']:,} | {r['workers']} | {r['wall']:.1f} | {r['wall'] / area:.1f} "
            f"| {s['tiling']['tiles_with_tissue'] / t['compute_wall']:.1f} | {r['peak_rss'] / GIB:.2f} GiB "
            f"| {r['peak_pss'] / GIB:.2f} GiB | {t['read_sum']:.1f} / {t['model_sum']:.1f} / "
            f"{t['postprocess_sum']:.1f} / {t['write']:.1f} |")
    notes = [
        "",
        "Stage times are summed over tiles (read, model, post-process: in the workers; write: parts, manifest and "
        "the ordered merge into Parquet/GeoJSON/overlay, in the main process). tiles/s counts the compute phase "
        "only; wall time includes process start, tissue detection, cluster start-up and the final files.",
    ]
    by_workers: dict[int, list[dict]] = {}
    for r in rows:
        by_workers.setdefault(r["workers"], []).append(r)
    for w, rs in sorted(by_workers.items()):
        if len(rs) >= 2:
            area = np.array([r["summary"]["tissue"]["area_mm2"] for r in rs])
            wall = np.array([r["wall"] for r in rs])
            slope, icept = np.polyfit(area, wall, 1)
            pred = slope * area + icept
            r2 = 1 - np.sum((wall - pred) ** 2) / max(np.sum((wall - wall.mean()) ** 2), 1e-12)
            notes.append(f"- {w} worker(s): wall ≈ {icept:.1f} s + {slope:.1f} s/mm² × tissue area (R² = {r2:.4f}).")
    sizes = sorted({r["size"] for r in rows})
    for size in sizes:
        one = [r for r in rows if r["size"] == size and r["workers"] == 1]
        two = [r for r in rows if r["size"] == size and r["workers"] == 2]
        if one and two:
            a, b = one[0], two[0]
            ta = a["summary"]["tiling"]["tiles_with_tissue"] / a["summary"]["timing_s"]["compute_wall"]
            tb = b["summary"]["tiling"]["tiles_with_tissue"] / b["summary"]["timing_s"]["compute_wall"]
            notes.append(f"- {size:,}²: 2 workers are {a['wall'] / b['wall']:.2f}× as fast as 1 end to end, "
                         f"{tb / ta:.2f}× in tiles/s during the compute phase.")
    worst = max(r["peak_rss"] for r in rows)
    notes.append(f"- Peak RSS over all runs: {worst / GIB:.2f} GiB (target < 4 GiB: "
                 f"{'met' if worst < RSS_TARGET else 'MISSED'}).")
    notes.append(f"- Load average when the benchmark started: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
                 f"(other jobs on the machine slow every run alike).")
    return "\n".join(lines + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "wsi_scale")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not CONSEP.is_dir():
        print(f"CoNSeP not found at {CONSEP} (set KARYO_SHARED)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    layout = None
    slides = {}
    for size in sorted(args.sizes):
        path = args.out / f"synthetic_{size}.tif"
        if not path.is_file():
            if layout is None:
                layout = Layout(load_pool())
            t0 = time.perf_counter()
            write_slide(path, layout, size)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        slides[size] = path
    layout = None
    rows = []
    for size in sorted(args.sizes):
        for workers in args.workers:
            out = args.out / f"run_{size}_w{workers}"
            r = run_once(slides[size], out, workers)
            r.update(size=size, workers=workers)
            rows.append(r)
            s = r["summary"]
            print(f"{size}² {workers} worker(s): {s['nuclei']['total']:,} nuclei, {r['wall']:.1f} s, peak RSS "
                  f"{r['peak_rss'] / GIB:.2f} GiB (PSS {r['peak_pss'] / GIB:.2f})", flush=True)
    command = "python -m benchmarks.wsi_scale" + ("" if args.sizes == [5000, 10000, 20000] else
                                                  " --sizes " + " ".join(map(str, args.sizes)))
    body = report(rows, command, load)
    print(body)
    (args.out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items()} for r in rows], indent=1, default=str))
    if not args.no_report:
        update_section("wsi_scale", "Whole-slide inference: memory, scaling with tissue area, 1 vs 2 workers",
                       body, command)
    return 0 if all(r["peak_rss"] < RSS_TARGET for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
