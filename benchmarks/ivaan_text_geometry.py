"""Why IVAAN's alignment adds little on CoNSeP: how far apart are the sentences it aligns to?

    python -m benchmarks.ivaan_text_geometry                  # the ablation's configs, CoNSeP train
    python -m benchmarks.ivaan_text_geometry --runs runs/ivaan_ablation   # + the temperatures the runs learned

The alignment loss (``karyo.models.ivaan.instance_text_infonce``) scores an instance embedding against every
distinct sentence with ``cos / τ``. Its signal depends on how different the sentences are in the text
encoder's space: if attribute sentences differ by one word and their embeddings have cosine ≈ 0.95, then even an
instance embedding *equal* to its own sentence's embedding gets a logit only ``(1 − 0.95)/τ`` above its nearest
rival. This script measures that geometry on the sentences the ablation trains with (CoNSeP train, each
config's attributes, level fitting and class wording), and the *ideal* InfoNCE (instance → text direction, every
instance embedded exactly at its sentence) at several temperatures against chance (ln of the number of distinct
sentences, weighted by how often each occurs). An ideal loss close to chance means the objective cannot tell
sentences apart at that temperature, whatever the image encoder learns. The same is done for the class
descriptions the text classifier uses. Read-only; writes its own section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import benchmarks._report as report
from benchmarks.ivaan_ablation import REPO, SHARED, config_path
from karyo.data.layout import LayoutDataset

TEMPERATURES = (0.07, 0.03, 0.01)
DEFAULT_VARIANTS = ("align_attr", "align_attr_b2", "align_attr_pc")


def ideal_infonce(embeddings: np.ndarray, counts: np.ndarray, tau: float) -> float:
    """Instance → text InfoNCE with every instance embedded exactly at its sentence, weighted by frequency."""
    e = torch.from_numpy(embeddings).float()
    e = F.normalize(e, dim=1)
    logits = e @ e.t() / tau
    per_sentence = -torch.log_softmax(logits, dim=1).diagonal()
    w = torch.from_numpy(counts).float()
    return float((per_sentence * w).sum() / w.sum())


def geometry(embeddings: np.ndarray, counts: np.ndarray) -> dict:
    """Cosine statistics among distinct sentences and the ideal loss at each temperature."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cos = e @ e.T
    off = cos[~np.eye(len(e), dtype=bool)]
    nearest = np.where(np.eye(len(e), dtype=bool), -np.inf, cos).max(axis=1)
    p = counts / counts.sum()
    out = {"n_sentences": len(e), "n_instances": int(counts.sum()),
           "top_share": float(p.max()), "entropy": float(-(p * np.log(p)).sum()),
           "cos_mean": float(off.mean()), "cos_p5": float(np.percentile(off, 5)),
           "cos_p95": float(np.percentile(off, 95)), "nearest_mean": float(nearest.mean())}
    for tau in TEMPERATURES:
        out[f"ideal_{tau}"] = ideal_infonce(embeddings, counts, tau)
    return out


def sentence_targets(variant: str, data: Path, encoder):
    """(distinct sentence embeddings, their instance counts) of one ablation config on CoNSeP train."""
    from karyo.train.api import read_config_file
    from karyo.train.ivaan import AttributeTargets, ivaan_config

    train = LayoutDataset(data / "consep", split="train")
    cfg = ivaan_config(read_config_file(config_path(REPO / "configs", variant))["model"], train.class_names)
    targets = AttributeTargets(train, cfg, encoder=encoder)
    return targets.sentence_embeddings.numpy(), targets.sentence_counts().astype(np.float64), cfg


def learned_temperatures(runs: Path) -> list[tuple[str, float, int]]:
    """(run, last logged alignment temperature, epoch) from each run's history.csv."""
    out = []
    for hist in sorted(runs.glob("*/history.csv")):
        rows = list(csv.DictReader(hist.open()))
        if rows and rows[-1].get("train_temperature"):
            out.append((hist.parent.name, float(rows[-1]["train_temperature"]), len(rows)))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--runs", type=Path, default=None, help="ablation runs whose learned temperatures to list")
    parser.add_argument("--doc", type=Path, default=None, help="write the section into this markdown file instead")
    args = parser.parse_args(argv)
    from karyo.text.encoder import embed_class_prompts, load_text_encoder

    torch.set_num_threads(1)
    np.seterr(all="ignore")
    encoder = load_text_encoder()
    results, cfg = {}, None
    for variant in args.variants:
        emb, counts, cfg = sentence_targets(variant, args.data, encoder)
        results[variant] = geometry(emb, counts)
        results[variant]["attributes"] = ", ".join(cfg.attributes) + f" ({cfg.level_mode} levels)"
        print(variant, results[variant], flush=True)
    classes = embed_class_prompts(cfg.prompter.class_names, "consep", encoder)[1:]
    results["class descriptions"] = geometry(classes, np.ones(len(classes)))
    results["class descriptions"]["attributes"] = "prompts.yaml 'consep' (mean of each class's sentences)"

    head = ["sentences of", "aligned to", "distinct", "instances", "most common", "cos mean (p5–p95)",
            "nearest-rival cos", "uniform ln V", "chance", *(f"ideal loss τ={t}" for t in TEMPERATURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['attributes']} | {r['n_sentences']} | {r['n_instances']} | "
                     f"{r['top_share']:.1%} | {r['cos_mean']:.3f} ({r['cos_p5']:.3f}–{r['cos_p95']:.3f}) | "
                     f"{r['nearest_mean']:.3f} | {np.log(r['n_sentences']):.2f} | {r['entropy']:.2f} | "
                     + " | ".join(f"{r[f'ideal_{t}']:.2f}" for t in TEMPERATURES) + " |")
    body = ("CoNSeP train (432 patches of 256²), valid nuclei (IVAAN B.1), text encoder all-MiniLM-L6-v2. "
            "*Distinct*: sentences in the vocabulary (V); *uniform*: the loss of an embedding equally close to "
            "every sentence; *chance*: the entropy of the sentence frequencies (the loss of a model that ignores "
            "the image and predicts the frequencies); *ideal loss*: instance → text cross entropy when every "
            "instance embedding equals its sentence's embedding (the best the image side can do at that "
            "temperature; training sees a batch's sentences only, so its losses are lower). Class descriptions: "
            "one row per class, equal weights. The variants align and align_tau001 align to align_attr's "
            "sentences (same attributes and levels).\n\n"
            + "\n".join(lines) + "\n")
    if args.runs is not None:
        temps = learned_temperatures(args.runs)
        if temps:
            body += ("\nAlignment temperature at the last logged epoch (learnable; initialised at each config's "
                     "temperature_init: 0.07, align_tau001 0.01):\n\n"
                     "| run | epochs | τ |\n|---|---|---|\n"
                     + "\n".join(f"| {n} | {e} | {t:.4f} |" for n, t, e in temps) + "\n")
    print(body)
    if args.doc is not None:
        report.DOC = args.doc
    report.update_section("ivaan_text_geometry", "IVAAN: how far apart are the sentences alignment targets?",
                          body, report.invocation("benchmarks.ivaan_text_geometry"))
    return results


if __name__ == "__main__":
    main()
