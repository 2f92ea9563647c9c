"""Overlapping tiles whose cores partition the image: the ownership rule of whole-slide stitching.

Tiles of ``tile`` px start every ``tile − overlap`` px; the last tile of a row or column is shifted back so that it
ends at the image border (no tile hangs over it unless the image is smaller than a tile). Between two neighbouring
tiles the boundary of their *cores* is the middle of their overlap, so the cores tile the image without gaps or
overlaps. A nucleus belongs to the one tile whose core holds its centroid.

Why nothing is cut at a seam: an owned centroid is at least ``overlap / 2`` px from the tile's interior edges, so
every nucleus with a radius below ``overlap / 2`` lies entirely inside the tile that owns it. The assumption is
therefore **overlap ≥ 2 × the largest nucleus radius** (in pixels at the model's resolution; 64 px at 0.25 µm/px
allows nuclei up to 16 µm across, 32 px radius). Nuclei that break it are counted (``truncated_at_tile_edge``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from karyo.errors import InputError


@dataclass(frozen=True, slots=True)
class Tile:
    """One tile in model-resolution pixels: the read window (x, y, width, height) and the core it owns.

    Core bounds are continuous coordinates (pixel (r, c) covers [c, c+1) × [r, r+1)); the outer bounds of border
    tiles are ±inf, so nothing at the image edge is lost to rounding.
    """

    index: int
    x: int
    y: int
    width: int
    height: int
    core: tuple[float, float, float, float]

    def owns(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Which centroids (continuous image coordinates) fall in this tile's core (half-open)."""
        x0, y0, x1, y1 = self.core
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: every ``tile − overlap`` px, the last one flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _core_bounds(starts: list[int], tile: int) -> list[tuple[float, float]]:
    cuts = [(a + b + tile) / 2.0 for a, b in itertools.pairwise(starts)]
    lows = [-np.inf, *cuts]
    highs = [*cuts, np.inf]
    return list(zip(lows, highs, strict=True))


def check_tiling(tile: int, overlap: int) -> None:
    if tile < 16:
        raise InputError(None, f"tile size {tile} px is too small (at least 16)")
    if overlap < 0 or overlap >= tile:
        raise InputError(None, f"overlap {overlap} px must be ≥ 0 and smaller than the tile ({tile} px)")
    if tile - overlap < tile // 4:
        raise InputError(None, f"overlap {overlap} px leaves a step of {tile - overlap} px per {tile} px tile; "
                               f"keep the overlap below 3/4 of the tile")


def plan_tiles(width: int, height: int, tile: int = 256, overlap: int = 64) -> list[Tile]:
    """All tiles of a ``width`` × ``height`` image (model resolution), row by row."""
    check_tiling(tile, overlap)
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    cx, cy = _core_bounds(xs, tile), _core_bounds(ys, tile)
    tiles = []
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            tiles.append(Tile(len(tiles), x, y, min(tile, width), min(tile, height),
                              (cx[i][0], cy[j][0], cx[i][1], cy[j][1])))
    return tiles


def core_box(tile: Tile, width: int, height: int) -> tuple[float, float, float, float]:
    """The core clipped to the image (finite bounds)."""
    x0, y0, x1, y1 = tile.core
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
