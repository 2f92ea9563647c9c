"""Crash-safe output of whole-slide inference: per-tile parts, an fsync'd manifest, and an ordered merge.

Layout of a run folder::

    OUT/nuclei.parquet, nuclei.geojson, overlay.png, tissue_mask.png, summary.json   (final, renamed into place)
    OUT/.karyo-wsi/run.json            settings of the run (a resume must match them)
    OUT/.karyo-wsi/manifest.jsonl      one line per finished tile, appended and fsync'd after its part
    OUT/.karyo-wsi/parts/<tile>.parquet  the nuclei one tile owns (written to a temporary name, then renamed)

A tile is finished once its manifest line is on disk; its part was renamed into place before, so a crash at any
point leaves either a finished tile or none. The merge reads parts in tile order (not completion order), so the
final files are the same whatever the number of workers, the completion order or how often the run was resumed.
It runs while tiles are still being computed, as soon as the next tile in order is done, holding one row group at
a time; the merged files are temporary until every tile is in, then renamed into ``OUT``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from karyo.attributes.names import MICRON_COLUMNS
from karyo.errors import InputError
from karyo.export.colors import class_color
from karyo.export.geojson import GeoJSONWriter, geometry_feature

WORK_NAME = ".karyo-wsi"
_NAMESPACE = uuid.UUID("0b6f3f0e-5a8c-4d5e-9f1b-8f2b9c1d7e44")

# Per-nucleus attributes that depend only on the nucleus and its pixels (measured at the model's resolution).
# Image-level statistics (z-scores, nearest-neighbour distance, truncation flags) would depend on the tile and are
# left out; compute them over the slide table if needed.
ATTRIBUTE_COLUMNS = (
    "Size.Perimeter", "Size.ConvexHullArea", "Size.MajorAxisLength", "Size.MinorAxisLength",
    "Size.EquivalentDiameter", "Shape.Solidity", "Shape.PerimeterRatio", "Shape.Eccentricity", "Shape.Extent",
    "Shape.AspectRatio", "Orientation.Orientation", "Nucleus.Intensity.Mean", "Nucleus.Red.Mean",
    "Nucleus.Green.Mean", "Nucleus.Blue.Mean", "Nucleus.Hematoxylin.Mean", "Nucleus.Eosin.Mean",
    "Color.HematoxylinRaw", "Texture.HematoxylinVarianceRaw", "Boundary.GradientMean",
)
#: Their µm twins (``Size.Perimeter_um`` ...), as ``karyo attributes`` writes them: a slide always states its mpp.
MICRON_ATTRIBUTE_COLUMNS = tuple(MICRON_COLUMNS[c] for c in ATTRIBUTE_COLUMNS if c in MICRON_COLUMNS)
#: Every per-nucleus attribute column of the parquet and the GeoJSON measurements.
ALL_ATTRIBUTE_COLUMNS = (*ATTRIBUTE_COLUMNS, *MICRON_ATTRIBUTE_COLUMNS)
#: Those that describe the outline: NaN for a nucleus cut at a tile seam (``seam_clipped``), whose mask was measured
#: before the cut. Intensity statistics (``Nucleus.*``, ``Color.*``, ``Texture.*``) stay: they are means over the
#: uncut mask, which differs from the kept part by the few pixels the neighbour holds.
SHAPE_ATTRIBUTE_COLUMNS = tuple(c for c in ALL_ATTRIBUTE_COLUMNS
                                if c.split(".", 1)[0] in ("Size", "Shape", "Orientation", "Boundary"))

BASE_FIELDS = (
    ("tile", pa.int32()),
    ("centroid_x", pa.float64()), ("centroid_y", pa.float64()),
    ("bbox_x0", pa.int64()), ("bbox_y0", pa.int64()), ("bbox_x1", pa.int64()), ("bbox_y1", pa.int64()),
    ("area", pa.float64()), ("area_um2", pa.float64()),
    ("class_id", pa.int32()), ("class_name", pa.string()), ("score", pa.float64()),
    ("polygon_wkb", pa.binary()),
    ("seam_clipped", pa.bool_()),  # cut at a tile seam to the pixels a neighbour did not hold: outline attributes NaN
)


def part_schema(attributes: bool) -> pa.Schema:
    """Columns of a tile's part (the final table adds ``nucleus_id`` in front)."""
    fields = [pa.field(n, t) for n, t in BASE_FIELDS]
    if attributes:
        fields += [pa.field(c, pa.float64()) for c in ALL_ATTRIBUTE_COLUMNS]
    return pa.schema(fields)


