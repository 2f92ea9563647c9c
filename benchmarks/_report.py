"""Write one benchmark's results into its own section of docs/benchmarks.md (other sections untouched)."""

from __future__ import annotations

import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("# karyo benchmarks\n\nEvery section is written by a script in `benchmarks/`; the command that produced "
          "it is given in the section. Times are ratios against a baseline measured in the same process where "
          "possible, because absolute times vary between machines.\n")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, {platform.system()}"


def invocation(module: str) -> str:
    """The command line that ran this benchmark, with its arguments, for the report."""
    import shlex

    return " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])])


def update_section(name: str, title: str, body: str, command: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- bench:{name} -->\n## {title}\n\nCommand: `{command}`  \nMeasured {stamp} on {machine()}.\n\n"
             f"{body.strip()}\n<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_suffix(".md.part")
    tmp.write_text(text)
    tmp.replace(DOC)
    return DOC


def publish_model_report(body: str, model: str, title: str, module: str, *, write: bool, seconds: float) -> None:
    """:func:`publish` a report on one model, in the section ``<module's last name>_<model folder name>`` (its
    ``{model}`` in ``title`` filled in the same way), and print how long the measurement took."""
    name = Path(model).name
    publish(body, f"{module.rsplit('.', 1)[-1]}_{name}", title.format(model=name), module, write=write)
    print(f"({seconds:.0f} s)")


def publish(body: str, name: str, title: str, module: str, write: bool = True) -> None:
    """Print a benchmark's report and, unless ``write`` is off (smoke runs), put it in its docs section."""
    print(body)
    if write:
        update_section(name, title, body, invocation(module))
