"""Channel adapters in training: ``--channels`` parsing, an adapter added to any network config that takes one,
and the training data brought onto the adapter's channels by its channel-invariance rule (the stain-agnostic issue;
:mod:`karyo.models.adapter` has the rule and the module). Shared by every task of :data:`karyo.train.api.CHANNEL_TASKS`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from karyo.data.augment import IMAGENET_MEAN, AugmentConfig, prepare_image
from karyo.data.sample import Sample, is_marker_image
from karyo.errors import InputError
from karyo.models.adapter import AdapterConfig, channel_key, map_channels, plan_channels

log = logging.getLogger(__name__)

__all__ = ["adapt_training_data", "channel_summary", "channels_from_data", "check_channels_in_data",
           "describe_channels", "fit_channel_stats", "map_samples", "mark_missing", "parse_channels", "with_adapter"]


def parse_channels(spec: str | int | Sequence[str] | None) -> int | tuple[str, ...] | None:
    """``--channels`` of ``karyo train``: ``"8"`` / 8 → 8 unnamed channels; ``"DAPI,CD45"`` → those names."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return _count(spec)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    items = [s for s in items if s]
    if len(items) == 1 and items[0].isdigit():
        return _count(int(items[0]))
    if not items:
        raise InputError(None, "--channels needs a channel count or comma-separated channel names")
    keys = [channel_key(s) for s in items]
    twice = list(dict.fromkeys(s for s, k in zip(items, keys, strict=True) if keys.count(k) > 1))
    if twice:
        raise InputError(None, f"--channels {','.join(items)}: {', '.join(twice)} given more than once (channel names "
                               f"are compared ignoring case and spaces)")
    return tuple(items)


def _count(n: int) -> int:
    if isinstance(n, bool) or n < 1:
        raise InputError(None, f"--channels {n}: need at least one channel (a channel count >= 1 or channel names)")
    return n


def with_adapter(config: Any, channels: int | Sequence[str] | None, augment: AugmentConfig | None = None) -> Any:
    """A network config (any dataclass with ``adapter``, ``in_chans``, ``pixel_mean``, ``pixel_std``: CellViT,
    prompter, segmentor, MONCH) with an adapter for ``channels`` (keeping the other settings of an adapter it
    already has) and the pixel statistics the training data will be normalised with (``augment``)."""
    adapter = config.adapter
    if channels is not None:
        base = dataclasses.asdict(adapter) if adapter is not None else {}
        for k in ("in_channels", "channel_names", "pixel_mean", "pixel_std"):
            base.pop(k, None)
        adapter = AdapterConfig.for_channels(channels if isinstance(channels, int) else tuple(channels), **base)
    if augment is not None:
        if adapter is not None:
            mean, std = _stats(augment, adapter.in_channels)
            adapter = dataclasses.replace(adapter, pixel_mean=mean, pixel_std=std)
        if adapter is None or len(augment.mean) == config.in_chans:  # else the statistics are the adapter's
            mean, std = _stats(augment, config.in_chans)
            config = dataclasses.replace(config, pixel_mean=mean, pixel_std=std)
    return dataclasses.replace(config, adapter=adapter)


