"""One training loop for every karyo model: seeded, resumable, validated, with rich progress.

A *task* (prompter, segmentor, ...) supplies the model, how a batch becomes a loss, and how the model is
validated; :func:`fit` does the rest. A run folder holds::

    RUN/train_config.json   the TrainConfig (and the task's model config) the run was started with
    RUN/last.pt             model + optimiser + scheduler + RNG state after the last finished epoch
    RUN/best.pt             model weights with the best validation score so far
    RUN/history.csv         one row per epoch: losses, validation metrics, learning rate, seconds
    RUN/summary.json        the best validation score and its epoch

Files count epochs from 0 (``epoch`` in history.csv, ``best_epoch`` in summary.json and the checkpoints); messages
for people count from 1 and say which row of history.csv they mean.

Resume (``resume=True``) continues from ``last.pt``. Every epoch draws its data order and augmentations
from ``(seed, epoch)`` alone and the RNG states are restored, so a run killed and resumed gives the same
weights as an uninterrupted one (on the same machine and thread count).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from karyo.config import save_json, to_dict
from karyo.data.io import atomic_path, write_text
from karyo.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings, kept apart from the model config (StarDist's Config/Model split)."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 1e-4  # PromptNucSeg supp. A: Adam, initial lr 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" | "adamw"
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    step_epochs: int = 30  # for "step": lr × step_gamma every step_epochs
    step_gamma: float = 0.1
    warmup_epochs: int = 1
    grad_clip: float = 1.0  # max grad norm; 0 disables
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    num_workers: int = 0
    val_every: int = 1
    select_metric: str = "score"  # key of the task's validation dict; higher is better
    max_steps_per_epoch: int = 0  # 0 = the whole dataset; >0 caps it (quick runs, tests)
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    # Additions for the stain-agnostic recipe (issue 7); their defaults keep the behaviour and checkpoints above.
    accumulate_steps: int = 1  # one optimiser step per k batches (gradients averaged): effective batch k·batch_size
    # mixed precision: bf16 autocast on CPU (and MPS), fp16 autocast + GradScaler on CUDA. "auto": only where the
    # hardware computes in low precision natively (CUDA; a CPU with AVX512-BF16 or AMX) — elsewhere float32, as
    # emulated bf16 is far slower (23x per step of the stain-agnostic recipe on an AVX2-only CPU).
    amp: bool | str = False
    plateau_factor: float = 0.5  # schedule "plateau": lr × factor when the validation score stalls for more than
    plateau_patience: int = 5  # this many validations (torch ReduceLROnPlateau, mode max, rel. threshold 1e-4)
    # lr × this for the modules a config adds to an older network (the model's ``optional_init_prefixes``: the
    # prompter's mask head, the segmentor's detail branch): warm-started from weights without them, they start from
    # scratch (or from zero) while the rest only needs a gentle restart.
    optional_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        """Refuse settings that would train nothing (``epochs: 0``, ``--max-steps -1``) or fail deep inside torch,
        before a run folder is made."""
        rules = [
            ("epochs", self.epochs >= 1, "≥ 1"), ("batch_size", self.batch_size >= 1, "≥ 1"),
            ("lr", self.lr >= 0 and math.isfinite(self.lr), "≥ 0"), ("weight_decay", self.weight_decay >= 0, "≥ 0"),
            ("optimizer", self.optimizer in ("adam", "adamw"), "adam or adamw"),
            ("schedule", self.schedule in ("cosine", "step", "constant", "plateau"),
             "cosine, step, constant or plateau"),
            ("step_epochs", self.step_epochs >= 1, "≥ 1"), ("warmup_epochs", self.warmup_epochs >= 0, "≥ 0"),
            ("grad_clip", self.grad_clip >= 0, "≥ 0 (0 disables)"), ("threads", self.threads >= 0, "≥ 0"),
            ("num_workers", self.num_workers >= 0, "≥ 0"), ("val_every", self.val_every >= 1, "≥ 1"),
            ("max_steps_per_epoch", self.max_steps_per_epoch >= 0, "≥ 0 (0: the whole dataset)"),
            ("accumulate_steps", self.accumulate_steps >= 1, "≥ 1"),
            ("amp", self.amp in (True, False, "auto"), 'true, false or "auto"'),
            ("optional_lr_mult", self.optional_lr_mult > 0, "> 0"),
        ]
        bad = [f"{name} must be {want}, got {getattr(self, name)!r}" for name, ok, want in rules if not ok]
        if bad:
            raise InputError(None, "TrainConfig: " + "; ".join(bad))


class Task(Protocol):
    """What a model family provides to :func:`fit`."""

    name: str

    def model(self) -> torch.nn.Module: ...

    def train_loader(self, epoch: int, cfg: TrainConfig) -> Iterable: ...

    def loss(self, model: torch.nn.Module, batch: Any, device: torch.device) -> dict[str, torch.Tensor]: ...

    def validate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]: ...

    def export(self, model: torch.nn.Module, directory: Path) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002  (libraries still draw from the global stream)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """RNG states as tensors and plain numbers, so checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss], "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    torch.set_rng_state(state["torch"])


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Trainable parameters in optimiser groups, each with its ``lr_mult``: those under the model's
    ``optional_init_prefixes`` get ``cfg.optional_lr_mult``, all others 1. Depends only on the model and the config,
    so a resumed run rebuilds the same groups its checkpoint saved."""
    if cfg.optional_lr_mult <= 0:
        raise ValueError(f"optional_lr_mult must be > 0, got {cfg.optional_lr_mult}")
    optional = tuple(getattr(model, "optional_init_prefixes", ()))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    added = [p for n, p in named if n.startswith(optional)]  # an empty tuple matches nothing
    if cfg.optional_lr_mult == 1.0 or not added:
        return [{"params": [p for _, p in named], "lr_mult": 1.0}]
    return [{"params": [p for n, p in named if not n.startswith(optional)], "lr_mult": 1.0},
            {"params": added, "lr_mult": float(cfg.optional_lr_mult)}]


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at a (fractional) epoch: linear warm-up, then the schedule."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return max(1e-3, epoch / cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
        t = min(1.0, (epoch - cfg.warmup_epochs) / span)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.step_gamma ** int(epoch // max(1, cfg.step_epochs))
    if cfg.schedule in ("constant", "plateau"):  # plateau: the reductions are applied by fit (_Plateau)
        return 1.0
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


class _Plateau:
    """ReduceLROnPlateau (mode "max") as a multiplier of the scheduled lr, so warm-up still applies and the state
    is three numbers in the checkpoint. Same rule as torch's: an epoch improves when score > best·(1 + 1e-4)
    (NaN never does); after more than ``patience`` non-improving validations the scale is multiplied by
    ``factor`` and the count restarts."""

    THRESHOLD = 1e-4

    def __init__(self, factor: float, patience: int):
        if not 0 < factor < 1 or patience < 0:
            raise ValueError(f"plateau_factor must lie in (0, 1) and plateau_patience be >= 0, got {factor}, "
                             f"{patience}")
        self.factor, self.patience = float(factor), int(patience)
        self.scale, self.best, self.bad = 1.0, -math.inf, 0

    def step(self, score: float) -> None:
        better = math.isfinite(score) and score > self.best * (1 + self.THRESHOLD)  # -inf·(1+t) = -inf
        if better:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
        if self.bad > self.patience:
            self.scale *= self.factor
            self.bad = 0

    def state(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad": self.bad}

    def load(self, state: dict) -> None:
        self.scale, self.best, self.bad = float(state["scale"]), float(state["best"]), int(state["bad"])


def native_low_precision(device: torch.device) -> bool:
    """Whether autocast speeds ``device`` up: CUDA, or a CPU with AVX512-BF16 or AMX (elsewhere bf16 is emulated)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None, GradScaler or None): bf16 on CPU/MPS; fp16 with a gradient scaler on CUDA."""
    if cfg.amp not in (True, False, "auto"):
        raise ValueError(f"amp must be true, false or \"auto\", got {cfg.amp!r}")
    if cfg.amp == "auto" and not native_low_precision(device):
        log.info("amp: auto — no native low-precision math on %s (%s), training in float32", device.type,
                 torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else "")
        return None, None
    if not cfg.amp:
        return None, None
    if device.type == "cuda":
        return torch.float16, torch.amp.GradScaler(device.type)
    return torch.bfloat16, None


def _optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, scaler: Any,
                    rescale: float = 1.0) -> None:
    """Unscale (AMP), rescale a partial accumulation group to a mean, clip, step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if rescale != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(rescale)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@dataclass
