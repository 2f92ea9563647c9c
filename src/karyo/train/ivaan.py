"""Training IVAAN (Jeong et al.) on top of the prompter: per ground-truth nucleus an attribute-guided sentence
and a class description; losses = PromptNucSeg's prompter loss + instance–text InfoNCE + attribute-level CE.

Targets are built once per task (:class:`AttributeTargets`): every training image is measured with
:func:`karyo.attributes.measure_nuclei` (IVAAN B.1; tables memoised in memory by image content, so several
runs in one process measure each image once), a :class:`~karyo.text.LevelModel` is fitted on the training
split only (valid nuclei, B.1) and saved with the model, and every distinct sentence is embedded once through
a :class:`~karyo.text.CachedEncoder` (disk cache keyed by sha256). Training steps only index these arrays.

Per batch: the prompter's one-to-one Hungarian matching (the same call :func:`prompter_loss` makes, repeated
here to know which anchor holds which nucleus) pairs anchors with nuclei; each matched anchor whose nucleus has
a sentence contributes its embedding to the InfoNCE and its features to the attribute heads. Augmentation keeps
instance ids (fragments split off by a crop get new ids and no text target), so ids index the tables measured
on the untransformed image: attributes describe the whole nucleus even when a crop cuts it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from karyo.attributes import names as N
from karyo.attributes.measure import measure_nuclei
from karyo.config import from_dict, save_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.data.sample import Sample
from karyo.errors import InputError
from karyo.models.ivaan import IVAANConfig, IVAANPrompter, instance_text_infonce
from karyo.models.prompter import PrompterConfig, hungarian_match, prompter_loss
from karyo.train.prompter import PrompterTask, point_targets

_TABLES: OrderedDict[str, pd.DataFrame] = OrderedDict()
_TABLES_MAX = 20_000


def _content_key(sample: Sample) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    for arr in (sample.image, sample.instances):
        arr = np.ascontiguousarray(arr)
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.data)
    return h.hexdigest()


def measure_sample(sample: Sample) -> pd.DataFrame:
    """Attribute table of one annotated sample (indexed by instance id), memoised by image + mask content."""
    key = _content_key(sample)
    table = _TABLES.get(key)
    if table is None:
        table = measure_nuclei(sample.image, sample.instances, source=sample.source or sample.name or None)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    return table


def resolve_prompt_set(class_names: Mapping[int, str], requested: str = "auto") -> str:
    """The ``prompts.yaml`` class-description set for these class names ("auto": the first set holding all)."""
    from karyo.text.prompts import load_prompts

    sets = load_prompts()["class_prompts"]
    if requested != "auto":
        if requested.lower() not in sets:
            raise InputError(None, f"no class prompts {requested!r}; available: {sorted(sets)}")
        return requested.lower()
    wanted = {n.lower() for n in class_names.values()}
    for name, classes in sets.items():
        if wanted <= {k.lower() for k in classes}:
            return name
    raise InputError(None, f"no class-description set in prompts.yaml covers the classes {sorted(wanted)}; add "
                           f"one or set prompt_set")


class AttributeTargets:
    """Per training sample: instance ids, sentence index, attribute levels and validity, fitted once.

    ``level_model`` is fitted on these (training) samples unless given. ``sentences`` is the vocabulary of
    distinct sentences and ``sentence_embeddings`` their V×E embeddings (None when ``encoder`` is None).
    """

    def __init__(self, samples: Sequence[Sample], config: IVAANConfig, *, encoder=None, level_model=None,
                 progress=None):
        from karyo.text.levels import LevelModel

        class_names = config.prompter.class_names
        tables = []
        for i in range(len(samples)):
            s = samples[i]
            if s.instances is None:
                raise InputError(s.source or s.name, "IVAAN training needs instance maps")
            t = measure_sample(s).copy()
            cid = np.array([int((s.classes or {}).get(int(k), 0)) for k in t.index], np.int64)
            t[N.CLASS_ID] = cid
            t[N.CLASS_NAME] = [class_names.get(int(c), "") if c else "" for c in cid]
            t["_sample"] = i
            tables.append(t)
            if progress is not None:
                progress(i)
        table = pd.concat(tables) if tables else pd.DataFrame()
        if level_model is None:
            mode = config.level_mode
            level_model = LevelModel.fit(table, config.attributes, mode=mode)
            level_model.meta = {"fitted_on": "training split", "n_images": len(samples)}
        self.level_model = level_model
        levels = level_model.levels(table).to_numpy(np.int64) if len(table) else np.zeros((0, 0), np.int64)
        sentences = level_model.sentences(table, with_class=config.sentence_with_class) if len(table) else \
            pd.Series([], dtype=object)
        valid = table["Flag.Valid"].to_numpy(bool).copy() if config.valid_only else np.ones(len(table), bool)
        if levels.size:
            valid &= (levels >= 0).any(axis=1)
        vocab, sent_idx = np.unique(sentences.to_numpy(dtype=object)[valid].astype(str), return_inverse=True)
        full_idx = np.full(len(table), -1, np.int64)
        full_idx[valid] = sent_idx
        self.sentences: list[str] = vocab.tolist()
        self.sentence_embeddings: torch.Tensor | None = None
        if encoder is not None:
            emb = np.asarray(encoder.encode(self.sentences), np.float32)
            if emb.shape[1:] != (config.embed_dim,):
                raise InputError(None, f"text encoder gives {emb.shape[1:]}-d embeddings, the model expects "
                                       f"embed_dim {config.embed_dim}")
            self.sentence_embeddings = torch.from_numpy(emb)
        which = table["_sample"].to_numpy(np.int64) if len(table) else np.zeros(0, np.int64)
        labels = table.index.to_numpy(np.int64) if len(table) else np.zeros(0, np.int64)
        self._per_sample: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for i in range(len(samples)):
            sel = which == i
            order = np.argsort(labels[sel])
            self._per_sample.append((labels[sel][order], full_idx[sel][order], levels[sel][order]))
        self.table = table
        self.n_attributes = len(config.attributes)

    def sentence_counts(self) -> np.ndarray:
        """How many training nuclei each sentence of :attr:`sentences` describes (its weight in the data)."""
        idx = np.concatenate([sent for _, sent, _ in self._per_sample]) if self._per_sample else np.zeros(0, int)
        return np.bincount(idx[idx >= 0], minlength=len(self.sentences))

    def lookup(self, sample_index: int, instance_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sentence index, levels n×n_attr) of instances of a sample; −1 where there is no target (unknown
        id, e.g. a fragment split off by augmentation, or a nucleus left out by ``valid_only``)."""
        ids, sent, lev = self._per_sample[sample_index]
        instance_ids = np.asarray(instance_ids, np.int64)
        pos = np.searchsorted(ids, instance_ids)
        pos_c = np.minimum(pos, max(len(ids) - 1, 0))
        found = (pos < len(ids)) & (ids[pos_c] == instance_ids) if len(ids) else np.zeros(len(instance_ids), bool)
        s = np.where(found, sent[pos_c] if len(ids) else -1, -1)
        levels = np.where(found[:, None], lev[pos_c] if len(ids) else -1,
                          -1) if self.n_attributes else np.zeros((len(instance_ids), 0), np.int64)
        return s.astype(np.int64), np.asarray(levels, np.int64).reshape(len(instance_ids), self.n_attributes)


