"""Image and label-map I/O. All of karyo's file reading and writing of pixels goes through here.

Reading returns H×W×C arrays in the file's own dtype (uint8, uint16 or float32); conversions are explicit
(:func:`to_uint8`, :func:`to_rgb`). Writing is atomic: data go to a temporary file in the destination
folder that is renamed only once complete, so a failure never leaves a partial output behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from karyo.data.sample import as_hwc, integer_by_value, validate_instances
from karyo.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf")

# A pixel size outside this range (µm/px) is not a microscope's: TIFF and PNG writers often store 72 or 96 dpi
# (≈ 350 / 265 µm/px) by default, which must not be taken for the scan resolution.
MPP_RANGE = (0.02, 20.0)

# Pillow refuses images above ~179 Mpx by default; we read whole tiles only, slides go through tiffslide.
Image.MAX_IMAGE_PIXELS = 1 << 31


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600 files; give them the usual umask permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def check_file(path: Path, expected: str = "an image file") -> None:
    """Refuse a missing path, a folder or a 0-byte file with one clear :class:`InputError`."""
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, f"is a folder, expected {expected}")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty (0 bytes)")


def _read_tiff(path: Path) -> tuple[np.ndarray, tuple[str, ...] | None, float | None, str]:
    """(Y×X×C pixels, channel names, µm/px, photometric: "rgb", "minisblack", ...)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
            names = None
            mpp = None
            page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
            # RGB + alpha as tagged by the file; not OME (named channels) nor 16-bit, where tifffile's default tags
            # also mark a plain 4-channel marker array as RGBA
            photometric = getattr(page.photometric, "name", str(page.photometric)).lower()
            rgba = (int(page.photometric) == 2 and not tif.is_ome and page.dtype == np.uint8)
            alpha = tuple(int(e) for e in (getattr(page, "extrasamples", None) or ())) if rgba else ()
            labels = None
            if tif.is_ome and tif.ome_metadata:
                names, mpp = _ome_channels_and_mpp(tif.ome_metadata, path)
            else:
                mpp = tiff_tags_mpp(tif)
                if tif.is_imagej:
                    labels = (tif.imagej_metadata or {}).get("Labels")
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
        raise InputError(path, f"cannot read TIFF ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
                         ) from None
    arr = _to_yxc(arr, axes, path)
    if alpha and alpha[-1] in (1, 2) and arr.shape[2] == 4:
        # an 8-bit RGBA TIFF, as a PNG with transparency: transparent pixels are glass
        premultiplied = alpha[-1] == 1
        arr = _flatten_alpha(arr[..., :-1], arr[..., -1], path, premultiplied=premultiplied)
        names = None
    if labels is not None:
        names = _imagej_channel_names(labels, axes, arr.shape[2])
    if names is not None and len(names) != arr.shape[2]:
        # tifffile writes a Y×X×C array as one OME channel of C samples, with the first name only
        if not (photometric == "rgb" and arr.dtype == np.uint8 and len(names) == 1):  # an RGB image's own name
            warnings.warn(f"{path}: the OME metadata names {len(names)} channel{'s' if len(names) != 1 else ''} "
                          f"for {arr.shape[2]} planes: channel names ignored", stacklevel=_caller_stacklevel())
        names = None
    if names is not None:
        _note_repeated_names(names, path)
    return arr, names, mpp, photometric


def _imagej_channel_names(labels: Any, axes: str, n_channels: int) -> tuple[str, ...] | None:
    """Channel names from an ImageJ hyperstack's slice labels (``Labels``), which ImageJ stores one per plane,
    channels varying fastest: C labels for C planes name them; with more planes (Z or T), the first C labels do
    only if every Z/T repeats them. Labels of an RGB image's planes do not name its samples; blank or multi-line
    labels (file information, as ImageJ keeps for DICOM) are not names."""
    labels = [labels] if isinstance(labels, str) else labels
    if not isinstance(labels, (list, tuple)) or not labels or "S" in axes.upper():
        return None
    labels = ["" if label is None else str(label).strip() for label in labels]
    if len(labels) != n_channels:
        if not (len(labels) % n_channels == 0
                and all(label == labels[k % n_channels] for k, label in enumerate(labels))):
            return None
        labels = labels[:n_channels]
    if not all(labels) or any("\n" in label or "\r" in label for label in labels):
        return None
    return tuple(labels)


