"""The ``karyo`` command line: a thin shell over the Python API (parse, call, write, report).

Every command has a Python twin: ``karyo segment`` is ``karyo.load(...).segment(image)`` followed by
``karyo.export.writers.save_result``; ``karyo evaluate`` is ``karyo.metrics.evaluate.evaluate``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from karyo import __version__
from karyo.errors import KaryoError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0],
                  pretty_exceptions_enable=False)
console = Console(stderr=True)


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


def _expand_images(paths: list[Path]) -> list[Path]:
    from karyo.data.io import list_images
    from karyo.errors import InputError

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise InputError(p, "folder holds no images (.png, .jpg, .tif, ...)")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(p, "file not found")
    return files


def _read_points(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """CSV with columns x,y and optional label (1 = nucleus, 0 = negative)."""
    import pandas as pd

    from karyo.errors import InputError

    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read points CSV ({exc})") from None
    if not {"x", "y"} <= set(table.columns):
        raise InputError(path, f"points CSV needs columns x,y (and optionally label); got {list(table.columns)}")
    if not (pd.api.types.is_numeric_dtype(table["x"]) and pd.api.types.is_numeric_dtype(table["y"])):
        raise InputError(path, "points CSV columns x and y must be numbers")
    label = table["label"] if "label" in table.columns else pd.Series(1, index=table.index)
    pos = [(float(x), float(y)) for x, y, lab in zip(table.x, table.y, label, strict=True) if int(lab) == 1]
    neg = [(float(x), float(y)) for x, y, lab in zip(table.x, table.y, label, strict=True) if int(lab) == 0]
    return pos, neg


@app.command()
@friendly_errors
def segment(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files or folders of images.")] = None,
    model: Annotated[str, typer.Option(help="Model name (see `karyo models`) or model folder.")] = "default",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("karyo_out"),
    sample: Annotated[bool, typer.Option("--sample", help="Run on the bundled sample H&E tile.")] = False,
    points: Annotated[Path | None, typer.Option(help="CSV of x,y[,label] prompts: segment only these nuclei.")
                      ] = None,
    mpp: Annotated[float | None, typer.Option(help="Microns per pixel of the images (rescaled to the "
                                                   "model's resolution).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "cpu",
    outputs: Annotated[str, typer.Option(help="Comma-separated: instances,classes,overlay,geojson.")
                       ] = "instances,classes,overlay,geojson",
) -> None:
    """Find, outline and classify the nuclei of each image; write instance maps, class tables, overlays
    and QuPath GeoJSON into OUT."""
    from karyo.data.io import read_image_meta
    from karyo.errors import InputError
    from karyo.export.writers import ALL_OUTPUTS, save_result
    from karyo.models import load
    from karyo.samples import sample_path

    paths = list(images or [])
    if sample:
        paths.append(sample_path())
    if not paths:
        raise InputError(None, "no image given (pass image paths, a folder, or --sample)")
    files = _expand_images(paths)
    kinds = [k.strip() for k in outputs.split(",") if k.strip()]
    bad = sorted(set(kinds) - set(ALL_OUTPUTS))
    if bad:
        raise InputError(None, f"unknown --outputs {bad}; choose from {', '.join(ALL_OUTPUTS)}")
    pos, neg = _read_points(points) if points is not None else (None, None)
    if points is not None and len(files) != 1:
        raise InputError(points, "--points applies to exactly one image")
    net = load(model, device=device)
    total = 0
    with progress_bar() as bar:
        task = bar.add_task("segmenting", total=len(files))
        for path in files:
            image, meta = read_image_meta(path)
            stem = path.name.split(".")[0]
            result = net.segment(image, points=pos, negative=neg, mpp=mpp or meta.get("mpp"), name=stem)
            save_result(result, out, image, stem=stem, outputs=kinds)
            total += result.n_nuclei
            bar.advance(task)
    console.print(f"{total} nuclei in {len(files)} image(s) → {out}/", highlight=False)


@app.command("models")
def list_models() -> None:
    """List the pretrained model names."""
    from karyo.models.registry import available, resolve

    for name in available():
        entry = resolve(name)
        alias = f" → {entry['name']}" if entry["name"] != name else ""
        typer.echo(f"{name}{alias}: {entry.get('description', '')}")
