"""What the drop-in shims (`trackd.wandb`, `trackd.mlflow`) share.

A shim imports neither the library it imitates nor anything heavy: the library is imported
only when the user reaches for a name the shim does not define (reading results with
`mlflow.search_runs`, `wandb.Api()`), and a tracking call the shim cannot honour raises
`NotImplementedError` naming it instead of silently writing to the real library's run.
"""

from __future__ import annotations

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
    """The daemon's record of a run (project, name, last step), or None when it knows no such
    run or cannot be asked (then the run is resumed by its id alone, as the spool is)."""
    from trackd.client.control import DaemonUnreachable, request

    try:
        known = request("run", endpoint=endpoint, timeout=KNOWN_RUN_SECONDS, id=run_id)
    except (DaemonUnreachable, RuntimeError, ValueError):
        return None
    return known if isinstance(known, dict) else None


def check_keys(function: str, given: dict[str, object], allowed: Collection[str]) -> None:
    """Refuse a keyword the imitated call does not take, naming it (as Python would)."""
    for key in given:
        if key not in allowed:
            raise TypeError(f"{function}() got an unexpected keyword argument {key!r}")