#: GeoParquet 1.1 column metadata (geoparquet.org): ``geopandas.read_parquet`` and GDAL read the polygons as
#: geometries. ``crs`` null: the coordinates are slide pixels, in no geographic reference system.
GEOPARQUET = {"version": "1.1.0", "primary_column": "polygon_wkb",
              "columns": {"polygon_wkb": {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"],
                                          "crs": None}}}


def final_schema(attributes: bool, metadata: dict | None = None) -> pa.Schema:
    schema = pa.schema([pa.field("nucleus_id", pa.int64()), *part_schema(attributes)])
    extra = {"geo": json.dumps(GEOPARQUET)}
    if metadata:
        extra["karyo"] = json.dumps(metadata, sort_keys=True)
    return schema.with_metadata(extra)


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError while writing into a clear InputError (a full disk says so, and how to continue)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(path, f"no space left on the device while writing {what}; free some space and run "
                                   f"again with --resume (finished tiles are kept)") from None
        raise InputError(path, f"cannot write {what} ({exc.strerror or exc})") from None


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class TileLedger:
    """What is known about finished tiles: nuclei per tile (the merge needs them) and running totals (the
    summary needs them), without keeping each tile's manifest entry in memory."""

    nuclei: dict[int, int] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    truncated: int = 0

    def add(self, entry: dict) -> None:
        self.nuclei[int(entry["tile"])] = int(entry.get("n", 0))
        self.truncated += int(entry.get("truncated", 0))
        for stage, seconds in entry.get("t", {}).items():
            self.stage_s[stage] = self.stage_s.get(stage, 0.0) + float(seconds)

    def __contains__(self, tile: int) -> bool:
        return tile in self.nuclei

    def __len__(self) -> int:
        return len(self.nuclei)


