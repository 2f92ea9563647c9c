"""Whole-slide inference on real H&E: a 1024² slide assembled from 16 CoNSeP test patches (pyramidal TIFF)."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import tifffile
from PIL import Image
from typer.testing import CliRunner

import karyo
from karyo.errors import InputError
from karyo.export.polygons import instance_polygons
from karyo.infer import wsi_writer
from karyo.infer.tiling import plan_tiles, tile_starts
from karyo.infer.tissue import TissueOptions, detect_tissue
from karyo.infer.wsi import TileProcessor, WSIOptions, run_wsi

pytestmark = pytest.mark.shared_data
MPP = 0.25


def write_pyramid(path, image, mpp=MPP, factors=(2, 4), resolution=True):
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if resolution else {}
        tif.write(image, tile=(256, 256), subifds=len(factors), photometric="rgb", compression="zlib", **extra)
        for f in factors:
            tif.write(image[::f, ::f], tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def patches(shared_data, n, seed=0):
    from karyo.data.layout import LayoutDataset

    ds = LayoutDataset(shared_data / "consep", split="test")
    pick = np.random.default_rng(seed).choice(len(ds), n, replace=False)
    return [ds[int(i)].image[..., :3] for i in pick]


def mosaic(tiles, rows, cols):
    return np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)


@pytest.fixture(scope="module")
def slide(shared_data, tmp_path_factory):
    image = mosaic(patches(shared_data, 16), 4, 4)
    return write_pyramid(tmp_path_factory.mktemp("slide") / "consep_1024.tif", image), image


@pytest.fixture(scope="module")
def reference(slide, tmp_path_factory):
    """An uninterrupted in-process run: what every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return run_wsi(slide[0], "classical", out, workers=0)


def same_outputs(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a / "nuclei.parquet"), pq.read_table(b / "nuclei.parquet")
    assert ta.num_rows > 0 and ta.schema.equals(tb.schema, check_metadata=True)
    assert ta.to_pandas().equals(tb.to_pandas())  # (Arrow's equals counts NaN ≠ NaN; scores are NaN here)
    assert (a / "nuclei.geojson").read_bytes() == (b / "nuclei.geojson").read_bytes()
    assert (a / "overlay.png").read_bytes() == (b / "overlay.png").read_bytes()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["nuclei"] == sb["nuclei"]


# ------------------------------------------------------------------------------------------------ tiling
def test_tile_cores_partition_the_image():
    tiles = plan_tiles(1000, 700, 256, 64)
    assert tile_starts(1000, 256, 64) == [0, 192, 384, 576, 744]  # the last one flush with the border
    assert tile_starts(200, 256, 64) == [0]
    ys, xs = np.mgrid[0:700, 0:1000] + 0.5
    owners = np.zeros(ys.shape, int)
    for t in tiles:
        owners += t.owns(xs, ys)
        assert t.width == 256 and t.height == 256
        x0, _, x1, _ = t.core
        # an owned centroid is at least overlap/2 from every interior edge of its tile
        assert x0 == -np.inf or x0 - t.x >= 32
        assert x1 == np.inf or t.x + t.width - x1 >= 32
    assert (owners == 1).all()
    with pytest.raises(InputError, match="overlap"):
        plan_tiles(100, 100, 64, 64)


# ------------------------------------------------------------------------------------------------ stitching
def _part(tile: int, discs: list[tuple[float, float, float]], attributes: bool = False):
    """A tile's part: discs (x, y, radius) in level-0 px as rows of the part schema (attributes all 1.0)."""
    import pyarrow as pa

    polys = [shapely.Point(x, y).buffer(r) for x, y, r in discs]
    b = np.array([p.bounds for p in polys]).reshape(-1, 4)
    cols = {"tile": [tile] * len(discs), "centroid_x": [d[0] - 0.5 for d in discs],
            "centroid_y": [d[1] - 0.5 for d in discs], "bbox_x0": np.floor(b[:, 0]).astype(int),
            "bbox_y0": np.floor(b[:, 1]).astype(int), "bbox_x1": np.ceil(b[:, 2]).astype(int),
            "bbox_y1": np.ceil(b[:, 3]).astype(int), "area": [p.area for p in polys],
            "area_um2": [p.area / 16 for p in polys], "class_id": [0] * len(discs), "class_name": [""] * len(discs),
            "score": [1.0] * len(discs), "polygon_wkb": shapely.to_wkb(polys).tolist(),
            "seam_clipped": [False] * len(discs)}
    if attributes:
        cols.update({c: [1.0] * len(discs) for c in wsi_writer.ALL_ATTRIBUTE_COLUMNS})
    return pa.Table.from_pydict(cols, schema=wsi_writer.part_schema(attributes))


def test_a_nucleus_found_by_two_tiles_across_their_seam_is_kept_once():
    """Tiles 0 | 1 side by side (cut at x = 100) over tile row 2 | 3 (cut at y = 100): a nucleus on the seam seen by
    both tiles with its centroid on either side, a fragment beside its whole, and touching neighbours."""
    inf = np.inf
    cores = {0: (-inf, -inf, 100, 100), 1: (100, -inf, inf, 100), 2: (-inf, 100, 100, inf), 3: (100, 100, inf, inf)}
    tops = {0: 0.0, 1: 0.0, 2: 68.0, 3: 68.0}
    seams = wsi_writer.SeamDuplicates(tops, cores, margin=64)
    out = seams.add(0, _part(0, [(99.6, 40, 10), (30, 30, 8), (60, 95, 6)]))
    assert out == []  # its seam rows wait for the tiles that can see them too
    out = seams.add(1, _part(1, [(100.3, 40.2, 10), (121, 40, 10)]))  # the same nucleus; a touching neighbour
    assert out == []
    out = seams.add(2, _part(2, [(60, 101, 12)]))  # tile 0's (60, 95, 6) was a fragment of this one
    assert out == [] and seams.add(3, None) == []  # tile 0's rows reach below row 2's top: still reachable
    out = seams.finish()
    assert [t.num_rows for t in out] == [2, 1, 1]  # in tile order: tile 0 less its fragment, tile 1 less its copy
    assert out[0].column("centroid_x").to_pylist() == [99.1, 29.5]
    assert out[1].column("centroid_x").to_pylist() == [120.5]
    assert out[2].column("centroid_y").to_pylist() == [100.5]
    assert seams.removed == 2
    # a tile is final as soon as a tile below all its compared rows arrives
    seams = wsi_writer.SeamDuplicates({0: 0.0, 2: 200.0}, {0: cores[0], 2: (-inf, 100, 100, inf)}, margin=64)
    assert seams.add(0, _part(0, [(99.6, 40, 10)])) == []
    assert [t.num_rows for t in seams.add(2, None)] == [1]


