"""Class colours shared by overlays and GeoJSON (QuPath shows the same colours karyo draws)."""

from __future__ import annotations

# Conventional colours of the common classes (PanNuke/HoVer-Net style); other names fall back to the palette.
NAMED = {
    "neoplastic": (255, 0, 0),
    "tumor": (255, 0, 0),
    "inflammatory": (0, 200, 0),
    "connective": (0, 90, 255),
    "spindle-shaped": (0, 90, 255),
    "dead": (255, 215, 0),
    "epithelial": (255, 0, 255),
    "non-neoplastic": (0, 200, 200),
    "non-tumor": (0, 200, 200),
    "other": (255, 140, 0),
}
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (70, 240, 240),
           (245, 130, 48), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
UNCLASSIFIED = (255, 255, 0)


def class_color(class_id: int, name: str | None = None) -> tuple[int, int, int]:
    if name and name.lower() in NAMED:
        return NAMED[name.lower()]
    if class_id <= 0:
        return UNCLASSIFIED
    return PALETTE[(class_id - 1) % len(PALETTE)]
