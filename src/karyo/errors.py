"""Errors karyo raises on bad input.

Every problem a user can cause with a file is reported as one :class:`InputError` whose message starts
with the file name, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import os


class KaryoError(Exception):
    """Base class of every error karyo raises on purpose."""


class InputError(KaryoError, ValueError):
    """A file or array given by the user cannot be used; the message names it and the problem."""

    def __init__(self, source: str | os.PathLike | None, problem: str):
        self.source = None if source is None else os.fspath(source)
        self.problem = problem
        super().__init__(problem if self.source is None else f"{self.source}: {problem}")
