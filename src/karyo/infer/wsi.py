"""Whole-slide inference: any karyo model over a slide, with bounded memory, resume and dask.distributed.

The engine runs these steps; each is a method, so a variant overrides one step and keeps the rest (the layout of
TIAToolbox's engines):

1. :meth:`WSIEngine.open_slide` reads the pyramid and the pixel size (file metadata or ``mpp``; neither: error).
2. :meth:`WSIEngine.detect_tissue` finds tissue on a low-resolution read (``tissue_mask.png``); no tissue: error.
3. :meth:`WSIEngine.plan` lays overlapping tiles over the slide *at the model's resolution* (``model.config.mpp``)
   and keeps those whose core touches tissue (ownership rule: :mod:`karyo.infer.tiling`).
4. :meth:`WSIEngine.calibrate` lets a model that uses image-level statistics fix them once for the whole slide,
   from a sample of tissue tiles, if it offers ``model.for_slide(images, mpp=...) -> InstanceModel``; without it
   every tile is an independent image.
5. :meth:`WSIEngine.execute` computes the tiles, in this process (``workers=0``) or on dask.distributed (a local
   cluster of ``workers`` processes, or ``scheduler=tcp://host:port``), with a bounded number of tiles in flight.
   Per tile, :class:`TileProcessor` reads (resampling to the model's mpp), predicts and keeps the nuclei the tile
   owns, as rows in level-0 slide coordinates.
6. Results come back to this process, which writes each tile's part and manifest line and merges parts in tile
   order into ``nuclei.parquet`` and ``nuclei.geojson`` (:mod:`karyo.infer.wsi_writer`; a nucleus two tiles both
   found is kept once, and overlaps between neighbouring tiles' nuclei are cut: ``SeamDuplicates``), then writes
   ``tissue_mask.png``, ``overlay.png`` and ``summary.json`` (counts per class, densities per mm² of tissue,
   time per stage).

Memory does not grow with the number of nuclei: the main process holds the tile list, the overlay canvas (at most
``overlay_max_size``²), one Parquet row group and at most ``tiles_in_flight`` × worker threads tile results; each
worker holds one tile and its model. Distribution: the model is loaded once per worker by a dask WorkerPlugin (by
name on the worker, or the pickled object when it was given as one or calibrated); tiles are submitted in a bounded
window and their results are written by the main process in tile order, so the files do not depend on the number
of workers. Local workers are forked from a server that has imported karyo already (forkserver), which starts
them in well under a second.

Coordinates in the outputs are level-0 slide pixels: ``centroid_x/y`` as pixel indices (pixel centre = integer, as
:meth:`SegmentationResult.table`), polygons as continuous coordinates where pixel (r, c) covers [c, c+1) × [r, r+1)
(QuPath's convention), bounding boxes half-open. Attribute columns (``Size.*``, ``Shape.*``, ...) are measured at
the model's resolution (``summary.json`` ``model.mpp``) and, like ``area``, given in level-0 px (lengths) and px²
(areas); ``area_um2`` is in µm². A nucleus cut at a tile seam (it overlapped a neighbour another tile kept) has
``seam_clipped`` true and NaN outline attributes (``Size.*``, ``Shape.*``, ``Orientation.*``, ``Boundary.*``:
they were measured on the uncut mask); its intensity means are those of the uncut mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import shapely
from scipy import ndimage as ndi

from karyo.attributes.names import LENGTH_POWER, MICRON_COLUMNS
from karyo.data.io import write_image, write_text
from karyo.data.slide import Slide, SlideSpec, open_slide
from karyo.errors import InputError, KaryoError
from karyo.infer.result import SegmentationResult
from karyo.infer.tiling import Tile, core_box, plan_tiles
from karyo.infer.tissue import TissueMask, TissueOptions, slide_tissue
from karyo.infer.wsi_writer import (
    ATTRIBUTE_COLUMNS,
    OrderedMerger,
    OutputLock,
    OverlayPainter,
    SeamDuplicates,
    TileLedger,
    WorkDir,
    part_schema,
    writing,
)

if TYPE_CHECKING:
    from karyo.models.base import InstanceModel

log = logging.getLogger(__name__)

CACHE_NAME = ".karyo-cache"
#: Layout of the work folder's parts and of the outputs. Raise it whenever they change (columns, units, meaning):
#: it is part of the settings a resume must match, so a run begun by a karyo with another layout is refused.
#: 2: parts gained ``seam_clipped``.
WSI_FORMAT = 2
STAGES = ("read", "model", "postprocess")


@dataclass(frozen=True)
class WSIOptions:
    """Settings of a whole-slide run besides the slide, the model and where the work runs."""

    tile: int = 256  # px at the model's resolution
    overlap: int = 64  # px; must be ≥ 2 × the largest nucleus radius (see karyo.infer.tiling)
    tissue: TissueOptions = field(default_factory=TissueOptions)
    attributes: bool = True  # per-nucleus morphology and intensity columns (karyo.attributes)
    simplify: float = 0.0  # polygon simplification tolerance, model px (0: exact pixel outlines)
    calibration_tiles: int = 32  # tissue tiles shown to model.for_slide, if the model has it
    overlay_max_size: int = 2048  # longest side of overlay.png at most, px
    row_group_size: int = 16384  # nuclei per Parquet row group (the merge buffers one: ~30 MB with polygons)
    tiles_in_flight: int = 2  # per worker thread: how far submission runs ahead of completion
    backend: str = "auto"  # slide reader (karyo.data.slide.BACKENDS)
    device: str = "cpu"  # where a model loaded by name runs (here and on each worker): cpu, cuda, mps, auto
    scheduler_timeout: float = 30.0  # seconds to wait for an existing dask scheduler
    threads: int | None = None  # torch threads per worker (None: the cores shared out among local workers)
    merge_seams: bool = True  # one nucleus where two tiles both found it (wsi_writer.SeamDuplicates); False: both


@dataclass
class TileResult:
    """What one tile sends back: its owned nuclei as a part table, timings, or the error that stopped it."""

    tile: int
    table: pa.Table | None
    times: dict[str, float]
    truncated: int = 0
    error: tuple[str | None, str] | None = None

    @property
    def n_nuclei(self) -> int:
        return 0 if self.table is None else self.table.num_rows


@dataclass
class TileProcessor:
    """The per-tile steps (read → predict → post-process). Pickled to the workers; subclass to change a step."""

    slide: SlideSpec
    factor: float  # level-0 px per model px
    model_mpp: float
    image_size: tuple[int, int]  # (width, height) at the model's resolution
    attributes: bool = True
    simplify: float = 0.0

    def read(self, slide: Slide, tile: Tile) -> np.ndarray:
        """The tile as RGB uint8 at the model's resolution (area-averaged when the slide is finer)."""
        if abs(self.factor - 1.0) < 1e-9:
            return slide.read_level(0, tile.x, tile.y, tile.width, tile.height)
        level = slide.best_level(self.factor)
        sx, sy = slide.level_scale(level)
        rx, ry = self.factor / sx, self.factor / sy  # level px per model px
        sig_x, sig_y = max(0.0, (rx - 1) / 2), max(0.0, (ry - 1) / 2)
        mx, my = math.ceil(4 * sig_x) + 2, math.ceil(4 * sig_y) + 2
        x0, y0 = math.floor(tile.x * rx) - mx, math.floor(tile.y * ry) - my
        x1, y1 = math.ceil((tile.x + tile.width) * rx) + mx, math.ceil((tile.y + tile.height) * ry) + my
        region = slide.read_level(level, x0, y0, x1 - x0, y1 - y0).astype(np.float32)
        out = np.empty((tile.height, tile.width, 3), np.uint8)
        # model pixel j has its centre at (tile.x + j + 0.5) · rx in the level's continuous coordinates
        offset = ((tile.y + 0.5) * ry - 0.5 - y0, (tile.x + 0.5) * rx - 0.5 - x0)
        for c in range(3):
            plane = region[..., c]
            if sig_x > 0 or sig_y > 0:
                plane = ndi.gaussian_filter(plane, (sig_y, sig_x), mode="nearest")
            res = ndi.affine_transform(plane, (ry, rx), offset=offset, output_shape=out.shape[:2], order=1,
                                       mode="nearest")
            out[..., c] = np.clip(np.round(res), 0, 255)
        return out

    def predict(self, model, image: np.ndarray) -> SegmentationResult:
        """The model on one tile (already at the model's resolution)."""
        return model.segment(image, mpp=self.model_mpp)

    def postprocess(self, result: SegmentationResult, image: np.ndarray, tile: Tile) -> tuple[pa.Table, int]:
        """Rows of the nuclei this tile owns (centroid in its core), in level-0 coordinates; and how many of them
        touch an interior tile edge (the overlap was too small for them)."""
        schema = part_schema(self.attributes)
        table = result.table()
        if table.empty:
            return schema.empty_table(), 0
        cx = table["centroid_x"].to_numpy() + 0.5 + tile.x  # continuous model-resolution coordinates
        cy = table["centroid_y"].to_numpy() + 0.5 + tile.y
        own = tile.owns(cx, cy)
        if not own.any():
            return schema.empty_table(), 0
        table = table[own]
        cx, cy = cx[own], cy[own]
        width, height = self.image_size
        bx0, by0 = table["bbox_x0"].to_numpy(), table["bbox_y0"].to_numpy()
        bx1, by1 = table["bbox_x1"].to_numpy(), table["bbox_y1"].to_numpy()
        truncated = int(np.count_nonzero(((bx0 == 0) & (tile.x > 0)) | ((by0 == 0) & (tile.y > 0))
                                         | ((bx1 >= tile.width) & (tile.x + tile.width < width))
                                         | ((by1 >= tile.height) & (tile.y + tile.height < height))))
        ids = table["instance_id"].to_numpy()
        polys = _polygons(result.instances, ids, (tile.x, tile.y), self.simplify, self.factor)
        f = self.factor
        area = table["area"].to_numpy().astype(np.float64)
        cols: dict[str, Any] = {
            "tile": np.full(len(ids), tile.index, np.int32),
            "centroid_x": cx * f - 0.5, "centroid_y": cy * f - 0.5,
            "bbox_x0": np.floor((bx0 + tile.x) * f + 1e-9).astype(np.int64),
            "bbox_y0": np.floor((by0 + tile.y) * f + 1e-9).astype(np.int64),
            "bbox_x1": np.ceil((bx1 + tile.x) * f - 1e-9).astype(np.int64),
            "bbox_y1": np.ceil((by1 + tile.y) * f - 1e-9).astype(np.int64),
            "area": area * f * f, "area_um2": area * self.model_mpp ** 2,
            "class_id": table["class_id"].to_numpy().astype(np.int32),
            "class_name": table["class_name"].astype(str).tolist(),
            "score": table["score"].to_numpy().astype(np.float64),
            "polygon_wkb": shapely.to_wkb(polys).tolist(),
            "seam_clipped": np.zeros(len(ids), bool),  # set by the merge (wsi_writer.SeamDuplicates)
        }
        if self.attributes:
            cols.update(_attributes(image, result.instances, ids, f, self.model_mpp / f))
        return pa.Table.from_pydict(cols, schema=schema), truncated

    def process(self, model, slide: Slide, tile: Tile) -> TileResult:
        """All steps on one tile, timed; a karyo error is returned (exceptions of ours do not pickle)."""
        times = {}
        try:
            t0 = time.perf_counter()
            image = self.read(slide, tile)
            t1 = time.perf_counter()
            result = self.predict(model, image)
            t2 = time.perf_counter()
            table, truncated = self.postprocess(result, image, tile)
            t3 = time.perf_counter()
        except KaryoError as exc:
            return TileResult(tile.index, None, times, error=(getattr(exc, "source", None),
                                                              getattr(exc, "problem", str(exc))))
        times = {"read": t1 - t0, "model": t2 - t1, "postprocess": t3 - t2}
        return TileResult(tile.index, table, times, truncated)