def _note_repeated_names(names: tuple[str, ...], path: Path) -> None:
    """Say once per file which channel names are repeated (matched ignoring case, as ``--channels`` does)."""
    seen: dict[str, str] = {}
    repeated: dict[str, None] = {}
    for name in names:
        key = str(name).strip().casefold()
        if key in seen:
            repeated[seen[key]] = None
        else:
            seen[key] = str(name).strip()
    if repeated:
        warnings.warn(f"{path}: channel name(s) {', '.join(repeated)} repeated: --channels picks the first of each; "
                      f"the others are told apart by #2, #3 ... (in attribute columns) or their 0-based index",
                      stacklevel=_caller_stacklevel())


def _to_yxc(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reorder a tifffile array to Y×X×C; singleton T/Z/Q axes are dropped, a lone page/generic axis (I, Q) is
    taken as channels, other extra axes (Z, T, ...) are refused."""
    axes = axes.upper()
    for ax in list(axes):
        if ax not in "YXCS" and arr.shape[axes.index(ax)] == 1:
            i = axes.index(ax)
            arr = arr.take(0, axis=i)
            axes = axes[:i] + axes[i + 1:]
    extra = [ax for ax in axes if ax not in "YXCS"]
    if len(extra) == 1 and extra[0] in "IQ" and not any(ax in "CS" for ax in axes):
        # A plain stack of 2-D pages (how multiplex images are often saved) or an untagged C×Y×X array:
        # the only candidate for channels is that generic axis.
        axes, extra = axes.replace(extra[0], "C"), []
    if extra:
        raise InputError(path, f"TIFF has axes {axes!r}: a stack of planes (pages, z or time), while karyo reads "
                               f"one 2-D image with channels; save the plane to segment as its own file (e.g. "
                               f"tifffile.imread(path, key=0)), or a whole slide's pyramid is read by karyo wsi")
    chan = [ax for ax in axes if ax in "CS"]
    if len(chan) == 2:  # planar channels × samples per pixel: merge them
        order = [axes.index("Y"), axes.index("X"), axes.index(chan[0]), axes.index(chan[1])]
        arr = arr.transpose(order)
        return arr.reshape(arr.shape[0], arr.shape[1], -1)
    if chan:
        return arr.transpose(axes.index("Y"), axes.index("X"), axes.index(chan[0]))
    return arr.transpose(axes.index("Y"), axes.index("X"))[..., None]


def _ome_channels_and_mpp(xml: str, source: str | os.PathLike | None = None
                          ) -> tuple[tuple[str, ...] | None, float | None]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    pixels = next((el for el in root.iter() if el.tag.endswith("Pixels")), None)
    if pixels is None:
        return None, None
    channels = [el for el in pixels if el.tag.endswith("Channel")]
    # Writers fill only the ID ("Channel:0:0") when they know no names; such IDs are not names.
    names = (tuple(ch.get("Name") or f"C{i}" for i, ch in enumerate(channels))
             if any(ch.get("Name") for ch in channels) else None)
    sizes = []
    for axis in ("X", "Y"):
        size, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
        with contextlib.suppress(TypeError, ValueError):
            sizes.append(plausible_mpp(float(size) * scale) if size is not None and scale is not None else None)
    return (names or None), square_mpp(*sizes, source=source) if sizes else None


def square_mpp(x: float | None, y: float | None = None, source: str | os.PathLike | None = None) -> float | None:
    """One µm/px for a file stating X and Y sizes. Pixels that are not square (more than 1 % apart) are said,
    and the geometric mean is used: areas in µm² stay exact, lengths are off by at most the anisotropy."""
    if x is None or y is None or abs(x - y) <= 0.01 * max(x, y):
        return x if x is not None else y
    warnings.warn(f"{source or 'image'}: its pixels are {x:.4g} × {y:.4g} µm (not square); karyo takes "
                  f"{math.sqrt(x * y):.4g} µm/px, so areas in µm² are exact and lengths approximate",
                  stacklevel=_caller_stacklevel())
    return math.sqrt(x * y)


def plausible_mpp(value: Any) -> float | None:
    """``value`` as µm/px if it is a finite number in :data:`MPP_RANGE`, else None."""
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1] else None


def tiff_tags_mpp(tif) -> float | None:
    """µm per pixel from a plain TIFF: an Aperio description (``|MPP = 0.252``), ImageJ's micron unit, or the
    resolution tags in pixels per centimetre or inch (as QuPath, scanners' tile exports and Bio-Formats write)."""
    import re

    page = tif.pages.first
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.]+)", page.description or "")
    if match:
        return plausible_mpp(match.group(1))
    tags = page.tags
    if "XResolution" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF default: inch
    imagej_unit = (tif.imagej_metadata or {}).get("unit", "") if tif.is_imagej else ""
    if imagej_unit in ("micron", "um", "µm", "\\u00B5m"):
        microns_per_unit = 1.0
    else:
        # inch, cm (the TIFF standard), and tifffile's millimetre and micrometre extensions, which tiffslide reads
        microns_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
    if not microns_per_unit:
        return None
    sizes = []
    for tag in ("XResolution", "YResolution"):
        numerator, denominator = tags[tag].value if tag in tags else (0, 0)
        sizes.append(plausible_mpp(microns_per_unit * denominator / numerator) if numerator and denominator
                     else None)
    return square_mpp(*sizes, source=tif.filehandle.path)


