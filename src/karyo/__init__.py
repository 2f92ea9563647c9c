"""karyo: nucleus analysis for histology images.

>>> import karyo
>>> model = karyo.load("default")
>>> result = model.segment(karyo.read_image("tile.png"))
"""

from karyo.data import Sample, read_image
from karyo.errors import InputError, KaryoError
from karyo.infer.result import SegmentationResult
from karyo.models import available, load

__version__ = "0.1.0"

__all__ = ["InputError", "KaryoError", "Sample", "SegmentationResult", "__version__", "available", "load",
           "read_image"]
