"""Column names of the attribute table (HistomicsTK style) and their mapping to the IVAAN paper's names.

Coordinates are in pixels of the image the nuclei were measured on: ``X`` = column, ``Y`` = row; bounding boxes
are half-open (``Xmax``/``Ymax`` = last pixel + 1, as in scikit-image). Centroids are pixel indices (pixel (r, c)
is centred at X = c, Y = r, as in scikit-image and in prompt points), while GeoJSON polygons run through the
midpoints of the outer pixel edges (pixel (r, c) covers [c, c+1) × [r, r+1), as QuPath draws it): a polygon's
centroid lies 0.5 px right of and below the table's. Orientation follows scikit-image (angle between the row axis
and the major axis, radians in [-π/2, π/2]).
"""

from __future__ import annotations

# IVAAN supplement B.1 name → karyo column. Keys are the paper's symbols (``d_eq`` is called "size" there).
PAPER_NAMES: dict[str, str] = {
    "d_eq": "Size.EquivalentDiameter",
    "solidity": "Shape.Solidity",
    "perim_ratio": "Shape.PerimeterRatio",
    "eccentricity": "Shape.Eccentricity",
    "extent": "Shape.Extent",
    "aspect_ratio": "Shape.AspectRatio",
    "color_z": "Color.HematoxylinZ",
    "texture_z": "Texture.HematoxylinVarianceZ",
    "core_contrast_z": "Color.CoreRimContrastZ",
    "boundary_grad_mean": "Boundary.GradientMean",
    "nn_dist_px": "Density.NearestNeighborDistance",
}
# The B.1 attributes, i.e. the default candidate pool of the B.2 selection.
B1_ATTRIBUTES: tuple[str, ...] = tuple(PAPER_NAMES.values())
# The four attributes IVAAN reports as selected (supplement B.2, last paragraph).
PAPER_SELECTION: tuple[str, ...] = ("Size.EquivalentDiameter", "Shape.Eccentricity", "Color.HematoxylinZ",
                                    "Shape.PerimeterRatio")
_ALIASES = {"size": "d_eq", "shape": "eccentricity", "stain_intensity": "color_z",
            "boundary_complexity": "perim_ratio", "density": "nn_dist_px"}
COLUMN_TO_PAPER: dict[str, str] = {v: k for k, v in PAPER_NAMES.items()}

IDENTIFIER_COLUMNS = ("Identifier.Label", "Identifier.Xmin", "Identifier.Ymin", "Identifier.Xmax",
                      "Identifier.Ymax", "Identifier.CentroidX", "Identifier.CentroidY")
MORPHOLOGY_COLUMNS = ("Size.Area", "Size.Perimeter", "Size.ConvexHullArea", "Size.MajorAxisLength",
                      "Size.MinorAxisLength", "Size.EquivalentDiameter", "Shape.Solidity", "Shape.PerimeterRatio",
                      "Shape.Eccentricity", "Shape.Extent", "Shape.AspectRatio", "Orientation.Orientation")
INTENSITY_COLUMNS = ("Nucleus.Intensity.Mean", "Nucleus.Red.Mean", "Nucleus.Green.Mean", "Nucleus.Blue.Mean",
                     "Nucleus.Hematoxylin.Mean", "Nucleus.Eosin.Mean")
APPEARANCE_COLUMNS = ("Color.HematoxylinRaw", "Texture.HematoxylinVarianceRaw", "Color.HematoxylinZ",
                      "Texture.HematoxylinVarianceZ", "Color.CoreRimContrastZ", "Boundary.GradientMean",
                      "Density.NearestNeighborDistance")
FLAG_COLUMNS = ("Flag.Truncated", "Flag.Small", "Flag.Valid")
ALL_COLUMNS = IDENTIFIER_COLUMNS + MORPHOLOGY_COLUMNS + INTENSITY_COLUMNS + APPEARANCE_COLUMNS + FLAG_COLUMNS
#: Columns with a dimension: the power of length of their unit (px or px²). The rest are ratios, angles or
#: intensities, the same at any resolution.
LENGTH_POWER: dict[str, int] = {"Size.Area": 2, "Size.Perimeter": 1, "Size.ConvexHullArea": 2,
                                "Size.MajorAxisLength": 1, "Size.MinorAxisLength": 1, "Size.EquivalentDiameter": 1,
                                "Density.NearestNeighborDistance": 1}
#: Their µm counterparts, added when the image's resolution is known (``Size.Area`` → ``Size.Area_um2``).
MICRON_COLUMNS: dict[str, str] = {c: f"{c}_um{'2' if p == 2 else ''}" for c, p in LENGTH_POWER.items()}
CLASS_ID = "Class.Id"
CLASS_NAME = "Class.Name"
IMAGE = "Identifier.Image"
SPLIT = "Identifier.Split"


def resolve(name: str) -> str:
    """Column name for a paper name (``color_z``), an alias (``size``) or a column name itself."""
    key = _ALIASES.get(name, name)
    if key in PAPER_NAMES:
        return PAPER_NAMES[key]
    if key in ALL_COLUMNS:
        return key
    raise KeyError(f"unknown attribute {name!r}; known: {', '.join(sorted(PAPER_NAMES))} or a column name "
                   f"such as {ALL_COLUMNS[8]!r}")


def paper_name(column: str) -> str:
    """The paper's name of a column (or the column itself when the paper has none)."""
    return COLUMN_TO_PAPER.get(column, column)
