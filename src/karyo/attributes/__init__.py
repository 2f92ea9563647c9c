"""Per-nucleus attributes (IVAAN supplement B.1) and their class-separability selection (B.2).

``measure_nuclei`` measures one image; ``measure_samples`` many (optionally on several processes);
``select_attributes`` runs the B.2 selection on the resulting table. Column names and their mapping to the paper's
names are in :mod:`karyo.attributes.names`.
"""

from karyo.attributes.measure import AttributeOptions, measure_arrays, measure_nuclei
from karyo.attributes.names import B1_ATTRIBUTES, PAPER_NAMES, PAPER_SELECTION
from karyo.attributes.select import SelectionResult, cohens_d, select_attributes
from karyo.attributes.table import analysis_rows, measure_samples, nucleus_geojson, write_table

__all__ = [
    "B1_ATTRIBUTES",
    "PAPER_NAMES",
    "PAPER_SELECTION",
    "AttributeOptions",
    "SelectionResult",
    "analysis_rows",
    "cohens_d",
    "measure_arrays",
    "measure_nuclei",
    "measure_samples",
    "nucleus_geojson",
    "select_attributes",
    "write_table",
]
