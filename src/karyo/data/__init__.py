"""Data layer: the sample type, readers of the common nucleus datasets, image I/O and the training dataset."""

from karyo.data.augment import AugmentConfig, Augmenter, build_augmentation
from karyo.data.coco import CocoDataset, rle_decode
from karyo.data.consep import ConsepFolder, read_consep_mat
from karyo.data.dataset import NucleusDataset, collate_nuclei
from karyo.data.datasets import detect_format, open_dataset
from karyo.data.folder import ImageFolder
from karyo.data.geojson import GeoJsonFolder, read_geojson
from karyo.data.io import read_image, read_image_meta, read_instances, to_rgb, to_uint8, write_image, write_instances
from karyo.data.layout import LayoutDataset, read_class_csv, read_class_names, write_layout_sample
from karyo.data.monuseg import MoNuSegFolder, read_monuseg_xml
from karyo.data.pannuke import (
    PANNUKE_CLASS_NAMES,
    PANNUKE_TISSUES,
    PanNukeFold,
    pannuke_from_arrays,
    pannuke_masks_to_instances,
)
from karyo.data.protocols import (
    ProtocolSplit,
    Selection,
    apply_protocol,
    ivaan_organ_group_splits,
    pannuke_official_splits,
    protocol_splits,
    read_pannuke_metadata,
)
from karyo.data.sample import Sample, SampleSequence, type_map

__all__ = [
    "PANNUKE_CLASS_NAMES",
    "PANNUKE_TISSUES",
    "AugmentConfig",
    "Augmenter",
    "CocoDataset",
    "ConsepFolder",
    "GeoJsonFolder",
    "ImageFolder",
    "LayoutDataset",
    "MoNuSegFolder",
    "NucleusDataset",
    "PanNukeFold",
    "ProtocolSplit",
    "Sample",
    "SampleSequence",
    "Selection",
    "apply_protocol",
    "build_augmentation",
    "collate_nuclei",
    "detect_format",
    "ivaan_organ_group_splits",
    "open_dataset",
    "pannuke_from_arrays",
    "pannuke_masks_to_instances",
    "pannuke_official_splits",
    "protocol_splits",
    "read_class_csv",
    "read_class_names",
    "read_consep_mat",
    "read_geojson",
    "read_image",
    "read_image_meta",
    "read_instances",
    "read_monuseg_xml",
    "read_pannuke_metadata",
    "rle_decode",
    "to_rgb",
    "to_uint8",
    "type_map",
    "write_image",
    "write_instances",
    "write_layout_sample",
]
