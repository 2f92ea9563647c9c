"""The torch training/evaluation dataset over any sequence of :class:`~karyo.data.sample.Sample`.

Each item is a dict::

    image         float32 C×H×W, normalised ((x / max - mean) / std; uint8 max 255, uint16 max 65535;
                  float input must lie in [0, 1]); with ``normalize=False`` just x / max
    instances     int64 H×W instance map, 0 = background
    types         int64 H×W class map, 0 = background or unclassified
    centroids     float32 K×2, (x, y) = mean pixel coordinates of each instance present in this item
    classes       int64 K, class of each instance (0 = unclassified)
    instance_ids  int64 K, ascending, the ids in ``instances``
    name          str
    index         int, position of the source sample in ``samples``
    orig_size     int64 (2,), the source image's (H, W); evaluation padding is bottom/right, so
                  ``x[..., :H, :W]`` undoes it

Reproducibility: with ``AugmentConfig.seed`` set, item ``i`` of epoch ``e`` (see :meth:`set_epoch`) is
augmented from ``sample_seed(seed, e, i)`` alone, so the result does not depend on the number of
DataLoader workers or the order items are drawn in. ``set_epoch`` must be called before each epoch's
iterator is created; with ``persistent_workers=True`` the workers keep the epoch they were started with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from karyo.data.augment import AugmentConfig, Augmenter, build_eval_transform, prepare_image, sample_seed
from karyo.data.sample import Sample, type_map
from karyo.errors import InputError


def instance_centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending, K×2 float32 (x, y) mean pixel coordinates), in one bincount pass."""
    instances = np.asarray(instances)
    flat = instances.ravel().astype(np.int64, copy=False)
    n = int(flat.max()) + 1 if flat.size else 1
    count = np.bincount(flat, minlength=n)
    ids = np.flatnonzero(count)
    ids = ids[ids > 0]
    if ids.size == 0:
        return ids.astype(np.int64), np.zeros((0, 2), dtype=np.float32)
    h, w = instances.shape
    ys, xs = np.divmod(np.arange(h * w, dtype=np.int64), w)
    sx = np.bincount(flat, weights=xs, minlength=n)[ids]
    sy = np.bincount(flat, weights=ys, minlength=n)[ids]
    cnt = count[ids].astype(np.float64)
    return ids.astype(np.int64), np.stack([sx / cnt, sy / cnt], axis=1).astype(np.float32)


