"""Shared losses: values computed by hand."""

import math

import pytest
import torch

from karyo.models.losses import binary_focal


def test_binary_focal_values():
    # p = 0.5 everywhere: (1 − 0.5)² · ln 2 per pixel, whatever the target
    assert binary_focal(torch.zeros(3, 4), torch.ones(3, 4)).mean().item() == pytest.approx(0.25 * math.log(2))
    # a confident right pixel costs almost nothing, a confident wrong one ≈ its cross entropy
    logits, target = torch.tensor([8.0, 8.0]), torch.tensor([1.0, 0.0])
    p = 1 / (1 + math.exp(-8.0))
    expected = ((1 - p) ** 2 * -math.log(p) + p ** 2 * -math.log(1 - p)) / 2
    assert binary_focal(logits, target).mean().item() == pytest.approx(expected, rel=1e-5)
