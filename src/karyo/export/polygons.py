"""Instance map → polygons. Shared by the GeoJSON export, the Parquet tables and whole-slide stitching."""

from __future__ import annotations

from functools import reduce

import numpy as np
from scipy import ndimage as ndi
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient
from skimage import measure


def instance_polygons(instances: np.ndarray, ids: list[int] | None = None, *, simplify: float = 0.0,
                      offset: tuple[float, float] = (0.0, 0.0)) -> dict[int, Polygon | MultiPolygon]:
    """Outline every instance as a polygon in pixel coordinates (x right, y down; pixel (r, c) covers
    [c, c+1) × [r, r+1)), shifted by ``offset`` = (x0, y0).

    Contours follow pixel edges' midpoints (marching squares at level 0.5), so a polygon's area is within
    half a pixel per boundary pixel of the mask's pixel count. Holes and disconnected pieces are kept.
    """
    polys: dict[int, Polygon | MultiPolygon] = {}
    slices = ndi.find_objects(instances)
    wanted = set(ids) if ids is not None else None
    for index, sl in enumerate(slices):
        label = index + 1
        if sl is None or (wanted is not None and label not in wanted):
            continue
        crop = np.pad(instances[sl] == label, 1)
        poly = _mask_polygon(crop)
        if poly is None:
            continue
        poly = affinity.translate(poly, xoff=sl[1].start - 1 + 0.5 + offset[0],
                                  yoff=sl[0].start - 1 + 0.5 + offset[1])
        if simplify > 0:
            poly = poly.simplify(simplify, preserve_topology=True)
        polys[label] = poly
    return polys


def _mask_polygon(mask: np.ndarray) -> Polygon | MultiPolygon | None:
    rings = [c[:, ::-1] for c in measure.find_contours(mask.astype(np.float32), 0.5) if len(c) >= 4]
    shapes = [Polygon(r).buffer(0) for r in rings]
    shapes = [s for s in shapes if not s.is_empty]
    if not shapes:  # single pixel or a 1-px line: use the pixel squares
        rr, cc = np.nonzero(mask)
        if rr.size == 0:
            return None
        from shapely.ops import unary_union

        shapes = [unary_union([Polygon([(c - 0.5, r - 0.5), (c + 0.5, r - 0.5), (c + 0.5, r + 0.5),
                                        (c - 0.5, r + 0.5)]) for r, c in zip(rr, cc, strict=True)])]
    # Nested rings are holes: the even-odd union of all rings is the mask's region.
    shape = shapes[0] if len(shapes) == 1 else reduce(lambda a, b: a.symmetric_difference(b), shapes)
    if isinstance(shape, Polygon):
        return orient(shape)
    if isinstance(shape, MultiPolygon):
        return MultiPolygon([orient(p) for p in shape.geoms])
    polys = [g for g in getattr(shape, "geoms", []) if isinstance(g, Polygon)]
    return MultiPolygon([orient(p) for p in polys]) if polys else None
