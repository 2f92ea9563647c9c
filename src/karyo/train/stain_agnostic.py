"""The stain-agnostic training recipe: channel adapter + CellViT trained on the foreground map with Lovász-hinge +
cross-entropy, instances by threshold + watershed (issue 7; the seed is Kontarou & Fredj-Zadoun 2025,
"Computationally efficient stain agnostic nuclei segmentation", §2.4–2.7).

* Network: :class:`~karyo.models.cellvit.CellViT` (karyo's CPU preset unless configured) with an optional
  :class:`~karyo.models.adapter.ChannelAdapter` in front; only its NP (nucleus/background) branch is trained and
  run (the seed predicts a dense binary map).
* Loss (:func:`stain_agnostic_loss`): λ·Lovász-hinge + (1 − λ)·cross-entropy on the foreground map, λ = 0.7 (seed
  §2.5). The Lovász hinge (:func:`lovasz_hinge`, Berman, Rannen Triki & Blaschko, CVPR 2018, "The Lovász-Softmax
  loss", binary case) is applied to the log-odds ``logit_fg − logit_bg`` of the two-class output, per image by
  default (the paper's ``per_image`` variant), and written here from the paper's definitions. For networks trained
  from scratch (the seed fine-tunes a pretrained CellViT) ``lovasz_warmup_epochs`` > 0 ramps λ from 0 to its value
  (cross-entropy first, as PaddleSeg's Lovász guide advises): with λ = 0.7 from a random start, H&E made 8-channel
  stalled in the Lovász hinge's all-foreground state (train CE ≈ 0.65–0.69, above a constant predictor's 0.44;
  recall 0.98, precision 0.40 after 20 epochs; docs/benchmarks.md). Default 0: the seed's schedule.
* Optimisation (the seed's; set in ``configs/stain_agnostic_*.yaml`` through :class:`~karyo.train.loop.TrainConfig`):
  Adam 1e-3, ReduceLROnPlateau (×0.5, patience 5) on the validation score, batch 3 × 4 accumulation steps, mixed
  precision (``amp``).
* Post-processing: :mod:`karyo.infer.binary` (0.3 threshold, 32 px clean-up, distance-transform watershed), stored
  as ``CellViTConfig.binary`` so the exported model runs it in ``karyo segment``.
* Validation and reports: the seed's metric table (:class:`SeedMetrics`): pixel accuracy, F1, precision, recall
  of the foreground pixels; mAP over IoU 0.5:0.05:0.95, F1@0.5, F1-mean, SQ, PQ of the instances. ``score`` (best
  checkpoint, plateau schedule) is F1-mean by default — the curve the seed follows (its Fig. 8).

Samples are brought to the adapter's channels (:func:`karyo.train.channels.map_samples`, the adapter's
channel-invariance rule); a channel a sample lacks is NaN in the batch and filled by the adapter, as at inference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from karyo.config import from_dict, save_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.dataset import NucleusDataset
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.infer.binary import BinaryConfig, binary_instances
from karyo.metrics.instance import contingency, pq_from_contingency, pq_from_counts
from karyo.metrics.matching import IOU_THRESHOLDS, ThresholdMatching, matching_from_contingency
from karyo.metrics.semantic import SemanticMetrics
from karyo.models.cellvit import CellViT, CellViTConfig, CellViTModel
from karyo.train.cellvit import _same_shape_batches
from karyo.train.channels import fit_channel_stats, map_samples, mark_missing, parse_channels, with_adapter
from karyo.train.loop import TrainConfig
from karyo.train.prompter import seeded_loader

__all__ = [
    "SeedMetrics",
    "StainAgnosticSettings",
    "StainAgnosticTask",
    "hash_split",
    "lovasz_grad",
    "lovasz_hinge",
    "stain_agnostic_config",
    "stain_agnostic_loss",
    "validate_foreground",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- loss


def lovasz_grad(gt_sorted: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted in decreasing order (Berman et al.
    2018, eq. 8 and Alg. 1), along the last dimension: g_i = J(π_1..π_i) − J(π_1..π_{i−1}), J the Jaccard loss
    1 − |y ∩ ŷ| / |y ∪ ŷ| of the set of the i largest errors."""
    gts = gt_sorted.sum(-1, keepdim=True)
    inter = gts - gt_sorted.cumsum(-1)
    union = gts + (1.0 - gt_sorted).cumsum(-1)
    jac = 1.0 - inter / union  # union >= 1 everywhere: the first element adds 1 to one of the two sums
    return torch.cat([jac[..., :1], jac[..., 1:] - jac[..., :-1]], dim=-1)


