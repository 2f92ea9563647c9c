"""Data layer: the sample type, readers of the common nucleus datasets, image I/O and the training dataset."""

from karyo.data.io import read_image, read_image_meta, read_instances, to_rgb, to_uint8, write_image, write_instances
from karyo.data.sample import Sample, type_map

__all__ = [
    "Sample",
    "read_image",
    "read_image_meta",
    "read_instances",
    "to_rgb",
    "to_uint8",
    "type_map",
    "write_image",
    "write_instances",
]
