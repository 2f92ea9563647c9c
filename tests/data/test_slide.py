import pickle

import numpy as np
import pytest
import tifffile
from PIL import Image

from karyo.data.slide import ImageFileSlide, SlideSpec, TiffSlideReader, open_slide, plausible_mpp
from karyo.errors import InputError


def _image(h=300, w=420, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_pyramid(path, image, mpp=0.25, factors=(2, 4), tile=128):
    """A pyramidal tiled TIFF (SubIFDs, as tifffile writes them) with its pixel size in the resolution tags."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, tile=(tile, tile), subifds=len(factors), photometric="rgb", compression="zlib",
                  resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
        for f in factors:
            tif.write(image[::f, ::f], tile=(tile, tile), photometric="rgb", compression="zlib", subfiletype=1)
    return path


def test_pyramidal_tiff_levels_mpp_and_exact_regions(tmp_path):
    img = _image()
    with open_slide(write_pyramid(tmp_path / "s.tif", img)) as slide:
        assert isinstance(slide, TiffSlideReader)
        assert slide.dimensions == (420, 300)
        assert slide.level_dimensions == ((420, 300), (210, 150), (105, 75))
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_scale(1) == (2.0, 2.0)
        assert slide.best_level(1.0) == 0 and slide.best_level(3.0) == 1 and slide.best_level(64) == 2
        np.testing.assert_array_equal(slide.read_region(37, 21, 100, 64), img[21:85, 37:137])
        # level 1 at level-0 location (60, 40) = level-1 pixel (30, 20)
        np.testing.assert_array_equal(slide.read_region(60, 40, 50, 30, level=1), img[::2, ::2][20:50, 30:80])
        np.testing.assert_array_equal(slide.read_level(2, 3, 5, 40, 20), img[::4, ::4][5:25, 3:43])


def test_regions_outside_the_slide_are_white(tmp_path):
    img = _image()
    with open_slide(write_pyramid(tmp_path / "s.tif", img)) as slide:
        region = slide.read_level(0, -10, 290, 30, 20)
    assert region.shape == (20, 30, 3)
    np.testing.assert_array_equal(region[:10, 10:], img[290:300, 0:20])
    assert (region[:, :10] == 255).all() and (region[10:] == 255).all()


def test_read_downsampled_averages_blocks_of_the_best_level(tmp_path):
    img = _image(256, 384)
    with open_slide(write_pyramid(tmp_path / "s.tif", img)) as slide:
        thumb, scale = slide.read_downsampled(8.0, chunk=64)  # level 2 (×4), then 2×2 blocks
    assert scale == (8.0, 8.0)
    lvl2 = img[::4, ::4].astype(np.float64)
    want = np.round(lvl2.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    np.testing.assert_array_equal(thumb, want)


def test_plain_tiff_has_no_mpp_unless_given_and_ignores_72_dpi(tmp_path):
    img = _image()
    tifffile.imwrite(tmp_path / "strip.tif", img, photometric="rgb")
    Image.fromarray(img).save(tmp_path / "pil.tif", dpi=(72, 72))
    with open_slide(tmp_path / "strip.tif") as slide:
        assert slide.mpp is None and slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region(5, 7, 11, 13), img[7:20, 5:16])
    with open_slide(tmp_path / "pil.tif") as slide:
        assert slide.metadata_mpp is None  # 72 dpi = 353 µm/px is a writer default, not a scan resolution
    with open_slide(tmp_path / "pil.tif", mpp=0.5) as slide:
        assert slide.mpp == 0.5
    assert plausible_mpp(0.25) == 0.25 and plausible_mpp(352.8) is None and plausible_mpp("x") is None


def test_ome_tiff_mpp_and_gray_uint16_become_rgb_uint8(tmp_path):
    img = _image(64, 80)
    tifffile.imwrite(tmp_path / "a.ome.tif", img, photometric="rgb", ome=True, tile=(64, 64),
                     metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(tmp_path / "a.ome.tif") as slide:
        assert slide.mpp == pytest.approx(0.5)
    gray = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 10)
    tifffile.imwrite(tmp_path / "g.tif", gray, photometric="minisblack")
    with open_slide(tmp_path / "g.tif") as slide:
        region = slide.read_region(0, 0, 80, 64)
    assert region.dtype == np.uint8 and region.shape == (64, 80, 3)
    want = np.round(gray.astype(np.float32) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(region[..., 0], want)
    np.testing.assert_array_equal(region[..., 2], want)


def test_png_is_decoded_once_into_a_memory_mapped_cache(tmp_path):
    img = _image(200, 150)
    Image.fromarray(img).save(tmp_path / "big.png", dpi=(101600, 101600))  # 0.25 µm/px
    cache = tmp_path / "cache"
    with open_slide(tmp_path / "big.png", cache_dir=cache) as slide:
        assert isinstance(slide, ImageFileSlide)
        assert slide.dimensions == (150, 200) and slide.mpp == pytest.approx(0.25, rel=1e-3)
        np.testing.assert_array_equal(slide.read_region(10, 20, 30, 40), img[20:60, 10:40])
        assert isinstance(slide._pixels, np.memmap)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with open_slide(tmp_path / "big.png", cache_dir=cache) as slide:  # reused, not decoded again
        np.testing.assert_array_equal(slide.read_region(0, 0, 150, 200), img)
    assert files[0].stat().st_mtime_ns == mtime
    Image.fromarray(img).save(tmp_path / "x.jpg", quality=95)
    with open_slide(tmp_path / "x.jpg") as slide:  # no cache folder: held in memory
        assert slide.dimensions == (150, 200) and slide.mpp is None


def test_slide_spec_pickles_and_reopens(tmp_path):
    img = _image(64, 64)
    path = write_pyramid(tmp_path / "s.tif", img, factors=())
    spec = pickle.loads(pickle.dumps(SlideSpec(str(path), mpp=0.3)))
    with spec.open() as slide:
        assert slide.mpp == 0.3
        np.testing.assert_array_equal(slide.read_region(0, 0, 64, 64), img)


def test_bad_slides_raise_input_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        open_slide(tmp_path / "empty.svs")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"garbage" * 20)
    with pytest.raises(InputError, match="cannot read slide"):
        open_slide(tmp_path / "junk.tif")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(InputError, match="cannot"):
        open_slide(tmp_path / "junk.png")
    img = _image(64, 64)
    path = write_pyramid(tmp_path / "s.tif", img, factors=())
    with pytest.raises(InputError, match="backend"):
        open_slide(path, backend="bioformats")
    with pytest.raises(InputError, match="plausible"):
        open_slide(path, mpp=300.0)
    with open_slide(path) as slide, pytest.raises(InputError, match="level 3"):
        slide.read_level(3, 0, 0, 4, 4)


def test_openslide_backend_is_optional(tmp_path):
    pytest.importorskip("tiffslide")
    try:
        import openslide  # noqa: F401
    except ImportError:
        path = write_pyramid(tmp_path / "s.tif", _image(64, 64), factors=())
        with pytest.raises(InputError, match="OpenSlide"):
            open_slide(path, backend="openslide")
    else:
        pytest.skip("OpenSlide is installed; the missing-backend message cannot be checked")


def test_truncated_tile_data_is_reported_at_read_time(tmp_path):
    img = _image(256, 256)
    path = write_pyramid(tmp_path / "s.tif", img, factors=(), tile=64)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[-1], page.databytecounts[-1]
    data[offset:offset + count] = b"\xff" * count  # the last tile's zlib stream is destroyed
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region(0, 0, 64, 64), img[:64, :64])
        with pytest.raises(InputError, match="cannot decode region"):
            slide.read_region(192, 192, 64, 64)
