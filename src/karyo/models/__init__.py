"""Models: each a config dataclass + weights, rebuilt from its folder; pretrained names in registry.yaml."""

from karyo.models import cellvit, classical, ivaan, monch, promptnucseg, unet  # noqa: F401  (register architectures)
from karyo.models.base import ARCHITECTURES, InstanceModel, load_model_dir
from karyo.models.registry import available, load

__all__ = ["ARCHITECTURES", "InstanceModel", "available", "load", "load_model_dir"]