class FitResult:
    run_dir: Path
    best_score: float
    best_epoch: int
    history: list[dict]


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _write_history(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


#: Where every network karyo trains keeps its channel adapter (karyo.models.adapter).
ADAPTER_PREFIX = "adapter."


def _adapter_to_restart(own: dict, state: dict) -> str:
    """Why the model's channel adapter cannot come from ``state`` (empty: it can, or the model has none)."""
    if not any(k.startswith(ADAPTER_PREFIX) for k in own):
        return ""
    theirs = {k: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    if not theirs:
        return "the weights have no channel adapter (a network for RGB)"
    if set(theirs) != {k for k in own if k.startswith(ADAPTER_PREFIX)} or any(
            tuple(v.shape) != tuple(own[k].shape) for k, v in theirs.items()):
        return "the weights' channel adapter is for other channels"
    return ""


def load_init_state(model: torch.nn.Module, state: dict, source: str | os.PathLike | None, *,
                    other_classes: bool = False, class_order: Sequence[int] | None = None, quiet: bool = False
                    ) -> list[str]:
    """Load starting weights strictly, except parameters under the model's ``optional_init_prefixes`` (heads a
    config may add to an older network), which keep their fresh initialisation when the weights lack them, and
    those under its ``class_head_prefixes`` when their shape differs or ``other_classes`` says the weights name
    other classes (weights for another taxonomy: the class layer starts afresh, everything else is fine-tuned).
    ``class_order``: the same classes numbered otherwise; row ``j`` of the class layer (0 = background) is the
    weights' row ``class_order[j]``, so what the layer learned is kept. Returns the names of the restarted
    parameters. ``quiet``: say nothing of what restarts (a check before the run, which says it then)."""
    refused = "these weights do not fit the model the config builds: "
    say = (lambda *args: None) if quiet else log.warning
    optional = tuple(getattr(model, "optional_init_prefixes", ()))
    class_head = tuple(getattr(model, "class_head_prefixes", ()))
    own = model.state_dict()
    if class_order is not None and class_head:
        order = torch.as_tensor(list(class_order))
        state = {k: v[order] if k.startswith(class_head) and v.ndim and v.shape[0] == len(order) else v
                 for k, v in state.items()}
        say("%s: class layer rows reordered to this data's class ids (the same names, numbered otherwise)", source)
    restarted = sorted(k for k, v in state.items() if class_head and k.startswith(class_head) and k in own
                       and (other_classes or tuple(v.shape) != tuple(own[k].shape)))
    if restarted:
        state = {k: v for k, v in state.items() if k not in restarted}
        optional = (*optional, *class_head)
        names = getattr(getattr(model, "config", None), "class_names", None) or {}
        if list(names.values()) == ["nucleus"]:  # the data name no classes (@none, or no classes.json)
            why = "these data have no classes, so the model learns to find nuclei only (one class, 'nucleus')"
        else:
            why = "it was trained on other classes" if other_classes else "it has another number of classes"
        say("%s: its class layer is not used (it starts afresh): %s", source, why)
    fresh_adapter = _adapter_to_restart(own, state)
    if fresh_adapter:  # RGB weights (the shipped models) under a new channel adapter: the network behind it is kept
        state = {k: v for k, v in state.items() if not k.startswith(ADAPTER_PREFIX)}
        optional = (*optional, ADAPTER_PREFIX)
        restarted += sorted(k for k in own if k.startswith(ADAPTER_PREFIX))
        say("%s: %s; the channel adapter starts afresh and the network behind it is fine-tuned", source,
            fresh_adapter)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even when not strict
        raise InputError(source, refused + str(exc).splitlines()[-1].strip()[:300]) from None
    missing = [k for k in result.missing_keys if not k.startswith(optional)]
    problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
        ([f"unexpected {', '.join(result.unexpected_keys[:5])}"] if result.unexpected_keys else [])
    if problems:
        raise InputError(source, refused + "; ".join(problems))
    return restarted


def fit(task: Task, cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
        model_config: Any | None = None, progress: bool = True, meta: dict | None = None,
        on_epoch_end: Callable[[dict], None] | None = None, init_state: dict | None = None,
        init_source: str | os.PathLike | None = None, init_other_classes: bool = False,
        init_class_order: Sequence[int] | None = None, on_resume: Callable[[int], None] | None = None) -> FitResult:
    """Train ``task``'s model with ``cfg`` into ``run_dir``; returns the best validation score and history.

    ``cfg.accumulate_steps`` k > 1: the loss of each batch is divided by k and the optimiser steps every k batches
    (a last, shorter group is rescaled to a mean), the learning rate is set per optimiser step as for one batch of
    k·batch_size, so it equals training on the large batch (up to BatchNorm statistics). ``max_steps_per_epoch``
    counts batches. ``cfg.amp``: the task's loss runs under autocast (validation stays float32). ``init_state``:
    weights the model starts from (a fresh run only; a resumed run continues from its checkpoint); weights that do
    not fit the model raise :class:`InputError` naming ``init_source``, the file they came from;
    ``init_other_classes``: they were trained on other class names, so the class layer starts afresh;
    ``init_class_order``: on the same names numbered otherwise, so its rows are reordered (:func:`load_init_state`).
    ``on_resume(epoch)``: called once a resumed run has read its checkpoint, with the last finished epoch (1-based).
    """
    from karyo.device import pick_device

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "the run folder to write is a file")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = task.model().to(device)
    restarted: list[str] = []
    if init_state is not None and not (resume and (run_dir / "last.pt").exists()):
        restarted = load_init_state(model, init_state, init_source, other_classes=init_other_classes,
                                    class_order=init_class_order)
    run_dir.mkdir(parents=True, exist_ok=True)  # after the checks above: a refused run leaves no folder behind
    optimizer = make_optimizer(parameter_groups(model, cfg), cfg)
    acc = int(cfg.accumulate_steps)
    if acc < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {cfg.accumulate_steps}")
    amp_dtype, scaler = amp_settings(cfg, device)
    plateau = _Plateau(cfg.plateau_factor, cfg.plateau_patience) if cfg.schedule == "plateau" else None
    start_epoch, history = 0, []
    best_score, best_epoch = -math.inf, -1
    last = run_dir / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        if plateau is not None and "plateau" in state:
            plateau.load(state["plateau"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if on_resume is not None:
            on_resume(start_epoch)
    elif (run_dir / "last.pt").exists() and not resume:
        raise InputError(run_dir, "already holds a run: resume it (--resume; resume=True in Python) or choose a new "
                                  "folder")
    saved = {"task": task.name, "train": to_dict(cfg)}
    if model_config is not None:
        saved["model"] = to_dict(model_config)
    saved.update(meta or {})
    if restarted:  # fine-tuning onto other classes: which layer did not come from the init weights
        saved["init_restarted"] = restarted
    save_json(run_dir / "train_config.json", saved)

    bar = _Progress(progress)
    with bar:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            model.train()
            sums: dict[str, float] = {}
            steps = 0
            loader = task.train_loader(epoch, cfg)
            total = len(loader) if hasattr(loader, "__len__") else None
            if cfg.max_steps_per_epoch:
                total = min(total or cfg.max_steps_per_epoch, cfg.max_steps_per_epoch)
            bar.start_epoch(epoch, cfg.epochs, total)
            groups = math.ceil((total or 1) / acc)  # optimiser steps this epoch (= batches when acc is 1)
            pending = 0
            for step, batch in enumerate(loader):
                if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                    break
                if pending == 0:
                    frac = epoch + (step // acc) / max(1, groups)
                    for group in optimizer.param_groups:
                        group["lr"] = (cfg.lr * lr_factor(frac, cfg) * (plateau.scale if plateau else 1.0)
                                       * group.get("lr_mult", 1.0))
                    optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    losses = task.loss(model, batch, device)
                loss = losses["loss"] / acc if acc > 1 else losses["loss"]
                (scaler.scale(loss) if scaler is not None else loss).backward()
                pending += 1
                if pending == acc:
                    _optimizer_step(model, optimizer, cfg, scaler)
                    pending = 0
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
                steps += 1
                bar.step(sums["loss"] / steps)
            if pending:  # a last, shorter accumulation group
                _optimizer_step(model, optimizer, cfg, scaler, rescale=acc / pending)
            row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}": v / max(1, steps) for k, v in sums.items()})
            improved = False
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                model.eval()
                with torch.no_grad():
                    metrics = task.validate(model, device)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                score = metrics.get(cfg.select_metric, math.nan)
                if plateau is not None:
                    plateau.step(score)
                if math.isfinite(score) and score > best_score:
                    best_score, best_epoch, improved = score, epoch, True
                    _save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "epoch": epoch,
                                                           "score": score, "metrics": metrics})
            row["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(row)
            payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                       "epoch": epoch, "history": history, "best_score": best_score, "best_epoch": best_epoch}
            if plateau is not None:
                payload["plateau"] = plateau.state()
            if scaler is not None:
                payload["scaler"] = scaler.state_dict()
            _save_checkpoint(last, payload)
            _write_history(run_dir / "history.csv", history)
            bar.end_epoch(row, improved, best_score)
            if on_epoch_end is not None:
                on_epoch_end(row)
    if best_epoch < 0:  # no validation ever ran: the last weights are the result
        _save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "epoch": cfg.epochs - 1,
                                               "score": math.nan, "metrics": {}})
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    task.export(model.cpu(), run_dir / "model")
    write_text(run_dir / "summary.json", json.dumps({"best_score": best_score if best_epoch >= 0 else None,
                                                     "best_epoch": best_epoch if best_epoch >= 0 else None,
                                                     "select_metric": cfg.select_metric}, indent=1) + "\n")
    return FitResult(run_dir, best_score, best_epoch, history)


class _Progress:
    """Rich progress: a bar per epoch with the running loss; one summary line per epoch."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, total: int | None) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=total, loss=float("nan"))

    def step(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss)

    def end_epoch(self, row: dict, improved: bool, best: float) -> None:
        if self.progress is not None:
            vals = "  ".join(f"{k}={v:.4g}" for k, v in row.items()
                             if isinstance(v, float) and k not in ("lr", "seconds"))
            mark = " [green]*best*[/]" if improved else ""
            self.progress.console.print(f"epoch {row['epoch'] + 1}: {vals}  ({row['seconds']:.0f}s){mark}",
                                        highlight=False)
