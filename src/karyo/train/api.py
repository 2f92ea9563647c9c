"""``karyo train``'s Python twin: build the task from data specs and configs, then :func:`karyo.train.loop.fit`.

Everything a run needs is saved in ``RUN/train_config.json``; ``resume=True`` reads it back, so a resumed run
trains exactly what the interrupted one did (only ``epochs`` may be raised).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from karyo.config import from_dict, load_json, to_dict
from karyo.data.augment import AugmentConfig
from karyo.device import pick_device
from karyo.errors import InputError, naming
from karyo.models.prompter import PrompterConfig
from karyo.models.segmentor import SegmentorConfig, segmentor_config
from karyo.train.channels import (
    adapt_training_data,
    channel_summary,
    channels_from_data,
    check_channels_in_data,
    parse_channels,
)
from karyo.train.data import DataSpec, group_split, load_specs, source_group, test_images_trained_on
from karyo.train.loop import FitResult, TrainConfig, fit
from karyo.train.prompter import PrompterTask
from karyo.train.segmentor import SegmentorTask, SegmentorTrainSettings

TASKS = ("prompter", "segmentor", "ivaan", "cellvit", "monch", "unet", "stain_agnostic")
# Tasks whose runs read a settings: section.
SETTINGS_TASKS = ("segmentor", "stain_agnostic", "monch", "unet")
# Tasks whose networks take a channel adapter (karyo.models.adapter) in front of the backbone.
CHANNEL_TASKS = ("prompter", "segmentor", "cellvit", "monch", "stain_agnostic")

log = logging.getLogger(__name__)


def read_config_file(path: str | os.PathLike | None) -> dict:
    """A run config (JSON or YAML) with optional sections ``model``, ``train``, ``augment``, ``settings``,
    ``data`` (list of specs), ``val_fraction``, ``preset``, ``init`` (starting weights) and ``val_ids`` (the
    validation images by id, instead of a drawn split)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(path, f"invalid YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "config must be a mapping with sections model/train/augment/data")
    unknown = set(data) - {"model", "train", "augment", "settings", "data", "val_fraction", "preset", "task", "init",
                           "val_ids"}
    if unknown:
        raise InputError(path, f"unknown config section(s) {sorted(unknown)}")
    val_ids = data.get("val_ids")
    if val_ids is not None and (not isinstance(val_ids, list) or not val_ids
                                or not all(isinstance(i, str) for i in val_ids)):
        raise InputError(path, "val_ids must be a non-empty list of image ids (quote numeric ids: '00000068')")
    return data


def _class_names(specs: list[DataSpec]) -> dict[int, str]:
    from karyo.data.datasets import open_dataset

    for spec in specs:
        if spec.classes == "keep":
            dataset = open_dataset(spec.path, split=spec.split)
            if dataset.class_names:
                return dict(dataset.class_names)
            root = getattr(dataset, "root", None)
            if root is not None and any((Path(root) / "classes").glob("*.csv")):  # would silently train class-free
                raise InputError(Path(root) / "classes.json",
                                 'not found, but classes/ holds per-nucleus classes: write it to name them (e.g. '
                                 '{"1": "tumour", "2": "lymphocyte"}, ids as in the class CSVs), or train on nuclei '
                                 f"only with --data {spec.path}{':' + spec.split if spec.split else ''}@none")
    return {}


def train(task: str, data: list[str] | None, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
          resume: bool = False, preset: str | None = None, val_fraction: float | None = None,
          train_overrides: dict[str, Any] | None = None, progress: bool = True,
          channels: str | int | list[str] | None = None, init: str | os.PathLike | None = None,
          on_resume: Callable[[int], None] | None = None, on_split: Callable[[str], None] | None = None
          ) -> FitResult:
    """Train one of :data:`TASKS` into ``out`` (see the module docstring).

    ``channels`` (the :data:`CHANNEL_TASKS`): put a channel adapter for N channels (an int or ``"8"``) or for these
    named channels (``"DAPI,CD45"``) in front of the network (:mod:`karyo.models.adapter`); the data are mapped
    onto them by the adapter's rule; a name no training image has, or a count none has, is refused (a name only
    some lack is filled by the adapter). Without ``channels``, a config whose ``model: adapter:`` section names no
    channels (no ``in_channels`` / ``channel_names``), or a stain-agnostic run with neither an adapter nor
    ``in_chans``, takes them from the training images, which must agree (all RGB keep 3 unnamed channels).
    Ignored on resume (the saved model config holds the adapter). A prompter and a segmentor trained with the same
    ``channels`` and augmentation pack into one multi-channel PromptNucSeg model.

    ``init`` (or the config's ``init:``): start from these weights instead of a random initialisation — fine-tuning a
    shipped model on new data, or a second schedule after a finished run (see :func:`init_weights`). The model
    config must build the same network. A config may also fix the validation images (``val_ids:``), so that a
    continued run is selected on exactly the images its starting point never saw.

    ``on_split(message)``: called once the training and validation images are settled, with a line saying how many
    of each (and, for a drawn split, from how many source images).
    """
    if task not in TASKS:
        raise InputError(None, f"unknown training task {task!r}; choose from {', '.join(TASKS)}")
    if channels is not None and task not in CHANNEL_TASKS:
        raise InputError(None, f"--channels applies to the {', '.join(CHANNEL_TASKS)} tasks, not {task}")
    channels = parse_channels(channels)  # a bad value (--channels 0) is refused before the data are read
    out = Path(out)
    if resume:
        saved_file = out / "train_config.json"
        saved = load_json(saved_file) if saved_file.is_file() else None
        if init is not None and saved is not None and _same_init(init, saved.get("init")):
            init = None  # the documented "same command" with --resume: the --init the run started from
        given = [flag for flag, value in (("--init", init), ("--preset", preset), ("--channels", channels))
                 if value is not None]
        if given:  # silently ignored before: the saved run decides what it trains
            raise InputError(out, f"a resumed run keeps the network it started with; {', '.join(given)} would change "
                                  f"it (start a new run with --init {out} to train on from this one)")
        channels = None  # the saved model config holds the adapter
        if saved is None:
            raise InputError(out, "nothing to resume: no train_config.json here")
        if saved.get("task") != task:
            raise InputError(out, f"this run trains a {saved.get('task')}, not a {task}")
        file_cfg = {k: saved[k] for k in ("model", "train", "augment", "settings", "data", "val_fraction", "val_ids",
                                          "init") if k in saved}  # init: kept in the record, not loaded again
        given_cfg = read_config_file(config)
        _check_resume_changes(task, out, file_cfg, given_cfg, config, data, train_overrides)
        if "epochs" in (given_cfg.get("train") or {}) and "epochs" not in (train_overrides or {}):
            train_overrides = {**(train_overrides or {}), "epochs": given_cfg["train"]["epochs"]}  # may be raised
        data = None
    else:
        file_cfg = read_config_file(config)
        if file_cfg.get("task") not in (None, *TASKS):
            raise InputError(config, f"unknown training task {file_cfg['task']!r}; choose from {', '.join(TASKS)}")
        if file_cfg.get("task") not in (None, task):
            raise InputError(config, f"this config is for `karyo train {file_cfg['task']}`, not {task}")
    specs = [DataSpec.parse(s) for s in (data or file_cfg.get("data") or [])]
    if not specs:
        raise InputError(None, "no training data: pass --data PATH[:SPLIT][@CLASSES] (repeatable)")
    if not resume:
        for line in test_images_trained_on(specs):
            (on_split or log.warning)(line)
    tcfg = from_dict(TrainConfig, {**file_cfg.get("train", {}), **(train_overrides or {})}, config)
    with naming(config):
        augment = AugmentConfig.from_dict({"seed": tcfg.seed, **file_cfg.get("augment", {})})
    class_names = _class_names(specs)
    with naming(config if "device" in (file_cfg.get("train") or {}) and "device" not in (train_overrides or {})
                else None):
        pick_device(tcfg.device)
    init_state = None
    if not resume and (init := init if init is not None else file_cfg.get("init")) is not None:
        with naming(config if "init" in file_cfg and init == file_cfg["init"] else None):
            init_state = init_weights(task, init)
    class_names = _mapped_class_names(specs, class_names, init if init_state is not None else None, task,
                                      (file_cfg.get("model") or {}).get("class_names") if resume else None)
    if not resume:  # a config's mistakes are reported before minutes of data loading, not after
        network = check_config_sections(task, file_cfg, preset, class_names, config)
        if init_state is not None and network is not None:
            _check_init_fits(network, init_state, init, config)
    vf = val_fraction if val_fraction is not None else file_cfg.get("val_fraction", 0.15)
    if isinstance(vf, bool) or not isinstance(vf, int | float) or not 0 < vf < 1:
        raise InputError(config if val_fraction is None else None,
                         f"val_fraction must be a number between 0 and 1, got {vf!r}")
    samples = load_specs(specs, class_names or None)
    # Tiles are small: hold the whole dataset in memory instead of decoding PNGs every epoch.
    items = [samples[i] for i in range(len(samples))]
    saved_val = file_cfg.get("val_ids")
    if saved_val is not None:  # a resumed run keeps exactly the split it started with; a config may fix one
        keep = set(saved_val)
        va_idx = [i for i, n in enumerate(samples.ids) if n in keep]
        tr_idx = [i for i, n in enumerate(samples.ids) if n not in keep]
        if len(va_idx) != len(keep):
            unknown = sorted(keep - set(samples.ids))
            raise InputError(config, f"val_ids names {len(unknown)} image(s) not in the training data, e.g. "
                                     f"{unknown[:3]}")
        drawn = f"the images val_ids names{f' in {config}' if config and not resume else ''}"
    else:
        present = [set((s.classes or {}).values()) for s in items]
        tr_idx, va_idx = group_split(samples.ids, vf, seed=tcfg.seed, item_classes=present)
        sources = {source_group(n) for n in samples.ids}
        held = {source_group(samples.ids[i]) for i in va_idx}
        drawn = (f"{len(held)} of {len(sources)} source images held out whole (patches named <source>_<n> stay "
                 f"together), val_fraction {vf:g}")
        if len(sources) < 2 or not va_idx or not tr_idx:
            raise InputError(None, f"cannot split {len(items)} image(s) from {len(sources)} source image(s) into "
                                   f"training and validation: {drawn}. Add images from other sources, or name the "
                                   f"validation images in the config (val_ids:)")
    if not va_idx or not tr_idx:
        raise InputError(config, f"{'no validation' if not va_idx else 'no training'} images left: {drawn}")
    if on_split is not None:
        unstated = "" if any(s.mpp for s in items) else (
            "; no image states its resolution: the model records the config's µm/px (mpp), and inference "
            "resamples inputs that state another one to it")
        on_split(f"training on {len(tr_idx)} image(s), validating on {len(va_idx)} ({len(va_idx) / len(items):.0%}; "
                 f"{drawn}){unstated}")
    train_samples = [items[i] for i in tr_idx]
    val_samples = [items[i] for i in va_idx]
    if not resume and task in CHANNEL_TASKS:
        if channels is not None:  # a channel no training image has would train an adapter input never seen
            check_channels_in_data(channels, train_samples)
        elif _adapter_channels_unset(file_cfg, task):
            channels = channels_from_data(items)
            if channels is not None:
                said = ", ".join(channels) if isinstance(channels, tuple) else f"{channels} unnamed channel(s)"
                (on_split or log.info)(f"channels from the data: {said}")
    meta: dict[str, Any] = {"data": [str(s) for s in specs], "val_fraction": vf, "augment": augment.to_dict(),
                            "n_train": len(train_samples), "n_val": len(val_samples),
                            "val_ids": [samples.ids[i] for i in va_idx]}
    if resume:  # a resumed run continues from its checkpoint; only the record of its starting point is kept
        if file_cfg.get("init"):
            meta["init"] = file_cfg["init"]
    elif init is not None:
        meta["init"] = str(init)
    model_cfg: Any
    with naming(config):  # a model: section's errors (unknown fields, bad values) name the file
        if task == "prompter":
            model_cfg = _prompter_network(file_cfg.get("model") or {}, preset, class_names)
            model_cfg, augment, train_samples, val_samples = adapt_training_data(model_cfg, channels, augment,
                                                                                 train_samples, val_samples)
            t = PrompterTask(model_cfg, augment, train_samples, val_samples)
        elif task == "ivaan":
            from karyo.train.ivaan import IVAANTask, ivaan_config

            model_cfg = ivaan_config(file_cfg.get("model"), class_names, preset)
            t = IVAANTask(model_cfg, augment, train_samples, val_samples)
        elif task == "cellvit":
            from karyo.train.cellvit import CellViTTask, cellvit_config

            model_cfg = cellvit_config(file_cfg.get("model"), preset, class_names, augment)
            model_cfg, augment, train_samples, val_samples = adapt_training_data(model_cfg, channels, augment,
                                                                                 train_samples, val_samples)
            t = CellViTTask(model_cfg, augment, train_samples, val_samples)
        elif task == "stain_agnostic":
            from karyo.train.stain_agnostic import build_stain_agnostic_task

            t, model_cfg, extra = build_stain_agnostic_task(file_cfg, preset, augment, train_samples, val_samples,
                                                            channels)
            meta.update(extra)
        elif task in ("monch", "unet"):
            from karyo.train.monch import build_semantic_task

            t, model_cfg, extra = build_semantic_task(task, file_cfg, preset, augment, class_names, train_samples,
                                                      val_samples, channels)
            meta.update(extra)
        else:
            base = dict(file_cfg.get("model") or {})
            if not base and preset is None and init_state is not None:  # fine-tune the network the weights are of
                base = init_model_config("segmentor", init) or {}
            model_cfg = _segmentor_network(base, preset)
            model_cfg, augment, train_samples, val_samples = adapt_training_data(model_cfg, channels, augment,
                                                                                 train_samples, val_samples)
            settings = from_dict(SegmentorTrainSettings, file_cfg.get("settings", {}))
            meta["settings"] = to_dict(settings)
            t = SegmentorTask(model_cfg, augment, settings, train_samples, val_samples, seed=tcfg.seed)
    if on_split is not None and not resume and 0 < tcfg.epochs <= tcfg.warmup_epochs:
        on_split(f"note: all {tcfg.epochs} epoch(s) are warm-up (warmup_epochs {tcfg.warmup_epochs}: the learning "
                 f"rate starts at {tcfg.lr * 1e-3:g} and grows per epoch), so the weights barely move; train more "
                 f"epochs or set train: {{warmup_epochs: 0}}")
    if on_split is not None and getattr(model_cfg, "adapter", None) is not None:
        on_split(channel_summary(model_cfg.adapter, items))
    stated = sorted({round(float(s.mpp), 4) for s in items if s.mpp})
    model_mpp = getattr(model_cfg, "mpp", None)
    if on_split is not None and stated and model_mpp and any(abs(m - model_mpp) > 0.05 * model_mpp for m in stated):
        n_stated = sum(1 for s in items if s.mpp)
        on_split(f"note: {n_stated} of {len(items)} image(s) state {', '.join(f'{m:g}' for m in stated[:3])} µm/px, "
                 f"the model records {model_mpp:g} (its config's mpp) and training does not resample: set "
                 f"model: {{mpp: ...}} in the config to the data's, or inference will resample inputs to {model_mpp:g}")
    crops = len(getattr(t, "train_set", None) or ())
    if crops and crops < tcfg.batch_size:  # incomplete batches are dropped: every epoch would be empty
        raise InputError(config, f"{len(train_samples)} training image(s) give {crops} crop(s) per epoch, fewer than "
                                 f"batch_size {tcfg.batch_size}: no training step would run; lower it (--batch-size "
                                 f"{crops}) or add images")
    other_classes, class_order = False, None
    if init_state is not None:
        before, now = init_class_names(task, init), getattr(model_cfg, "class_names", None)
        other_classes = bool(before and now) and _name_list(before) != _name_list(now)
        class_order = _class_order(before, now) if other_classes else None
        if class_order is not None:
            other_classes = False
            meta["init_class_order"] = class_order
        if other_classes and on_split is not None and [v for _, v in _name_list(now)] != ["nucleus"]:  # fit() says why
            def listed(names: dict) -> str:
                return ", ".join(f"{k} {v}" for k, v in sorted((int(k), v) for k, v in names.items()))

            on_split(f"note: {init} was trained on the classes {listed(before)}; these data name {listed(now)}: its "
                     f"class layer starts afresh (the same names, numbered in any order, would have been kept)")
    return fit(t, tcfg, out, resume=resume, model_config=model_cfg, progress=progress, meta=meta,
               init_state=init_state, init_source=init, init_other_classes=other_classes,
               init_class_order=class_order, on_resume=on_resume)


def _same_init(init: str | os.PathLike, saved: str | None) -> bool:
    """Whether ``init`` is what a run started from (``saved``, its train_config.json's ``init``): the same shipped
    model's name or the same path, however written."""
    if saved is None:
        return False
    if str(init) == str(saved):
        return True
    return Path(init).exists() and Path(saved).exists() and Path(init).resolve() == Path(saved).resolve()


def _adapter_channels_unset(file_cfg: dict, task: str) -> bool:
    """Whether the run config's ``model:`` section asks for a channel adapter without saying its channels
    (``adapter:`` without ``in_channels`` / ``channel_names``), or is a stain-agnostic run (whose point is the
    adapter) that sets neither an adapter nor ``in_chans``: the data's channels are then taken
    (:func:`karyo.train.channels.channels_from_data`), not the adapter's default of 3 unnamed ones."""
    model = file_cfg.get("model")
    model = model if isinstance(model, dict) else {}
    adapter = model.get("adapter")
    if task == "stain_agnostic" and adapter is None and not {"in_chans", "encoder"} & set(model):
        return True
    return isinstance(adapter, dict) and not {"in_channels", "channel_names"} & set(adapter)


def _mapped_class_names(specs: list[DataSpec], class_names: dict[int, str], init: str | os.PathLike | None,
                        task: str, saved: dict | None) -> dict[int, str]:
    """The class names of the run. ``--data PATH@1=3,2=0`` maps a dataset's ids onto the model's: where no
    dataset's classes.json names the ids mapped onto, the model started from (``--init``) does (or, resumed, the
    saved model config). Before, the run trained a one-class model and failed on the mapped ids."""
    mapped = sorted({b for spec in specs for b in spec.class_map.values() if b})
    if not mapped:
        return class_names
    if not class_names:
        named = saved or (init_class_names(task, init) if init is not None else None)
        if not named:
            raise InputError(None, f"--data {next(str(sp) for sp in specs if sp.class_map)} maps onto class ids "
                                   f"{mapped}, which no dataset's classes.json and no --init model names")
        class_names = {int(k): str(v) for k, v in named.items()}
    unknown = [m for m in mapped if m not in class_names]
    if unknown:
        raise InputError(None, f"--data maps onto class id(s) {unknown}, not among the model's classes "
                               f"{dict(sorted(class_names.items()))}")
    return class_names


def check_config_sections(task: str, file_cfg: dict, preset: str | None, class_names: dict[int, str],
                          config: str | os.PathLike | None) -> Any:
    """Build the ``model:`` and ``settings:`` sections once without data, so that an unknown field or a bad value
    stops the run naming ``config`` before the images are read. Checks only: :func:`train` builds them again with
    what the data add (channel statistics, adapters). Returns the prompter's or segmentor's network config where
    the section gives one (None otherwise), for :func:`_check_init_fits`."""
    model = dict(file_cfg.get("model") or {})
    settings = dict(file_cfg.get("settings") or {})
    if settings and task not in SETTINGS_TASKS:
        raise InputError(config, f"the {task} task takes no settings: section (it is for the "
                                 f"{', '.join(SETTINGS_TASKS)} tasks); move its keys to model:, train: or augment:")
    with naming(config):
        if task == "prompter":
            return _prompter_network(model, preset, class_names)
        if task == "segmentor":
            from_dict(SegmentorTrainSettings, settings)
            return _segmentor_network(model, preset) if model or preset else None
        elif task == "ivaan":
            from karyo.train.ivaan import ivaan_config

            ivaan_config(model, class_names, preset)
        elif task == "cellvit":
            from karyo.train.cellvit import cellvit_config

            cellvit_config(model, preset, class_names)
        elif task == "stain_agnostic":
            from karyo.train.stain_agnostic import StainAgnosticSettings, stain_agnostic_config

            stain_agnostic_config(model, preset)
            from_dict(StainAgnosticSettings, settings)
        elif task in ("monch", "unet"):
            from karyo.train.monch import SemanticTrainSettings, semantic_model_config

            semantic_model_config(task, model, preset, class_names)
            from_dict(SemanticTrainSettings, settings)
    return None


def _check_init_fits(network: Any, init_state: dict, init: str | os.PathLike, config: str | os.PathLike | None
                     ) -> None:
    """Load ``--init`` weights into the configured network once, before the data are read: a config that builds
    another network (``model: preset: cpu`` against the shipped segmentor's detail branch) is refused at once,
    saying how to fine-tune the network the weights are of. The class layer and channel adapter may differ (they
    start afresh in the run)."""
    from karyo.models.prompter import Prompter
    from karyo.models.segmentor import Segmentor
    from karyo.train.loop import load_init_state

    model = Prompter(network) if isinstance(network, PrompterConfig) else Segmentor(network)
    where = f" ({config})" if config else ""
    try:  # quiet: the run says what restarts
        load_init_state(model, init_state, init, other_classes=True, quiet=True)
    except InputError as exc:
        raise InputError(exc.source, f"{exc.problem}; leave out the config's model: section{where} to fine-tune "
                                     f"the network the weights are of") from None


#: What a resumed run may change: how long it trains and where it computes, not what it learns.
RESUMABLE_CHANGES = frozenset({"epochs", "threads", "device", "num_workers"})


def _check_resume_changes(task: str, out: Path, saved: dict, given: dict, config: str | os.PathLike | None,
                          data: list[str] | None, overrides: dict[str, Any] | None) -> None:
    """A resumed run continues with the settings it started with (its checkpoint's optimiser state and data
    order depend on them); a config file, --data or an option that would change them is refused instead of
    silently ignored or half applied. Only :data:`RESUMABLE_CHANGES` may differ."""
    saved_train = from_dict(TrainConfig, saved.get("train", {}), out / "train_config.json")
    changed = sorted(k for k, v in (overrides or {}).items()
                     if k not in RESUMABLE_CHANGES and getattr(saved_train, k, v) != v)
    if changed:
        flags = {"max_steps_per_epoch": "max-steps"}
        options = ", ".join("--" + flags.get(c, c.replace("_", "-")) for c in changed)
        raise InputError(out, f"a resumed run keeps its settings; {options} would change them (only --epochs, "
                              f"--threads and --device may); start a new run with --init {out} to train on with "
                              f"new settings")
    if given:
        given_train = from_dict(TrainConfig, {**to_dict(saved_train), **given.get("train", {}), **(overrides or {})},
                                config)
        diffs = [f"train.{k}" for k in sorted(given.get("train", {}))
                 if k not in RESUMABLE_CHANGES and getattr(given_train, k) != getattr(saved_train, k)]
        if "data" in given and not data and [str(DataSpec.parse(d)) for d in given["data"]] != saved.get("data"):
            diffs.append("data")  # (--data, when given, replaces the config's: it is compared below)
        for key in ("val_fraction", "val_ids"):
            if key in given and given[key] != saved.get(key):
                diffs.append(key)
        diffs += _changed_model_keys(given.get("model") or {}, saved.get("model") or {}, "model")
        if _preset_changed(task, given.get("model") or {}, saved.get("model") or {}, config):
            diffs.append("model.preset")
        diffs += _changed_model_keys(given.get("augment") or {}, saved.get("augment") or {}, "augment")
        diffs += _changed_model_keys(given.get("settings") or {}, saved.get("settings") or {}, "settings")
        if diffs:
            raise InputError(config, f"differs from the run being resumed in {', '.join(diffs)}; a resumed run "
                                     f"keeps the settings in {out / 'train_config.json'} (only train.epochs may "
                                     f"be raised)")
    if data and [str(DataSpec.parse(d)) for d in data] != saved.get("data"):
        raise InputError(out, "--data differs from the run being resumed; a resumed run keeps its data")


#: Model config fields that the data, not the preset, decide.
_DATA_FIELDS = frozenset({"class_names", "num_classes", "pixel_mean", "pixel_std", "adapter", "in_chans", "binary"})


def _preset_changed(task: str, given: dict, saved: dict, config: str | os.PathLike | None) -> bool:
    """Whether a config's ``model: preset:`` names another network than the saved run's (the saved config holds
    the fields a preset expanded to, not its name): the preset's fields, other than those the data decide or the
    section sets itself, are compared with the saved ones."""
    name = given.get("preset")
    if name is None:
        return False
    with naming(config):
        if task == "prompter":
            preset = PrompterConfig.preset(name)
        elif task == "segmentor":
            preset = segmentor_config(name)
        elif task in ("cellvit", "stain_agnostic"):
            from karyo.models.cellvit import CellViTConfig

            preset = CellViTConfig.preset(name)
        elif task == "monch":
            from karyo.models.monch import MONCHConfig

            preset = MONCHConfig.preset(name)
        else:
            return False
    fields = {k: v for k, v in to_dict(preset).items() if k not in _DATA_FIELDS and k not in given}
    return bool(_changed_model_keys(fields, saved, "model"))


def _changed_model_keys(given: dict, saved: dict, prefix: str) -> list[str]:
    """The keys of a config's ``model:`` section whose values differ from the saved model config's (nested
    sections compared key by key; keys the saved config does not hold, such as ``preset``, cannot be compared)."""
    changed = []
    for key, value in given.items():
        if key not in saved:
            continue
        if isinstance(value, dict) and isinstance(saved[key], dict):
            changed += _changed_model_keys(value, saved[key], f"{prefix}.{key}")
        elif key == "attributes" and isinstance(value, list | tuple):  # IVAAN: d_eq is Size.EquivalentDiameter
            if _attribute_columns(value) != _attribute_columns(saved[key]):
                changed.append(f"{prefix}.{key}")
        elif _plain(value) != _plain(saved[key]):
            changed.append(f"{prefix}.{key}")
    return changed


def _attribute_columns(names: Any) -> list:
    """Attribute names as the saved config holds them (paper names and aliases resolved to column names)."""
    from karyo.attributes.names import resolve

    def column(name: Any) -> Any:
        try:
            return resolve(str(name))
        except KeyError:
            return name

    return [column(n) for n in names] if isinstance(names, list | tuple) else names


def _plain(value: Any) -> Any:
    """YAML and JSON spell sequences and mappings alike (tuples become lists, int keys strings)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def init_weights(task: str, path: str | os.PathLike) -> dict:
    """The state dict to start ``task``'s network from: a checkpoint file, a run folder (its ``best.pt``), or a
    packed model folder (or a shipped model's name) holding ``<task>.pt`` (e.g. ``prompter.pt`` of
    ``promptnucseg_cpu``)."""
    from karyo.models.registry import model_folder
    from karyo.models.vit import read_state_dict

    p = model_folder(path)
    run = p if p.is_dir() else p.parent
    if (run / "train_config.json").is_file() and (p.is_dir() or p.name in ("best.pt", "last.pt")):
        other = load_json(run / "train_config.json").get("task")
        if other and other != task and {other, task} not in ({"ivaan", "prompter"}, {"stain_agnostic", "cellvit"}):
            what = f"a checkpoint of a {other} run" if p.is_file() else f"a {other} run"
            raise InputError(p, f"is {what}: its weights cannot start a {task} network (--init takes a "
                                f"{task} run, a {task} checkpoint or a model folder holding {task}.pt)")
    if p.is_dir():
        for candidate in (p / "best.pt", p / f"{task}.pt"):
            if candidate.is_file():
                return read_state_dict(candidate)
        held = sorted(f.name for f in p.glob("*.pt"))
        there = f"; it holds {', '.join(held)}" if held else ""
        raise InputError(p, f"no {task} weights here: expected best.pt (a {task} run folder) or {task}.pt (a packed "
                            f"model with a {task}){there}")
    return read_state_dict(p)


def _init_record(task: str, path: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """What the folder of :func:`init_weights`' ``path`` records about the weights: (a run's ``train_config.json``,
    a packed model's ``config.json`` ``config``), each None where absent, unreadable or not of those weights."""
    from karyo.models.registry import model_folder

    p = model_folder(path)
    folder = p if p.is_dir() else p.parent
    try:
        if (folder / "train_config.json").is_file() and (p.is_dir() or p.name in ("best.pt", "last.pt")):
            return load_json(folder / "train_config.json"), None
        if (folder / "config.json").is_file() and (p.is_dir() or p.name == f"{task}.pt"):
            return None, load_json(folder / "config.json").get("config") or {}
    except (OSError, ValueError, AttributeError):
        pass
    return None, None


def init_class_names(task: str, path: str | os.PathLike) -> dict | None:
    """The class names the weights :func:`init_weights` reads from ``path`` were trained on, where the folder
    records them (a run's ``train_config.json``, a packed model's ``config.json``); None for a bare file."""
    run, packed = _init_record(task, path)
    if run is not None:
        return (run.get("model") or {}).get("class_names")
    if packed is not None:
        return (packed.get(task) or {}).get("class_names") or packed.get("class_names")
    return None


def init_model_config(task: str, path: str | os.PathLike) -> dict | None:
    """The network config (as saved) of the weights :func:`init_weights` reads from ``path``, where its folder
    records one: a run's ``train_config.json`` ``model``, a packed model's ``config.json`` (its ``task`` part)."""
    run, packed = _init_record(task, path)
    if run is not None:
        return run.get("model") if run.get("task") == task else None
    return packed.get(task) if packed is not None else None


def _class_order(before: dict, now: dict) -> list[int] | None:
    """Where the init's class layer holds each of this run's classes (background first), when both name the same
    classes numbered otherwise (e.g. alphabetically): None when the names differ."""
    old = {name: i for i, name in _name_list(before)}
    new = _name_list(now)
    if len(old) != len(before) or sorted(old) != sorted(name for _, name in new):
        return None
    if [i for i, _ in new] != list(range(1, len(new) + 1)) or sorted(old.values()) != list(range(1, len(old) + 1)):
        return None  # ids with gaps: rows and ids do not correspond one to one
    return [0] + [old[name] for _, name in new]


def _name_list(class_names: dict) -> list[tuple[int, str]]:
    return sorted((int(k), str(v).strip().lower()) for k, v in class_names.items())


def _prompter_network(model: dict, preset: str | None, class_names: dict[int, str]) -> PrompterConfig:
    """The prompter a run's ``model:`` section builds: a preset (``preset:`` key, the ``preset`` argument, else
    ``cpu``) with field overrides, or a full config; the data's class names fill the class fields."""
    if "preset" in model or preset or not model:
        kw = {k: v for k, v in model.items() if k != "preset"}
        return PrompterConfig.preset(model.get("preset", preset or "cpu"), **_prompter_classes(kw, class_names))
    return from_dict(PrompterConfig, _prompter_classes(model, class_names))


def _segmentor_network(model: dict, preset: str | None) -> SegmentorConfig:
    """The segmentor a run's ``model:`` section builds: a full config (has ``encoder``), or a preset (``preset:``
    key, the ``preset`` argument, else ``small``) with field overrides."""
    if "encoder" in model:
        return from_dict(SegmentorConfig, model)
    base = dict(model)
    return segmentor_config(base.pop("preset", preset or "small"), **base)


def _prompter_classes(kw: dict, class_names: dict[int, str]) -> dict:
    if class_names and "num_classes" not in kw:
        kw = {**kw, "num_classes": max(class_names), "class_names": class_names}
    return kw

