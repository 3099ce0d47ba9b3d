"""What the three adapters share: the run behind an adapter, library values made trackd values.

This module imports no training library, so the adapters can share it without
importing each other's.
"""

from __future__ import annotations

import dataclasses
import sys
from argparse import Namespace
from collections.abc import Mapping
from enum import Enum
from typing import Any

import trackd


class RunHandle:
    """An adapter's trackd run: started on first use, ended once, re-opened if logged to after.

    Training libraries log after "the end" (Lightning's `test()` after `fit()`,
    `Trainer.evaluate()` after `train()`). Such rows continue the same run: it is
    re-opened with `resume="allow"` (the latest run of its project and name, which is
    the one just ended), its config kept.

    Pickling (Lightning pickles the Trainer with its logger, e.g. for `ddp_spawn`) keeps
    what identifies the run and drops the live client (its locks, sockets and threads);
    the unpickled handle re-opens the same run the same way on its first log.
    """

    def __init__(self, project: str, name: str | None, init_kwargs: dict[str, Any]) -> None:
        self.project = project
        self.name = name
        self.init_kwargs = init_kwargs
        self.run: trackd.Run | None = None
        self.ended = False
        self._config: dict[str, Any] = {}  # the run's config, for re-opening it
        self._started = False  # a run was started (here or before pickling): re-open it

    def live(self) -> trackd.Run:
        """The run to log to: started, or re-opened after `end()` or unpickling, as needed."""
        if self.run is not None and not self.ended:
            return self.run
        if self.run is not None:
            self._config, self.name = dict(self.run.config), self.run.name
        kwargs = dict(self.init_kwargs)
        config = {**self._config, **plain(kwargs.pop("config", None) or {})}
        if self._started:
            kwargs["resume"] = "allow"
        self.run = trackd.init(self.project, name=self.name, config=config, **kwargs)
        self.name, self._started, self.ended = self.run.name, True, False
        return self.run

    def end(self, failed: bool = False) -> None:
        """Finish the run; a failure raised and being handled right now goes into run.json."""
        run = self.run
        if run is None or self.ended:
            return
        self.ended = True
        exc_type, exc, tb = sys.exc_info()
        if failed and exc is not None:
            # The public context-manager contract: status failed, with the traceback.
            run.__exit__(exc_type, exc, tb)
        else:
            run.finish("failed" if failed else None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        run = state.pop("run")
        if run is not None:
            state["_config"], state["name"] = dict(run.config), run.name
        return {**state, "run": None, "ended": False}


def plain(value: Any) -> Any:
    """A config value as JSON-like data: enums, Namespaces, dataclasses, arrays unwrapped,
    classes and callables by name, anything else by `str()` (as MLflow and W&B record them)."""
    if isinstance(value, Enum):
        value = value.value
    elif isinstance(value, Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif not isinstance(value, type) and callable(getattr(value, "tolist", None)):
        value = value.tolist()  # NumPy arrays and scalars, tensors
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if isinstance(value, type) or callable(value):
        return getattr(value, "__qualname__", None) or str(value)
    return str(value)


def split_metrics(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(numbers for `Run.log`, everything else for `Run.set_summary`), nested dicts flattened "/".

    Accelerate and transformers let a log call carry text next to numbers; a
    metrics row holds numbers only, so text lands in the summary (its last value,
    as W&B shows it). Numbers and 0-d tensors pass through untouched: the client
    reads tensors without a device sync. None is skipped.
    """
    metrics: dict[str, Any] = {}
    other: dict[str, Any] = {}
    _split(values, "", metrics, other)
    return metrics, other


def _split(
    values: Mapping[str, Any], prefix: str, metrics: dict[str, Any], other: dict[str, Any]
) -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _split(value, name + "/", metrics, other)
        elif isinstance(value, bool | int | float) or (
            callable(getattr(value, "item", None)) and not isinstance(value, str | bytes)
        ):
            metrics[name] = value
        elif value is not None:
            other[name] = plain(value)
