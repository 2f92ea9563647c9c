"""Errors karyo raises on bad input.

Every problem a user can cause with a file is reported as one :class:`InputError` whose message starts
with the file name, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class KaryoError(Exception):
    """Base class of every error karyo raises on purpose."""


class InputError(KaryoError, ValueError):
    """A file or array given by the user cannot be used; the message names it and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")


@contextlib.contextmanager
def naming(source: str | os.PathLike | None) -> Iterator[None]:
    """Inside, an :class:`InputError` that names no file (a check that only sees values, e.g. a config's
    ``__post_init__``) is raised again naming ``source``, the file the values came from."""
    try:
        yield
    except InputError as exc:
        if exc.source is None and source is not None:
            raise InputError(source, exc.problem) from None
        raise
