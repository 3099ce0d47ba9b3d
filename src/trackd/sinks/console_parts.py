"""A run's console as numbered parts, for backends that store files but cannot append to one.

MLflow has no append for artifacts: re-uploading a growing `console.log` whole
would cost a run's whole output on every batch. So the console goes up as parts
`console-SESSION-000001.log`, `console-SESSION-000002.log`, ... where SESSION is
the UTC start time of the run's session (`YYYYmmdd-HHMMSS`; a resumed run starts
a new one, so its parts never overwrite the earlier session's); the parts,
concatenated in name order, are the run's console.log.

A part closes when it holds `PART_CHARS` characters, or when a line comes more
than `PART_SECONDS` after the part's first line (by the lines' own times), or
when the run ends. Those boundaries depend only on the records, never on when a
batch happened to be written, so after a crash the records re-sent from the
sink's cursor rebuild the very same parts from the checkpointed open part
(`state()`, saved with the cursor) and an upload overwrites a part with the same
name and the same lines: exactly once. The open part is uploaded too (under its
final name, overwritten as it grows) at most every `UPLOAD_SECONDS`, so the
backend shows the console while the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

PART_CHARS = 256 * 1024
PART_SECONDS = 60.0
UPLOAD_SECONDS = 5.0


def part_name(session: str, number: int) -> str:
    return f"console-{session}-{number:06d}.log"


def session_stamp(started: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))


@dataclass
class _Part:
    session: str
    number: int = 1
    ts: float | None = None
    lines: list[str] = field(default_factory=list)
    chars: int = 0

    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


class ConsoleParts:
    """The open part of each run (keyed by the backend's run id)."""

    def __init__(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self._open = {run: _Part(**part) for run, part in state.get("open", {}).items()}
        self._sessions: dict[str, str] = dict(state.get("sessions", {}))
        self._uploaded_at: dict[str, float] = {}

    def start(self, run: str, started: float) -> None:
        """A run_start: the session its console records belong to, until the run ends.

        Taken from the record, in WAL order: the `started` of a record's RunInfo is the
        latest session's, which a sink behind a resumed run has not reached yet."""
        self._sessions[run] = session_stamp(started)

    def add(self, run: str, lines: list[list[Any]], started: float) -> list[tuple[str, str]]:
        """Add a console record's lines; return the parts it closed, as (name, text).
        `started` names the session of a run whose run_start this sink has not seen."""
        session = self._sessions.setdefault(run, session_stamp(started))
        closed = []
        part = self._open.get(run)
        if part is not None and part.session != session:  # a session that never ended
            if part.lines:
                closed.append((part_name(part.session, part.number), part.text()))
            part = None
        if part is None:
            part = self._open[run] = _Part(session)
        for ts, _, text in lines:
            if part.lines and (
                part.chars >= PART_CHARS or (part.ts is not None and ts - part.ts > PART_SECONDS)
            ):
                closed.append((part_name(session, part.number), part.text()))
                part = self._open[run] = _Part(session, number=part.number + 1)
            if part.ts is None:
                part.ts = ts
            part.lines.append(text)
            part.chars += len(text) + 1
        return closed

    def due(self, run: str) -> tuple[str, str] | None:
        """The open part, as (name, text), if it has lines and was not uploaded lately."""
        part = self._open.get(run)
        now = time.monotonic()
        if part is None or not part.lines:
            return None
        if now - self._uploaded_at.get(run, -UPLOAD_SECONDS) < UPLOAD_SECONDS:
            return None
        self._uploaded_at[run] = now
        return part_name(part.session, part.number), part.text()

    def end(self, run: str) -> tuple[str, str] | None:
        """The run ended: its last part, if it has lines; the run is forgotten."""
        part = self._open.pop(run, None)
        self._uploaded_at.pop(run, None)
        self._sessions.pop(run, None)
        if part is None or not part.lines:
            return None
        return part_name(part.session, part.number), part.text()

    def state(self) -> dict[str, Any]:
        open_parts = {run: asdict(part) for run, part in self._open.items() if part.lines}
        return {"open": open_parts, "sessions": dict(self._sessions)}
