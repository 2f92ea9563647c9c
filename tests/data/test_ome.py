"""Multi-channel (OME-)TIFF and single-channel fluorescence images: channel names and pixel size from the file,
channel order, and the CLI's channel selection feeding an adapter model by name."""

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from karyo.cli import app
from karyo.data.io import read_image, read_image_meta, write_image
from karyo.infer.prepare import select_channels
from karyo.models.adapter import AdapterConfig
from karyo.models.cellvit import CellViTConfig, CellViTModel


def planes(c: int, h: int = 12, w: int = 10, dtype=np.uint16) -> np.ndarray:
    """C×Y×X stack whose channel k holds the value 1000·(k+1) plus the column index (order is checkable)."""
    return np.stack([np.full((h, w), 1000 * (k + 1), dtype) + np.arange(w, dtype=dtype) for k in range(c)])


def test_ome_tiff_written_by_tifffile_gives_channel_names_mpp_and_order(tmp_path):
    path = tmp_path / "panel.ome.tif"
    names = ["DAPI", "CD45", "PanCK", "CD8"]
    tifffile.imwrite(path, planes(4), ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": 0.325,
                               "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.325, "PhysicalSizeYUnit": "µm"})
    img, meta = read_image_meta(path)
    assert img.shape == (12, 10, 4) and img.dtype == np.uint16
    assert meta["channel_names"] == tuple(names) and meta["mpp"] == pytest.approx(0.325)
    assert img[0, 3].tolist() == [1003, 2003, 3003, 4003]
    sel, sel_names = select_channels(img, meta["channel_names"], "cd8,DAPI")
    assert sel_names == ("CD8", "DAPI") and sel[0, 0].tolist() == [4000, 1000]


def test_ome_tiff_in_nanometres_and_without_names(tmp_path):
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(path, planes(2), ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 500.0,
                                                          "PhysicalSizeXUnit": "nm"})
    img, meta = read_image_meta(path)
    assert img.shape == (12, 10, 2) and meta["channel_names"] is None and meta["mpp"] == pytest.approx(0.5)


def test_plain_multipage_tiff_is_a_channel_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, planes(5))
    img, meta = read_image_meta(path)
    assert img.shape == (12, 10, 5) and meta["channel_names"] is None
    assert img[0, 0].tolist() == [1000, 2000, 3000, 4000, 5000]


def test_karyo_writer_round_trips_names(tmp_path):
    img = np.moveaxis(planes(3), 0, 2)
    write_image(tmp_path / "w.ome.tif", img, channel_names=("DAPI", "CD3", "CD20"), mpp=0.5)
    back, meta = read_image_meta(tmp_path / "w.ome.tif")
    np.testing.assert_array_equal(back, img)
    assert meta["channel_names"] == ("DAPI", "CD3", "CD20") and meta["mpp"] == pytest.approx(0.5)


def test_single_channel_fluorescence_png_and_tiff(tmp_path):
    gray = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "dapi.png")
    png = read_image(tmp_path / "dapi.png")
    assert png.shape == (12, 10, 1) and png.dtype == np.uint8 and (png[..., 0] == gray).all()
    g16 = gray.astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "dapi.tif", g16)
    tif = read_image(tmp_path / "dapi.tif")
    assert tif.shape == (12, 10, 1) and tif.dtype == np.uint16 and (tif[..., 0] == g16).all()


