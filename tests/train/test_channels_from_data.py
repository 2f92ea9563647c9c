"""``karyo train`` and the channels of the training data: a config's adapter section that names no channels takes
them from the images (which must agree), ``--channels`` that no training image has are refused, and
``--channels 0`` is refused before any data are read."""

import json

import numpy as np
import pytest
import tifffile

from karyo.data.layout import write_layout_sample
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.train.api import train
from karyo.train.channels import channels_from_data, check_channels_in_data, describe_channels, parse_channels

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny stain-agnostic run (the shape of configs/stain_agnostic_dsb.yaml: an adapter section without channels).
RUN_YAML = ("model:\n  preset: cpu\n  stem_dims: [8, 8]\n  decoder_dims: [32, 16, 16, 8, 8]\n"
            "  adapter: {hidden: 4, missing: embedding}\n"
            "train: {epochs: 1, batch_size: 2, max_steps_per_epoch: 1, warmup_epochs: 0}\n"
            "augment: {crop_size: 64, p_elastic: 0.0, p_grid_shuffle: 0.0}\nval_fraction: 0.34\n")


def _ome_folder(root, channels: list, size: int = 64):
    """A layout folder of OME-TIFFs written with tifffile, one per entry of ``channels``: a list of channel names
    (planar C×Y×X with those names) or a channel count (unnamed). Nuclei are bright discs in channel 0."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for k, spec in enumerate(channels):
        n = spec if isinstance(spec, int) else len(spec)
        inst = np.zeros((size, size), np.int32)
        for i, (cy, cx) in enumerate([(16, 16), (16, 44), (46, 20), (44, 46)], 1):
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 64) & (inst == 0)] = i
        planes = rng.integers(0, 40, (n, size, size)).astype(np.uint16)
        planes[0] = np.where(inst > 0, 3000, 200)
        (root / "images").mkdir(parents=True, exist_ok=True)
        meta = {"axes": "CYX"}
        if not isinstance(spec, int):
            meta["Channel"] = {"Name": list(spec)}
        tifffile.imwrite(root / "images" / f"tile{k}.ome.tif", planes, ome=True, metadata=meta)
        write_layout_sample(root, Sample(image=planes.transpose(1, 2, 0), instances=inst, name=f"tile{k}"),
                            split="train", image=False)
    return root


def _sample(n: int, names=None, name: str = "s") -> Sample:
    return Sample(image=np.zeros((8, 8, n), np.uint8), instances=np.zeros((8, 8), np.int32),
                  channel_names=tuple(names) if names else None, name=name)


def _config(tmp_path) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return str(path)


# ------------------------------------------------------------------------------------------------- helpers


def test_parse_channels_refuses_zero_and_repeated_names():
    for bad in ("0", 0, " 0 "):
        with pytest.raises(InputError, match=r"--channels 0: need at least one channel"):
            parse_channels(bad)
    with pytest.raises(InputError, match=r"--channels DAPI,dapi: DAPI, dapi given more than once"):
        parse_channels("DAPI,dapi")
    assert parse_channels(("DAPI", "CD45")) == ("DAPI", "CD45")  # parsing twice (api, then the task) is harmless


def test_channels_from_data_agreeing_disagreeing_and_rgb():
    named = [_sample(2, ("DAPI", "CD45")), _sample(2, ("cd45", "dapi "))]  # mapped by name: any order, any case
    assert channels_from_data(named) == ("DAPI", "CD45")
    assert channels_from_data([_sample(1), _sample(1)]) == 1  # unnamed: their count
    assert channels_from_data([_sample(3), _sample(3, ("R", "G", "B"))]) is None  # RGB: the adapter's default
    assert channels_from_data([]) is None
    assert channels_from_data([_sample(3, ("DAPI", "CD45", "CD8"))]) == ("DAPI", "CD45", "CD8")  # 3 markers ≠ RGB
    for mixed in ([*named, _sample(2, ("DAPI", "Ki67"))], [*named, _sample(2)], [_sample(1), _sample(3)],
                  [_sample(2, ("DAPI", "CD45")), _sample(3, ("DAPI", "CD45", "CD8"))]):
        with pytest.raises(InputError, match=r"the training images have different channels \(.*\): say which the "
                                             r"network takes with --channels"):
            channels_from_data(mixed)
    assert describe_channels([*named, _sample(2, ("DAPI", "Ki67")), _sample(1)]) == (
        "2 image(s) with DAPI, CD45; 1 with DAPI, Ki67; 1 with 1 unnamed channel(s)")


def test_check_channels_in_data_refuses_channels_no_image_has():
    data = [_sample(2, ("CD45", "DAPI")), _sample(2, ("DAPI", "Ki67"))]
    check_channels_in_data("DAPI,Ki67", data)  # Ki67 only some images have: the adapter fills it elsewhere
    check_channels_in_data("dapi", data)
    check_channels_in_data(None, data)
    with pytest.raises(InputError, match=r"^--channels DAPI,FOO,BAR: no training image has FOO, BAR \(they have: "
                                         r"1 image\(s\) with CD45, DAPI; 1 with DAPI, Ki67\)$"):
        check_channels_in_data("DAPI,FOO,BAR", data)
    check_channels_in_data("DAPI", [_sample(1)])  # one unnamed channel is taken by position as the one named
    with pytest.raises(InputError, match=r"no training image has CD45 \(they have: 1 image\(s\) with 1 unnamed"):
        check_channels_in_data("DAPI,CD45", [_sample(1)])  # its one channel is DAPI, by position
    check_channels_in_data("2", data)
    check_channels_in_data(3, [_sample(1), _sample(5)])  # several counts: pooled onto the one asked for
    with pytest.raises(InputError, match=r"^--channels 2: no training image has 2 channel\(s\) \(they have: 2 "
                                         r"image\(s\) with 1 unnamed channel\(s\)\)"):
        check_channels_in_data(2, [_sample(1), _sample(1)])


# ------------------------------------------------------------------------------------------------- train


def test_train_takes_the_channels_from_the_data(tmp_path):
    """The review's run: 2-channel OME-TIFFs (DAPI, CD45), the DSB config's adapter section without channels, no
    --channels: the adapter takes DAPI and CD45 by name (before: 3 unnamed channels, the data pooled onto them)."""
    data = _ome_folder(tmp_path / "data", [["DAPI", "CD45"]] * 4 + [["CD45", "DAPI"]] * 2)
    said: list[str] = []
    train("stain_agnostic", [f"{data}:train"], tmp_path / "run", config=_config(tmp_path), progress=False,
          on_split=said.append)
    assert "channels from the data: DAPI, CD45" in said
    assert any(m.startswith("channels: the network takes DAPI, CD45 by name: 6 of 6 image(s) matched by name")
               for m in said), said
    adapter = json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]["adapter"]
    assert adapter["channel_names"] == ["DAPI", "CD45"] and adapter["in_channels"] == 2
    assert adapter["hidden"] == 4 and len(adapter["pixel_mean"]) == 2


def test_stain_agnostic_without_an_adapter_section_takes_the_channels_from_the_data(tmp_path):
    """The stain-agnostic recipe exists for its adapter: a config naming no adapter (nor in_chans) builds one for
    the data's channels rather than refusing 2-channel images for a 3-channel network."""
    data = _ome_folder(tmp_path / "data", [["DAPI", "CD45"]] * 4)
    cfg = tmp_path / "plain.yaml"
    cfg.write_text(RUN_YAML.replace("  adapter: {hidden: 4, missing: embedding}\n", ""))
    said: list[str] = []
    train("stain_agnostic", [f"{data}:train"], tmp_path / "run", config=cfg, progress=False, on_split=said.append)
    assert "channels from the data: DAPI, CD45" in said
    adapter = json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]["adapter"]
    assert adapter["channel_names"] == ["DAPI", "CD45"]


