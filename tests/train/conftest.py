"""Fixtures of the training tests: small multi-channel (fluorescence-like) tiles, an OME-TIFF layout folder and
a layout folder of synthetic H&E-like tiles."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from tests.train.test_train import disc_samples

from karyo.data.layout import write_layout_sample
from karyo.data.sample import Sample

CONSEP_NAMES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}


def fluorescence_discs(n: int, channels: int = 1, size: int = 64) -> list[Sample]:
    """Fluorescence-like tiles: bright discs on a dark background in channel 0, noise in the others; the discs are
    CoNSeP "inflammatory" (2) or "epithelial" (3) nuclei so semantic tasks have classes too."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for k in range(n):
        inst = np.zeros((size, size), np.int32)
        for i, (cy, cx) in enumerate([(16, 16), (16, 44), (46, 20), (44, 46)], 1):
            inst[((yy - cy - rng.integers(-3, 4)) ** 2 + (xx - cx - rng.integers(-3, 4)) ** 2 <= 64) & (inst == 0)] = i
        img = rng.integers(0, 40, (size, size, channels)).astype(np.uint8)
        img[..., 0] = np.where(inst > 0, 200, 20) + rng.integers(0, 30, (size, size))
        classes = {i: 2 + (i + k) % 2 for i in range(1, 5)}
        out.append(Sample(image=img, instances=inst, classes=classes, class_names=CONSEP_NAMES, name=f"syn{k}"))
    return out


@pytest.fixture
def make_fluorescence_discs() -> Callable[..., list[Sample]]:
    return fluorescence_discs


@pytest.fixture
def ome_layout(tmp_path):
    """6 two-channel OME-TIFF tiles named (CD45, DAPI) in a karyo layout folder (nuclei bright in DAPI)."""
    root = tmp_path / "data"
    for s in fluorescence_discs(6, channels=2):
        write_layout_sample(root, Sample(image=s.image[..., ::-1].copy(), instances=s.instances, classes=s.classes,
                                         class_names=s.class_names, name=s.name, channel_names=("CD45", "DAPI")),
                            split="train")
    return root


@pytest.fixture
def disc_layout(tmp_path):
    """8 synthetic H&E-like tiles from 4 source images (syn_0 … syn_3) in a karyo layout folder, classes small and
    large named in classes.json."""
    root = tmp_path / "data"
    for s in disc_samples(8):
        write_layout_sample(root, dataclasses.replace(s, class_names={1: "small", 2: "large"}), split="train")
    return root
