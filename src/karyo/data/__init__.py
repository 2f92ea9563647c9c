"""Data layer: the sample type, readers of the common nucleus datasets, image I/O and the training dataset.

Names are imported on first use (PEP 562), so that ``karyo --help`` and readers that need only numpy do not pay
for torch and albumentations, which the augmentation and dataset modules import."""

from __future__ import annotations

from karyo._lazy import lazy_exports

_SOURCES: dict[str, tuple[str, ...]] = {
    "augment": ("AugmentConfig", "Augmenter", "build_augmentation"),
    "coco": ("CocoDataset", "rle_decode"),
    "consep": ("ConsepFolder", "read_consep_mat"),
    "dataset": ("NucleusDataset", "collate_nuclei"),
    "datasets": ("detect_format", "open_dataset"),
    "folder": ("ImageFolder",),
    "geojson": ("GeoJsonFolder", "read_geojson"),
    "io": ("read_image", "read_image_meta", "read_instances", "to_rgb", "to_uint8", "write_image", "write_instances"),
    "layout": ("LayoutDataset", "read_class_csv", "read_class_names", "write_layout_sample"),
    "monuseg": ("MoNuSegFolder", "read_monuseg_xml"),
    "pannuke": (
        "PANNUKE_CLASS_NAMES", "PANNUKE_TISSUES", "PanNukeFold", "pannuke_from_arrays", "pannuke_masks_to_instances",
    ),
    "protocols": (
        "ProtocolSplit", "Selection", "apply_protocol", "ivaan_organ_group_splits", "pannuke_official_splits",
        "protocol_splits", "read_pannuke_metadata",
    ),
    "sample": ("Sample", "SampleSequence", "type_map"),
}
_MODULE_OF = {name: f"{__name__}.{module}" for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULE_OF)
