"""State files the daemon found unreadable at start: logged, counted, shown by `trackd status`.

The ledger checkpoint, a sink's delivery progress and the WAL's segment counts are
all rebuilt or restarted from the WAL when they cannot be read (a truncated file
after a full disk, a bad block); a damaged state file never keeps the daemon from
starting.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("trackd.state")


class StateDamage:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # sink workers note from their own threads
        self.unreadable = 0
        self.last: str | None = None

    def note(self, text: str) -> None:
        log.error("unreadable state: %s", text)
        with self._lock:
            self.unreadable += 1
            self.last = text

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"unreadable_files": self.unreadable, "last_error": self.last}
