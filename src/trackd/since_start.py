"""`trackd tail --since-start`: the WAL read from its start, joined to the live stream exactly.

The live stream (ZeroMQ PUB/SUB) carries each message with the WAL position
just after its record, and the WAL read returns the same positions. A
subscription takes effect at the daemon some time after it is made, and
nothing tells the subscriber when; so the join does not guess (a fixed sleep
lost messages whenever the subscription was slower). The WAL is read up to
its end; then the first live message past what was shown marks the seam: the
WAL is read again up to that message's record, and from there on the live
stream is continuous. A live message at or before what the WAL already showed
is a duplicate and is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Position = tuple[int, ...]
ReadWal = Callable[[list[int] | None], dict[str, Any]]  # the control socket's `wal` command
Show = Callable[[str, bytes], None]


class Seam:
    def __init__(self, read_wal: ReadWal, show: Show) -> None:
        self._read_wal = read_wal
        self._show = show
        self.shown: Position | None = None  # the end of the last record shown
        self._joined = False

    def read_to_end(self) -> None:
        """Show every record the WAL holds now, from its start."""
        self._read(None)

    def live(self, topic: str, frame: bytes, at: Position) -> None:
        """Show one live message, first catching up on the WAL if it is the first past the seam."""
        if not self._joined:
            if self.shown is not None and at <= self.shown:
                return  # shown from the WAL already
            self._read(at)
            self._joined = True
        self._show(topic, frame)
        self.shown = at

    def _read(self, before: Position | None) -> None:
        """Show WAL records after `shown`, up to the end (or up to the one ending at `before`)."""
        while True:
            chunk = self._read_wal(list(self.shown) if self.shown is not None else None)
            for at, topic, frame in chunk["records"]:
                if before is not None and tuple(at) >= before:
                    return
                self._show(topic, frame)
                self.shown = tuple(at)
            if not chunk["records"] or tuple(chunk["next"]) >= tuple(chunk["end"]):
                return
