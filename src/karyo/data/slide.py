"""Whole-slide readers: one small interface over tiffslide, OpenSlide (optional) and plain large images.

A :class:`Slide` knows its pyramid (``level_dimensions``), its pixel size (``mpp``, from the file or given by the
caller) and reads any region as RGB uint8, padded with white (empty glass) outside the slide, so tiling code never
special-cases the border. Readers never hold a whole level in memory: tiffslide and OpenSlide decode only the tiles
a region touches, and plain PNG/JPEG files are decoded once into a memory-mapped ``.npy`` cache that every worker
process maps read-only.

Backends: ``tiffslide`` (SVS, generic tiled or striped TIFF, OME-TIFF, NDPI where tiffslide supports it),
``openslide`` (imported only when asked for or when tiffslide cannot read the file; not a dependency) and ``image``
(PNG, JPEG, BMP via Pillow). :func:`open_slide` picks one from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from karyo.data.io import MPP_RANGE, check_file, pil_mpp, plausible_mpp, to_rgb, to_uint8
from karyo.errors import InputError

IMAGE_BACKEND_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BACKENDS = ("auto", "tiffslide", "openslide", "image")
WHITE = 255


class Slide(ABC):
    """A pyramidal image read region by region. Coordinates are (x, y) = (column, row) in pixels."""

    backend: str = ""

    def __init__(self, path: Path, level_dimensions: tuple[tuple[int, int], ...], metadata_mpp: float | None,
                 mpp: float | None = None):
        self.path = path
        self.level_dimensions = tuple((int(w), int(h)) for w, h in level_dimensions)
        self.metadata_mpp = metadata_mpp
        self._mpp_override = mpp

    # ------------------------------------------------------------------------------------------- geometry
    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel: the caller's value if given, else the file's (None when neither exists)."""
        return self._mpp_override if self._mpp_override is not None else self.metadata_mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level``, per axis (x, y)."""
        w0, h0 = self.dimensions
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(sum(self.level_scale(i)) / 2.0 for i in range(self.level_count))

    def best_level(self, downsample: float) -> int:
        """The smallest level that is still at least as fine as ``downsample`` (never upsample a coarse level)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6):
                best = level
        return best

    # ------------------------------------------------------------------------------------------- reading
    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """h×w×3 uint8 RGB of ``level`` at (x, y) in that level's pixels; white where outside the slide."""
        if not 0 <= level < self.level_count:
            raise InputError(self.path, f"level {level} does not exist (the slide has {self.level_count})")
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), WHITE, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            region = self._read(level, x0, y0, x1 - x0, y1 - y0)
        except InputError:
            raise
        except Exception as exc:  # decoders raise many types for damaged data
            raise InputError(self.path, f"cannot decode region x={x0}, y={y0}, {x1 - x0}×{y1 - y0} of level {level} "
                                        f"({type(exc).__name__}: {exc}); the file is corrupt or truncated") from None
        out[y0 - y:y1 - y, x0 - x:x1 - x] = region
        return out

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """h×w×3 uint8 RGB; (x, y) in level-0 pixels and (w, h) in pixels of ``level`` (OpenSlide's convention)."""
        sx, sy = self.level_scale(level) if 0 <= level < self.level_count else (1.0, 1.0)
        return self.read_level(level, math.floor(x / sx), math.floor(y / sy), w, h)

    def read_downsampled(self, downsample: float, chunk: int = 4096, *, at_least: bool = False
                         ) -> tuple[np.ndarray, tuple[float, float]]:
        """The whole slide reduced about ``downsample`` times (``at_least``: never less), and the exact level-0
        pixels per output pixel (x, y).

        Reads the best pyramid level in chunks and averages k×k blocks, so memory stays at one chunk even for a
        slide without a pyramid.
        """
        level = self.best_level(max(downsample, 1.0))
        sx, sy = self.level_scale(level)
        ratio = downsample / max(sx, sy)
        k = max(1, math.ceil(ratio - 1e-6) if at_least else round(ratio))
        lw, lh = self.level_dimensions[level]
        out = np.empty((-(-lh // k), -(-lw // k), 3), np.uint8)
        step = max(k, (chunk // k) * k)
        for y in range(0, lh, step):
            for x in range(0, lw, step):
                block = self.read_level(level, x, y, min(step, lw - x), min(step, lh - y))
                out[y // k:y // k + -(-block.shape[0] // k), x // k:x // k + -(-block.shape[1] // k)] = \
                    _block_mean(block, k)
        return out, (sx * k, sy * k)

    @abstractmethod
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of an in-bounds region of ``level`` (any dtype/channels; converted to RGB by the caller)."""

    def _rgb(self, arr: np.ndarray) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[2] == 4:  # RGBA: transparent pixels are outside the scanned area, i.e. glass
            alpha = to_uint8(arr[..., 3:4]).astype(np.float32) / 255.0
            arr = np.round(to_uint8(arr[..., :3]) * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return to_rgb(arr)

    # ------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:  # noqa: B027  (backends without handles have nothing to close)
        """Release file handles."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What a run records about its input (JSON-ready)."""
        return {"path": str(self.path), "backend": self.backend, "dimensions": list(self.dimensions),
                "level_dimensions": [list(d) for d in self.level_dimensions], "mpp": self.mpp,
                "metadata_mpp": self.metadata_mpp}


def _block_mean(block: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return block
    h, w = block.shape[:2]
    ph, pw = -(-h // k) * k, -(-w // k) * k
    if (ph, pw) != (h, w):
        block = np.pad(block, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    means = block.reshape(ph // k, k, pw // k, k, 3).mean(axis=(1, 3))
    return np.round(means).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ tiffslide
class TiffSlideReader(Slide):
    """SVS, NDPI, OME-TIFF and generic (tiled or striped) TIFF through tiffslide's zarr store."""

    backend = "tiffslide"

    def __init__(self, path: Path, mpp: float | None = None):
        import tiffslide

        try:
            with _quiet_tifffile():  # a damaged file is reported once, by the InputError below
                self._slide = tiffslide.TiffSlide(path)
                props = self._slide.properties  # parsing happens here: damaged files fail now, not at the first tile
                dims = self._slide.level_dimensions
                if not dims or min(min(d) for d in dims) <= 0:
                    raise ValueError("no image levels")
        except Exception as exc:  # tifffile/tiffslide raise TiffFileError, IndexError, KeyError, NotImplementedError
            raise InputError(path, f"cannot read slide ({type(exc).__name__}: {exc}); the file is corrupt, "
                                   f"truncated or not a supported slide format") from None
        meta = plausible_mpp(props.get("tiffslide.mpp-x"))
        if meta is None:
            meta = _ome_mpp(self._slide)
        if meta is None:
            meta = _tags_mpp(self._slide)
        super().__init__(path, dims, meta, mpp)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._slide.level_downsamples[level]
        # tiffslide maps a level-0 location to the level as int(loc / ds): pick the level-0 value that lands on x, y.
        loc = (_level0_location(x, ds), _level0_location(y, ds))
        try:
            arr = self._slide.read_region(loc, level, (w, h), as_array=True, padding=False)
        except Exception:
            _settle_zarr_tasks()
            raise
        return self._rgb(arr)

    def close(self) -> None:
        self._slide.close()


def _settle_zarr_tasks(timeout: float = 10.0) -> None:
    """After a failed read, cancel and wait for the chunk tasks zarr left running on its event-loop thread. A chunk
    that fails to decode fails the read at once while its siblings are still pending; left so, each prints "Task
    was destroyed but it is pending!" when zarr stops its loop at exit (hundreds of lines after our one error)."""
    import asyncio

    try:
        from zarr.core import sync
    except ImportError:
        return
    loop = sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def settle() -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for t in tasks:  # mark their errors as seen (else each logs "Task exception was never retrieved")
            if t.done() and not t.cancelled():
                t.exception()

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout + 1)


def _level0_location(v: int, ds: float) -> int:
    guess = round(v * ds)
    for cand in (guess, guess + 1, guess - 1, guess + 2, guess - 2):
        if cand >= 0 and int(cand / ds) == v:
            return cand
    raise InputError(None, f"cannot address pixel {v} of a level with downsample {ds}")


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's logger (it logs each series it fails to parse of a damaged file, before our error)."""
    logger = logging.getLogger("tifffile")
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def _tags_mpp(slide) -> float | None:
    """The pixel size as :func:`karyo.data.io.read_image_meta` reads it from a plain TIFF (ImageJ's micron unit,
    an Aperio description, resolution tags), where tiffslide found none: ``karyo wsi`` and ``karyo segment`` agree
    on a file."""
    from karyo.data.io import tiff_tags_mpp

    tif = slide.ts_tifffile
    if tif.is_ome:
        return None
    try:
        return tiff_tags_mpp(tif)
    except InputError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError):  # odd tags: no usable pixel size
        return None


def _ome_mpp(slide) -> float | None:
    """OME-XML PhysicalSizeX (already checked for plausibility), which tiffslide does not read for every OME
    layout."""
    from karyo.data.io import _ome_channels_and_mpp

    tif = slide.ts_tifffile
    if not (tif.is_ome and tif.ome_metadata):
        return None
    return _ome_channels_and_mpp(tif.ome_metadata, tif.filehandle.path)[1]


# ------------------------------------------------------------------------------------------------ OpenSlide
class OpenSlideReader(Slide):
    """Any format OpenSlide reads (MRXS, VMS, SCN, ...). OpenSlide is optional and imported only here."""

    backend = "openslide"

    def __init__(self, path: Path, mpp: float | None = None):
        try:
            import openslide
        except ImportError:
            raise InputError(path, "this slide needs OpenSlide, which is not installed "
                                   "(pip install openslide-python openslide-bin)") from None
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise InputError(path, f"cannot read slide with OpenSlide ({type(exc).__name__}: {exc})") from None
        meta = plausible_mpp(self._slide.properties.get("openslide.mpp-x"))
        super().__init__(path, tuple(self._slide.level_dimensions), meta, mpp)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._slide.level_downsamples[level]
        loc = (round(x * ds), round(y * ds))
        return self._rgb(np.asarray(self._slide.read_region(loc, level, (w, h))))

    def close(self) -> None:
        self._slide.close()


# ------------------------------------------------------------------------------------------------ plain images
class ImageFileSlide(Slide):
    """PNG, JPEG or BMP: decoded once (Pillow) into a memory-mapped ``.npy`` under ``cache_dir``.

    Pillow cannot decode part of a PNG, so the first open pays one full decode; afterwards every process maps
    the cache read-only and only the pages a tile touches are loaded. Without ``cache_dir`` the image is held in
    memory (fine for images that are large but not slide-sized).
    """

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None, cache_dir: str | os.PathLike | None = None):
        meta = _pil_mpp(path)
        if cache_dir is None:
            self._pixels = _decode_rgb(path)
        else:
            self._pixels = np.load(_image_cache(path, Path(cache_dir)), mmap_mode="r")
        h, w = self._pixels.shape[:2]
        super().__init__(path, ((w, h),), meta, mpp)

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return np.array(self._pixels[y:y + h, x:x + w])

    def close(self) -> None:
        self._pixels = None


def _decode_rgb(path: Path) -> np.ndarray:
    from karyo.data.io import read_image_meta

    return to_rgb(read_image_meta(path)[0])


def _pil_mpp(path: Path) -> float | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return pil_mpp(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot read image ({exc}); the file is corrupt, truncated or not an image") from None


def _image_cache(path: Path, cache_dir: Path) -> Path:
    """Decode ``path`` once into ``cache_dir`` (atomically; keyed by path, size and mtime) and return the .npy."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{path.stem}.{key}.npy"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    pixels = _decode_rgb(path)
    tmp = target.with_name(target.name + ".part")
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=pixels.shape)
        mm[:] = pixels
        mm.flush()
        del mm
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# ------------------------------------------------------------------------------------------------ opening
@dataclass(frozen=True)
class SlideSpec:
    """How to open a slide; small and picklable, so worker processes open their own reader."""

    path: str
    backend: str = "auto"
    mpp: float | None = None
    cache_dir: str | None = None

    def open(self) -> Slide:
        return open_slide(self.path, mpp=self.mpp, backend=self.backend, cache_dir=self.cache_dir)


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str = "auto",
               cache_dir: str | os.PathLike | None = None) -> Slide:
    """Open a slide or large image. ``mpp`` (µm/px) overrides the file's pixel size; ``backend`` is one of
    :data:`BACKENDS` (``auto``: Pillow for PNG/JPEG/BMP, tiffslide for the rest, OpenSlide if tiffslide fails
    and OpenSlide is installed)."""
    path = Path(path)
    check_file(path, "a slide or image file")
    if backend not in BACKENDS:
        raise InputError(None, f"unknown slide backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if mpp is not None and plausible_mpp(mpp) is None:
        raise InputError(None, f"mpp {mpp} µm/px is outside the plausible range {MPP_RANGE[0]}–{MPP_RANGE[1]}")
    if backend == "image" or (backend == "auto" and path.suffix.lower() in IMAGE_BACKEND_SUFFIXES):
        return ImageFileSlide(path, mpp, cache_dir)
    if backend == "openslide":
        return OpenSlideReader(path, mpp)
    try:
        return TiffSlideReader(path, mpp)
    except InputError:
        if backend == "tiffslide" or not _openslide_available():
            raise
        return OpenSlideReader(path, mpp)


def _openslide_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openslide") is not None
