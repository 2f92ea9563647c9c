"""karyo: nucleus analysis for histology images.

>>> import karyo
>>> model = karyo.load("default")
>>> image, meta = karyo.read_image_meta("tile.png")  # meta["mpp"]: the µm/px the file states, if it does
>>> result = model.segment(image, mpp=meta.get("mpp"))
"""

from __future__ import annotations

from karyo._lazy import lazy_exports
from karyo.errors import InputError, KaryoError

__version__ = "0.1.0"

# Imported on first use (PEP 562): the command line's --help and light readers need neither torch nor pandas.
_MODULE_OF = {"Sample": "karyo.data.sample", "read_image": "karyo.data.io", "read_image_meta": "karyo.data.io",
              "on_bit_range": "karyo.data.io", "SegmentationResult": "karyo.infer.result", "available": "karyo.models",
              "load": "karyo.models"}

__all__ = ["InputError", "KaryoError", "Sample", "SegmentationResult", "__version__", "available", "load",
           "on_bit_range", "read_image", "read_image_meta"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULE_OF)
