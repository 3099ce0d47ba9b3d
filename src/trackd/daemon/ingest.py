"""Accepting messages: validate, dedupe, append to the WAL; ack once durable.

Per session the daemon accepts sequence numbers in order, each once: a
message at or below the session's high-water mark is a duplicate (acked again,
stored once); one beyond the next expected number means the client lost
something in transit, and is answered with the current mark and `gap`, which
makes the client go back and resend. Messages read from a dead client's spool
may skip ahead (nothing else will ever send the missing ones).

A frame that fails validation is answered with an error naming the field and
counted; if it carries a readable session and the next expected sequence
number, a `reject` record takes its place in the WAL so the number stays used.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from trackd.daemon.ledger import Ledger
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import (
    IGNORED_TAG,
    INTERNAL_TYPES,
    MAX_FRAME_BYTES,
    VERSION,
    Message,
    ProtocolError,
    decode,
    encode,
)

Reply = Callable[[bytes], None]
RATE_SECONDS = 10.0
PEEK_BYTES = 64 * 1024  # frames larger than this are checked for a duplicate before decoding


@dataclass(slots=True)
class _Accepted:
    """A message on its way into the WAL, with what its commit needs of it.

    A metrics message keeps its envelope and an empty body: decoded rows take about ten
    times the bytes of their frame, and four clients' frames in flight would otherwise
    hold some 40 MB of them until the commit (measured: peak RSS 144 -> 96 MB).
    """

    frame: bytes
    message: Message
    reply: Reply | None
    rows: int = 0
    last_step: int | None = None

    @classmethod
    def of(cls, frame: bytes, message: Message, reply: Reply | None) -> _Accepted:
        if message["t"] != "metrics":
            return cls(frame, message, reply)
        rows = message["b"]["rows"]
        light = {**message, "b": {"rows": []}}
        return cls(frame, light, reply, len(rows), max(row[0] for row in rows) if rows else None)


@dataclass
class IngestStats:
    messages: int = 0
    rows: int = 0
    bytes: int = 0
    duplicates: int = 0
    gaps: int = 0
    blocked: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    ignored_calls: Counter[str] = field(default_factory=Counter)  # a shim's documented no-ops
    last_error: str | None = None
    last_error_at: float | None = None
    _window: deque[tuple[float, int]] = field(default_factory=deque)

    def rate(self, now: float) -> float:
        """Rows per second over the last `RATE_SECONDS`."""
        self._trim(now)
        return sum(rows for _, rows in self._window) / RATE_SECONDS

    def count_rows(self, now: float, rows: int) -> None:
        self.rows += rows
        self._window.append((now, rows))
        self._trim(now)  # here too: a daemon nobody asks for its status must not grow

    def _trim(self, now: float) -> None:
        window = self._window
        while window and window[0][0] < now - RATE_SECONDS:
            window.popleft()

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        self.last_error, self.last_error_at = text, time.time()


class Ingest:
    def __init__(
        self,
        wal: WriteAheadLog,
        ledger: Ledger,
        publish: Callable[[bytes, bytes, Position], None],
        on_durable: Callable[[Position], None],
        max_frame_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.wal = wal
        self.ledger = ledger
        self.stats = IngestStats()
        self._publish = publish
        self._on_durable = on_durable
        self._max_frame_bytes = max_frame_bytes
        self._accepted: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self.full: Callable[[], bool] = lambda: False
        # runs whose run_start is in the WAL -> that start's time
        self._started = {run_id: run.get("started") for run_id, run in ledger.runs.items()}

    def start(self) -> None:
        self.wal.start_writer(self._from_writer)

    def receive(self, frame: bytes, reply: Reply | None, from_spool: bool = False) -> bool:
        """Take one frame; False only when it was turned away for now (the WAL is full)."""
        if PEEK_BYTES < len(frame) <= self._max_frame_bytes:
            sender = peek_sender(frame)
            if sender is not None and sender[1] <= self._high(sender[0]):
                return self._duplicate(sender[0], sender[1], reply)  # body left undecoded
        try:
            message = decode(frame, self._max_frame_bytes)
        except ProtocolError as exc:
            self._refuse(exc, reply)
            return True
        return self._take(message, frame, reply, from_spool)

    def receive_own(self, message: dict[str, Any], reply: Reply | None) -> bool:
        """A message the daemon built itself (the system sampler's): valid as built, so it is
        not decoded and checked again as a client's frame is; the rest is the same."""
        return self._take(message, encode(message), reply, from_spool=False)

    def _take(
        self, message: dict[str, Any], frame: bytes, reply: Reply | None, from_spool: bool
    ) -> bool:
        session, seq = message["s"], message["q"]
        high = self._high(session)
        if seq <= high:
            return self._duplicate(session, seq, reply)
        if self.full():
            self.stats.blocked += 1  # not acked: the client keeps it and sends it again later
            return False
        if seq > high + 1 and not from_spool:
            self.stats.gaps += 1
            if reply is not None:
                reply(_ack(self.ledger.sessions.get(session, 0), gap=True))
            return True
        self._accepted[session] = seq
        resolved = self.ledger.resolve(message)
        if resolved is not message:  # a resume resolved here: stored under the resumed run
            message, frame = resolved, encode(resolved)
        if message["t"] == "run_start":
            body, run_id = message["b"], message["r"]
            # A joining rank, or the same start told twice (a forked child announces its
            # parent's start, which may come first or second): the run has one start, so a
            # sink never sees a second one in the middle of the run.
            if run_id in self._started and (
                body.get("join") or body["started"] == self._started[run_id]
            ):
                rank = {k: body[k] for k in ("host", "pid") if k in body}
                message = {**message, "t": "joined", "b": {"values": {}, **rank}}
                frame = encode(message)
            else:
                self._started[run_id] = body["started"]
        elif message["t"] == "tags":
            self._count_ignored(message["b"]["values"])
        self.wal.append(frame, _Accepted.of(frame, message, reply))
        return True

    def _count_ignored(self, tags: dict[str, str]) -> None:
        """A drop-in shim marks each no-op it accepted (`wandb.watch`...) once per run with a
        tag `trackd.ignored.CALL`; `trackd status` shows how many runs made each call."""
        for key in tags:
            if key.startswith(IGNORED_TAG):
                self.stats.ignored_calls[key.removeprefix(IGNORED_TAG)] += 1

    def _duplicate(self, session: str, seq: int, reply: Reply | None) -> bool:
        """Stored already (or on its way to the WAL): ack again once durable, store nothing."""
        self.stats.duplicates += 1
        if reply is not None and seq <= self.ledger.sessions.get(session, 0):
            reply(_ack(self.ledger.sessions[session]))
        return True

    def _high(self, session: str) -> int:
        accepted = self._accepted.get(session)
        return accepted if accepted is not None else self.ledger.sessions.get(session, 0)

    def _refuse(self, exc: ProtocolError, reply: Reply | None) -> None:
        text = str(exc)
        kind = (
            "oversized"
            if "cap" in text and text.startswith("frame:")
            else ("malformed" if text.startswith("frame:") else "invalid")
        )
        self.stats.error(kind, text)
        seq = None
        if exc.sender is not None:
            session, seq = exc.sender
            if seq == self._high(session) + 1:
                self._accepted[session] = seq
                record = {
                    "v": VERSION,
                    "s": session,
                    "q": seq,
                    "t": "reject",
                    "r": "",
                    "b": {"error": text},
                }
                frame = encode(record)
                self.wal.append(frame, _Accepted.of(frame, record, reply))
        if reply is not None:
            reply(encode({"t": "error", "q": seq, "error": text}))

    def refuse_multipart(self, parts: int, reply: Reply) -> None:
        text = f"frame: expected one frame per message, got {parts}"
        self.stats.error("multipart", text)
        reply(encode({"t": "error", "q": None, "error": text}))

    async def barrier(self) -> None:
        """Wait until everything appended so far is durable."""
        done: asyncio.Future[None] = self._loop.create_future()
        self.wal.append(None, done)
        await done

    # --- after a commit (the writer thread hands over to the event loop) -------------

    def _from_writer(
        self, committed: list[tuple[object, Position]], end: Position, seq: int
    ) -> None:
        self._loop.call_soon_threadsafe(self._committed, committed, end, seq)

    def _committed(self, committed: list[tuple[object, Position]], end: Position, seq: int) -> None:
        """Apply a commit to the ledger, then publish its end to readers, then ack.

        Sinks read up to `ledger.position`, never up to the WAL's durable end: set only
        here, after the ledger has applied every record before it, it guarantees that a
        sink never meets a record of a run the ledger does not know yet (issue 12).
        """
        now = time.time()
        replies: dict[str, Reply | None] = {}
        ledger, stats = self.ledger, self.stats
        for token, position in committed:
            if isinstance(token, _Accepted):
                message = token.message
                ledger.apply(message)
                replies.setdefault(message["s"], None)
                stats.messages += 1
                stats.bytes += len(token.frame)
                if message["t"] == "metrics":
                    ledger.count_rows(message["r"], token.rows, token.last_step)
                    stats.count_rows(now, token.rows)
                if token.reply is not None:
                    replies[message["s"]] = token.reply
                if message["t"] not in INTERNAL_TYPES:
                    self._publish(ledger.topic(message["r"]), token.frame, position)
            elif isinstance(token, asyncio.Future) and not token.done():
                token.set_result(None)
        ledger.publish(end, seq)
        for session, reply in replies.items():
            if reply is not None:
                reply(_ack(ledger.sessions[session]))
            if self._accepted.get(session, 0) <= ledger.sessions[session]:
                self._accepted.pop(session, None)
        self._on_durable(end)


def peek_sender(frame: bytes) -> tuple[str, int] | None:
    """(session, seq) read from the envelope's first fields, before its body is decoded.

    Clients write `v, s, q` first, so a re-sent message of thousands of rows is known
    for a duplicate at the cost of three small fields; anything unusual returns None and
    goes through the full decode.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame) or 1)
    try:
        unpacker.feed(frame)
        fields = unpacker.read_map_header()
        found: dict[str, object] = {}
        for _ in range(min(fields, 3)):
            key = unpacker.unpack()
            found[key] = unpacker.unpack()
    except Exception:  # not ours to judge here: decode() names what is wrong
        return None
    session, seq = found.get("s"), found.get("q")
    if type(session) is str and type(seq) is int and found.get("v") == VERSION:
        return session, seq
    return None


def _ack(high: int, gap: bool = False) -> bytes:
    return encode({"t": "ack", "q": high, "gap": True} if gap else {"t": "ack", "q": high})
