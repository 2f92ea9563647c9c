import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from karyo.errors import InputError
from karyo.infer.prepare import check_mpp, check_points, resample_to_model, resize_instances


def test_check_points_refuses_what_would_segment_a_phantom_or_cut_a_nucleus():
    shape = (100, 200, 3)
    np.testing.assert_array_equal(check_points([(0, 0), (199, 99.2)], shape), [[0, 0], [199, 99.2]])
    assert check_points(None, shape) is None and check_points([], shape).shape == (0, 2)
    with pytest.raises(InputError, match=r"p\.csv: point 1 \(-50, 5\) lies outside the 200×100 image"):
        check_points([(1, 1), (-50, 5)], shape, "p.csv")
    with pytest.raises(InputError, match="outside"):
        check_points([(10, 100)], shape)  # y = 100 is one row below the last
    with pytest.raises(InputError, match="non-finite"):
        check_points([(float("nan"), 1)], shape)
    with pytest.raises(InputError, match=r"\(3, 4\) is given 2 times"):
        check_points([(3, 4), (5, 6), (3, 4)], shape)


def test_check_mpp_and_resampling_refuse_implausible_resolutions():
    assert check_mpp(None) is None and check_mpp(np.float32(0.5)) == pytest.approx(0.5)
    for bad in (0, -0.5, float("nan"), 100.0, "a"):
        with pytest.raises(InputError, match=r"img\.png"):
            check_mpp(bad, "img.png")
    x = torch.zeros(1, 3, 40, 40)
    assert resample_to_model(x, None, 0.25)[1] == 1.0
    assert resample_to_model(x, 0.5, 0.25)[0].shape[-2:] == (80, 80)
    with pytest.raises(InputError, match="karyo wsi"):  # 4000² px at 20 µm/px: 320,000² px at 0.25
        resample_to_model(torch.zeros(1, 3, 4000, 4000), 20.0, 0.25)


def test_shrunk_instances_keep_one_piece_each():
    """A 1 px neck on a row that nearest-neighbour halving skips would leave a nucleus in two pieces."""
    labels = np.zeros((16, 16), np.int32)
    labels[0:13, 0:6] = 1
    labels[0:13, 10:14] = 1
    labels[7, 6:10] = 1  # the neck, on an odd row
    shrunk, classes = resize_instances(labels, (8, 8), {1: 2})
    assert ndi.label(shrunk == 1)[1] == 1
    assert (shrunk == 1).sum() == 7 * 3  # the wider half (6 columns → 3) stays
    assert classes == {1: 2}


def test_narrow_uint16_is_noted_with_the_factor_that_fixes_it():
    """12-bit camera data in uint16 reads 16× too dark; the note names the file and how to read it on its range."""
    import warnings

    from karyo.infer.prepare import model_input

    rng = np.random.default_rng(0)
    twelve_bit = rng.integers(0, 4096, (32, 32, 3)).astype(np.uint16)
    with pytest.warns(UserWarning, match=r"a\.tif: uint16 whose values only reach 409\d .*12-bit data, pass --bits "
                                         r"12 .*karyo\.on_bit_range\(image, 12\)"):
        x = model_input(twelve_bit, 3, (0.0,) * 3, (1.0,) * 3, "a.tif")
    import karyo

    bright = karyo.on_bit_range(twelve_bit, 12)  # what the note says to do, in Python
    assert bright.dtype == np.float32 and float(bright.max()) == pytest.approx(twelve_bit.max() / 4095)
    assert float(x.max()) < 4096 / 65535 + 1e-6  # read as is: the note changes nothing by itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_input(twelve_bit * np.uint16(16), 3, (0.0,) * 3, (1.0,) * 3, "b.tif")  # the full range: no note
        model_input(np.zeros((8, 8, 3), np.uint16), 3, (0.0,) * 3, (1.0,) * 3, "blank.tif")  # nothing to scale


