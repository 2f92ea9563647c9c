"""Training the promptable segmentor (PromptNucSeg supplementary §A): Z = 25 nuclei per image, each prompted
with its centre (jittered) and K = 1 negative point on the nearest neighbour, loss ω·focal + dice + IoU MSE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from karyo.config import save_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.dataset import NucleusDataset, collate_nuclei
from karyo.data.sample import Sample
from karyo.infer.assemble import assemble_instances
from karyo.metrics.instance import aggregated_jaccard_index, panoptic_quality
from karyo.models.segmentor import Segmentor, SegmentorConfig, masks_to_image
from karyo.models.segmentor_train import (
    crop_targets,
    sample_background_prompts,
    sample_prompt_batch,
    sample_prompts,
    segmentor_loss,
)
from karyo.train.loop import TrainConfig
from karyo.train.prompter import seeded_loader
from karyo.train.verifier import roc_auc


@dataclass
class SegmentorTrainSettings:
    """PromptNucSeg's recipe: Z nuclei per image, K negatives, loss weight ω; jitter of the positive point
    imitates the prompter's localisation error."""

    nuclei_per_image: int = 25
    negatives: int = 1
    omega: float = 20.0
    jitter_px: float = 3.0
    negative_dropout: float = 0.0  # share of prompts trained without negatives (see sample_prompts)
    background_prompts: int = 0  # prompts on no nucleus per image, empty-mask targets (sample_background_prompts)
    inside_share: float = 0.0  # share of positives anywhere in the nucleus, not near its centre (sample_prompts)


class SegmentorTask:
    """:class:`karyo.train.loop.Task` for the promptable segmentor."""

    name = "segmentor"

    def __init__(self, config: SegmentorConfig, augment: AugmentConfig, settings: SegmentorTrainSettings,
                 train_samples: Sequence[Sample], val_samples: Sequence[Sample], seed: int = 0):
        self.config, self.augment, self.settings, self.seed = config, augment, settings, seed
        self.train_set = NucleusDataset(train_samples, augment, train=True, crops_per_image="auto")
        self.val_set = NucleusDataset(val_samples, augment, train=False, pad_multiple=32)
        self.epoch, self.step = 0, 0

    def model(self) -> Segmentor:
        return Segmentor(self.config)

    def train_loader(self, epoch: int, cfg: TrainConfig) -> DataLoader:
        self.epoch, self.step = epoch, 0
        return seeded_loader(self.train_set, cfg, epoch)

    def loss(self, model: Segmentor, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        st = self.settings
        rng = np.random.default_rng([self.seed, self.epoch, self.step])
        self.step += 1
        inst = batch["instances"]
        intensity = batch["image"].mean(dim=1).numpy() if st.background_prompts > 0 else None
        pb = sample_prompt_batch(inst.numpy(), z=st.nuclei_per_image, k_neg=st.negatives, jitter_px=st.jitter_px,
                                 rng=rng, negative_dropout=st.negative_dropout, background=st.background_prompts,
                                 intensity=intensity, inside_share=st.inside_share)
        out = model(batch["image"].to(device), pb.image_index, pb.points, pb.labels)
        target = crop_targets(inst.to(device), pb.image_index, pb.instance_ids, out.window_xyxy, out.stride_out)
        return segmentor_loss(out.mask_logits, target, out.iou_pred, omega=st.omega)

    def validate(self, model: Segmentor, device: torch.device) -> dict[str, float]:
        return validate_masks(model, self.val_set, device, self.settings.negatives,
                              background=self.settings.background_prompts)

    def export(self, model: Segmentor, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), directory / "segmentor.pt")
        save_json(directory / "segmentor.json", {"config": to_dict(self.config), "augment": self.augment.to_dict(),
                                                 "settings": to_dict(self.settings)})


def validate_masks(model: Segmentor, dataset: NucleusDataset, device: torch.device, negatives: int = 1,
                   background: int = 0) -> dict[str, float]:
    """PQ and AJI of the instance maps assembled from masks prompted at the ground-truth centres (an upper
    bound for the full pipeline: it measures the segmentor alone). ``score`` = mean PQ.

    With ``background`` > 0 each image also gets that many background prompts (fixed per image), and
    ``background_auc`` says how well the predicted IoU tells them from the nucleus prompts (1 = always)."""
    pqs, ajis, iou_nuclei, iou_background = [], [], [], []
    loader = DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate_nuclei)
    seen = 0
    for batch in loader:
        emb = model.embed(batch["image"].to(device))
        intensity = batch["image"].mean(dim=1).numpy() if background > 0 else None
        for b, (inst, size) in enumerate(zip(batch["instances"], batch["orig_size"], strict=True)):
            seen += 1
            h, w = (int(v) for v in size)
            truth = inst[:h, :w].numpy()
            if truth.max() == 0:
                continue
            pts, labels, _ = sample_prompts(truth, z=10**9, k_neg=negatives, jitter_px=0.0, rng=0)
            out = model.decode(emb, torch.full((len(pts),), b, dtype=torch.long), torch.from_numpy(pts),
                               torch.from_numpy(labels))
            wm = masks_to_image(out, probabilities=True)
            asm = assemble_instances(wm.masks[:, 0], wm.window_xyxy, (h, w), out.iou_pred[:, 0].cpu().numpy())
            pqs.append(panoptic_quality(truth, asm.instances).pq)
            aji = aggregated_jaccard_index(truth, asm.instances).value
            ajis.append(aji if np.isfinite(aji) else 0.0)  # NaN only for an empty prediction: nothing matched
            if background > 0:
                iou_nuclei.append(out.iou_pred[:, 0].float().cpu().numpy())
                bpts, blabels, _ = sample_background_prompts(truth, background, negatives, rng=seen,
                                                             intensity=intensity[b, :h, :w])
                if len(bpts):
                    bout = model.decode(emb, torch.full((len(bpts),), b, dtype=torch.long),
                                        torch.from_numpy(bpts), torch.from_numpy(blabels))
                    iou_background.append(bout.iou_pred[:, 0].float().cpu().numpy())
    if not pqs:
        return {"pq_oracle": float("nan"), "aji_oracle": float("nan"), "score": float("nan")}
    pq = float(np.mean(pqs))
    metrics = {"pq_oracle": pq, "aji_oracle": float(np.mean(ajis)), "score": pq}
    if iou_background:
        nuc, bg = np.concatenate(iou_nuclei), np.concatenate(iou_background)
        metrics["background_auc"] = roc_auc(np.r_[np.ones(len(nuc), bool), np.zeros(len(bg), bool)], np.r_[nuc, bg])
        metrics["background_iou"] = float(bg.mean())
    return metrics
