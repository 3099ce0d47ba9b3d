"""What the drop-in shims (`trackd.wandb`, `trackd.mlflow`) share.

A shim imports neither the library it imitates nor anything heavy: the library is imported
only when the user reaches for a name the shim does not define (reading results with
`mlflow.search_runs`, `wandb.Api()`), and a tracking call the shim cannot honour raises
`NotImplementedError` naming it instead of silently writing to the real library's run.
"""

from __future__ import annotations

import json
import os

from trackd import paths
from trackd.protocol import IGNORED_TAG

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from typing import Any, NoReturn

    from trackd.client.run import Run

KNOWN_RUN_SECONDS = 2.0
_ignored: dict[str, set[str]] = {}  # run id -> the no-op calls already marked on it


def real_attribute(library: str, name: str, unsupported: Collection[str]) -> Any:
    """The real library's attribute `name`, for a shim module's `__getattr__`."""
    if name.startswith("__"):  # import machinery and introspection: never import the library
        raise AttributeError(f"module 'trackd.{library}' has no attribute {name!r}")
    if name in unsupported:
        return not_supported(f"{library}.{name}")
    from importlib import import_module

    try:
        module = import_module(library)
    except ImportError as exc:
        raise AttributeError(
            f"trackd.{library} does not provide {library}.{name}, and reaching it needs the real "
            f"{library}, which is not installed (pip install {library})"
        ) from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(
            f"module 'trackd.{library}' has no attribute {name!r}, nor has {library}"
        ) from None


def not_supported(call: str) -> Callable[..., NoReturn]:
    """A stand-in for a tracking call the shim does not implement: it raises when called."""

    shim = call.split(".", maxsplit=1)[0]

    def unsupported(*args: object, **kwargs: object) -> NoReturn:
        raise NotImplementedError(f"{call}() is not supported by trackd.{shim}")

    unsupported.__name__ = call.rsplit(".", 1)[-1]
    return unsupported


def mark_ignored(run: Run | None, call: str) -> None:
    """Record once per run that a documented no-op was called, as a tag the daemon counts."""
    if run is None:
        return
    marked = _ignored.setdefault(run.id, set())
    if call not in marked:
        marked.add(call)
        run.set_tags({IGNORED_TAG + call: ""})


def known_run(run_id: str, endpoint: str | None = None) -> dict[str, Any] | None:
    """The daemon's record of a run (project, name, last step); without a daemon that knows
    it, what a shim on this machine remembered when it started the run (`remember_run`), so
    a run resumed by id alone keeps its project and name offline too. None: no such run."""
    from trackd.client.control import DaemonUnreachable, request

    try:
        known = request("run", endpoint=endpoint, timeout=KNOWN_RUN_SECONDS, id=run_id)
    except (DaemonUnreachable, RuntimeError, ValueError):
        known = None
    if isinstance(known, dict):
        return known
    try:
        with open(_record(run_id), encoding="utf-8") as handle:
            remembered = json.load(handle)
    except (OSError, ValueError):
        return None
    return remembered if isinstance(remembered, dict) else None


def remember_run(run: Run, last_step: int | None = None) -> None:
    """Note the project and name (and at its end the last step) of a run a shim started, for a
    resume by id alone while no daemon can be asked."""
    path = _record(run.id)
    record = {"project": run.project, "name": run.name, "last_step": last_step}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # only a later resume by id alone, offline, misses the name: never the run itself


def _record(run_id: str) -> str:
    import hashlib

    digest = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    return os.path.join(paths.data_dir(), "shim-runs", f"{digest}.json")


def check_keys(function: str, given: dict[str, object], allowed: Collection[str]) -> None:
    """Refuse a keyword the imitated call does not take, naming it (as Python would)."""
    for key in given:
        if key not in allowed:
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
