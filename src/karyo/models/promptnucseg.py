"""PromptNucSeg (Shui et al., ECCV 2024) as one karyo model: a point prompter finds and classifies every
nucleus, a SAM-architecture promptable segmentor turns each point (plus negative points on its nearest
neighbours) into a mask, and the masks are resolved into one instance map.

Inference on CPU, in this order: the prompter runs once over the whole (padded) image; the segmentor's image
encoder runs on overlapping ``tile_size`` tiles (its global attention is quadratic in tokens) and each point
is decoded in the tile where it lies farthest from the border; all prompts of an image are decoded in batches;
masks are pasted and resolved by per-pixel maximum probability (:mod:`karyo.infer.assemble`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from karyo.device import pick_device
from karyo.infer.assemble import assemble_instances, stability_scores, suppress_duplicate_masks, suppress_pairs
from karyo.infer.prepare import (
    check_mpp,
    check_prompts,
    double_click_px,
    model_input,
    pad_input,
    resample_to_model,
    resize_instances,
)
from karyo.infer.result import SegmentationResult, drop_negated, drop_unprompted, finish
from karyo.models.base import InstanceModel, register
from karyo.models.duplicates import DuplicateJudgeConfig, mask_pairs, probability_at
from karyo.models.prompter import Prompter, PrompterConfig, decode_points, point_nms
from karyo.models.segmentor import Segmentor, SegmentorConfig, masks_to_image, segmentor_config
from karyo.models.verifier import VerifierConfig, candidate_features
from karyo.models.vit import read_state_dict


@dataclass
class PromptNucSegConfig:
    """Both networks' configs plus the inference settings (thresholds tuned on validation data ship here)."""

    prompter: PrompterConfig = field(default_factory=lambda: PrompterConfig.preset("cpu"))
    segmentor: SegmentorConfig = field(default_factory=lambda: segmentor_config("cpu"))
    mpp: float = 0.25  # µm/px of the training data; inputs with another mpp are resampled to it
    negatives: int = 1  # K nearest other points given as negative prompts (PromptNucSeg: K = 1)
    score_threshold: float = 0.5  # on the prompter's foreground probability
    nms_radius_px: float = 6.0
    mask_threshold: float = 0.5  # on the segmentor's mask probability
    min_area: int = 10
    min_kept_fraction: float = 0.35
    # Detected points whose final mask has a SAM stability score below this are dropped (None: off); user-given
    # points are always kept (see resolve). Helps sparse tissue, hurts dense tissue with faint nuclei: off in
    # the shipped model, not in karyo pack's default grid.
    min_stability: float | None = None
    # Detected points whose mask the verifier (karyo.models.verifier, fitted by karyo pack on the training images)
    # gives a probability of being a nucleus below this are dropped (None: off); user-given points are kept.
    verifier: VerifierConfig | None = None
    min_verified: float | None = None
    # Duplicate prompts on one nucleus: before negatives are chosen, each point is decoded alone and a mask is
    # dropped when more than this fraction of the smaller of it and a better-scored mask is their intersection
    # (None: off; see mask_candidates and suppress_duplicate_masks).
    mask_nms_overlap: float | None = None
    # Learned duplicate test (karyo.models.duplicates, fitted by karyo pack on the training images): with
    # min_duplicate_probability set, the worse of two masks is dropped when the judge gives the pair at least that
    # probability of being one nucleus, instead of by overlap alone (mask_nms_overlap must then be None).
    duplicate_judge: DuplicateJudgeConfig | None = None
    min_duplicate_probability: float | None = None
    tile_size: int = 256
    tile_overlap: int = 64
    refine_points: int = 0  # re-prompt at each mask's centroid this many times (see mask_candidates)
    refine_merge_px: float = 0.0  # refined points closer than this to a better-scored one are duplicates
    # With a detail-branch segmentor (SegmentorConfig.detail_dim > 0): also fuse the image detail in the passes
    # before the final one. Off: duplicate removal and refinement need only a mask's overlap and centroid, and
    # skipping the fusion there saves most of its cost (see mask_candidates).
    detail_every_pass: bool = False
    prompt_batch: int = 256
    class_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Both networks read the one prepared input: with channel adapters, they must take the same channels.
        if not adapters_agree(self.prompter.adapter, self.segmentor.adapter):
            raise ValueError("the prompter's and the segmentor's channel adapters must agree (both absent, or the "
                             "same channels and statistics)")
        if self.min_verified is not None and self.verifier is None:
            raise ValueError("min_verified needs a fitted verifier (karyo pack fits one)")
        if self.min_duplicate_probability is not None:
            if self.duplicate_judge is None:
                raise ValueError("min_duplicate_probability needs a fitted duplicate judge (karyo pack fits one)")
            if self.mask_nms_overlap is not None:
                raise ValueError("set either mask_nms_overlap (duplicates by overlap) or min_duplicate_probability "
                                 "(duplicates by the judge), not both")


