"""The one in-memory sample type every reader returns and every model consumes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from karyo.errors import InputError


@dataclass
class Sample:
    """An image with (optionally) its nucleus annotation.

    ``image`` is always H×W×C (C = any channel count; 3 for RGB). ``instances`` is an H×W int32 label map,
    0 = background. ``classes`` maps instance id → class id (1..C); instance ids absent from it (or given
    class 0) are unclassified. ``class_names`` maps class id → name. ``source`` names where the sample came from and is
    used in error messages.
    """

    image: np.ndarray
    instances: np.ndarray | None = None
    classes: dict[int, int] | None = None
    name: str = ""
    tissue: str | None = None
    class_names: dict[int, str] | None = None
    mpp: float | None = None
    channel_names: tuple[str, ...] | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or self.name or None
        self.image = as_hwc(self.image, where)
        if self.instances is not None:
            self.instances = validate_instances(self.instances, self.image.shape[:2], where)
        if self.classes is not None:
            self.classes = validate_classes(self.classes, self.instances, self.class_names, where)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]

    def __repr__(self) -> str:  # the dataclass default prints every pixel
        h, w, c = self.image.shape
        nuclei = "no annotation" if self.instances is None else \
            nuclei_phrase(len(np.unique(self.instances)) - int((self.instances == 0).any()))
        named = f" {self.name!r}" if self.name else ""
        extra = "".join(f", {k} {v}" for k, v in (("mpp", self.mpp), ("channels", self.channel_names),
                                                   ("tissue", self.tissue)) if v)
        return f"<Sample{named}: {w}×{h} px × {c} {self.image.dtype}, {nuclei}{extra}>"

    @property
    def n_instances(self) -> int:
        return 0 if self.instances is None else len(np.unique(self.instances[self.instances > 0]))

    def type_map(self) -> np.ndarray:
        """H×W int32 class map (0 = background or unclassified), built from ``instances`` and ``classes``."""
        if self.instances is None:
            raise ValueError(f"{self.name or 'sample'} has no instance map")
        return type_map(self.instances, self.classes or {})


def as_hwc(image: np.ndarray, source: str | None = None) -> np.ndarray:
    """Return ``image`` as H×W×C; a 2-D array becomes H×W×1."""
    if image is None:
        raise InputError(source, "no image given (None)")
    if isinstance(image, str | os.PathLike):
        raise InputError(source, f"expected the image's pixels (an array), got the file name {str(image)!r}: read it "
                                 f"first with karyo.read_image (or read_image_meta, which also gives its µm/px)")
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise InputError(source, f"image must be H×W or H×W×C, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise InputError(source, f"image is empty (shape {image.shape})")
    if image.dtype.kind not in "uif" and image.dtype != bool:
        raise InputError(source, f"image has unsupported dtype {image.dtype}")
    if image.shape[0] <= 4 and min(image.shape[1:]) > 16:  # 3×256×256 read as 3 rows of 256 channels
        raise InputError(source, f"image of shape {image.shape} looks channels-first (C×H×W, as torch holds it); "
                                 f"karyo takes H×W×C: pass np.moveaxis(image, 0, -1)")
    return image


def integer_by_value(image: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
    """A wide integer image (int16..int64, uint32/64: what ``np.array(..., dtype=int)``, a nested list, a 32-bit PNG
    or an int TIFF give) as uint8 or uint16 by its values, since its dtype says nothing about its range: 0..255 is
    8-bit, up to 65535 16-bit; negative or larger values are refused. Dividing by the dtype maximum instead would
    turn an 8-bit image held as int64 black, and holding 0..255 as uint16 would read it as dark 16-bit."""
    lo, hi = (int(image.min()), int(image.max())) if image.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise InputError(source, f"integer image ({image.dtype}) holds values {lo}..{hi}; karyo reads 8-bit "
                                 f"(0..255) or 16-bit (0..65535) intensities: convert it to uint8 or uint16")
    return image.astype(np.uint8 if hi <= 255 else np.uint16)


def validate_instances(instances: np.ndarray, shape: tuple[int, int] | None = None, source: str | None = None
                       ) -> np.ndarray:
    """Check an instance map (integer, non-negative, 2-D, matching ``shape``) and return it as int32."""
    instances = np.asarray(instances)
    if instances.ndim == 3 and instances.shape[2] == 1:
        instances = instances[..., 0]
    if instances.ndim != 2:
        raise InputError(source, f"instance map must be 2-D, got shape {instances.shape}")
    if shape is not None and tuple(instances.shape) != tuple(shape):
        raise InputError(source, f"instance map shape {instances.shape[0]}×{instances.shape[1]} differs from "
                                 f"image shape {shape[0]}×{shape[1]}")
    if instances.dtype.kind == "f":
        if not np.all(np.isfinite(instances)) or np.any(instances != np.round(instances)):
            raise InputError(source, "instance map holds non-integer values")
    elif instances.dtype.kind not in "iub":
        raise InputError(source, f"instance map has non-integer dtype {instances.dtype}")
    if instances.size and instances.min() < 0:
        raise InputError(source, f"instance map holds negative ids (min {instances.min()})")
    if instances.size and instances.max() > np.iinfo(np.int32).max:
        raise InputError(source, "instance map ids exceed the int32 range")
    return instances.astype(np.int32, copy=False)


def validate_classes(classes: Mapping[int, int], instances: np.ndarray | None,
                     class_names: Mapping[int, str] | None = None, source: str | None = None) -> dict[int, int]:
    """Check that every class id is known and every classified instance exists; return a plain dict.

    Class id 0 means "unclassified" (as in type maps and nucleus tables) and is dropped: the instance stays,
    without a class."""
    out = {int(k): int(v) for k, v in classes.items() if int(v) != 0}
    if class_names:
        unknown = sorted({v for v in out.values() if v not in class_names})
        if unknown:
            raise InputError(source, f"unknown class id(s) {unknown}; known: {sorted(class_names)}")
    bad = sorted(v for v in out.values() if v < 0)
    if bad:
        raise InputError(source, f"negative class id(s) {bad}")
    if instances is not None:
        present = set(np.unique(instances).tolist()) - {0}
        missing = sorted(set(out) - present)
        if missing:
            raise InputError(source, f"class rows name instance id(s) absent from the instance map: {missing[:10]}")
    return out


def type_map(instances: np.ndarray, classes: Mapping[int, int]) -> np.ndarray:
    """Paint each instance with its class id (vectorised lookup table, no per-instance loop)."""
    n = int(instances.max()) if instances.size else 0
    lut = np.zeros(n + 1, dtype=np.int32)
    for k, v in classes.items():
        if 0 < k <= n:
            lut[k] = v
    return lut[instances]


def relabel_sequential(labels: np.ndarray, max_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Renumber the ids present in ``labels`` 1..N in ascending order → (int32 map, lookup old id → new id).

    The lookup has ``max_id + 1`` entries (default: the largest id), 0 for ids absent from ``labels``.
    """
    present = np.unique(labels[labels > 0])
    size = int(max_id if max_id is not None else (present[-1] if present.size else 0)) + 1
    lut = np.zeros(size, dtype=np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    return lut[labels], lut


def keep_instances(labels: np.ndarray, keep: set[int] | Sequence[int]) -> tuple[np.ndarray, dict[int, int]]:
    """Only the instances whose ids are in ``keep``, renumbered 1..N in ascending order of their old ids →
    (int32 map, {old id: new id}); ids in ``keep`` absent from ``labels`` are ignored."""
    present = np.unique(labels)
    kept = [int(i) for i in present if i > 0 and int(i) in set(keep)]
    lut = np.zeros(int(present.max(initial=0)) + 1, np.int32)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return lut[labels], {old: new for new, old in enumerate(kept, 1)}


class SampleSequence(Sequence[Sample]):
    """A lazy sequence of :class:`Sample`: what every dataset reader returns.

    Nothing is decoded until an item is asked for, so opening a dataset of thousands of tiles is cheap.
    Subclasses set ``_ids`` (one name per item) and ``class_names``, and define ``_load(i)``. Indexing with a
    slice or a list of indices gives a lazy subset.
    """

    class_names: dict[int, str] | None = None
    _ids: list[str]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def _load(self, i: int) -> Sample:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return SampleSubset(self, range(len(self))[i])
        if not isinstance(i, int | np.integer):
            return SampleSubset(self, [self._index(j) for j in i])
        return self._load(self._index(i))

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        return int(i) % n

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self._load(i)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples)"