def _polygons(instances: np.ndarray, ids: np.ndarray, offset: tuple[int, int], simplify: float,
              factor: float) -> np.ndarray:
    from shapely.geometry import box

    from karyo.export.polygons import instance_polygons

    polys = instance_polygons(instances, [int(i) for i in ids], simplify=simplify, offset=offset)
    out = []
    for i in ids:
        poly = polys.get(int(i))
        if poly is None:  # cannot happen for a non-empty mask; keep the row with its pixel box anyway
            rr, cc = np.nonzero(instances == i)
            poly = box(cc.min() + offset[0], rr.min() + offset[1], cc.max() + 1 + offset[0], rr.max() + 1 + offset[1])
        out.append(poly)
    geoms = np.array(out, dtype=object)
    if factor != 1.0:
        geoms = shapely.transform(geoms, lambda xy: xy * factor)
    return geoms


# Recorded in the parquet metadata and in the resume settings: a run begun when Size.* came in model px must
# not be resumed into a parquet whose other rows are in level-0 px.
ATTRIBUTE_UNITS = "level-0 pixels (Size.* lengths, px; Size.ConvexHullArea, px²), and µm twins (*_um, *_um2)"


def _attributes(image: np.ndarray, instances: np.ndarray, ids: np.ndarray, factor: float,
                level0_mpp: float | None = None) -> dict[str, np.ndarray]:
    """The attributes of ``ids``, measured on the model-resolution tile; lengths and areas in level-0 px
    (× ``factor`` or its square), so that they share the unit of ``area`` and the coordinates, and (with
    ``level0_mpp``) their µm twins."""
    from karyo.attributes import measure_arrays

    cols = measure_arrays(image, instances)
    labels = cols["Identifier.Label"]
    pos = np.searchsorted(labels, ids)
    out = {c: np.asarray(cols[c], dtype=np.float64)[pos] * factor ** LENGTH_POWER.get(c, 0)
           for c in ATTRIBUTE_COLUMNS}
    if level0_mpp is not None:
        out.update({MICRON_COLUMNS[c]: out[c] * level0_mpp ** LENGTH_POWER[c] for c in ATTRIBUTE_COLUMNS
                    if c in MICRON_COLUMNS})
    return out


