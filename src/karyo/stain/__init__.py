"""Stain handling for H&E images: Macenko stain estimation/normalisation and the hematoxylin channel."""

from karyo.stain.macenko import (
    REFERENCE_MAX_CONC,
    REFERENCE_STAINS,
    MacenkoNormalizer,
    StainEstimate,
    hematoxylin,
)

__all__ = ["REFERENCE_MAX_CONC", "REFERENCE_STAINS", "MacenkoNormalizer", "StainEstimate", "hematoxylin"]