def test_train_takes_an_unnamed_channel_count_from_the_data(tmp_path):
    data = _ome_folder(tmp_path / "data", [2] * 4)
    said: list[str] = []
    train("stain_agnostic", [f"{data}:train"], tmp_path / "run", config=_config(tmp_path), progress=False,
          on_split=said.append)
    assert "channels from the data: 2 unnamed channel(s)" in said
    adapter = json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]["adapter"]
    assert adapter["in_channels"] == 2 and adapter["channel_names"] == []


def test_train_refuses_images_with_different_channels_without_channels(tmp_path):
    data = _ome_folder(tmp_path / "data", [["DAPI", "CD45"]] * 3 + [["DAPI", "Ki67"]] * 3)
    with pytest.raises(InputError, match=r"the training images have different channels \(3 image\(s\) with DAPI, "
                                         r"CD45; 3 with DAPI, Ki67\): say which the network takes with --channels"):
        train("stain_agnostic", [f"{data}:train"], tmp_path / "run", config=_config(tmp_path), progress=False)
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_train_refuses_channels_no_training_image_has(tmp_path):
    data = _ome_folder(tmp_path / "data", [["DAPI", "CD45"]] * 6)
    with pytest.raises(InputError, match=r"^--channels DAPI,FOO: no training image has FOO \(they have: \d image\(s\) "
                                         r"with DAPI, CD45\)$"):
        train("stain_agnostic", [f"{data}:train"], tmp_path / "run", config=_config(tmp_path), progress=False,
              channels="DAPI,FOO")
    gray = _ome_folder(tmp_path / "gray", [1] * 6)
    with pytest.raises(InputError, match=r"^--channels 2: no training image has 2 channel\(s\)"):
        train("stain_agnostic", [f"{gray}:train"], tmp_path / "run", config=_config(tmp_path), progress=False,
              channels="2")


