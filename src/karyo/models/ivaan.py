"""IVAAN (Jeong et al.): instance-level vision-language alignment on top of the PromptNucSeg prompter.

Every anchor of the prompter (:mod:`karyo.models.prompter`) gets, from the same per-anchor FPN feature the
point/class heads read:

* an *instance embedding*: a 2-layer MLP projection into the text encoder's space (384-d for
  all-MiniLM-L6-v2), L2-normalised, as CLIP's image projection (Radford et al. 2021);
* *attribute levels*: one classifier per selected attribute (IVAAN supplement B.2; karyo's default is the
  paper's four: d_eq, eccentricity, color_z, perim_ratio) over its discrete levels (``karyo.text.LevelModel``
  quantile bins, 3 per attribute); same FC-ReLU-Dropout-FC shape as the prompter's heads;
* *class logits through text*: ``s · cos(embedding, t_c)`` against the precomputed class-description
  embeddings ``t_c`` (``karyo.text.embed_class_prompts``: mean of the description sentences of class c in
  ``prompts.yaml``), with a learnable scale s (CLIP's logit scale, initialised to 1/0.07, clamped at 100).

Background (a choice the paper does not spell out): the prompter's own background logit is kept and the text
decides only *which* class a nucleus is. With the prompter's class head giving ``b`` (background) and
``f = logsumexp(head[1:])`` (foreground), the combined logits are ``[b, f + log_softmax_c(s·cos_c)]``, so
``P(bg) = σ(b − f)`` exactly as the prompter's and ``P(c | nucleus) = softmax_c(s·cos_c)``: the predicted class
is the argmax of the text similarity. A background *description* is still embedded (row 0 of ``class_text``)
but unused: forcing the ≈99 % background anchors of an image towards one sentence would compete with the
instance alignment, and keeping the background logit makes detection identical across the ablation variants,
so the ablation isolates what text does to classification. The class embeddings are a buffer saved with the
weights: inference needs no text encoder unless free text is queried (:meth:`IVAANModel.query`).

Ablation switches in :class:`IVAANConfig` (``align``, ``attribute_prediction``, ``text_classification``) change
only the losses and the class logits; every variant builds the same modules in the same order, so with one
seed all variants start from the same prompter weights.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from karyo.attributes import names as N
from karyo.device import pick_device
from karyo.errors import InputError
from karyo.infer.prepare import check_mpp, check_prompts, double_click_px
from karyo.infer.result import SegmentationResult, drop_negated, finish
from karyo.models.base import InstanceModel, register
from karyo.models.prompter import Prompter, PrompterConfig, _head, anchor_points
from karyo.models.promptnucseg import PromptNucSegConfig, PromptNucSegModel
from karyo.models.segmentor import Segmentor
from karyo.models.vit import read_state_dict

CLIP_TEMPERATURE = 0.07  # CLIP's initial temperature (logit scale 1/0.07)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the logit scale at 100


@dataclass
class IVAANConfig:
    """Everything needed to rebuild an :class:`IVAANPrompter` and to train it.

    ``embed_dim`` must equal the text encoder's dimension (384 for ``all-MiniLM-L6-v2``). ``attributes`` are
    attribute columns (paper names and aliases are resolved); ``attribute_levels`` (levels per attribute)
    defaults to the number of level words in ``prompts.yaml``. ``level_mode`` is the LevelModel fit mode.
    ``sentence_with_class``: a nucleus of known class is described as "a large, ... epithelial nucleus ...".
    ``align_weight``/``attribute_weight`` multiply the InfoNCE and the attribute cross entropy (added to the
    prompter's loss). ``temperature_init`` τ₀ (CLIP: 0.07) is the initial temperature of the alignment and
    ``class_temperature_init`` that of the text classifier; ``learnable_temperature`` trains both (as CLIP).
    ``prompt_set`` names the class descriptions in ``prompts.yaml`` ("auto": the set whose classes contain
    the model's class names). ``valid_only``: alignment and attribute targets only for nuclei whose attributes
    are reliable (IVAAN B.1: not truncated by the image border, ≥ 10 px); detection still uses every nucleus.
    """

    prompter: PrompterConfig = field(default_factory=lambda: PrompterConfig.preset("cpu"))
    embed_dim: int = 384
    proj_hidden: int = 256
    attributes: tuple[str, ...] = N.PAPER_SELECTION
    attribute_levels: tuple[int, ...] = ()
    level_mode: str = "global"
    sentence_with_class: bool = True
    align: bool = True
    attribute_prediction: bool = True
    text_classification: bool = True
    align_weight: float = 0.25
    attribute_weight: float = 0.25
    temperature_init: float = CLIP_TEMPERATURE
    class_temperature_init: float = CLIP_TEMPERATURE
    learnable_temperature: bool = True
    text_encoder: str = "all-MiniLM-L6-v2"
    prompt_set: str = "auto"
    valid_only: bool = True

    def __post_init__(self) -> None:
        from karyo.text.prompts import level_words

        problems = []
        try:
            self.attributes = tuple(N.resolve(a) for a in self.attributes)
        except KeyError as exc:
            raise InputError(None, f"IVAANConfig: {exc.args[0]}") from None
        if not self.attribute_levels:
            self.attribute_levels = tuple(len(level_words(a)) for a in self.attributes)
        self.attribute_levels = tuple(int(n) for n in self.attribute_levels)
        if len(self.attribute_levels) != len(self.attributes) or any(n < 2 for n in self.attribute_levels):
            problems.append(f"attribute_levels {self.attribute_levels} must give ≥ 2 levels for each of "
                            f"{len(self.attributes)} attributes")
        if self.level_mode not in ("global", "per_class"):
            problems.append(f"level_mode must be 'global' or 'per_class', got {self.level_mode!r}")
        if self.embed_dim < 1 or self.proj_hidden < 1:
            problems.append("embed_dim and proj_hidden must be >= 1")
        if not (0 < self.temperature_init <= 1 and 0 < self.class_temperature_init <= 1):
            problems.append("temperatures must lie in (0, 1]")
        if self.align_weight < 0 or self.attribute_weight < 0:
            problems.append("loss weights must be >= 0")
        if problems:
            raise InputError(None, "IVAANConfig: " + "; ".join(problems))

    @property
    def needs_text(self) -> bool:
        """Whether training needs text embeddings (sentences or class descriptions)."""
        return self.align or self.text_classification


def instance_text_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, text_index: torch.Tensor,
                          logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between N instance embeddings and U text embeddings (CLIP's loss, Radford et al.).

    ``text_index[i]`` is the row of ``text_emb`` describing instance i. Deviation from CLIP for duplicates:
    nuclei with the same attribute levels share one sentence, so ``text_emb`` holds each distinct sentence
    *once* and all instances pointing at it are positives. Instance → text: cross entropy over the U distinct
    sentences (a duplicate is never its own negative). Text → instance: ``−log Σ_{i ∈ P(u)} softmax_i`` (the
    probability of picking any of its positives), averaged over sentences with at least one positive. The loss
    is the mean of both directions; inputs should be L2-normalised. Fewer than 2 instances give 0.
    """
    if image_emb.shape[0] < 2:
        return image_emb.sum() * 0.0
    logits = logit_scale * image_emb @ text_emb.t()  # N×U
    i2t = F.cross_entropy(logits, text_index)
    positive = F.one_hot(text_index, text_emb.shape[0]).t().bool()  # U×N
    per_text = logits.t()
    has_pos = positive.any(dim=1)
    log_all = torch.logsumexp(per_text, dim=1)
    log_pos = torch.logsumexp(per_text.masked_fill(~positive, float("-inf")), dim=1)
    t2i = (log_all - log_pos)[has_pos].mean()
    return 0.5 * (i2t + t2i)


class IVAANPrompter(nn.Module):
    """Prompter + projection into text space + attribute-level heads + text classifier (module docstring).

    ``forward(images)`` returns the prompter's ``points`` and ``logits`` (the combined text logits when
    ``text_classification``, else the prompter's own), ``prompter_logits``, ``features`` (B×A×D) and, when
    classifying through text, ``embeddings`` (B×A×E, unit length).
    """

    def __init__(self, config: IVAANConfig | None = None):
        super().__init__()
        cfg = config if config is not None else IVAANConfig()
        self.config = cfg
        pc = cfg.prompter
        self.prompter = Prompter(pc)  # built first: every variant starts from the same prompter weights
        self.projection = nn.Sequential(nn.Linear(pc.fpn_dim, cfg.proj_hidden), nn.GELU(),
                                        nn.Linear(cfg.proj_hidden, cfg.embed_dim))
        self.attribute_heads = nn.ModuleList(_head(pc.fpn_dim, pc.head_hidden, n, pc.dropout)
                                             for n in cfg.attribute_levels)
        learn = cfg.learnable_temperature
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)), requires_grad=learn)
        self.class_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.class_temperature_init)),
                                              requires_grad=learn)
        self.register_buffer("class_text", torch.zeros(pc.num_classes + 1, cfg.embed_dim))
        self.register_buffer("class_text_ready", torch.zeros((), dtype=torch.bool))

    # ----------------------------------------------------------------------------------------- pieces
    def set_class_text(self, embeddings: torch.Tensor | np.ndarray) -> None:
        """Install the (C+1)×E class-description embeddings (row 0 background), e.g. from
        :func:`karyo.text.embed_class_prompts`."""
        emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        if tuple(emb.shape) != tuple(self.class_text.shape):
            raise InputError(None, f"class text embeddings must be {tuple(self.class_text.shape)} "
                                   f"(classes + background × embed_dim), got {tuple(emb.shape)}")
        self.class_text.copy_(F.normalize(emb, dim=-1).to(self.class_text.device))
        self.class_text_ready.fill_(True)

    def scale(self) -> torch.Tensor:
        """The alignment's logit scale 1/τ (clamped at 100 as CLIP)."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def class_scale(self) -> torch.Tensor:
        return self.class_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Per-anchor features (…×D) → unit-length instance embeddings (…×E)."""
        return F.normalize(self.projection(features), dim=-1)

    def attribute_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """One …×L_a tensor of level logits per attribute."""
        return [head(features) for head in self.attribute_heads]

    def text_similarity(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of embeddings (…×E) to the C class descriptions (…×C, class 1..C)."""
        if not bool(self.class_text_ready):
            raise InputError(None, "IVAAN class-description embeddings are not set (set_class_text)")
        return embeddings @ self.class_text[1:].t()

    def combine(self, prompter_logits: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """``[b, f + log_softmax(s·cos)]``: prompter background vs foreground, class from text."""
        bg = prompter_logits[..., :1]
        fg = torch.logsumexp(prompter_logits[..., 1:], dim=-1, keepdim=True)
        return torch.cat([bg, fg + torch.log_softmax(self.class_scale() * similarity, dim=-1)], dim=-1)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out, features = self.prompter.forward_features(images)
        result = {"points": out["points"], "prompter_logits": out["logits"], "features": features,
                  "logits": out["logits"]}
        if self.config.text_classification:
            emb = self.embed(features)
            result["embeddings"] = emb
            result["logits"] = self.combine(out["logits"], self.text_similarity(emb))
        return result

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.prompter.normalize(images)

    def decode(self, outputs: dict[str, torch.Tensor]) -> list:
        """:func:`decode_points` with the prompter's thresholds (classes from text when enabled)."""
        return self.prompter.decode(outputs)


# ------------------------------------------------------------------------------------------- inference


@dataclass
class IVAANModelConfig(PromptNucSegConfig):
    """PromptNucSeg's inference config with the IVAAN prompter; ``prompter`` mirrors ``ivaan.prompter``."""

    ivaan: IVAANConfig = field(default_factory=IVAANConfig)

    def __post_init__(self) -> None:
        self.prompter = self.ivaan.prompter


@dataclass(repr=False, eq=False)  # the short repr of SegmentationResult, not every embedding; identity equality
class IVAANResult(SegmentationResult):
    """A :class:`SegmentationResult` plus the instance embeddings (row i ↔ ``embedding_ids[i]``) that
    :meth:`IVAANModel.query` ranks."""

    embeddings: np.ndarray | None = None
    embedding_ids: np.ndarray | None = None


def rank_by_similarity(embeddings: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, cosine similarity): rows of ``embeddings`` sorted by similarity to ``query``, best first
    (ties keep the input order)."""
    emb = np.asarray(embeddings, np.float32)
    q = np.asarray(query, np.float32).reshape(-1)
    if emb.ndim != 2 or emb.shape[1] != q.shape[0]:
        raise InputError(None, f"embeddings {emb.shape} and query ({q.shape[0]},) have different dimensions")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = emb @ (q / max(float(np.linalg.norm(q)), 1e-12))
    return np.argsort(-sim, kind="stable"), sim


@register
class IVAANModel(PromptNucSegModel):
    """IVAAN prompter + PromptNucSeg segmentor: nuclei classified through text, each with predicted attribute
    levels and a generated sentence (``result.properties``), and free-text queries (:meth:`query`).

    Detection, prompting of the segmentor, tiling and mask assembly are PromptNucSeg's
    (:class:`~karyo.models.promptnucseg.PromptNucSegModel`), reused, not repeated.
    """

    arch = "ivaan"
    config_class = IVAANModelConfig

    def __init__(self, config: IVAANModelConfig | None = None, device: str = "cpu"):
        InstanceModel.__init__(self, config)
        self.device = pick_device(device)
        self.prompter = IVAANPrompter(self.config.ivaan).to(self.device).eval()
        self.segmentor = Segmentor(self.config.segmentor).to(self.device).eval()
        self.level_model = None
        self._text_encoder = None

    @classmethod
    def _from_config(cls, config: IVAANModelConfig, directory: Path | None, device: str = "cpu") -> IVAANModel:
        model = cls(config, device=device)
        if directory is not None:
            model.prompter.load_state_dict(read_state_dict(directory / "ivaan.pt"))
            model.segmentor.load_state_dict(read_state_dict(directory / "segmentor.pt"))
            if (directory / "levels.json").is_file():
                from karyo.text.levels import LevelModel

                model.level_model = LevelModel.load(directory / "levels.json")
        return model

    def _save_weights(self, directory: Path) -> None:
        from karyo.data.io import atomic_path

        for name, net in (("ivaan.pt", self.prompter), ("segmentor.pt", self.segmentor)):
            with atomic_path(directory / name) as tmp:
                torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp)
        if self.level_model is not None:
            self.level_model.save(directory / "levels.json")

    # ---------------------------------------------------------------------------------------- text
    @property
    def text_encoder(self):
        """The (cached) text encoder named in the config, loaded on first use (queries only)."""
        if self._text_encoder is None:
            from karyo.text.encoder import load_text_encoder

            self._text_encoder = load_text_encoder(self.config.ivaan.text_encoder)
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, encoder) -> None:
        self._text_encoder = encoder

    def describe_levels(self, levels: np.ndarray, class_ids: np.ndarray | None = None) -> list[str]:
        """Sentences for N×n_attr level indices (−1 = unknown), as the training sentences were built."""
        from karyo.text.prompts import describe

        cfg = self.config.ivaan
        names = self.class_names or {}
        cache: dict[tuple, str] = {}
        out = []
        for i, row in enumerate(np.asarray(levels, np.int64).reshape(len(levels), -1)):
            cls = names.get(int(class_ids[i])) if (class_ids is not None and cfg.sentence_with_class) else None
            key = (*row.tolist(), cls)
            if key not in cache:
                cache[key] = describe(dict(zip(cfg.attributes, row.tolist(), strict=True)), class_name=cls)
            out.append(cache[key])
        return out

    # ------------------------------------------------------------------------------------- inference
    def _anchor_outputs(self, features: torch.Tensor, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                              np.ndarray, np.ndarray]:
        """(embeddings N×E, levels N×n_attr, text-class ids N, similarity to that class N) of anchors idx."""
        net = self.prompter
        feat = features[0, torch.as_tensor(idx, dtype=torch.long, device=features.device)]
        emb = net.embed(feat)
        levels = torch.stack([lg.argmax(-1) for lg in net.attribute_logits(feat)], dim=-1) if len(idx) else \
            torch.zeros((0, len(net.attribute_heads)), dtype=torch.long)
        if bool(net.class_text_ready):
            sim = net.text_similarity(emb)
            best, cls = sim.max(-1) if len(idx) else (sim.new_zeros(0), torch.zeros(0, dtype=torch.long))
            cls, best = (cls + 1).cpu().numpy(), best.cpu().numpy()
        else:
            cls, best = np.zeros(len(idx), np.int64), np.full(len(idx), np.nan, np.float32)
        return emb.cpu().numpy().astype(np.float32), levels.cpu().numpy(), cls.astype(np.int64), best

    @torch.no_grad()
    def describe_points(self, image: np.ndarray, points: np.ndarray, *, mpp: float | None = None
                        ) -> dict[str, np.ndarray | list]:
        """Embeddings, attribute levels, text class and sentence of the nuclei at ``points`` (N×2, x, y in
        image pixels), read at the anchor nearest each point. No segmentor is run (e.g. to embed
        ground-truth nuclei)."""
        xp, scale, _, _ = self._padded(image, mpp, "")
        _, features = self.prompter.prompter.forward_features(xp)
        idx = self._nearest_anchor(np.asarray(points, np.float64).reshape(-1, 2) * scale, xp.shape[2:])
        emb, levels, cls, sim = self._anchor_outputs(features, idx)
        return {"embeddings": emb, "levels": levels, "classes": cls, "similarity": sim,
                "sentences": self.describe_levels(levels, cls)}

    def _nearest_anchor(self, pts: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        pc = self.config.prompter
        anchors = anchor_points(int(shape[0]), int(shape[1]), pc.anchor_stride, pc.anchors_per_cell).numpy()
        if not len(pts):
            return np.zeros(0, np.int64)
        return np.asarray(cKDTree(anchors).query(pts, k=1)[1], np.int64).reshape(-1)

    @torch.no_grad()
    def segment(self, image: np.ndarray, *, points=None, negative=None, mpp: float | None = None,
                name: str = "") -> IVAANResult:
        """As :meth:`PromptNucSegModel.segment`, with classes from text similarity and, per nucleus,
        predicted attribute levels, a sentence and the embedding (for :meth:`query`)."""
        cfg = self.config
        points, negative = check_prompts(points, negative, np.shape(image), name or None,
                                         double_click_px(check_mpp(mpp, name or None), cfg.mpp))
        prep = self.prepare(image, mpp=mpp, name=name)
        out = prep.prompter_outputs
        pts, cls, score = self.detect(prep, cfg.score_threshold, cfg.nms_radius_px)
        all_pts = out["points"][0].detach().float().cpu().numpy()
        # detect returns points, not anchors: recover each kept anchor by its (exactly equal) point
        anchor_idx = (np.asarray(cKDTree(all_pts).query(pts, k=1)[1], np.int64).reshape(-1)
                      if len(pts) else np.zeros(0, np.int64))
        neg = np.zeros((0, 2), np.float32)
        if points is not None:  # as in PromptNucSeg; each click's embedding is its nearest anchor's
            pts, cls, score, neg = self._click_prompts(prep, points, negative, pts, cls, score)
            anchor_idx = self._nearest_anchor(pts, prep.xp.shape[2:])
        emb, levels, text_cls, text_sim = self._anchor_outputs(out["features"], anchor_idx)
        if cfg.ivaan.text_classification:
            cls = text_cls  # equals the decoded class (argmax of the same similarity); user points get one too
        # classes := prompt indices, so the resolved instances map back to their anchors
        candidates = self.mask_candidates(prep, pts, np.arange(len(pts)), score.astype(np.float32), neg,
                                          remove_duplicates=points is None)
        resolved = self.resolve(prep, candidates, cfg.mask_threshold, **self._detection_filters(points))
        instances, prompt_of, scores = resolved.instances, resolved.classes, resolved.scores
        ids = np.array(sorted(prompt_of), np.int64)
        rows = np.array([prompt_of[i] for i in ids], np.int64)
        # levels and sentences only from a model trained to predict them (untrained heads would say nonsense); named
        # predicted_*, as they are the head's guess and can disagree with the measured attributes
        described = cfg.ivaan.attribute_prediction
        sentences = self.describe_levels(levels[rows], cls[rows]) if len(rows) and described else []
        words = _level_words(cfg.ivaan.attributes)
        properties = {}
        for k, (inst, j) in enumerate(zip(ids.tolist(), rows.tolist(), strict=True)):
            props: dict = {}
            if described:
                props = {f"predicted_level_{N.paper_name(a)}": words[a][int(levels[j, m])]
                         for m, a in enumerate(cfg.ivaan.attributes)}
                props["predicted_description"] = sentences[k]
            if cfg.ivaan.text_classification and np.isfinite(text_sim[j]):
                props["text_similarity"] = round(float(text_sim[j]), 4)
            properties[inst] = props
        result = IVAANResult(instances, classes={i: int(cls[j]) for i, j in zip(ids, rows, strict=True)},
                             scores=scores, class_names=self.class_names, name=name, model=self.arch,
                             properties=properties, embeddings=emb[rows] if len(rows) else
                             np.zeros((0, cfg.ivaan.embed_dim), np.float32), embedding_ids=ids)
        if points is None:  # negative points alone: every nucleus but those under them
            result = drop_negated(result, negative)
        return finish(result, points, mpp)

    def _prompt_vocabulary(self) -> set[str]:
        """The words of the sentences the embeddings were aligned with: attribute level words, class names and
        the class prompts (:mod:`karyo.text.prompts`)."""
        from karyo.text.prompts import load_prompts

        prompts = load_prompts()
        texts = [w for spec in prompts["attributes"].values() for w in spec["levels"]]
        texts += [p for group in prompts["class_prompts"].values() for lines in group.values() for p in lines]
        texts += [*(self.class_names or {}).values(), "nucleus", "nuclei"]
        return {w for t in texts for w in _words(t)}

    def query(self, result: SegmentationResult, text: str, top_k: int | None = None) -> pd.DataFrame:
        """Nuclei of ``result`` ranked by cosine similarity of their embeddings to the embedding of ``text``
        (any free text; the text encoder is loaded on first use): columns rank, instance_id, similarity,
        centroid_x, centroid_y, area, class_name, and predicted_description when the model predicts attribute levels
        (the sentence of the levels its head predicts, not of measured attributes: ``karyo attributes`` measures).
        ``top_k`` keeps the best k."""
        check_query_text(text)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1):
            raise InputError(None, f"top_k is a whole number of nuclei, at least 1; got {top_k!r}")
        emb = getattr(result, "embeddings", None)
        if emb is None:
            raise InputError(None, "query needs a result of IVAANModel.segment (it carries the embeddings)")
        if not self.config.ivaan.align:
            raise InputError(None, "this model was trained without instance-text alignment; its embeddings "
                                   "are not in the text space, so free-text queries are meaningless")
        if not set(_words(text)) & self._prompt_vocabulary():
            warnings.warn(f"no word of the query {text!r} is one the model was aligned with (its attribute words, "
                          f"e.g. large, elongated, darkly stained, and its class names): the ranking follows the "
                          f"text encoder's guess of what those words are like", stacklevel=2)
        q = np.asarray(self.text_encoder.encode([str(text)]), np.float32)
        if q.shape[1] != self.config.ivaan.embed_dim:
            raise InputError(None, f"text encoder dim {q.shape[1]} != model embed_dim {self.config.ivaan.embed_dim}")
        table = result.table().set_index("instance_id")
        ids = np.asarray(result.embedding_ids, np.int64)
        if len(ids) == 0:
            return pd.DataFrame({"rank": [], "instance_id": [], "similarity": []})
        order, sim = rank_by_similarity(emb, q[0])
        if top_k is not None:
            order = order[:max(0, int(top_k))]
        ranked = ids[order]
        df = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "instance_id": ranked,
                           "similarity": sim[order].astype(np.float64)})
        for col in ("centroid_x", "centroid_y", "area", "class_name", "predicted_description"):
            if col in table.columns:
                df[col] = table[col].reindex(ranked).to_numpy()
        return df


def _level_words(attributes) -> dict[str, list[str]]:
    from karyo.text.prompts import level_words

    return {a: level_words(a) for a in attributes}


__all__ = ["IVAANConfig", "IVAANModel", "IVAANModelConfig", "IVAANPrompter", "IVAANResult",
           "instance_text_infonce", "rank_by_similarity"]


def _words(text: str) -> list[str]:
    """Lower-case words (letters, hyphens inside: medium-sized) of a text, for comparing vocabularies."""
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


def check_query_text(text: object) -> None:
    """A query is non-blank text: refused otherwise, by :meth:`IVAANModel.query` and, before it loads a model,
    by ``karyo query``."""
    if not isinstance(text, str):
        raise InputError(None, f"the query is text (a str), got {type(text).__name__}")
    if not text.strip():
        raise InputError(None, "the query is empty: describe the nuclei to find, e.g. 'large darkly stained'")