# ------------------------------------------------------------------------------------------------ workers
_WORKER_SLIDES: dict[SlideSpec, Slide] = {}


def _worker_slide(spec: SlideSpec) -> Slide:
    """One open reader per slide and process (workers reuse it across tiles)."""
    slide = _WORKER_SLIDES.get(spec)
    if slide is None:
        _forget_worker_slides()
        slide = _WORKER_SLIDES[spec] = spec.open()
    return slide


def _forget_worker_slides() -> None:
    """Close the process's cached readers. A module function: the worker plugin (a local class, which cloudpickle
    ships by value with the globals its methods name) must not name the cache, whose open files do not pickle
    (they are there when an in-process dask worker has run before)."""
    for old in _WORKER_SLIDES.values():
        with contextlib.suppress(Exception):
            old.close()
    _WORKER_SLIDES.clear()


def _load_model(source, device: str = "cpu"):
    if isinstance(source, str):
        from karyo.models import load

        return load(source, device=device)
    return source


def _limit_threads(threads: int | None) -> None:
    if threads and "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def _model_plugin(source, torch_threads: int | None, device: str = "cpu"):
    """A dask WorkerPlugin that loads the model once per worker (by name on the worker, or unpickled)."""
    from distributed import WorkerPlugin

    class KaryoModelPlugin(WorkerPlugin):
        def __init__(self):
            self.source = source
            self.torch_threads = torch_threads
            self.model = None

        def setup(self, worker) -> None:
            import signal

            with contextlib.suppress(ValueError):  # not the main thread: nothing to change
                # Ctrl-C reaches the whole process group: the main process stops the run and the cluster; a worker
                # dying of it on its own only adds tracebacks to the terminal
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            self.model = _load_model(self.source, device)
            _limit_threads(self.torch_threads)

        def teardown(self, worker) -> None:
            self.model = None
            _forget_worker_slides()

    return KaryoModelPlugin()


@contextlib.contextmanager
def _fast_worker_start():
    """Start local workers by forking a server that has already imported karyo (and torch), where the platform
    has forkserver: a worker is up in a fraction of a second instead of importing everything again, and the
    imported code is shared between workers (copy-on-write) instead of loaded once per process."""
    import multiprocessing

    import dask

    if "forkserver" not in multiprocessing.get_all_start_methods():
        yield
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        from distributed.utils import get_mp_context

        get_mp_context().set_forkserver_preload(["distributed", "karyo.infer.wsi", "karyo.models",
                                                 "karyo.infer._forkserver"])  # last: see that module
        _start_forkserver_deaf_to_ctrl_c()
        yield


