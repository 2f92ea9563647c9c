"""Per-nucleus attributes of IVAAN supplement B.1, plus the standard morphology, for all nuclei of an image at once.

Every formula follows IVAAN (Jeong et al.), supplementary section B.1; the equation each column implements is
named next to it in :func:`measure_nuclei`. The implementation never loops over nuclei in Python: all
neighbourhood tests are gathers on the foreground pixels of a zero-padded label image, and all per-nucleus sums
are ``np.bincount`` calls, so time and memory grow linearly with the number of nucleus pixels.

Conventions (the paper leaves them open; chosen here and tested):

* Area ``A`` = pixel count; perimeter ``P`` = ``skimage.measure.perimeter(mask, 4)`` and convex hull area
  ``A_cvx`` = ``regionprops(...).area_convex`` (pixel count of scikit-image's convex hull image), both
  reproduced exactly without scikit-image; moments, eccentricity, axis lengths and orientation as
  ``skimage.measure.regionprops``.
* Erosions/dilations with a k×k rectangle centre the window as scikit-image/OpenCV do: rows and columns
  ``-(k//2) … k-1-k//2`` around the pixel. Pixels outside the image count as background, so a nucleus touching
  the border is eroded from that side too (such nuclei are flagged ``Flag.Truncated`` anyway).
* "Sufficiently large" for the 3×3 erosion ``M'`` (color_z, texture_z): ``A ≥ erode_min_area`` (30 px, a disk of
  diameter ≈ 6 px, which keeps ≈ 14 px after erosion) and the eroded mask is not empty; otherwise ``M' = M``.
* ``Var`` in t_raw is the population variance (ddof = 0), as is ``std`` in σ_c, σ_t (numpy's default).
* The z-score statistics μ, σ of an image are taken over its *valid* nuclei (not truncated, area ≥ 10) — the
  nuclei the paper keeps for its analysis — and applied to all nuclei (``zscore_population="all"`` uses every
  nucleus). An image with fewer than 2 valid nuclei uses all of its nuclei.
* An image with a single nucleus: σ = 0 + 1e-6, so color_z = texture_z = 0 exactly, and core_contrast_z, which
  would be Δ·10⁶, is NaN. core_contrast_z is also NaN when the core or rim is empty (paper: "omitted").
* ``round`` in k = clip(round(0.08·d_eq), 2, 6) is Python's round (half to even).
* Sobel magnitude = ``skimage.filters.sobel`` (kernels [1,2,1]/4 ⊗ [1,0,-1], ``sqrt((Gr² + Gc²)/2)``, mirrored
  edges) on the stain-normalised hematoxylin channel (or the grayscale intensity for 1-channel images).
* nn_dist_px uses the centroids of all nuclei of the image (truncated ones are still neighbours); NaN when the
  image has a single nucleus.
* aspect_ratio is NaN when the minor axis length is 0 (one-pixel-wide nuclei).

Images with one channel (fluorescence) have no stains: the "hematoxylin" channel is the intensity scaled to
[0, 1] on a scale fixed by the dtype (:func:`intensity_plane`; ``AttributeOptions.bits`` for 12-bit data in
uint16), or its darkness where the nuclei are clearly darker than their background (grey brightfield), and the
eosin and RGB means are NaN.

Marker images (multiplex or multi-channel fluorescence: 2 or more than 4 channels, or 3–4 channels whose names are
not R, G, B) are measured the same way on their *nuclear* channel (DAPI, Hoechst ... by name, or the one given),
and every channel adds ``Marker.<name>.Mean`` and ``Marker.<name>.Std``: the mean and (population) standard
deviation of its raw values over the nucleus mask, as QuPath's nucleus intensity measurements are (a repeated
channel name gets ``#2``, ``#3`` ..., see :func:`marker_column_names`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from karyo.attributes import names as N
from karyo.data.io import _caller_stacklevel, check_mpp, note_narrow_uint16, on_bit_range, to_rgb
from karyo.data.sample import (
    as_hwc,
    grey_fluorescence,
    is_marker_image,
    nuclear_channel_index,
    validate_instances,
)
from karyo.errors import InputError
from karyo.stain.macenko import MacenkoNormalizer

PAD = 3  # label-image padding: enough for k×k windows up to k = 7

# skimage.measure.perimeter weights of the 3×3 code 1 + 2·(4-neighbours) + 10·(diagonal neighbours).
_PERIM_WEIGHTS = np.zeros(50)
_PERIM_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_WEIGHTS[[21, 33]] = math.sqrt(2.0)
_PERIM_WEIGHTS[[13, 23]] = (1.0 + math.sqrt(2.0)) / 2.0


@dataclass(frozen=True)
class AttributeOptions:
    """Settings of :func:`measure_nuclei`; the defaults are IVAAN's (B.1) or documented choices."""

    min_area: int = 10  # B.1: "very small instances whose area is less than 10 pixels" are flagged
    erode_min_area: int = 30  # "sufficiently large" for M' = erode(M, 3×3)
    core_factor: float = 0.08  # k = clip(round(0.08·d_eq), 2, 6)
    core_k_min: int = 2
    core_k_max: int = 6
    sigma_eps: float = 1e-6  # σ = std + 1e-6
    zscore_population: str = "valid"  # "valid" or "all"
    bits: int | None = None  # a uint16 image's real bit depth (12 for 12-bit cameras); None: 16

    def __post_init__(self) -> None:
        if self.bits is not None and not 9 <= self.bits <= 16:
            raise ValueError(f"bits must be between 9 and 16 (the bits a 16-bit image really uses), got {self.bits}")
        if not 1 <= self.core_k_min <= self.core_k_max <= 2 * PAD + 1:
            raise ValueError(f"need 1 <= core_k_min <= core_k_max <= {2 * PAD + 1}")
        if self.zscore_population not in ("valid", "all"):
            raise ValueError("zscore_population must be 'valid' or 'all'")