def test_neighbours_of_two_tiles_that_overlap_a_little_no_longer_overlap():
    """Two nuclei of two tiles sharing 14 % of the smaller (not one nucleus): the later one loses the shared
    pixels, and its area, centroid and box follow its polygon."""
    inf = np.inf
    cores = {0: (-inf, -inf, 100, inf), 1: (100, -inf, inf, inf)}
    seams = wsi_writer.SeamDuplicates({0: 0.0, 1: 0.0}, cores, margin=64)
    assert seams.add(0, _part(0, [(95, 40, 10)])) == [] and seams.add(1, _part(1, [(110, 40, 10)])) == []
    left, right = seams.finish()
    a, b = (shapely.from_wkb(t.column("polygon_wkb")[0].as_py()) for t in (left, right))
    assert shapely.area(shapely.intersection(a, b)) < 1e-6 and seams.clipped == 1 and seams.removed == 0
    assert right.column("area")[0].as_py() == pytest.approx(b.area, rel=1e-6)
    assert right.column("centroid_x")[0].as_py() == pytest.approx(b.centroid.x - 0.5)
    assert right.column("bbox_x0")[0].as_py() == 102  # the tips of the cut-away lens lie at x = 102.5
    assert left.column("area")[0].as_py() == pytest.approx(a.area)


def test_outlines_crossing_by_under_a_pixel_are_cut_apart_without_clipping_the_nucleus():
    """At another resolution than the model's, two neighbours' outlines can cross by a fraction of a pixel (0.25 px²
    on a 20x slide, a reviewer found): no polygons may overlap, but such a sliver is no reason to flag the nucleus
    as clipped and drop its outline attributes."""
    inf = np.inf
    seams = wsi_writer.SeamDuplicates({0: 0.0, 1: 0.0}, {0: (-inf, -inf, 100, inf), 1: (100, -inf, inf, inf)},
                                      margin=64)
    seams.add(0, _part(0, [(95, 40, 10)], attributes=True))
    seams.add(1, _part(1, [(114.95, 40, 10)], attributes=True))  # the discs overlap by ~0.01 px²
    left, right = seams.finish()
    a, b = (shapely.from_wkb(t.column("polygon_wkb")[0].as_py()) for t in (left, right))
    discs = shapely.Point(95, 40).buffer(10), shapely.Point(114.95, 40).buffer(10)
    assert shapely.area(shapely.intersection(*discs)) > 0
    assert shapely.area(shapely.intersection(a, b)) < 1e-9
    assert right.column("seam_clipped").to_pylist() == [False] and seams.clipped == 0
    assert right.column("Size.ConvexHullArea").to_pylist() == [1.0]


def test_a_clipped_nucleus_is_marked_and_its_outline_attributes_are_not_those_of_the_uncut_mask():
    inf = np.inf
    seams = wsi_writer.SeamDuplicates({0: 0.0, 1: 0.0}, {0: (-inf, -inf, 100, inf), 1: (100, -inf, inf, inf)},
                                      margin=64)
    seams.add(0, _part(0, [(95, 40, 10)], attributes=True))
    seams.add(1, _part(1, [(110, 40, 10), (140, 40, 5)], attributes=True))
    left, right = seams.finish()
    assert left.column("seam_clipped").to_pylist() == [False]
    assert right.column("seam_clipped").to_pylist() == [True, False]
    for name in ("Size.ConvexHullArea", "Shape.Solidity", "Size.EquivalentDiameter", "Size.Perimeter_um",
                 "Orientation.Orientation"):
        assert name in wsi_writer.SHAPE_ATTRIBUTE_COLUMNS
        assert np.isnan(right.column(name)[0].as_py()) and right.column(name)[1].as_py() == 1.0
        assert left.column(name)[0].as_py() == 1.0
    assert right.column("Nucleus.Hematoxylin.Mean").to_pylist() == [1.0, 1.0]  # intensity means stay


def test_tiled_run_finds_the_nuclei_of_one_pass(slide, reference):
    """Seam-free stitching: ≥ 99 % of the nuclei found in one pass over the whole 1024² image have a tiled nucleus
    with IoU > 0.9, and no tiled nucleus is duplicated."""
    model = karyo.load("classical")
    # The same model the run used (its slide-wide threshold came from the tiles), over the whole image at once.
    from karyo.config import from_dict

    model = type(model)(from_dict(type(model.config), reference.summary["model"]["config"]))
    one = model.segment(slide[1], mpp=MPP)
    truth = list(instance_polygons(one.instances).values())
    table = pq.read_table(reference.out_dir / "nuclei.parquet")
    tiled = shapely.from_wkb(table.column("polygon_wkb").to_numpy(zero_copy_only=False))
    tree = shapely.STRtree(tiled)
    best = np.zeros(len(truth))
    for k, poly in enumerate(truth):
        for j in tree.query(poly, predicate="intersects"):
            inter = poly.intersection(tiled[j]).area
            best[k] = max(best[k], inter / (poly.area + tiled[j].area - inter))
    assert len(truth) > 500
    assert np.mean(best > 0.9) >= 0.99
    pairs = tree.query(tiled, predicate="intersects")
    pairs = pairs[:, pairs[0] < pairs[1]]
    overlap = [tiled[i].intersection(tiled[j]).area for i, j in pairs.T]
    assert not any(a > 1.0 for a in overlap)  # neighbours share at most an outline, never a nucleus
    assert abs(table.num_rows - len(truth)) <= 0.01 * len(truth)