def _start_forkserver_deaf_to_ctrl_c() -> None:
    """Start the fork server with SIGINT ignored, as it ignores it itself once its imports are done: a Ctrl-C in
    the seconds it imports (it shares the terminal's process group) printed a KeyboardInterrupt traceback from
    inside ``import torch`` under the run's one-line "interrupted" message. Python keeps an ignored SIGINT
    ignored at start-up; :mod:`karyo.infer._forkserver`, imported last there, restores it for the workers."""
    import signal
    import threading
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


MAIN_GUARD_HINT = ("put the call under `if __name__ == \"__main__\":` (local dask workers are new processes that "
                   "import the calling script again), or pass workers=0")


def check_not_bootstrapping() -> None:
    """Refuse to run inside a worker process that is still importing the calling script (a script without the
    ``if __name__ == "__main__":`` guard): it would start a cluster of its own and fail with pages of tracebacks.
    The worker ends quietly after one line; the run in the parent reports the failed start (see ``execute``)."""
    import multiprocessing

    # spawn/forkserver children import the parent's main script with this flag set (parent_process() is set only
    # afterwards, when the child's own process object starts)
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    print(f"karyo: run_wsi was called while a worker process was starting; {MAIN_GUARD_HINT}", file=sys.stderr,
          flush=True)
    raise SystemExit(1)


def _cluster_failed(exc: BaseException) -> KaryoError:
    """The error for a local cluster that did not start, with the likely cause when run from a script."""
    main = sys.modules.get("__main__")
    # a script, or a module run with ``python -m`` (it has a __spec__ too): both are imported again by each worker
    script = getattr(main, "__file__", None)
    why = f"{type(exc).__name__}: {exc}"
    if script:
        return KaryoError(f"the local dask workers failed to start ({why}); when run_wsi is called from a script or "
                          f"a module run with python -m, {MAIN_GUARD_HINT}")
    return KaryoError(f"the local dask workers failed to start ({why}); pass workers=0 to compute in this process")