_DEFAULT_OPTIONS = AttributeOptions()
_DEFAULT_NORMALIZER = MacenkoNormalizer()


def measure_nuclei(image: np.ndarray, instances: np.ndarray, classes: Mapping[int, int] | None = None, *,
                   class_names: Mapping[int, str] | None = None, normalizer: MacenkoNormalizer | None = None,
                   options: AttributeOptions | None = None, source: str | None = None,
                   channel_names: Sequence[str] | None = None, nuclear_channel: str | int | None = None,
                   mpp: float | None = None, bits: int | None = None) -> pd.DataFrame:
    """Measure every nucleus of ``instances`` (H×W labels, 0 = background) on ``image`` (H×W×C).

    Returns one row per instance, indexed by instance id, with the columns of
    :data:`karyo.attributes.names.ALL_COLUMNS` (and ``Class.Id``/``Class.Name`` when ``classes`` is given; with
    ``mpp``, µm per pixel, the µm twins of the lengths and areas: :func:`add_micron_columns`).
    An instance map without nuclei gives an empty table with the same columns. Stain normalisation uses
    ``normalizer`` (default: Macenko with the reference target). Marker images (``channel_names`` from the
    file; see the module docstring) are measured on their nuclear channel and add ``Marker.<name>.Mean/Std``.
    ``bits``: a uint16 image's real bit depth (12 for 12-bit camera data), as :func:`measure_arrays` takes it.
    """
    if classes is not None and not isinstance(classes, Mapping):
        raise InputError(source, f"classes must map each instance id to its class id (a dict such as {{1: 2}}), "
                                 f"got a {type(classes).__name__}")
    cols = measure_arrays(image, instances, normalizer=normalizer, options=options, source=source,
                          channel_names=channel_names, nuclear_channel=nuclear_channel, bits=bits)
    df = to_frame(cols, classes, class_names)
    if mpp is not None:
        add_micron_columns(df, check_mpp(mpp, source))
    return df


