"""read_image / read_instances / write_image on every image kind karyo meets, built from real shared images."""

from __future__ import annotations

import warnings

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from karyo.data.io import image_stem, read_image, read_image_meta, read_instances, write_image, write_instances
from karyo.data.sample import Sample
from karyo.errors import InputError

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def he(shared_data):
    """A real H&E patch (CoNSeP) and its instance map."""
    img = np.array(Image.open(shared_data / "consep/images/test_4_012.png"))
    inst = np.array(Image.open(shared_data / "consep/instances/test_4_012.png")).astype(np.int32)
    return img, inst


@pytest.fixture(scope="module")
def fluo(shared_data):
    """A real 1-channel fluorescence image (DSB 2018)."""
    path = sorted((shared_data / "dsb2018_fluo_subset/images").glob("*.png"))[0]
    return np.array(Image.open(path))


def test_shared_png_rgb_and_16bit_instances(shared_data, he):
    img, inst = he
    got = read_image(shared_data / "consep/images/test_4_012.png")
    assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, img)
    got_inst = read_instances(shared_data / "consep/instances/test_4_012.png", (256, 256))
    assert got_inst.dtype == np.int32
    np.testing.assert_array_equal(got_inst, inst)
    assert got_inst.max() == 33  # 4 + 1 + 16 + 12 nuclei in its class CSV


def test_grayscale(shared_data, fluo):
    path = sorted((shared_data / "dsb2018_fluo_subset/images").glob("*.png"))[0]
    got = read_image(path)
    assert got.shape == (*fluo.shape, 1) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], fluo)


def test_rgba_opaque_is_silent_and_transparent_is_composited_on_white(tmp_path, he):
    img = he[0]
    alpha = np.full(img.shape[:2], 255, np.uint8)
    Image.fromarray(np.dstack([img, alpha])).save(tmp_path / "opaque.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "opaque.png"), img)
    alpha[:10] = 0
    alpha[10:20] = 128
    Image.fromarray(np.dstack([img, alpha])).save(tmp_path / "rgba.png")
    with pytest.warns(UserWarning, match="rgba.png: alpha channel composited over white") as rec:
        got = read_image(tmp_path / "rgba.png")
    assert rec[0].filename == __file__  # the warning points at the caller, not at karyo's internals
    assert got.shape == img.shape
    assert np.all(got[:10] == 255)
    expected = np.round(img[10:20].astype(np.float32) * (128 / 255) + 255 * (127 / 255))
    np.testing.assert_array_equal(got[10:20], expected.astype(np.uint8))
    np.testing.assert_array_equal(got[20:], img[20:])
    # an 8-bit RGBA TIFF reads as the PNG does (transparent = glass); a 16-bit 4-channel array stays 4 markers
    import tifffile

    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([img, alpha]), photometric="rgb", extrasamples=["unassalpha"])
    with pytest.warns(UserWarning, match="rgba.tif: alpha channel composited over white"):
        np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), got)
    tifffile.imwrite(tmp_path / "premult.tif", np.dstack([np.zeros_like(img), alpha]), photometric="rgb",
                     extrasamples=["assocalpha"])
    with pytest.warns(UserWarning, match="composited"):
        premult = read_image(tmp_path / "premult.tif")
    assert np.all(premult[:10] == 255) and np.all(premult[20:] == 0) and np.all(premult[10:20] == 127)
    markers = np.dstack([img, alpha]).astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "markers.tif", markers)  # tifffile tags it RGB + alpha by default
    np.testing.assert_array_equal(read_image(tmp_path / "markers.tif"), markers)


def test_16bit_png_gray_and_rgb(tmp_path, he, fluo):
    gray16 = fluo.astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    got = read_image(tmp_path / "g16.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got[..., 0], gray16)
    rgb16 = he[0].astype(np.uint16) * 257 + 3  # Pillow would truncate this to 8 bits
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    got = read_image(tmp_path / "rgb16.png")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, rgb16)


def test_16bit_tiff_and_float_tiff(tmp_path, fluo):
    tifffile.imwrite(tmp_path / "g16.tif", fluo.astype(np.uint16) * 200)
    got = read_image(tmp_path / "g16.tif")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got[..., 0], fluo.astype(np.uint16) * 200)
    tifffile.imwrite(tmp_path / "f.tif", fluo.astype(np.float64) / 255)
    got = read_image(tmp_path / "f.tif")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[..., 0], fluo / 255, rtol=1e-6)


