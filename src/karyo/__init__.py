"""karyo: nucleus analysis for histology images."""

from karyo.data import Sample, read_image
from karyo.errors import InputError, KaryoError

__version__ = "0.1.0"

__all__ = ["InputError", "KaryoError", "Sample", "__version__", "read_image"]