class IVAANTask(PrompterTask):
    """:class:`karyo.train.loop.Task` for IVAAN; the prompter's data, loader and validation (F1d/F1c score)."""

    name = "ivaan"

    def __init__(self, config: IVAANConfig, augment: AugmentConfig, train_samples: Sequence[Sample],
                 val_samples: Sequence[Sample], *, encoder=None, level_model=None):
        super().__init__(config.prompter, augment, train_samples, val_samples)
        self.ivaan = config
        self.encoder = None
        self.class_text: np.ndarray | None = None
        if config.needs_text:
            if encoder is None:
                from karyo.text.encoder import load_text_encoder

                encoder = load_text_encoder(config.text_encoder)
            self.encoder = encoder
        if config.text_classification:
            from karyo.text.encoder import embed_class_prompts

            names = config.prompter.class_names
            if set(names) != set(range(1, config.prompter.num_classes + 1)):
                raise InputError(None, f"text classification needs a name for every class "
                                       f"1..{config.prompter.num_classes}, got {names}")
            self.prompt_set = resolve_prompt_set(names, config.prompt_set)
            self.class_text = embed_class_prompts(names, self.prompt_set, encoder)
        # the prompter variant needs no attributes: nothing is measured for it
        self.targets = (AttributeTargets(train_samples, config, encoder=encoder if config.align else None,
                                         level_model=level_model)
                        if config.align or config.attribute_prediction else None)

    def model(self) -> IVAANPrompter:
        net = IVAANPrompter(self.ivaan)
        if self.class_text is not None:
            net.set_class_text(self.class_text)
        return net

    def loss(self, model: IVAANPrompter, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        cfg = self.ivaan
        out = model(batch["image"].to(device))
        targets = point_targets(batch, device)
        base = prompter_loss(out, targets, self.config)
        result: dict[str, torch.Tensor] = {"cls": base["cls"], "reg": base["reg"]}
        total = base["loss"]
        if not (cfg.align or cfg.attribute_prediction):
            result["loss"] = total
            return result
        feats, embs, sents, levels = [], [], [], []
        for i, t in enumerate(targets):
            a_idx, g_idx = hungarian_match(out["points"][i], out["logits"][i], t["points"], t["classes"],
                                           self.config.alpha)
            ids = batch["instance_ids"][i][g_idx.cpu()].numpy()
            s, lev = self.targets.lookup(int(batch["index"][i]), ids)
            keep = torch.as_tensor(s >= 0)
            a_sel = a_idx[keep.to(a_idx.device)]
            feats.append(out["features"][i, a_sel])
            if "embeddings" in out:
                embs.append(out["embeddings"][i, a_sel])
            sents.append(torch.as_tensor(s[s >= 0]))
            levels.append(torch.as_tensor(lev[s >= 0]))
        feat = torch.cat(feats)
        sent = torch.cat(sents).to(device)
        zero = feat.sum() * 0.0
        if cfg.align:
            emb = torch.cat(embs) if embs else model.embed(feat)
            align = zero
            if len(sent) >= 2:
                uniq, inverse = torch.unique(sent, return_inverse=True)
                text = self.targets.sentence_embeddings[uniq.cpu()].to(device)
                align = instance_text_infonce(emb, text, inverse, model.scale())
            total = total + cfg.align_weight * align
            result["align"] = align
            result["temperature"] = 1.0 / model.scale().detach()
        if cfg.attribute_prediction:
            lev = torch.cat(levels).to(device)
            terms = []
            for a, logits in enumerate(model.attribute_logits(feat)):
                target = lev[:, a] if lev.numel() else lev.new_zeros(0)
                if (target >= 0).any():
                    terms.append(F.cross_entropy(logits, target, ignore_index=-1))
            attr = torch.stack(terms).mean() if terms else zero
            total = total + cfg.attribute_weight * attr
            result["attr"] = attr
        result["loss"] = total
        return result

    def export(self, model: IVAANPrompter, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), directory / "ivaan.pt")
        save_json(directory / "ivaan.json", {"config": to_dict(self.ivaan), "augment": self.augment.to_dict(),
                                            "prompt_set": getattr(self, "prompt_set", None),
                                            "n_sentences": len(self.targets.sentences) if self.targets else 0})
        if self.targets is not None:
            self.targets.level_model.save(directory / "levels.json")


