"""Sample images bundled with karyo (see SOURCE.md for provenance and licences)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLES = {"he_breast": "he_breast_nucls.png"}


def sample_path(name: str = "he_breast") -> Path:
    """Path of a bundled sample image."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; available: {sorted(SAMPLES)}")
    return Path(str(resources.files("karyo.samples").joinpath(SAMPLES[name])))