class WorkDir:
    """The run's private folder: settings, manifest of finished tiles and their parts."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / WORK_NAME
        self.parts = self.root / "parts"
        self.manifest = self.root / "manifest.jsonl"
        self.settings = self.root / "run.json"

    def exists(self) -> bool:
        return self.settings.is_file()

    def read_settings(self) -> dict | None:
        try:
            return json.loads(self.settings.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def reset(self, settings: dict) -> None:
        """Start afresh: drop any previous parts and record the settings."""
        with writing("the work folder", self.root):
            if self.root.exists():
                shutil.rmtree(self.root)
            self.parts.mkdir(parents=True)
            tmp = self.settings.with_suffix(".tmp")
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.settings)
            self.manifest.touch()
            _fsync_dir(self.root)

    def finished(self) -> TileLedger:
        """Finished tiles from the manifest. A torn last line (crash while appending) is cut off; a tile whose part
        went missing is not finished."""
        done = TileLedger()
        if not self.manifest.is_file():
            return done
        data = self.manifest.read_bytes()
        good = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
                tile = int(entry["tile"])
            except (ValueError, KeyError, TypeError):
                break
            good += len(line)
            if entry.get("n", 0) == 0 or self.part_path(tile).is_file():
                done.add(entry)
        if good < len(data):
            with writing("the manifest", self.manifest), open(self.manifest, "r+b") as fh:
                fh.truncate(good)
                os.fsync(fh.fileno())
        return done

    def part_path(self, tile: int) -> Path:
        return self.parts / f"{tile:08d}.parquet"

    def write_part(self, tile: int, table: pa.Table) -> None:
        """Write a tile's nuclei atomically (temporary file, fsync, rename)."""
        path = self.part_path(tile)
        tmp = path.with_suffix(".tmp")
        try:
            with writing(f"tile {tile}", path):
                with pa.OSFile(str(tmp), "wb") as sink:
                    pq.write_table(table, sink, compression="zstd")
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def record(self, entry: dict) -> None:
        """Append one finished tile to the manifest and fsync it (the tile counts as done from now on)."""
        line = json.dumps(entry, sort_keys=True) + "\n"
        with writing("the manifest", self.manifest), open(self.manifest, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


LOCK_NAME = ".karyo-wsi.lock"


class OutputLock:
    """Only one run writes into an output folder: ``OUT/.karyo-wsi.lock`` holds the pid and host of the run writing
    there. A second run is refused (it would delete the first's work folder); a lock left by a run that died on this
    host (its pid is gone, or is this process's own without this process having taken it: a restarted container
    reuses pids) is taken over, with a note. A lock from another host is never taken over: its pid means nothing
    here.

    The lock appears with its content (written to a private temporary file, then hard-linked into place), so a
    reader never sees it empty, and a failed write leaves nothing behind."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._held = False
        self.unwritable = False  # acquire failed because OUT cannot be written at all (read-only, no permission)

    def acquire(self) -> None:
        import logging
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for attempt in range(2):
            if self._create(json.dumps(me) + "\n"):
                self._held = True
                _HELD_LOCKS.add(self._key())
                return
            try:
                holder = json.loads(self.path.read_text(encoding="utf-8"))
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                try:  # being written this instant by a karyo without atomic locks, or left empty by a crash
                    young = time.time() - self.path.stat().st_mtime < 10
                except OSError:
                    continue
                pid, host = (-1, me["host"]) if not young else (0, "")
            # our own pid in a lock this process does not hold: a previous life of this pid (container restart)
            stale = not _pid_alive(pid) or (pid == me["pid"] and self._key() not in _HELD_LOCKS)
            if attempt == 0 and host == me["host"] and stale:
                logging.getLogger("karyo.infer.wsi").warning(
                    "%s: taking over the lock of a run that is no longer running (%s)", self.out_dir, self.path.name)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            who = f"pid {pid} on {host}" if pid > 0 else "just started"
            raise InputError(self.out_dir, f"another karyo wsi run is writing there ({who}); wait for it to end or "
                                           f"choose another output folder (if no run is, delete {self.path})")
        raise InputError(self.out_dir, f"another karyo wsi run is writing there (it took {self.path.name} first)")

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def _create(self, text: str) -> bool:
        """Create the lock holding ``text``, all at once; False if a lock is there already."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                self.unwritable = exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
                raise InputError(self.out_dir, f"cannot write the output folder ({exc.strerror or exc})") from None
            with writing("the lock file", self.path):
                try:
                    _write_all(fd, text.encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, self.path)  # fails if a lock is there: exclusive, and complete when it appears
                except FileExistsError:
                    return False
                except OSError as exc:  # no hard links here (some network and FAT file systems)
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                        raise
                    return self._create_in_place(text)
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _create_in_place(self, text: str) -> bool:
        """Exclusive create, then write: where hard links are missing. A failed write removes the lock again."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            try:
                _write_all(fd, text.encode("utf-8"))
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        return True

    def release(self) -> None:
        if self._held:
            self._held = False
            _HELD_LOCKS.discard(self._key())
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


#: Locks this process holds now (real paths): a lock with our own pid that is not here is a stale one.
_HELD_LOCKS: set[str] = set()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


class OverlayPainter:
    """Nucleus outlines (or dots, where nuclei are smaller than 3 px) on a low-resolution view of the slide."""

    def __init__(self, thumb: np.ndarray, scale: tuple[float, float]):
        self.image = thumb.copy()
        self.scale = scale
        self._colors: dict[tuple[int, str], tuple[int, int, int]] = {}

    def paint(self, table: pa.Table) -> None:
        """Draw the outlines of ``table``'s nuclei (boundary points at the overlay's pixel spacing, so outlines
        are closed at any scale; nuclei smaller than a pixel become one dot at their centroid)."""
        if table.num_rows == 0:
            return
        h, w = self.image.shape[:2]
        sx, sy = self.scale
        cid = table.column("class_id").to_numpy()
        names = table.column("class_name").to_pylist()
        colors = np.array([self._color(int(c), n) for c, n in zip(cid, names, strict=True)], np.uint8)
        geoms = shapely.from_wkb(table.column("polygon_wkb").to_numpy(zero_copy_only=False))
        geoms = shapely.segmentize(shapely.boundary(geoms), max(min(sx, sy), 1e-3))
        xy, index = shapely.get_coordinates(geoms, return_index=True)
        span = np.maximum((table.column("bbox_x1").to_numpy() - table.column("bbox_x0").to_numpy()) / sx,
                          (table.column("bbox_y1").to_numpy() - table.column("bbox_y0").to_numpy()) / sy)
        dots = np.flatnonzero(span < 2)
        if dots.size:
            cx = table.column("centroid_x").to_numpy()[dots] + 0.5
            cy = table.column("centroid_y").to_numpy()[dots] + 0.5
            xy = np.concatenate([xy, np.stack([cx, cy], axis=1)])
            index = np.concatenate([index, dots])
        cols = np.floor(xy[:, 0] / sx).astype(np.int64)
        rows = np.floor(xy[:, 1] / sy).astype(np.int64)
        ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        self.image[rows[ok], cols[ok]] = colors[index[ok]]

    def _color(self, cid: int, name: str) -> tuple[int, int, int]:
        key = (cid, name)
        if key not in self._colors:
            self._colors[key] = class_color(cid, name or None)
        return self._colors[key]


class SeamDuplicates:
    """Nuclei found twice where tiles overlap. Each tile keeps the nuclei whose centroid lies in its core, but two
    tiles' predictions of one nucleus on a seam can put its centroid on either side of the cut, so both keep it
    (or one keeps a fragment of it). Two rows of different tiles whose polygons share at least ``min_overlap`` of
    the smaller one are one nucleus, and the larger polygon stays (a fragment loses to the whole; ties keep the
    earlier tile's).

    Only rows whose boxes come within ``margin`` (level-0 px) of an interior core edge can meet a later tile's, so
    only they are compared. A tile's rows are released, in tile order, once no later tile can reach them: tiles
    arrive in row-major order, so a row is safe once a tile whose top (``tops``) lies below its box has arrived.
    The output is therefore the same whatever the number of workers or resumes."""

    def __init__(self, tops: dict[int, float], cores: dict[int, tuple[float, float, float, float]], margin: float,
                 min_overlap: float = 0.5, cell: float = 128.0):
        self.tops, self.cores, self.margin = tops, cores, float(margin)
        self.min_overlap, self.cell = float(min_overlap), float(cell)
        self.removed = 0
        self.clipped = 0  # rows cut down to the pixels a kept neighbour of another tile did not already hold
        self._queue: deque[list] = deque()  # [tile, part, alive rows, bottom of its compared rows]
        self._held: dict[tuple[int, int], tuple] = {}  # (tile, row) → (box, polygon, area, alive rows)
        self._grid: dict[tuple[int, int], set[tuple[int, int]]] = {}

    def add(self, tile: int, part: pa.Table | None) -> list[pa.Table]:
        """Tile ``tile`` (the next in order) with its rows; returns the tables that are final now, in tile order."""
        bottom = -math.inf
        alive = None
        if part is not None and part.num_rows:
            boxes = np.stack([part.column(c).to_numpy() for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")], 1)
            boxes = boxes.astype(np.float64)
            polys = shapely.from_wkb(part.column("polygon_wkb").to_numpy(zero_copy_only=False))
            areas = shapely.area(polys)
            x0, y0, x1, y1 = self.cores[tile]
            m = self.margin
            near = (boxes[:, 0] - x0 < m) | (x1 - boxes[:, 2] < m) | (boxes[:, 1] - y0 < m) | (y1 - boxes[:, 3] < m)
            alive = np.ones(part.num_rows, bool)
            clipped: dict[int, object] = {}
            trimmed: dict[int, object] = {}
            for row in np.flatnonzero(near):
                overlapping, slivers = self._survives(boxes[row], polys[row], areas[row])
                if overlapping is not None and slivers:  # under a pixel: cut off, not a clipped nucleus
                    polys[row] = trimmed[int(row)] = shapely.difference(polys[row], shapely.union_all(slivers))
                if overlapping:  # pixels a kept neighbour of another tile holds already stay its own
                    rest = shapely.difference(polys[row], shapely.union_all(overlapping))
                    if rest.is_empty or shapely.area(rest) < 1.0:
                        overlapping = None
                    else:
                        bx0, by0, bx1, by1 = rest.bounds
                        box = (max(boxes[row, 0], math.floor(bx0 + 1e-9)), max(boxes[row, 1], math.floor(by0 + 1e-9)),
                               min(boxes[row, 2], math.ceil(bx1 - 1e-9)), min(boxes[row, 3], math.ceil(by1 - 1e-9)))
                        clipped[int(row)] = (polys[row], rest, box)
                        polys[row], areas[row], boxes[row] = rest, shapely.area(rest), box
                if overlapping is None:
                    alive[row] = False
                    self.removed += 1
                    continue
                key = (tile, int(row))
                self._held[key] = (boxes[row], polys[row], areas[row], alive)
                for cell in self._cells(boxes[row]):
                    self._grid.setdefault(cell, set()).add(key)
                bottom = max(bottom, boxes[row, 3])
            if trimmed:
                wkb = part.column("polygon_wkb").to_numpy(zero_copy_only=False).copy()
                for row, poly in trimmed.items():
                    wkb[row] = shapely.to_wkb(poly)
                i = part.schema.get_field_index("polygon_wkb")
                part = part.set_column(i, part.schema.field(i), pa.array(wkb, type=part.schema.field(i).type))
            if clipped:
                part = self._with_clipped(part, clipped)
        self._queue.append([tile, part, alive, bottom])
        return self._release(self.tops[tile])

    def finish(self) -> list[pa.Table]:
        """Everything still held (after the last tile)."""
        return self._release(math.inf)

    def _with_clipped(self, part: pa.Table, clipped: dict[int, tuple]) -> pa.Table:
        """``part`` with some rows' polygons cut down (row → (old polygon, new polygon, new box)): their area,
        area_um2, centroid and box follow the polygon, ``seam_clipped`` is set and the outline attributes
        (:data:`SHAPE_ATTRIBUTE_COLUMNS`, measured on the uncut mask) become NaN rather than contradict it."""
        self.clipped += len(clipped)
        rows = np.array(sorted(clipped))
        old = np.array([clipped[r][0] for r in rows], dtype=object)
        new = np.array([clipped[r][1] for r in rows], dtype=object)
        boxes = np.array([clipped[r][2] for r in rows], dtype=np.int64)
        share = shapely.area(new) / np.maximum(shapely.area(old), 1e-9)
        shift = shapely.get_coordinates(shapely.centroid(new)) - shapely.get_coordinates(shapely.centroid(old))
        cols = {name: part.column(name).to_numpy(zero_copy_only=False).copy() for name in
                ("polygon_wkb", "area", "area_um2", "centroid_x", "centroid_y", "bbox_x0", "bbox_y0", "bbox_x1",
                 "bbox_y1")}
        cols["polygon_wkb"][rows] = shapely.to_wkb(new)
        cols["area"][rows] *= share
        cols["area_um2"][rows] *= share
        cols["centroid_x"][rows] += shift[:, 0]
        cols["centroid_y"][rows] += shift[:, 1]
        for k, name in enumerate(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")):
            cols[name][rows] = boxes[:, k]
        cols["seam_clipped"] = part.column("seam_clipped").to_numpy(zero_copy_only=False).copy()
        cols["seam_clipped"][rows] = True
        for name in SHAPE_ATTRIBUTE_COLUMNS:
            if name in part.schema.names:
                cols[name] = part.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                cols[name][rows] = np.nan
        for name, values in cols.items():
            i = part.schema.get_field_index(name)
            part = part.set_column(i, part.schema.field(i), pa.array(values, type=part.schema.field(i).type))
        return part

    def _survives(self, box, poly, area: float) -> tuple[list | None, list]:
        """Compare a new row with the held rows it touches: None when it is a duplicate of one (drop it), else the
        polygons of the kept rows it overlaps less than that (to cut it down by); and the kept polygons it shares
        under half a pixel with (slivers where two outlines at another resolution than the model's cross: cut off
        without counting the row as clipped). Held duplicates it beats go."""
        partial, slivers = [], []
        candidates = set().union(*(self._grid.get(c, ()) for c in self._cells(box)))
        for key in sorted(candidates):
            obox, opoly, oarea, oalive = self._held[key]
            if box[0] >= obox[2] or obox[0] >= box[2] or box[1] >= obox[3] or obox[1] >= box[3]:
                continue
            smaller = min(area, oarea)
            try:
                shared = shapely.area(shapely.intersection(poly, opoly))
            except shapely.errors.GEOSException:
                continue
            if smaller <= 0 or shared <= 1e-9:  # touching
                continue
            if shared <= 0.5:  # less than a pixel
                slivers.append(opoly)
                continue
            if shared < self.min_overlap * smaller:
                partial.append(opoly)
            elif area > oarea:  # the new row is the whole of what the held one is a part of
                oalive[key[1]] = False
                self._forget(key)
                self.removed += 1
            else:
                return None, []
        return partial, slivers

    def _release(self, top: float) -> list[pa.Table]:
        out = []
        while self._queue and self._queue[0][3] <= top:
            tile, part, alive, _ = self._queue.popleft()
            if part is None:
                continue
            for key in [(tile, int(r)) for r in range(part.num_rows) if (tile, int(r)) in self._held]:
                self._forget(key)
            out.append(part if alive.all() else part.filter(pa.array(alive)))
        return out

    def _forget(self, key: tuple[int, int]) -> None:
        box = self._held.pop(key)[0]
        for cell in self._cells(box):
            members = self._grid.get(cell)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._grid[cell]

    def _cells(self, box) -> list[tuple[int, int]]:
        c = self.cell
        return [(i, j) for i in range(int(box[0] // c), int((box[2] - 1) // c) + 1)
                for j in range(int(box[1] // c), int((box[3] - 1) // c) + 1)]


class OrderedMerger:
    """Merge finished parts in tile order into temporary ``nuclei.parquet`` / ``nuclei.geojson`` (renamed into
    ``out_dir`` by :meth:`finish`), numbering nuclei 1..N and counting them per class."""

    def __init__(self, work: WorkDir, order: list[int], *, attributes: bool, slide_name: str,
                 metadata: dict | None = None, overlay: OverlayPainter | None = None,
                 row_group_size: int = 16384, seams: SeamDuplicates | None = None, id_seed: str = ""):
        self.work = work
        self.seams = seams
        self.id_seed = id_seed  # feature ids: the same for the same run, other for other settings or slides
        self.order = list(order)
        self.attributes = attributes
        self.slide_name = slide_name
        self.overlay = overlay
        self.row_group_size = row_group_size
        self.schema = final_schema(attributes, metadata)
        self.tmp_parquet = work.root / "nuclei.parquet.tmp"
        self.tmp_geojson = work.root / "nuclei.geojson.tmp"
        self.counts: dict[str, int] = {}
        self.n_nuclei = 0
        self._pos = 0
        self._pending: dict[int, int] = {}
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        with writing("nuclei.parquet", self.tmp_parquet):
            self._parquet = pq.ParquetWriter(str(self.tmp_parquet), self.schema, compression="zstd")
            self._geojson = GeoJSONWriter(self.tmp_geojson)

    @property
    def merged_tiles(self) -> int:
        return self._pos

    def add(self, tile: int, n_nuclei: int, table: pa.Table | None = None) -> None:
        """Tile ``tile`` is finished (its part, if any, is on disk); merge whatever is now next in order.

        ``table`` is the part just written: used directly when this tile is next (the usual case), otherwise
        only its size is remembered and the part is read back from disk when its turn comes (memory stays flat
        however far completion runs ahead of the merge)."""
        self._pending[tile] = n_nuclei
        while self._pos < len(self.order) and self.order[self._pos] in self._pending:
            index = self.order[self._pos]
            part = None
            if self._pending.pop(index):
                if index == tile and table is not None:
                    part = table
                else:
                    part = self._read_part(index)
            for final in (self.seams.add(index, part) if self.seams is not None else
                          [part] if part is not None else []):
                self._emit(final)
            self._pos += 1

    def _read_part(self, index: int) -> pa.Table:
        """A finished tile's part from disk; one of another layout (written by another karyo, which the run's
        settings did not tell apart) is refused in one line rather than failing the merge."""
        path = self.work.part_path(index)
        with writing(f"the part of tile {index}", path):
            part = pq.read_table(path)
        expected = part_schema(self.attributes)
        if not part.schema.equals(expected, check_metadata=False):
            raise InputError(self.work.out_dir, f"cannot resume: the unfinished run there was begun by another karyo "
                                                f"(tile {index} has other columns); run without --resume to start "
                                                f"over")
        return part

    def _emit(self, part: pa.Table) -> None:
        n = part.num_rows
        ids = pa.array(np.arange(self.n_nuclei + 1, self.n_nuclei + n + 1, dtype=np.int64))
        table = part.add_column(0, "nucleus_id", ids).cast(self.schema)
        self.n_nuclei += n
        for name in table.column("class_name").to_pylist():
            key = name or "unclassified"
            self.counts[key] = self.counts.get(key, 0) + 1
        with writing("nuclei.geojson", self.tmp_geojson):
            self._write_features(table)
        if self.overlay is not None:
            self.overlay.paint(table)
        self._buffer.append(table)
        self._buffered += n
        if self._buffered >= self.row_group_size:
            self._flush()

    def _write_features(self, table: pa.Table) -> None:
        geoms = shapely.from_wkb(table.column("polygon_wkb").to_numpy(zero_copy_only=False))
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("nucleus_id", "class_id", "score",
                                                                              "area_um2", "centroid_x",
                                                                              "centroid_y")}
        names = table.column("class_name").to_pylist()
        clipped = table.column("seam_clipped").to_numpy(zero_copy_only=False)
        attrs = {c: table.column(c).to_numpy() for c in ALL_ATTRIBUTE_COLUMNS} if self.attributes else {}
        for k, geom in enumerate(geoms):
            nid = int(cols["nucleus_id"][k])
            meas = {"Area µm^2": cols["area_um2"][k], "Detection probability": cols["score"][k],
                    "Seam clipped": bool(clipped[k])}  # a measurement too: QuPath filters on those (0/1)
            meas.update({c: v[k] for c, v in attrs.items()})
            self._geojson.write(geometry_feature(
                geom, feature_id=str(uuid.uuid5(_NAMESPACE, f"{self.slide_name}:{self.id_seed}:{nid}")),
                class_id=int(cols["class_id"][k]), class_name=names[k], measurements=meas,
                properties={"nucleus_id": nid, **({"seam_clipped": True} if clipped[k] else {})}))

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        with writing("nuclei.parquet", self.tmp_parquet):
            self._parquet.write_table(table, row_group_size=max(self.row_group_size, table.num_rows))

    def finish(self, out_dir: Path) -> tuple[Path, Path]:
        """Complete both files and rename them into ``out_dir`` (every tile of ``order`` must be merged)."""
        if self._pos != len(self.order):
            raise RuntimeError(f"merge incomplete: {self._pos} of {len(self.order)} tiles")
        for final in self.seams.finish() if self.seams is not None else []:
            self._emit(final)
        self._flush()
        with writing("nuclei.parquet", self.tmp_parquet):
            self._parquet.close()
            with open(self.tmp_parquet, "rb+") as fh:
                os.fsync(fh.fileno())
            self._geojson.close()
            parquet, geojson = out_dir / "nuclei.parquet", out_dir / "nuclei.geojson"
            os.replace(self.tmp_parquet, parquet)
            os.replace(self.tmp_geojson, geojson)
            _fsync_dir(out_dir)
        return parquet, geojson

    def abort(self) -> None:
        """Close and delete the temporary files (after an error; parts and manifest stay for --resume). Never
        raises: it runs while another error is on its way to the user (a full disk fails the closes again)."""
        for step in (self._parquet.close, self._geojson.abort, lambda: self.tmp_parquet.unlink(missing_ok=True),
                     lambda: self.tmp_geojson.unlink(missing_ok=True)):
            with contextlib.suppress(Exception):
                step()
