"""The process's open runs, and the hooks that finish them.

Installed once, at the first `init()`: an atexit hook that finishes runs left
open, an excepthook that marks them failed with the traceback and then
*chains to the previous hook* (trackd never replaces `sys.exit` or swallows
the exception), and a fork hook that gives each run a fresh session in the
child. A child that `multiprocessing` started (a DataLoader worker, a Pool's)
ends with `os._exit`, which runs no atexit hook: its runs are finished by a
`multiprocessing` finalizer instead, which that exit does run.

`run.py` does not import this module, nor this one `run.py` (DESIGN's layering):
a registered run is told to call `forget` when it finishes (`_on_finished`).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any, Protocol

    class Run(Protocol):
        """What the registry needs of a run (trackd.client.run.Run)."""

        _on_finished: Callable[[Any], None] | None

        def finish(self, status: str | None = None, timeout: float = 10.0) -> None: ...

        def _finish(self, status: str, error: str | None, timeout: float) -> None: ...

        def _after_fork_in_child(self) -> None: ...


_lock = threading.Lock()
_open: list[Run] = []
_installed = False
current: Run | None = None
EXIT_TIMEOUT = 10.0


def register(run: Run) -> None:
    global current, _installed
    run._on_finished = forget
    with _lock:
        _open.append(run)
        current = run
        if not _installed:
            _installed = True
            atexit.register(_finish_open_runs)
            _chain_excepthook()
            os.register_at_fork(after_in_child=_after_fork_in_child)


def forget(run: Run) -> None:
    global current
    with _lock:
        if run in _open:
            _open.remove(run)
        if current is run:
            current = _open[-1] if _open else None


def _finish_open_runs() -> None:
    for run in list(_open):
        run.finish(timeout=EXIT_TIMEOUT)


def _chain_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        import traceback

        error = "".join(traceback.format_exception(exc_type, exc, tb))
        try:
            previous(exc_type, exc, tb)  # first: the traceback it prints is console output too
        finally:
            for run in list(_open):
                run._finish("failed", error, EXIT_TIMEOUT)

    sys.excepthook = excepthook


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    for run in _open:
        run._after_fork_in_child()
    if _open and "multiprocessing" in sys.modules:
        from multiprocessing import util

        # A process that `multiprocessing` forks clears its finalizers after this hook and
        # then runs its after-fork callbacks: the finalizer is registered from one of those.
        util.register_after_fork(_finalizer_owner, _finish_at_process_exit)


class _FinalizerOwner:
    """What `multiprocessing` keeps (weakly) an after-fork callback for: it lives as long
    as this module."""


_finalizer_owner = _FinalizerOwner()


def _finish_at_process_exit(_: object) -> None:
    from multiprocessing import util

    util.Finalize(None, _finish_open_runs, exitpriority=0)