def test_channels_zero_is_refused_before_the_data_are_read(tmp_path):
    with pytest.raises(InputError, match=r"^--channels 0: need at least one channel"):
        train("stain_agnostic", [str(tmp_path / "no_such_data")], tmp_path / "run", config=_config(tmp_path),
              progress=False, channels="0")


def test_cli_says_where_the_channels_came_from(tmp_path):
    from typer.testing import CliRunner

    from karyo.cli import app

    data = _ome_folder(tmp_path / "data", [["DAPI", "CD45"]] * 6)
    res = CliRunner().invoke(app, ["train", "stain_agnostic", "--data", str(data), "--config", _config(tmp_path),
                                   "--out", str(tmp_path / "run"), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "channels from the data: DAPI, CD45" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["train", "stain_agnostic", "--data", str(data), "--config", _config(tmp_path),
                                   "--out", str(tmp_path / "run0"), "--channels", "0"])
    assert res.exit_code != 0 and "--channels 0: need at least one channel" in " ".join(res.output.split())
    assert "AdapterConfig" not in res.output


def test_rgb_training_keeps_the_adapters_three_channels(disc_layout, tmp_path):
    """H&E (RGB PNGs) with an adapter section that names no channels: unchanged, the adapter's 3 channels, nothing
    said about channels from the data."""
    said: list[str] = []
    train("stain_agnostic", [f"{disc_layout}:train"], tmp_path / "run", config=_config(tmp_path), progress=False,
          on_split=said.append)
    assert not any("channels from the data" in m for m in said)
    adapter = json.loads((tmp_path / "run" / "train_config.json").read_text())["model"]["adapter"]
    assert adapter["in_channels"] == 3 and adapter["channel_names"] == []


def test_no_adapter_hint_names_the_datas_channels():
    from karyo.train.channels import map_samples

    with pytest.raises(InputError, match=r"has 2 channels, the model takes 3: give it a channel adapter "
                                         r"\(--channels CD45,DAPI\)"):
        map_samples([_sample(2, ("CD45", "DAPI"))], None, 3)
    with pytest.raises(InputError, match=r"give it a channel adapter \(--channels 4\)"):
        map_samples([_sample(4)], None, 3)
