"""IVAAN training on real CoNSeP patches: text embeddings computed once (cache hits), the prompter variant is
the prompter exactly, a short run lowers the losses, and ``karyo train ivaan`` exports a usable model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from karyo.data.augment import AugmentConfig
from karyo.data.dataset import collate_nuclei
from karyo.data.layout import LayoutDataset
from karyo.models.ivaan import IVAANConfig
from karyo.models.prompter import PrompterConfig
from karyo.text import CachedEncoder
from karyo.train.ivaan import IVAANTask, resolve_prompt_set
from karyo.train.loop import TrainConfig, fit
from karyo.train.prompter import PrompterTask

pytestmark = pytest.mark.shared_data

IDS = ["train_1_005", "train_3_006", "train_5_009", "train_8_010", "train_11_004", "train_13_006"]
AUG = AugmentConfig(crop_size=128, seed=0, p_grid_shuffle=0.0, p_elastic=0.0, p_superpixels=0.0)


class CountingEncoder:
    """A deterministic bag-of-words encoder that records every text it is asked to embed."""

    name = "counting-bow/test"
    dim = 16

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, texts):
        self.texts += list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(",", " ").split():
                seed = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") % (2**32)
                out[i] += np.random.default_rng(seed).standard_normal(self.dim)
        return out


@pytest.fixture(scope="module")
def consep(shared_data):
    ds = LayoutDataset(shared_data / "consep", ids=IDS)
    return [ds[i] for i in range(len(ds))], ds.class_names



def tiny(class_names, **kw) -> IVAANConfig:
    pc = PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=32, head_hidden=32, num_classes=4,
                        class_names=class_names, dropout=0.0)
    return IVAANConfig(prompter=pc, embed_dim=CountingEncoder.dim, proj_hidden=32, **kw)


def test_text_embeddings_are_computed_once_and_cached(consep, tmp_path, one_thread):
    samples, names = consep
    fake = CountingEncoder()
    enc = CachedEncoder(fake, tmp_path / "cache")
    task = IVAANTask(tiny(names), AUG, samples[:4], samples[4:], encoder=enc)
    sentences = task.targets.sentences
    assert len(sentences) > 10 and len(set(sentences)) == len(sentences)
    assert resolve_prompt_set(names) == task.prompt_set == "consep"
    n_class_prompts = 5 * 4  # 4 descriptions for each of 4 classes + background
    assert sorted(fake.texts[n_class_prompts:]) == sorted(sentences)  # each distinct sentence encoded once
    calls = enc.encoder_calls
    fit(task, TrainConfig(epochs=2, batch_size=4, warmup_epochs=0, max_steps_per_epoch=2), tmp_path / "run",
        progress=False)
    assert enc.encoder_calls == calls  # nothing is encoded while training, in any epoch
    # a new task (another run) finds every sentence in the disk cache: the encoder is never called
    fake2 = CountingEncoder()
    again = IVAANTask(tiny(names), AUG, samples[:4], samples[4:], encoder=CachedEncoder(fake2, tmp_path / "cache"))
    assert fake2.texts == [] and again.targets.sentences == sentences
    torch.testing.assert_close(again.targets.sentence_embeddings, task.targets.sentence_embeddings)
    # every target is one of the sentences, built from levels fitted on the training split and exported
    sent, levels = task.targets.lookup(0, np.arange(1, 200))
    assert (sent >= -1).all() and sent.max() < len(sentences) and levels.shape == (199, 4)
    assert (task.targets.table["_sample"] < 4).all()  # validation patches are never measured for targets
    counts = task.targets.sentence_counts()  # every sentence describes ≥ 1 nucleus; all targets are counted
    with_target = sum(int((task.targets.lookup(i, task.targets.table.index[task.targets.table["_sample"] == i])[0]
                           >= 0).sum()) for i in range(4))
    assert counts.shape == (len(sentences),) and counts.min() >= 1 and counts.sum() == with_target
    assert (tmp_path / "run" / "model" / "levels.json").is_file()


def _fixed_batch(task):
    items = [task.val_set[i] for i in range(len(task.val_set))]
    return collate_nuclei(items)


def test_prompter_variant_is_the_prompter(consep, one_thread):
    samples, names = consep
    cfg = tiny(names, align=False, attribute_prediction=False, text_classification=False)
    task = IVAANTask(cfg, AUG, samples[:4], samples[:2])
    assert task.encoder is None  # the prompter variant needs no text encoder
    torch.manual_seed(0)
    net = task.model().eval()
    plain = PrompterTask(cfg.prompter, AUG, samples[:4], samples[:2])
    ref = plain.model().eval()
    ref.load_state_dict(net.prompter.state_dict())
    batch = _fixed_batch(task)
    a = task.loss(net, batch, torch.device("cpu"))
    b = plain.loss(ref, batch, torch.device("cpu"))
    assert set(a) == {"loss", "cls", "reg"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_short_training_lowers_the_losses(consep, tmp_path, one_thread):
    samples, names = consep
    fake = CountingEncoder()
    task = IVAANTask(tiny(names, align_weight=1.0, attribute_weight=1.0), AUG, samples, samples[:3],
                     encoder=CachedEncoder(fake, tmp_path / "cache"))
    batch = _fixed_batch(task)
    torch.manual_seed(0)
    with torch.no_grad():
        before = {k: float(v) for k, v in task.loss(task.model().eval(), batch, torch.device("cpu")).items()}
    result = fit(task, TrainConfig(epochs=20, batch_size=4, lr=3e-3, warmup_epochs=0, schedule="constant",
                                   max_steps_per_epoch=4, seed=0, val_every=100), tmp_path / "run", progress=False)
    net = task.model()
    net.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    with torch.no_grad():
        after = {k: float(v) for k, v in task.loss(net.eval(), batch, torch.device("cpu")).items()}
    for key in ("loss", "cls", "align", "attr"):
        assert after[key] < before[key], (key, before, after)
    hist = result.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert 0 < hist[-1]["train_temperature"] <= 1


def test_karyo_train_ivaan_exports_a_model(consep, shared_data, tmp_path, one_thread, monkeypatch):
    """The api/CLI path on a 6-patch copy of CoNSeP (karyo layout), then an IVAAN model assembled with a tiny
    segmentor run and one image segmented with descriptions."""
    import karyo.text.encoder
    from karyo.models.segmentor import segmentor_config
    from karyo.train.api import train
    from karyo.train.ivaan import pack_ivaan
    from karyo.train.segmentor import SegmentorTask, SegmentorTrainSettings

    monkeypatch.setattr(karyo.text.encoder, "load_text_encoder",
                        lambda name: CachedEncoder(CountingEncoder(), tmp_path / "cache"))
    root = tmp_path / "consep6"
    for sub, ext in (("images", "png"), ("instances", "png"), ("classes", "csv")):
        (root / sub).mkdir(parents=True)
        for id_ in IDS:
            shutil.copy(shared_data / "consep" / sub / f"{id_}.{ext}", root / sub / f"{id_}.{ext}")
    shutil.copy(shared_data / "consep" / "classes.json", root / "classes.json")
    (root / "split.csv").write_text("id,split\n" + "".join(f"{i},train\n" for i in IDS))
    (tmp_path / "cfg.yaml").write_text(
        "task: ivaan\nmodel:\n  prompter: {preset: cpu, depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], fpn_dim: 16, "
        "head_hidden: 16}\n  embed_dim: 16\n  proj_hidden: 32\n  attributes: [size, shape, color_z, "
        "boundary_grad_mean]\ntrain: {epochs: 1, batch_size: 2, warmup_epochs: 0, max_steps_per_epoch: 2}\n"
        "augment: {crop_size: 128}\nval_fraction: 0.3\n")
    run = tmp_path / "run"
    res = train("ivaan", [f"{root}:train"], run, config=tmp_path / "cfg.yaml", progress=False)
    assert res.best_epoch == 0
    assert {p.name for p in (run / "model").iterdir()} == {"ivaan.pt", "ivaan.json", "levels.json"}
    res2 = train("ivaan", None, run, resume=True, train_overrides={"epochs": 2}, progress=False)
    assert len(res2.history) == 2  # resumed from the saved config
    # the same command with --resume: the config's short attribute names are the saved column names
    res3 = train("ivaan", [f"{root}:train"], run, config=tmp_path / "cfg.yaml", resume=True,
                 train_overrides={"epochs": 3}, progress=False)
    assert len(res3.history) == 3
    seg_cfg = segmentor_config("tiny")
    seg = SegmentorTask(seg_cfg, AUG, SegmentorTrainSettings(), [], [], seed=0)
    (tmp_path / "seg").mkdir()
    seg.export(seg.model(), tmp_path / "seg")
    model = pack_ivaan(run, tmp_path / "seg", tmp_path / "ivaan_model")
    assert model.config.ivaan.attributes[3] == "Boundary.GradientMean"
    assert model.class_names == {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
    model.config.score_threshold, model.config.mask_threshold, model.config.min_kept_fraction = 0.05, 0.2, 0.0
    out = model.segment(LayoutDataset(root, ids=IDS[:1])[0].image)
    assert out.n_nuclei > 0
    assert all("sharp boundary" in p["predicted_description"] or "blurred boundary" in p["predicted_description"]
               for p in out.properties.values())
    # tuned on the run's validation images: the chosen setting is the rule's pick of the rows saved beside it
    import karyo.train.pack as pack

    monkeypatch.setattr(pack, "TUNING_GRID", {"score_threshold": (0.05, 0.5), "nms_radius_px": (6.0,),
                                              "mask_nms_overlap": (None,), "refine_points": (0,),
                                              "mask_threshold": (0.5,)})
    logs = []
    tuned = pack_ivaan(run, tmp_path / "seg", tmp_path / "ivaan_tuned", tune=True, log=logs.append)
    fitted = [m for m in logs if m.startswith("verifier fitted on")]
    assert len(fitted) + sum(m.startswith("no verifier:") for m in logs) == 1  # the verifier step ran once
    assert (tuned.config.verifier is not None) == bool(fitted)
    header, rows = pack.read_tuning(tmp_path / "ivaan_tuned" / "tuning.json")
    assert len(rows) == 2 and header["selection"] == pack.SELECTION_RULE
    assert {r["score_threshold"] for r in rows} == {0.05, 0.5}
    assert tuned.config.score_threshold == pack.select_setting(rows)["score_threshold"]
