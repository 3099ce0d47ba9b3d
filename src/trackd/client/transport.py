"""Delivery of one run's messages to the daemon, off the caller's thread.

`log()` only queues its row, `(step, time, {name: number})`, in one of two
forms. While this thread keeps up (fewer than `CALLER_PACKS_AT` rows waiting
in `queue`), the row goes to `queue` as two items, its `(step, time)` stamp
and a copy of its dict, and this thread packs it with MessagePack, on the other
core while a training loop's next torch op runs without the GIL. The garbage
collector keeps neither: a dict of strings and numbers is never tracked, and a
tuple of two numbers is untracked by the first collection. A tuple holding the
dict would stay tracked, and in a flood such rows were promoted to the oldest
generation by the ten thousand and brought full collections, stalls of every
thread. Nor does the step go into the dict: an int key makes CPython rebuild
a dict's string-only key table, 5 of a 13 µs call after a torch step with 20
keys (`benchmarks/cold_call.py`). Past that, in a `log()` flood, the caller
packs the row itself into its open batch, and every `CHUNK_ROWS` rows joins
the batch into one `PackedRows` item of the queue. A flood never lets go of
the GIL, so this thread gets it only when the caller's switch interval (5 ms)
runs out, and the caller then waits for as long as this thread holds it (and,
on a busy machine, for as long as the OS takes to run it): so a flood's
wake-ups are few and each only moves a few dozen joined chunks, where packing
a flood's rows here held the GIL for a millisecond or more. A row holding a
CUDA value (`PendingRow`) always goes to `queue`, behind its stamp: it is
packed here, once the value has reached host memory.

What crosses threads, and how: `queue` is a list; appends are atomic under the
GIL, and only this thread takes items off its front. A row's stamp and dict
go in by one `list.extend`, atomic too, so nothing ever comes between them and
a caller that queues a row needs no lock (`queue_row`): a training loop's
`log()` pays for none (a lock taken and let go after a torch step costs ~3 µs,
a third of the call). This thread never takes a pass that ends on a stamp, so
each pass holds whole rows. The open batch is behind everything in `queue`, so
it is guarded by `lock`, the transport's own: the flooding caller adds to it
under that lock, and every other producer (`put`: messages and flushes; a CUDA
row) and this thread's wake-ups close it into `queue` first, under the lock,
so that no row is framed after something queued after it. The run's lock,
which orders the steps the run counts, may be held when `lock` is taken, never
the other way round. `_flooding` is set by a caller and cleared by this
thread, both under `lock`, and the batch is empty whenever it is clear: a
caller that finds it clear (without the lock) may extend `queue`
behind every row of its own thread before it (rows of two threads logging at
once have no order to keep but their own). Everything else here is this
thread's.

A background thread frames the queued rows as `metrics` messages, numbers them,
and sends them over a DEALER socket with NOBLOCK. It wakes rarely: each wake-up
takes the GIL from the training thread, which then waits for it when its next
torch op returns, so a quiet run is packed every `IDLE_SECONDS`, a stream every
`POLL_SECONDS`, a flood every `FLOOD_POLL_SECONDS`, and a flush, a close or a
console flood (`wake()`) wakes it at once through a pipe; acks are read at each
wake-up, and wake it only while a flush waits for them. At most `PASS_ITEMS`
items are framed a wake-up, the metrics message staying open across wake-ups
until it is full or the queue is empty. A media message's body and bytes cross
with it (`MediaMessage`): the caller lets go of them once queued, and this
thread stores the bytes before framing.

Nothing counts as delivered until the daemon acks it: every message stays
in `_unacked` until an ack covers its sequence number, and is sent again
(go-back-N) after a reconnect, a gap reported by the daemon, or a second
without progress. Unacked frames live in memory up to a byte budget;
past it they are spilled, oldest first, to the session's spool file, which
the daemon ingests if this process exits before they are acked.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque

import msgpack

from trackd.client.artifacts import store_bytes
from trackd.client.curve import prepare
from trackd.client.spool import Spool
from trackd.client.values import PendingRow
from trackd.protocol import MAX_FRAME_BYTES, VERSION, encode

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from typing import Any

    from trackd.client.console import ConsoleCapture
    from trackd.client.media import Media

POLL_SECONDS = 0.01  # between packs while rows stream in, flushes wait or frames wait to go
# Between packs while `log()` floods (packs its own rows): each wake-up in a flood costs the
# caller a GIL hand-off at its switch interval, and on a busy machine the OS's delay in
# running this thread (benchmarks/README.md, issue 13 §4), so they are few and take all.
FLOOD_POLL_SECONDS = 0.05
IDLE_SECONDS = 0.2  # between packs otherwise: a few wake-ups a second cost a training loop ~nothing
FLOOD_ROWS = 1000  # a pack of this many rows means a flood: pack again after POLL_SECONDS
# Items framed per wake-up at most: a backlog of rows this thread packs (~1-2 µs a row
# under the GIL) is framed over several wake-ups, each ended by a poll that lets go of it.
PASS_ITEMS = 2048
# Rows waiting past which `log()` packs its row itself (a flood), rather than this thread
# packing it in a Python loop that holds the GIL: a flood's first wake-up then meets at
# most this many rows to pack, and the later ones only joined chunks.
CALLER_PACKS_AT = 64
_CALLER_PACKS_AT_ITEMS = 2 * CALLER_PACKS_AT  # a row waits as two items: stamp, dict
CHUNK_ROWS = 64  # rows a flooding caller joins into one queued `PackedRows` (~2 µs, in C)
BACKLOG_PAUSE_SECONDS = 0.001  # between passes over a backlog: the caller's turn at the GIL
RESEND_AFTER_SECONDS = 1.0
RESEND_AFTER_MAX_SECONDS = 30.0
GAP_REWIND_SECONDS = 0.2
UNREACHABLE_SECONDS = 0.5
WINDOW_MESSAGES = 1024
# Bytes sent and not yet acked: enough to keep a daemon busy at full rate (acks come every
# few ms), small enough that four clients flooding do not pile 100s of MB into its queue.
WINDOW_BYTES = 1024 * 1024
MAX_ROWS_PER_MESSAGE = 20_000
_ENVELOPE_BYTES = 1024  # more than a metrics message's envelope (ids, numbers) takes
DEFAULT_MEMORY_BYTES = 32 * 1024 * 1024


class Message:
    """A non-metrics message waiting in the queue."""

    __slots__ = ("body", "type")

    def __init__(self, type_: str, body: dict[str, Any]) -> None:
        self.type = type_
        self.body = body


class MediaMessage(Message):
    """A `media` message whose object's bytes (a PNG, a GIF, a table's JSON) the delivery
    thread stores in DATA_DIR/artifacts, naming the file in the body, before framing it:
    an image's PNG is written then, here (`Image.data`)."""

    __slots__ = ("data_dir", "media")

    def __init__(self, body: dict[str, Any], media: Media, data_dir: str) -> None:
        super().__init__("media", body)
        self.media = media
        self.data_dir = data_dir