# ------------------------------------------------------------------------------------------ configuration


def ivaan_config(section: Mapping[str, Any] | None, class_names: Mapping[int, str] | None = None,
                 preset: str | None = None) -> IVAANConfig:
    """An :class:`IVAANConfig` from a run config's ``model`` section: IVAAN fields at the top level and a
    ``prompter`` mapping (``preset`` + overrides, or a full :class:`PrompterConfig`); the data's class names
    fill ``num_classes``/``class_names`` unless given."""
    section = dict(section or {})
    pc = dict(section.pop("prompter", None) or {})
    if "preset" in pc or preset or not pc:
        name = pc.pop("preset", preset or "cpu")
        if class_names and "num_classes" not in pc:
            pc.update(num_classes=max(class_names), class_names=dict(class_names))
        prompter = PrompterConfig.preset(name, **pc)
    else:
        prompter = from_dict(PrompterConfig, pc)
    cfg = from_dict(IVAANConfig, section)
    cfg.prompter = prompter
    return cfg


def load_ivaan_run(run: str | os.PathLike) -> tuple[IVAANPrompter, Any]:
    """(IVAAN prompter with its trained weights, level model) from a run folder or its ``model`` folder."""
    from karyo.config import load_json
    from karyo.models.vit import read_state_dict
    from karyo.text.levels import LevelModel

    folder = Path(run)
    if (folder / "model" / "ivaan.json").is_file():
        folder = folder / "model"
    if not (folder / "ivaan.json").is_file():
        raise InputError(folder, "no ivaan.json: is this a finished IVAAN run (karyo train ivaan)?")
    meta = load_json(folder / "ivaan.json")
    cfg = from_dict(IVAANConfig, meta["config"], folder / "ivaan.json")
    net = IVAANPrompter(cfg)
    net.load_state_dict(read_state_dict(folder / "ivaan.pt"))
    levels = LevelModel.load(folder / "levels.json") if (folder / "levels.json").is_file() else None
    return net.eval(), levels