def test_multichannel_tiff_cyx_and_yxc(tmp_path, he, fluo):
    # A 4-channel stack: the H&E RGB planes plus a fluorescence crop of the same size.
    assert fluo.shape[0] >= 256 and fluo.shape[1] >= 256
    stack = np.dstack([he[0], fluo[:256, :256]])
    tifffile.imwrite(tmp_path / "cyx.tif", np.moveaxis(stack, 2, 0), photometric="minisblack", metadata={"axes": "CYX"})
    # Channels as separate pages, with and without tifffile's shape metadata (axes IYX / QYX).
    tifffile.imwrite(tmp_path / "pages.tif", np.moveaxis(stack, 2, 0), photometric="minisblack", metadata=None)
    tifffile.imwrite(tmp_path / "pages_q.tif", np.moveaxis(stack, 2, 0), photometric="minisblack")
    tifffile.imwrite(tmp_path / "yxc.tif", stack, photometric="minisblack", planarconfig="contig")
    for name in ("cyx.tif", "pages.tif", "pages_q.tif", "yxc.tif"):
        got = read_image(tmp_path / name)
        assert got.shape == (256, 256, 4), name
        np.testing.assert_array_equal(got, stack)


def test_ome_tiff_channel_names_and_mpp(tmp_path, he):
    planes = np.moveaxis(he[0], 2, 0)
    tifffile.imwrite(tmp_path / "x.ome.tif", planes, metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "PanCK"]}, "PhysicalSizeX": 0.325,
        "PhysicalSizeY": 0.325})
    got, meta = read_image_meta(tmp_path / "x.ome.tif")
    np.testing.assert_array_equal(got, he[0])
    assert meta["channel_names"] == ("DAPI", "CD3", "PanCK")
    assert meta["mpp"] == pytest.approx(0.325)


def test_jpeg(tmp_path, he):
    Image.fromarray(he[0]).save(tmp_path / "x.jpg", quality=95)
    got = read_image(tmp_path / "x.jpg")
    assert got.shape == (256, 256, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - he[0]).mean() < 4  # lossy, but close


@pytest.mark.parametrize(("shape", "dtype"), [((256, 256, 5), np.uint8), ((256, 256, 2), np.uint16),
                                              ((256, 256, 3), np.uint16), ((256, 256, 4), np.float32)])
def test_write_image_tiff_roundtrip_any_channels(tmp_path, he, shape, dtype):
    base = np.concatenate([he[0], he[0]], axis=2)[..., : shape[2]].astype(dtype)
    write_image(tmp_path / "w.tif", base)
    np.testing.assert_array_equal(read_image(tmp_path / "w.tif"), base)


def test_write_image_keeps_channel_names_and_mpp(tmp_path, he):
    write_image(tmp_path / "w.tif", he[0], channel_names=("R", "G", "B"), mpp=0.25)
    got, meta = read_image_meta(tmp_path / "w.tif")
    np.testing.assert_array_equal(got, he[0])
    assert meta["channel_names"] == ("R", "G", "B") and meta["mpp"] == pytest.approx(0.25)


def test_write_png_refuses_channels_it_cannot_hold(tmp_path, he):
    with pytest.raises(InputError, match=r"write a \.tif instead"):
        write_image(tmp_path / "w.png", np.dstack([he[0], he[0][..., :1]]))
    assert not list(tmp_path.iterdir())  # atomic: nothing left behind


def test_write_instances_beyond_16_bits_reads_back(tmp_path, he):
    big = np.where(he[1] > 0, he[1] + 70000, 0).astype(np.int32)
    path = write_instances(tmp_path / "big.tif", big)
    np.testing.assert_array_equal(read_instances(path, big.shape), big)
    with pytest.raises(InputError, match="do not fit a 16-bit PNG"):
        write_instances(tmp_path / "big.png", big)


# --- bad input: one InputError naming the file and the problem ---------------------------------------------

def test_truncated_png(tmp_path, shared_data):
    data = (shared_data / "consep/images/test_4_012.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png: cannot decode image .*truncated"):
        read_image(tmp_path / "cut.png")


def test_truncated_tiff(tmp_path, he):
    tifffile.imwrite(tmp_path / "full.tif", he[0])
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError, match=r"cut\.tif: cannot read TIFF"):
        read_image(tmp_path / "cut.tif")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("instance_id,class_id\n1,2\n")
    with pytest.raises(InputError, match=r"notes\.png: cannot decode image"):
        read_image(tmp_path / "notes.png")


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.png: file is empty \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(InputError, match=r"gone\.png: file not found"):
        read_image(tmp_path / "gone.png")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.npy: file is empty"):
        read_instances(tmp_path / "empty.npy")


