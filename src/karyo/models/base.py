"""The model object every karyo model is: a config dataclass + (optional) weights, one ``segment`` call.

A model is a folder: ``config.json`` (``{"arch": ..., "config": {...}}``), weights beside it and a model card.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from karyo import config as config_io
from karyo.errors import InputError
from karyo.infer.result import SegmentationResult

ARCHITECTURES: dict[str, type[InstanceModel]] = {}


def register(cls: type[InstanceModel]) -> type[InstanceModel]:
    """Class decorator: make an architecture loadable by the name in its config.json."""
    ARCHITECTURES[cls.arch] = cls
    return cls


class InstanceModel(ABC):
    """A nucleus instance segmentation (and classification) model."""

    arch: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.config_class()

    @property
    def class_names(self) -> dict[int, str] | None:
        names = getattr(self.config, "class_names", None)
        return {int(k): v for k, v in names.items()} if names else None

    @abstractmethod
    def segment(self, image: np.ndarray, *, points: Sequence[tuple[float, float]] | None = None,
                negative: Sequence[tuple[float, float]] | None = None, mpp: float | None = None,
                name: str = "") -> SegmentationResult:
        """Find, outline and classify the nuclei of one H×W or H×W×C image: uint8, uint16, or float in [0, 1]
        (RGB H&E for the shipped models; other channel counts need a model trained on them). ``mpp``: the image's
        µm per pixel, resampled to the model's (None: taken to be the model's own, so a 20x tile given to a 40x
        model without it loses nuclei). ``points``/``negative`` (x, y in pixels): segment only the nuclei at
        ``points``; ``negative`` marks places that are not a nucleus. Alone, negatives remove the nuclei under them
        in every model. With ``points`` a promptable model (PromptNucSeg) gives them to its segmentor as negative
        prompts, which cut a mask back rather than drop it; the others, which select among the nuclei they find,
        drop a nucleus a negative lies on. Returns a
        :class:`~karyo.infer.result.SegmentationResult` (``instances``, ``classes``, ``scores``, ``table()``,
        ``save()``)."""

    def query(self, result: SegmentationResult, text: str, top_k: int | None = None) -> Any:
        """Rank ``result``'s nuclei by their likeness to ``text``: what IVAAN models do (they embed nuclei in the
        text encoder's space); every other model says so in one line instead of an AttributeError."""
        from karyo.errors import InputError

        raise InputError(None, f"only IVAAN models answer text queries; {self.arch} does not (karyo train ivaan, "
                               f"then karyo pack ivaan, makes one)")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (and weights, for learned models) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config_io.save_json(directory / "config.json",
                            {"arch": self.arch, "config": config_io.to_dict(self.config)})
        self._save_weights(directory)
        return directory

    def _save_weights(self, directory: Path) -> None:  # noqa: B027  (config-only models have no weights)
        """Learned models write their weights here."""

    @classmethod
    def _from_config(cls, config: Any, directory: Path | None, device: str = "cpu") -> InstanceModel:
        return cls(config)


def load_model_dir(directory: str | os.PathLike, device: str = "cpu") -> InstanceModel:
    """Rebuild a model from its folder (config.json names the architecture)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        _not_a_model(directory)
    data = config_io.load_json(directory / "config.json")
    arch = data.get("arch")
    if arch not in ARCHITECTURES:
        raise InputError(directory / "config.json",
                         f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    cfg = config_io.from_dict(cls.config_class, data.get("config", {}), directory / "config.json")
    return cls._from_config(cfg, directory, device=device)


def _not_a_model(directory: Path) -> None:
    """Say what a folder without config.json is and how to get a model from it (a training run, a run's
    prompter or segmentor export), instead of only "config.json: file not found"."""
    pack = ("a PromptNucSeg model is a prompter and a segmentor packed together: karyo pack promptnucseg "
            "--prompter PROMPTER_RUN --segmentor SEGMENTOR_RUN --out MODEL")
    parts = [name for name in ("prompter", "segmentor") if (directory / f"{name}.json").is_file()]
    if parts:
        raise InputError(directory, f"the {' and '.join(parts)} of a training run, not a model; {pack}")
    run = directory.parent if (directory.parent / "train_config.json").is_file() else directory
    for task in ("cellvit", "ivaan"):  # runs whose network karyo pack turns into a model
        if (directory / f"{task}.json").is_file() or (run / "model" / f"{task}.json").is_file():
            extra = " --segmentor SEGMENTOR_RUN_OR_MODEL" if task == "ivaan" else ""
            raise InputError(directory, f"the network of {'an' if task[0] in 'aeiou' else 'a'} {task} training run, "
                                        f"not a model yet: karyo pack {task} "
                                        f"--run {run}{extra} --out MODEL")
    if (directory / "train_config.json").is_file():
        task = config_io.load_json(directory / "train_config.json").get("task", "?")
        if task in ("prompter", "segmentor"):
            raise InputError(directory, f"a {task} training run, not a model; {pack}")
        if (directory / "model" / "config.json").is_file():
            raise InputError(directory, f"a {task} training run; its model is {directory / 'model'}")
        if (directory / "last.pt").is_file():
            raise InputError(directory, f"a {task} training run interrupted before it exported its network: finish "
                                        f"it with karyo train {task} --out {directory} --resume")
        raise InputError(directory, f"a {task} training run without an exported model (did it finish an epoch?)")
    raise InputError(directory / "config.json", "file not found: not a karyo model folder")