def lovasz_hinge(logits: Tensor, labels: Tensor, per_image: bool = True) -> Tensor:
    """Binary Lovász hinge (Berman et al. 2018, §3.1): hinge errors m_i = max(0, 1 − s_i·y*_i) (y* = ±1), sorted
    decreasingly, dotted with :func:`lovasz_grad` — the tight convex surrogate of 1 − IoU of the foreground.

    ``logits``: real scores (B×H×W or any B×...), > 0 means foreground; ``labels``: same shape, 0/1. ``per_image``:
    the loss of each image, averaged (the paper's ``per_image=True``); else one loss over all pixels of the batch.
    Vectorised over the batch (one sort of B×P).
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in shape")
    s = logits.float().reshape(logits.shape[0], -1) if per_image else logits.float().reshape(1, -1)
    y = labels.to(s.dtype).reshape(s.shape)
    errors = 1.0 - s * (2.0 * y - 1.0)
    errors_sorted, perm = torch.sort(errors, dim=-1, descending=True)
    grad = lovasz_grad(torch.gather(y, -1, perm))
    return (F.relu(errors_sorted) * grad).sum(-1).mean()


def stain_agnostic_loss(np_logits: Tensor, foreground: Tensor, lovasz_weight: float = 0.7,
                        per_image: bool = True) -> dict[str, Tensor]:
    """The seed's loss: λ·Lovász-hinge + (1 − λ)·CE on the B×2×H×W NP logits against the B×H×W foreground (0/1)."""
    logits = np_logits.float()
    target = foreground.long()
    ce = F.cross_entropy(logits, target)
    lov = lovasz_hinge(logits[:, 1] - logits[:, 0], target, per_image=per_image)
    return {"loss": lovasz_weight * lov + (1.0 - lovasz_weight) * ce, "lovasz": lov, "ce": ce}


# -------------------------------------------------------------------------------------------------- metrics


class SeedMetrics:
    """The seed's metric table accumulated over a dataset (pooled: every count is summed over images first).

    Pixel level (foreground vs background, all pixels of all images): ``pixel_accuracy``, ``f1``, ``precision``,
    ``recall``. Instance level: ``map`` — the DSB2018 / StarDist average precision TP/(TP+FP+FN) averaged over IoU
    0.5:0.05:0.95 (the seed does not define its mAP; its 0.77 next to F1@0.5 = 0.03 suggests a pixel-level AP, so
    numbers are not comparable), ``f1_05`` (F1 at IoU > 0.5, equal to PQ's DQ), ``f1_mean`` (mean F1 over the same
    thresholds), ``sq``, ``pq`` (HoVer-Net matching at IoU > 0.5, pooled TP/FP/FN and IoU sum).
    """

    KEYS = ("pixel_accuracy", "f1", "precision", "recall", "map", "f1_05", "f1_mean", "sq", "pq")

    def __init__(self) -> None:
        self.pixels = SemanticMetrics(num_classes=1, include_background=False)
        self.matches: list[ThresholdMatching] = []
        self.tp = self.fp = self.fn = 0
        self.sum_iou = 0.0
        self.images = 0

    def update(self, true: np.ndarray, pred: np.ndarray) -> None:
        true, pred = np.asarray(true), np.asarray(pred)
        self.pixels.update((true > 0).astype(np.uint8), (pred > 0).astype(np.uint8))
        ct = contingency(true, pred)
        self.matches.append(matching_from_contingency(ct, IOU_THRESHOLDS))
        pq = pq_from_contingency(ct)
        self.tp, self.fp, self.fn = self.tp + pq.tp, self.fp + pq.fp, self.fn + pq.fn
        self.sum_iou += pq.sum_iou
        self.images += 1

    def compute(self) -> dict[str, float]:
        if not self.images:
            return dict.fromkeys(self.KEYS, math.nan)
        px = self.pixels.compute()
        tm = ThresholdMatching.pool(self.matches)
        pq, _, sq = pq_from_counts(self.tp, self.fp, self.fn, self.sum_iou)
        return {"pixel_accuracy": px.pixel_accuracy, "f1": px.f1[1], "precision": px.precision[1],
                "recall": px.recall[1], "map": tm.map, "f1_05": float(tm.f1[0]), "f1_mean": tm.f1_mean, "sq": sq,
                "pq": pq, "n_true": float(tm.n_true), "n_pred": float(tm.n_pred)}