class SampleSubset(SampleSequence):
    """Selected items of another sequence, still lazy."""

    def __init__(self, parent: SampleSequence, indices: Sequence[int]):
        self.parent = parent
        self.indices = [int(i) for i in indices]
        self.class_names = parent.class_names

    @property
    def ids(self) -> list[str]:
        ids = self.parent.ids
        return [ids[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, i: int) -> Sample:
        return self.parent._load(self.indices[i])


class ConcatSamples(SampleSequence):
    """Several sequences one after another (e.g. the three PanNuke folds); class names must agree."""

    def __init__(self, parts: Sequence[SampleSequence]):
        self.parts = list(parts)
        names = {repr(p.class_names) for p in self.parts if p.class_names}
        if len(names) > 1:
            raise ValueError(f"cannot concatenate datasets with different class names: {sorted(names)}")
        self.class_names = next((p.class_names for p in self.parts if p.class_names), None)
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])

    @property
    def ids(self) -> list[str]:
        return [name for p in self.parts for name in p.ids]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _load(self, i: int) -> Sample:
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.parts[k]._load(i - int(self._offsets[k]))


_RGB_NAMES = (("r", "g", "b"), ("red", "green", "blue"), ("r", "g", "b", "a"), ("red", "green", "blue", "alpha"))


