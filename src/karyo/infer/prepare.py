"""From a user's image to a model's input tensor and back: one place for channel checks, normalisation,
resampling to the model's pixel size and padding, shared by every learned model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from karyo.data.augment import prepare_image
from karyo.data.io import check_mpp, note_narrow_uint16
from karyo.data.sample import as_hwc, grey_fluorescence, is_marker_image
from karyo.errors import InputError

if TYPE_CHECKING:
    from karyo.models.adapter import AdapterConfig

#: Pixel sizes within this relative difference of the model's are not resampled (resampling blurs).
MPP_TOLERANCE = 0.05


def model_input(image: np.ndarray, in_chans: int, mean: Sequence[float], std: Sequence[float],
                source: str | None = None, *, adapter: AdapterConfig | None = None,
                channel_names: Sequence[str] | None = None) -> torch.Tensor:
    """H×W×C image (uint8, uint16 or float in [0, 1]) → normalised 1×C×H×W float32 tensor.

    A grayscale image given to an RGB model is repeated over R, G and B; an RGBA one loses alpha; any other
    channel mismatch is an error naming the image. With an ``adapter`` (:mod:`karyo.models.adapter`) the image's
    channels (named ``channel_names`` when known) are mapped onto the adapter's N by its channel-invariance rule
    and normalised with the adapter's statistics; channels the image lacks come out as NaN, which the adapter
    fills (``in_chans``/``mean``/``std`` then describe the backbone and are not used).
    """
    if adapter is not None:
        return _adapter_input(image, adapter, channel_names, source)
    image = as_hwc(image, source)
    if in_chans == 3 and channel_names and image.shape[2] in (3, 4) and is_marker_image(image.shape[2], channel_names):
        warnings.warn(f"{source or 'image'}: its channels are named {', '.join(map(str, channel_names))}, but this "
                      f"model reads RGB H&E, so they are taken as R, G and B; markers need a model trained on "
                      f"them (`karyo train` with --channels)", stacklevel=3)
    fluorescence = None
    if in_chans == 3 and image.shape[2] == 1:
        fluorescence = "one channel given to a model trained on RGB H&E"
    elif in_chans == 3 and not channel_names and grey_fluorescence(image):
        fluorescence = "R, G and B are equal on a dark background (fluorescence saved as RGB?), but this model was " \
                       "trained on RGB H&E"
    if fluorescence:
        warnings.warn(f"{source or 'image'}: {fluorescence}; it is read as a gray H&E image and many nuclei may be "
                      f"missed. For fluorescence use `--model classical` (bright nuclei on one channel) or a model "
                      f"trained on it (`karyo train` with a channel adapter)", stacklevel=3)
    if in_chans == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif in_chans == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] != in_chans:
        n = image.shape[2]
        picked = ",".join(map(str, range(in_chans)))
        fix = (f"a fluorescence or multiplex image wants the classical model (--model classical; it reads the "
               f"nuclear channel) or one trained on its channels (karyo train ... --channels); to give this one "
               f"{in_chans} of them anyway: --channels {picked} (or names; in Python image[..., [{picked}]])"
               if n > in_chans else
               "give it one channel to read as gray (--channels 0; in Python image[..., :1]), or for fluorescence "
               "use the classical model (--model classical; karyo.load(\"classical\")) or one trained on such images")
        raise InputError(source, f"this model takes {in_chans}-channel images, got {n} channels; {fix}")
    note_narrow_uint16(image, source)
    x = prepare_image(image, source)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def _adapter_input(image: np.ndarray, adapter: AdapterConfig, channel_names: Sequence[str] | None,
                   source: str | None) -> torch.Tensor:
    from karyo.models.adapter import map_channels

    image = as_hwc(image, source)
    image, present = map_channels(image, adapter, channel_names, source)
    note_narrow_uint16(image, source)
    x = prepare_image(image, source)
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    x = (x - np.asarray(adapter.pixel_mean, np.float32)) / np.asarray(adapter.pixel_std, np.float32)
    x[..., ~present] = np.nan  # missing channels: filled inside the adapter by its rule
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def select_channels(image: np.ndarray, names: Sequence[str] | None, spec: str | Sequence[str | int],
                    source: str | None = None) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """The channels of an H×W×C image picked by ``spec`` (``"DAPI,CD45"`` or a list), in that order, with their
    names: each item is a channel name (case-insensitive, from the file's OME metadata) or else a 0-based index.
    Returns (H×W×K image, K names, or None when the image has no names)."""
    image = as_hwc(image, source)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if not items:
        raise InputError(source, "no channel selected (--channels takes names or 0-based indices, comma-separated)")
    c = image.shape[2]
    keys = {str(n).strip().casefold(): i for i, n in reversed(list(enumerate(names or ())))}
    picked = []
    for item in items:
        if item.casefold() in keys:
            picked.append(keys[item.casefold()])
        elif item.lstrip("-").isdigit() and -c <= int(item) < c:
            picked.append(int(item) % c)
        else:
            known = f"names {list(names)}" if names else "no channel names"
            raise InputError(source, f"channel {item!r} not found: the image has {c} channel(s) and {known}; "
                                     f"give names or 0-based indices")
    twice = sorted({items[k] for k, i in enumerate(picked) if picked.count(i) > 1})
    if twice:
        raise InputError(source, f"channel(s) {', '.join(twice)} selected more than once; select each channel once")
    sel = np.ascontiguousarray(image[..., picked])
    return sel, (tuple(str(names[i]) for i in picked) if names else None)


def check_points(points: Sequence[tuple[float, float]] | np.ndarray | None, shape: tuple[int, ...],
                 source: str | os.PathLike | None = None, what: str = "point") -> np.ndarray | None:
    """User prompts as an N×2 float array of (x, y) pixel indices, checked against an image of ``shape`` (H, W, ...).

    A point off the image would still prompt a mask (a phantom nucleus at the border), and two identical points
    on one nucleus make each the other's negative (the nucleus is cut in two), so both are errors naming
    ``source``, as are non-finite coordinates."""
    if points is None:
        return None
    xy = np.asarray(list(points) if not isinstance(points, np.ndarray) else points, dtype=np.float64)
    if xy.size == 0:
        return xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise InputError(source, f"{what}s must be (x, y) pairs, got an array of shape {xy.shape}")
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise InputError(source, f"{what} {int(np.argmax(bad))} (0-based) has a missing or non-finite coordinate")
    h, w = int(shape[0]), int(shape[1])
    off = (xy[:, 0] < -0.5) | (xy[:, 0] > w - 0.5) | (xy[:, 1] < -0.5) | (xy[:, 1] > h - 0.5)
    if off.any():
        i = int(np.argmax(off))
        raise InputError(source, f"{what} {i} ({xy[i, 0]:g}, {xy[i, 1]:g}) lies outside the {w}×{h} image "
                                 f"(x in 0..{w - 1}, y in 0..{h - 1})")
    _, first, counts = np.unique(xy, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = int(first[np.argmax(counts > 1)])
        raise InputError(source, f"{what} ({xy[i, 0]:g}, {xy[i, 1]:g}) is given {int(counts[first == i][0])} times; "
                                 f"give each nucleus one point")
    return xy


#: Clicks closer than this (µm) are one nucleus clicked twice: no two nuclei have centres so close.
DOUBLE_CLICK_UM = 1.0


def check_prompts(points, negative, shape: tuple[int, ...], source: str | os.PathLike | None = None,
                  min_separation_px: float = 0.0) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`check_points` of a model's positive and negative prompts, as every promptable ``segment`` takes them.
    Positive points closer than ``min_separation_px`` (:data:`DOUBLE_CLICK_UM` at the image's resolution) are one
    nucleus clicked twice: each would be cut by or compete with the other, so they are refused, as is a negative
    point that close to a positive one."""
    points, negative = check_points(points, shape, source), check_points(negative, shape, source, "negative point")
    if points is not None and len(points) == 0 and negative is not None and len(negative):
        points = None  # no clicks, only negatives: the automatic result without the nuclei under them
    elif points is not None and len(points) == 0:
        warnings.warn(f"{f'{source}: ' if source else ''}points is empty: no nucleus is asked for, so none is "
                      f"returned (points=None segments every nucleus)", stacklevel=3)
    if min_separation_px > 0 and points is not None and len(points):
        from scipy.spatial import cKDTree

        tree = cKDTree(points)
        pairs = tree.query_pairs(min_separation_px, output_type="ndarray")
        if len(pairs):
            i, j = sorted(pairs[0].tolist())
            a, b = points[i], points[j]
            raise InputError(source, f"points {i} ({a[0]:g}, {a[1]:g}) and {j} ({b[0]:g}, {b[1]:g}) are "
                                     f"{np.hypot(*(a - b)):.3g} px apart: one nucleus clicked twice? Give each "
                                     f"nucleus one point")
        if negative is not None and len(negative):
            dist, near = tree.query(negative)
            if (dist < min_separation_px).any():
                k = int(np.argmax(dist < min_separation_px))
                raise InputError(source, f"negative point {k} ({negative[k, 0]:g}, {negative[k, 1]:g}) lies "
                                         f"{dist[k]:.3g} px from point {int(near[k])}: a place cannot be both the "
                                         f"nucleus and not it")
    return points, negative


def double_click_px(mpp: float | None, model_mpp: float) -> float:
    """:data:`DOUBLE_CLICK_UM` in the image's pixels (at the model's µm/px when the image's is unknown)."""
    return DOUBLE_CLICK_UM / float(mpp or model_mpp)


#: The most pixels an image may have once resampled to a model's µm/px; larger ones belong to ``karyo wsi``.
MAX_RESAMPLED_PIXELS = 10_000 * 10_000


def resample_to_model(x: torch.Tensor, mpp: float | None, model_mpp: float, source: str | None = None
                      ) -> tuple[torch.Tensor, float]:
    """Resample a 1×C×H×W input to the model's µm/px; returns it and the scale applied (1.0 when the pixel
    sizes agree within :data:`MPP_TOLERANCE` or ``mpp`` is unknown). An ``mpp`` outside
    :data:`karyo.data.io.MPP_RANGE` is refused rather than ignored or obeyed: a negative or mistyped value
    (µm for mm) would otherwise give a silently wrong or an out-of-memory run."""
    mpp = check_mpp(mpp, source)
    if mpp is None:
        return x, 1.0
    scale = mpp / float(model_mpp)
    if abs(scale - 1.0) <= MPP_TOLERANCE:
        return x, 1.0
    h, w = (round(n * scale) for n in x.shape[2:])
    if h * w > MAX_RESAMPLED_PIXELS:
        raise InputError(source, f"at {mpp:g} µm/px this {x.shape[3]}×{x.shape[2]} image becomes {w}×{h} pixels at "
                                 f"the model's {model_mpp:g} µm/px; segment it with `karyo wsi`, which tiles it")
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1), scale


