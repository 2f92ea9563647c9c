"""Instance-map clean-up shared by every model's post-processing."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential


def remove_small_instances(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Set instances smaller than ``min_area`` pixels to background and renumber the rest 1..N."""
    labels = np.asarray(labels)
    if labels.max(initial=0) == 0:
        return labels.astype(np.int32, copy=True)
    area = np.bincount(labels.ravel())
    keep = area >= min_area
    keep[0] = False
    out = np.where(keep[labels], labels, 0)
    return relabel_sequential(out)[0].astype(np.int32)
