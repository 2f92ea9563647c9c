"""Training the PromptNucSeg prompter (supplementary §A): Hungarian-matched point + class learning."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from karyo.config import save_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.dataset import NucleusDataset, collate_nuclei
from karyo.data.sample import Sample
from karyo.metrics.detection import NucleiTypeStats
from karyo.models.prompter import Prompter, PrompterConfig, prompter_loss
from karyo.train.loop import TrainConfig


def seeded_loader(dataset: NucleusDataset, cfg: TrainConfig, epoch: int, batch_size: int | None = None
                  ) -> DataLoader:
    """A shuffled loader whose order and augmentations depend on (seed, epoch) only (resume-exact)."""
    dataset.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=batch_size or cfg.batch_size, shuffle=True, generator=gen,
                      collate_fn=collate_nuclei, num_workers=cfg.num_workers, drop_last=True,
                      persistent_workers=False)


def point_targets(batch: dict, device: torch.device, foreground: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per image: GT centroids and classes, and with ``foreground`` the nucleus mask (for the mask head)."""
    targets = [{"points": c.to(device), "classes": k.to(device)}
               for c, k in zip(batch["centroids"], batch["classes"], strict=True)]
    if foreground:
        for target, instances in zip(targets, batch["instances"], strict=True):
            target["foreground"] = (instances > 0).to(device)
    return targets


def predict_points(model: Prompter, images: torch.Tensor) -> list:
    """Points of a batch of normalised, 32-padded images, with the model's decoding settings."""
    return model.decode(model(images))


class PrompterTask:
    """:class:`karyo.train.loop.Task` for the point prompter."""

    name = "prompter"

    def __init__(self, config: PrompterConfig, augment: AugmentConfig, train_samples: Sequence[Sample],
                 val_samples: Sequence[Sample]):
        self.config = config
        self.augment = augment
        self.train_set = NucleusDataset(train_samples, augment, train=True, crops_per_image="auto")
        self.val_samples = val_samples
        self.val_set = NucleusDataset(val_samples, augment, train=False, pad_multiple=32)

    def model(self) -> Prompter:
        return Prompter(self.config)

    def train_loader(self, epoch: int, cfg: TrainConfig) -> DataLoader:
        return seeded_loader(self.train_set, cfg, epoch)

    def loss(self, model: Prompter, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        out = model(batch["image"].to(device))
        targets = point_targets(batch, device, foreground="mask_logits" in out)
        losses = prompter_loss(out, targets, self.config)
        parts = {"loss": losses["loss"], "cls": losses["cls"], "reg": losses["reg"]}
        if "mask_logits" in out:
            parts["mask"] = losses["mask"]
        return parts

    def validate(self, model: Prompter, device: torch.device) -> dict[str, float]:
        return validate_points(model, self.val_set, device)

    def export(self, model: Prompter, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), directory / "prompter.pt")
        save_json(directory / "prompter.json", {"config": to_dict(self.config), "augment": self.augment.to_dict()})


def validate_points(model: Prompter, dataset: NucleusDataset, device: torch.device, batch_size: int = 8
                    ) -> dict[str, float]:
    """HoVer-Net detection F1d (all images) and per-class F1c (images whose nuclei have classes) on a
    validation set.

    ``score`` (what best-checkpoint selection maximises) = mean of F1d and the mean F1c over the classes
    present, so a model that finds nuclei but cannot type them does not win. Nuclei of unknown class (0, from
    datasets without class labels) count for detection only.
    """
    detection = NucleiTypeStats(dummy_for_empty=False)
    typing = NucleiTypeStats(dummy_for_empty=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_nuclei)
    classes_seen: set[int] = set()
    for batch in loader:
        preds = predict_points(model, batch["image"].to(device))
        for pred, xy, cls, size in zip(preds, batch["centroids"], batch["classes"], batch["orig_size"], strict=True):
            h, w = (int(v) for v in size)
            p = pred.points
            inside = (p[:, 0] >= 0) & (p[:, 0] < w) & (p[:, 1] >= 0) & (p[:, 1] < h)
            true_xy, true_cls = xy.numpy(), cls.numpy()
            detection.add_points(true_xy, np.zeros_like(true_cls), p[inside], np.zeros(int(inside.sum()), np.int64))
            if len(true_cls) and (true_cls > 0).all():
                classes_seen.update(int(c) for c in np.unique(true_cls))
                typing.add_points(true_xy, true_cls, p[inside], pred.classes[inside])
    det = detection.compute([0])
    out = {"f1_d": det.f1_d, "precision_d": det.precision_d, "recall_d": det.recall_d}
    score = det.f1_d
    if classes_seen:
        typ = typing.compute(sorted(classes_seen))
        out["acc_type"] = typ.acc_type
        out.update({f"f1_c{c}": v for c, v in typ.f1_type.items()})
        f1c = [v for v in typ.f1_type.values() if np.isfinite(v)]
        if f1c:
            out["f1_c_mean"] = float(np.mean(f1c))
            score = 0.5 * (det.f1_d + out["f1_c_mean"])
    out["score"] = score
    return out