def test_named_markers_given_to_an_h_and_e_model_are_noted():
    """Three channels named DAPI, CD45, CK would be read as R, G, B by an H&E model: said, naming the file."""
    import warnings

    from karyo.infer.prepare import model_input

    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.warns(UserWarning, match=r"mc\.tif: its channels are named DAPI, CD45, CK, but this model reads"):
        model_input(image, 3, (0.0,) * 3, (1.0,) * 3, "mc.tif", channel_names=["DAPI", "CD45", "CK"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_input(image, 3, (0.0,) * 3, (1.0,) * 3, "rgb.tif", channel_names=["Red", "Green", "Blue"])
        model_input(image, 3, (0.0,) * 3, (1.0,) * 3, "plain.png")


def test_fluorescence_saved_as_rgb_is_noted_and_a_wrong_channel_count_names_the_fix():
    from karyo.infer.prepare import model_input

    grey = np.full((16, 16), 10, np.uint8)
    grey[4:9, 4:9] = 220
    rgb = np.repeat(grey[..., None], 3, axis=2)
    with pytest.warns(UserWarning, match=r"f\.png: R, G and B are equal on a dark background.*--model classical"):
        model_input(rgb, 3, (0.0,) * 3, (1.0,) * 3, "f.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_input(255 - rgb, 3, (0.0,) * 3, (1.0,) * 3, "brightfield.png")  # grey brightfield: read as it is
    with pytest.raises(InputError, match=r"m\.tif: this model takes 3-channel images, got 2 channels; give it one "
                                         r"channel to read as gray \(--channels 0; in Python image\[\.\.\., :1\]\).*"
                                         r"--model classical"):
        model_input(np.zeros((16, 16, 2), np.uint16), 3, (0.0,) * 3, (1.0,) * 3, "m.tif")
    with pytest.raises(InputError, match=r"got 5 channels; a fluorescence or multiplex image wants the classical "
                                         r"model \(--model classical.*anyway: --channels 0,1,2 \(or names; in Python "
                                         r"image\[\.\.\., \[0,1,2\]\]\)"):
        model_input(np.zeros((16, 16, 5), np.uint16), 3, (0.0,) * 3, (1.0,) * 3, "m5.tif")


def test_inputs_smaller_than_the_model_tile_are_padded_with_reflected_tissue():
    """A 96-px crop padded with a flat colour to the 256-px model tile lost its nuclei (0 of 7 on the sample);
    reflected, it finds about what the whole tile finds there."""
    import karyo
    from karyo.data.io import read_image
    from karyo.infer.prepare import pad_input
    from karyo.samples import sample_path

    x = torch.arange(6, dtype=torch.float32).view(1, 1, 2, 3)
    padded = pad_input(x, multiple=8)
    assert padded.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(padded[0, 0, 0].numpy(), [0, 1, 2, 1, 0, 1, 2, 1])  # reflected again and again
    np.testing.assert_array_equal(padded[0, 0, :, 0].numpy(), [0, 3, 0, 3, 0, 3, 0, 3])
    image = read_image(sample_path())
    model = karyo.load("default")
    whole = model.segment(image).table()
    y0 = x0 = 80
    inside = whole[whole.centroid_x.between(x0 + 4, x0 + 91) & whole.centroid_y.between(y0 + 4, y0 + 91)]
    crop = model.segment(image[y0:y0 + 96, x0:x0 + 96])
    assert len(inside) == 7 and 6 <= crop.n_nuclei <= 10


def test_double_clicks_and_a_negative_on_a_click_are_refused_by_every_model():
    """1 µm at the image's resolution (4 px at 0.25 µm/px, 2 px at 0.5): one nucleus clicked twice. Classical used
    to split the nucleus in two, CellViT to return one row."""
    import karyo
    from karyo.infer.prepare import check_prompts, double_click_px

    assert double_click_px(None, 0.25) == 4.0 and double_click_px(0.5, 0.25) == 2.0
    shape = (64, 64, 3)
    points, _ = check_prompts([(10, 10), (20, 10)], None, shape, "c.csv", 4.0)
    assert len(points) == 2
    with pytest.raises(InputError, match=r"c\.csv: points 0 \(10, 10\) and 1 \(13, 10\) are 3 px apart"):
        check_prompts([(10, 10), (13, 10)], None, shape, "c.csv", 4.0)
    with pytest.raises(InputError, match=r"negative point 0 \(11, 10\) lies 1 px from point 0"):
        check_prompts([(10, 10)], [(11, 10)], shape, "c.csv", 4.0)
    assert check_prompts([], [(11, 10)], shape)[0] is None  # no clicks, only negatives: as the CLI reads them
    with pytest.warns(UserWarning, match="points is empty"):
        assert len(check_prompts([], None, shape)[0]) == 0  # no clicks at all: nothing to segment
    image = np.full((64, 64, 3), 230, np.uint8)
    for name in ("classical", "cellvit_cpu"):
        with pytest.raises(InputError, match="one nucleus clicked twice"):
            karyo.load(name).segment(image, points=[(30, 30), (31, 30)])
        with pytest.raises(InputError, match="are 1 px apart"):
            karyo.load(name).segment(image, points=[(30, 30), (31, 30)], mpp=0.1)  # 1 µm is 10 px here


def test_an_empty_list_of_points_is_said_to_ask_for_nothing():
    from karyo.infer.prepare import check_prompts

    with pytest.warns(UserWarning, match=r"tile: points is empty: no nucleus is asked for.*points=None"):
        points, negative = check_prompts([], None, (10, 10), "tile")
    assert points.shape == (0, 2) and negative is None
    from pathlib import Path

    with pytest.warns(UserWarning, match=r"p\.csv: points is empty"):  # a file path as the source, too
        check_prompts([], None, (10, 10), Path("p.csv"))


def test_a_boolean_image_is_said_to_be_read_as_black_and_white():
    import karyo

    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    with pytest.warns(UserWarning, match=r"a boolean array \(a mask\?\) is read as a black-and-white picture"):
        karyo.load("default").segment(mask)
