import numpy as np
import pytest

from karyo.infer.tissue import TissueMask


def test_tissue_area_counts_only_the_slide_under_an_overhanging_mask_pixel():
    """A 1000 px square slide at 0.25 µm/px is 0.0625 mm²; on a 32 px mask grid its last row and column are 8 px
    deep, so a full 32×32 mask must not report 1024² px (0.065536 mm², 5% too much)."""
    full = TissueMask(np.ones((32, 32), bool), (32.0, 32.0), 0.25, 0.05, extent=(1000, 1000))
    assert full.area_mm2 == pytest.approx(1000 * 1000 * 0.25**2 / 1e6)
    assert full.fraction == pytest.approx(1.0)
    edge = np.zeros((32, 32), bool)
    edge[:, -1] = True  # only the 8 px wide last column: 8 × 1000 px
    part = TissueMask(edge, (32.0, 32.0), 0.25, 0.05, extent=(1000, 1000))
    assert part.area_mm2 == pytest.approx(8 * 1000 * 0.25**2 / 1e6)
    assert part.fraction == pytest.approx(8 / 1000)
    # without an extent every mask pixel counts whole, as before
    assert TissueMask(edge, (32.0, 32.0), 0.25, 0.05).area_mm2 == pytest.approx(32 * 1024 * 0.25**2 / 1e6)
