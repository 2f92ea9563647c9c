"""Training the CellViT-style model (Hörst et al. 2024) with HoVer-Net targets and losses (Graham et al. 2019).

Targets come from each augmented crop's instance map (:func:`karyo.models.cellvit.cellvit_targets`: NP mask, HV
maps, NT class map with unknown-class nuclei ignored); the loss is :func:`karyo.models.cellvit.cellvit_loss`.
Validation post-processes the predicted maps exactly as inference does and scores the instances with karyo's
exact metrics: PQ, AJI (HoVer-Net definitions, mean over images), detection F1d and per-class F1c (HoVer-Net
centroid pairing, pooled); ``score`` (what selects the best checkpoint) is the mean PQ.

``RUN/model`` receives ``cellvit.pt`` (state dict) and ``cellvit.json`` (model config + augmentation);
:func:`export_cellvit_model` turns that into a model folder that ``karyo.load`` opens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from karyo.config import from_dict, load_json, save_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.dataset import NucleusDataset, collate_nuclei
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.infer.hovernet import hovernet_postprocess
from karyo.metrics.detection import NucleiTypeStats
from karyo.metrics.instance import aggregated_jaccard_index, panoptic_quality
from karyo.models.cellvit import (
    WEIGHTS_FILE,
    CellViT,
    CellViTConfig,
    CellViTModel,
    cellvit_loss,
    cellvit_targets,
    postprocess_params,
)
from karyo.models.vit import read_state_dict
from karyo.train.loop import TrainConfig
from karyo.train.prompter import seeded_loader

__all__ = ["CellViTTask", "cellvit_config", "export_cellvit_model", "validate_cellvit"]

log = logging.getLogger(__name__)


def cellvit_config(model: dict[str, Any] | None, preset: str | None = None,
                   class_names: dict[int, str] | None = None, augment: AugmentConfig | None = None
                   ) -> CellViTConfig:
    """The model config of a run from its ``model`` section: a full config (has ``encoder``), or a preset name
    (``preset:`` key, the ``preset`` argument, else ``"cpu"``) with field overrides. The data's class names set
    ``num_classes``/``class_names`` unless given; ``augment`` sets the pixel statistics the network will see."""
    base = dict(model or {})
    if "encoder" in base:
        cfg = from_dict(CellViTConfig, base)
    else:
        name = base.pop("preset", preset or "cpu")
        if class_names and "num_classes" not in base:
            base.update(num_classes=max(class_names), class_names=dict(class_names))
        cfg = CellViTConfig.preset(name, **base)
    return _with_augment_stats(cfg, augment) if augment is not None else cfg


def _with_augment_stats(cfg: CellViTConfig, augment: AugmentConfig) -> CellViTConfig:
    mean, std = augment.channel_stats(cfg.in_chans) if augment.normalize else ((0.0,) * cfg.in_chans,
                                                                                (1.0,) * cfg.in_chans)
    if (tuple(mean), tuple(std)) == (cfg.pixel_mean, cfg.pixel_std):
        return cfg
    return dataclasses.replace(cfg, pixel_mean=tuple(mean), pixel_std=tuple(std))


class CellViTTask:
    """:class:`karyo.train.loop.Task` for :class:`~karyo.models.cellvit.CellViT`.

    The training data's normalisation (``augment``) is what the network sees, so the config's
    ``pixel_mean``/``pixel_std`` are set from it (and exported with the model). With ``num_tissues`` > 0 the
    tissue head trains on ``Sample.tissue`` strings named in ``tissue_names``; other samples are ignored by it.
    """

    name = "cellvit"

    def __init__(self, config: CellViTConfig, augment: AugmentConfig, train_samples: Sequence[Sample],
                 val_samples: Sequence[Sample]):
        self.config = _with_augment_stats(config, augment)
        self.augment = augment
        self.train_set = NucleusDataset(train_samples, augment, train=True, crops_per_image="auto")
        self.val_set = NucleusDataset(val_samples, augment, train=False, pad_multiple=self.config.stride)
        self._tissue: np.ndarray | None = None
        if self.config.num_tissues:
            index = {name: i for i, name in self.config.tissue_names.items()}
            self._tissue = np.array([index.get(train_samples[i].tissue, -100) for i in range(len(train_samples))],
                                    np.int64)
            if (self._tissue < 0).all():
                log.warning("no training sample has a tissue named in tissue_names: the tissue head will not train")

    def model(self) -> CellViT:
        return CellViT(self.config)

    def train_loader(self, epoch: int, cfg: TrainConfig) -> DataLoader:
        return seeded_loader(self.train_set, cfg, epoch)

    def loss(self, model: CellViT, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        out = model(batch["image"].to(device))
        targets = cellvit_targets(batch["instances"], batch["types"], device)
        tissue = None
        if self._tissue is not None:
            tissue = torch.from_numpy(self._tissue[batch["index"].numpy()]).to(device)
        return cellvit_loss(out, targets, self.config, tissue)

    def validate(self, model: CellViT, device: torch.device) -> dict[str, float]:
        return validate_cellvit(model, self.val_set, self.config, device)

    def export(self, model: CellViT, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, directory / WEIGHTS_FILE)
        save_json(directory / "cellvit.json", {"config": to_dict(self.config), "augment": self.augment.to_dict()})


def _same_shape_batches(dataset: NucleusDataset, batch_size: int) -> Iterator[dict]:
    """Consecutive items of equal size collated together (validation images may differ in size)."""
    pending: list[dict] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if pending and (item["image"].shape != pending[0]["image"].shape or len(pending) == batch_size):
            yield collate_nuclei(pending)
            pending = []
        pending.append(item)
    if pending:
        yield collate_nuclei(pending)


@torch.no_grad()
def validate_cellvit(model: CellViT, dataset: NucleusDataset, config: CellViTConfig, device: torch.device,
                     batch_size: int = 4) -> dict[str, float]:
    """PQ / AJI (mean over images with nuclei), F1d and F1c (pooled) of the post-processed predictions.

    Images come padded to the encoder stride; maps are cropped back to each image's size before post-processing.
    F1c uses only images whose nuclei all have a known class. ``score`` = mean PQ.
    """
    params = postprocess_params(config)
    detection = NucleiTypeStats(dummy_for_empty=False)
    typing = NucleiTypeStats(dummy_for_empty=False)
    pqs, ajis = [], []
    classes_seen: set[int] = set()
    for batch in _same_shape_batches(dataset, batch_size):
        out = model(batch["image"].to(device))
        np_prob = out["np"].softmax(1)[:, 1].cpu().numpy()
        hv = out["hv"].cpu().numpy()
        nt = out["nt"].softmax(1).cpu().numpy()
        for b, size in enumerate(batch["orig_size"]):
            h, w = (int(v) for v in size)
            truth = batch["instances"][b, :h, :w].numpy()
            truth_type = batch["types"][b, :h, :w].numpy()
            res = hovernet_postprocess(np_prob[b, :h, :w], hv[b, :, :h, :w], nt[b, :, :h, :w], **params)
            pred = res.instances
            lut = np.zeros(int(pred.max()) + 1, np.int64)
            for i, c in res.classes.items():
                lut[i] = c
            pred_type = lut[pred]
            detection.add(truth, None, pred, None)
            true_cls = batch["classes"][b].numpy()
            if len(true_cls) and (true_cls > 0).all():
                classes_seen.update(int(c) for c in np.unique(true_cls))
                typing.add(truth, truth_type, pred, pred_type)
            if truth.max() == 0:
                continue
            pqs.append(panoptic_quality(truth, pred).pq)
            aji = aggregated_jaccard_index(truth, pred).value
            ajis.append(aji if np.isfinite(aji) else 0.0)  # NaN only for an empty prediction: nothing matched
    det = detection.compute([0])
    metrics = {"pq": float(np.mean(pqs)) if pqs else float("nan"),
               "aji": float(np.mean(ajis)) if ajis else float("nan"),
               "f1_d": det.f1_d, "precision_d": det.precision_d, "recall_d": det.recall_d}
    if classes_seen:
        typ = typing.compute(sorted(classes_seen))
        metrics.update({f"f1_c{c}": v for c, v in typ.f1_type.items()})
        f1c = [v for v in typ.f1_type.values() if np.isfinite(v)]
        if f1c:
            metrics["f1_c_mean"] = float(np.mean(f1c))
    metrics["score"] = metrics["pq"]
    return metrics


def export_cellvit_model(run_dir: str | os.PathLike, out_dir: str | os.PathLike, device: str = "cpu") -> Path:
    """Build a model folder (``config.json`` + ``cellvit.pt``) from a finished run's ``RUN/model``.

    The result opens with ``karyo.load(out_dir)``; model cards and registry entries are the packager's job.
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "cellvit.json").is_file():
        if not run_dir.is_dir():
            raise InputError(run_dir, "run folder not found")
        task = (load_json(run_dir / "train_config.json").get("task") if (run_dir / "train_config.json").is_file()
                else None)
        if task and task != "cellvit":
            raise InputError(run_dir, f"is a {task} run, not a cellvit run")
        if (run_dir / "last.pt").is_file():
            raise InputError(run_dir, f"has checkpoints but no exported network (model/cellvit.json): it was "
                                      f"interrupted; finish it with karyo train cellvit --out {run_dir} --resume")
        raise InputError(run_dir, "no model/cellvit.json: not a finished `karyo train cellvit` run")
    meta = load_json(model_dir / "cellvit.json")
    cfg = from_dict(CellViTConfig, meta.get("config", {}), model_dir / "cellvit.json")
    model = CellViTModel(cfg, device=device)
    model.net.load_state_dict(read_state_dict(model_dir / WEIGHTS_FILE))
    return model.save(out_dir)