def pack_ivaan(ivaan_run: str | os.PathLike, segmentor: str | os.PathLike, out: str | os.PathLike | None = None,
               *, tune: bool = False, verifier: bool = True, log: Callable[[str], None] = print):
    """An :class:`~karyo.models.ivaan.IVAANModel` from an IVAAN run and a segmentor (a segmentor run, its
    ``model`` folder, or a PromptNucSeg/IVAAN model folder); saved to ``out`` when given. ``tune`` grid-searches
    the inference thresholds on the IVAAN run's validation images (``karyo.train.pack.tune_on_run``; the rows go to
    ``tuning.json`` in ``out``), after fitting a mask verifier on its training images unless ``verifier`` is off."""
    from karyo.models.ivaan import IVAANModel, IVAANModelConfig
    from karyo.train.pack import load_segmentor

    net, levels = load_ivaan_run(ivaan_run)
    s_cfg, negatives, s_state = load_segmentor(segmentor)
    pc = net.config.prompter
    cfg = IVAANModelConfig(ivaan=net.config, segmentor=s_cfg, mpp=pc.mpp, class_names=dict(pc.class_names),
                           negatives=negatives)
    model = IVAANModel(cfg)
    model.prompter.load_state_dict(net.state_dict())
    model.segmentor.load_state_dict(s_state)
    model.level_model = levels
    rows: list[dict] = []
    if tune:
        from karyo.train.pack import tune_on_run

        model.config, rows, limit = tune_on_run(model, ivaan_run, log, verifier=verifier)
    if out is not None:
        model.save(out)
        if rows:
            from karyo.train.pack import save_tuning

            save_tuning(out, rows, limit)
    return model


__all__ = ["AttributeTargets", "IVAANTask", "ivaan_config", "load_ivaan_run", "measure_sample", "pack_ivaan",
           "resolve_prompt_set"]