def _quiet_dask_teardown() -> None:
    """Silence the shutdown of a cluster stopped by Ctrl-C or SIGTERM, which can come while workers are still
    starting: distributed logs each failed start, asyncio each task left behind, and a half-started cluster fails
    again in distributed's exit hook (pages of tracebacks under the one-line hint), so it is closed here. The levels
    stay raised: the rest of that shutdown happens when the process exits."""
    for name in ("distributed", "asyncio", "tornado"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        from distributed.core import Status
        from distributed.deploy.spec import SpecCluster
    except ImportError:
        return
    for cluster in list(SpecCluster._instances):  # close them now, quietly, rather than in the exit hook
        if getattr(cluster, "shutdown_on_close", False) and getattr(cluster, "status", None) != Status.closed:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
            cluster.shutdown_on_close = False


def _dask_tile(processor: TileProcessor, tile: Tile, plugin: str) -> TileResult:
    from distributed import get_worker

    model = get_worker().plugins[plugin].model
    return processor.process(model, _worker_slide(processor.slide), tile)


# ------------------------------------------------------------------------------------------------ progress
class _Progress:
    """Rich progress bar (tiles, nuclei, rate, ETA) and/or a callback ``(done, total, nuclei)``. Nuclei are those
    of the finished tiles less the seam duplicates removed so far, so the last report is the final count."""

    def __init__(self, progress: bool | Callable[[int, int, int], None], total: int, done: int, found: int,
                 removed: int = 0):
        self.callback = progress if callable(progress) else None
        self.total, self.done, self.found = total, done, found
        self.nuclei = found - removed
        self._start_done, self._t0 = done, None
        self._bar = None
        if progress is True:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("tiles"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[nuclei]:,} nuclei"), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("wsi", total=total, completed=done, nuclei=self.nuclei, rate="")

    def advance(self, found: int, removed: int = 0) -> None:
        """One more tile, with ``found`` nuclei; ``removed``: seam duplicates removed so far in all."""
        self.done += 1
        self.found += found
        self.nuclei = self.found - removed
        if self._bar is not None:
            now = time.perf_counter()
            if self._t0 is None:  # the rate starts at the first finished tile (not at cluster start-up)
                self._t0, self._start_done = now, self.done
            rate = (self.done - self._start_done) / max(now - self._t0, 1e-9)
            self._bar.update(self._task, completed=self.done, nuclei=self.nuclei,
                             rate=f"{rate:.1f} tiles/s" if self.done > self._start_done else "")
        if self.callback is not None:
            self.callback(self.done, self.total, self.nuclei)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ------------------------------------------------------------------------------------------------ engine
@dataclass
class WSIResult:
    """A finished run: where its files are and its summary (what summary.json holds)."""

    out_dir: Path
    summary: dict
    paths: dict[str, Path]


class WSIEngine:
    """Whole-slide inference; see the module docstring for the steps. ``run`` drives them."""

    processor_class: type[TileProcessor] = TileProcessor

    def __init__(self, model, *, options: WSIOptions | None = None, workers: int | None = None,
                 scheduler: str | None = None, progress: bool | Callable[[int, int, int], None] = False):
        self.model_source = model
        self.options = options or WSIOptions()
        self.workers = workers
        self.scheduler = scheduler
        self.progress = progress
        self._started_work = False  # this run reset OUT's work folder (so a refusal may clear it again)
        self._unlocked: InputError | None = None  # OUT could not be locked (read-only): fine unless we write

    # -------------------------------------------------------------------- steps
    def open_slide(self, path: Path, mpp: float | None, cache_dir: Path) -> Slide:
        slide = open_slide(path, mpp=mpp, backend=self.options.backend, cache_dir=cache_dir)
        if slide.mpp is None:
            slide.close()
            raise InputError(path, "the file does not state its pixel size (microns per pixel); pass it with "
                                   "--mpp (e.g. 0.25 for a 40× scan, 0.5 for 20×)")
        return slide

    def load_model(self):
        """The model object (names and folders are loaded here, and again by name on each dask worker)."""
        source = self.model_source
        return _load_model(os.fspath(source) if isinstance(source, os.PathLike) else source, self.options.device)

    def detect_tissue(self, slide: Slide) -> tuple[TissueMask, np.ndarray]:
        return slide_tissue(slide, self.options.tissue)

    def plan(self, slide: Slide, model_mpp: float, tissue: TissueMask) -> tuple[list[Tile], list[Tile], float,
                                                                                   tuple[int, int]]:
        """All tiles, those to compute (core touches tissue), level-0 px per model px and the model-res size."""
        factor = model_mpp / float(slide.mpp)
        if abs(factor - 1.0) < 1e-6:
            factor = 1.0
        w0, h0 = slide.dimensions
        width, height = math.ceil(w0 / factor - 1e-9), math.ceil(h0 / factor - 1e-9)
        tiles = plan_tiles(width, height, self.options.tile, self.options.overlap)
        boxes = np.array([[v * factor for v in core_box(t, width, height)] for t in tiles])
        keep = tissue.box_fractions(boxes) > 0
        return tiles, [t for t, k in zip(tiles, keep, strict=True) if k], factor, (width, height)

    def calibrate(self, model, processor: TileProcessor, slide: Slide, tiles: list[Tile]):
        """``model.for_slide(sample, mpp=...)`` on an evenly spread sample of tissue tiles, if the model has it."""
        hook = getattr(model, "for_slide", None)
        if not callable(hook) or not tiles:
            return model
        n = min(self.options.calibration_tiles, len(tiles))
        picks = np.unique(np.linspace(0, len(tiles) - 1, n).round().astype(int))
        images = [processor.read(slide, tiles[i]) for i in picks]
        return hook(images, mpp=processor.model_mpp)

    def execute(self, processor: TileProcessor, model, slide: Slide, tiles: list[Tile],
                on_result: Callable[[TileResult], None], worker_model: Any = None) -> dict:
        """Compute ``tiles`` and hand each result to ``on_result`` as it arrives; returns how the work ran.

        ``worker_model`` is what dask workers load: a model name (each worker loads its own copy) or the model
        object itself (pickled once per worker); default ``model``.
        """
        if self.scheduler is None and self.workers == 0:
            _limit_threads(self.options.threads)
            for tile in tiles:
                on_result(processor.process(model, slide, tile))
            return {"mode": "in-process", "workers": 0, "threads": 1, "torch_threads": self.options.threads}
        if not tiles:
            return {"mode": "dask", "note": "nothing left to compute"}
        return self._execute_dask(processor, model if worker_model is None else worker_model, tiles, on_result)

    def _execute_dask(self, processor: TileProcessor, source: Any, tiles: list[Tile],
                      on_result: Callable[[TileResult], None]) -> dict:

        quiet = logging.getLogger("distributed")
        level = quiet.level
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(quiet.setLevel, level)  # last out: after the cluster has gone (see below)
                try:
                    return self._run_on_dask(stack, processor, source, tiles, on_result)
                except KeyboardInterrupt:
                    # the cluster is torn down mid-run (or mid-start) on purpose: its complaints are noise
                    _quiet_dask_teardown()
                    raise
        except KeyboardInterrupt:
            _quiet_dask_teardown()  # again: the stack restored the level, and the rest of the teardown runs at exit
            raise

    def _run_on_dask(self, stack: contextlib.ExitStack, processor: TileProcessor, source: Any, tiles: list[Tile],
                     on_result: Callable[[TileResult], None]) -> dict:
        from distributed import Client, LocalCluster, as_completed

        if self.scheduler is not None:
            try:
                client = stack.enter_context(Client(self.scheduler,
                                                     timeout=f"{self.options.scheduler_timeout}s"))
                client.wait_for_workers(1, timeout=self.options.scheduler_timeout)
            except (OSError, TimeoutError) as exc:
                why = str(exc) or f"no worker joined within {self.options.scheduler_timeout:g} s"
                raise InputError(None, f"cannot use the dask scheduler {self.scheduler} ({why})") from None
            torch_threads = self.options.threads
        else:
            n = self.workers if self.workers is not None else (os.cpu_count() or 1)
            stack.enter_context(_fast_worker_start())
            try:
                cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                           dashboard_address=None, silence_logs=logging.ERROR))
            except (RuntimeError, OSError, TimeoutError) as exc:
                raise _cluster_failed(exc) from None
            client = stack.enter_context(Client(cluster))
            torch_threads = self.options.threads or max(1, (os.cpu_count() or 1) // n)
        plugin = f"karyo-model-{uuid.uuid4().hex[:12]}"
        client.register_plugin(_model_plugin(source, torch_threads, self.options.device), name=plugin)
        if self.scheduler is not None:
            stack.callback(_quietly, client.unregister_worker_plugin, plugin)
        info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else client.scheduler_info()
        threads = sum(w.get("nthreads", 1) for w in info["workers"].values()) or 1
        window = max(2, self.options.tiles_in_flight * threads)
        [proc] = client.scatter([processor], broadcast=True)
        todo = iter(tiles)
        running = set()

        def submit(tile: Tile):
            fut = client.submit(_dask_tile, proc, tile, plugin, key=f"karyo-tile-{tile.index}-{plugin}",
                                pure=False, retries=1)
            running.add(fut)
            return fut

        try:
            pending = as_completed([submit(t) for t in _take(todo, window)])
            for fut in pending:
                result = fut.result()
                running.discard(fut)
                fut.release()
                on_result(result)
                nxt = next(todo, None)
                if nxt is not None:
                    pending.add(submit(nxt))
        finally:
            if running:
                with contextlib.suppress(Exception):
                    client.cancel(list(running))
        return {"mode": "dask", "scheduler": self.scheduler or "LocalCluster", "workers": len(info["workers"]),
                "threads": threads, "torch_threads": torch_threads, "tiles_in_flight": window}

    # -------------------------------------------------------------------- driver
    def run(self, slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, mpp: float | None = None,
            resume: bool = False) -> WSIResult:
        """Run on ``slide_path`` into ``out_dir`` (see :func:`run_wsi`); ``out_dir`` is locked while it runs."""
        t_start = time.perf_counter()
        check_not_bootstrapping()
        slide_path, out_dir = Path(slide_path), Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(out_dir, "the output (--out) must be a folder, and this is a file")
        created = not out_dir.exists()
        self._started_work = False
        with writing("the output folder", out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
        timing: dict[str, float] = {}
        cache_dir = out_dir / CACHE_NAME
        self._unlocked = None
        lock = OutputLock(out_dir)  # a second run into OUT would delete this one's work folder
        try:
            try:
                lock.acquire()
            except InputError as exc:  # read-only: a resume may still find the run complete (nothing to write)
                if not (resume and lock.unwritable and (out_dir / "summary.json").is_file()):
                    raise
                self._unlocked = exc
            try:
                try:
                    slide = self.open_slide(slide_path, mpp, cache_dir)
                    try:
                        result = self._run(slide, slide_path, out_dir, cache_dir, mpp, resume, timing, t_start)
                    finally:
                        slide.close()
                except KaryoError:  # refused (unreadable, no pixel size, no tissue, changed settings): nothing
                    shutil.rmtree(cache_dir, ignore_errors=True)  # will resume from the decoded image
                    work = WorkDir(out_dir)
                    if self._started_work and work.exists() and not len(work.finished()):  # nor from this run,
                        work.remove()  # which finished no tile
                    raise
                except KeyboardInterrupt:  # before any tile was finished, an OUT this run made keeps nothing
                    work = WorkDir(out_dir)
                    if created and not (work.exists() and len(work.finished())):
                        shutil.rmtree(cache_dir, ignore_errors=True)
                        work.remove()
                    raise
            finally:
                lock.release()
        except (KaryoError, KeyboardInterrupt):
            if created:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # only if the refusal or interruption left it empty
            raise
        # (interrupted or crashed: the cache stays, --resume reuses the decoded image)
        shutil.rmtree(cache_dir, ignore_errors=True)  # complete, or found complete by --resume
        return result

    def _run(self, slide: Slide, slide_path: Path, out_dir: Path, cache_dir: Path, mpp: float | None, resume: bool,
             timing: dict[str, float], t_start: float) -> WSIResult:
        opts = self.options
        model = self.load_model()
        model_mpp = float(getattr(getattr(model, "config", None), "mpp", None) or slide.mpp)

        t = time.perf_counter()
        tissue, _ = self.detect_tissue(slide)
        timing["tissue"] = time.perf_counter() - t
        if not tissue.mask.any():
            see = ""
            if not (out_dir / "summary.json").exists() and not WorkDir(out_dir).exists():  # never over a run's mask
                self._write_mask(out_dir, tissue)
                see = f"; see {out_dir / 'tissue_mask.png'}"
            raise InputError(slide_path, f"no tissue found (saturation threshold {tissue.threshold:.3f}{see}); is "
                                         f"the slide blank, or is this not a brightfield H&E image?")
        all_tiles, tiles, factor, size = self.plan(slide, model_mpp, tissue)
        spec = SlideSpec(str(slide_path.resolve()), opts.backend, mpp, str(cache_dir.resolve()))
        processor = self.processor_class(spec, factor, model_mpp, size, opts.attributes, opts.simplify)
        t = time.perf_counter()
        calibrated = self.calibrate(model, processor, slide, tiles)
        timing["calibrate"] = time.perf_counter() - t
        # A model named by the caller and unchanged by calibration loads on each worker from its installation;
        # otherwise the object travels, pickled once per worker.
        named = isinstance(self.model_source, (str, os.PathLike)) and calibrated is model
        worker_model = os.fspath(self.model_source) if named else calibrated

        settings = self._settings(slide, slide_path, calibrated, model_mpp, factor, tiles)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        work = WorkDir(out_dir)
        done = TileLedger()
        if resume and work.exists():
            old = work.read_settings() or {}
            if old.get("format") != settings["format"]:
                raise InputError(out_dir, "cannot resume: the unfinished run there was begun by another karyo "
                                          "(another format of its files); run without --resume to start over")
            if old != settings:
                changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                raise InputError(out_dir, f"cannot resume: the unfinished run there used other settings "
                                          f"({', '.join(changed)}); run without --resume to start over")
            self._need_write()
            done = work.finished()
        elif resume and _summary_digest(out_dir) == digest:
            log.info("%s: already complete, nothing to resume", out_dir)
            return self._existing(out_dir)
        elif resume and _summary_digest(out_dir) is not None:
            raise InputError(out_dir, "cannot resume: the finished run there used other settings (or another "
                                      "karyo); run without --resume to replace it")
        else:
            self._need_write()
            if work.exists():
                finished = len(work.finished())
                log.warning("%s: an unfinished run there (%d tiles done) is discarded and started over; pass "
                            "--resume to continue it instead", out_dir, finished)
            elif (out_dir / "summary.json").exists():
                log.warning("%s: the finished run there is replaced by this one (its files are overwritten when "
                            "this run completes)", out_dir)
            work.reset(settings)
            self._started_work = True

        overlay_thumb, overlay_scale = slide.read_downsampled(max(1.0, max(slide.dimensions) / opts.overlay_max_size),
                                                              at_least=True)
        meta = {"slide": slide_path.name, "mpp": slide.mpp, "model_mpp": model_mpp, "factor": factor,
                "coordinates": "level-0 pixels", "attributes_at": "model resolution",
                "attribute_units": ATTRIBUTE_UNITS}
        seams = SeamDuplicates({t.index: t.y * factor for t in tiles},
                               {t.index: tuple(c * factor for c in t.core) for t in tiles},
                               opts.overlap * factor) if opts.merge_seams else None
        merger = OrderedMerger(work, [t.index for t in tiles], attributes=opts.attributes, slide_name=slide_path.name,
                               metadata=meta, overlay=OverlayPainter(overlay_thumb, overlay_scale),
                               row_group_size=opts.row_group_size, seams=seams, id_seed=digest)
        write_time = [0.0]
        resumed = len(done)
        progress = None
        try:
            t = time.perf_counter()
            for i in sorted(done.nuclei):
                merger.add(i, done.nuclei[i])
            write_time[0] += time.perf_counter() - t
            progress = _Progress(self.progress, len(tiles), resumed, sum(done.nuclei.values()),
                                 seams.removed if seams is not None else 0)

            def on_result(res: TileResult) -> None:
                if res.error is not None:  # named as the caller named the slide (workers open its full path)
                    source = slide_path if res.error[0] in (spec.path, str(slide_path)) else res.error[0]
                    kept = (f"; the {len(done)} finished tiles are kept in {out_dir}: --resume continues them if "
                            f"this same file reads correctly next time (a repaired or replaced file is another file: "
                            f"run without --resume to start over)" if len(done) else "")
                    raise InputError(source, res.error[1] + kept)
                t0 = time.perf_counter()
                if res.n_nuclei:
                    work.write_part(res.tile, res.table)
                entry = {"tile": res.tile, "n": res.n_nuclei, "truncated": res.truncated,
                         "t": {k: round(v, 6) for k, v in res.times.items()}}
                work.record(entry)
                done.add(entry)
                merger.add(res.tile, res.n_nuclei, res.table)
                write_time[0] += time.perf_counter() - t0
                progress.advance(res.n_nuclei, seams.removed if seams is not None else 0)

            t = time.perf_counter()
            execution = self.execute(processor, calibrated, slide, [t for t in tiles if t.index not in done],
                                     on_result, worker_model)
            timing["compute_wall"] = time.perf_counter() - t
            t = time.perf_counter()
            merger.finish(out_dir)
        except BaseException:
            merger.abort()
            raise
        finally:
            if progress is not None:
                progress.close()
        self._write_mask(out_dir, tissue)  # with the other results: a failed run leaves an earlier one's as it was
        with writing("overlay.png", out_dir):
            write_image(out_dir / "overlay.png", merger.overlay.image)
        write_time[0] += time.perf_counter() - t
        timing["write"] = write_time[0]
        summary = self._summary(slide, calibrated, model_mpp, factor, size, all_tiles, tiles, done, tissue, merger,
                                execution, timing, t_start, digest, resumed)
        with writing("summary.json", out_dir):
            write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        work.remove()
        return WSIResult(out_dir, summary, self._paths(out_dir))

    def _need_write(self) -> None:
        """Stop here if OUT could not be locked: a resume that finds the run complete writes nothing and needs no
        lock (a finished run on read-only storage), anything else must not write unlocked."""
        if self._unlocked is not None:
            raise self._unlocked

    # -------------------------------------------------------------------- bookkeeping
    @staticmethod
    def _write_mask(out_dir: Path, tissue: TissueMask) -> None:
        with writing("tissue_mask.png", out_dir):
            write_image(out_dir / "tissue_mask.png", tissue.mask.astype(np.uint8) * 255)

    def _settings(self, slide: Slide, slide_path: Path, model, model_mpp: float, factor: float,
                  tiles: list[Tile]) -> dict:
        """What must not change between a run and its resume."""
        from karyo import __version__

        st = slide_path.stat()
        opts = self.options
        return {
            "karyo": __version__,
            "format": WSI_FORMAT,
            "slide": {"path": str(slide_path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "dimensions": list(slide.dimensions), "mpp": slide.mpp},
            "model": {"source": self.model_source if isinstance(self.model_source, str) else type(model).__name__,
                      "arch": getattr(model, "arch", type(model).__name__), "config": _config_dict(model),
                      "mpp": model_mpp},
            "tiling": {"tile": opts.tile, "overlap": opts.overlap, "factor": factor,
                       "tiles": hashlib.sha1(json.dumps([t.index for t in tiles]).encode()).hexdigest()},
            "tissue": dataclasses.asdict(opts.tissue),
            "outputs": {"attributes": opts.attributes, "simplify": opts.simplify, "merge_seams": opts.merge_seams,
                        "attribute_units": ATTRIBUTE_UNITS if opts.attributes else None},
        }

    def _summary(self, slide, model, model_mpp, factor, size, all_tiles, tiles, done, tissue, merger, execution,
                 timing, t_start, digest, resumed) -> dict:
        stage = {s: done.stage_s.get(s, 0.0) for s in STAGES}
        truncated = done.truncated
        area = tissue.area_mm2
        counts = dict(sorted(merger.counts.items()))
        wall = time.perf_counter() - t_start
        return {
            "slide": slide.describe(),
            "model": {"source": self.model_source if isinstance(self.model_source, str) else type(model).__name__,
                      "arch": getattr(model, "arch", type(model).__name__), "mpp": model_mpp,
                      "calibrated_for_slide": callable(getattr(model, "for_slide", None)),
                      "config": _config_dict(model)},
            "tiling": {"tile": self.options.tile, "overlap": self.options.overlap, "factor": factor,
                       "model_resolution_size": list(size), "tiles_total": len(all_tiles),
                       "tiles_with_tissue": len(tiles), "tiles_from_earlier_runs": resumed,
                       "ownership": "centroid in tile core; overlap must be >= 2 x largest nucleus radius; of two "
                                    "tiles' nuclei sharing >= 50% of the smaller, the larger is kept; one sharing "
                                    "less loses the shared pixels to the earlier tile's"},
            "tissue": {"area_mm2": area, "fraction": tissue.fraction, "saturation_threshold": tissue.threshold,
                       "mask_um_per_px": tissue.scale[0] * tissue.slide_mpp},
            "nuclei": {"total": merger.n_nuclei, "per_class": counts,
                       "density_per_mm2": merger.n_nuclei / area if area > 0 else None,
                       "density_per_mm2_per_class": {k: v / area for k, v in counts.items()} if area > 0 else {},
                       "truncated_at_tile_edge": truncated,
                       "seam_duplicates_removed": merger.seams.removed if merger.seams is not None else 0,
                       "seam_overlaps_clipped": merger.seams.clipped if merger.seams is not None else 0},
            "timing_s": {**{k: round(v, 3) for k, v in timing.items()},
                         **{f"{s}_sum": round(v, 3) for s, v in stage.items()}, "wall": round(wall, 3)},
            "execution": execution,
            "settings_digest": digest,
            "outputs": {k: p.name for k, p in self._paths(Path(".")).items()},
        }

    @staticmethod
    def _paths(out_dir: Path) -> dict[str, Path]:
        return {name: out_dir / f for name, f in (("parquet", "nuclei.parquet"), ("geojson", "nuclei.geojson"),
                                                  ("overlay", "overlay.png"), ("tissue_mask", "tissue_mask.png"),
                                                  ("summary", "summary.json"))}

    def _existing(self, out_dir: Path) -> WSIResult:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
        return WSIResult(out_dir, summary, self._paths(out_dir))


def _config_dict(model) -> dict:
    from karyo import config as config_io

    cfg = getattr(model, "config", None)
    try:
        return json.loads(json.dumps(config_io.to_dict(cfg), default=str)) if cfg is not None else {}
    except (TypeError, ValueError):
        return {"repr": repr(cfg)}


def _summary_digest(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / "summary.json").read_text(encoding="utf-8")).get("settings_digest")
    except (OSError, ValueError, AttributeError):
        return None


def _take(it, n: int) -> list:
    out = []
    for _ in range(n):
        nxt = next(it, None)
        if nxt is None:
            break
        out.append(nxt)
    return out


def _quietly(func, *args) -> None:
    with contextlib.suppress(Exception):
        func(*args)


def _accepts_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def run_wsi(slide_path: str | os.PathLike, model: str | os.PathLike | InstanceModel = "default",
            out_dir: str | os.PathLike = "karyo_wsi", *, mpp: float | None = None, tile: int | None = None,
            overlap: int | None = None, workers: int | None = None,
            scheduler: str | None = None, resume: bool = False,
            progress: bool | Callable[[int, int, int], None] = False, options: WSIOptions | None = None
            ) -> WSIResult:
    """Segment every nucleus of a slide; write nuclei.parquet, nuclei.geojson, tissue_mask.png, overlay.png and
    summary.json into ``out_dir``.

    ``model`` is a name, a model folder or an :class:`~karyo.models.base.InstanceModel`. ``workers``: 0 computes in
    this process, N a local dask cluster of N processes (None: one per CPU core); ``scheduler`` (``tcp://host:port``)
    uses an existing dask cluster instead, whose workers must see ``slide_path``. ``resume`` continues an
    interrupted run in ``out_dir`` begun by this karyo version with the same settings, and gives the same files as an
    uninterrupted one (a run begun with other settings, another slide file or another karyo is refused: run without
    ``resume``). ``tile`` and ``overlap`` (pixels at the model's resolution) override those of ``options``, which
    holds every other setting. ``progress``: a rich progress bar on stderr, or a callback ``(tiles_done,
    tiles_total, nuclei)`` where ``nuclei`` counts the finished tiles' nuclei less the seam duplicates removed so
    far (the last call gives the final count).

    karyo's own files in ``out_dir`` are replaced (other files there are left alone). Without ``resume``, a finished
    run there is overwritten (with a warning) and an unfinished one is started over. With ``resume``, a finished
    run with the same settings is left as it is (nothing is written: read-only storage is fine) and one with other
    settings is refused. While a run writes there, ``OUT/.karyo-wsi.lock`` keeps a second run out. A lock left by a
    run that died on this host is taken over (with a note); one from another host, or whose pid is alive, is not:
    delete it if no run is writing there.

    With ``workers`` other than 0 (the default included) a local dask cluster starts worker processes that import
    the calling script again: in a script, put the call under ``if __name__ == "__main__":`` (without it the run
    stops with a KaryoError saying so), or pass ``workers=0``.
    """
    opts = options or WSIOptions()
    if tile is not None or overlap is not None:
        opts = dataclasses.replace(opts, tile=opts.tile if tile is None else tile,
                                   overlap=opts.overlap if overlap is None else overlap)
    if workers is not None and workers < 0:
        raise InputError(None, f"workers must be ≥ 0, got {workers}")
    engine = WSIEngine(model, options=opts, workers=workers, scheduler=scheduler, progress=progress)
    return engine.run(slide_path, out_dir, mpp=mpp, resume=resume)


__all__ = ["TileProcessor", "TileResult", "WSIEngine", "WSIOptions", "WSIResult", "run_wsi"]