@pytest.mark.usefixtures("one_thread")
def test_segment_cli_selects_channels_by_name_for_an_adapter_model(tmp_path):
    """``karyo segment X.ome.tif --channels CD45,DAPI``: selected by name, then mapped by name onto the model's."""
    model_dir = tmp_path / "model"
    cfg = CellViTConfig(stem_dims=(8, 8), decoder_dims=(16, 16, 8, 8, 8), binary={"threshold": 0.3},
                        adapter=AdapterConfig.for_channels(["DAPI"], hidden=4))
    CellViTModel(cfg).save(model_dir)
    path = tmp_path / "panel.ome.tif"
    tifffile.imwrite(path, planes(3, 64, 64), ome=True, metadata={"axes": "CYX",
                                                                  "Channel": {"Name": ["CD45", "DAPI", "CD8"]}})
    res = CliRunner().invoke(app, ["segment", str(path), "--model", str(model_dir), "--out", str(tmp_path / "out"),
                                   "--channels", "DAPI"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "instances" / "panel.png").is_file()
    assert (tmp_path / "out" / "overlays" / "panel.png").is_file()
    res = CliRunner().invoke(app, ["segment", str(path), "--model", str(model_dir), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output  # all three channels: DAPI found by name, the others ignored
    text = " ".join(res.output.split())  # the ChannelWarning, as a note naming the file
    assert f"note: {path}: channel(s) ['CD45', 'CD8'] not used" in text, text
    res = CliRunner().invoke(app, ["segment", str(path), "--model", str(model_dir), "--out", str(tmp_path / "o2"),
                                   "--channels", "Ki67"])
    assert res.exit_code == 2 and "'Ki67' not found" in res.output


def test_imagej_hyperstack_labels_are_channel_names(tmp_path):
    """``tifffile.imwrite(..., imagej=True, metadata={'axes': 'CYX', 'Labels': [...]})``: one label per channel."""
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, planes(2), imagej=True, metadata={"axes": "CYX", "Labels": ["DAPI", "CD45"]})
    img, meta = read_image_meta(path)
    assert img.shape == (12, 10, 2) and meta["channel_names"] == ("DAPI", "CD45")
    sel, sel_names = select_channels(img, meta["channel_names"], "cd45")
    assert sel_names == ("CD45",) and sel[0, 0].tolist() == [2000]
    # a singleton Z is dropped: its C labels still name the channels
    tifffile.imwrite(tmp_path / "z1.tif", planes(2)[None], imagej=True,
                     metadata={"axes": "ZCYX", "Labels": ["DAPI", "CD45"]})
    assert read_image_meta(tmp_path / "z1.tif")[1]["channel_names"] == ("DAPI", "CD45")
    # as many labels as channels only: otherwise (or blank, or an RGB image's) they name no channel
    tifffile.imwrite(tmp_path / "blank.tif", planes(2), imagej=True, metadata={"axes": "CYX", "Labels": ["DAPI", ""]})
    assert read_image_meta(tmp_path / "blank.tif")[1]["channel_names"] is None
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((12, 10, 3), np.uint8), imagej=True, metadata={"Labels": ["x"]})
    assert read_image_meta(tmp_path / "rgb.tif")[1]["channel_names"] is None


def test_imagej_labels_of_several_planes_name_channels_only_when_unambiguous():
    from karyo.data.io import _imagej_channel_names

    assert _imagej_channel_names(["DAPI", "CD45"] * 3, "ZCYX", 2) == ("DAPI", "CD45")
    assert _imagej_channel_names(["a", "b", "c", "d"], "ZCYX", 2) is None
    assert _imagej_channel_names(["a", "b", "c"], "CYX", 2) is None
    assert _imagej_channel_names("DAPI", "YX", 1) == ("DAPI",)
    assert _imagej_channel_names(["info\nmore"], "YX", 1) is None


def test_segment_cli_selects_an_imagej_channel_by_name(tmp_path):
    path = tmp_path / "ij.tif"
    yy, xx = np.mgrid[:48, :48]
    dapi = (((yy - 24) ** 2 + (xx - 24) ** 2) < 64).astype(np.uint16) * 4000
    tifffile.imwrite(path, np.stack([np.zeros_like(dapi), dapi]), imagej=True,
                     metadata={"axes": "CYX", "Labels": ["CD45", "DAPI"]})
    res = CliRunner().invoke(app, ["segment", str(path), "--model", "classical", "--out", str(tmp_path / "out"),
                                   "--channels", "DAPI"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "instances" / "ij.png").is_file()


def test_repeated_channel_names_are_kept_and_said_once(tmp_path):
    path = tmp_path / "dup.ome.tif"
    tifffile.imwrite(path, planes(3), ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45", "DAPI"]}})
    with pytest.warns(UserWarning, match="repeated") as caught:
        img, meta = read_image_meta(path)
    notes = [str(w.message) for w in caught if "repeated" in str(w.message)]
    assert len(notes) == 1 and str(path) in notes[0] and "DAPI" in notes[0] and "CD45" not in notes[0], notes
    assert meta["channel_names"] == ("DAPI", "CD45", "DAPI")
    assert select_channels(img, meta["channel_names"], "DAPI")[0][0, 0].tolist() == [1000]


def test_distinct_channel_names_read_without_a_warning(tmp_path, recwarn):
    path = tmp_path / "ok.ome.tif"
    tifffile.imwrite(path, planes(2), ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD45"]}})
    assert read_image_meta(path)[1]["channel_names"] == ("DAPI", "CD45")
    assert not [w for w in recwarn if "channel" in str(w.message)]


def test_yxc_ome_tiff_names_lost_by_the_writer_are_said(tmp_path):
    """tifffile stores a Y×X×C array as one OME channel of C samples, named by the first name only."""
    path = tmp_path / "yxc.ome.tif"
    yxc = np.moveaxis(planes(2), 0, 2)
    tifffile.imwrite(path, yxc, photometric="minisblack", planarconfig="contig",
                     metadata={"axes": "YXC", "Channel": {"Name": ["DAPI", "CD45"]}})
    with pytest.warns(UserWarning, match="names 1 channel for 2 planes: channel names ignored"):
        img, meta = read_image_meta(path)
    assert img.shape == (12, 10, 2) and meta["channel_names"] is None
    np.testing.assert_array_equal(img, yxc)
    # three 16-bit channels, as tifffile writes them by default (tagged RGB)
    tifffile.imwrite(tmp_path / "yxc3.ome.tif", np.moveaxis(planes(3), 0, 2),
                     metadata={"axes": "YXC", "Channel": {"Name": ["DAPI", "CD45", "CD8"]}})
    with pytest.warns(UserWarning, match="names 1 channel for 3 planes"):
        assert read_image_meta(tmp_path / "yxc3.ome.tif")[1]["channel_names"] is None
