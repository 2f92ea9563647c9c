"""Attribute-guided text prompts (IVAAN): attribute levels → sentences, class descriptions, text encoders.

The encoders are imported lazily: ``import karyo.text`` needs neither torch nor sentence-transformers.
"""

from karyo.text.encoder import (
    DEFAULT_ENCODER,
    CachedEncoder,
    MiniLMEncoder,
    SentenceTransformerEncoder,
    TextEncoder,
    default_cache_dir,
    embed_class_prompts,
    load_text_encoder,
    text_key,
)
from karyo.text.levels import LevelModel
from karyo.text.prompts import (
    PROMPTS_FILE,
    class_prompts,
    class_prompts_for,
    describe,
    level_words,
    load_prompts,
    prompts_version,
)

__all__ = [
    "DEFAULT_ENCODER",
    "PROMPTS_FILE",
    "CachedEncoder",
    "LevelModel",
    "MiniLMEncoder",
    "SentenceTransformerEncoder",
    "TextEncoder",
    "class_prompts",
    "class_prompts_for",
    "default_cache_dir",
    "describe",
    "embed_class_prompts",
    "level_words",
    "load_prompts",
    "load_text_encoder",
    "prompts_version",
    "text_key",
]