def test_empty_array():
    with pytest.raises(InputError, match=r"img0: image is empty \(shape \(0, 0, 3\)\)"):
        Sample(image=np.zeros((0, 0, 3), np.uint8), name="img0")
    with pytest.raises(InputError, match="image is empty"):
        Sample(image=np.zeros((0, 0), np.uint8), name="img0")


def test_mask_shape_differs_from_image(tmp_path, he):
    write_instances(tmp_path / "m.png", he[1][:200])
    with pytest.raises(InputError, match=r"m\.png: instance map shape 200×256 differs from image shape 256×256"):
        read_instances(tmp_path / "m.png", (256, 256))


def test_float_mask_with_fractions(tmp_path, he):
    frac = he[1].astype(np.float32)
    frac[frac > 0] += 0.5
    tifffile.imwrite(tmp_path / "frac.tif", frac)
    np.save(tmp_path / "frac.npy", frac.astype(np.float64))
    for name in ("frac.tif", "frac.npy"):
        with pytest.raises(InputError, match=rf"{name}: instance map holds non-integer values"):
            read_instances(tmp_path / name)
    # A float64 TIFF whose fraction float32 would round away is still caught (read in its own dtype).
    tiny = he[1].astype(np.float64)
    tiny[tiny > 0] += 1e-9
    tifffile.imwrite(tmp_path / "tiny.tif", tiny)
    with pytest.raises(InputError, match="non-integer"):
        read_instances(tmp_path / "tiny.tif")
    # Integer-valued floats are fine.
    tifffile.imwrite(tmp_path / "whole.tif", he[1].astype(np.float32))
    np.testing.assert_array_equal(read_instances(tmp_path / "whole.tif"), he[1])


def test_negative_mask(tmp_path, he):
    neg = he[1].copy()
    neg[neg == 5] = -5
    tifffile.imwrite(tmp_path / "neg.tif", neg)
    np.save(tmp_path / "neg.npy", neg)
    for name in ("neg.tif", "neg.npy"):
        with pytest.raises(InputError, match=rf"{name}: instance map holds negative ids \(min -5\)"):
            read_instances(tmp_path / name)


def test_rgb_png_is_not_an_instance_map(shared_data):
    with pytest.raises(InputError, match=r"test_4_012\.png: instance map must have one channel, got 3"):
        read_instances(shared_data / "consep/images/test_4_012.png")


def test_tiff_with_a_z_stack_is_refused(tmp_path, he):
    tifffile.imwrite(tmp_path / "z.tif", np.stack([he[1], he[1]]).astype(np.uint16)[:, None],
                     metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match=r"z\.tif: TIFF has axes 'ZCYX': a stack of planes .* save the plane to "
                                         r"segment as its own file"):
        read_image(tmp_path / "z.tif")


