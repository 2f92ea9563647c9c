"""karyo: nucleus analysis for histology images.

>>> import karyo
>>> model = karyo.load("default")
>>> image, meta = karyo.read_image_meta("tile.png")  # meta["mpp"]: the µm/px the file states, if it does
>>> result = model.segment(image, mpp=meta.get("mpp"))
"""

from karyo.data import Sample, read_image, read_image_meta
from karyo.errors import InputError, KaryoError
from karyo.infer.result import SegmentationResult
from karyo.models import available, load

__version__ = "0.1.0"

__all__ = ["InputError", "KaryoError", "Sample", "SegmentationResult", "__version__", "available", "load",
           "read_image", "read_image_meta"]
