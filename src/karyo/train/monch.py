"""Training MONCH (issue 6) and its U-Net baseline: per-class BCE (MONCH eq. 9) on the class map of every tile,
validated with :class:`~karyo.metrics.semantic.SemanticMetrics` (``score`` = mean F1 over the cell classes).

The paper's recipe (§4.1) is Adam, initial lr 5e-5, decay factor 0.1, 40 epochs, fine-tuning a pre-trained CLIP;
``configs/monch_cpu.yaml`` keeps Adam, the step decay and the epochs but trains a small tower from scratch, so it
starts at a higher lr (stated there). The text embeddings of the class descriptions (``prompts.yaml``, N classes +
background, several sentences each) are computed once here with the frozen text encoder (disk-cached by
:class:`~karyo.text.CachedEncoder`) and stored in the network; nothing is encoded during training.

Datasets with another taxonomy (data spec ``@none``: PanNuke breast demo, NuCLS) are used class-agnostically:
their nuclei are supervised as "not background" and ignored in the class channels (:func:`semantic_targets`),
and ignored by validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from karyo.config import from_dict, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.dataset import NucleusDataset, collate_nuclei
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.metrics.semantic import SemanticMetrics, SemanticResult
from karyo.models.monch import MONCH, MONCHConfig, MONCHModel, per_class_bce
from karyo.models.unet import UNet, UNetConfig, UNetModel
from karyo.train.channels import adapt_training_data
from karyo.train.loop import TrainConfig
from karyo.train.prompter import seeded_loader

__all__ = ["IGNORE", "RandomTextEncoder", "SemanticTask", "SemanticTrainSettings", "build_semantic_task",
           "class_text_embeddings", "match_prompt_set", "semantic_scores", "validate_semantic"]

SEMANTIC_TASKS = ("monch", "unet")
IGNORE = 255  # truth label of pixels that validation skips (nuclei of unknown class)


@dataclass
class SemanticTrainSettings:
    """Task settings beside the model config (``settings`` section of a run config).

    ``text_encoder``: ``all-MiniLM-L6-v2`` (the project's frozen default), a local sentence-transformers folder,
    or ``random`` (fixed random unit vectors per sentence: a no-language control). ``prompt_set``: the
    ``prompts.yaml`` dataset key; empty = the set whose class names match the data's. ``pretrained``: a local
    CLIP/PLIP/CONCH image-tower checkpoint loaded into MONCH's encoder before training (with ``pretrained_layout``
    and ``pretrained_prefix``, see :meth:`MONCH.load_image_encoder`).
    """

    text_encoder: str = "all-MiniLM-L6-v2"
    text_cache: str = ""
    prompt_set: str = ""
    pretrained: str = ""
    pretrained_layout: str = "auto"
    pretrained_prefix: str = ""


class RandomTextEncoder:
    """Fixed random unit vectors, one per distinct sentence (seeded by its SHA-256): same interface as the real
    encoders, for tests and as a "text carries no meaning" control."""

    def __init__(self, dim: int = 384):
        self.name = f"random{dim}"
        self.dim = int(dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def match_prompt_set(class_names: Mapping[int, str]) -> str:
    """The ``prompts.yaml`` class-prompt set holding a description of every class name (case-insensitive)."""
    from karyo.text.prompts import load_prompts

    wanted = {n.lower() for n in class_names.values()}
    sets = load_prompts()["class_prompts"]
    for key, table in sets.items():
        if wanted <= {k.lower() for k in table}:
            return str(key)
    raise InputError(None, f"no class-prompt set in prompts.yaml describes the classes {sorted(wanted)}; add one "
                           f"or set settings.prompt_set (have: {', '.join(sorted(sets))})")


def class_text_embeddings(class_names: Mapping[int, str], prompt_set: str, encoder: str = "all-MiniLM-L6-v2",
                          cache_dir: str | None = None) -> np.ndarray:
    """(N+1)×S×D sentence embeddings of the class descriptions (row 0 = background), S = the largest number of
    sentences of a class (shorter sets are cycled). Encoded once through the disk cache."""
    from karyo.text import load_text_encoder
    from karyo.text.prompts import class_prompts_for

    n = max(class_names) if class_names else 0
    missing = [c for c in range(1, n + 1) if c not in class_names]
    if missing:
        raise InputError(None, f"class ids {missing} have no name, so no description can be found")
    sets = class_prompts_for(class_names, prompt_set)
    s = max(len(v) for v in sets.values())
    sentences = [sets[c][i % len(sets[c])] for c in range(n + 1) for i in range(s)]
    if encoder == "random":
        enc: Any = RandomTextEncoder()
    else:
        try:
            enc = load_text_encoder(encoder, cache_dir=cache_dir or None)
        except ImportError as exc:
            raise InputError(None, f"{exc} (or set settings.text_encoder: random)") from None
    emb = np.asarray(enc.encode(sentences), np.float32)
    return emb.reshape(n + 1, s, emb.shape[-1])


# ----------------------------------------------------------------------------------------------- validation


def semantic_scores(res: SemanticResult) -> dict[str, float]:
    """Flat validation dict: PA, mean IoU, FWIoU, mean F1 / precision / recall over classes, per-class IoU and
    F1; ``score`` = mean F1 over the classes that are defined (NaN-skipping)."""
    classes = [c for c in res.classes if c > 0]

    def mean(d: dict[int, float]) -> float:
        vals = [d[c] for c in classes if np.isfinite(d[c])]
        return float(np.mean(vals)) if vals else float("nan")

    out = {"pa": res.pixel_accuracy, "miou": res.mean_iou, "fwiou": res.fwiou, "f1_mean": mean(res.f1),
           "precision_mean": mean(res.precision), "recall_mean": mean(res.recall)}
    for c in classes:
        out[f"iou_c{c}"] = res.iou[c]
        out[f"f1_c{c}"] = res.f1[c]
    out["score"] = out["f1_mean"]
    return out


def truth_map(types: torch.Tensor, instances: torch.Tensor) -> np.ndarray:
    """Class map for scoring: nuclei of unknown class (class-agnostic datasets) become :data:`IGNORE`."""
    t = types.numpy().astype(np.int64)
    t[(instances.numpy() > 0) & (t == 0)] = IGNORE
    return t


@torch.no_grad()
def validate_semantic(model: nn.Module, dataset: NucleusDataset, device: torch.device, num_classes: int,
                      batch_size: int = 4) -> dict[str, float]:
    """Semantic metrics of argmax predictions over a (padded, unaugmented) validation set."""
    acc = SemanticMetrics(num_classes=num_classes, ignore_index=IGNORE)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_nuclei)
    for batch in loader:
        pred = model(batch["image"].to(device)).argmax(1).cpu()
        for p, t, inst, size in zip(pred, batch["types"], batch["instances"], batch["orig_size"], strict=True):
            h, w = (int(v) for v in size)
            acc.update(truth_map(t[:h, :w], inst[:h, :w]), p[:h, :w].numpy())
    return semantic_scores(acc.compute())


# ------------------------------------------------------------------------------------------------------ task


class SemanticTask:
    """:class:`karyo.train.loop.Task` for MONCH (``name="monch"``) or the U-Net baseline (``name="unet"``)."""

    def __init__(self, name: str, config: MONCHConfig | UNetConfig, augment: AugmentConfig,
                 train_samples: Sequence[Sample], val_samples: Sequence[Sample], *,
                 text_embeddings: np.ndarray | None = None, settings: SemanticTrainSettings | None = None):
        if name not in SEMANTIC_TASKS:
            raise ValueError(f"unknown semantic task {name!r}")
        if name == "monch" and text_embeddings is None:
            raise ValueError("MONCH needs the class-description text embeddings")
        self.name, self.config, self.augment = name, config, augment
        self.settings = settings or SemanticTrainSettings()
        self.text_embeddings = text_embeddings
        self.train_set = NucleusDataset(train_samples, augment, train=True, crops_per_image="auto")
        self.val_set = NucleusDataset(val_samples, augment, train=False, pad_multiple=config.size_multiple)

    def model(self) -> nn.Module:
        if self.name == "unet":
            return UNet(self.config)
        net = MONCH(self.config)
        net.set_text_embeddings(self.text_embeddings)
        st = self.settings
        if st.pretrained:
            net.load_image_encoder(st.pretrained, layout=st.pretrained_layout, strip_prefix=st.pretrained_prefix)
        return net

    def train_loader(self, epoch: int, cfg: TrainConfig) -> DataLoader:
        return seeded_loader(self.train_set, cfg, epoch)

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        logits = model(batch["image"].to(device))
        loss = per_class_bce(logits, batch["types"].to(device), batch["instances"].to(device))
        return {"loss": loss}

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return validate_semantic(model, self.val_set, device, self.config.num_classes)

    def export(self, model: nn.Module, directory: Path) -> None:
        wrapper = MONCHModel(self.config, net=model) if self.name == "monch" else UNetModel(self.config, net=model)
        wrapper.save(directory)


# ------------------------------------------------------------------------------------------------- building


def semantic_model_config(task: str, base: Mapping[str, Any], preset: str | None, class_names: dict[int, str]
                  ) -> MONCHConfig | UNetConfig:
    base = dict(base)
    if class_names and "num_classes" not in base:
        base.update(num_classes=max(class_names), class_names=class_names)
    try:
        if task == "unet":
            base.pop("preset", None)
            return from_dict(UNetConfig, base)
        if "encoder" in base:  # a full config (e.g. read back from a run being resumed)
            return from_dict(MONCHConfig, base)
        start = MONCHConfig.preset(base.pop("preset", preset or "cpu"))
        return from_dict(MONCHConfig, {**to_dict(start), **base})
    except (TypeError, ValueError) as exc:
        raise InputError(None, f"invalid {task} model config: {exc}") from None


def build_semantic_task(task: str, file_cfg: Mapping[str, Any], preset: str | None, augment: AugmentConfig,
                        class_names: dict[int, str], train_samples: Sequence[Sample],
                        val_samples: Sequence[Sample], channels: str | int | Sequence[str] | None = None
                        ) -> tuple[SemanticTask, MONCHConfig | UNetConfig, dict]:
    """The ``monch`` / ``unet`` branch of :func:`karyo.train.api.train`: model config (classes from the data), text
    embeddings (MONCH), normalisation matched to the model, a channel adapter for ``channels`` (MONCH only; the
    data are mapped onto its channels); returns (task, model config, meta to save)."""
    settings = from_dict(SemanticTrainSettings, dict(file_cfg.get("settings") or {}))
    cfg = semantic_model_config(task, file_cfg.get("model") or {}, preset, class_names)
    names = cfg.class_names or {c: f"class {c}" for c in range(1, cfg.num_classes + 1)}
    emb = None
    if isinstance(cfg, MONCHConfig):
        prompt_set = settings.prompt_set or cfg.prompt_set or match_prompt_set(names)
        emb = class_text_embeddings(names, prompt_set, settings.text_encoder, settings.text_cache or None)
        cfg = dataclasses.replace(cfg, prompt_set=prompt_set, text_encoder=settings.text_encoder,
                                  text_dim=int(emb.shape[2]), sentences_per_class=int(emb.shape[1]))
    augment = dataclasses.replace(augment, mean=cfg.pixel_mean, std=cfg.pixel_std)
    cfg, augment, train_samples, val_samples = adapt_training_data(cfg, channels, augment, train_samples, val_samples)
    t = SemanticTask(task, cfg, augment, train_samples, val_samples, text_embeddings=emb, settings=settings)
    return t, cfg, {"settings": to_dict(settings), "augment": augment.to_dict()}
