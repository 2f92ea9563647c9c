"""Imported only by the fork server that starts a whole-slide run's local workers (``karyo.infer.wsi``
preloads it there, last), never by a user's process.

The server is started with SIGINT ignored, so that a Ctrl-C in the seconds it imports torch and dask prints no
traceback; once those imports are done, this module gives SIGINT back its Python default, which the server
passes on to the workers it forks: they stop on Ctrl-C as before instead of outliving the run and logging
failed heartbeats.

A Ctrl-C or SIGTERM while a worker is being forked ends the run in the parent, which removes the semaphores and
pipes the new worker was about to inherit; the child then fails inside ``multiprocessing.spawn`` before any
karyo or dask code runs, and the fork server prints that traceback under the run's one-line "interrupted"
message. This hook keeps exactly those failures quiet; every other error is printed as before.
"""

from __future__ import annotations

import signal
import sys
import traceback

#: What a worker's bootstrap raises when the process that asked for it has gone.
VANISHED_PARENT_ERRORS = (FileNotFoundError, EOFError, BrokenPipeError, ConnectionResetError)

_default_hook = sys.excepthook


def _in_worker_bootstrap(tb) -> bool:
    return any(frame.name == "_main" and frame.filename.endswith(("multiprocessing/spawn.py",
                                                                     "multiprocessing\\spawn.py"))
               for frame in traceback.extract_tb(tb))


def quiet_vanished_parent(exc_type, exc, tb) -> None:
    if issubclass(exc_type, VANISHED_PARENT_ERRORS) and _in_worker_bootstrap(tb):
        return
    _default_hook(exc_type, exc, tb)


sys.excepthook = quiet_vanished_parent
signal.signal(signal.SIGINT, signal.default_int_handler)