def hash_split(ids: Sequence[str], val: float = 0.2, test: float = 0.2) -> dict[str, str]:
    """A split that depends on each id alone: u = first 8 hex digits of sha256(id) / 16⁸ ∈ [0, 1); ``test`` when
    u < test, ``val`` when u < test + val, else ``train``. Adding or removing images never moves the others."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ValueError(f"need val, test >= 0 and val + test < 1, got {val}, {test}")
    out = {}
    for i in ids:
        u = int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) / 16**8
        out[str(i)] = "test" if u < test else ("val" if u < test + val else "train")
    return out


# --------------------------------------------------------------------------------------------------------- task


@dataclass
class StainAgnosticSettings:
    """Loss and selection settings of the recipe (``settings`` section of a run config)."""

    lovasz_weight: float = 0.7  # λ of the seed
    per_image: bool = True  # Lovász hinge per image (Berman et al.'s default), else over the batch
    score: str = "f1_mean"  # validation metric used as "score" (best checkpoint and plateau schedule)
    lovasz_warmup_epochs: int = 0  # > 0: λ·e/warm-up in (0-based) epoch e until it reaches λ; 0 = the seed

    def __post_init__(self) -> None:
        if not 0.0 <= self.lovasz_weight <= 1.0:
            raise ValueError(f"lovasz_weight must lie in [0, 1], got {self.lovasz_weight}")
        if self.lovasz_warmup_epochs < 0:
            raise ValueError(f"lovasz_warmup_epochs must be >= 0, got {self.lovasz_warmup_epochs}")
        if self.score not in SeedMetrics.KEYS:
            raise ValueError(f"score must be one of {SeedMetrics.KEYS}, got {self.score!r}")

    def lovasz_weight_at(self, epoch: int) -> float:
        """λ in (0-based) training epoch ``epoch``: the linear warm-up from pure cross-entropy."""
        if self.lovasz_warmup_epochs <= 0:
            return self.lovasz_weight
        return self.lovasz_weight * min(1.0, epoch / self.lovasz_warmup_epochs)


def stain_agnostic_config(model: dict[str, Any] | None, preset: str | None = None,
                          channels: int | Sequence[str] | None = None, augment: AugmentConfig | None = None
                          ) -> CellViTConfig:
    """The model config of a run from its ``model`` section (a full CellViT config, or ``preset:`` + overrides,
    default ``"cpu"``): one class ("nucleus"), binary post-processing, the adapter for ``channels``."""
    base = dict(model or {})
    if "encoder" in base:
        cfg = from_dict(CellViTConfig, base)
    else:
        name = base.pop("preset", preset or "cpu")
        base.setdefault("num_classes", 1)
        base.setdefault("class_names", {1: "nucleus"})
        base.setdefault("binary", BinaryConfig())
        cfg = CellViTConfig.preset(name, **base)
    if cfg.binary is None:
        cfg = dataclasses.replace(cfg, binary=BinaryConfig())
    return with_adapter(cfg, channels, augment)


class StainAgnosticTask:
    """:class:`karyo.train.loop.Task` of the recipe (module docstring). ``config`` should come from
    :func:`stain_agnostic_config` (the data's normalisation is written into it here, as it is what the network
    sees); ``RUN/model`` is a model folder ``karyo.load`` / ``karyo segment --model`` open directly."""

    name = "stain_agnostic"

    def __init__(self, config: CellViTConfig, augment: AugmentConfig, train_samples: Sequence[Sample],
                 val_samples: Sequence[Sample], settings: StainAgnosticSettings | None = None):
        cfg = config if config.binary is not None else dataclasses.replace(config, binary=BinaryConfig())
        self.settings = settings or StainAgnosticSettings()
        self.epoch = 0
        train, self.train_present = map_samples(train_samples, cfg.adapter, cfg.in_chans)
        val, self.val_present = map_samples(val_samples, cfg.adapter, cfg.in_chans)
        augment = fit_channel_stats(augment, train, self.train_present)
        self.config = with_adapter(cfg, None, augment)
        self.augment = augment
        self.train_set = NucleusDataset(train, augment, train=True, crops_per_image="auto")
        self.val_set = NucleusDataset(val, augment, train=False, pad_multiple=self.config.stride)

    def model(self) -> CellViT:
        return CellViT(self.config)

    def train_loader(self, epoch: int, cfg: TrainConfig):
        self.epoch = epoch  # the loss's Lovász warm-up follows the epoch being trained (also after a resume)
        return seeded_loader(self.train_set, cfg, epoch)

    def loss(self, model: CellViT, batch: dict, device: torch.device) -> dict[str, Tensor]:
        x = batch["image"]
        if self.train_present is not None:
            x = mark_missing(x, self.train_present[batch["index"].numpy()])
        logits = model(x.to(device), heads=("np",))["np"]
        fg = (batch["instances"] > 0).to(device)
        s = self.settings
        return stain_agnostic_loss(logits, fg, s.lovasz_weight_at(self.epoch), s.per_image)

    def validate(self, model: CellViT, device: torch.device) -> dict[str, float]:
        metrics = validate_foreground(model, self.val_set, self.config, device, self.val_present)
        metrics["score"] = metrics[self.settings.score]
        return metrics

    def export(self, model: CellViT, directory: Path) -> None:
        m = CellViTModel(self.config)
        m.net.load_state_dict(model.state_dict())
        m.save(directory)
        save_json(directory / "training.json", {"augment": self.augment.to_dict(),
                                                 "settings": to_dict(self.settings)})


@torch.no_grad()
def validate_foreground(model: CellViT, dataset: NucleusDataset, config: CellViTConfig, device: torch.device,
                        present: np.ndarray | None = None, batch_size: int = 4) -> dict[str, float]:
    """The seed's metric table (:class:`SeedMetrics`) of the binary post-processed NP maps on ``dataset``."""
    acc = SeedMetrics()
    binary = config.binary or BinaryConfig()
    for batch in _same_shape_batches(dataset, batch_size):
        x = batch["image"]
        if present is not None:
            x = mark_missing(x, present[batch["index"].numpy()])
        prob = model(x.to(device), heads=("np",))["np"].float().softmax(1)[:, 1].cpu().numpy()
        for b, size in enumerate(batch["orig_size"]):
            h, w = (int(v) for v in size)
            acc.update(batch["instances"][b, :h, :w].numpy(), binary_instances(prob[b, :h, :w], binary))
    return acc.compute()


def build_stain_agnostic_task(file_cfg: dict, preset: str | None, augment: AugmentConfig,
                              train_samples: Sequence[Sample], val_samples: Sequence[Sample],
                              channels: str | int | Sequence[str] | None = None
                              ) -> tuple[StainAgnosticTask, CellViTConfig, dict]:
    """``karyo train stain_agnostic``: (task, model config, run metadata) from a run config's sections."""
    model_cfg = stain_agnostic_config(file_cfg.get("model"), preset, parse_channels(channels), augment)
    if model_cfg.adapter is None and train_samples and train_samples[0].image.shape[2] != model_cfg.in_chans:
        raise InputError(None, f"the data have {train_samples[0].image.shape[2]} channels and the model takes "
                               f"{model_cfg.in_chans}: pass --channels (or a model.adapter section)")
    settings = from_dict(StainAgnosticSettings, file_cfg.get("settings", {}))
    task = StainAgnosticTask(model_cfg, augment, train_samples, val_samples, settings)
    return task, task.config, {"settings": to_dict(settings)}
