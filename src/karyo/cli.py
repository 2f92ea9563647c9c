"""The ``karyo`` command line: a thin shell over the Python API (parse, call, write, report).

Every command has a Python twin: ``karyo segment`` is ``karyo.load(...).segment(image)`` followed by
``karyo.export.writers.save_result``; ``karyo evaluate`` is ``karyo.metrics.folders.evaluate_folders``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from karyo import __version__
from karyo.data.sample import nuclei_phrase
from karyo.errors import KaryoError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0].replace("``", ""),
                  pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)  # a message is one line in logs: paths are not split


def friendly_errors(func: Callable) -> Callable:
    """Turn karyo's input errors into one red line and exit status 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except KaryoError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def progress_bar():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                    disable=not sys.stderr.isatty())


@app.command()
def version() -> None:
    """Print karyo's version."""
    typer.echo(__version__)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print karyo's version and exit.")] = False,
) -> None:
    """karyo: nucleus analysis for histology images."""


_INSTANCE_OUTPUTS = "instances,classes,table,overlay,geojson"
_PROMPT_ATTRIBUTES = "d_eq,eccentricity,color_z,perim_ratio"  # IVAAN's B.2 selection
_Threads = Annotated[int | None, typer.Option(min=1, help="CPU threads for the networks (default: torch's, one "
                                                        "per core).")]


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _expand_images(paths: list[Path]) -> list[Path]:
    from karyo.data.io import list_images
    from karyo.errors import InputError

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = list_images(p)
            if not found:
                inner = list_images(p / "images") if (p / "images").is_dir() else []
                hint = (f"; a dataset folder? its images/ holds {len(inner)}: pass {p / 'images'}" if inner else "")
                raise InputError(p, f"folder holds no images (.png, .jpg, .tif, ...){hint}")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(p, "file not found")
    return list({f.resolve(): f for f in reversed(files)}.values())[::-1]  # a file named twice is segmented once


def _unique_stems(files: list[Path]) -> dict[Path, str]:
    """Each file's output name; two files that would write the same outputs are an error, before any work."""
    from karyo.data.io import image_stem
    from karyo.errors import InputError

    stems: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for path in files:  # (one file named twice was already made one by _expand_images)
        stem = image_stem(path)
        if stem in seen:
            raise InputError(path, f"its outputs would overwrite those of {seen[stem]} (both are named {stem!r}); "
                                   f"rename one or run them into different --out folders")
        seen[stem] = path
        stems[path] = stem
    return stems