def pil_mpp(im: Image.Image) -> float | None:
    """µm per pixel from a PNG's pHYs chunk (metres) or a JPEG's density, which Pillow reports as dpi."""
    dpi = im.info.get("dpi")
    with contextlib.suppress(TypeError, ValueError, ZeroDivisionError, IndexError):
        return plausible_mpp(25400.0 / float(dpi[0]))
    return None


def _read_pixels(path: Path, palette_indices: bool = False) -> tuple[np.ndarray, dict]:
    """Decode a file to an array in its stored dtype (no conversion), with its channel names and mpp. A palette
    image gives its colours, or with ``palette_indices`` its indices (label images saved with a palette)."""
    check_file(path)
    meta: dict = {"channel_names": None, "mpp": None}
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr, meta["channel_names"], meta["mpp"], meta["photometric"] = _read_tiff(path)
        return arr, meta
    if path.suffix.lower() == ".png" and _png_is_16bit_color(path):
        return _read_png16(path), meta
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im) if palette_indices and im.mode == "P" else _pil_to_array(im, path)
            meta["mpp"] = pil_mpp(im)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot decode image ({exc}); the file is corrupt, truncated or not an image"
                         ) from None
    if orientation not in (1, None):
        warnings.warn(f"{path}: its EXIF orientation ({orientation}) asks viewers to show it rotated or mirrored; "
                      f"karyo reads the pixels as stored (as scikit-image and tifffile do), so outputs line "
                      f"up with the stored image, not the rotated view", stacklevel=3)
    return arr, meta


#: The EXIF tag that tells viewers to rotate or mirror a photo (1 = as stored).
EXIF_ORIENTATION = 0x0112


def _png_is_16bit_color(path: Path) -> bool:
    """Pillow silently truncates 16-bit RGB(A)/LA PNGs to 8 bits; these go through imagecodecs instead."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] in (2, 4, 6)


def _read_png16(path: Path) -> np.ndarray:
    import imagecodecs

    try:
        arr = imagecodecs.png_decode(path.read_bytes())
    except Exception as exc:  # imagecodecs raises its own PngError (a RuntimeError) and others
        raise InputError(path, f"cannot decode image ({exc}); the file is corrupt, truncated or not an image"
                         ) from None
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # gray+alpha or RGBA
        return _flatten_alpha(arr[..., :-1], arr[..., -1], path)
    return arr


def read_image_meta(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read an image and what its file says about it: ``{"channel_names": ..., "mpp": ...}`` (and, for TIFFs,
    ``"photometric"``: ``"rgb"``, or ``"minisblack"`` for stacks of gray channels)."""
    if not isinstance(path, str | os.PathLike):
        what = "an array: it is already read" if isinstance(path, np.ndarray) else type(path).__name__
        raise InputError(None, f"read_image_meta takes an image file's path, got {what}")
    path = Path(path)
    arr, meta = _read_pixels(path)
    arr = as_hwc(arr, str(path))
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise InputError(path, "image holds NaN or infinite values")
        arr = arr.astype(np.float32, copy=False)
    elif arr.dtype not in (np.uint8, np.uint16):
        arr = integer_by_value(arr, path)
    return arr, meta