class NucleusDataset(Dataset):
    """Items for training (``train=True``: random Table S1 augmentation) or evaluation (normalisation only).

    ``augment`` holds the pipeline settings and the normalisation statistics; pass the training config at
    evaluation too so both normalise alike. ``augment=None`` means no random transforms (the default
    config's normalisation only). ``crops_per_image`` (training only) repeats each sample per epoch: an int,
    or ``"auto"`` = ceil(H / crop) · ceil(W / crop), so a 1000×1000 MoNuSeg image yields 16 random 256 crops
    and a 256 patch one. ``pad_multiple`` (without random crops) pads bottom/right to a multiple of it:
    image by reflection, maps with 0.
    """

    def __init__(self, samples: Sequence[Sample], augment: AugmentConfig | None = None, train: bool = True, *,
                 crops_per_image: int | Literal["auto"] = 1, pad_multiple: int | None = None):
        self.samples = samples
        self.train = bool(train)
        self.randomize = self.train and augment is not None
        self.cfg = augment or AugmentConfig()
        self.augmenter = Augmenter(self.cfg) if self.randomize else None
        if pad_multiple is not None and pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive integer, got {pad_multiple}")
        self.pad_multiple = pad_multiple
        if crops_per_image != "auto" and (not isinstance(crops_per_image, int) or crops_per_image < 1):
            raise ValueError(f"crops_per_image must be a positive int or 'auto', got {crops_per_image!r}")
        if not self.randomize and crops_per_image != 1:
            raise ValueError("crops_per_image applies to training with augmentation only")
        if self.randomize and pad_multiple is not None:
            raise ValueError("pad_multiple applies without augmentation only (training crops are crop_size)")
        self.crops_per_image = crops_per_image
        self.epoch = 0
        self._eval_transforms: dict[tuple[int, str], Any] = {}
        self._offsets: np.ndarray | None = None
        self._repeat = 1 if crops_per_image == "auto" else int(crops_per_image)
        self._len = len(samples) * self._repeat
        if crops_per_image == "auto":  # needs every sample's size once (a lazy reader loads each image here)
            crop = self.cfg.crop_size
            repeats = [max(1, math.ceil(h / crop) * math.ceil(w / crop))
                       for h, w in (samples[i].shape for i in range(len(samples)))]
            self._offsets = np.cumsum([0, *repeats])
            self._len = int(self._offsets[-1])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations the next iterator produces."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def sample_index(self, index: int) -> int:
        """Which entry of ``samples`` item ``index`` comes from."""
        if self._offsets is None:
            return index // self._repeat
        return int(np.searchsorted(self._offsets, index, side="right") - 1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} items")
        index %= self._len
        si = self.sample_index(index)
        sample = self.samples[si]
        where = sample.source or sample.name or f"sample {si}"
        h0, w0 = sample.shape
        if sample.instances is None:
            if self.train:
                raise InputError(where, "has no instance map; training needs annotations")
            instances = np.zeros((h0, w0), dtype=np.int32)
        else:
            instances = sample.instances
        classes = sample.classes or {}
        if self.randomize:
            seed = None if self.cfg.seed is None else sample_seed(self.cfg.seed, self.epoch, index)
            image, instances, classes = self.augmenter(sample.image, instances, classes, seed=seed, source=where)
        else:
            image, instances = self._evaluate(sample.image, instances, where)
        return self._pack(image, instances, classes, sample, si, (h0, w0))

    def _evaluate(self, image: np.ndarray, instances: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        image = prepare_image(image, where)
        key = (image.shape[2], image.dtype.str)
        if key not in self._eval_transforms:
            self._eval_transforms[key] = build_eval_transform(self.cfg, image.shape[2], image.dtype)
        image = self._eval_transforms[key](image=image)["image"]
        if image.ndim == 2:
            image = image[..., None]
        if self.pad_multiple:
            h, w = instances.shape
            ph, pw = -h % self.pad_multiple, -w % self.pad_multiple
            if ph or pw:
                image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
                instances = np.pad(instances, ((0, ph), (0, pw)), mode="constant")
        return image, instances

    @staticmethod
    def _pack(image: np.ndarray, instances: np.ndarray, classes: dict[int, int], sample: Sample, si: int,
              orig_size: tuple[int, int]) -> dict[str, Any]:
        if image.dtype == np.uint8:  # normalize=False: still scale to [0, 1] like every other dtype
            image = image.astype(np.float32) / np.float32(255.0)
        image = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        ids, centroids = instance_centroids(instances)
        lut_classes = np.array([classes.get(int(i), 0) for i in ids], dtype=np.int64)
        return {
            "image": torch.from_numpy(image),
            "instances": torch.from_numpy(instances.astype(np.int64)),
            "types": torch.from_numpy(type_map(instances, classes).astype(np.int64)),
            "centroids": torch.from_numpy(centroids),
            "classes": torch.from_numpy(lut_classes),
            "instance_ids": torch.from_numpy(ids),
            "name": sample.name,
            "index": si,
            "orig_size": torch.tensor(orig_size, dtype=torch.int64),
        }


_STACKED = ("image", "instances", "types", "orig_size")


def collate_nuclei(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and maps (B×C×H×W, B×H×W, B×2); keep per-image lists for the variable-length fields."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key in _STACKED:
        shapes = {tuple(item[key].shape) for item in batch}
        if len(shapes) > 1:
            raise ValueError(f"cannot stack '{key}' of shapes {sorted(shapes)}: use random crops, "
                             f"pad_multiple with same-size images, or batch_size=1")
        out[key] = torch.stack([item[key] for item in batch])
    out["index"] = torch.tensor([item["index"] for item in batch], dtype=torch.int64)
    for key in batch[0]:
        if key not in out:
            out[key] = [item[key] for item in batch]
    return out


__all__ = ["NucleusDataset", "collate_nuclei", "instance_centroids"]