def to_frame(cols: dict[str, np.ndarray], classes: Mapping[int, int] | None = None,
             class_names: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Table from :func:`measure_arrays` output, indexed by instance id, with optional class columns."""
    df = pd.DataFrame(cols, columns=[*N.ALL_COLUMNS, *(c for c in cols if c not in N.ALL_COLUMNS)])
    df.index = pd.Index(df["Identifier.Label"].to_numpy(), name="instance_id")
    if classes is not None:
        add_classes(df, classes, class_names)
    return df


def add_micron_columns(df: pd.DataFrame, mpp: float | np.ndarray) -> None:
    """Add the µm counterparts (:data:`~karyo.attributes.names.MICRON_COLUMNS`) of the columns measured in px,
    each after its px column; ``mpp`` (µm per px) is one value or one per row (NaN where unknown)."""
    mpp = np.broadcast_to(np.asarray(mpp, dtype=np.float64), (len(df),))
    for column, micron in N.MICRON_COLUMNS.items():
        if column in df.columns and micron not in df.columns:
            values = df[column].to_numpy(dtype=np.float64) * mpp ** N.LENGTH_POWER[column]
            df.insert(df.columns.get_loc(column) + 1, micron, values)


def add_classes(df: pd.DataFrame, classes: Mapping[int, int], class_names: Mapping[int, str] | None) -> None:
    """Add ``Class.Id`` (0 = unclassified) and ``Class.Name`` columns from an instance → class mapping."""
    labels = df["Identifier.Label"].to_numpy()
    cid = np.array([int(classes.get(int(k), 0)) for k in labels], dtype=np.int32)
    df[N.CLASS_ID] = cid
    names = class_names or {}
    df[N.CLASS_NAME] = [names.get(int(c), f"class {c}") if c else "" for c in cid]


#: Column naming, for a marker image, the channel its intensity attributes (Color.*, Texture.*) come from.
NUCLEAR_CHANNEL = "Identifier.NuclearChannel"
def gray_stack_names(image: np.ndarray, channel_names, photometric: str | None):
    """The channel names to measure ``image`` with: its own, or ``Channel0..`` for an unnamed stack of gray TIFF
    pages (MINISBLACK), which the file says are not R, G, B; None otherwise."""
    if channel_names is None and photometric == "minisblack" and np.ndim(image) == 3 and image.shape[2] > 1:
        return tuple(f"Channel{c}" for c in range(image.shape[2]))
    return channel_names


def measure_arrays(image: np.ndarray, instances: np.ndarray, *, normalizer: MacenkoNormalizer | None = None,
                   options: AttributeOptions | None = None, source: str | None = None,
                   channel_names=None, nuclear_channel: str | int | None = None,
                   bits: int | None = None) -> dict[str, np.ndarray]:
    """Column name → array (one entry per nucleus, ascending instance id): the table of :func:`measure_nuclei`.
    Marker images (:func:`is_marker_image`, with ``channel_names`` from the file) get the marker columns too.
    ``bits``: a uint16 image holds ``bits``-bit data (12-bit cameras): its stain and intensity planes are read on
    that range (:func:`~karyo.data.io.on_bit_range`); the ``Marker.*`` columns stay raw values."""
    opts = options or _DEFAULT_OPTIONS
    image = as_hwc(image, source)
    labels = validate_instances(instances, image.shape[:2], source)
    if channel_names is not None and len(channel_names) != image.shape[2]:
        raise InputError(source, f"{len(channel_names)} channel names for an image with {image.shape[2]} channels")
    raw = image
    bits = bits if bits is not None else opts.bits
    if bits is not None:
        image = on_bit_range(image, bits, source)
    else:
        note_narrow_uint16(image, source)
    if is_marker_image(image.shape[2], channel_names) or nuclear_channel is not None:
        return _measure_markers(image, labels, channel_names, nuclear_channel, opts, source, raw)
    if image.dtype.kind == "f" and image.shape[2] >= 3:  # RGB as segment() reads it: [0, 1] (else refused), so
        from karyo.data.augment import prepare_image  # img / 255 measures as img does

        image = np.round(prepare_image(image, source) * 255.0).astype(np.uint8)
    if channel_names is None and grey_fluorescence(image):
        warnings.warn(f"{source or 'image'}: R, G and B are equal and the background is dark: measured as one "
                      f"fluorescence channel, not as H&E (save it as one channel to silence this)",
                      stacklevel=_caller_stacklevel())
        image = image[..., :1]
    if image.shape[2] >= 3:
        rgb = to_rgb(image)
        hema, eosin = (normalizer or _DEFAULT_NORMALIZER).stain_planes(rgb, source=source)
        return _measure(labels, rgb, hema, eosin, opts)
    plane = intensity_plane(image[..., 0])
    if channel_names is None and _darker_nuclei(plane, labels):
        warnings.warn(f"{source or 'image'}: one channel whose nuclei are darker than their background: measured as "
                      f"grey brightfield (darkness is the stain, as hematoxylin is in H&E), not as fluorescence; "
                      f"name the channel (e.g. an OME-TIFF's DAPI) or give --nuclear-channel to measure it as is",
                      stacklevel=_caller_stacklevel())
        plane = 1.0 - plane
    cols = _measure(labels, None, plane, None, opts)
    cols.update(_raw_channel_columns(raw[..., :1], labels, cols["Identifier.Label"],
                                     marker_column_names(channel_names, 1)))
    return cols


#: How much darker (as a fraction of the plane's 1st–99th percentile range, so a dim 12-bit file counts alike) the
#: nuclei's median must be than the background's for one channel to be read as brightfield: grey H&E nuclei are
#: about half the range darker; fluorescence nuclei are brighter.
BRIGHTFIELD_MARGIN = 0.15


def _darker_nuclei(plane: np.ndarray, labels: np.ndarray) -> bool:
    """Whether one channel shows dark nuclei on a bright background (grey brightfield, e.g. H&E saved as grey),
    so its stain is its darkness, rather than bright nuclei on black (fluorescence: the stain is the brightness)."""
    inside = labels > 0
    if not inside.any() or inside.all():
        return False
    lo, hi = np.percentile(plane, (1, 99))
    return bool(np.median(plane[inside]) < np.median(plane[~inside]) - BRIGHTFIELD_MARGIN * (hi - lo))


def intensity_plane(plane: np.ndarray) -> np.ndarray:
    """One channel as float32 in [0, 1] on a scale fixed by its dtype, so that files measure alike: 8-bit by 255,
    16-bit by 65535 (uint16 ``257 * v`` measures as uint8 ``v``; float32 keeps a dim stain's levels), float
    already in [0, 1] as it is; other floats (raw intensities of unknown range) are stretched between their 0.1
    and 99.9 percentiles."""
    plane = np.asarray(plane)
    if plane.dtype == np.uint8:
        return plane.astype(np.float32) / 255.0
    if plane.dtype == np.uint16:
        return plane.astype(np.float32) / 65535.0
    work = plane.astype(np.float32)
    if work.size and float(work.min()) >= 0.0 and float(work.max()) <= 1.0:
        return work
    lo, hi = np.percentile(work, (0.1, 99.9)) if work.size else (0.0, 1.0)
    if hi <= lo:
        return np.zeros_like(work)
    return np.clip((work - lo) / (hi - lo), 0.0, 1.0)


def marker_column_names(channel_names, n_channels: int) -> list[str]:
    """One distinct name per channel for its ``Marker.<name>.*`` columns: a blank name becomes ``Channel<c>`` and
    a repeated one gets ``#2``, ``#3`` ... (never a name another channel already has), so no column overwrites
    another."""
    given = [str(n).strip() for n in channel_names] if channel_names is not None else [""] * n_channels
    names = [n or f"Channel{c}" for c, n in enumerate(given)]
    taken: set[str] = set()
    out = []
    for name in names:
        unique, k = name, 1
        while unique in taken:
            k += 1
            unique = f"{name}#{k}"
        taken.add(unique)
        out.append(unique)
    return out


def _measure_markers(image: np.ndarray, labels: np.ndarray, channel_names, nuclear_channel, opts: AttributeOptions,
                     source: str | None, raw: np.ndarray) -> dict[str, np.ndarray]:
    n_channels = image.shape[2]
    k = nuclear_channel_index(channel_names, n_channels, nuclear_channel, source)
    nuclear = intensity_plane(image[..., k])
    cols = _measure(labels, None, nuclear, None, opts)
    ids = cols["Identifier.Label"]
    names = marker_column_names(channel_names, n_channels)
    cols[NUCLEAR_CHANNEL] = np.full(ids.size, names[k], dtype=object)  # what Color.*/Texture.* were measured on
    cols.update(_raw_channel_columns(raw, labels, ids, names))
    return cols


def _raw_channel_columns(image: np.ndarray, labels: np.ndarray, ids: np.ndarray, names: list[str]
                         ) -> dict[str, np.ndarray]:
    """``Marker.<name>.Mean/Std`` of each channel's raw values over each nucleus (as QuPath measures them)."""
    from scipy import ndimage as ndi

    cols = {}
    for c, name in enumerate(names):
        plane = image[..., c].astype(np.float64)
        if ids.size:
            mean = np.asarray(ndi.mean(plane, labels, ids), dtype=np.float64)
            sq = np.asarray(ndi.mean(plane * plane, labels, ids), dtype=np.float64)
            std = np.sqrt(np.maximum(sq - mean * mean, 0.0))
        else:
            mean = std = np.zeros(0, dtype=np.float64)
        cols[f"Marker.{name}.Mean"], cols[f"Marker.{name}.Std"] = mean, std
    return cols


def empty_columns() -> dict[str, np.ndarray]:
    """The columns of a table without nuclei (right names and dtypes, length 0)."""
    out = {c: np.zeros(0, dtype=np.float64) for c in N.ALL_COLUMNS}
    for c in N.IDENTIFIER_COLUMNS[:5]:
        out[c] = np.zeros(0, dtype=np.int64)
    for c in N.FLAG_COLUMNS:
        out[c] = np.zeros(0, dtype=bool)
    out["Size.Area"] = np.zeros(0, dtype=np.int64)
    return out


def _measure(labels: np.ndarray, rgb: np.ndarray | None, hema: np.ndarray, eosin: np.ndarray | None,
             opts: AttributeOptions) -> dict[str, np.ndarray]:
    height, width = labels.shape
    wp = width + 2 * PAD
    padded = np.zeros((height + 2 * PAD, wp), dtype=np.int32)
    padded[PAD:PAD + height, PAD:PAD + width] = labels
    pf = padded.ravel()
    fg = np.flatnonzero(pf != 0)
    if fg.size == 0:
        return empty_columns()
    lab = pf[fg]  # instance ids (raw) of the foreground pixels, raster order
    ids, li, to_index = _compact(lab)
    n = ids.size
    rows, cols = np.divmod(fg, wp)
    rows -= PAD
    cols -= PAD
    area = np.bincount(li, minlength=n)

    # Same-label tests against horizontal/vertical neighbours at distance 1..PAD.
    eq_h = {dx: pf[fg + dx] == lab for dx in range(-PAD, PAD + 1) if dx}
    eq_v1 = {dy: pf[fg + dy * wp] == lab for dy in (-1, 1)}

    # ---- row runs → per (label, row) extremes → bbox and convex hull area
    starts = ~eq_h[-1]
    ends = ~eq_h[1]
    order_s = np.argsort(li[starts], kind="stable")  # raster order inside a label: rows, then columns
    order_e = np.argsort(li[ends], kind="stable")
    s_li, s_row, s_col = li[starts][order_s], rows[starts][order_s], cols[starts][order_s]
    e_col = cols[ends][order_e]
    new_group = np.ones(s_li.size, dtype=bool)
    new_group[1:] = (s_li[1:] != s_li[:-1]) | (s_row[1:] != s_row[:-1])
    g_first = np.flatnonzero(new_group)
    g_last = np.r_[g_first[1:] - 1, s_li.size - 1]
    g_li, g_row, g_cmin, g_cmax = s_li[g_first], s_row[g_first], s_col[g_first], e_col[g_last]
    lab_first = np.flatnonzero(np.r_[True, g_li[1:] != g_li[:-1]])
    lab_last = np.r_[lab_first[1:] - 1, g_li.size - 1]
    rmin, rmax = g_row[lab_first], g_row[lab_last]
    cmin = np.minimum.reduceat(g_cmin, lab_first)
    cmax = np.maximum.reduceat(g_cmax, lab_first)
    area_convex = _convex_area(g_li, g_row, g_cmin, g_cmax, rmin, rmax, n)

    # ---- moments (local coordinates for precision), as skimage's inertia tensor
    rl = (rows - rmin[li]).astype(np.float64)
    cl = (cols - cmin[li]).astype(np.float64)
    af = area.astype(np.float64)
    mr = np.bincount(li, rl, n) / af
    mc = np.bincount(li, cl, n) / af
    var_r = np.maximum(np.bincount(li, rl * rl, n) / af - mr * mr, 0.0)
    var_c = np.maximum(np.bincount(li, cl * cl, n) / af - mc * mc, 0.0)
    cov = np.bincount(li, rl * cl, n) / af - mr * mc
    half_tr = (var_r + var_c) / 2.0
    disc = np.sqrt(((var_c - var_r) / 2.0) ** 2 + cov * cov)
    l1 = np.maximum(half_tr + disc, 0.0)
    l2 = np.maximum(half_tr - disc, 0.0)
    centroid_r = rmin + mr
    centroid_c = cmin + mc

    # ---- perimeter: skimage.measure.perimeter(mask, 4) of every label at once
    border4 = ~(eq_h[-1] & eq_h[1] & eq_v1[-1] & eq_v1[1])
    b4 = fg[border4]
    b4_lab = lab[border4]
    b4_img = np.zeros(pf.size, dtype=np.int32)
    b4_img[b4] = b4_lab
    code = np.ones(b4.size, dtype=np.int64)
    for off, weight in ((-1, 2), (1, 2), (-wp, 2), (wp, 2), (-wp - 1, 10), (-wp + 1, 10), (wp - 1, 10),
                        (wp + 1, 10)):
        code += weight * (b4_img[b4 + off] == b4_lab)
    perimeter = np.bincount(li[border4], _PERIM_WEIGHTS[code], n)

    # ---- erosions: 3×3 (M', band) and k×k per nucleus (core), separably on the label image
    d_eq = np.sqrt(4.0 * af / np.pi)  # B.1 eq. d_eq
    k_core = np.clip(np.rint(opts.core_factor * d_eq), opts.core_k_min, opts.core_k_max).astype(np.int64)
    ero3 = _erode(pf, fg, lab, eq_h, wp, 3)
    core = _erode(pf, fg, lab, eq_h, wp, k_core[li])

    # ---- intensities on the full mask
    uidx = rows * width + cols
    # channel padded like the label image (mirrored edges, as the Sobel filter needs)
    hp = np.pad(hema.astype(np.float32, copy=False), PAD, mode="symmetric").ravel()
    h_px = hp[fg].astype(np.float64)
    out_means: dict[str, np.ndarray] = {}
    if rgb is not None:
        px = rgb.reshape(-1, 3).take(uidx, axis=0).astype(np.float64)
        rgb_means = [np.bincount(li, px[:, ch], n) / af for ch in range(3)]
        out_means["Nucleus.Red.Mean"], out_means["Nucleus.Green.Mean"], out_means["Nucleus.Blue.Mean"] = rgb_means
        # luminance weights of skimage.color.rgb2gray
        out_means["Nucleus.Intensity.Mean"] = (0.2125 * rgb_means[0] + 0.7154 * rgb_means[1]
                                               + 0.0721 * rgb_means[2])
        out_means["Nucleus.Eosin.Mean"] = np.bincount(li, eosin.ravel()[uidx].astype(np.float64), n) / af
    else:
        out_means["Nucleus.Intensity.Mean"] = np.bincount(li, h_px, n) / af * 255.0
        for c in ("Nucleus.Red.Mean", "Nucleus.Green.Mean", "Nucleus.Blue.Mean", "Nucleus.Eosin.Mean"):
            out_means[c] = np.full(n, np.nan)
    out_means["Nucleus.Hematoxylin.Mean"] = np.bincount(li, h_px, n) / af

    # ---- c_raw, t_raw on M' (B.1 "Color and texture attributes")
    n_ero3 = np.bincount(li, ero3, n)
    use_ero = (area >= opts.erode_min_area) & (n_ero3 > 0)
    in_mp = ero3 | ~use_ero[li]
    li_mp, h_mp = li[in_mp], h_px[in_mp]
    n_mp = np.bincount(li_mp, minlength=n).astype(np.float64)
    c_raw = np.bincount(li_mp, h_mp, n) / n_mp
    dev = h_mp - c_raw[li_mp]
    t_raw = np.bincount(li_mp, dev * dev, n) / n_mp

    # ---- core / rim means (B.1 "Core–rim contrast attribute")
    n_core = np.bincount(li, core, n).astype(np.float64)
    s_core = np.bincount(li[core], h_px[core], n)
    n_rim = af - n_core
    s_rim = out_means["Nucleus.Hematoxylin.Mean"] * af - s_core
    ok_cr = (n_core > 0) & (n_rim > 0)
    delta_core = np.full(n, np.nan)
    delta_core[ok_cr] = s_core[ok_cr] / n_core[ok_cr] - s_rim[ok_cr] / n_rim[ok_cr]

    # ---- boundary band B = dilate(M) xor erode(M) (3×3) and Sobel magnitude on it
    grad_mean = _boundary_gradient(pf, fg, ero3, hp, height, width, wp, to_index, n)

    # ---- flags, z-scores, nearest neighbour
    truncated = (rmin == 0) | (cmin == 0) | (rmax == height - 1) | (cmax == width - 1)
    small = area < opts.min_area
    valid = ~truncated & ~small
    use_valid = opts.zscore_population == "valid" and np.count_nonzero(valid) >= 2
    pop = valid if use_valid else np.ones(n, dtype=bool)
    sd_c = float(np.std(c_raw[pop]))
    sigma_c = sd_c + opts.sigma_eps  # B.1 eq. σ_c
    sigma_t = float(np.std(t_raw[pop])) + opts.sigma_eps  # B.1 eq. σ_t
    color_z = (c_raw - float(np.mean(c_raw[pop]))) / sigma_c  # B.1 eq. color_z
    texture_z = (t_raw - float(np.mean(t_raw[pop]))) / sigma_t  # B.1 eq. texture_z
    core_z = delta_core / sigma_c if pop.sum() >= 2 else np.full(n, np.nan)  # B.1 eq. core_contrast_z

    major = 4.0 * np.sqrt(l1)
    minor = 4.0 * np.sqrt(l2)
    ecc = np.zeros(n)
    pos = l1 > 0
    ecc[pos] = np.sqrt(np.maximum(1.0 - l2[pos] / l1[pos], 0.0))
    aspect = np.full(n, np.nan)
    aspect[minor > 0] = major[minor > 0] / minor[minor > 0]  # B.1 eq. aspect_ratio
    bbox_area = ((rmax - rmin + 1) * (cmax - cmin + 1)).astype(np.float64)

    return {
        "Identifier.Label": ids.astype(np.int64),
        "Identifier.Xmin": cmin.astype(np.int64),
        "Identifier.Ymin": rmin.astype(np.int64),
        "Identifier.Xmax": (cmax + 1).astype(np.int64),
        "Identifier.Ymax": (rmax + 1).astype(np.int64),
        "Identifier.CentroidX": centroid_c,
        "Identifier.CentroidY": centroid_r,
        "Size.Area": area.astype(np.int64),
        "Size.Perimeter": perimeter,
        "Size.ConvexHullArea": area_convex.astype(np.float64),
        "Size.MajorAxisLength": major,
        "Size.MinorAxisLength": minor,
        "Size.EquivalentDiameter": d_eq,  # B.1 eq. d_eq = sqrt(4A/π)
        "Shape.Solidity": af / np.maximum(area_convex, 1e-6),  # B.1 eq. solidity
        "Shape.PerimeterRatio": perimeter / (2.0 * np.pi * (d_eq / 2.0)),  # B.1 eq. perim_ratio
        "Shape.Eccentricity": ecc,  # B.1 "Eccentricity (shape)", as skimage
        "Shape.Extent": af / bbox_area,  # B.1 eq. extent
        "Shape.AspectRatio": aspect,
        "Orientation.Orientation": _orientation(var_c, -cov, var_r),
        **{c: out_means[c] for c in N.INTENSITY_COLUMNS},
        "Color.HematoxylinRaw": c_raw,
        "Texture.HematoxylinVarianceRaw": t_raw,
        "Color.HematoxylinZ": color_z,
        "Texture.HematoxylinVarianceZ": texture_z,
        "Color.CoreRimContrastZ": core_z,
        "Boundary.GradientMean": grad_mean,  # B.1 eq. boundary_grad_mean
        "Density.NearestNeighborDistance": nearest_neighbour_distance(centroid_c, centroid_r),  # B.1 nn_dist_px
        "Flag.Truncated": truncated,
        "Flag.Small": small,
        "Flag.Valid": valid,
    }


def _compact(lab: np.ndarray):
    """Sorted distinct ids, each pixel's index into them, and an id → index mapping function.

    Dense ids use a lookup table; huge sparse ids (table larger than 4× the pixel count) use np.unique, so
    memory stays linear in the nucleus pixels.
    """
    top = int(lab.max())
    if top <= 4 * lab.size + 1024:
        present = np.bincount(lab, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        remap = np.zeros(top + 1, dtype=np.int64)
        remap[ids] = np.arange(ids.size)
        return ids, remap[lab], remap.__getitem__
    ids, inv = np.unique(lab, return_inverse=True)
    return ids, inv.astype(np.int64), lambda x: np.searchsorted(ids, x)


def _erode(pf: np.ndarray, fg: np.ndarray, lab: np.ndarray, eq_h: dict[int, np.ndarray], wp: int,
           k: np.ndarray | int) -> np.ndarray:
    """Per-pixel k×k rectangular erosion membership (window rows/cols −(k//2) … k−1−k//2), separably.

    ``k`` is one size for all pixels or one per pixel (the size of the pixel's nucleus).
    """
    lo = k // 2  # reach to the left / top
    hi = k - 1 - lo  # reach to the right / bottom
    reach = int(max(np.max(lo), np.max(hi)))
    size = fg.size
    left = np.ones((reach + 1, size), dtype=bool)
    right = np.ones((reach + 1, size), dtype=bool)
    for m in range(1, reach + 1):
        np.logical_and(left[m - 1], eq_h[-m], out=left[m])
        np.logical_and(right[m - 1], eq_h[m], out=right[m])
    scalar = np.ndim(k) == 0
    idx = None if scalar else np.arange(size)
    if scalar:
        horiz = left[lo] & right[hi]
    else:
        horiz = left.reshape(-1)[lo * size + idx] & right.reshape(-1)[hi * size + idx]
    h_img = np.zeros(pf.size, dtype=np.int32)
    h_img[fg] = np.where(horiz, lab, 0)
    up = np.ones((reach + 1, size), dtype=bool)
    down = np.ones((reach + 1, size), dtype=bool)
    for m in range(1, reach + 1):
        np.logical_and(up[m - 1], h_img[fg - m * wp] == lab, out=up[m])
        np.logical_and(down[m - 1], h_img[fg + m * wp] == lab, out=down[m])
    if scalar:
        return horiz & up[lo] & down[hi]
    return horiz & up.reshape(-1)[lo * size + idx] & down.reshape(-1)[hi * size + idx]


def _convex_area(g_li: np.ndarray, g_row: np.ndarray, g_cmin: np.ndarray, g_cmax: np.ndarray, rmin: np.ndarray,
                 rmax: np.ndarray, n: int) -> np.ndarray:
    """Pixel count of ``skimage.morphology.convex_hull_image`` for every label, without building hull images.

    scikit-image takes the hull of the pixels' edge midpoints (pixel ⊕ diamond of radius ½) and counts the pixel
    centres inside or on it. The hull of the centres is bounded left/right by the lower convex envelope of the
    per-row minima and the upper concave envelope of the per-row maxima; adding the diamond widens each row y to
    ``[min(xl(y) − ½, (xl(y) + xl(y±1))/2), max(xr(y) + ½, (xr(y) + xr(y±1))/2)]``.
    """
    # left envelope of labels 0..n-1 and (negated) right envelope as labels n..2n-1, in one pass
    both = _envelope_rows(np.r_[g_li, g_li + n], np.r_[g_row, g_row],
                          np.r_[g_cmin.astype(np.int64), -g_cmax.astype(np.int64)],
                          np.r_[rmin, rmin], np.r_[rmax, rmax], 2 * n)
    heights = rmax - rmin + 1
    xl, xr = both[:both.size // 2], -both[both.size // 2:]
    q_li = np.repeat(np.arange(n), heights)
    first = np.r_[0, np.cumsum(heights)[:-1]]
    is_first = np.zeros(q_li.size, dtype=bool)
    is_first[first] = True
    is_last = np.zeros(q_li.size, dtype=bool)
    is_last[first + heights - 1] = True
    left = xl - 0.5
    right = xr + 0.5
    prev_l = np.r_[xl[:1], xl[:-1]]
    next_l = np.r_[xl[1:], xl[-1:]]
    prev_r = np.r_[xr[:1], xr[:-1]]
    next_r = np.r_[xr[1:], xr[-1:]]
    left = np.minimum(left, np.where(is_first, np.inf, (xl + prev_l) / 2.0))
    left = np.minimum(left, np.where(is_last, np.inf, (xl + next_l) / 2.0))
    right = np.maximum(right, np.where(is_first, -np.inf, (xr + prev_r) / 2.0))
    right = np.maximum(right, np.where(is_last, -np.inf, (xr + next_r) / 2.0))
    counts = np.floor(right + 1e-9) - np.ceil(left - 1e-9) + 1.0
    return np.bincount(q_li, counts, n)


def _envelope_rows(g_li: np.ndarray, g_row: np.ndarray, g_x: np.ndarray, rmin: np.ndarray, rmax: np.ndarray,
                   n: int) -> np.ndarray:
    """Lower convex envelope of x(row) per label, evaluated on every row rmin..rmax (concatenated)."""
    keep = np.arange(g_li.size)
    while True:
        k_li = g_li[keep]
        inner = np.zeros(keep.size, dtype=bool)
        inner[1:-1] = (k_li[1:-1] == k_li[:-2]) & (k_li[1:-1] == k_li[2:])
        if not inner.any():
            break
        i = np.flatnonzero(inner)
        p, q, s = keep[i - 1], keep[i], keep[i + 1]
        # q is dropped when it lies on or above the chord p–s (exact integer test)
        drop = (g_x[q] - g_x[p]) * (g_row[s] - g_row[p]) >= (g_x[s] - g_x[p]) * (g_row[q] - g_row[p])
        if not drop.any():
            break
        mask = np.ones(keep.size, dtype=bool)
        mask[i[drop]] = False
        keep = keep[mask]
    v_li, v_row, v_x = g_li[keep], g_row[keep].astype(np.int64), g_x[keep].astype(np.float64)
    heights = rmax - rmin + 1
    q_li = np.repeat(np.arange(n), heights)
    q_row = rmin[q_li] + (np.arange(q_li.size) - np.repeat(np.r_[0, np.cumsum(heights)[:-1]], heights))
    span = int(rmax.max()) + 2
    v_key = v_li.astype(np.int64) * span + v_row
    q_key = q_li.astype(np.int64) * span + q_row
    j = np.searchsorted(v_key, q_key, side="right") - 1  # vertex at or above the row
    j_next = np.minimum(j + 1, v_key.size - 1)
    same = v_li[j_next] == q_li
    exact = v_row[j] == q_row
    x = v_x[j].copy()
    interp = ~exact & same
    t = (q_row[interp] - v_row[j[interp]]) / (v_row[j_next[interp]] - v_row[j[interp]])
    x[interp] = v_x[j[interp]] + (v_x[j_next[interp]] - v_x[j[interp]]) * t
    return x


def _boundary_gradient(pf: np.ndarray, fg: np.ndarray, ero3: np.ndarray, hp: np.ndarray, height: int,
                       width: int, wp: int, to_index, n: int) -> np.ndarray:
    """Mean Sobel magnitude over B = dilate(M, 3×3) xor erode(M, 3×3) for every nucleus (B.1 boundary_grad_mean).

    A pixel q belongs to B of nucleus l iff l occurs in q's 3×3 window and q is not in erode(M_l); pixels in the
    3×3 erosion of a nucleus have only that nucleus in their window, so they are skipped, and every other pixel
    is credited to each distinct label of its window. ``hp`` is the channel padded like the label image.
    """
    offsets = np.array([dy * wp + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    mark = np.zeros(pf.size, dtype=bool)
    edge = fg[~ero3]
    for off in offsets:
        mark[edge + off] = True
    mark[fg[ero3]] = False
    mark2 = mark.reshape(-1, wp)
    mark2[:PAD] = False
    mark2[PAD + height:] = False
    mark2[:, :PAD] = False
    mark2[:, PAD + width:] = False
    q = np.flatnonzero(mark)
    win = np.empty((offsets.size, q.size), dtype=np.int32)  # 9 × |Q| window labels
    for i, off in enumerate(offsets):
        np.take(pf, q + off, out=win[i])
    top = win.max(axis=0)
    low = ((win.view(np.uint32) - np.uint32(1)).min(axis=0) + np.uint32(1)).view(np.int32)  # min nonzero
    two = np.flatnonzero(low != top)
    # a third distinct label (a pixel where three nuclei meet) is rare: find those pixels exactly
    w2 = win[:, two]
    more = two[((w2 != top[two]) & (w2 != low[two]) & (w2 > 0)).any(axis=0)]
    extra_q, extra_lab = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    if more.size:
        w3 = np.sort(win[:, more], axis=0)
        keep = (w3[1:] != w3[:-1]) & (w3[1:] != top[more]) & (w3[1:] != low[more]) & (w3[1:] > 0)
        which, cols_ = np.nonzero(keep)
        extra_q, extra_lab = more[cols_], w3[1:][which, cols_]
    # Sobel magnitude as skimage.filters.sobel: kernels [1, 2, 1]/4 ⊗ [1, 0, -1], sqrt((Gr² + Gc²) / 2).
    nw, nn_, ne = hp[q - wp - 1], hp[q - wp], hp[q - wp + 1]
    sw, ss, se = hp[q + wp - 1], hp[q + wp], hp[q + wp + 1]
    g_row = ((nw + 2.0 * nn_ + ne) - (sw + 2.0 * ss + se)).astype(np.float64)
    g_col = ((nw + 2.0 * hp[q - 1] + sw) - (ne + 2.0 * hp[q + 1] + se)).astype(np.float64)
    grad = np.sqrt((g_row * g_row + g_col * g_col) / 32.0)
    pair_q = np.concatenate([np.arange(q.size), two, extra_q])
    pos = to_index(np.concatenate([top, low[two], extra_lab]))
    total = np.bincount(pos, grad[pair_q], n)
    count = np.bincount(pos, minlength=n).astype(np.float64)
    out = np.full(n, np.nan)
    ok = count > 0
    out[ok] = total[ok] / count[ok]
    return out


def _orientation(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """skimage's regionprops orientation from the inertia tensor [[a, b], [b, c]]."""
    out = 0.5 * np.arctan2(-2.0 * b, c - a)
    tie = np.abs(a - c) <= 1e-12 * np.maximum(a + c, 1e-300)
    out[tie] = np.where(b[tie] < 0, np.pi / 4.0, -np.pi / 4.0)
    return out


def nearest_neighbour_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from each point to the nearest other point (B.1 nn_dist_px); NaN for a lone point."""
    n = x.size
    if n < 2:
        return np.full(n, np.nan)
    if n <= 256:
        d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
        np.fill_diagonal(d2, np.inf)
        return np.sqrt(d2.min(axis=1))
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    return dist[:, 1]
