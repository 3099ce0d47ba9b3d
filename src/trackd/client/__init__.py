"""The training-side client: the standard library, pyzmq and msgpack only.

What crosses threads: the script's threads hand each run's rows and messages to the
run's delivery thread through one list, `Transport.queue` (`transport` says how, and
why a row with its step needs no lock); the run's lock guards the steps it counts and its
end, and the transport's own lock the batch a flooding `log()` packs. Console writes
reach the delivery thread through a deque (`console`), and `registry` keeps the open
runs under a lock of its own.
"""

from __future__ import annotations

import os

from trackd.client import registry
from trackd.client.run import Run

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any

    from trackd.client.run import Mode


def init(
    project: str,
    name: str | None = None,
    group: str | None = None,
    config: dict[str, Any] | None = None,
    tags: dict[str, str] | list[str] | None = None,
    resume: str | None = None,
    mode: Mode = "online",
    endpoint: str | None = None,
    dir: str | os.PathLike[str] | None = None,
    ranks: str = "zero",
    console: str = "wrap",
    save_code: bool = True,
) -> Run:
    """Start a run and make it the current one for the module-level `log` and `finish`.

    `resume` follows trackio: "must" continues the latest run of this project and name
    (ValueError if there is none), "allow" continues it or starts one, None or "never"
    always starts a new run; a resumed run's steps continue after its highest.

    In a distributed job (RANK and WORLD_SIZE > 1 in the environment) every process of the
    job joins one run: with `ranks="zero"` only rank 0 logs; with `ranks="all"` every rank
    does, its keys prefixed `rank{N}/`.

    `console="wrap"` tees stdout and stderr lines to the run (the terminal shows the
    same bytes); `save_code=True` records git commit, branch, remote, dirty flag, the
    diff against HEAD (artifact `diff.patch`), the command line and the interpreter.
    """
    run = Run(
        project, name, group, config, tags, resume, mode, endpoint, dir, ranks, console, save_code
    )
    registry.register(run)
    return run


def log(values: dict[str, Any], step: int | None = None) -> None:
    _current("log").log(values, step)


def finish(status: str | None = None, timeout: float = 10.0) -> None:
    _current("finish").finish(status, timeout)


def alert(title: str, text: str = "", level: object = "INFO") -> None:
    """Record an alert on the current run (see `Run.alert`)."""
    _current("alert").alert(title, text, level)


def _current(verb: str) -> Run:
    run = registry.current
    if run is None:
        raise RuntimeError(f"trackd.{verb}(): call trackd.init() first")
    assert isinstance(run, Run)  # the registry holds only runs made by init()
    return run


__all__ = ["Run", "alert", "finish", "init", "log"]