def _pil_to_array(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.array(im, dtype=np.uint16)
    if mode == "I":
        arr = np.array(im)
        if arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return arr
    if mode == "F":
        return np.array(im, dtype=np.float32)
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "LA":
        arr = np.array(im)
        return _flatten_alpha(arr[..., :1], arr[..., 1], path)
    if mode == "RGBA":
        arr = np.array(im)
        return _flatten_alpha(arr[..., :3], arr[..., 3], path)
    if mode in ("1",):
        return np.array(im.convert("L"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.array(im.convert("RGB"))
    return np.array(im)


def _flatten_alpha(color: np.ndarray, alpha: np.ndarray, path: Path, *, premultiplied: bool = False
                   ) -> np.ndarray:
    """Composite over white: in brightfield, a transparent pixel is empty glass. ``premultiplied``: the colour was
    stored multiplied by alpha already (TIFF "associated alpha")."""
    full = float(np.iinfo(alpha.dtype).max)
    if np.all(alpha == full):
        return color
    a = alpha.astype(np.float32)[..., None] / full
    out = color.astype(np.float32) * (1.0 if premultiplied else a) + full * (1.0 - a)
    warnings.warn(f"{path}: alpha channel composited over white", stacklevel=_caller_stacklevel())
    return np.clip(np.round(out), 0, full).astype(color.dtype)


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside ``karyo.data``, so a warning points at the user's call."""
    here = os.path.dirname(__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def check_mpp(mpp: float | None, source: str | os.PathLike | None = None) -> float | None:
    """``mpp`` as a float, or None when unknown; a value outside :data:`karyo.data.io.MPP_RANGE` (negative,
    zero, NaN, µm mistyped for mm) is an error naming ``source`` rather than silently ignored or obeyed."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(source, f"mpp must be a number of µm per pixel, got {mpp!r}") from None
    if not (math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]):
        raise InputError(source, f"mpp {mpp!r} µm/px is outside the plausible range {MPP_RANGE[0]}–{MPP_RANGE[1]}")
    return value


def mpp_override(given: float | None, stated: float | None) -> str | None:
    """What to tell a user whose ``mpp`` replaced a different one the file states (None when they agree)."""
    if given is None or not stated or abs(stated - given) <= 1e-3 * given:
        return None
    return f"mpp {given:g} was used; the file states {stated:.4g} µm/px"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read PNG, JPEG, BMP or (OME-)TIFF as H×W×C (grayscale → C = 1; RGBA → RGB over white).

    16-bit images stay uint16 and floating-point TIFFs float32; use :func:`to_uint8` to convert.
    """
    return read_image_meta(path)[0]


def on_bit_range(image: np.ndarray, bits: int, source: str | os.PathLike | None = None) -> np.ndarray:
    """A uint16 image that holds ``bits``-bit data (10, 12, 14-bit cameras) as float32 in [0, 1] over its own range,
    so models read it as bright as it is; other dtypes are returned unchanged (their range is already known).
    Values above ``2**bits - 1`` mean the bit depth is wrong and are refused."""
    if image.dtype != np.uint16:
        if image.dtype == np.uint8:
            warnings.warn(f"{source or 'image'}: 8-bit, so --bits {bits} (for 16-bit files) does not apply",
                          stacklevel=_caller_stacklevel())
        return image
    top = 2 ** int(bits) - 1
    peak = int(image.max(initial=0))
    if peak > top:
        raise InputError(source, f"values reach {peak}, more than {bits}-bit data can hold ({top}): give the bits the "
                                 f"camera wrote (--bits), or leave it out for 16-bit data")
    return image.astype(np.float32) / np.float32(top)


def note_narrow_uint16(image: np.ndarray, source: str | None) -> None:
    """uint16 is read over its full 0..65535 range; camera data stored with 12 (or 10, 14) bits in uint16 then
    looks 16× (64×, 4×) darker than it is, and a model finds few nuclei (or an attribute table reads it as dim)
    without saying why."""
    if image.dtype != np.uint16 or not image.size:
        return
    peak = int(image.max())
    if 0 < peak <= 16383:
        bits = max(int(peak).bit_length(), 8)
        warnings.warn(f"{source or 'image'}: uint16 whose values only reach {peak} (of 65535); it is read as "
                      f"16-bit, so it looks {65535 / peak:.0f}× darker than its own range. If it holds {bits}-bit "
                      f"data, pass --bits {bits} (karyo segment, karyo attributes), or in Python read it on its range "
                      f"first: karyo.on_bit_range(image, {bits}) (measure_nuclei also takes bits={bits})",
                      stacklevel=_caller_stacklevel())


def to_uint8(image: np.ndarray, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """Convert to uint8. uint16 and float images are rescaled; by default by the full dtype range for
    uint16 and for float in [0, 1] (as the models read them, so ``img / 255`` converts back to ``img``), by
    (0.1, 99.9) percentiles for other floats (or when ``percentiles`` is given, per channel)."""
    image = np.asarray(image)
    if image.dtype == np.uint8 and percentiles is None:
        return image
    if percentiles is None and image.dtype == np.uint16:
        return (image.astype(np.float32) / 257.0).round().astype(np.uint8)
    if percentiles is None and image.dtype.kind == "f" and image.size:
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
        if lo >= 0.0 and hi <= 1.0:
            return np.round(image.astype(np.float32) * 255.0).astype(np.uint8)
    lo_p, hi_p = percentiles or (0.1, 99.9)
    work = image.astype(np.float32)
    lo = np.percentile(work, lo_p, axis=(0, 1), keepdims=True)
    hi = np.percentile(work, hi_p, axis=(0, 1), keepdims=True)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return np.clip(np.round((work - lo) / scale * 255.0), 0, 255).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 RGB view for display and for brightfield methods: 1 channel is repeated, >3 keeps the first 3."""
    image = to_uint8(as_hwc(image))
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 2:
        return np.concatenate([image, np.zeros_like(image[..., :1])], axis=2)
    return image[..., :3]


def write_image(path: str | os.PathLike, image: np.ndarray, channel_names: tuple[str, ...] | None = None,
                mpp: float | None = None) -> Path:
    """Write an image atomically (PNG/JPEG via Pillow, TIFF via tifffile). Returns the path.

    PNG/JPEG/BMP take 1 or 3 channels. TIFF takes any: 1 and 3 (RGB) channels are written interleaved,
    others (or when ``channel_names``/``mpp`` are given) as planar C×Y×X OME-TIFF, which
    :func:`read_image_meta` reads back with its channel names and pixel size.
    """
    path = Path(path)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputError(path, f"image must be H×W or H×W×C, got shape {arr.shape}")
    n_chan = 1 if arr.ndim == 2 else arr.shape[2]
    if channel_names is not None and len(channel_names) != n_chan:
        raise InputError(path, f"{len(channel_names)} channel names for {n_chan} channels")
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in TIFF_SUFFIXES:
            _write_tiff(tmp, arr, channel_names, mpp)
        else:
            fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}.get(suffix)
            if fmt is None:
                raise InputError(path, f"unsupported output image format {suffix!r}")
            if (arr.dtype not in (np.uint8, np.uint16) or (arr.dtype == np.uint16 and arr.ndim != 2)
                    or n_chan not in (1, 3)):
                raise InputError(path, f"{fmt} holds 1- or 3-channel uint8 images (or 2-D uint16 for PNG), "
                                       f"got {arr.dtype} with shape {arr.shape}; write a .tif instead")
            Image.fromarray(arr).save(tmp, format=fmt)
    return path


def _write_tiff(tmp: Path, arr: np.ndarray, channel_names: tuple[str, ...] | None, mpp: float | None) -> None:
    import tifffile

    if channel_names is None and mpp is None and (arr.ndim == 2 or arr.shape[2] == 3):
        photometric = "minisblack" if arr.ndim == 2 else "rgb"
        tifffile.imwrite(tmp, arr, photometric=photometric, compression="zlib")
        return
    planar = arr[None] if arr.ndim == 2 else np.moveaxis(arr, 2, 0)
    metadata: dict = {"axes": "CYX"}
    if channel_names is not None:
        metadata["Channel"] = {"Name": list(channel_names)}
    if mpp is not None:
        metadata.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    tifffile.imwrite(tmp, np.ascontiguousarray(planar), photometric="minisblack", compression="zlib", ome=True,
                     metadata=metadata)


def read_instances(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an instance label map (16-bit PNG, TIFF or .npy) as int32, checked against ``shape``.

    Pixels are validated in the file's own dtype (no float32 or 16-bit conversion), so a 32-bit TIFF
    written by :func:`write_instances` reads back, and fractional or negative ids are reported as such.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        check_file(path)
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(path, f"cannot read .npy ({exc})") from None
    else:
        arr = _read_pixels(path)[0]
        if arr.ndim == 3:
            if arr.shape[2] != 1:
                raise InputError(path, f"instance map must have one channel, got {arr.shape[2]}")
            arr = arr[..., 0]
    instances = validate_instances(arr, shape, str(path))
    _note_binary_mask(instances, path)
    return instances


def read_class_map(path: str | os.PathLike) -> np.ndarray:
    """Read a class map (one class id per pixel: 8/16-bit PNG, TIFF) as int64. A palette PNG gives its indices,
    not its colours (label images are often saved with a palette to show the classes in colour); a grey map saved
    as RGB gives its one channel; colour images and fractional or negative values are refused."""
    path = Path(path)
    arr = _read_pixels(path, palette_indices=True)[0]
    if arr.ndim == 3:
        if arr.shape[2] > 1 and not (arr == arr[..., :1]).all():
            raise InputError(path, f"a class map holds one class id per pixel, this has {arr.shape[2]} different "
                                   f"channels (a colour image?)")
        arr = arr[..., 0]
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iub" or (arr.size and arr.min() < 0):
        raise InputError(path, "a class map holds non-negative whole class ids")
    return arr.astype(np.int64)


def _note_binary_mask(instances: np.ndarray, path: Path) -> None:
    """A 0/255 (or 0/1) foreground mask read as an instance map is one "nucleus" spread over the image; every
    metric then quietly scores one object. Several separate regions under a single id give it away."""
    ids = np.unique(instances)
    if len(ids) != 2 or ids[0] != 0:
        return
    from scipy import ndimage as ndi

    regions = ndi.label(instances > 0)[1]
    if regions >= 3:
        warnings.warn(f"{path}: one id ({ids[1]}) covers {regions} separate regions: a binary (semantic) mask, not an "
                      f"instance map? Give each nucleus its own id first (e.g. skimage.measure.label)",
                      stacklevel=_caller_stacklevel())


def write_instances(path: str | os.PathLike, instances: np.ndarray) -> Path:
    """Write an instance map: 16-bit PNG when ids fit, else 32-bit TIFF (the PNG name is then refused)."""
    instances = validate_instances(instances)
    path = Path(path)
    if instances.max(initial=0) > 65535:
        if path.suffix.lower() == ".png":
            raise InputError(path, f"{instances.max()} instances do not fit a 16-bit PNG; write a .tif instead")
        return write_image(path, instances.astype(np.uint32))
    return write_image(path, instances.astype(np.uint16))


def image_stem(path: str | os.PathLike) -> str:
    """The name outputs are written under: the file name without its image suffix (``slide.A.png`` →
    ``slide.A``, ``cells.ome.tif`` → ``cells``). Only the suffix goes, so names that differ after a dot keep
    their outputs apart."""
    name = Path(path).name
    lower = name.lower()
    for compound in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if lower.endswith(compound):
            return name[:-len(compound)]
    return Path(name).stem if Path(name).suffix else name


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
