"""How much does PromptNucSeg lose when the staining differs from its training images, and does Macenko help?

    python -m benchmarks.promptnucseg_stain --model promptnucseg_cpu --threads 2

Other labs stain lighter, darker, bluer or pinker. This report re-stains the validation images of a prompter run
in optical-density space (Ruifrok-Johnston H, E, DAB; each stain's amount scaled, as
:class:`karyo.data.augment.HedJitter` does, with fixed factors here) and segments them as they are and after
Macenko normalisation (:class:`karyo.stain.MacenkoNormalizer`) to the stains of the run's training images (fitted
on a mosaic of 16 of them): the networks never saw Macenko's default reference. The last shift draws each
image's factors from U(0.7, 1.3) (seeded), a lab-to-lab spread.

Test splits are not used.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import karyo
from benchmarks._report import publish_model_report
from benchmarks.promptnucseg_density import report_arguments
from karyo.data.augment import HedJitter
from karyo.metrics import panoptic_quality
from karyo.stain import MacenkoNormalizer
from karyo.train.pack import training_samples, validation_samples

# name → (hematoxylin, eosin) OD factors; None draws them per image.
SHIFTS: dict[str, tuple[float, float] | None] = {
    "as stained": (1.0, 1.0),
    "hematoxylin × 0.7 (pale nuclei)": (0.7, 1.0),
    "hematoxylin × 1.3 (dark nuclei)": (1.3, 1.0),
    "eosin × 1.5 (pink)": (1.0, 1.5),
    "both × 0.7 (faded)": (0.7, 0.7),
    "each image U(0.7, 1.3) per stain": None,
}
SPREAD = (0.7, 1.3)


def restain(image: np.ndarray, factors: tuple[float, float]) -> np.ndarray:
    if factors == (1.0, 1.0):
        return image
    alpha = np.array([factors[0], factors[1], 1.0])
    return HedJitter(p=1.0).apply(image, alpha=alpha, beta=np.zeros(3))


def training_mosaic(run_dir: Path, n: int = 16, size: int = 256) -> np.ndarray:
    """``n`` of the run's training images (evenly spaced, RGB), cropped to ``size`` and tiled into a square."""
    train = [s for s in training_samples(run_dir) if min(s.image.shape[:2]) >= size and s.image.shape[2] == 3]
    picked = [train[i].image[:size, :size] for i in np.linspace(0, len(train) - 1, n).astype(int)]
    side = int(np.sqrt(n))
    return np.vstack([np.hstack(picked[r * side:(r + 1) * side]) for r in range(side)])


def run(model_name: str, run_dir: Path, seed: int = 0) -> dict:
    model = karyo.load(model_name)
    samples = [s for s in validation_samples(run_dir) if s.instances.max() > 0]
    normaliser = MacenkoNormalizer().fit(training_mosaic(run_dir))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        for name, factors in SHIFTS.items():
            drawn = [tuple(rng.uniform(*SPREAD, size=2)) if factors is None else factors for _ in samples]
            shifted = [replace(s, image=restain(s.image, f), classes=None) for s, f in zip(samples, drawn, strict=True)]
            as_is = [panoptic_quality(s.instances, model.segment(s.image).instances).pq for s in shifted]
            normalised = [panoptic_quality(s.instances, model.segment(normaliser.transform(s.image)).instances).pq
                          for s in shifted]
            rows.append((name, float(np.mean(as_is)), float(np.mean(normalised))))
    return {"rows": rows, "n_val": len(samples), "seconds": time.perf_counter() - t0}


def markdown(model_name: str, r: dict) -> str:
    lines = [f"Model `{model_name}`, its own settings; mean PQ over the {r['n_val']} validation images with nuclei, "
             "re-stained.", "", "| staining | PQ as is | PQ after Macenko normalisation |", "|---|---|---|"]
    lines += [f"| {name} | {a:.4f} | {b:.4f} |" for name, a, b in r["rows"]]
    return "\n".join(lines)


def main() -> None:
    args = report_arguments(__doc__.splitlines()[0], dense=False).parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.model, args.run)
    publish_model_report(markdown(args.model, result), args.model, "PromptNucSeg under other stainings: {model}",
                         "benchmarks.promptnucseg_stain", write=not args.no_docs, seconds=result["seconds"])


if __name__ == "__main__":
    main()