def test_a_jpeg_that_asks_to_be_shown_rotated_is_read_as_stored_with_a_warning(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with pytest.warns(UserWarning, match=r"phone\.jpg: its EXIF orientation \(6\) .* outputs line up with the "
                                         r"stored image"):
        image = read_image(tmp_path / "phone.jpg")
    assert image.shape == (20, 30, 3)
    Image.fromarray(pixels).save(tmp_path / "plain.jpg", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "plain.jpg").shape == (20, 30, 3)


@pytest.mark.parametrize(("name", "kwargs", "expected"), [
    ("cm.tif", {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}, 0.5),
    ("inch.tif", {"resolution": (25400 / 0.25, 25400 / 0.25), "resolutionunit": "INCH"}, 0.25),
    ("um.tif", {"resolution": (4, 4), "resolutionunit": "MICROMETER"}, 0.25),  # tifffile's extension
    ("mm.tif", {"resolution": (2000, 2000), "resolutionunit": "MILLIMETER"}, 0.5),
    ("screen.tif", {"resolution": (72, 72), "resolutionunit": "INCH"}, None),  # a screen default, not a scan
    ("imagej.tif", {"imagej": True, "resolution": (1 / 0.325, 1 / 0.325), "metadata": {"unit": "um"}}, 0.325),
    ("aperio.tif", {"description": "Aperio Image Library v12.0.15 |AppMag = 40|MPP = 0.2520|Filename = x"}, 0.252),
    ("plain.tif", {}, None),
])
def test_plain_tiff_resolution_gives_mpp(tmp_path, he, name, kwargs, expected):
    tifffile.imwrite(tmp_path / name, he[0], photometric="rgb", **kwargs)
    got, meta = read_image_meta(tmp_path / name)
    np.testing.assert_array_equal(got, he[0])
    assert meta["mpp"] == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(("suffix", "dpi", "expected"), [(".png", 25400 / 0.25, 0.25), (".png", 72, None),
                                                         (".jpg", 25400 / 0.5, 0.5), (".jpg", 300, None)])
def test_png_and_jpeg_density_gives_mpp(tmp_path, he, suffix, dpi, expected):
    Image.fromarray(he[0]).save(tmp_path / f"x{suffix}", dpi=(dpi, dpi))
    _, meta = read_image_meta(tmp_path / f"x{suffix}")
    assert meta["mpp"] == (pytest.approx(expected, rel=1e-3) if expected else None)


def test_image_stem_drops_only_the_image_suffix():
    """Outputs are named by it: names that differ after a dot must stay apart."""
    assert image_stem("d/slide.A.png") == "slide.A"
    assert image_stem("slide.B.tif") == "slide.B"
    assert image_stem("cells.ome.tif") == "cells" and image_stem("cells.OME.TIFF") == "cells"
    assert image_stem("noext") == "noext"


def test_pixels_that_are_not_square_are_said_and_keep_areas_exact(tmp_path):
    img = np.zeros((8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "aniso.ome.tif", img, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5})
    with pytest.warns(UserWarning, match=r"aniso\.ome\.tif: its pixels are 0\.25 × 0\.5 µm \(not square\)"):
        _, meta = read_image_meta(tmp_path / "aniso.ome.tif")
    assert meta["mpp"] ** 2 == pytest.approx(0.125)  # a pixel's area
    tifffile.imwrite(tmp_path / "tags.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with pytest.warns(UserWarning, match="not square"):
        assert read_image_meta(tmp_path / "tags.tif")[1]["mpp"] ** 2 == pytest.approx(0.125)
    tifffile.imwrite(tmp_path / "square.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.2501), resolutionunit="CENTIMETER")
    assert read_image_meta(tmp_path / "square.tif")[1]["mpp"] == pytest.approx(0.25)


def test_a_binary_mask_read_as_instances_is_noted(tmp_path):
    """0/255 foreground masks are the commonest mix-up: every metric would score one object."""
    from karyo.data.io import read_instances, write_image

    mask = np.zeros((32, 32), np.uint8)
    mask[2:6, 2:6] = mask[10:15, 10:15] = mask[20:25, 3:8] = 255
    write_image(tmp_path / "m.png", mask)
    with pytest.warns(UserWarning, match=r"m\.png: one id \(255\) covers 3 separate regions: a binary"):
        assert read_instances(tmp_path / "m.png").max() == 255
    labelled = mask.astype(np.int32) // 255
    labelled[10:15, 10:15], labelled[20:25, 3:8] = 2, 3
    write_image(tmp_path / "ok.png", labelled.astype(np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_instances(tmp_path / "ok.png")


def test_a_channels_first_array_is_refused_with_the_fix():
    """torch's C×H×W given where H×W×C belongs used to reach the model as 3 rows of 256 channels."""
    import karyo
    from karyo.errors import InputError

    with pytest.raises(InputError, match=r"\(3, 64, 64\) looks channels-first.*np\.moveaxis\(image, 0, -1\)"):
        karyo.load("classical").segment(np.zeros((3, 64, 64), np.uint8))
    assert karyo.load("classical").segment(np.zeros((64, 64, 3), np.uint8)).n_nuclei == 0


def test_float_in_unit_range_converts_back_to_its_8_bit_image():
    """As the models read floats: img / 255 → img (it was stretched by its own percentiles, so classical and the
    overlays differed between img and img / 255)."""
    import karyo
    from karyo.data.io import read_image, to_uint8
    from karyo.samples import sample_path

    img = read_image(sample_path())
    np.testing.assert_array_equal(to_uint8(img / 255.0), img)
    raw = np.linspace(-3.0, 40.0, 64, dtype=np.float32).reshape(8, 8, 1)  # other floats: percentile stretch
    assert to_uint8(raw).min() == 0 and to_uint8(raw).max() == 255
    classical = karyo.load("classical")
    np.testing.assert_array_equal(classical.segment(img / 255.0).instances, classical.segment(img).instances)
    with pytest.raises(InputError, match=r"float images must hold values in \[0, 1\], got .*\.\.1\.0001;"):
        classical.segment(np.minimum(img / 255.0 * 1.0001, 1.0001))  # refused as the learned models refuse it


def test_read_image_meta_given_an_array_says_it_takes_a_path():
    with pytest.raises(InputError, match="takes an image file's path, got an array: it is already read"):
        read_image_meta(np.zeros((3, 3)))
    with pytest.raises(InputError, match="takes an image file's path, got int"):
        read_image_meta(3)
