"""How much does PromptNucSeg lose on images at another magnification, with and without ``mpp``?

    python -m benchmarks.promptnucseg_magnification --model promptnucseg_cpu --threads 2

The shipped networks were trained at 0.25 µm/px (40x). Slides scanned at 20x, or tiles exported at another
zoom, show nuclei smaller or larger. This report zooms the validation images of a prompter run (and their
annotations, nearest-neighbour) by a factor f, as another magnification would show them, and segments them twice:
without ``mpp`` (the model takes them to be at its own scale) and with the true ``mpp`` (the model's mpp / f), so
that karyo rescales them to the networks' scale and the masks back. Zooming out (f < 1) also throws detail away,
which no rescaling can restore: that row says what a 20x scan costs.

Test splits are not used.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from skimage.transform import rescale

import karyo
from benchmarks._report import publish_model_report
from benchmarks.promptnucseg_density import report_arguments
from karyo.metrics import panoptic_quality
from karyo.train.pack import validation_samples

FACTORS = (0.5, 0.67, 1.0, 1.5, 2.0)


def zoom(sample, factor: float):
    """``sample`` as a scanner at ``factor`` times its magnification would show it (classes dropped: the
    annotation's small nuclei can vanish when zooming out)."""
    if factor == 1.0:
        return replace(sample, classes=None)
    image = rescale(sample.image, factor, channel_axis=2, order=1, preserve_range=True, anti_aliasing=factor < 1)
    instances = rescale(sample.instances, factor, order=0, preserve_range=True, anti_aliasing=False)
    return replace(sample, image=np.clip(image + 0.5, 0, 255).astype(np.uint8), instances=instances.astype(np.int32),
                   classes=None)


def mean_pq_at(model, samples: list, mpp: float | None) -> float:
    values = []
    for s in samples:
        if s.instances.max() == 0:
            continue
        predicted = model.segment(s.image, mpp=mpp).instances
        if predicted.shape != s.instances.shape:
            raise RuntimeError(f"{s.name}: masks came back {predicted.shape}, the image is {s.instances.shape}")
        values.append(panoptic_quality(s.instances, predicted).pq)
    return float(np.mean(values))


def run(model_name: str, run_dir: Path, factors=FACTORS) -> dict:
    model = karyo.load(model_name)
    mpp = model.config.mpp
    val = validation_samples(run_dir)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for f in factors:
            zoomed = [zoom(s, f) for s in val]
            rows.append((f, mpp / f, mean_pq_at(model, zoomed, None), mean_pq_at(model, zoomed, mpp / f)))
    return {"rows": rows, "mpp": mpp, "n_val": sum(s.instances.max() > 0 for s in val),
            "seconds": time.perf_counter() - t0}


def markdown(model_name: str, r: dict) -> str:
    lines = [f"Model `{model_name}` (trained at {r['mpp']} µm/px), its own settings; mean PQ over the {r['n_val']} "
             "validation images with nuclei, zoomed by f.", "",
             "| zoom f | µm/px of the zoomed image | PQ without mpp | PQ with the true mpp |", "|---|---|---|---|"]
    for f, image_mpp, without, with_mpp in r["rows"]:
        lines.append(f"| {f:g} | {image_mpp:.3f} | {without:.4f} | {with_mpp:.4f} |")
    return "\n".join(lines)


def main() -> None:
    args = report_arguments(__doc__.splitlines()[0], dense=False).parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.run)
    publish_model_report(markdown(args.model, result), args.model, "PromptNucSeg at other magnifications: {model}",
                         "benchmarks.promptnucseg_magnification", write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