def _stats(augment: AugmentConfig, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if not augment.normalize:
        return (0.0,) * n, (1.0,) * n
    mean, std = augment.channel_stats(n)
    return tuple(mean), tuple(std)


def map_samples(samples: Sequence[Sample], adapter: AdapterConfig | None, in_chans: int = 3, *,
                adapter_possible: bool = True) -> tuple[list[Sample], np.ndarray | None]:
    """Samples brought to the adapter's channels by its rule (in memory; missing channels hold 0 and are marked
    in the returned S×N ``present`` table). Without an adapter the samples must already have ``in_chans``; the
    error then points to ``--channels``, or (``adapter_possible`` false: a network without adapters) to
    ``model.in_chans``."""
    out: list[Sample] = []
    if adapter is None:
        for s in samples:
            n = s.image.shape[2]
            if n != in_chans:
                spec = ",".join(map(str, s.channel_names)) if s.channel_names else n
                fix = (f"give it a channel adapter (--channels {spec})" if adapter_possible
                       else f"set 'model: {{in_chans: {n}}}' in the config (this network takes no --channels)")
                raise InputError(s.source or s.name, f"has {n} channels, the model takes {in_chans}: {fix}")
            out.append(s)
        return out, None
    present = np.ones((len(samples), adapter.in_channels), bool)
    names = adapter.channel_names or None
    for i, s in enumerate(samples):
        n = s.image.shape[2]
        if names and not s.channel_names and n != len(names):
            raise InputError(s.source or s.name, f"its {n} channel(s) have no names, so they cannot be matched to "
                                                 f"the adapter's {', '.join(names)} (they would be pooled into every "
                                                 f"one of them); name them (OME-TIFF channel names) or train with "
                                                 f"--channels {n}")
        image, present[i] = map_channels(s.image, adapter, s.channel_names, s.source or s.name, warn=False)
        out.append(dataclasses.replace(s, image=image, channel_names=names))
    if not present.all():
        log.info("%d of %d samples lack some adapter channels (filled by the '%s' rule)",
                 int((~present).any(1).sum()), len(samples), adapter.missing)
    return out, present


def fit_channel_stats(augment: AugmentConfig, samples: Sequence[Sample], present: np.ndarray | None = None,
                      percentiles: tuple[float, float] = (1.0, 99.0), max_pixels: int = 1_000_000) -> AugmentConfig:
    """``augment`` with per-channel statistics from the training images, unless the config sets its own (one value
    for all channels, or one per channel other than the ImageNet defaults): each channel's 1st–99th percentile
    range of the training pixels is mapped to [−1, 1] (mean = mid-range, std = half-range). The ImageNet defaults
    are replaced even for exactly 3 channels: behind an adapter they may be three markers, not R, G and B.

    Why: the fixed 0.5/0.5 fallback leaves a dim stain or marker channel (hematoxylin optical density, a sparse
    fluorescence marker) squeezed into a small part of [−1, 1] next to full-range channels. Percentiles, not
    mean/std, because fluorescence is heavy-tailed (DSB2018: mean 0.036, std 0.035 puts nuclei at z ≈ 10–25) —
    the dataset-level analogue of the per-image percentile normalisation of StarDist and Cellpose; a channel
    spanning 0..1 keeps exactly the 0.5/0.5 of the fallback. Opt-in (``AugmentConfig.fit_stats``): on DSB2018
    (one bright channel) short runs scored lower with it (docs/benchmarks.md, stain-agnostic section). Pixels are
    scaled as the pipeline scales them (uint8 / 255, other integers / dtype max) and subsampled on a grid to about
    ``max_pixels`` per channel; channels a sample lacks (``present`` False) do not count. The model stores the
    statistics, so inference needs no data.
    """
    if not (augment.normalize and augment.fit_stats and samples):
        return augment
    n = samples[0].image.shape[2]
    if len(augment.mean) == 1 or (len(augment.mean) == n and tuple(augment.mean) != tuple(IMAGENET_MEAN)):
        return augment  # statistics the config chose
    total = sum(s.image.shape[0] * s.image.shape[1] for s in samples)
    step = max(1, int(np.ceil(np.sqrt(total / max_pixels))))  # the same grid stride in y and x
    values: list[list[np.ndarray]] = [[] for _ in range(n)]
    for i, s in enumerate(samples):
        image = prepare_image(s.image[::step, ::step], s.source or s.name)  # the pipeline's own scaling
        x = image.reshape(-1, n).astype(np.float32) / (np.float32(255) if image.dtype == np.uint8 else 1)
        for c in range(n):
            if present is None or present[i][c]:
                values[c].append(x[:, c])
    mean, std = [], []
    for c in range(n):
        if not values[c]:  # no training image has this channel: nothing to learn from
            mean.append(augment.fallback_mean)
            std.append(augment.fallback_std)
            continue
        lo, hi = np.percentile(np.concatenate(values[c]), percentiles)
        mean.append(float(lo + hi) / 2.0)
        std.append(max(float(hi - lo) / 2.0, 1e-3))  # a constant channel must not divide by zero
    log.info("channel statistics from %d training images (%g–%g percentile range → [-1, 1]): mean %s, std %s",
             len(samples), *percentiles, np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return dataclasses.replace(augment, mean=tuple(mean), std=tuple(std))


def mark_missing(images: Tensor, present: np.ndarray | Tensor | None) -> Tensor:
    """B×N×H×W normalised batch with the channels absent from each sample (``present`` B×N False) set to NaN,
    which the adapter fills (the inference convention of :func:`karyo.infer.prepare.model_input`)."""
    if present is None:
        return images
    p = torch.as_tensor(np.asarray(present), dtype=torch.bool, device=images.device)
    if bool(p.all()):
        return images
    return images.masked_fill(~p[:, :, None, None], float("nan"))


def adapt_training_data(config: Any, channels: str | int | Sequence[str] | None, augment: AugmentConfig,
                        train_samples: Sequence[Sample], val_samples: Sequence[Sample]
                        ) -> tuple[Any, AugmentConfig, list[Sample], list[Sample]]:
    """``karyo train --channels`` for any network config: a new adapter for ``channels`` (fresh runs), the
    training and validation data brought onto the config's adapter channels (missing ones hold 0), and the
    normalisation fitted to them (:func:`fit_channel_stats`; the returned ``augment`` is the one to train with).
    Without an adapter this checks that the data have the network's channel count (a clear error if not)."""
    if channels is not None:
        if not hasattr(config, "adapter"):
            raise InputError(None, f"--channels needs a network with a channel adapter; {type(config).__name__} "
                                   "has none")
        config = with_adapter(config, parse_channels(channels))
    adapter = getattr(config, "adapter", None)
    possible = hasattr(config, "adapter")
    train, present = map_samples(train_samples, adapter, config.in_chans, adapter_possible=possible)
    val = map_samples(val_samples, adapter, config.in_chans, adapter_possible=possible)[0]
    if adapter is not None:
        augment = fit_channel_stats(augment, train, present)
        config = with_adapter(config, None, augment)
    return config, augment, train, val


def channel_summary(adapter: AdapterConfig, samples: Sequence[Sample]) -> str:
    """One line saying how ``samples`` (as read, before :func:`map_samples`) meet the adapter's channels: a run
    must say what it assumed about them, since a channel read by position or pooled trains silently on what may
    be another stain."""
    names = list(adapter.channel_names or ())
    wanted = {channel_key(nm) for nm in names}
    n = len(samples)
    by_name = by_position = lacking = pooled = ignored = 0
    pooled_counts: set[int] = set()
    for s in samples:
        plan = plan_channels(s.image.shape[2], adapter, s.channel_names, s.source or s.name, warn=False)
        if wanted and s.channel_names and wanted & {channel_key(nm) for nm in s.channel_names}:
            by_name += 1
        elif plan.mode == "identity":
            by_position += 1
        lacking += not plan.present.all()
        ignored += bool(plan.ignored)
        if plan.mode == "pooled":
            pooled += 1
            pooled_counts.add(s.image.shape[2])
    if names:
        head = f"channels: the network takes {', '.join(names)} by name: {by_name} of {n} image(s) matched by name"
        if by_position:
            head += f"; {by_position} read in that order by position (no matching channel names)"
    else:
        head = f"channels: the network takes {adapter.in_channels} unnamed channel(s): {by_position} of {n} image(s) " \
               f"have exactly as many"
    parts = [head]
    if lacking:
        parts.append(f"{lacking} lack some (filled by the adapter's '{adapter.missing}' rule)")
    if pooled:
        parts.append(f"{pooled} with {'/'.join(map(str, sorted(pooled_counts)))} channel(s) pooled onto them "
                     f"(channel average)")
    if ignored:
        parts.append(f"{ignored} have channels the network ignores")
    return "; ".join(parts)


def describe_channels(samples: Sequence[Sample]) -> str:
    """The channels ``samples`` have, grouped, for messages: ``"4 image(s) with CD45, DAPI; 2 with 1 unnamed
    channel(s)"`` (most common first; names compared as the adapter compares them, in any order)."""
    groups: dict[tuple, list] = {}
    for s in samples:
        if s.channel_names:
            key: tuple = ("named", frozenset(channel_key(nm) for nm in s.channel_names), len(s.channel_names))
            label = ", ".join(map(str, s.channel_names))
        else:
            key = ("unnamed", s.image.shape[2])
            label = f"{s.image.shape[2]} unnamed channel(s)"
        groups.setdefault(key, [label, 0])[1] += 1
    ordered = sorted(groups.values(), key=lambda g: -g[1])
    return "; ".join(f"{count} {'image(s) ' if i == 0 else ''}with {label}"
                     for i, (label, count) in enumerate(ordered))


def _is_rgb(s: Sample) -> bool:
    return s.image.shape[2] == 3 and not is_marker_image(3, s.channel_names)


def channels_from_data(samples: Sequence[Sample]) -> int | tuple[str, ...] | None:
    """The adapter channels the training images agree on, for a run that names none (no ``--channels``, an
    adapter section without ``in_channels`` / ``channel_names``): their channel names (the first image's order;
    the others may order them otherwise, they are mapped by name), or their channel count where they are unnamed.
    None where every image is RGB (3 channels, unnamed or named R, G, B): the adapter's default 3 channels fit.
    Images with different channels are refused (the run must say which the network takes)."""
    if not samples or all(_is_rgb(s) for s in samples):
        return None
    first = samples[0]
    want = (frozenset(channel_key(nm) for nm in first.channel_names), len(first.channel_names)) \
        if first.channel_names else None
    for s in samples:
        if want is not None:
            same = bool(s.channel_names) and (frozenset(channel_key(nm) for nm in s.channel_names),
                                              len(s.channel_names)) == want
        else:
            same = not s.channel_names and s.image.shape[2] == first.image.shape[2]
        if not same:
            raise InputError(None, f"the training images have different channels ({describe_channels(samples)}): "
                                   f"say which the network takes with --channels (names, e.g. --channels "
                                   f"DAPI,CD45, or a count)")
    if first.channel_names:
        return tuple(str(nm) for nm in first.channel_names)
    return int(first.image.shape[2])


def check_channels_in_data(channels: str | int | Sequence[str] | None, samples: Sequence[Sample]) -> None:
    """Refuse ``--channels`` that no training image has: a name no image carries (an unnamed image with as many
    channels as named, or fewer, has the first of them, by position: :func:`~karyo.models.adapter.plan_channels`),
    or a count other than the one every image has (images of several counts are pooled onto it, as documented).
    A name only some images lack stays allowed (the adapter fills it: that is what it is for)."""
    spec = parse_channels(channels)
    if spec is None or not samples:
        return
    if isinstance(spec, int):
        counts = {s.image.shape[2] for s in samples}
        if len(counts) == 1 and spec not in counts:
            raise InputError(None, f"--channels {spec}: no training image has {spec} channel(s) (they have: "
                                   f"{describe_channels(samples)}); give a count they have, or their channel names")
        return
    keys = [channel_key(nm) for nm in spec]

    def has(s: Sample, key: str) -> bool:
        if s.channel_names:
            return key in {channel_key(nm) for nm in s.channel_names}
        n = s.image.shape[2]  # unnamed channels are taken by position, when not more than named
        return n <= len(spec) and keys.index(key) < n

    lacking = [nm for nm in spec if not any(has(s, channel_key(nm)) for s in samples)]
    if lacking:
        raise InputError(None, f"--channels {','.join(spec)}: no training image has {', '.join(lacking)} (they have: "
                               f"{describe_channels(samples)})")
