"""Turn training runs into a model folder: ``karyo pack promptnucseg --prompter RUN --segmentor RUN --out DIR``.

Inference thresholds (prompter score, point NMS radius, duplicate handling, mask probability) are tuned on the
prompter run's *validation* images and shipped in the model's config (as StarDist ships ``thresholds.json``);
test data are never used. The point NMS radius is capped by the spacing of nuclei in the run's *training*
annotations (:func:`nms_radius_limit`): a radius that removes true neighbours in dense tissue can still win on a
validation split that happens to be sparse, and the cap keeps the choice valid for dense tissue too. Of the
settings the validation images cannot tell from the best, the fastest ships (:func:`select_setting`).
Weights are stored in float16 (half the size, no measurable change in output) and loaded as float32.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from karyo.config import from_dict, load_json
from karyo.errors import InputError
from karyo.metrics.detection import instance_points
from karyo.metrics.instance import panoptic_quality
from karyo.models.prompter import PrompterConfig
from karyo.models.promptnucseg import PromptNucSegConfig, PromptNucSegModel, adapters_agree
from karyo.models.segmentor import SegmentorConfig
from karyo.models.vit import read_state_dict
from karyo.train.data import DataSpec, load_specs
from karyo.train.verifier import VerifierFitError, fit_duplicate_judge, fit_verifier

TUNING_GRID = {"score_threshold": (0.3, 0.4, 0.5, 0.6, 0.7), "nms_radius_px": (6.0, 8.0, 10.0, 12.0, 16.0, 20.0),
               "mask_nms_overlap": (None, 0.2, 0.3, 0.5), "refine_points": (0, 1, 2), "mask_threshold": (0.4, 0.5, 0.6),
               "min_verified": (None, 0.3, 0.4, 0.5), "min_duplicate_probability": (None, 0.3, 0.4, 0.5, 0.6)}
# min_stability is left out: tuned on the sparse validation images it picks 0.5 (+0.010 PQ there), which costs
# −0.013 PQ and −0.048 AJI on dense CoNSeP training patches (docs/benchmarks.md). Pass it in ``grid`` to tune it.
# Settings that change only how the masks are resolved: one set of masks serves all their values.
RESOLVE_KEYS = ("mask_threshold", "min_stability", "min_verified")
SELECTION_RULE = "fewest prompts per image within one standard error of the best val_pq (select_setting)"
# The NMS radius may suppress at most this fraction of true nearest neighbours in the training annotations.
NEIGHBOUR_QUANTILE = 0.1

#: Where progress lines go (print, a logger's method, a list's append).
Log = Callable[[str], None]


def _run_model(run: str | os.PathLike, name: str) -> tuple[dict, dict]:
    if not Path(run).is_dir():
        raise InputError(run, f"{name} run folder not found")
    folder = Path(run) / "model"
    meta_path = folder / f"{name}.json"
    if not meta_path.is_file():
        config = Path(run) / "train_config.json"
        task = load_json(config).get("task") if config.is_file() else None
        if task and task != name:
            raise InputError(run, f"is a {task} run, not a {name} run")
        raise InputError(folder, f"no {name}.json: is this a finished {name} run (karyo train {name})?")
    return load_json(meta_path), read_state_dict(folder / f"{name}.pt")


def load_segmentor(source: str | os.PathLike) -> tuple[SegmentorConfig, int, dict]:
    """(config, K negatives, weights) of a segmentor: a ``karyo train segmentor`` run, its ``model`` folder, or a
    packed PromptNucSeg/IVAAN model folder or a shipped model's name (re-packing a shipped model with a new
    prompter keeps its segmentor)."""
    from karyo.models.registry import model_folder

    folder = model_folder(source)
    if (folder / "model" / "segmentor.json").is_file():
        folder = folder / "model"
    if (folder / "segmentor.json").is_file():
        meta = load_json(folder / "segmentor.json")
        cfg, negatives = meta["config"], meta.get("settings", {}).get("negatives", 1)
    elif (folder / "config.json").is_file() and (folder / "segmentor.pt").is_file():
        data = load_json(folder / "config.json").get("config", {})
        if "segmentor" not in data:
            raise InputError(folder, "config.json holds no segmentor (is this a PromptNucSeg/IVAAN model folder?)")
        cfg, negatives = data["segmentor"], data.get("negatives", 1)
    else:
        raise InputError(folder, "no segmentor here (a segmentor run, segmentor.json + segmentor.pt, or a model "
                                 "folder)")
    return from_dict(SegmentorConfig, cfg), int(negatives), read_state_dict(folder / "segmentor.pt")


def validation_samples(run: str | os.PathLike) -> list:
    """The validation images of a training run, exactly as it held them out."""
    return _run_samples(run, validation=True)


def training_samples(run: str | os.PathLike) -> list:
    """The images a training run trained on (all but its validation images)."""
    return _run_samples(run, validation=False)


def _run_samples(run: str | os.PathLike, validation: bool) -> list:
    saved = load_json(Path(run) / "train_config.json")
    names = {int(k): v for k, v in (saved.get("model", {}).get("class_names") or {}).items()}
    for spec in saved["data"]:
        path = DataSpec.parse(spec).path
        if not Path(path).exists():  # a relative --data is read from where the run was trained
            raise InputError(Path(run) / "train_config.json",
                             f"the run's data {path!r} is not found from {Path.cwd()}; relative data paths are read "
                             f"from the folder karyo runs in: run pack from the folder the run was trained in (or "
                             f"pack with --no-tune, which reads no data)")
    samples = load_specs(saved["data"], names or None)
    if validation:
        index = {n: i for i, n in enumerate(samples.ids)}
        return [samples[index[i]] for i in saved["val_ids"] if i in index]
    held_out = set(saved["val_ids"])
    return [samples[i] for i, n in enumerate(samples.ids) if n not in held_out]


def nearest_neighbour_distances(samples: list, mpp: float) -> np.ndarray:
    """Distance (model pixels at ``mpp``) from each annotated nucleus to its nearest neighbour, over ``samples``."""
    nearest = []
    for s in samples:
        if s.instances is None:
            continue
        xy = instance_points(s.instances).xy * ((s.mpp or mpp) / mpp)
        if len(xy) > 1:
            nearest.append(cKDTree(xy).query(xy, k=2)[0][:, 1])
    return np.concatenate(nearest) if nearest else np.zeros(0)


def nms_radius_limit(samples: list, mpp: float, quantile: float = NEIGHBOUR_QUANTILE) -> float:
    """The ``quantile`` of :func:`nearest_neighbour_distances`: a point NMS radius up to it suppresses at most that
    fraction of true neighbours (infinite when no image has two nuclei)."""
    nearest = nearest_neighbour_distances(samples, mpp)
    return float(np.quantile(nearest, quantile)) if len(nearest) else float("inf")


def mean_pq(model: PromptNucSegModel, samples: list) -> float:
    values = []
    for s in samples:
        if s.instances is None or s.instances.max() == 0:
            continue
        values.append(panoptic_quality(s.instances, model.segment(s.image, mpp=None).instances).pq)
    return float(np.mean(values)) if values else float("nan")


#: A prompter finding this many times the annotated nuclei at its strictest tuned setting is taken as untrained.
UNTRAINED_POINTS_FACTOR = 5


def _note_untrained_prompter(model: PromptNucSegModel, prep, sample, point_settings: list[dict], log: Log) -> None:
    """Say when the prompter fires nearly everywhere (a smoke run of a few steps): every setting then decodes all
    those points, and tuning takes hours to pick among settings that all fail."""
    strict = max(point_settings, key=lambda ps: (ps["score_threshold"], -ps["nms_radius_px"]))  # NMS hides it
    found = len(model.detect(prep, strict["score_threshold"], strict["nms_radius_px"])[0])
    annotated = len(np.unique(sample.instances)) - 1
    if found > UNTRAINED_POINTS_FACTOR * max(annotated, 20):
        log(f"note: the prompter finds {found} points at score ≥ {strict['score_threshold']:g} on "
            f"{sample.name or 'the first validation image'}, which has {annotated} annotated nuclei: it looks "
            f"untrained, and every setting decodes all of them (hours); stop and pack with --no-tune, or train "
            f"longer")


def tune_thresholds(model: PromptNucSegModel, samples: list, grid: dict | None = None, log: Log = print, *,
                    max_nms_radius_px: float | None = None) -> tuple[PromptNucSegConfig, list[dict]]:
    """Grid search of the inference settings on validation images; returns the chosen config
    (:func:`select_setting`) and all rows: mean PQ over images with nuclei (``val_pq``), the standard error of
    its paired difference to the best row (``se_vs_best``) and the prompts decoded per image (``prompts``). NMS
    radii above ``max_nms_radius_px`` are left out (the smallest radius of the grid always stays). Each image's
    networks run once: the prompter's outputs and the segmentor's tile embeddings are reused for every point
    setting, whose masks are reused for every :data:`RESOLVE_KEYS` setting; results equal :func:`mean_pq` with
    each setting."""
    base = model.config
    grid = {k: (getattr(base, k),) for k in RESOLVE_KEYS} | TUNING_GRID | (grid or {})  # unlisted: the model's
    if base.verifier is None:
        grid["min_verified"] = (None,)  # nothing to filter with
    if base.duplicate_judge is None:
        grid["min_duplicate_probability"] = (None,)
    point_keys = [k for k in grid if k not in RESOLVE_KEYS]
    radii = sorted(grid["nms_radius_px"])
    if max_nms_radius_px is not None:
        radii = [r for r in radii if r <= max_nms_radius_px] or radii[:1]
    point_settings = [dict(zip(point_keys, v, strict=True))
                      for v in itertools.product(*(radii if k == "nms_radius_px" else grid[k] for k in point_keys))]
    # Duplicates are judged by overlap or by the judge, never both (PromptNucSegConfig).
    point_settings = [ps for ps in point_settings
                      if ps.get("mask_nms_overlap") is None or ps.get("min_duplicate_probability") is None]
    resolve_settings = [dict(zip(RESOLVE_KEYS, v, strict=True))
                        for v in itertools.product(*(grid[k] for k in RESOLVE_KEYS))]
    pq: dict[tuple, list[float]] = {}
    prompts: dict[tuple, list[int]] = {}
    no_neg = np.zeros((0, 2), np.float32)
    with_nuclei = [s for s in samples if s.instances is not None and s.instances.max() > 0]
    log(f"{len(point_settings)} point settings × {len(resolve_settings)} mask settings on each of "
        f"{len(with_nuclei)} validation image(s); a line per image")
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for done, sample in enumerate(with_nuclei, start=1):
                if done > 1:  # a minutes-long search says how far it is
                    left = (time.perf_counter() - started) / (done - 1) * (len(with_nuclei) - done + 1)
                    log(f"  image {done}/{len(with_nuclei)} ({sample.name or 'unnamed'}), about {left / 60:.0f} "
                        f"min left")
                prep = model.prepare(sample.image, mpp=None)
                if done == 1:
                    _note_untrained_prompter(model, prep, sample, point_settings, log)
                for ps in point_settings:
                    model.config = replace(base, **ps)
                    candidates = model.mask_candidates(prep, *model.detect(prep, ps["score_threshold"],
                                                                           ps["nms_radius_px"]), no_neg)
                    for rs in resolve_settings:
                        model.config = replace(base, **ps, **rs)
                        pred = model.resolve(prep, candidates, rs["mask_threshold"], min_stability=rs["min_stability"],
                                             min_verified=rs["min_verified"]).instances
                        key = tuple(ps.values()) + tuple(rs.values())
                        pq.setdefault(key, []).append(panoptic_quality(sample.instances, pred).pq)
                        prompts.setdefault(key, []).append(candidates.decoded)
    finally:
        model.config = base
    if not pq:
        return base, []
    keys = (*point_keys, *RESOLVE_KEYS)
    best = max(pq, key=lambda k: np.mean(pq[k]))
    rows = [{**dict(zip(keys, k, strict=True)), "val_pq": float(np.mean(v)),
             "se_vs_best": _standard_error(np.subtract(pq[best], v)), "prompts": float(np.mean(prompts[k]))}
            for k, v in pq.items()]
    shown = sorted(rows, key=lambda r: -r["val_pq"])[:TUNING_ROWS_SHOWN]
    scored = len(pq[best])  # validation images with nuclei
    log(f"{len(rows)} settings tried on {scored} validation image(s) with nuclei; the best {len(shown)} (all in "
        f"tuning.json):")
    for r in shown:
        log("  " + ", ".join(f"{k} {r[k]}" for k in keys) + f": PQ {r['val_pq']:.4f} ± {r['se_vs_best']:.4f}, "
            f"{r['prompts']:.1f} prompts")
    if scored < 2:
        log("one validation image gives no standard error: the best setting is taken as it is")
    chosen = select_setting(rows)
    log("chosen (the fewest prompts within one standard error of the best): "
        + ", ".join(f"{k} {chosen[k]}" for k in keys) + f": PQ {chosen['val_pq']:.4f}")
    return replace(base, **{k: chosen[k] for k in keys}), rows


def _standard_error(differences: np.ndarray) -> float:
    n = len(differences)
    return float(np.std(differences, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def select_setting(rows: list[dict]) -> dict:
    """The tuning row to ship: of the rows whose validation PQ is within one standard error (``se_vs_best``, of
    the per-image difference) of the best row's, the one that decodes the fewest prompts per image (then the
    higher PQ). The one-standard-error rule (as CART prunes trees, Breiman et al. 1984) treats differences the
    validation images cannot resolve as ties; decoding is most of the time per image (84 % with the shipped
    model), so ties go to the faster setting. Rows of older ``tuning.json`` files, without these columns, give
    the best PQ."""
    best = max(rows, key=lambda r: r["val_pq"])
    if "se_vs_best" not in best or "prompts" not in best:
        return best
    tied = [r for r in rows if best["val_pq"] - r["val_pq"] <= r["se_vs_best"]]
    return min(tied, key=lambda r: (r["prompts"], -r["val_pq"]))


#: Tuning rows printed (best first); tuning.json keeps every one.
TUNING_ROWS_SHOWN = 10


def tune_on_run(model: PromptNucSegModel, run: str | os.PathLike, log: Log = print, *, verifier: bool = False
                ) -> tuple[PromptNucSegConfig, list[dict], float]:
    """(best config, all rows, NMS radius cap): :func:`tune_thresholds` on a training run's validation images,
    with the NMS radius capped by :func:`nms_radius_limit` of the run's training images. With ``verifier``, a mask
    verifier is first fitted on those training images (:func:`fit_verifier`) and ``min_verified`` is tuned with
    the rest, and so is a duplicate judge (:func:`fit_duplicate_judge`), with ``min_duplicate_probability``; when
    the images cannot teach one (e.g. networks too weak for any mask to match a nucleus), the reason is logged and
    tuning goes on without. The training images are read once for all."""
    train = training_samples(run)
    if verifier:
        try:
            model.config = replace(model.config, verifier=fit_verifier(model, train, log))
        except VerifierFitError as err:
            log(f"no verifier: {err}")
        try:
            model.config = replace(model.config, duplicate_judge=fit_duplicate_judge(model, train, log))
        except VerifierFitError as err:
            log(f"no duplicate judge: {err}")
    limit = nms_radius_limit(train, model.config.mpp)
    samples = validation_samples(run)
    log(f"tuning thresholds on {len(samples)} validation image(s) of {run} (NMS radius ≤ {limit:.1f} px: "
        f"{NEIGHBOUR_QUANTILE:.0%} of training nuclei have a neighbour nearer)")
    config, rows = tune_thresholds(model, samples, log=log, max_nms_radius_px=limit)
    return config, rows, limit


def pack_promptnucseg(prompter_run: str | os.PathLike, segmentor_run: str | os.PathLike,
                      out: str | os.PathLike, *, tune: bool = True, verifier: bool = True, log: Log = print
                      ) -> PromptNucSegModel:
    """Build a PromptNucSeg model folder from a prompter run and a segmentor (run or model folder, see
    :func:`load_segmentor`). With ``tune``, the inference settings are tuned on the prompter run's validation
    images; with ``verifier`` too, a mask verifier is first fitted on its training images
    (:func:`karyo.train.verifier.fit_verifier`) and the tuning decides whether and how strictly to use it."""
    p_meta, p_state = _run_model(prompter_run, "prompter")
    s_cfg, negatives, s_state = load_segmentor(segmentor_run)
    p_cfg = from_dict(PrompterConfig, p_meta["config"])
    _check_same_channels(p_cfg, s_cfg, segmentor_run)
    cfg = PromptNucSegConfig(prompter=p_cfg, segmentor=s_cfg, mpp=p_cfg.mpp, class_names=dict(p_cfg.class_names),
                             negatives=negatives)
    model = PromptNucSegModel(cfg)
    model.prompter.load_state_dict(p_state)
    model.segmentor.load_state_dict(s_state)
    rows: list[dict] = []
    if tune:
        model.config, rows, limit = tune_on_run(model, prompter_run, log, verifier=verifier)
    else:
        model.config = _settings_of_init(model.config, prompter_run, log)
    out = Path(out)
    model.save(out)
    _halve(out)
    if rows:
        save_tuning(out, rows, limit)
    return model


def _check_same_channels(p_cfg: PrompterConfig, s_cfg: SegmentorConfig, segmentor_run) -> None:
    """Both networks read one prepared input (:func:`~karyo.models.promptnucseg.adapters_agree`, which
    PromptNucSegConfig enforces): said here in one line naming the segmentor, rather than as its ValueError."""
    def describe(adapter) -> str:
        if adapter is None:
            return "RGB (no channel adapter)"
        return (", ".join(adapter.channel_names) if adapter.channel_names else f"{adapter.in_channels} unnamed "
                f"channel(s)")

    a, b = p_cfg.adapter, s_cfg.adapter
    if adapters_agree(a, b):
        return
    if describe(a) == describe(b):  # the same channels, normalised otherwise
        raise InputError(segmentor_run, f"takes {describe(b)} as the prompter does, but with other pixel statistics: "
                                        f"pack a prompter and a segmentor trained on the same data")
    raise InputError(segmentor_run, f"takes {describe(b)}, the prompter {describe(a)}: pack a prompter and a "
                                    f"segmentor trained with the same --channels")


#: The inference settings ``karyo pack --no-tune`` takes from the packed model a prompter run started from (its
#: verifier and duplicate judge were fitted to other networks and are not taken).
INIT_SETTINGS = ("score_threshold", "nms_radius_px", "mask_threshold", "min_area", "min_kept_fraction",
                 "refine_points", "refine_merge_px", "tile_size", "tile_overlap", "detail_every_pass")


def _settings_of_init(config: PromptNucSegConfig, prompter_run: str | os.PathLike, log) -> PromptNucSegConfig:
    """Untuned, a fine-tuned prompter keeps the thresholds of the model it started from (``--init``): tuned for
    networks like these, they beat the defaults (a reviewer: CoNSeP PQ 0.402 against 0.271 with the defaults)."""
    run_config = Path(prompter_run) / "train_config.json"
    init = load_json(run_config).get("init") if run_config.is_file() else None
    theirs = _packed_promptnucseg_config(init) if init else None
    if theirs is None:
        log(f"no tuning: the default inference settings (score {config.score_threshold}, NMS {config.nms_radius_px} "
            f"px, no duplicate removal); tune them with karyo pack without --no-tune")
        return config
    taken = {k: theirs[k] for k in INIT_SETTINGS if k in theirs}
    log(f"no tuning: the inference settings of {init}, the model the prompter started from ("
        + ", ".join(f"{k} {v}" for k, v in taken.items()) + "); its verifier and duplicate judge are not taken")
    return replace(config, **taken)


def _packed_promptnucseg_config(source: str | os.PathLike) -> dict | None:
    """The saved config of a packed PromptNucSeg model folder or shipped name; None for anything else (a run, a
    checkpoint, a name no longer shipped)."""
    from karyo.models.registry import model_folder

    try:
        saved = model_folder(source) / "config.json"
    except InputError:
        return None
    data = load_json(saved) if saved.is_file() else {}
    return data.get("config", {}) if data.get("arch") == "promptnucseg" else None


def save_tuning(folder: str | os.PathLike, rows: list[dict], max_nms_radius_px: float) -> None:
    """``tuning.json`` beside a packed model's weights: every setting tried, so the choice can be audited. Written
    as a table (``columns`` + one list per row, a line each): thousands of settings stay a small, diffable file."""
    from karyo.data.io import atomic_path

    header = {"grid": TUNING_GRID, "max_nms_radius_px": max_nms_radius_px, "selection": SELECTION_RULE}
    columns = list(rows[0])
    body = ",\n".join(json.dumps([r[c] for c in columns]) for r in rows)
    text = json.dumps({**header, "columns": columns})[:-1] + f', "rows": [\n{body}\n]}}\n'
    with atomic_path(Path(folder) / "tuning.json") as tmp:
        Path(tmp).write_text(text)


def read_tuning(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(header, rows as dicts) of a ``tuning.json`` written by :func:`save_tuning` (or by older karyo, whose rows
    were dicts already)."""
    data = load_json(Path(path))
    rows = data.pop("rows")
    columns = data.pop("columns", None)
    return data, [dict(zip(columns, r, strict=True)) for r in rows] if columns else rows


def pack_cellvit(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A CellViT model folder from a finished ``karyo train cellvit`` run, weights in float16."""
    from karyo.train.cellvit import WEIGHTS_FILE, export_cellvit_model

    folder = Path(export_cellvit_model(run, out))
    _halve(folder, (WEIGHTS_FILE,))
    return folder


def _halve(folder: Path, names: tuple[str, ...] = ("prompter.pt", "segmentor.pt")) -> None:
    """Store weights as float16 (loading casts back to the model's float32)."""
    from karyo.data.io import atomic_path

    for name in names:
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        with atomic_path(folder / name) as tmp:
            torch.save(half, tmp)