def candidate_score(prompter_score: np.ndarray, predicted_iou: np.ndarray) -> np.ndarray:
    """A mask candidate's ranking score: the prompter's probability × √(the segmentor's predicted IoU)."""
    return prompter_score * np.sqrt(np.clip(predicted_iou, 1e-6, 1.0))


def _grid(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


@register
class PromptNucSegModel(InstanceModel):
    arch = "promptnucseg"
    config_class = PromptNucSegConfig

    def __init__(self, config: PromptNucSegConfig | None = None, device: str = "cpu"):
        super().__init__(config)
        self.device = pick_device(device)
        self.prompter = Prompter(self.config.prompter).to(self.device).eval()
        self.segmentor = Segmentor(self.config.segmentor).to(self.device).eval()

    @classmethod
    def _from_config(cls, config: PromptNucSegConfig, directory: Path | None, device: str = "cpu"
                     ) -> PromptNucSegModel:
        model = cls(config, device=device)
        if directory is not None:  # weights may be stored in float16; load_state_dict casts to float32
            model.prompter.load_state_dict(read_state_dict(directory / "prompter.pt"))
            model.segmentor.load_state_dict(read_state_dict(directory / "segmentor.pt"))
        return model

    def _save_weights(self, directory: Path) -> None:
        from karyo.data.io import atomic_path

        for name, net in (("prompter.pt", self.prompter), ("segmentor.pt", self.segmentor)):
            with atomic_path(directory / name) as tmp:
                torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)

    @property
    def class_names(self) -> dict[int, str] | None:
        names = self.config.class_names or self.config.prompter.class_names
        return {int(k): v for k, v in names.items()} if names else None

    # ------------------------------------------------------------------------------------------ inference

    def _prepare(self, image: np.ndarray, name: str, channel_names: Sequence[str] | None = None) -> torch.Tensor:
        p = self.config.prompter
        return model_input(image, p.in_chans, p.pixel_mean, p.pixel_std, name or None, adapter=p.adapter,
                           channel_names=channel_names)

    @torch.no_grad()
    def segment(self, image: np.ndarray, *, points: Sequence[tuple[float, float]] | None = None,
                negative: Sequence[tuple[float, float]] | None = None, mpp: float | None = None,
                name: str = "", channel_names: Sequence[str] | None = None) -> SegmentationResult:
        """Segment and classify every nucleus; or, given ``points`` (x, y), only the nuclei at those points
        (``negative`` points mark places that are not the nucleus, as in SAM; without ``points`` they remove the
        nuclei under them from the automatic result, as CellViT's do). With ``points``, the prompter's
        other detections serve as negatives, as neighbours do in automatic segmentation, so that a clicked
        nucleus' mask stops at its unclicked neighbours (validation images, 10 clicks on annotated centroids
        each: masks matching their nucleus at IoU > 0.5 81 % → 84 %); a click that gives no nucleus under
        itself gives nothing, and a clicked nucleus the prompter did not detect has no class (0).
        ``channel_names`` are mapped onto the networks' channel adapters when they have them
        (:mod:`karyo.models.adapter`)."""
        cfg = self.config
        points, negative = check_prompts(points, negative, np.shape(image), name or None,
                                         double_click_px(check_mpp(mpp, name or None), cfg.mpp))
        prep = self.prepare(image, mpp=mpp, name=name, channel_names=channel_names)
        pts, cls, score = self.detect(prep, cfg.score_threshold, cfg.nms_radius_px)
        neg = np.zeros((0, 2), np.float32)
        if points is not None:
            pts, cls, score, neg = self._click_prompts(prep, points, negative, pts, cls, score)
        candidates = self.mask_candidates(prep, pts, cls, score, neg, remove_duplicates=points is None)
        result = self.resolve(prep, candidates, cfg.mask_threshold, **self._detection_filters(points), name=name)
        if points is None:  # negative points alone: every nucleus but those under them
            return finish(drop_negated(result, negative), None, mpp)
        return finish(drop_unprompted(result, points), points, mpp)

    def _click_prompts(self, prep: PreparedImage, points: np.ndarray, negative: np.ndarray | None,
                       pts: np.ndarray, cls: np.ndarray, score: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(prompts, classes, prompter scores, negatives) in model pixels for user ``points``: each click takes
        the class of the detection on its nucleus (:meth:`_clicked_detections`), the other detections are
        neighbours and serve as negatives, after the user's ``negative`` points."""
        user = (np.asarray(points, np.float64).reshape(-1, 2) * prep.scale).astype(np.float32)
        owner = self._clicked_detections(prep, user, pts, score)
        cls, score = _clicked_class(owner, len(user), cls, score)
        neg = np.asarray(pts[owner < 0], np.float32).reshape(-1, 2)
        if negative is not None:
            given = (np.asarray(negative, np.float64).reshape(-1, 2) * prep.scale).astype(np.float32)
            neg = np.concatenate([given, neg])
        return user, cls, score, neg

    def _clicked_detections(self, prep: PreparedImage, user: np.ndarray, pts: np.ndarray, score: np.ndarray
                            ) -> np.ndarray:
        """For each detected point, the index of the user's point on the same nucleus, or −1 for a neighbour.

        A detection within ``CONTEXT_RADIUS`` of a click is its nucleus. Farther ones decide by their masks: the
        clicks and the detections near them are decoded without negatives, and a pair is one nucleus when the
        duplicate judge (:mod:`karyo.models.duplicates`, as for the prompter's own duplicates) says so, or, for
        a model without a judge, when each point lies inside the other's mask. Why: a click near one end of a
        large nucleus is farther than the radius from that nucleus' detected centre, which then served as a
        negative prompt against its own nucleus (a first-time user's report: IoU 0.24–0.39 against 0.69–0.79
        for clicks on the centre; validation numbers in docs/benchmarks.md)."""
        owner = np.full(len(pts), -1, np.int64)
        if not len(pts) or not len(user):
            return owner
        dist, nearest = cKDTree(user).query(pts)
        owner[dist <= CONTEXT_RADIUS * prep.scale] = nearest[dist <= CONTEXT_RADIUS * prep.scale]
        near = np.flatnonzero((owner < 0) & (dist <= CLICK_REACH * prep.scale))
        if not len(near):
            return owner
        both = np.concatenate([user, pts[near]]).astype(np.float32)
        prompter_score = np.concatenate([np.ones(len(user), np.float32), score[near]])
        probs, windows, iou = self._decode(prep, both, np.zeros((0, 2), np.float32), negatives=False,
                                           detail=self.config.detail_every_pass)
        rank = np.concatenate([np.full(len(user), np.inf), candidate_score(score[near], iou[len(user):])])
        pairs = mask_pairs(probs, windows, both, rank, prompter_score, iou)
        judge, threshold = self.config.duplicate_judge, self.config.min_duplicate_probability
        if judge is not None:
            same = judge.probability(pairs.features) >= (0.5 if threshold is None else threshold)
        else:  # each point inside the other's mask
            inside = probability_at(probs, windows, pairs.worse, both[pairs.better][:, None])[:, 0]
            same = (pairs.features[:, 1] > 0.5) & (inside > 0.5)
        clicked = (pairs.better < len(user)) & (pairs.worse >= len(user)) & same
        for u, d in zip(pairs.better[clicked], pairs.worse[clicked] - len(user), strict=True):
            if owner[near[d]] < 0 or np.linalg.norm(pts[near[d]] - user[u]) < np.linalg.norm(
                    pts[near[d]] - user[owner[near[d]]]):
                owner[near[d]] = u
        return owner

    def _detection_filters(self, points: Sequence[tuple[float, float]] | None) -> dict[str, float | None]:
        """The filters :meth:`resolve` applies (``min_stability``, ``min_verified``): the config's for detected
        points, none for user-given ones (the user vouches for their points)."""
        cfg = self.config
        if points is not None:
            return {"min_stability": None, "min_verified": None}
        return {"min_stability": cfg.min_stability, "min_verified": cfg.min_verified}

    # The three stages below are public so that threshold tuning (karyo.train.pack) can run the networks once
    # per image and re-run only the cheap decisions for every setting.

    def prepare(self, image: np.ndarray, *, mpp: float | None = None, name: str = "",
                channel_names: Sequence[str] | None = None) -> PreparedImage:
        """Normalise, resample to the model's mpp, pad; run the prompter once."""
        xp, scale, shape, input_shape = self._padded(image, mpp, name, channel_names)
        return PreparedImage(xp, scale, shape, input_shape, self.prompter(xp))

    def _padded(self, image: np.ndarray, mpp: float | None, name: str, channel_names: Sequence[str] | None = None
                ) -> tuple[torch.Tensor, float, tuple[int, int], tuple[int, int]]:
        """(padded input, model pixels per input pixel, unpadded model shape, input shape)."""
        cfg = self.config
        x = self._prepare(image, name, channel_names)
        h0, w0 = x.shape[2:]
        x, scale = resample_to_model(x, mpp, cfg.mpp, name or None)
        h, w = x.shape[2:]
        return pad_input(x, 32, cfg.tile_size).to(self.device), float(scale), (int(h), int(w)), (int(h0), int(w0))

    def detect(self, prep: PreparedImage, score_threshold: float, nms_radius_px: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points (x, y in model pixels), classes and scores of the nuclei the prompter finds inside the image."""
        det = decode_points(prep.prompter_outputs, score_threshold, nms_radius_px)[0]
        h, w = prep.shape
        inside = (det.points[:, 0] >= 0) & (det.points[:, 0] < w) & (det.points[:, 1] >= 0) & (det.points[:, 1] < h)
        return det.points[inside], det.classes[inside], det.scores[inside]

    def mask_candidates(self, prep: PreparedImage, pts: np.ndarray, cls: np.ndarray, score: np.ndarray,
                        neg: np.ndarray, refine_points: int | None = None, remove_duplicates: bool = True
                        ) -> MaskCandidates:
        """One window mask probability per point; the point's score is multiplied by √(predicted IoU).

        With ``refine_points`` (default: the config's) > 0, each point is moved to the centroid of its mask
        (probability > 0.5, whatever ``mask_threshold``) and decoded again, that many times: the segmentor was
        trained on points near nucleus centres, and a prompter point off centre gives a worse mask. Refined
        points that land within ``refine_merge_px`` of a better-scored one are dropped as duplicates of the same
        nucleus.

        With ``mask_nms_overlap`` set, duplicate points are removed first. Each point's nearest other point is its
        negative prompt, and for two points on one nucleus that negative cuts the nucleus in two; decoded without
        negatives, both give the whole nucleus, and the lower-scored of two mostly overlapping masks is dropped.
        Real neighbours stay, and serve as each other's negatives from then on. This is why the point NMS radius
        can stay below the spacing of touching nuclei. With ``min_duplicate_probability`` set instead, the config's
        duplicate judge (:mod:`karyo.models.duplicates`) decides which overlapping pairs are one nucleus: a touching
        neighbour's mask decoded without a negative often bleeds over the other nucleus, and overlap alone then
        drops a real nucleus. With ``refine_points`` > 0 the centroids of these masks
        (decoded without negatives) are the first refinement, which saves one decode pass per image: 24% of the
        prompts decoded with the shipped settings, at −0.003 validation PQ against a separate pass.

        ``remove_duplicates`` off skips that step (whatever the config): user-given points each stand for a nucleus,
        and two clicks on touching nuclei must not lose one to the other.

        A detail-branch segmentor fuses its image detail in the final pass only, unless ``detail_every_pass``: with
        the shipped prompter and the branch trained at 10× lr, validation PQ 0.439 (final pass only) against 0.438
        (every pass) and 0.433 (no pass); on dense CoNSeP training patches 0.439 / 0.442 / 0.430."""
        cfg = self.config
        score = np.array(score, np.float32, copy=True)
        pts, cls = np.asarray(pts, np.float32), np.asarray(cls)
        if len(pts) == 0:
            return MaskCandidates(torch.zeros(0, 1, 1), torch.zeros(0, 4, dtype=torch.long), score, cls, 0,
                                  score, np.zeros(0, np.float32))
        refine = cfg.refine_points if refine_points is None else refine_points

        def move_to_centroids(probs: torch.Tensor, windows: torch.Tensor, pts: np.ndarray, cls: np.ndarray,
                              score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pts = _mask_centroids(probs, windows, pts, 0.5, cfg.min_area)
            keep = point_nms(pts, score, cfg.refine_merge_px) if cfg.refine_merge_px > 0 else np.arange(len(pts))
            keep = np.sort(keep)
            return pts[keep], cls[keep], score[keep]

        rough = cfg.detail_every_pass  # detail fusion in the passes before the final one
        decoded = 0  # prompts decoded, over all passes: the work that sets the speed
        judged = cfg.min_duplicate_probability is not None
        if remove_duplicates and (cfg.mask_nms_overlap is not None or judged) and len(pts) > 1:
            decoded += len(pts)
            probs, windows, iou = self._decode(prep, pts, neg, negatives=False, detail=rough)
            rank = candidate_score(score, iou)
            if judged:
                pairs = mask_pairs(probs, windows, pts, rank, score, iou)
                dup = cfg.duplicate_judge.probability(pairs.features) >= cfg.min_duplicate_probability
                keep = suppress_pairs(len(pts), pairs.better[dup], pairs.worse[dup], rank)
            else:
                keep = suppress_duplicate_masks(probs, windows, rank, threshold=0.5, max_overlap=cfg.mask_nms_overlap)
            pts, cls, score = pts[keep], cls[keep], score[keep]
            if refine > 0:  # these masks serve as the first refinement: one decode pass fewer
                pts, cls, score = move_to_centroids(probs[keep], windows[keep], pts, cls, score)
                refine -= 1
        for _ in range(refine):
            decoded += len(pts)
            probs, windows, _ = self._decode(prep, pts, neg, detail=rough)
            pts, cls, score = move_to_centroids(probs, windows, pts, cls, score)
        decoded += len(pts)
        probs, windows, iou = self._decode(prep, pts, neg)
        return MaskCandidates(probs, windows, candidate_score(score, iou), cls, decoded, score, iou)

    def _decode(self, prep: PreparedImage, pts: np.ndarray, neg: np.ndarray, negatives: bool = True,
                detail: bool = True) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(window probabilities P×Hw×Ww, windows P×4 in model pixels, predicted IoU P) for points ``pts``;
        without ``negatives`` the negative prompt slots are padding (SAM's "not a point"); ``detail`` as in
        :meth:`Segmentor.decode`."""
        cfg = self.config
        n = len(pts)
        # Negative prompts: the K nearest other points (and user negatives), as in training.
        pool = np.concatenate([pts, neg]) if len(neg) else pts
        k = min(cfg.negatives, len(pool) - 1)
        prompts = np.zeros((n, 1 + max(k, 0), 2), np.float32)
        labels = np.full((n, 1 + max(k, 0)), -1, np.int64)
        prompts[:, 0], labels[:, 0] = pts, 1
        if k > 0 and negatives:
            _, nn_idx = cKDTree(pool).query(pts, k=k + 1)
            nn_idx = np.asarray(nn_idx).reshape(n, -1)[:, 1:]
            prompts[:, 1:], labels[:, 1:] = pool[nn_idx], 0
        # Tiles of the encoder; each point goes to the tile where it is farthest from the border.
        xp = prep.xp
        ts, stride = cfg.tile_size, cfg.tile_size - cfg.tile_overlap
        ys, xs = _grid(xp.shape[2], ts, stride), _grid(xp.shape[3], ts, stride)
        origins = np.array([(x0, y0) for y0 in ys for x0 in xs], np.float32)
        margin = np.minimum.reduce([pts[:, None, 0] - origins[None, :, 0], origins[None, :, 0] + ts - pts[:, None, 0],
                                    pts[:, None, 1] - origins[None, :, 1], origins[None, :, 1] + ts - pts[:, None, 1]])
        tile_of = margin.argmax(1)
        used = np.unique(tile_of)
        corners = origins.astype(np.int64)
        missing = [int(t) for t in used if int(t) not in prep.tile_embeddings]
        for i in range(0, len(missing), 8):
            batch = missing[i:i + 8]
            crops = torch.cat([xp[:, :, corners[t, 1]:corners[t, 1] + ts, corners[t, 0]:corners[t, 0] + ts]
                               for t in batch])
            for t, e in zip(batch, self.segmentor.embed(crops), strict=True):
                prep.tile_embeddings[t] = e
        emb = torch.stack([prep.tile_embeddings[int(t)] for t in used])
        slot = np.searchsorted(used, tile_of)
        local = prompts - origins[tile_of][:, None, :]
        probs, windows, ious = [], [], []
        for i in range(0, n, cfg.prompt_batch):
            sl = slice(i, i + cfg.prompt_batch)
            outp = self.segmentor.decode(emb, torch.from_numpy(slot[sl]).to(self.device),
                                         torch.from_numpy(local[sl]).to(self.device),
                                         torch.from_numpy(labels[sl]).to(self.device), detail=detail)
            wm = masks_to_image(outp, probabilities=True)
            probs.append(wm.masks[:, 0].detach().cpu())
            windows.append(wm.window_xyxy.cpu() + torch.from_numpy(np.tile(origins[tile_of[sl]], 2)).long())
            ious.append(outp.iou_pred[:, 0].detach().clamp(0, 1).cpu().numpy())
        return torch.cat(probs), torch.cat(windows), np.concatenate(ious)

    def resolve(self, prep: PreparedImage, candidates: MaskCandidates, mask_threshold: float, *,
                min_stability: float | None = None, min_verified: float | None = None, name: str = ""
                ) -> SegmentationResult:
        """Threshold and resolve the window masks into one instance map at the input's size, after dropping the
        masks whose stability score (:func:`~karyo.infer.assemble.stability_scores` around ``mask_threshold``) is
        below ``min_stability`` and those the config's verifier (:mod:`karyo.models.verifier`) gives a
        probability below ``min_verified``. A prompter point on background gives a faint, threshold-sensitive
        mask, but so does a faint nucleus: of the 194 instances that stability 0.5 drops from the third-schedule
        model's output on its 54 validation images, 64 lie on background, 74 overlap a nucleus at IoU ≤ 0.5 and
        56 match one. The verifier weighs stability with the mask's other numbers instead."""
        cfg = self.config
        c = candidates
        if min_verified is not None and len(c.scores):
            if cfg.verifier is None:
                raise ValueError("min_verified needs a fitted verifier in the model's config (karyo pack fits one)")
            c = c.subset(np.flatnonzero(cfg.verifier.probability(c.features) >= min_verified))
        if min_stability is not None and len(c.scores):
            c = c.subset(np.flatnonzero(stability_scores(c.probs, mask_threshold) >= min_stability))
        if len(c.scores) == 0:
            instances, classes, scores = np.zeros(prep.shape, np.int32), {}, {}
        else:
            asm = assemble_instances(c.probs, c.windows, prep.shape, c.scores, threshold=mask_threshold,
                                     min_area=cfg.min_area, min_kept_fraction=cfg.min_kept_fraction)
            instances = asm.instances
            classes = {i + 1: int(c.classes[j]) for i, j in enumerate(asm.prompt_index)}
            scores = {i + 1: float(c.scores[j]) for i, j in enumerate(asm.prompt_index)}
        instances, classes, scores = resize_instances(instances, prep.input_shape, classes, scores)
        return SegmentationResult(instances, classes=classes, scores=scores, class_names=self.class_names,
                                  name=name, model=self.arch)


@dataclass
class PreparedImage:
    """An image as the networks see it, with the prompter's outputs and the segmentor's tile embeddings
    (filled lazily, reused across point sets)."""

    xp: torch.Tensor  # 1×C×H'×W', padded
    scale: float  # model pixels per input pixel
    shape: tuple[int, int]  # unpadded, in model pixels
    input_shape: tuple[int, int]
    prompter_outputs: dict[str, torch.Tensor]
    tile_embeddings: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class MaskCandidates:
    probs: torch.Tensor  # P×Hw×Ww window probabilities
    windows: torch.Tensor  # P×4 x0, y0, x1, y1 in model pixels
    scores: np.ndarray
    classes: np.ndarray
    decoded: int = 0  # prompts the segmentor decoded to make them, over all passes
    prompter_scores: np.ndarray | None = None  # before the predicted IoU entered ``scores``
    predicted_iou: np.ndarray | None = None

    def subset(self, keep: np.ndarray) -> MaskCandidates:
        """These candidates at indices ``keep`` (``decoded`` stays: the work was done)."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return MaskCandidates(self.probs[keep], self.windows[keep], self.scores[keep], self.classes[keep],
                              self.decoded, pick(self.prompter_scores), pick(self.predicted_iou))

    @cached_property
    def features(self) -> np.ndarray:
        """The verifier's features (:func:`karyo.models.verifier.candidate_features`) of every candidate; computed
        once, as threshold tuning resolves the same candidates with many settings."""
        if self.prompter_scores is None or self.predicted_iou is None:
            raise ValueError("these mask candidates carry no prompter scores / predicted IoU (made by hand?)")
        return candidate_features(self.probs, self.scores, self.prompter_scores, self.predicted_iou)


def _mask_centroids(probs: torch.Tensor, windows: torch.Tensor, pts: np.ndarray, threshold: float,
                    min_area: int) -> np.ndarray:
    """Centroid (x, y, model pixels) of each window mask above ``threshold``; the point itself where the mask
    has fewer than ``min_area`` pixels."""
    fg = (probs > threshold).float()
    area = fg.sum((1, 2))
    ys = torch.arange(probs.shape[1], dtype=torch.float32)
    xs = torch.arange(probs.shape[2], dtype=torch.float32)
    cy = (fg.sum(2) * ys).sum(1) / area.clamp(min=1) + windows[:, 1].float()
    cx = (fg.sum(1) * xs).sum(1) / area.clamp(min=1) + windows[:, 0].float()
    out = np.array(pts, np.float32, copy=True)
    ok = (area >= max(min_area, 1)).numpy()
    out[ok] = torch.stack([cx, cy], 1).numpy()[ok]
    return out


def _clicked_class(owner: np.ndarray, n_user: int, cls: np.ndarray, score: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Class and prompter score of each user point: those of the best-scored detection on its nucleus (``owner``,
    from :meth:`PromptNucSegModel._clicked_detections`), else unclassified (class 0) with prompter score 1 (the user
    vouches for it); the written score is that times √(predicted IoU), as for every mask."""
    out_cls = np.zeros(n_user, np.int64)
    out_score = np.ones(n_user, np.float32)
    best = np.full(n_user, -np.inf)
    for d in np.flatnonzero(owner >= 0):
        if score[d] > best[owner[d]]:
            best[owner[d]] = score[d]
            out_cls[owner[d]], out_score[owner[d]] = cls[d], score[d]
    return out_cls, out_score


def adapters_agree(a, b) -> bool:
    """Whether a prompter's and a segmentor's channel adapters read one prepared input alike: both absent, or the
    same channels with the same pixel statistics."""
    if a is None or b is None:
        return a is None and b is None
    return (a.in_channels, a.channel_names, a.pixel_mean, a.pixel_std) == (b.in_channels, b.channel_names,
                                                                           b.pixel_mean, b.pixel_std)


def with_inference(config: PromptNucSegConfig, **changes) -> PromptNucSegConfig:
    """A copy of ``config`` with other inference settings (thresholds, tiling)."""
    return dataclasses.replace(config, **changes)


CONTEXT_RADIUS = 12.0  # model px: a detected point this close to a user's point is that nucleus, not a neighbour
CLICK_REACH = 40.0  # model px (10 µm): farther detections are neighbours without asking their masks