def test_outputs_are_complete_and_consistent(slide, reference):
    out = reference.out_dir
    table = pq.read_table(out / "nuclei.parquet")
    n = table.num_rows
    assert table.column("nucleus_id").to_pylist() == list(range(1, n + 1))
    assert table.column("tile").to_numpy().tolist() == sorted(table.column("tile").to_numpy().tolist())
    for name in ("Size.EquivalentDiameter", "Shape.Solidity", "Nucleus.Hematoxylin.Mean"):
        assert name in table.schema.names and np.isfinite(table.column(name).to_numpy()).all()
    # every nucleus lies in the slide and in the core of the tile that reports it
    tiles = {t.index: t for t in plan_tiles(1024, 1024, 256, 64)}
    cx, cy = table.column("centroid_x").to_numpy(), table.column("centroid_y").to_numpy()
    for t, x, y in zip(table.column("tile").to_numpy(), cx, cy, strict=True):
        assert tiles[int(t)].owns(np.array([x + 0.5]), np.array([y + 0.5]))[0]
    assert ((cx >= 0) & (cx < 1024) & (cy >= 0) & (cy < 1024)).all()
    geoms = shapely.from_wkb(table.column("polygon_wkb").to_numpy(zero_copy_only=False))
    area = table.column("area").to_numpy()
    assert np.allclose(shapely.area(geoms), area, rtol=0.35)  # polygons follow the pixel outlines
    geo_meta = json.loads(table.schema.metadata[b"geo"])  # GeoParquet: geopandas.read_parquet finds the polygons
    assert geo_meta["primary_column"] == "polygon_wkb" and geo_meta["columns"]["polygon_wkb"]["encoding"] == "WKB"
    assert set(shapely.get_type_id(geoms)) <= {3, 6}  # Polygon, MultiPolygon: the declared geometry types
    assert json.loads(table.schema.metadata[b"karyo"])["coordinates"]
    np.testing.assert_allclose(table.column("area_um2").to_numpy(), area * MPP**2)
    geo = json.loads((out / "nuclei.geojson").read_text())
    assert len(geo["features"]) == n
    first = geo["features"][0]
    assert first["properties"]["objectType"] == "detection" and first["properties"]["nucleus_id"] == 1
    assert first["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert "Area µm^2" in first["properties"]["measurements"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary == reference.summary
    assert summary["nuclei"]["total"] == n and sum(summary["nuclei"]["per_class"].values()) == n
    assert summary["tissue"]["area_mm2"] == pytest.approx(1024 * 1024 * MPP**2 / 1e6, rel=0.05)
    assert summary["nuclei"]["density_per_mm2"] == pytest.approx(n / summary["tissue"]["area_mm2"])
    assert summary["tiling"]["tiles_total"] == summary["tiling"]["tiles_with_tissue"] == 25
    assert set(summary["timing_s"]) >= {"read_sum", "model_sum", "postprocess_sum", "write", "wall", "tissue"}
    assert np.asarray(Image.open(out / "overlay.png")).shape == (1024, 1024, 3)
    assert not (out / wsi_writer.WORK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == ["nuclei.geojson", "nuclei.parquet", "overlay.png",
                                                     "summary.json", "tissue_mask.png"]


def test_model_resolution_resampling_keeps_level0_coordinates(shared_data, tmp_path):
    """A slide scanned twice as fine (0.125 µm/px) is read at the model's 0.25 µm/px from its ×2 level: the same
    nuclei come out, at twice the coordinates and four times the area."""
    image = mosaic(patches(shared_data, 4, seed=1), 2, 2)
    fine = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    coarse_run = run_wsi(write_pyramid(tmp_path / "coarse.tif", image, factors=()), "classical", tmp_path / "a",
                         workers=0, options=WSIOptions(attributes=False))
    fine_run = run_wsi(write_pyramid(tmp_path / "fine.tif", fine, mpp=MPP / 2, factors=(2,)), "classical",
                       tmp_path / "b", workers=0, options=WSIOptions(attributes=False))
    a = pq.read_table(coarse_run.out_dir / "nuclei.parquet")
    b = pq.read_table(fine_run.out_dir / "nuclei.parquet")
    assert fine_run.summary["tiling"]["factor"] == 2.0 and a.num_rows == b.num_rows > 50
    np.testing.assert_allclose(b.column("centroid_x").to_numpy(), (a.column("centroid_x").to_numpy() + 0.5) * 2 - 0.5)
    np.testing.assert_allclose(b.column("area").to_numpy(), a.column("area").to_numpy() * 4)
    np.testing.assert_allclose(b.column("area_um2").to_numpy(), a.column("area_um2").to_numpy())
    np.testing.assert_array_equal(b.column("bbox_x1").to_numpy(), a.column("bbox_x1").to_numpy() * 2)
    # without a ×2 level the tile is area-averaged from level 0: close to the coarse image, not identical
    single = tmp_path / "single.tif"
    write_pyramid(single, fine, mpp=MPP / 2, factors=())
    from karyo.data.slide import SlideSpec
    from karyo.infer.tiling import Tile

    proc = TileProcessor(SlideSpec(str(single)), 2.0, MPP, (512, 512))
    with SlideSpec(str(single)).open() as s:
        tile = proc.read(s, Tile(0, 64, 32, 256, 256, (0, 0, 0, 0)))
    diff = np.abs(tile.astype(int) - image[32:288, 64:320].astype(int))
    assert diff.mean() < 6


# ------------------------------------------------------------------------------------------------ resume
def test_sigkill_then_resume_gives_the_uninterrupted_output(slide, reference, tmp_path):
    out = tmp_path / "killed"
    code = textwrap.dedent(f"""
        from karyo.infer.wsi import run_wsi
        run_wsi({str(slide[0])!r}, "classical", {str(out)!r}, workers=0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / wsi_writer.WORK_NAME / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (out / "nuclei.parquet").exists() and not (out / "summary.json").exists()
    finished = manifest.read_bytes().count(b"\n")
    assert 3 <= finished < 25
    result = run_wsi(slide[0], "classical", out, workers=0, resume=True)
    assert result.summary["tiling"]["tiles_from_earlier_runs"] >= 3
    same_outputs(reference.out_dir, out)
    again = run_wsi(slide[0], "classical", out, workers=0, resume=True)  # complete: nothing to redo
    assert again.summary == result.summary


@pytest.mark.parametrize("where", ["part", "geojson"])
def test_disk_full_mid_run_leaves_nothing_corrupt_and_resumes(slide, reference, tmp_path, monkeypatch, where):
    out = tmp_path / "full"
    calls = {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (5 if where == "part" else 200):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    if where == "part":
        original = wsi_writer.pq.write_table
        monkeypatch.setattr(wsi_writer.pq, "write_table", full)
    else:
        original = wsi_writer.GeoJSONWriter.write
        monkeypatch.setattr(wsi_writer.GeoJSONWriter, "write", lambda self, f: full(self, f))
    with pytest.raises(InputError, match="no space left") as err:
        run_wsi(slide[0], "classical", out, workers=0)
    assert "--resume" in str(err.value)
    monkeypatch.undo()
    assert not any((out / f).exists() for f in ("nuclei.parquet", "nuclei.geojson", "summary.json", "overlay.png"))
    work = out / wsi_writer.WORK_NAME
    assert not list(work.glob("*.tmp")) and not list((work / "parts").glob("*.tmp"))
    assert sorted(p.name for p in out.iterdir()) == [wsi_writer.WORK_NAME]  # the mask comes with the results
    for line in (work / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert entry["n"] == 0 or pq.read_table(work / "parts" / f"{entry['tile']:08d}.parquet").num_rows == entry["n"]
    run_wsi(slide[0], "classical", out, workers=0, resume=True)
    same_outputs(reference.out_dir, out)


def test_manifest_drops_a_torn_line_and_tiles_without_their_part(tmp_path):
    work = wsi_writer.WorkDir(tmp_path)
    work.reset({"x": 1})
    table = wsi_writer.part_schema(False).empty_table()
    work.write_part(3, table)
    work.record({"tile": 3, "n": 5})
    work.record({"tile": 4, "n": 0})  # no nuclei: no part needed
    work.record({"tile": 7, "n": 2})  # its part never made it to disk
    with open(work.manifest, "ab") as fh:
        fh.write(b'{"tile": 9, "n"')  # killed while appending
    done = work.finished()
    assert sorted(done.nuclei) == [3, 4] and done.nuclei[3] == 5
    assert work.manifest.read_bytes().endswith(b'"tile": 7}\n')  # the torn tail is cut, later lines append cleanly
    assert work.read_settings() == {"x": 1}


def test_resume_refuses_other_settings(slide, tmp_path, monkeypatch):
    out = tmp_path / "r"
    _interrupt_after(monkeypatch, 1)  # (interrupted before any tile, a folder it made would be removed)
    with pytest.raises(KeyboardInterrupt):
        run_wsi(slide[0], "classical", out, workers=0)
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"cannot resume.*tiling"):
        run_wsi(slide[0], "classical", out, workers=0, tile=192, overlap=48, resume=True)
    # a run begun by a karyo whose attribute columns had other units (its settings lack them) is not continued
    work = wsi_writer.WorkDir(out)
    old = work.read_settings()
    assert old["outputs"]["attribute_units"].startswith("level-0 pixels")
    del old["outputs"]["attribute_units"]
    work.settings.write_text(json.dumps(old))
    with pytest.raises(InputError, match=r"cannot resume.*outputs"):
        run_wsi(slide[0], "classical", out, workers=0, resume=True)


def test_starting_over_an_unfinished_run_says_so(slide, tmp_path, monkeypatch, caplog):
    out = tmp_path / "r"
    real = wsi_writer.WorkDir.record
    calls = []

    def stop_after_two(self, entry):
        calls.append(entry)
        if len(calls) > 2:
            raise KeyboardInterrupt
        real(self, entry)

    monkeypatch.setattr(wsi_writer.WorkDir, "record", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_wsi(slide[0], "classical", out, workers=0)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="karyo.infer.wsi"):
        run_wsi(slide[0], "classical", out, workers=0)
    assert "an unfinished run there (2 tiles done) is discarded" in caplog.text and "--resume" in caplog.text


# ------------------------------------------------------------------------------------------------ distribution
def test_one_and_two_dask_workers_give_identical_output(slide, reference, tmp_path):
    """Real local clusters of worker processes; results arrive out of order and are merged in tile order."""
    for n in (1, 2):
        run = run_wsi(slide[0], "classical", tmp_path / f"w{n}", workers=n)
        assert run.summary["execution"]["mode"] == "dask" and run.summary["execution"]["workers"] == n
        assert run.summary["execution"]["tiles_in_flight"] == max(2, 2 * n)
        same_outputs(reference.out_dir, tmp_path / f"w{n}")


def test_existing_scheduler(slide, reference, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        run = run_wsi(slide[0], "classical", tmp_path / "s", scheduler=address)
    assert run.summary["execution"]["scheduler"] == address and run.summary["execution"]["threads"] == 2
    same_outputs(reference.out_dir, tmp_path / "s")
    with pytest.raises(InputError, match="cannot use the dask scheduler"):
        run_wsi(slide[0], "classical", tmp_path / "x", scheduler="tcp://127.0.0.1:9",
                options=WSIOptions(scheduler_timeout=1.0))


# ------------------------------------------------------------------------------------------------ tissue
def test_tissue_detection_skips_a_blank_half(shared_data, tmp_path):
    rng = np.random.default_rng(3)
    tissue = mosaic(patches(shared_data, 4, seed=2), 2, 2)
    glass = np.clip(rng.normal(238, 3, tissue.shape), 0, 255).astype(np.uint8)  # slightly noisy empty glass
    path = write_pyramid(tmp_path / "half.tif", np.concatenate([tissue, glass], axis=1), factors=())
    result = run_wsi(path, "classical", tmp_path / "out", workers=0, options=WSIOptions(attributes=False))
    s = result.summary
    mask = np.asarray(Image.open(tmp_path / "out" / "tissue_mask.png")) > 0
    assert mask.shape == (16, 32)  # 8 µm per mask pixel
    assert mask[:, :16].mean() > 0.95 and mask[:, 17:].mean() == 0
    assert s["tissue"]["fraction"] == pytest.approx(0.5, abs=0.03)
    assert s["tiling"]["tiles_total"] == 15 and s["tiling"]["tiles_with_tissue"] == 9
    cx = pq.read_table(tmp_path / "out" / "nuclei.parquet").column("centroid_x").to_numpy()
    assert cx.max() < 512 + 32


def test_detect_tissue_thresholds():
    white = np.full((50, 50, 3), 250, np.uint8)
    assert not detect_tissue(white, 8.0)[0].any()
    pink = np.zeros((50, 50, 3), np.uint8) + np.array([230, 150, 200], np.uint8)
    pink[20:30, 20:30] = (120, 60, 160)  # darker purple inside pale pink: Otsu would split them; the clip keeps both
    mask, thr = detect_tissue(pink, 8.0)
    assert mask.all() and thr == TissueOptions().max_threshold
    assert detect_tissue(white, 8.0, TissueOptions(enabled=False))[0].all()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors(slide, tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + b"\x00garbage" * 50)
    with pytest.raises(InputError, match="cannot read slide"):
        run_wsi(junk, "classical", tmp_path / "o1", workers=0)
    image = slide[1][:256, :256]
    nompp = write_pyramid(tmp_path / "nompp.tif", image, factors=(), resolution=False)
    with pytest.raises(InputError, match="--mpp"):
        run_wsi(nompp, "classical", tmp_path / "o2", workers=0)
    assert not (tmp_path / "o2").exists()  # a refused run leaves no empty output folder either
    calls = []
    ok = run_wsi(nompp, "classical", tmp_path / "o2", mpp=MPP, workers=0, progress=lambda *a: calls.append(a))
    assert ok.summary["slide"]["mpp"] == MPP and ok.summary["nuclei"]["total"] > 0
    assert calls == [(1, 1, ok.summary["nuclei"]["total"])]
    blank = write_pyramid(tmp_path / "blank.tif", np.full((512, 512, 3), 245, np.uint8), factors=())
    with pytest.raises(InputError, match="no tissue"):
        run_wsi(blank, "classical", tmp_path / "o3", workers=0)
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["tissue_mask.png"]
    with pytest.raises(InputError, match="workers"):
        run_wsi(nompp, "classical", tmp_path / "o4", mpp=MPP, workers=-1)


def test_attribute_lengths_and_areas_share_the_unit_of_area():
    """Measured on the model-resolution tile, Size.* lengths and areas come out in level-0 px (as ``area``), so a
    convex hull is never read as 4× a nucleus' area on a slide at half the model's resolution."""
    from karyo.infer.wsi import _attributes

    image = np.full((64, 64, 3), 230, np.uint8)
    instances = np.zeros((64, 64), np.int32)
    yy, xx = np.mgrid[:64, :64]
    instances[(yy - 30) ** 2 / 100 + (xx - 30) ** 2 / 36 <= 1] = 1
    image[instances > 0] = (90, 60, 140)
    ids = np.array([1])
    model_px, level0 = _attributes(image, instances, ids, 1.0), _attributes(image, instances, ids, 0.5)
    assert level0["Size.Perimeter"][0] == pytest.approx(model_px["Size.Perimeter"][0] * 0.5)
    assert level0["Size.ConvexHullArea"][0] == pytest.approx(model_px["Size.ConvexHullArea"][0] * 0.25)
    assert level0["Shape.Solidity"][0] == pytest.approx(model_px["Shape.Solidity"][0])
    assert model_px["Size.ConvexHullArea"][0] >= (instances > 0).sum() * 0.95
    # with the slide's µm per level-0 px: the µm twins karyo attributes writes (the model at 0.25, the slide at 0.5)
    twins = _attributes(image, instances, ids, 0.5, 0.5)
    assert twins["Size.Perimeter_um"][0] == pytest.approx(level0["Size.Perimeter"][0] * 0.5)
    assert twins["Size.ConvexHullArea_um2"][0] == pytest.approx(model_px["Size.ConvexHullArea"][0] * 0.25 ** 2)


def test_decoded_png_cache_is_removed_unless_a_resume_needs_it(slide, tmp_path):
    """A PNG slide is decoded once into OUT/.karyo-cache for the workers; a finished run, a --resume of a finished
    run and a refused run (no tissue) leave no such copy of the whole image behind."""
    png = tmp_path / "tile.png"
    Image.fromarray(slide[1][:512, :512]).save(png)
    out = tmp_path / "o"
    run_wsi(png, "classical", out, mpp=MPP, workers=0)
    assert not (out / ".karyo-cache").exists()
    run_wsi(png, "classical", out, mpp=MPP, workers=0, resume=True)
    assert not (out / ".karyo-cache").exists()
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512, 3), 245, np.uint8)).save(blank)
    with pytest.raises(InputError, match="no tissue"):
        run_wsi(blank, "classical", tmp_path / "b", mpp=MPP, workers=0)
    assert not (tmp_path / "b" / ".karyo-cache").exists()
    png_nompp = tmp_path / "nompp.png"  # refused before anything is computed: not even the decoded copy stays
    Image.fromarray(slide[1][:512, :512]).save(png_nompp)
    with pytest.raises(InputError, match="pixel size"):
        run_wsi(png_nompp, "classical", tmp_path / "c", workers=0)
    assert not (tmp_path / "c").exists()


def test_a_slide_failing_before_any_tile_leaves_nothing_to_resume(slide, tmp_path, monkeypatch):
    """A damaged slide whose first tile cannot be read: the error, and no work folder a --resume would fail on
    again (nor a tissue mask: it comes with the results)."""
    def damaged(self, slide_, tile):
        raise InputError("slide.tif", f"cannot decode tile {tile.index}")

    monkeypatch.setattr(TileProcessor, "read", damaged)
    with pytest.raises(InputError, match="cannot decode tile 0"):
        run_wsi(slide[0], "classical", tmp_path / "o", workers=0)
    assert not (tmp_path / "o").exists()


def test_a_refused_run_leaves_a_finished_folder_as_it_was(slide, tmp_path):
    """A blank slide (or a --resume with other settings) aimed at a folder holding a finished run changes none of
    its files: the folder never mixes two slides."""
    small = write_pyramid(tmp_path / "small.tif", slide[1][:512, :512], factors=())
    out = tmp_path / "o"
    run_wsi(small, "classical", out, workers=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    blank = write_pyramid(tmp_path / "blank.tif", np.full((512, 512, 3), 245, np.uint8), factors=())
    with pytest.raises(InputError, match="no tissue found") as err:
        run_wsi(blank, "classical", out, workers=0)
    assert "tissue_mask.png" not in str(err.value)
    with pytest.raises(InputError, match="the finished run there used other settings"):
        run_wsi(small, "classical", out, workers=0, tile=192, overlap=48, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli_wsi(slide, tmp_path):
    from karyo.cli import app

    text = " ".join(CliRunner().invoke(app, ["wsi", "--help"]).output.replace("│", " ").split())
    assert f"(default {WSIOptions().tile})" in text and f"(default {WSIOptions().overlap})" in text  # no drift
    assert "a bar on a terminal, otherwise (a batch log) a plain line at every 10%" in text

    small = write_pyramid(tmp_path / "small.tif", slide[1][:512, :512], factors=())
    res = CliRunner().invoke(app, ["wsi", str(small), "--model", "classical", "--out", str(tmp_path / "o"),
                                   "--workers", "0", "--tile", "192", "--overlap", "48", "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["tiling"]["tile"] == 192 and summary["nuclei"]["total"] > 0
    other = run_wsi(small, "classical", tmp_path / "o_default", workers=0)  # other tiling: other nuclei, other ids
    first_ids = {f["id"] for f in json.loads((tmp_path / "o" / "nuclei.geojson").read_text())["features"]}
    assert not first_ids & {f["id"] for f in json.loads(other.paths["geojson"].read_text())["features"]}
    assert summary["execution"]["torch_threads"] == 1
    assert f"{summary['nuclei']['total']:,} nuclei" in res.output
    tiles = summary["tiling"]["tiles_with_tissue"]  # no terminal here: plain progress lines, the last at 100 %
    assert f"{tiles}/{tiles} tiles (100%), {summary['nuclei']['total']:,} nuclei" in res.output
    assert "note: --mpp" not in res.output
    res = CliRunner().invoke(app, ["wsi", str(small), "--model", "classical", "--out", str(tmp_path / "o2"),
                                   "--workers", "0", "--mpp", "0.5"])
    assert res.exit_code == 0 and "note: --mpp 0.5 was used; the file states 0.25 µm/px" in res.output
    res = CliRunner().invoke(app, ["wsi", str(small), "--model", "classical", "--out", str(tmp_path / "o3"),
                                   "--workers", "0", "--tile", "128", "--overlap", "0"])
    assert res.exit_code == 0 and "may be cut; raise --overlap" in " ".join(res.output.split())
    bad = CliRunner().invoke(app, ["wsi", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o5")])
    assert bad.exit_code == 2 and "file not found" in bad.output


@pytest.fixture(scope="module")
def small_slide(slide, tmp_path_factory):
    """512² of the slide, single level: a run of a few seconds."""
    return write_pyramid(tmp_path_factory.mktemp("small") / "small.tif", slide[1][:512, :512], factors=())


def test_disk_full_whose_close_fails_again_gives_the_one_line_error_and_no_temporary_files(small_slide, tmp_path,
                                                                                            monkeypatch):
    """On a full disk the GeoJSON writer's buffered bytes fail again when the file is closed: the abort swallows
    that, so the user sees the full-disk message (not an OSError) and the merge's temporary files are gone."""
    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        @property
        def closed(self):
            return self.fh.closed

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.fh.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = wsi_writer.GeoJSONWriter.write

    def write(self, feature):
        if self.count >= 5:
            self._fh = FullFile(self._fh)
        real(self, feature)

    monkeypatch.setattr(wsi_writer.GeoJSONWriter, "write", write)
    out = tmp_path / "o"
    with pytest.raises(InputError, match=r"no space left on the device while writing nuclei\.geojson") as err:
        run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(tile=192, overlap=48))
    assert "--resume" in str(err.value)
    work = out / wsi_writer.WORK_NAME
    assert not list(work.glob("*.tmp")) and not list(work.glob("nuclei.*"))


def test_imagej_resolution_is_read_as_read_image_meta_reads_it(slide, tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, slide[1][:512, :512], imagej=True, resolution=(4.0, 4.0), metadata={"unit": "micron"})
    assert karyo.read_image_meta(path)[1]["mpp"] == pytest.approx(0.25)
    with karyo.data.slide.open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25)
    result = run_wsi(path, "classical", tmp_path / "o", workers=0, options=WSIOptions(attributes=False))
    assert result.summary["slide"]["metadata_mpp"] == pytest.approx(0.25)


def test_a_truncated_tiff_is_reported_once(slide, tmp_path, caplog):
    """tifffile logs each series it cannot parse; karyo's own error line is the only report."""
    whole = write_pyramid(tmp_path / "whole.tif", slide[1][:512, :512], factors=(2,))
    cut = tmp_path / "cut.tif"
    data = whole.read_bytes()
    cut.write_bytes(data[:50000])  # the SubIFD holding level 1 lies beyond
    with caplog.at_level("DEBUG"), contextlib.suppress(InputError), karyo.data.slide.open_slide(cut):
        pass
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_replacing_a_finished_run_says_so(small_slide, tmp_path, caplog):
    out = tmp_path / "o"
    run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(attributes=False))
    with caplog.at_level("WARNING", logger="karyo.infer.wsi"):
        run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(attributes=False))
    assert f"{out}: the finished run there is replaced by this one" in caplog.text


