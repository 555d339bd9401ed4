"""Worker processes that end with the process that started them.

``pmod demo`` and ``pmod ablate`` train side by side in worker processes. A worker of a plain
:class:`~concurrent.futures.ProcessPoolExecutor` outlives a parent killed with ``kill -9``: it goes on training
and writing results into a folder nobody watches, then idles with its memory held. Every worker of
:func:`worker_pool` ends when its parent does: on Linux the kernel kills it (``prctl(PR_SET_PDEATHSIG)``), and
everywhere a daemon thread in the worker sees the parent gone (``os.getppid()`` changes) within a second.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

#: ``PR_SET_PDEATHSIG`` of ``<linux/prctl.h>``: the signal the kernel sends a process when its parent exits.
_PR_SET_PDEATHSIG = 1
#: Seconds between the fallback watcher's looks at the parent.
WATCH_INTERVAL = 0.5


def spawn_context() -> Any:
    """The multiprocessing context of the workers (``spawn``: a fresh interpreter, no forked torch state); queues
    shared with them are made from it."""
    return multiprocessing.get_context("spawn")


def worker_pool(
    workers: int, initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = ()
) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each ending with this process; ``initializer(*initargs)`` runs in
    each after that is arranged."""
    return ProcessPoolExecutor(
        workers, mp_context=spawn_context(), initializer=_start_worker, initargs=(os.getpid(), initializer, initargs)
    )


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    end_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


def end_with_parent(parent: int) -> None:
    """Make this process end when process ``parent`` (its parent) does, however that ends (``kill -9`` too)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the watcher below is enough
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="pmod-watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)  # a worker's results go nowhere once its parent is gone; exit without clean-up, at once
