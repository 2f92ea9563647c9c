"""Dataset tables (serial and parallel), Parquet/CSV/GeoJSON output, and the two CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk
from typer.testing import CliRunner

from karyo.attributes.table import measure_samples, nucleus_geojson, write_table
from karyo.cli import app
from karyo.data import Sample
from karyo.data.io import write_image, write_instances
from karyo.data.layout import write_layout_sample

NAMES = {1: "small", 2: "large"}


def _sample(seed: int, name: str) -> Sample:
    """Dark disks on a pink background: class 2 nuclei are twice the radius of class 1."""
    rng = np.random.default_rng(seed)
    image = np.empty((96, 96, 3), np.uint8)
    image[:] = (230, 180, 210)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((96, 96), np.int32)
    classes = {}
    for i, (cy, cx) in enumerate([(16, 16), (16, 60), (50, 30), (50, 75), (80, 15), (80, 55)], start=1):
        big = (i + seed) % 2 == 0
        rr, cc = disk((cy, cx), (9 if big else 4.5) + rng.uniform(-1, 1), shape=labels.shape)
        labels[rr, cc] = i
        image[rr, cc] = (90 + rng.integers(0, 40), 40, 140)
        classes[i] = 2 if big else 1
    return Sample(image=image, instances=labels, classes=classes, class_names=NAMES, name=name)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return [_sample(s, f"img{s}") for s in range(6)]


@pytest.fixture(scope="module")
def layout(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("layout")
    for i, s in enumerate(samples):
        write_layout_sample(root, s, split="train" if i < 4 else "test")
    return root


def test_parallel_equals_serial(samples, layout):
    from karyo.data.layout import LayoutDataset

    serial = measure_samples(samples)
    parallel = measure_samples(samples, n_jobs=2, chunk_size=2)
    pd.testing.assert_frame_equal(serial, parallel)
    lazy = measure_samples(LayoutDataset(layout), n_jobs=2, chunk_size=2)
    pd.testing.assert_frame_equal(serial, lazy)
    assert serial["Identifier.Image"].unique().tolist() == [s.name for s in samples]
    assert set(serial["Class.Name"]) == {"small", "large"}
    # z-scores are per image
    for _, rows in serial[serial["Flag.Valid"]].groupby("Identifier.Image"):
        assert rows["Color.HematoxylinZ"].mean() == pytest.approx(0.0, abs=1e-9)


def test_empty_input_gives_empty_table():
    df = measure_samples([])
    assert len(df) == 0 and "Size.Area" in df.columns and "Identifier.Image" in df.columns


def test_write_table_round_trip(tmp_path, samples):
    df = measure_samples(samples[:2])
    files = write_table(df, tmp_path / "attrs")
    assert [f.name for f in files] == ["attrs.parquet", "attrs.csv"]
    back = pd.read_parquet(files[0])
    assert (back.pop("instance_id") == df["Identifier.Label"]).all()  # several images' rows: a column to join on
    pd.testing.assert_frame_equal(back, df)
    csv = pd.read_csv(files[1])
    assert csv["Size.Area"].tolist() == df["Size.Area"].tolist()
    assert csv["Shape.Solidity"].to_numpy() == pytest.approx(df["Shape.Solidity"].to_numpy(), rel=1e-9)
    assert not list(tmp_path.glob("*.part*"))


def test_one_image_tables_join_on_instance_id_and_share_a_schema_when_empty(tmp_path, samples):
    """Per-image files (karyo attributes IMAGE) keep the id the segment table and GeoJSON use, and an image
    without nuclei writes the same column types, so that the files read as one dataset."""
    import pyarrow.dataset as ds

    from karyo.attributes import measure_nuclei

    s = samples[0]
    table = measure_nuclei(s.image, s.instances, s.classes, class_names=s.class_names)
    full = write_table(table, tmp_path / "a" / "full")[0]
    blank = measure_nuclei(np.full_like(s.image, 240), np.zeros_like(s.instances))
    empty = write_table(blank, tmp_path / "a" / "empty")[0]
    back = pd.read_parquet(full)
    assert back["instance_id"].tolist() == table.index.tolist() == back["Identifier.Label"].tolist()
    both = ds.dataset([str(full), str(empty)]).to_table()
    assert both.num_rows == len(table)
    big = table.copy()
    big["Identifier.CentroidX"] += 123456  # slide coordinates keep a thousandth of a pixel in CSV
    csv = pd.read_csv(write_table(big, tmp_path / "big", formats=("csv",))[0])
    assert csv["Identifier.CentroidX"].to_numpy() == pytest.approx(big["Identifier.CentroidX"].to_numpy(), abs=1e-3)


def test_geojson_carries_measurements_classes_and_prompts(tmp_path, samples):
    from karyo.attributes import measure_nuclei

    s = samples[0]
    table = measure_nuclei(s.image, s.instances, s.classes, class_names=s.class_names)
    prompts = {int(k): f"nucleus {k}" for k in table.index}
    path = nucleus_geojson(tmp_path / "x.geojson", s.instances, table, classes=s.classes, class_names=NAMES,
                           prompts=prompts)
    fc = json.loads(path.read_text())
    assert len(fc["features"]) == len(table)
    props = {f["properties"]["instance_id"]: f["properties"] for f in fc["features"]}
    first = props[1]
    assert first["measurements"]["Size.Area"] == int(table.loc[1, "Size.Area"])
    assert first["measurements"]["Shape.Eccentricity"] == pytest.approx(table.loc[1, "Shape.Eccentricity"])
    assert first["classification"]["name"] == NAMES[s.classes[1]]
    assert first["prompt"] == "nucleus 1"


runner = CliRunner()


def test_cli_attributes_on_one_image(tmp_path, samples):
    s = samples[1]
    write_image(tmp_path / "in" / "tile.png", s.image)
    write_instances(tmp_path / "in" / "tile_mask.png", s.instances)
    (tmp_path / "in" / "tile.csv").write_text("instance_id,class_id\n"
                                               + "".join(f"{k},{v}\n" for k, v in s.classes.items()))
    out = tmp_path / "out"
    res = runner.invoke(app, ["attributes", str(tmp_path / "in" / "tile.png"), "--instances",
                              str(tmp_path / "in" / "tile_mask.png"), "--classes", str(tmp_path / "in" / "tile.csv"),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "6 nuclei in 1 image" in res.output
    table = pd.read_parquet(out / "tile_attributes.parquet")
    assert len(table) == 6 and table["Text.Prompt"].str.contains("nucleus").all()
    assert (out / "tile.geojson").is_file() and (out / "tile_levels.json").is_file()
    assert (out / "tile_attributes.csv").is_file()


def test_cli_attributes_says_why_a_run_has_no_sentences_or_class_levels(tmp_path, samples):
    """Levels per class without classes are fitted globally, with a note; an image whose nuclei are all too small
    or cut by the border gets empty sentences and no levels file, with a note that says why."""
    s = samples[1]
    write_image(tmp_path / "tile.png", s.image)
    write_instances(tmp_path / "tile_mask.png", s.instances)
    res = runner.invoke(app, ["attributes", str(tmp_path / "tile.png"), "--instances", str(tmp_path / "tile_mask.png"),
                              "--level-mode", "per_class", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0 and "note: level mode per_class needs the nuclei's classes" in res.output
    assert json.loads((tmp_path / "a" / "tile_levels.json").read_text())["mode"] == "global"
    tiny = np.zeros_like(s.instances)
    tiny[40, 40] = 1
    tiny[0:5, 0:5] = 2  # at the border
    write_instances(tmp_path / "tiny_mask.png", tiny)
    res = runner.invoke(app, ["attributes", str(tmp_path / "tile.png"), "--instances", str(tmp_path / "tiny_mask.png"),
                              "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "note: no nucleus is valid" in " ".join(res.output.split())
    assert (pd.read_parquet(tmp_path / "b" / "tile_attributes.parquet")["Text.Prompt"] == "").all()
    assert not (tmp_path / "b" / "tile_levels.json").exists()


def test_cli_attributes_rerun_into_a_folder_leaves_no_file_of_the_earlier_run(tmp_path, samples, layout):
    s = samples[1]
    write_image(tmp_path / "tile.png", s.image)
    write_instances(tmp_path / "tile_mask.png", s.instances)
    out = tmp_path / "o"
    args = ["attributes", str(tmp_path / "tile.png"), "--instances", str(tmp_path / "tile_mask.png"), "--out", str(out)]
    runner.invoke(app, args)
    (out / "notes.txt").write_text("mine")
    levels = tmp_path / "levels.json"
    (out / "tile_levels.json").rename(levels)
    (out / "tile_levels.json").write_text((levels).read_text())
    res = runner.invoke(app, [*args, "--no-geojson", "--levels", str(levels)])
    assert res.exit_code == 0 and "removed tile_levels.json, tile.geojson of an earlier run" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "tile_attributes.csv", "tile_attributes.parquet"]
    res = runner.invoke(app, [*args, "--levels", str(out / "tile_attributes.parquet")])  # a bad levels file...
    assert res.exit_code == 2 and (out / "tile_attributes.parquet").is_file()  # ...is not removed as stale
    ds = tmp_path / "ds"
    runner.invoke(app, ["attributes", str(layout), "--out", str(ds)])
    res = runner.invoke(app, ["attributes", str(layout), "--split", "test", "--levels", str(ds / "levels.json"),
                              "--out", str(ds)])
    assert res.exit_code == 0 and "removed" in res.output and (ds / "levels.json").is_file()  # read, so kept
    assert sorted(p.stem for p in (ds / "geojson").iterdir()) == ["img4", "img5"]


def test_cli_attributes_reads_12_bit_rgb_on_its_range_with_bits(tmp_path, samples):
    """12-bit H&E stored as 16-bit looked almost black, so its stain ran the wrong way without a word: the run
    says so, and --bits 12 measures it as its 8-bit original."""
    import tifffile

    s = samples[1]
    write_image(tmp_path / "tile.png", s.image)
    write_instances(tmp_path / "mask.png", s.instances)
    tifffile.imwrite(tmp_path / "cam.tif", (s.image.astype(np.uint32) * 4095 // 255).astype(np.uint16),
                     photometric="rgb")
    base = ["--instances", str(tmp_path / "mask.png"), "--no-geojson"]
    runner.invoke(app, ["attributes", str(tmp_path / "tile.png"), *base, "--out", str(tmp_path / "a")])
    dark = runner.invoke(app, ["attributes", str(tmp_path / "cam.tif"), *base, "--out", str(tmp_path / "b")])
    assert "values only reach" in dark.output and "pass --bits 12" in " ".join(dark.output.split())
    res = runner.invoke(app, ["attributes", str(tmp_path / "cam.tif"), *base, "--bits", "12", "--out",
                              str(tmp_path / "c")])
    assert res.exit_code == 0 and "values only reach" not in res.output, res.output
    ref = pd.read_parquet(tmp_path / "a" / "tile_attributes.parquet")
    got = pd.read_parquet(tmp_path / "c" / "cam_attributes.parquet")
    np.testing.assert_allclose(got["Color.HematoxylinZ"], ref["Color.HematoxylinZ"], atol=0.05)
    assert (got["Text.Prompt"] == ref["Text.Prompt"]).mean() > 0.8


def test_cli_attributes_on_a_dataset_and_reusing_levels(tmp_path, layout):
    out = tmp_path / "ds"
    res = runner.invoke(app, ["attributes", str(layout), "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(out / "attributes.parquet")
    assert table["Identifier.Image"].nunique() == 6
    assert set(table["Identifier.Split"]) == {"train", "test"}
    assert table.columns[0] == "instance_id" and (table["instance_id"] == table["Identifier.Label"]).all()
    assert not table.duplicated(["Identifier.Image", "instance_id"]).any()
    assert len(list((out / "geojson").glob("*.geojson"))) == 6
    levels = json.loads((out / "levels.json").read_text())
    assert levels["meta"]["fit_split"] == "train"
    # the test split described with the training thresholds
    res = runner.invoke(app, ["attributes", str(layout), "--out", str(tmp_path / "t"), "--split", "test",
                              "--levels", str(out / "levels.json"), "--no-geojson"])
    assert res.exit_code == 0, res.output
    test_table = pd.read_parquet(tmp_path / "t" / "attributes.parquet")
    same = table[table["Identifier.Split"] == "test"].reset_index(drop=True)
    assert test_table["Text.Prompt"].tolist() == same["Text.Prompt"].tolist()
    # without --levels, measuring the test split still fits its levels on the train split, never on itself
    res = runner.invoke(app, ["attributes", str(layout), "--out", str(tmp_path / "t2"), "--split", "test",
                              "--no-geojson"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t2" / "levels.json").read_text())["meta"]["fit_split"] == "train"
    # a levels file fixes the prompt attributes: asking for others too is refused, not ignored
    res = runner.invoke(app, ["attributes", str(layout), "--out", str(tmp_path / "t3"), "--levels",
                              str(out / "levels.json"), "--prompt-attributes", "d_eq"])
    assert res.exit_code == 2 and "fixes the prompt attributes" in " ".join(res.output.split())
    fitted = pd.read_parquet(tmp_path / "t2" / "attributes.parquet")
    assert fitted["Text.Prompt"].tolist() == same["Text.Prompt"].tolist()


def test_cli_select_attributes_prints_table_and_choice(tmp_path, layout):
    res = runner.invoke(app, ["select-attributes", str(layout), "--k", "2", "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert "selected (k=2" in res.output and "d_eq" in res.output and "S_overall" in res.output
    scores = pd.read_csv(tmp_path / "s.csv", index_col=0)
    assert scores.loc["Size.EquivalentDiameter", "selected"] == 1  # the classes differ by size
    res = runner.invoke(app, ["select-attributes", str(layout), "--k", "20", "--attributes", "size,shape"])
    assert res.exit_code == 0 and "note: --k 20 asks for more than the 2 candidate attributes" in res.output
    res = runner.invoke(app, ["select-attributes", str(layout), "--attributes", "size,nosuch"])
    assert res.exit_code == 2 and f"error: {layout}: unknown attribute 'nosuch'" in " ".join(res.output.split())
    assert f"{layout}: {layout}" not in res.output
    # selecting nothing is refused before any measuring, by the option itself
    res = runner.invoke(app, ["select-attributes", str(layout), "--k", "0"])
    assert res.exit_code == 2 and "--k" in res.output and "greater than or equal to 1" in " ".join(res.output.split())


def test_cli_select_attributes_on_the_table_attributes_wrote(tmp_path, layout):
    """The table karyo attributes wrote (Parquet or CSV) selects as its dataset does; a class with one valid
    nucleus is noted, and refused when it leaves fewer than two classes to compare; a table without classes says
    what it lacks."""
    runner.invoke(app, ["attributes", str(layout), "--out", str(tmp_path / "ds"), "--no-geojson"])
    from_dataset = runner.invoke(app, ["select-attributes", str(layout), "--k", "2", "--out", str(tmp_path / "a.csv")])
    for table in ("attributes.parquet", "attributes.csv"):
        res = runner.invoke(app, ["select-attributes", str(tmp_path / "ds" / table), "--k", "2", "--out",
                                  str(tmp_path / "b.csv")])
        assert res.exit_code == 0, res.output
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv", index_col=0),  # the CSV keeps 6 digits
                                      pd.read_csv(tmp_path / "a.csv", index_col=0), rtol=1e-4)
    assert from_dataset.output.splitlines()[-1] == res.output.splitlines()[-1]  # the same choice
    df = pd.read_parquet(tmp_path / "ds" / "attributes.parquet")
    rare = df["Class.Name"].iloc[0]
    lone = df[(df["Class.Name"] != rare) | (df.index == df.index[df["Flag.Valid"] & (df["Class.Name"] == rare)][0])]
    lone.to_parquet(tmp_path / "lone.parquet")
    res = runner.invoke(app, ["select-attributes", str(tmp_path / "lone.parquet"), "--k", "2"])
    assert res.exit_code == 2 and "need at least two classes with 2 or more valid nuclei" in res.output
    third = df.copy()
    third.loc[third.index[third["Flag.Valid"]][0], "Class.Name"] = "third"
    third.to_parquet(tmp_path / "third.parquet")
    res = runner.invoke(app, ["select-attributes", str(tmp_path / "third.parquet"), "--k", "2"])
    assert res.exit_code == 0 and "note: class(es) third (1) have fewer than 2 valid nuclei" in res.output
    df.drop(columns=["Class.Name"]).to_parquet(tmp_path / "plain.parquet")
    res = runner.invoke(app, ["select-attributes", str(tmp_path / "plain.parquet")])
    assert res.exit_code == 2 and "has no Class.Name column" in " ".join(res.output.split())


def test_cli_select_attributes_on_a_table_keeps_to_the_split_asked_for(tmp_path, layout):
    """--split on a dataset's table picks its rows as --split on the dataset picks its images: selecting on
    train never sees the test nuclei; an unknown split, a table without splits and an --out folder are refused."""
    runner.invoke(app, ["attributes", str(layout), "--out", str(tmp_path / "ds"), "--no-geojson"])
    table = tmp_path / "ds" / "attributes.parquet"
    train = runner.invoke(app, ["select-attributes", str(table), "--split", "train", "--k", "2"])
    whole = runner.invoke(app, ["select-attributes", str(table), "--k", "2"])
    dataset = runner.invoke(app, ["select-attributes", str(layout), "--split", "train", "--k", "2"])
    assert train.exit_code == 0, train.output
    df = pd.read_parquet(table)
    n_train = int((df["Flag.Valid"] & (df["Identifier.Split"] == "train")).sum())
    assert n_train < int(df["Flag.Valid"].sum())
    assert f": {n_train} valid classified nuclei" in train.output and f": {n_train} valid" not in whole.output
    assert train.output.splitlines()[-1] == dataset.output.splitlines()[-1]
    res = runner.invoke(app, ["select-attributes", str(table), "--split", "bogus"])
    assert res.exit_code == 2 and "no row of split 'bogus'; the table's splits: test, train" in res.output
    df.drop(columns=["Identifier.Split"]).to_parquet(tmp_path / "one.parquet")
    res = runner.invoke(app, ["select-attributes", str(tmp_path / "one.parquet"), "--split", "train"])
    assert res.exit_code == 2 and "no Identifier.Split column" in " ".join(res.output.split())
    for folder in (tmp_path, tmp_path / "new_folder"):
        res = runner.invoke(app, ["select-attributes", str(table), "--out", str(folder)])
        assert res.exit_code == 2 and "--out takes the CSV file" in " ".join(res.output.split())
    assert not (tmp_path / "new_folder").exists()


def test_cli_reports_bad_input_without_traceback(tmp_path, samples):
    write_image(tmp_path / "a.png", samples[0].image)
    res = runner.invoke(app, ["attributes", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--instances" in res.output
    write_instances(tmp_path / "m.png", np.zeros((10, 10), np.int32))
    res = runner.invoke(app, ["attributes", str(tmp_path / "a.png"), "--instances", str(tmp_path / "m.png"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "differs from image shape" in res.output
    res = runner.invoke(app, ["attributes", str(tmp_path / "a.png"), "--instances", str(tmp_path / "m.png"),
                              "--split", "train", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--split picks a dataset folder's images; this is a single image" in res.output


def test_marker_images_are_measured_on_their_nuclear_channel_with_each_marker(tmp_path, samples):
    """Three named markers are not stain-separated as if they were R, G and B: the shape and B.1 attributes come
    from the DAPI channel, and each channel adds its mean and spread over the nucleus (raw values)."""
    import tifffile

    from karyo.attributes import measure_arrays
    from karyo.errors import InputError

    sample = samples[0]
    labels = sample.instances
    rng = np.random.default_rng(3)
    dapi = np.where(labels > 0, 3000, 200).astype(np.uint16) + rng.integers(0, 50, labels.shape).astype(np.uint16)
    big = np.isin(labels, [k for k, c in sample.classes.items() if c == 2])
    cd45 = np.where(big, 5000, 100).astype(np.uint16)
    panck = np.full(labels.shape, 700, np.uint16)
    write_instances(tmp_path / "m.png", labels)
    tifffile.imwrite(tmp_path / "panel.ome.tif", np.stack([cd45, dapi, panck]), ome=True,
                     metadata={"axes": "CYX", "Channel": {"Name": ["CD45", "DAPI", "PanCK"]}})
    res = runner.invoke(app, ["attributes", str(tmp_path / "panel.ome.tif"), "--instances", str(tmp_path / "m.png"),
                              "--out", str(tmp_path / "o"), "--no-geojson"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(tmp_path / "o" / "panel_attributes.parquet").set_index("Identifier.Label")
    for k, c in sample.classes.items():
        mask = labels == k
        assert table.loc[k, "Marker.CD45.Mean"] == pytest.approx(cd45[mask].mean())
        assert table.loc[k, "Marker.DAPI.Mean"] == pytest.approx(dapi[mask].mean())
        assert table.loc[k, "Marker.DAPI.Std"] == pytest.approx(dapi[mask].std())
        assert table.loc[k, "Marker.PanCK.Mean"] == 700 and table.loc[k, "Marker.PanCK.Std"] == 0
        assert (table.loc[k, "Marker.CD45.Mean"] > 1000) == (c == 2)
    # the shape attributes are the masks' own; the intensity ones come from DAPI, not from CD45 (channel 0)
    gray = measure_arrays(dapi[..., None], labels)
    np.testing.assert_allclose(table["Size.Area"], gray["Size.Area"])
    np.testing.assert_allclose(table["Color.HematoxylinRaw"], gray["Color.HematoxylinRaw"])
    # a named choice, an unknown one, and unnamed channels (channel 0, said)
    chosen = measure_arrays(np.stack([cd45, dapi, panck], -1), labels, channel_names=["CD45", "DAPI", "PanCK"],
                            nuclear_channel="cd45")
    assert not np.allclose(chosen["Color.HematoxylinRaw"], gray["Color.HematoxylinRaw"])
    with pytest.raises(InputError, match=r"no channel 'Ki67'.*CD45, DAPI, PanCK"):
        measure_arrays(np.stack([cd45, dapi, panck], -1), labels, channel_names=["CD45", "DAPI", "PanCK"],
                       nuclear_channel="Ki67")
    eight = np.repeat(dapi[..., None], 8, axis=2)
    with pytest.warns(UserWarning, match="channel 0 is measured as the nucleus' stain"):
        cols = measure_arrays(eight, labels, source="eight.tif")
    assert "Marker.Channel7.Mean" in cols
    np.testing.assert_allclose(cols["Color.HematoxylinRaw"], gray["Color.HematoxylinRaw"])


def test_an_unnamed_gray_stack_is_measured_as_markers_not_as_h_and_e(tmp_path, samples):
    """Four gray pages (MINISBLACK: the file says they are not RGB) without names: markers, channel 0 nuclear."""
    import tifffile

    labels = samples[0].instances
    dapi = np.where(labels > 0, 3000, 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([dapi, dapi // 3, dapi // 5, dapi // 7]),
                     photometric="minisblack")
    write_instances(tmp_path / "m.png", labels)
    res = runner.invoke(app, ["attributes", str(tmp_path / "stack.tif"), "--instances", str(tmp_path / "m.png"),
                              "--out", str(tmp_path / "o"), "--no-geojson"])
    assert res.exit_code == 0, res.output
    assert "channel 0 (Channel0) is measured as the nucleus' stain" in " ".join(res.output.split())
    table = pd.read_parquet(tmp_path / "o" / "stack_attributes.parquet")
    assert (table["Marker.Channel3.Mean"] == 3000 // 7).all() and table["Nucleus.Red.Mean"].isna().all()
    # the same stack inside a dataset folder
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "stack.tif").rename(tmp_path / "ds" / "images" / "stack.tif")
    write_instances(tmp_path / "ds" / "instances" / "stack.png", labels)
    res = runner.invoke(app, ["attributes", str(tmp_path / "ds"), "--out", str(tmp_path / "d"), "--no-geojson"])
    assert res.exit_code == 0, res.output
    table = pd.read_parquet(tmp_path / "d" / "attributes.parquet")
    assert (table["Marker.Channel3.Mean"] == 3000 // 7).all() and table["Nucleus.Red.Mean"].isna().all()


def test_micron_columns_follow_the_stated_resolution(tmp_path, samples):
    """Size.* and the neighbour distance get µm twins when the resolution is known: from split.csv per image
    (NaN where unknown), or one --mpp for all; without any, no µm columns."""
    import dataclasses

    import tifffile

    from karyo.attributes.pipeline import attributes_for_dataset

    root = tmp_path / "ds"
    for i, s in enumerate(samples[:3]):
        write_layout_sample(root, dataclasses.replace(s, mpp=0.5 if i < 2 else None), split="train")
    table = attributes_for_dataset(root, tmp_path / "o1", geojson=False).table
    cols = table.columns.tolist()
    assert cols[cols.index("Size.Area") + 1] == "Size.Area_um2"
    known = table["Identifier.Image"].isin([samples[0].name, samples[1].name]).to_numpy()
    np.testing.assert_allclose(table.loc[known, "Size.Area_um2"], table.loc[known, "Size.Area"] * 0.25)
    np.testing.assert_allclose(table.loc[known, "Size.EquivalentDiameter_um"],
                               table.loc[known, "Size.EquivalentDiameter"] * 0.5)
    np.testing.assert_allclose(table.loc[known, "Density.NearestNeighborDistance_um"],
                               table.loc[known, "Density.NearestNeighborDistance"] * 0.5)
    assert table.loc[~known, "Size.Area_um2"].isna().all() and (~known).sum() == 6
    given = attributes_for_dataset(root, tmp_path / "o2", geojson=False, mpp=0.25).table
    np.testing.assert_allclose(given["Size.ConvexHullArea_um2"], given["Size.ConvexHullArea"] * 0.0625)
    # one image through the CLI: --mpp adds the columns, a PNG stating no resolution gets none
    write_image(tmp_path / "a.png", samples[0].image)
    write_instances(tmp_path / "m.png", samples[0].instances)
    base = ["attributes", str(tmp_path / "a.png"), "--instances", str(tmp_path / "m.png"), "--no-geojson"]
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "p1"), "--mpp", "0.5"]).exit_code == 0
    one = pd.read_parquet(tmp_path / "p1" / "a_attributes.parquet")
    np.testing.assert_allclose(one["Size.Perimeter_um"], one["Size.Perimeter"] * 0.5)
    assert runner.invoke(app, [*base, "--out", str(tmp_path / "p2")]).exit_code == 0
    assert not any(c.endswith(("_um", "_um2")) for c in pd.read_parquet(tmp_path / "p2" / "a_attributes.parquet"))
    tifffile.imwrite(tmp_path / "stated.tif", samples[0].image, photometric="rgb", resolution=(1e4 / 0.25,
                     1e4 / 0.25), resolutionunit="CENTIMETER")
    res = runner.invoke(app, ["attributes", str(tmp_path / "stated.tif"), "--instances", str(tmp_path / "m.png"),
                              "--no-geojson", "--out", str(tmp_path / "p4"), "--mpp", "0.5"])
    assert res.exit_code == 0 and "mpp 0.5 was used; the file states 0.25 µm/px" in " ".join(res.output.split())
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "p3"), "--mpp", "-1"])
    assert res.exit_code == 2 and "outside the plausible range" in res.output


def test_nuclear_channel_applies_to_the_marker_images_of_a_mixed_dataset(samples):
    import dataclasses

    he = samples[0]
    dapi = (he.instances > 0).astype(np.uint16) * 3000 + 100
    marker = dataclasses.replace(he, image=np.stack([dapi, dapi // 2], axis=-1), channel_names=("CD45", "DAPI"),
                                 name="mk")
    table = measure_samples([he, marker], nuclear_channel="DAPI")
    rows_he = table[table["Identifier.Image"] == he.name]
    rows_mk = table[table["Identifier.Image"] == "mk"]
    assert np.isfinite(rows_he["Nucleus.Red.Mean"]).all() and rows_he["Marker.DAPI.Mean"].isna().all()
    assert rows_mk["Nucleus.Red.Mean"].isna().all() and (rows_mk["Marker.CD45.Mean"] == 3100).all()
    assert (rows_mk["Identifier.NuclearChannel"] == "DAPI").all() and (rows_he["Identifier.NuclearChannel"] == "").all()