def test_a_second_run_into_a_folder_being_written_is_refused(small_slide, tmp_path, caplog):
    """A lock file holds the pid and host of the run writing OUT: a live holder refuses the second run (it would
    delete the first one's work folder); a dead one's lock is taken over."""
    import socket

    out = tmp_path / "o"
    out.mkdir()
    lock = out / wsi_writer.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive: pytest's parent
    with pytest.raises(InputError, match=r"another karyo wsi run is writing there \(pid") as err:
        run_wsi(small_slide, "classical", out, workers=0)
    assert str(err.value).startswith(f"{out}: ") and lock.is_file()
    assert not (out / wsi_writer.WORK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="karyo.infer.wsi"):
        result = run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(attributes=False))
    assert "taking over the lock" in caplog.text and result.summary["nuclei"]["total"] > 0
    assert not lock.exists()  # released when the run ends


def test_an_output_that_is_a_file_is_refused_in_one_clear_line(small_slide, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match=r"afile: the output \(--out\) must be a folder, and this is a file"):
        run_wsi(small_slide, "classical", afile, workers=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_tile_that_cannot_be_decoded_mid_run_names_the_slide_as_given_and_what_is_kept(slide, tmp_path,
                                                                                          monkeypatch, workers):
    """A damaged level-0 tile found during tiling: the slide is named as the caller named it (workers open its
    absolute path), and the message says the finished tiles stay and when --resume helps."""
    monkeypatch.chdir(tmp_path)
    path = write_pyramid(tmp_path / "s.tif", slide[1][:512, :512], factors=(2, 4))
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    with open(path, "r+b") as fh:  # the bottom-right tile's zlib stream
        fh.seek(offset + 2)
        fh.write(b"\xff" * (size - 4))
    with pytest.raises(InputError) as err:
        run_wsi("s.tif", "classical", "o", workers=workers,
                options=WSIOptions(tile=192, overlap=48, calibration_tiles=1, overlay_max_size=128))
    message = str(err.value)
    assert message.startswith("s.tif: cannot decode region") and "finished tiles are kept in o" in message
    assert "--resume" in message and (tmp_path / "o" / wsi_writer.WORK_NAME / "manifest.jsonl").stat().st_size
    assert "replaced file is another file: run without --resume" in message  # as a resume of it is refused


def test_a_script_without_the_main_guard_gets_a_clear_error(small_slide, tmp_path):
    """Local dask workers import the calling script again: without ``if __name__ == "__main__":`` the run stops
    with one KaryoError saying so (not pages of multiprocessing tracebacks ending in 'Nanny failed to start')."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from karyo.infer.wsi import run_wsi\n"
                      f"run_wsi({str(small_slide)!r}, 'classical', {str(tmp_path / 'o')!r}, workers=1)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("karyo.errors.KaryoError: the local dask workers failed")
    assert 'if __name__ == "__main__":' in last and "workers=0" in last
    assert 'karyo: run_wsi was called while a worker process was starting' in done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_cli_wsi_takes_sigterm_as_an_interruption(small_slide, tmp_path, monkeypatch):
    """``timeout`` and batch schedulers stop a run with SIGTERM: the resume hint, as for Ctrl-C; the handler is
    the previous one again afterwards."""
    from karyo.cli import app
    from karyo.infer import wsi

    def terminated_run(slide, model, out, **kwargs):
        Path(out).mkdir()  # as a run that has finished tiles leaves it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    def unhandled(signum, frame):  # what the test sees if the command does not handle it (not pytest dying)
        raise RuntimeError("SIGTERM not handled by karyo wsi")

    monkeypatch.setattr(wsi, "run_wsi", terminated_run)
    outer = signal.signal(signal.SIGTERM, unhandled)
    try:
        res = CliRunner().invoke(app, ["wsi", str(small_slide), "--out", str(tmp_path / "o"), "--workers", "0"])
        assert signal.getsignal(signal.SIGTERM) is unhandled
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert "interrupted; finished tiles are kept in" in res.output and "--resume" in res.output


def _interrupt_after(monkeypatch, n_tiles: int) -> None:
    real, calls = wsi_writer.WorkDir.record, []

    def stop(self, entry):
        calls.append(entry)
        if len(calls) > n_tiles:
            raise KeyboardInterrupt
        real(self, entry)

    monkeypatch.setattr(wsi_writer.WorkDir, "record", stop)


def test_resuming_a_run_begun_by_another_karyo_is_refused_in_one_line(small_slide, tmp_path, monkeypatch):
    """Parts written by a karyo of another layout (before ``seam_clipped``) used to fail the merge with a schema
    traceback: the work folder records its format, and a part of other columns is refused as well."""
    out, opts = tmp_path / "o", WSIOptions(tile=192, overlap=48, attributes=False)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run_wsi(small_slide, "classical", out, workers=0, options=opts)
    monkeypatch.undo()
    work = wsi_writer.WorkDir(out)
    settings = work.read_settings()
    old = {k: v for k, v in settings.items() if k != "format"}  # as the previous karyo wrote it
    work.settings.write_text(json.dumps(old))
    with pytest.raises(InputError, match=r"cannot resume: the unfinished run there was begun by another karyo.*"
                                         r"run without --resume") as err:
        run_wsi(small_slide, "classical", out, workers=0, options=opts, resume=True)
    assert "\n" not in str(err.value)
    work.settings.write_text(json.dumps(settings))  # same settings, but a part without the new column
    part = sorted(work.parts.glob("*.parquet"))[0]
    pq.write_table(pq.read_table(part).drop(["seam_clipped"]), part)
    with pytest.raises(InputError, match=r"begun by another karyo \(tile \d+ has other columns\); run without"):
        run_wsi(small_slide, "classical", out, workers=0, options=opts, resume=True)
    assert not (out / wsi_writer.LOCK_NAME).exists() and not list(out.glob(".karyo-wsi/*.tmp"))


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_when_the_lock_is_written_gives_one_line_and_leaves_no_lock(small_slide, tmp_path, monkeypatch,
                                                                              existing):
    out = tmp_path / "o"
    if existing:
        out.mkdir()

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wsi_writer, "_write_all", full)
    with pytest.raises(InputError, match=r"no space left on the device while writing the lock file"):
        run_wsi(small_slide, "classical", out, workers=0)
    assert out.exists() == existing and (not existing or not list(out.iterdir()))
    monkeypatch.undo()
    run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(attributes=False))  # no "just started"


def test_resume_of_a_finished_run_on_read_only_storage_writes_nothing(small_slide, tmp_path, monkeypatch):
    out, opts = tmp_path / "o", WSIOptions(attributes=False)
    first = run_wsi(small_slide, "classical", out, workers=0, options=opts)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    again = run_wsi(small_slide, "classical", out, workers=0, options=opts, resume=True)
    assert again.summary == first.summary
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(InputError, match=r"cannot write the output folder \(Read-only file system\)"):
        run_wsi(small_slide, "classical", out, workers=0, options=opts)  # a run that must write still says so


def test_a_lock_with_our_own_pid_that_we_did_not_take_is_stale(small_slide, tmp_path, caplog):
    """A restarted container runs karyo under the pid of the run that died there: its lock is taken over."""
    import socket

    out = tmp_path / "o"
    out.mkdir()
    (out / wsi_writer.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with caplog.at_level("WARNING", logger="karyo.infer.wsi"):
        run_wsi(small_slide, "classical", out, workers=0, options=WSIOptions(attributes=False))
    assert "taking over the lock" in caplog.text and not (out / wsi_writer.LOCK_NAME).exists()
    held = wsi_writer.OutputLock(out)
    with held, pytest.raises(InputError, match="another karyo wsi run is writing there"):
        wsi_writer.OutputLock(out).acquire()  # a lock this process does hold is not stale


def test_an_interruption_before_any_tile_removes_the_folder_it_created(small_slide, tmp_path, monkeypatch):
    from karyo.cli import app
    from karyo.infer import wsi

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wsi.WSIEngine, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_wsi(small_slide, "classical", tmp_path / "o", workers=0)
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["wsi", str(small_slide), "--model", "classical", "--out", str(tmp_path / "o"),
                                   "--workers", "0"])
    assert res.exit_code == 128 + signal.SIGINT and "before any tile was finished" in res.output
    assert not (tmp_path / "o").exists()


def test_a_failed_read_leaves_no_zarr_task_pending(slide, tmp_path):
    """A chunk that fails to decode fails the read while its siblings still run on zarr's loop; left pending, each
    prints 'Task was destroyed but it is pending!' at exit."""
    import asyncio

    from zarr.core import sync

    path = write_pyramid(tmp_path / "s.tif", slide[1], factors=())
    with tifffile.TiffFile(path) as tif:
        offset, size = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as fh:  # the first tile's zlib stream
        fh.seek(offset + 2)
        fh.write(b"\xff" * (size - 4))
    with karyo.data.slide.open_slide(path) as s, pytest.raises(InputError, match="cannot decode region"):
        s.read_level(0, 0, 0, 1024, 1024)

    async def others():
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run_coroutine_threadsafe(others(), sync.loop[0]).result(10) == []


def test_the_failed_cluster_error_names_the_guard_under_python_m(monkeypatch):
    import types

    from karyo.infer import wsi

    main = types.ModuleType("__main__")
    main.__file__, main.__spec__ = "/x/mymod.py", object()
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert 'if __name__ == "__main__":' in str(wsi._cluster_failed(RuntimeError("Nanny failed to start.")))


def test_progress_counts_the_nuclei_kept_and_geojson_flags_clipped_nuclei_as_a_measurement(slide, tmp_path):
    calls = []
    result = run_wsi(slide[0], "classical", tmp_path / "o", workers=0, progress=lambda *a: calls.append(a),
                     options=WSIOptions(tile=160, overlap=48, attributes=False))
    n = result.summary["nuclei"]
    assert n["seam_duplicates_removed"] > 0 and calls[-1][2] == n["total"]
    features = json.loads(result.paths["geojson"].read_text())["features"]
    flags = [f["properties"]["measurements"]["Seam clipped"] for f in features]
    assert set(flags) <= {0, 1} and sum(flags) == n["seam_overlaps_clipped"]


def test_fork_server_hides_only_the_failures_of_a_worker_whose_run_has_gone(monkeypatch, capsys):
    """karyo.infer._forkserver (imported by the workers' fork server only): a worker forked while Ctrl-C ends
    the run fails inside multiprocessing.spawn._main on the run's removed semaphores; that is kept quiet, and an
    error anywhere else is still printed."""
    import importlib

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # this test process keeps its own SIGINT handler
    monkeypatch.delitem(sys.modules, "karyo.infer._forkserver", raising=False)  # imported afresh, as there
    hook = importlib.import_module("karyo.infer._forkserver").quiet_vanished_parent
    namespace: dict = {}
    exec(compile("def _main(error):\n    raise error\n", "/py/lib/multiprocessing/spawn.py", "exec"), namespace)

    def raised(error, where):
        try:
            where(error)
        except Exception:
            return sys.exc_info()

    def elsewhere(error):
        raise error

    hook(*raised(FileNotFoundError(2, "No such file or directory"), namespace["_main"]))
    assert capsys.readouterr().err == ""
    hook(*raised(FileNotFoundError(2, "No such file or directory"), elsewhere))
    hook(*raised(ValueError("a real bug"), namespace["_main"]))
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and "ValueError: a real bug" in err