def channel_key(name: str) -> str:
    """A channel name compared loosely: lower case, letters and digits only ("Hoechst 33342" → "hoechst33342")."""
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


#: Channel names taken for the nuclear stain of a marker image (compared case-insensitively, without spaces,
#: dashes and underscores).
NUCLEAR_STAINS = ("dapi", "hoechst", "hoechst33342", "hoechst33258", "draq5", "draq7", "sytox", "dna", "dna1",
                  "nuclear", "nucleus", "nuclei", "pi", "propidiumiodide", "histone", "h3")


def nuclear_channel_index(channel_names, n_channels: int, nuclear_channel: str | int | None = None,
                          source: str | None = None, fallback_warning: str | None = None) -> int:
    """The channel measured as the nuclear stain: ``nuclear_channel`` (a name or a 0-based index), else the first
    channel named as a nuclear stain (:data:`NUCLEAR_STAINS`), else channel 0 with a warning (``fallback_warning``,
    by default the attribute measurement's)."""
    names = list(channel_names or [])
    if nuclear_channel is not None:
        wanted = channel_key(nuclear_channel)
        hits = [i for i, n in enumerate(names) if channel_key(n) == wanted]
        if hits:
            return hits[0]
        if str(nuclear_channel).strip().isdigit() and int(nuclear_channel) < n_channels:
            return int(nuclear_channel)
        known = f"its channels are {', '.join(map(str, names))}" if names else f"it has {n_channels} unnamed channels"
        raise InputError(source, f"no channel {nuclear_channel!r} to measure as the nuclear stain: {known}")
    for i, n in enumerate(names):
        if channel_key(n) in NUCLEAR_STAINS:
            return i
    label = f" ({names[0]})" if names else ""
    warnings.warn(fallback_warning or f"{source or 'image'}: no channel is named as a nuclear stain (DAPI, Hoechst "
                  f"...): channel 0{label} is measured as the nucleus' stain; name another with nuclear_channel "
                  f"(--nuclear-channel)", stacklevel=3)
    return 0


def is_marker_image(n_channels: int, channel_names=None) -> bool:
    """Markers (multiplex or multi-channel fluorescence), not RGB nor one stain: 2 or more than 4 channels, or 3–4
    channels whose names are not R, G, B(, A)."""
    if n_channels == 2 or n_channels > 4:
        return True
    names = tuple(channel_key(n) for n in channel_names or ())
    return n_channels >= 3 and bool(names) and names not in _RGB_NAMES


def grey_fluorescence(image: np.ndarray) -> bool:
    """True for a fluorescence image saved as RGB (as ImageJ exports and DSB2018 ships them): R, G and B equal at
    every pixel, and a dark background (the median below the middle of the 1st–99th percentile range). Read as
    H&E, its bright nuclei look unstained; a grey *brightfield* image (bright background) stays RGB."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or not image.size:
        return False
    red = image[..., 0]
    if not (np.array_equal(red, image[..., 1]) and np.array_equal(red, image[..., 2])):
        return False
    lo, hi = np.percentile(red, (1, 99))
    return bool(hi > lo and np.median(red) < (lo + hi) / 2)


def nuclei_phrase(n: int) -> str:
    """"1 nucleus", "1,234 nuclei": counts in messages and reprs."""
    return "1 nucleus" if n == 1 else f"{n:,} nuclei"