class PackedRows:
    """Rows packed and joined by a flooding `log()`: one queue item for up to `CHUNK_ROWS`."""

    __slots__ = ("data", "rows")

    def __init__(self, data: bytes, rows: int) -> None:
        self.data = data
        self.rows = rows


class FlushRequest:
    """Set once everything queued before it is durable (acked, or fsynced to the spool offline)."""

    __slots__ = ("delivered", "done", "give_up_unreachable", "target")

    def __init__(self, give_up_unreachable: bool = False) -> None:
        self.done = threading.Event()
        self.target = 0
        self.give_up_unreachable = give_up_unreachable
        self.delivered = False


if TYPE_CHECKING:
    # a tuple: a row's (step, time), always followed by its dict of values (or PendingRow)
    QueueItem = tuple[int, float] | dict[str, Any] | PackedRows | Message | FlushRequest


class _Entry:
    """An unacked message: its frame in memory, or its place in the spool."""

    __slots__ = ("frame", "length", "offset", "seq")

    def __init__(self, seq: int, frame: bytes) -> None:
        self.seq = seq
        self.frame: bytes | None = frame
        self.offset = 0
        self.length = len(frame)


class Transport:
    def __init__(
        self,
        *,
        run_id: str,
        session: str,
        endpoint: str | None,
        spool_dir: str,
        memory_bytes: int | None = None,
    ) -> None:
        self.run_id = run_id
        self.session = session
        self.endpoint = endpoint
        self.queue: list[QueueItem] = []
        # the callers' packer (under `lock`), bound once: `queue_row` is `log()`'s hot path
        self._pack_row = msgpack.Packer(use_bin_type=True).pack
        self.lock = threading.Lock()  # the open batch's (and the flooding flag's)
        self._batch: list[bytes] = []  # a flooding caller's packed rows, behind the queue
        self._flooding = False
        self._thread_pack = msgpack.Packer(use_bin_type=True).pack  # this thread's own
        self._queue_append = self.queue.append
        self._queue_extend = self.queue.extend
        self.errors: dict[str, int] = {}
        self._spool_dir = spool_dir
        self._memory_limit = memory_bytes or int(
            os.environ.get("TRACKD_CLIENT_MEMORY_BYTES", DEFAULT_MEMORY_BYTES)
        )
        self._spool: Spool | None = None
        self._unacked: deque[_Entry] = deque()
        self._memory = 0
        self._next_seq = 1
        self._acked = 0
        self._sent = 0
        self._in_flight = 0  # bytes of the messages in (acked, sent]
        self._progress_at = time.monotonic()
        self._resend_after = RESEND_AFTER_SECONDS
        self._rewound_at = 0.0
        self._unreachable_since: float | None = None
        self._flushes: list[FlushRequest] = []
        self._pack_at = 0.0  # monotonic time of the next pack; 0: at the next wake-up
        self._chunks: list[bytes] = []  # packed rows of the metrics message being built
        self._chunk_rows = 0
        self._chunk_bytes = 0
        self._stop = threading.Event()
        # Written by flush() and close() to wake the thread; a lock (not log()'s) so that a
        # flush racing close() never writes to a closed, maybe reused, descriptor.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._wake_lock = threading.Lock()
        self.console: ConsoleCapture | None = None  # set by a run with console="wrap"
        if endpoint:
            # Import zmq and make its context here, in the caller's thread: a fork (a
            # DataLoader worker) while the delivery thread is half-way through importing
            # it would leave the child a half-initialised module and a held import lock.
            import zmq

            self._context: Any = zmq.Context.instance()
        self._thread = threading.Thread(target=self._run, name=f"trackd-{run_id[:8]}", daemon=True)
        self._thread.start()

    # --- the caller's side -----------------------------------------------------

    def queue_row(self, step: int, ts: float, row: dict[str, Any]) -> None:
        """Queue a row, as its stamp and a copy of its dict or packed (see above); `row` may
        be the caller's own dict, never kept. `lock` is taken only for a flood's batch and
        for a CUDA row."""
        if type(row) is dict and not self._flooding and len(self.queue) < _CALLER_PACKS_AT_ITEMS:
            self._queue_extend(((step, ts), row.copy()))  # one extend: no lock needed
            return
        with self.lock:
            if type(row) is PendingRow:
                self._close_batch()
                self._queue_extend(((step, ts), row))
            else:  # a flood (had it just ended, this row only starts a batch the thread closes)
                self._flooding = True
                batch = self._batch
                batch.append(self._pack_row((step, ts, row)))
                if len(batch) >= CHUNK_ROWS:
                    self._close_batch()

    def put(self, item: Message | FlushRequest) -> None:
        """Queue anything but a plain row, behind every row queued before it."""
        with self.lock:
            self._close_batch()
            self._queue_append(item)

    def send(self, type_: str, body: dict[str, Any]) -> None:
        self.put(Message(type_, body))

    def _close_batch(self) -> None:
        """Move the open batch into the queue; under `lock`."""
        batch = self._batch
        if batch:
            self._queue_append(PackedRows(b"".join(batch), len(batch)))
            self._batch = []

    def flush(self, timeout: float | None, give_up_unreachable: bool = False) -> bool:
        if not self._thread.is_alive():
            return not self.queue and not self._unacked
        request = FlushRequest(give_up_unreachable=give_up_unreachable)
        self.put(request)
        self.wake()
        request.done.wait(timeout)
        return request.delivered

    def close(self, timeout: float | None) -> bool:
        """Wait up to `timeout` for acks (less if no daemon is there), spool the rest, stop."""
        delivered = self.flush(timeout, give_up_unreachable=True)
        self._stop.set()
        self.wake()
        self._thread.join()
        self._close_wake_pipe()
        return delivered

    def abandon(self) -> None:
        """In a forked child: the parent owns this session; drop it without touching its files."""
        if self._spool is not None:
            self._spool.detach()
        self.queue.clear()
        self._batch.clear()
        self._wake_lock = threading.Lock()  # a parent's thread may have held it at the fork
        self._close_wake_pipe()

    def wake(self) -> None:
        """Have the thread pack and send now, not at its next poll."""
        with self._wake_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"\0")
                except BlockingIOError:  # the pipe is full of wake-ups already: enough
                    return

    def _close_wake_pipe(self) -> None:
        with self._wake_lock:
            if self._wake_write >= 0:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1

    # --- the background thread -------------------------------------------------

    def _run(self) -> None:
        socket: Any = None
        try:
            while not self._stop.is_set():
                try:
                    if socket is None and self.endpoint:
                        socket = self._connect()
                    self._pass(socket)
                except Exception:  # never kill training: fall back to the spool, say so once
                    if self.endpoint is None:
                        raise
                    import logging

                    logging.getLogger("trackd").exception(
                        "trackd: cannot deliver to the daemon; spooling the run to %s",
                        self._spool_dir,
                    )
                    if socket is not None:
                        socket.close(linger=0)
                    socket, self.endpoint = None, None
        finally:
            self._pack_queue()
            self._spill()
            if self._spool is not None:
                self._spool.close()
            if socket is not None:
                socket.close(linger=0)
            self._settle_flushes()
            for request in self._flushes:
                request.done.set()

    def _pass(self, socket: Any) -> None:
        """One wake-up: read acks (or wait), pack the queue if due, send or spool, settle flushes.

        An ack alone does not make a pack due: packing what a few ms brought and sending
        it would bring the next ack, and the thread would wake at the daemon's pace."""
        self._wait(socket)
        now = time.monotonic()
        if now >= self._pack_at:
            self._queue_console()
            rows, taken = self._pack_queue(PASS_ITEMS)
            if rows < CALLER_PACKS_AT and self._flooding:
                with self.lock:  # the flood is over: the caller queues dicts again
                    self._close_batch()
                    self._flooding = False
            if self.queue and taken >= PASS_ITEMS:
                # More after a short sleep, not at once: a poll that returns at once takes
                # the GIL back before a waiting caller can, which then waits a switch interval.
                pause = BACKLOG_PAUSE_SECONDS
            elif self._flooding:
                pause = FLOOD_POLL_SECONDS
            else:
                pause = POLL_SECONDS if rows >= FLOOD_ROWS else IDLE_SECONDS
            self._pack_at = now + pause
        if socket is None:
            self._spill()
        else:
            self._send(socket)
        self._settle_flushes()

    def _wait(self, socket: Any) -> None:
        """Sleep until the next pack is due or a flush or close wakes us, then read acks.

        An ack wakes the thread only while a flush waits for it: every wake-up takes the
        GIL, which in a `log()` flood the caller hands over only at its switch interval,
        and then waits for; acks come a few ms apart, as often as the packs themselves."""
        timeout = max(0.0, self._pack_at - time.monotonic())
        if self._flushes or (socket is not None and self._sent < self._next_seq - 1):
            timeout = min(timeout, POLL_SECONDS)  # give-up, resend and send-again timers
        if socket is None or not self._flushes:
            woken = bool(select.select([self._wake_read], [], [], timeout)[0])
        else:
            ready = dict(self._poller.poll(int(-(-timeout * 1000 // 1))))  # ms, rounded up
            woken = bool(ready.get(self._wake_read))
        if socket is not None:
            self._read_acks(socket)
        if woken:
            os.read(self._wake_read, 4096)
            self._pack_at = 0.0

    def _connect(self) -> Any:
        import zmq  # imported here so that `import trackd` stays cheap

        socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        prepare(socket, str(self.endpoint))
        socket.connect(str(self.endpoint))
        self._poller = zmq.Poller()
        self._poller.register(socket, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)
        return socket

    def _queue_console(self) -> None:
        """Captured console lines join the queue as `console` messages, in the order written."""
        console = self.console
        if console is not None:
            console.deliver(self.send)

    def _pack_queue(self, limit: float = float("inf")) -> tuple[int, int]:
        """Frame queued rows and messages, in the order they were queued, until `limit`
        items are taken (the metrics message then stays open for the rest); the number of
        rows framed and of items taken."""
        framed = taken = 0
        queue = self.queue
        while taken < limit:
            if self._batch:  # only the caller fills it: empty now, anything later comes later
                with self.lock:
                    self._close_batch()
            end = int(min(PASS_ITEMS, limit - taken))
            if end < len(queue) and type(queue[end - 1]) is tuple:
                end += 1  # a row's stamp and its dict go in one pass
            items = queue[:end]
            if not items:
                break
            del queue[: len(items)]  # the callers only append: the front is this thread's
            taken += len(items)
            framed += self._frame_items(items)
        if not queue:
            self._end_metrics()
        return framed, taken

    def _frame_items(self, items: list[QueueItem]) -> int:
        """Frame items in order; the number of rows."""
        count = 0
        step, ts = 0, 0.0
        for item in items:
            if type(item) is tuple:
                step, ts = item  # a row's stamp: its dict is the next item
                continue
            if type(item) is dict or type(item) is PendingRow:
                values = self._resolved(item, step) if type(item) is PendingRow else item
                if values is not None:
                    self._add_rows(self._thread_pack((step, ts, values)), 1)
                    count += 1
                continue
            if type(item) is PackedRows:
                self._add_rows(item.data, item.rows)
                count += item.rows
                continue
            self._end_metrics()
            if isinstance(item, Message):
                if type(item) is not MediaMessage or self._store(item):
                    self._add(item.type, item.body)
            elif isinstance(item, FlushRequest):
                item.target = self._next_seq - 1
                self._flushes.append(item)
        return count

    def _resolved(self, row: PendingRow, step: int) -> dict[str, Any] | None:
        """A CUDA row's values, now on the host; None for a row whose values cannot be read
        (counted): it loses only itself."""
        try:
            return row.resolved()
        except (RuntimeError, TypeError, ValueError) as error:
            self._count(f"a row at step {step} was dropped: {error}")
            return None

    def _add_rows(self, data: bytes, rows: int) -> None:
        """Add `rows` packed rows to the metrics message being built; end it first if they
        would not fit. Rows that cannot fit in one frame together are added one by one."""
        if len(data) + _ENVELOPE_BYTES > MAX_FRAME_BYTES:
            unpacker = msgpack.Unpacker(max_buffer_size=len(data))
            unpacker.feed(data)
            if rows == 1:
                step = next(unpacker)[0]
                self._count(f"a row at step {step} is over the {MAX_FRAME_BYTES}-byte frame cap")
                return
            for row in unpacker:
                self._add_rows(self._thread_pack(row), 1)
            return
        if (
            self._chunk_rows + rows > MAX_ROWS_PER_MESSAGE
            or self._chunk_bytes + len(data) + _ENVELOPE_BYTES > MAX_FRAME_BYTES
        ):
            self._end_metrics()
        self._chunks.append(data)
        self._chunk_rows += rows
        self._chunk_bytes += len(data)

    def _end_metrics(self) -> None:
        """Frame the rows packed so far as one metrics message: its envelope with an empty
        row array (the envelope's last byte, as "rows" is the body's last key), then the
        array's real header and the packed rows after it."""
        if not self._chunks:
            return
        envelope = self._frame("metrics", {"rows": []})
        self._append(b"".join((envelope[:-1], _array_header(self._chunk_rows), *self._chunks)))
        self._chunks, self._chunk_rows, self._chunk_bytes = [], 0, 0

    def _store(self, message: MediaMessage) -> bool:
        """Store a media message's bytes; whether it may be sent (a file that cannot be
        stored is counted, and only its own message is lost)."""
        try:
            stored, digest, size = store_bytes(message.media.data, message.data_dir)
        except (OSError, ValueError) as error:  # ValueError: a picture Pillow cannot write
            body = message.body
            self._count(
                f"{body['kind']} {body['key']!r} at step {body['step']}: not stored, {error}"
            )
            return False
        message.body.update(path=stored, sha256=digest, size=size)
        return True

    def _add(self, type_: str, body: dict[str, Any]) -> None:
        frame = self._frame(type_, body)
        if len(frame) > MAX_FRAME_BYTES:
            self._count(f"a {type_} message is over the {MAX_FRAME_BYTES}-byte frame cap")
            return
        self._append(frame)

    def _frame(self, type_: str, body: dict[str, Any]) -> bytes:
        return encode(
            {
                "v": VERSION,
                "s": self.session,
                "q": self._next_seq,
                "t": type_,
                "r": self.run_id,
                "b": body,
            }
        )

    def _append(self, frame: bytes) -> None:
        self._unacked.append(_Entry(self._next_seq, frame))
        self._next_seq += 1
        self._memory += len(frame)
        if self._memory > self._memory_limit:
            self._spill()

    def _spill(self) -> None:
        """Move every in-memory unacked frame to the spool, keeping sequence order on disk."""
        pending = [entry for entry in self._unacked if entry.frame is not None]
        if not pending:
            return
        if self._spool is None:
            self._spool = Spool(self._spool_dir, self.session)
        offsets = self._spool.append([entry.frame for entry in pending if entry.frame is not None])
        for entry, offset in zip(pending, offsets, strict=True):
            entry.frame, entry.offset = None, offset
        self._memory = 0
        if self.endpoint is None:
            self._spool.sync()
            self._acked = self._next_seq - 1
            self._unacked.clear()

    def _send(self, socket: Any) -> None:
        import zmq

        now = time.monotonic()
        if self._sent > self._acked and now - self._progress_at > self._resend_after:
            # Go back and send again; wait twice as long before the next time, so that a
            # daemon slow to ack (not gone) is not buried under copies of what it has.
            self._sent, self._in_flight, self._progress_at = self._acked, 0, now
            self._resend_after = min(self._resend_after * 2, RESEND_AFTER_MAX_SECONDS)
        unacked = self._unacked
        while (
            self._sent - self._acked < WINDOW_MESSAGES
            and self._in_flight < WINDOW_BYTES
            and self._sent < self._next_seq - 1
        ):
            entry = unacked[self._sent - self._acked]
            frame = entry.frame
            if frame is None:
                assert self._spool is not None
                frame = self._spool.read(entry.offset, entry.length)
            try:
                socket.send(frame, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if self._sent == self._acked and self._unreachable_since is None:
                    self._unreachable_since = now
                return
            self._sent += 1
            self._in_flight += entry.length
            self._unreachable_since = None

    def _read_acks(self, socket: Any) -> None:
        import zmq

        while True:
            try:
                reply = msgpack.unpackb(socket.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            except ValueError:
                self._count("an unreadable reply from the daemon")
                continue
            if not isinstance(reply, dict):
                continue
            if reply.get("t") == "error":
                self._count(f"the daemon rejected a message: {reply.get('error')}")
            high = reply.get("q")
            if reply.get("t") == "ack" and isinstance(high, int):
                self._on_ack(high, gap=bool(reply.get("gap")))

    def _on_ack(self, high: int, gap: bool) -> None:
        now = time.monotonic()
        if high > self._acked:
            unacked = self._unacked
            while unacked and unacked[0].seq <= high:
                entry = unacked.popleft()
                if entry.seq <= self._sent:
                    self._in_flight -= entry.length
                if entry.frame is not None:
                    self._memory -= entry.length
            self._acked = min(high, self._next_seq - 1)
            self._sent = max(self._sent, self._acked)
            self._progress_at = now
            self._resend_after = RESEND_AFTER_SECONDS
            if self._spool and (not unacked or unacked[0].frame is not None):
                self._spool.clear()
        if gap and self._sent > high and now - self._rewound_at > GAP_REWIND_SECONDS:
            self._sent, self._in_flight, self._rewound_at = self._acked, 0, now

    def _settle_flushes(self) -> None:
        if not self._flushes:
            return
        now = time.monotonic()
        unreachable = (
            self._unreachable_since is not None
            and now - self._unreachable_since > UNREACHABLE_SECONDS
        )
        waiting = []
        for request in self._flushes:
            if request.target <= self._acked:
                request.delivered = True
                request.done.set()
            elif unreachable and request.give_up_unreachable:
                request.done.set()
            else:
                waiting.append(request)
        self._flushes = waiting

    def _count(self, problem: str) -> None:
        """Count a delivery problem; log its first occurrence only."""
        seen = self.errors.get(problem, 0)
        self.errors[problem] = seen + 1
        if not seen:
            import logging

            logging.getLogger("trackd").warning("trackd: %s", problem)


def _array_header(length: int) -> bytes:
    """MessagePack's header of an array of `length` items."""
    if length < 16:
        return bytes((0x90 | length,))
    if length < 0x10000:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")