@contextlib.contextmanager
def _warnings_as_notes(limit: int = 5):
    """What the library warns about (alpha dropped, channel 0 taken as DAPI ...) is printed once each as a note
    when the block ends, not as a Python warning with a source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    for message in notes[:limit]:
        console.print(f"note: {message}", highlight=False, soft_wrap=True)
    if len(notes) > limit:
        console.print(f"note: ... and {len(notes) - limit} more", highlight=False)


@contextlib.contextmanager
def _naming_what_was_written(done: int, out: Path):
    """An image that fails after others were segmented: say that their outputs are in OUT (each is complete)."""
    from karyo.errors import InputError

    try:
        yield
    except InputError as exc:
        if not done:
            raise
        raise InputError(exc.source, f"{exc.problem} (the {done} image(s) before it were segmented into {out}/; "
                                     f"the rest were not)") from None


@contextlib.contextmanager
def _errors_name_file(path: Path, stem: str):
    """Models name an image by the stem they were given; the user knows it by its file (errors and warnings)."""
    from karyo.errors import InputError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        except InputError as exc:
            if exc.source != stem:
                raise
            raise InputError(path, exc.problem) from None
    for w in caught:
        message = str(w.message)
        if message.startswith(f"{stem}: "):
            message = f"{path}: {message[len(stem) + 2:]}"
        warnings.warn(message, w.category, stacklevel=1)


def _check_out_folder(out: Path) -> None:
    """Refuse an --out that is a file before any work is done (not after the first image's inference)."""
    from karyo.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(out, "--out must be a folder, and this is a file")


def _read_points(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """CSV with columns x,y and optional label (1 = nucleus, 0 = negative)."""
    import csv

    import pandas as pd

    from karyo.errors import InputError

    empty = InputError(path, "points CSV is empty: write a header x,y and one row per point")
    try:  # comma, tab (QuPath's point export) or semicolon; headers in any case; Excel's byte-order mark
        if not path.read_bytes().strip():
            raise empty
        table = pd.read_csv(path, sep=None, engine="python", encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise empty from None
    except (OSError, ValueError, csv.Error, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read points CSV ({exc})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    if not {"x", "y"} <= set(table.columns):
        raise InputError(path, f"points CSV needs columns x,y (and optionally label), separated by commas, tabs or "
                               f"semicolons; got {list(table.columns)}")
    if table.empty:
        raise InputError(path, "points CSV has a header but no points")
    if not (pd.api.types.is_numeric_dtype(table["x"]) and pd.api.types.is_numeric_dtype(table["y"])):
        raise InputError(path, "points CSV columns x and y must be numbers")
    missing = table[["x", "y"]].isna().any(axis=1).to_numpy()
    if missing.any():  # file lines count the header as line 1, as editors number them
        raise InputError(path, f"points CSV line {int(missing.argmax()) + 2} lacks x or y")
    raw = table["label"] if "label" in table.columns else pd.Series(1, index=table.index)
    label = pd.to_numeric(raw, errors="coerce")
    odd = ~label.isin([0, 1]).to_numpy()
    if odd.any():
        value = raw.iloc[int(odd.argmax())]
        value = value.item() if hasattr(value, "item") else value
        raise InputError(path, f"points CSV line {int(odd.argmax()) + 2}: label must be 1 (nucleus) or 0 (not a "
                               f"nucleus), got {value!r}")
    pos = [(float(x), float(y)) for x, y, lab in zip(table.x, table.y, label, strict=True) if int(lab) == 1]
    neg = [(float(x), float(y)) for x, y, lab in zip(table.x, table.y, label, strict=True) if int(lab) == 0]
    return pos or None, neg  # negatives alone: the automatic result without the nuclei under them


def _missed_clicks(result, n_points: int) -> list[int]:
    """The 0-based indices of the points no nucleus of ``result`` carries as its ``point_index``."""
    found = {int(p.get("point_index")) for p in (result.properties or {}).values() if p.get("point_index") is not None}
    return [k for k in range(n_points) if k not in found]


@app.command()
@friendly_errors
def segment(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or folders of images.")] = None,
    model: Annotated[str, typer.Option(help="Model name (see `karyo models`) or model folder.")] = "default",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("karyo_out"),
    sample: Annotated[bool, typer.Option("--sample", help="Run on the bundled sample H&E tile.")] = False,
    points: Annotated[Path | None, typer.Option(help="CSV of x,y[,label] prompts for one image: segment only "
                                                     "these nuclei (each one's point_index in the table: the "
                                                     "0-based index of its point among the label-1 rows, as in "
                                                     "messages); label-0 rows mark what is not a nucleus, and "
                                                     "alone they remove the nuclei under them from the automatic "
                                                     "result. Tab- or semicolon-separated files (QuPath's point "
                                                     "export) are read too.")
                      ] = None,
    mpp: Annotated[float | None, typer.Option(help="Microns per pixel of the images (rescaled to the "
                                                   "model's resolution). Default: what each file states (OME, "
                                                   "TIFF or PNG resolution), if anything plausible.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "cpu",
    outputs: Annotated[str, typer.Option(help="Comma-separated, any of: instances, classes, table, overlay, geojson.",
                                         show_default="all five")] = _INSTANCE_OUTPUTS,
    task: Annotated[str, typer.Option(help="instance | semantic: semantic models (MONCH, U-Net; none is shipped, "
                                           "karyo train monch|unet makes one) can instead write a class-map PNG, a "
                                           "coloured overlay and per-class areas.")
                    ] = "instance",
    channels: Annotated[str | None, typer.Option(help="Channels to use, in this order: names from the OME-TIFF "
                                                      "metadata or 0-based indices, e.g. DAPI,CD45 or 0,2.")
                        ] = None,
    bits: Annotated[int | None, typer.Option(min=9, max=16, help="Bits a 16-bit image really uses (e.g. 12 for "
                                                                  "12-bit camera data stored as 16-bit): its values "
                                                                  "are read on that range instead of 0..65535, "
                                                                  "which would look 16× too dark.")] = None,
    threads: _Threads = None,
) -> None:
    """Find, outline and classify the nuclei of each image; write instance maps, class tables, overlays
    and QuPath GeoJSON into OUT (--task semantic: class maps, overlays and per-class areas)."""
    from karyo.data.io import on_bit_range, read_image_meta
    from karyo.errors import InputError
    from karyo.export.writers import ALL_OUTPUTS, save_result
    from karyo.infer.prepare import check_mpp, check_prompts, double_click_px
    from karyo.models import load
    from karyo.samples import sample_path

    paths = list(images or [])
    if sample:
        paths.append(sample_path())
    if not paths:
        raise InputError(None, "no image given (pass image paths, a folder, or --sample)")
    files = _expand_images(paths)
    stems = _unique_stems(files)
    _check_out_folder(out)
    check_mpp(mpp, "--mpp")
    kinds = [k.strip() for k in outputs.split(",") if k.strip()]
    bad = sorted(set(kinds) - set(ALL_OUTPUTS))
    if bad:
        raise InputError(None, f"unknown --outputs {bad}; choose from {', '.join(ALL_OUTPUTS)}")
    if not kinds:
        raise InputError(None, f"--outputs names nothing to write; choose from {', '.join(ALL_OUTPUTS)}")
    pos, neg = _read_points(points) if points is not None else (None, None)
    if points is not None and len(files) != 1:
        raise InputError(points, "--points applies to exactly one image")
    if task not in ("instance", "semantic"):
        raise InputError(None, f"--task must be 'instance' or 'semantic', got {task!r}")
    if task == "semantic" and points is not None:
        raise InputError(points, "--points applies to --task instance only")
    if task == "semantic" and outputs != _INSTANCE_OUTPUTS:
        raise InputError(None, "--outputs chooses among the instance outputs; --task semantic always writes class "
                               "maps, overlays and per-class areas")
    _set_threads(threads)
    net = load(model, device=device)
    if task == "semantic" and not hasattr(net, "segment_semantic"):
        raise InputError(None, f"model {model!r} ({net.arch}) has no semantic output; use a MONCH or U-Net model")
    total = 0
    stated: dict[str, float] = {}  # file → the mpp it states, where that (not --mpp) was used
    unknown = 0  # files whose resolution nobody states: taken to be the model's
    with _warnings_as_notes(), progress_bar() as bar:
        bar_task = bar.add_task("segmenting", total=len(files))
        for done, path in enumerate(files):
            with _naming_what_was_written(done, out):
                image, meta = read_image_meta(path)
                if bits is not None:
                    image = on_bit_range(image, bits, path)
                if mpp is None and meta.get("mpp"):
                    stated[path.name] = meta["mpp"]
                elif mpp is None:
                    unknown += 1
                stem = stems[path]
                names = meta.get("channel_names")
                if channels:
                    from karyo.infer.prepare import select_channels

                    image, names = select_channels(image, names, channels, str(path))
                fn = net.segment_semantic if task == "semantic" else net.segment
                takes_names = "channel_names" in inspect.signature(fn).parameters
                named = {"channel_names": names} if names and takes_names else {}
                if task == "semantic":
                    from karyo.export.semantic import save_semantic

                    with _errors_name_file(path, stem):
                        semantic = net.segment_semantic(image, mpp=mpp or meta.get("mpp"), name=stem, **named)
                    save_semantic(semantic, out, image, stem=stem)
                else:
                    if points is not None:  # errors name the CSV, not the image
                        model_mpp = getattr(getattr(net, "config", None), "mpp", None) or 0.25
                        check_prompts(pos, neg, image.shape, points,
                                      double_click_px(mpp or meta.get("mpp"), model_mpp))
                    with _errors_name_file(path, stem):
                        result = net.segment(image, points=pos, negative=neg, mpp=mpp or meta.get("mpp"), name=stem,
                                             **named)
                    save_result(result, out, image, stem=stem, outputs=kinds)
                    total += result.n_nuclei
                    if pos:
                        missed = _missed_clicks(result, len(pos))
                        if missed:
                            listed = ", ".join(f"{k} ({pos[k][0]:g}, {pos[k][1]:g})" for k in missed[:5])
                            console.print(f"note: {len(missed)} of {len(pos)} point(s) gave no nucleus under "
                                          f"themselves, so no row (point_index {listed}"
                                          f"{', ...' if len(missed) > 5 else ''}): on background, or a mask that "
                                          f"missed its point", highlight=False)
                bar.advance(bar_task)
    if task != "semantic" and "classes" in kinds and not any((out / "classes").glob("*.csv")):
        (out / "classes.json").unlink(missing_ok=True)  # an earlier run's names, for class files no longer there
    if stated:
        listed = ", ".join(f"{name} {value:.3g}" for name, value in list(stated.items())[:3])
        console.print(f"µm per pixel as the files state it ({listed}{', ...' if len(stated) > 3 else ''}); "
                      f"--mpp overrides", highlight=False)
    model_mpp = getattr(getattr(net, "config", None), "mpp", None)
    if unknown and model_mpp:
        console.print(f"{unknown} image(s) state no resolution: taken to be the model's {model_mpp} µm/px; pass "
                      f"--mpp if they are at another magnification", highlight=False)
    if task == "semantic":
        console.print(f"class maps, overlays and per-class areas of {len(files)} image(s) → {out}/", highlight=False)
        return
    if hasattr(net, "segment_semantic"):
        console.print(f"note: {net.arch} is a semantic model: these nuclei are split from its class map by a "
                      f"watershed, which it was not trained to do; --task semantic writes the class maps it predicts",
                      highlight=False)
    console.print(f"{nuclei_phrase(total)} in {len(files)} image(s) → {out}/", highlight=False)


@app.command("models")
def list_models() -> None:
    """List the pretrained model names."""
    from karyo.models.registry import available, resolve

    for name in available():
        entry = resolve(name)
        alias = f" → {entry['name']}" if entry["name"] != name else ""
        typer.echo(f"{name}{alias}: {entry.get('description', '')}")


@app.command()
@friendly_errors
def evaluate(
    true: Annotated[Path, typer.Option("--true", help="Ground-truth dataset (karyo layout, PanNuke, CoNSeP, "
                                                      "MoNuSeg, COCO, GeoJSON).")],
    pred: Annotated[Path, typer.Option("--pred", help="Predictions in karyo's output layout (karyo segment --out): "
                                                      "instances/<id>.png (+ classes/), or semantic/<id>.png class "
                                                      "maps.")],
    split: Annotated[str | None, typer.Option(help="Evaluate only this split of the ground truth.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report JSON (default: PRED/evaluation.json); the per-image "
                                                  "table goes beside it as .csv.")] = None,
    missing: Annotated[str, typer.Option(help="error | empty | skip: what to do with ground-truth images that have "
                                              "no prediction (refuse, score as empty, leave out).")
                       ] = "error",
    task: Annotated[str | None, typer.Option(help="instance | semantic (class maps of karyo segment --task "
                                                  "semantic: pixel accuracy, IoU, FWIoU, precision, F1); default: "
                                                  "semantic when PRED has only semantic/.")] = None,
) -> None:
    """Score predictions against ground truth: PQ/DQ/SQ, AJI, AJI+, Dice, F1 at IoU thresholds, F1d/F1c,
    PanNuke mPQ/bPQ and CoNIC PQ+, per image, class and tissue (--task semantic: pixel metrics of class maps)."""
    import json

    from rich.table import Table

    from karyo.data.io import write_text
    from karyo.errors import InputError
    from karyo.export.writers import CSV_FLOAT_FORMAT
    from karyo.metrics.folders import evaluate_folders, evaluate_semantic_folders

    if missing not in ("error", "empty", "skip"):
        raise InputError(None, f"--missing must be 'error', 'empty' or 'skip', got {missing!r}")
    if task is None:
        task = "semantic" if (pred / "semantic").is_dir() and not (pred / "instances").is_dir() else "instance"
    if task not in ("instance", "semantic"):
        raise InputError(None, f"--task must be 'instance' or 'semantic', got {task!r}")
    run = evaluate_semantic_folders if task == "semantic" else evaluate_folders
    with _warnings_as_notes(), progress_bar() as bar:
        bar_task = bar.add_task("evaluating", total=None)
        report = run(true, pred, split=split, missing=missing,
                     on_image=lambda done, total: bar.update(bar_task, completed=done, total=total))
    out = out or pred / "evaluation.json"
    write_text(out, json.dumps(report.to_dict(), indent=1) + "\n")
    write_text(out.with_suffix(".csv"), report.per_image.to_csv(index=False, float_format=CSV_FLOAT_FORMAT))
    table = Table(title=f"{report.n_images} images: {pred} vs {true}")
    for col in ("group", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for row in report.summary_table():
        table.add_row(*row)
    Console().print(table)
    views = (("per class", report.per_class, ["name", "n_true", "n_pred", "pannuke_pq", "conic_pq_plus", "f1_type"]),
             ("per tissue", report.per_tissue, ["tissue", "n_images", "pq", "aji", "mpq", "bpq"])
             ) if task == "instance" else ()
    for title, frame, cols in views:
        if len(frame) and not (title == "per tissue" and len(frame) == 1):
            Console().print(_frame_table(frame[[c for c in cols if c in frame.columns]], title))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"report → {out}", highlight=False)


def _frame_table(frame, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in frame.columns:
        table.add_column(str(col), justify="right")
    for row in frame.itertuples(index=False):
        table.add_row(*("n/a" if isinstance(v, float) and v != v else f"{v:.4f}" if isinstance(v, float)
                        else str(v) for v in row))
    return table


@app.command("attributes")
@friendly_errors
def attributes_cmd(
    path: Annotated[Path, typer.Argument(help="An image, or a dataset folder in karyo's layout.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    instances: Annotated[Path | None, typer.Option(help="Instance map of IMAGE (16-bit PNG, TIFF or .npy).")
                         ] = None,
    classes: Annotated[Path | None, typer.Option(help="CSV of IMAGE's classes (header: instance_id, class_id).")
                       ] = None,
    split: Annotated[str | None, typer.Option(help="Dataset: measure only this split.")] = None,
    levels: Annotated[Path | None, typer.Option(help="Fitted level model (levels.json) to reuse; default: fit "
                                                     "on the dataset's train split (or on what is measured).")
                      ] = None,
    prompt_attributes: Annotated[str, typer.Option(help="Comma-separated attributes of the prompts, each one "
                                                        "the prompts have words for (paper name or column): "
                                                        "d_eq, eccentricity, color_z, perim_ratio, solidity, "
                                                        "extent, aspect_ratio, texture_z, core_contrast_z, "
                                                        "boundary_grad_mean, nn_dist_px.",
                                                   show_default="d_eq, eccentricity, color_z, perim_ratio (IVAAN's "
                                                                "B.2 choice)")] = _PROMPT_ATTRIBUTES,
    level_mode: Annotated[str, typer.Option(help="global | per_class quantile levels.")] = "global",
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes (datasets).")] = 1,
    geojson: Annotated[bool, typer.Option(help="Write QuPath GeoJSON with the measurements.")] = True,
    mpp: Annotated[float | None, typer.Option(help="µm per pixel of the image(s): adds µm columns "
                                                   "(Size.Area_um2 ...). Default: what each file or split.csv "
                                                   "states.")] = None,
    nuclear_channel: Annotated[str | None, typer.Option(help="Marker images: the channel (name or 0-based "
                                                             "index) measured as the nuclear stain; default: "
                                                             "DAPI/Hoechst by name, else channel 0. Every "
                                                             "channel adds Marker.<name>.Mean and .Std. Giving it "
                                                             "for a single IMAGE measures that image as markers; "
                                                             "in a dataset, RGB and one-channel images stay as "
                                                             "they are.")] = None,
    bits: Annotated[int | None, typer.Option(min=9, max=16, help="Bits a 16-bit image really uses (e.g. 12 for "
                                                                  "12-bit camera data): its stain and intensity "
                                                                  "planes are read on that range; Marker.* columns "
                                                                  "stay raw values.")] = None,
) -> None:
    """Measure every nucleus (IVAAN B.1 attributes + standard morphology and intensities) and describe it in
    a sentence; write the table (Parquet + CSV), QuPath GeoJSON and the fitted level model into OUT."""
    from karyo.errors import InputError

    _check_out_folder(out)
    attrs = [a.strip() for a in prompt_attributes.split(",") if a.strip()]
    if levels is not None and prompt_attributes != _PROMPT_ATTRIBUTES:
        raise InputError(levels, "a levels file fixes the prompt attributes it was fitted on; give either "
                                 "--levels or --prompt-attributes")
    if level_mode not in ("global", "per_class"):
        raise InputError(None, f"--level-mode must be 'global' or 'per_class', got {level_mode!r}")
    with _warnings_as_notes():
        run, where = _attributes_run(path, out, instances, classes, split, levels, attrs, level_mode, jobs, geojson,
                                     mpp, nuclear_channel, bits)
    valid = int(run.table["Flag.Valid"].sum()) if len(run.table) else 0
    console.print(f"{nuclei_phrase(run.n_nuclei)} in {where} ({valid} not truncated and ≥ 10 px) → {out}/",
                  highlight=False)


def _attributes_run(path, out, instances, classes, split, levels, attrs, level_mode, jobs, geojson, mpp,
                    nuclear_channel, bits):
    from karyo.attributes.measure import AttributeOptions
    from karyo.attributes.pipeline import attributes_for_dataset, attributes_for_image
    from karyo.errors import InputError

    options = AttributeOptions(bits=bits) if bits is not None else None

    if path.is_dir():
        if instances is not None or classes is not None:
            raise InputError(path, "--instances/--classes apply to a single image, not a dataset folder")
        run = attributes_for_dataset(path, out, split=split, levels=levels, prompt_attributes=attrs,
                                     level_mode=level_mode, n_jobs=jobs, geojson=geojson, mpp=mpp,
                                     nuclear_channel=nuclear_channel, options=options)
        where = f"{run.table['Identifier.Image'].nunique()} image(s)"
    else:
        if instances is None:
            raise InputError(path, "an image needs --instances (its instance map)")
        if split is not None:
            raise InputError(path, "--split picks a dataset folder's images; this is a single image")
        run = attributes_for_image(path, instances, out, classes_path=classes, levels=levels,
                                   prompt_attributes=attrs, level_mode=level_mode, geojson=geojson, mpp=mpp,
                                   nuclear_channel=nuclear_channel, options=options)
        where = "1 image"
    return run, where


@app.command("select-attributes")
@friendly_errors
def select_attributes_cmd(
    dataset: Annotated[Path, typer.Argument(help="Labelled dataset folder in karyo's layout, or an attribute table "
                                                 "(.parquet/.csv from karyo attributes) with a Class.Name column.")],
    split: Annotated[str | None, typer.Option(help="Use only this split (e.g. train): a dataset's images of it, or "
                                                   "a table's rows of it (its Identifier.Split column).")] = None,
    k: Annotated[int, typer.Option(min=1, help="Number of attributes to select.")] = 4,
    lam: Annotated[float, typer.Option("--lambda", min=0.0, help="Redundancy penalty λ.")] = 0.4,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight α of S_global in S_overall.")] = 0.5,
    attributes: Annotated[str | None, typer.Option(help="Comma-separated candidates (default: the 11 B.1 "
                                                        "attributes).")] = None,
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Also write the score table to this CSV.")] = None,
) -> None:
    """Rank attributes by class separability (Cohen's d) with a redundancy penalty and pick K (IVAAN B.2)."""
    from rich.markup import escape
    from rich.table import Table

    from karyo.attributes.names import B1_ATTRIBUTES
    from karyo.attributes.pipeline import select_for_dataset, select_for_table
    from karyo.data.io import write_text
    from karyo.errors import InputError

    cands = [a.strip() for a in attributes.split(",") if a.strip()] if attributes else list(B1_ATTRIBUTES)
    if out is not None and (out.is_dir() or out.suffix.lower() != ".csv"):
        raise InputError(out, "--out takes the CSV file to write the score table to (a name ending in .csv)")
    try:
        if dataset.is_file():
            result = select_for_table(dataset, attributes=cands, k=k, alpha=alpha, lam=lam, split=split)
        else:
            result, _ = select_for_dataset(dataset, split=split, n_jobs=jobs, attributes=cands, k=k, alpha=alpha,
                                           lam=lam)
    except InputError:
        raise  # names its file already
    except (KeyError, ValueError) as exc:
        raise InputError(dataset, str(exc.args[0]) if exc.args else str(exc)) from None
    if k > len(cands):
        console.print(f"note: --k {k} asks for more than the {len(cands)} candidate attributes; all are ranked",
                      highlight=False)
    small = [f"{c} ({n})" for c, n in result.class_counts.items() if n < result.params["min_class_size"]]
    if small:
        console.print(f"note: class(es) {', '.join(small)} have fewer than {result.params['min_class_size']} valid "
                      f"nuclei: their pairs have no Cohen's d and their S_class column is empty", highlight=False)
    scores = result.table
    table = Table(title=escape(f"{dataset}: {result.params['n_nuclei']} valid classified nuclei ("
                               + ", ".join(f"{c} {n}" for c, n in result.class_counts.items()) + ")"))
    table.add_column("attribute")
    table.add_column("column")
    for col in scores.columns[1:]:
        table.add_column(escape(col.replace("_at_selection", "").replace("selected", "pick")), justify="right")
    for name, row in scores.iterrows():
        cells = [row["paper_name"], name]
        for col, v in row.iloc[1:].items():
            cells.append("" if v != v else (f"{int(v)}" if col == "selected" else f"{v:.3f}"))
        table.add_row(*cells)
    shown = Console() if sys.stdout.isatty() else Console(width=220)
    shown.print(table)
    shown.print(f"selected (k={result.params['k']}, α={alpha}, λ={lam}): "
                + ", ".join(f"{p} ({c})" for c, p in zip(result.selected, result.selected_paper_names,
                                                         strict=True)), highlight=False)
    if out is not None:
        from karyo.export.writers import CSV_FLOAT_FORMAT

        write_text(out, scores.to_csv(float_format=CSV_FLOAT_FORMAT))


@app.command("train")
@friendly_errors
def train_cmd(
    task: Annotated[str, typer.Argument(help="prompter | segmentor | cellvit | ivaan | monch | unet | "
                                             "stain_agnostic")],
    data: Annotated[list[str] | None, typer.Option("--data", help="PATH[:SPLIT][@CLASSES], repeatable (layout in "
                                                                   "docs/data.md): :train picks split.csv's split; "
                                                                   "@none uses a dataset for nuclei but not classes, "
                                                                   "@1=3,2=0 maps its class ids onto the model's.")
                    ] = None,
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, history, exported model).")] = Path("runs/run"),
    config: Annotated[Path | None, typer.Option(help="JSON/YAML run config (model/train/augment/data sections).")
                      ] = None,
    preset: Annotated[str | None, typer.Option(help="Model preset (prompter: cpu, pannuke, kumar, cpm; "
                                                    "segmentor: cpu, small, tiny, vit_b, vit_l, vit_h).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (overrides the config).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (PromptNucSeg: Adam 1e-4).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (data order, augmentation, initialisation).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Fraction of source images held out for validation "
                                                            "(patches named <source>_<n> stay together; a config's "
                                                            "val_ids: names them instead).")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Cap the batches per epoch (quick runs). With accumulate_steps k in the config the optimiser steps "
             "every k batches and once more on a shorter last group, so it always steps at least once.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, mps or auto.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its last checkpoint.")
                      ] = False,
    channels: Annotated[str | None, typer.Option(help="prompter / segmentor / cellvit / monch / stain_agnostic: a "
                                                      "channel adapter for N input channels (e.g. 8) or for these "
                                                      "named channels (DAPI,CD45).")] = None,
    init: Annotated[Path | None, typer.Option(help="Start from these weights (fine-tuning): a checkpoint, a run "
                                                   "folder, a model folder or a shipped model's name such as "
                                                   "default. Its class layer starts afresh when the data have "
                                                   "other classes than it was trained on; the same class names "
                                                   "numbered otherwise are reordered.")] = None,
) -> None:
    """Train a model (PromptNucSeg prompter or segmentor, CellViT, IVAAN, MONCH, U-Net): seeded, resumable, best
    checkpoint chosen on the validation split."""
    from karyo.train.api import train

    overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                   "threads": threads, "max_steps_per_epoch": max_steps, "device": device}.items()
                 if v is not None}
    if resume and not (out / "last.pt").is_file() and (out / "train_config.json").is_file():
        console.print(f"{out} has no checkpoint yet (stopped before its first epoch ended): training starts "
                      f"again from epoch 1 with the run's saved settings", highlight=False)

    def say_resumed(epoch: int) -> None:
        from karyo.config import load_json

        planned = epochs or load_json(out / "train_config.json").get("train", {}).get("epochs")
        if planned is not None and epoch >= planned:
            console.print(f"{out} already finished {epoch} epoch(s) (of {planned} asked): nothing to train; raise "
                          f"--epochs to train on", highlight=False)
        else:
            console.print(f"resuming {out} after epoch {epoch} ({out / 'last.pt'})", highlight=False)

    try:
        result = train(task, data, out, config=config, resume=resume, preset=preset, val_fraction=val_fraction,
                       train_overrides=overrides, progress=True, channels=channels, init=init,
                       on_resume=say_resumed, on_split=lambda line: console.print(line, highlight=False))
    except KeyboardInterrupt:
        console.print(f"interrupted; the last finished epoch is saved in {out}/last.pt: run the same command with "
                      f"--resume to continue", highlight=False)
        raise typer.Exit(130) from None
    if result.best_epoch < 0:  # no epoch gave a finite score (e.g. nothing detected: F1 undefined)
        console.print(f"no epoch gave a validation score (see {result.run_dir / 'history.csv'}; e.g. nothing was "
                      f"detected): the last epoch's weights are exported", highlight=False)
    else:
        console.print(f"best validation score {result.best_score:.4f} at epoch {result.best_epoch + 1} (epoch "
                      f"{result.best_epoch} in history.csv and summary.json, which count from 0)", highlight=False)
    console.print(_trained_next_step(task, result.run_dir), highlight=False)


def _started_from_shipped(run: Path) -> bool:
    """Whether a run was fine-tuned from a shipped model (its segmentor then pairs with the new prompter)."""
    from karyo.config import load_json
    from karyo.models.registry import available

    saved = run / "train_config.json"
    return saved.is_file() and str(load_json(saved).get("init")) in available()


def _trained_next_step(task: str, run: Path) -> str:
    """Where a run's network went and what makes it a model folder (karyo segment --model, karyo.load)."""
    segmentor = "default" if task == "prompter" and _started_from_shipped(run) else "SEGMENTOR_RUN_OR_MODEL"
    pack = {"prompter": f"karyo pack promptnucseg --prompter {run} --segmentor {segmentor} --out DIR",
            "segmentor": f"karyo pack promptnucseg --prompter PROMPTER_RUN --segmentor {run} --out DIR",
            "cellvit": f"karyo pack cellvit --run {run} --out DIR",
            "ivaan": f"karyo pack ivaan --run {run} --segmentor SEGMENTOR_RUN_OR_MODEL --out DIR"}
    if task in pack:
        return f"network → {run / 'model'}; to segment with it, build a model folder: {pack[task]}"
    return f"model → {run / 'model'} (karyo segment IMAGE --model {run / 'model'})"


@app.command("pack")
@friendly_errors
def pack_cmd(
    arch: Annotated[str, typer.Argument(help="promptnucseg, cellvit or ivaan")],
    out: Annotated[Path, typer.Option(help="Model folder to write (config.json + weights).")],
    prompter: Annotated[Path | None, typer.Option(help="promptnucseg: prompter run (karyo train prompter).")
                        ] = None,
    segmentor: Annotated[Path | None, typer.Option(help="promptnucseg, ivaan: segmentor run, model folder or "
                                                        "shipped model name.")
                         ] = None,
    run: Annotated[Path | None, typer.Option(help="cellvit, ivaan: the training run folder.")] = None,
    tune: Annotated[bool | None, typer.Option("--tune/--no-tune", help="promptnucseg, ivaan: tune inference "
                                                                       "thresholds on the run's validation images "
                                                                       "(default: tune).")] = None,
    verifier: Annotated[bool | None, typer.Option("--verifier/--no-verifier", help="promptnucseg, ivaan: fit a "
                                                  "mask verifier and a duplicate judge on the run's training images "
                                                  "and let the tuning decide whether to use them (default: "
                                                  "fit).")] = None,
    threads: _Threads = None,
) -> None:
    """Build a model folder from training runs. PromptNucSeg and IVAAN: thresholds tuned on validation data only (of
    the settings within one standard error of the best, the fastest ships); CellViT: its best checkpoint in
    float16. MONCH, U-Net and stain-agnostic runs need no packing (RUN/model is the model)."""
    from karyo.errors import InputError

    def need(value: Path | None, option: str) -> Path:
        if value is None:
            raise InputError(None, f"karyo pack {arch} needs {option}")
        return value

    takes = {"promptnucseg": {"--prompter", "--segmentor"}, "ivaan": {"--run", "--segmentor"}, "cellvit": {"--run"}}
    given = {o for o, v in (("--prompter", prompter), ("--segmentor", segmentor), ("--run", run)) if v is not None}
    if arch == "cellvit":  # nothing to tune or verify: its post-processing has no thresholds to fit
        given |= {o for o, v in (("--tune/--no-tune", tune), ("--verifier/--no-verifier", verifier)) if v is not None}
    tune, verifier = tune is not False, verifier is not False
    if arch in takes and given - takes[arch]:
        raise InputError(None, f"karyo pack {arch} takes {' and '.join(sorted(takes[arch]))}, not "
                               f"{', '.join(sorted(given - takes[arch]))}")
    _check_out_folder(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise InputError(out, "holds other files and is no model folder: pack writes a model folder, so give a new "
                              "or empty one (or an earlier model folder, to replace it)")
    _set_threads(threads)
    log = lambda m: console.print(m, highlight=False)  # noqa: E731
    if arch == "promptnucseg":
        from karyo.train.pack import pack_promptnucseg

        model = pack_promptnucseg(need(prompter, "--prompter"), need(segmentor, "--segmentor"), out, tune=tune,
                                  verifier=verifier, log=log)
    elif arch == "ivaan":
        from karyo.train.ivaan import pack_ivaan

        model = pack_ivaan(need(run, "--run"), need(segmentor, "--segmentor"), out, tune=tune, verifier=verifier,
                           log=log)
    elif arch == "cellvit":
        from karyo.train.pack import pack_cellvit

        pack_cellvit(need(run, "--run"), out)
        console.print(f"model → {out} (weights in float16; karyo segment IMAGE --model {out})", highlight=False)
        return
    elif arch in ("monch", "unet", "stain_agnostic"):
        raise InputError(None, f"{arch} runs need no packing: their model is RUN/model (karyo segment --model "
                               f"RUN/model{' --task semantic' if arch != 'stain_agnostic' else ''})")
    else:
        raise InputError(None, f"unknown architecture {arch!r} for pack; choose promptnucseg, cellvit or ivaan")
    cfg = model.config
    duplicates = (f"duplicates where the judge says P ≥ {cfg.min_duplicate_probability}"
                  if cfg.min_duplicate_probability is not None else
                  f"mask NMS {cfg.mask_nms_overlap}" if cfg.mask_nms_overlap is not None else "no duplicate removal")
    console.print(f"model → {out} (score ≥ {cfg.score_threshold}, NMS {cfg.nms_radius_px} px, {duplicates}, "
                  f"{cfg.refine_points} point refinement(s), mask ≥ {cfg.mask_threshold}); karyo segment IMAGE --model "
                  f"{out}", highlight=False)


def _load_ivaan(model: Path | None, segmentor: Path | None, device: str):
    """An IVAAN model from a model folder, or from an IVAAN run plus a segmentor (assembled in memory)."""
    import karyo.models.ivaan  # noqa: F401  (registers the "ivaan" architecture)
    from karyo.errors import InputError
    from karyo.models import load
    from karyo.models.ivaan import IVAANModel

    if model is None:
        raise InputError(None, "--model is needed: an IVAAN model folder, or an IVAAN run (karyo train ivaan) "
                               "with --segmentor")
    if (model / "ivaan.json").is_file() or (model / "model" / "ivaan.json").is_file():
        if segmentor is None:
            raise InputError(model, "this is an IVAAN training run: also pass --segmentor (a segmentor run or "
                                    "model folder)")
        from karyo.train.ivaan import pack_ivaan

        net = pack_ivaan(model, segmentor, log=lambda m: None)
        return net if device == "cpu" else _to_device(net, device)
    run = model.parent if (model.parent / "train_config.json").is_file() else model
    if (run / "train_config.json").is_file():  # another task's run: packing it would not give a text model
        from karyo.config import load_json

        task = load_json(run / "train_config.json").get("task", "?")
        raise InputError(model, f"a {task} training run; text queries need an IVAAN model: karyo train ivaan, then "
                                f"karyo pack ivaan --run RUN --segmentor SEGMENTOR_RUN_OR_MODEL --out MODEL")
    net = load(model, device=device)
    if not isinstance(net, IVAANModel):
        raise InputError(model, f"not an IVAAN model (architecture {net.arch!r}); text queries need one")
    return net


def _to_device(net, device: str):
    from karyo.device import pick_device

    net.device = pick_device(device)
    net.prompter.to(net.device)
    net.segmentor.to(net.device)
    return net


@app.command("query")
@friendly_errors
def query_cmd(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    text: Annotated[str, typer.Argument(help="Free text, e.g. \"large irregular darkly stained nuclei\".")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("karyo_query"),
    model: Annotated[Path | None, typer.Option(help="IVAAN model folder (or an IVAAN run with --segmentor).")
                     ] = None,
    segmentor: Annotated[Path | None, typer.Option(help="Segmentor run, model folder or shipped model name (e.g. "
                                                        "default) when --model is a run.")
                         ] = None,
    top_k: Annotated[int, typer.Option(help="Nuclei highlighted in the overlay (the CSV ranks all).")] = 20,
    mpp: Annotated[float | None, typer.Option(help="Microns per pixel of the image.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "cpu",
    threads: _Threads = None,
) -> None:
    """Rank the nuclei of IMAGE by similarity to free TEXT (IVAAN instance–text embeddings); write an overlay
    highlighting the top matches and a ranked CSV."""
    from karyo.data.io import image_stem, read_image_meta, write_image, write_instances
    from karyo.errors import InputError
    from karyo.export.overlay import draw_overlay
    from karyo.export.writers import write_table_csv
    from karyo.infer.prepare import check_mpp
    from karyo.models.ivaan import check_query_text

    check_query_text(text)  # before a model is loaded and the image segmented
    if top_k < 1:
        raise InputError(None, f"--top-k must be ≥ 1, got {top_k}")
    _check_out_folder(out)
    if (out / "config.json").is_file():
        raise InputError(out, "is a model folder; write the query's files elsewhere (--out)")
    check_mpp(mpp, "--mpp")
    _set_threads(threads)
    net = _load_ivaan(model, segmentor, device)
    img, meta = read_image_meta(image)
    stem = image_stem(image)
    with _warnings_as_notes():
        result = net.segment(img, mpp=mpp or meta.get("mpp"), name=stem)
        ranked = net.query(result, text)
    top = ranked.head(max(0, top_k))
    # best match white, fading to orange down the top-k; all other nuclei keep their class colours (dimmed)
    n = max(1, len(top) - 1)
    highlight = {int(i): (255, int(255 - 90 * r / n), int(255 - 255 * r / n))
                 for r, i in enumerate(top["instance_id"].tolist())}
    overlay = draw_overlay(img, result.instances, result.classes, result.class_names, thickness=2,
                           highlight=highlight)
    name = f"{stem}_query_{_query_slug(text)}"  # one pair of files per query: a second query keeps the first's
    ranked.insert(0, "query", text)
    write_image(out / f"{name}.png", overlay)
    write_table_csv(out / f"{name}.csv", ranked)
    write_instances(out / f"{stem}_instances.png", result.instances)  # instance_id → pixels, for joins
    shown = text if len(text) <= 60 else text[:57] + "..."
    console.print(f"{nuclei_phrase(len(ranked))} ranked for {shown!r}; top {len(top)} highlighted → "
                  f"{out}/{name}.png, {name}.csv ({stem}_instances.png: their instance map)", highlight=False)


def _query_slug(text: str, most: int = 40) -> str:
    """A file-name part from a query: its words, lower case, joined by '-' ("large-pale-nuclei"); cut at ``most``
    characters, or "query" for a text without letters or digits, with a short hash of the whole text so that two
    such queries stay apart."""
    import hashlib
    import re

    slug = "-".join(re.findall(r"[a-z0-9]+", text.lower()))
    if slug and len(slug) <= most:
        return slug
    return (slug[:most].rstrip("-") or "query") + "-" + hashlib.sha1(text.encode()).hexdigest()[:6]


benchmark_app = typer.Typer(no_args_is_help=True, help="Benchmark protocols that train and evaluate models.")
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.command("pannuke")
@friendly_errors
def benchmark_pannuke_cmd(
    root: Annotated[Path, typer.Option(help="PanNuke release root (Fold 1..3 with images/masks/types .npy).")],
    protocol: Annotated[str, typer.Option(help="three-fold (official rotation) | organ-groups (IVAAN's 4 "
                                               "groups).")] = "three-fold",
    out: Annotated[Path, typer.Option(help="Output folder (runs, per-split results, summary.json/.md).")
                   ] = Path("runs/pannuke_benchmark"),
    method: Annotated[str, typer.Option(help="ivaan | prompter (PromptNucSeg baseline, same code path).")
                      ] = "ivaan",
    config: Annotated[Path | None, typer.Option(help="YAML: model, segmentor, train, segmentor_train, "
                                                     "augment, settings, inference, val_fraction, val_limit.")
                      ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs (prompter and segmentor; overrides the "
                                                               "config).")] = None,
    segmentor_epochs: Annotated[int | None, typer.Option(min=1, help="Segmentor epochs (default: --epochs).")
                                ] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Cap steps per epoch (smoke runs).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    segmentor: Annotated[Path | None, typer.Option(help="Reuse this trained segmentor for every split "
                                                        "(instead of training one per split).")] = None,
    split: Annotated[list[int] | None, typer.Option("--split", help="Only these rotations (three-fold: 1 = train "
                                                                     "Fold 1, validate Fold 2, test Fold 3; 2 = "
                                                                     "2/1/3; 3 = 3/2/1) or test groups (organ-groups: "
                                                                     "1..4), repeatable.")] = None,
    test_limit: Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N test patches (smoke).")
                          ] = None,
) -> None:
    """Train and evaluate on PanNuke with the official 3-fold rotation or IVAAN's 4 organ groups; report
    mPQ, bPQ, PQ and AJI per fold/group with mean and std (IVAAN supplementary Table 1)."""
    from karyo.train.pannuke_benchmark import run_pannuke_benchmark

    summary = run_pannuke_benchmark(root, protocol, out, config=config, method=method, epochs=epochs,
                                    segmentor_epochs=segmentor_epochs, max_steps=max_steps, seed=seed,
                                    segmentor=segmentor, splits=split, test_limit=test_limit,
                                    progress=sys.stderr.isatty(), log=lambda m: console.print(m, highlight=False))
    s = summary["summary"]
    typer.echo((out / "summary.md").read_text())
    console.print(f"mean mPQ {s['mpq']['mean']}, PQ {s['pq']['mean']}, AJI {s['aji']['mean']} → {out}/summary.json",
                  highlight=False)


def _progress_lines(step: float = 0.1) -> Callable[[int, int, int], None]:
    """A progress callback that prints a plain line at every ``step`` of the tiles: a batch log (no terminal, so
    no progress bar) should not stay silent for an hour-long slide."""
    shown = [-1]

    def report(done: int, total: int, nuclei: int) -> None:
        tenth = int(done / max(total, 1) / step)
        if tenth > shown[0]:
            shown[0] = tenth
            console.print(f"{done}/{total} tiles ({done / max(total, 1):.0%}), {nuclei:,} nuclei", highlight=False)

    return report


@app.command("wsi")
@friendly_errors
def wsi_cmd(
    slide: Annotated[Path, typer.Argument(help="Whole-slide image (SVS, tiled/OME-TIFF, NDPI, ...; OpenSlide formats "
                                               "if OpenSlide is installed) or a large PNG/JPEG/TIFF.")],
    model: Annotated[str, typer.Option(help="Model name (see `karyo models`) or model folder.")] = "default",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("karyo_wsi"),
    mpp: Annotated[float | None, typer.Option(help="Microns per pixel of level 0 (overrides the file; needed when "
                                                   "the file does not state it).")] = None,
    tile: Annotated[int | None, typer.Option(help="Tile size in px at the model's resolution (default 256).")
                    ] = None,
    overlap: Annotated[int | None, typer.Option(help="Tile overlap in px; at least 2 × the largest nucleus radius "
                                                     "(default 64).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of an existing dask scheduler (tcp://HOST:PORT); "
                                                       "its workers must see SLIDE.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local worker processes (default: one per CPU core; 0: "
                                                     "compute in this process).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT (same karyo, settings "
                                                          "and slide file); a finished one is left as it is.")
                      ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto (for each worker).")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for the network per worker (default: "
                                                            "the cores shared out among the local workers).")
                       ] = None,
) -> None:
    """Segment every nucleus of a whole slide, tile by tile; write nuclei.parquet, nuclei.geojson (QuPath),
    tissue_mask.png, overlay.png and summary.json into OUT.

    Progress goes to stderr: a bar on a terminal, otherwise (a batch log) a plain line at every 10% of the tiles.
    Nuclei are counted after seam duplicates are removed, so the last count is the final one."""
    import signal

    from karyo.data.io import mpp_override
    from karyo.infer.wsi import WSIOptions, run_wsi

    caught: list[int] = []

    def terminated(signum, frame):  # SIGTERM (timeout, batch schedulers) stops the run as Ctrl-C does
        caught.append(signum)
        raise KeyboardInterrupt

    _check_out_folder(out)
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler can be installed
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        result = run_wsi(slide, model, out, mpp=mpp, tile=tile, overlap=overlap, workers=workers,
                         scheduler=scheduler, resume=resume,
                         progress=True if sys.stderr.isatty() else _progress_lines(),
                         options=WSIOptions(device=device, threads=threads))
    except KeyboardInterrupt:
        if out.is_dir():
            console.print(f"interrupted; finished tiles are kept in {out}: run the same command with --resume to "
                          f"continue", highlight=False)
        else:  # removed by run_wsi: nothing was finished
            console.print("interrupted before any tile was finished; nothing was written", highlight=False)
        raise typer.Exit(128 + (caught[0] if caught else signal.SIGINT)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    override = mpp_override(mpp, result.summary["slide"].get("metadata_mpp"))
    if override:
        console.print(f"note: --{override}", highlight=False)
    n = result.summary["nuclei"]
    if n.get("truncated_at_tile_edge"):
        overlap = result.summary["tiling"]["overlap"]
        console.print(f"note: {n['truncated_at_tile_edge']:,} nuclei touch the edge of the tile that kept them: they "
                      f"are wider than the overlap ({overlap} px) allows and may be cut; raise --overlap",
                      highlight=False)
    area = result.summary["tissue"]["area_mm2"]
    console.print(f"{n['total']:,} nuclei in {area:.3g} mm² of tissue "
                  f"({result.summary['tiling']['tiles_with_tissue']} tiles) → {out}/", highlight=False)
