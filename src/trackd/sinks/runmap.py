"""A sink's durable map from trackd run ids to its backend's run ids."""

from __future__ import annotations

import logging
from pathlib import Path

from trackd.jsonfile import read_json, write_json_atomic


class RunMap:
    """trackd run id -> the backend's run id, kept durably in the sink's state directory.

    A daemon restart, a replay or `resume="allow"` must continue the backend run it
    created before instead of creating a second one; each sink that creates runs in
    its backend records them here before writing to them.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._map: dict[str, str] = read_json(path)
        except FileNotFoundError:
            self._map = {}
        except ValueError as exc:  # a truncated file must not keep the sink from opening
            logging.getLogger("trackd.sinks").error(
                "%s; starting with no runs known (a run may be created again)", exc
            )
            self._map = {}

    def get(self, run_id: str) -> str | None:
        return self._map.get(run_id)

    def set(self, run_id: str, backend_id: str) -> None:
        self._map[run_id] = backend_id
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path, self._map)