def pad_input(x: torch.Tensor, multiple: int = 32, min_size: int = 0) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple`` and at least ``min_size``, by reflection (repeated where the
    padding is wider than the image). Tissue, not a flat colour: padded with the mean colour, a 128-px tile at the
    256-px model tile lost half its nuclei (validation images cut to 128 px: PQ 0.206 against 0.433 reflected;
    to 64 px 0.164 against 0.416; docs/benchmarks.md)."""
    h, w = x.shape[2:]
    ph, pw = max(h, min_size), max(w, min_size)
    ph, pw = ph + (-ph) % multiple, pw + (-pw) % multiple
    if (ph, pw) == (h, w):
        return x
    if pw - w < w and ph - h < h:
        return F.pad(x, (0, pw - w, 0, ph - h), mode="reflect")
    padded = np.pad(x.detach().cpu().numpy(), ((0, 0), (0, 0), (0, ph - h), (0, pw - w)), mode="reflect")
    return torch.from_numpy(padded).to(x.device)


def resize_instances(instances: np.ndarray, shape: tuple[int, int], *per_instance: dict[int, Any]
                     ) -> tuple[np.ndarray, ...]:
    """:func:`resize_labels` of an instance map, and each per-instance dict (classes, scores ...) without the
    instances that vanished in the resize (small nuclei can). Shrinking a map by nearest neighbour can cut a
    thin neck of a nucleus, which would leave it in pieces (a MultiPolygon in QuPath): only each nucleus'
    largest piece is kept."""
    from karyo.infer.assemble import largest_piece

    if instances.shape == tuple(shape):
        return (instances, *per_instance)
    shrinking = shape[0] < instances.shape[0] or shape[1] < instances.shape[1]
    instances = resize_labels(instances, shape)
    if shrinking:
        instances = largest_piece(instances)
    present = set(np.unique(instances).tolist())
    return (instances, *({k: v for k, v in d.items() if k in present} for d in per_instance))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map back to the image's own size."""
    if labels.shape == tuple(shape):
        return labels
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(labels.dtype)
