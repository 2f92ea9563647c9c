"""Models: each a config dataclass + weights, rebuilt from its folder; pretrained names in registry.yaml."""

from karyo.models import classical, promptnucseg  # noqa: F401  (register the architectures)
from karyo.models.base import ARCHITECTURES, InstanceModel, load_model_dir
from karyo.models.registry import available, load

__all__ = ["ARCHITECTURES", "InstanceModel", "available", "load", "load_model_dir"]
