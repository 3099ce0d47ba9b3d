"""`trackd serve`: wiring the WAL, ingest, fan-out, control and spool pick-up together.

Shutdown follows arq's order: on SIGTERM stop accepting (the ingest socket
stops being read), commit and ack what was already accepted, let every sink
drain for up to `drain_timeout`, save the ledger and cursors, close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import zmq
import zmq.asyncio

from trackd import paths
from trackd.daemon.batcher import Batcher
from trackd.daemon.control import Control
from trackd.daemon.delivery import Backoff, Delivery
from trackd.daemon.fanout import Fanout, SinkWorker
from trackd.daemon.ingest import Ingest
from trackd.daemon.ledger import Ledger
from trackd.daemon.notify import Notifier
from trackd.daemon.retention import Retention
from trackd.daemon.sampler import NodeSampler
from trackd.daemon.settings import Settings
from trackd.daemon.spools import pick_up
from trackd.daemon.state import StateDamage
from trackd.daemon.system import SystemMetrics
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import MAX_FRAME_BYTES, ProtocolError, decode

log = logging.getLogger("trackd")
T = TypeVar("T")
LEDGER_SAVE_SECONDS = 5.0
YIELD_EVERY = 64


class StartupError(RuntimeError):
    """The daemon cannot start; the text says why in one line."""


def prepare_runtime_dir(path: Path) -> None:
    """The socket directory, 0700: created so, or made so when it is ours and others may only
    read it (a `/tmp/trackd-$UID` made by hand). One that another user owns, or that group
    or others may write (and so may have put sockets in), is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        raise StartupError(f"runtime dir {path} belongs to another user (uid {info.st_uid})")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(
            f"runtime dir {path} is writable by group or others (mode {mode:o}); make it 0700"
        )
    if mode & 0o077:
        path.chmod(0o700)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another trackd daemon is already using {path.parent}") from None
    return fd


def recover_ledger(wal: WriteAheadLog, path: Path, damage: StateDamage) -> Ledger:
    """The checkpointed ledger, brought up to the WAL's durable end.

    An unreadable checkpoint is rebuilt from every record the WAL still holds; sessions
    and runs known only from deleted segments are lost (counted in `damage`).
    """
    try:
        ledger = Ledger.load(path)
    except ValueError as exc:
        damage.note(f"{exc}; the ledger is rebuilt from the WAL's {len(wal.segments())} segments")
        ledger = Ledger()
    for position, payload in wal.scan(max(ledger.position, wal.start)):
        try:
            ledger.apply(decode(payload, max_bytes=2**32))
        except ProtocolError:
            log.warning("wal: skipped an unreadable record ending at %s", position)
    ledger.publish(wal.durable_end, wal.durable_seq)
    return ledger


def _curve_keys(settings: Settings) -> tuple[bytes, bytes] | None:
    """The daemon's CURVE keypair; required for a tcp:// endpoint beyond loopback."""
    if settings.curve_secret_key_file is None:
        host = settings.endpoints.ingest.removeprefix("tcp://").rpartition(":")[0]
        if settings.endpoint and not _is_loopback(host):
            raise StartupError(
                f"refusing to listen on {settings.endpoint} without encryption: "
                "run `trackd keys generate` and set curve_secret_key_file"
            )
        return None
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(settings.curve_secret_key_file))
    except (OSError, ValueError) as exc:
        raise StartupError(f"curve_secret_key_file: cannot load: {exc}") from exc
    if secret is None:
        raise StartupError(
            f"curve_secret_key_file: {settings.curve_secret_key_file} has no secret key"
        )
    return public, secret


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(settings: Settings) -> int:
    curve = _curve_keys(settings)
    data = settings.data_dir
    # 0700, and state files 0600: the WAL, spools and sink state hold every run's config and
    # metrics. A sink directory the user chose elsewhere keeps the user's umask.
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.endpoint is None:
        prepare_runtime_dir(settings.runtime_dir)
    locks = [_lock(data / "daemon.lock")]
    if settings.endpoint is None:
        locks.append(_lock(settings.runtime_dir / "daemon.lock"))

    wal = WriteAheadLog(data / "wal", settings.wal_segment_bytes)
    ledger_path = data / "ledger.msgpack"
    damage = StateDamage()
    ledger = recover_ledger(wal, ledger_path, damage)
    specs = settings.sinks or [settings.default_sink]
    backoff = Backoff(settings.retry_base, settings.retry_cap)
    workers = [
        SinkWorker(
            Delivery(spec, spec.build(), data / "deadletter" / f"{spec.name}.jsonl", backoff),
            Batcher(wal, ledger),
            state_dir=data / "sinks" / spec.name,
            linger=settings.linger,
            checkpoint_seconds=settings.checkpoint_seconds,
            damage=damage,
        )
        for spec in specs
    ]
    fanout = Fanout(workers)

    context = zmq.asyncio.Context()
    endpoints = settings.endpoints
    ingest_socket = context.socket(zmq.ROUTER)
    ingest_socket.setsockopt(zmq.MAXMSGSIZE, 4 * max(settings.max_frame_bytes, MAX_FRAME_BYTES))
    ingest_socket.setsockopt(zmq.RCVHWM, 10_000)
    stream_socket = context.socket(zmq.PUB)
    control_socket = context.socket(zmq.ROUTER)
    for socket in (ingest_socket, stream_socket, control_socket):
        socket.setsockopt(zmq.LINGER, 0)
        if paths.uses_ipv6(endpoints.ingest):  # all three are on the same host
            socket.setsockopt(zmq.IPV6, 1)
        if curve is not None:
            socket.setsockopt(zmq.CURVE_SERVER, 1)
            socket.setsockopt(zmq.CURVE_PUBLICKEY, curve[0])
            socket.setsockopt(zmq.CURVE_SECRETKEY, curve[1])
    try:
        ingest_socket.bind(endpoints.ingest)
        stream_socket.bind(endpoints.stream)
        control_socket.bind(endpoints.control)
    except zmq.ZMQError as exc:
        context.destroy(linger=0)
        raise StartupError(f"cannot bind {endpoints.ingest}: {exc}") from exc
    # The stream socket is only ever written, so a plain shadow of it is safe. Replies on the
    # ingest socket must go through its asyncio wrapper: a send on a shadow can consume the
    # edge-triggered readiness the wrapper waits on, and the receive loop would then hang.
    stream: zmq.Socket[bytes] = zmq.Socket.shadow(stream_socket.underlying)

    def publish(topic: bytes, frame: bytes, position: Position) -> None:
        """Each message with its WAL position, so `tail --since-start` can join seamlessly."""
        with contextlib.suppress(zmq.Again):
            stream.send_multipart([topic, frame, msgpack.packb(position)], zmq.NOBLOCK)

    ingest = Ingest(wal, ledger, publish, fanout.wake, settings.max_frame_bytes)
    loop = asyncio.get_running_loop()
    retention = Retention(
        wal,
        fanout,
        lambda: Ledger.save(on_loop(ledger.snapshot, loop), ledger_path),
        settings.retain,
        settings.max_wal_bytes,
        settings.on_full,
    )
    ingest.full = lambda: retention.blocked
    ingest.start()
    fanout.start()
    stop = asyncio.Event()
    system = _system_metrics(settings, ingest)
    spools = SpoolPickUp(data / "spool", ingest)
    control = Control(
        settings,
        ingest,
        fanout,
        retention,
        stop.set,
        system=system.status if system else None,
        damage=damage,
        pick_up_spools=spools.once,
    )
    if settings.metrics_addr:
        from trackd.daemon import metrics

        try:
            metrics.serve(settings.metrics_addr, lambda: on_loop(control.status, loop))
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {settings.metrics_addr}: {exc}") from exc
    # In a thread of a test process (trackd.testing.LocalDaemon), signals and the collector
    # are the process's own: it is stopped through the control socket instead.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _tune_gc()
    notifier = Notifier()
    sampling = [asyncio.create_task(system.run())] if system else []
    tasks = [
        asyncio.create_task(_receive(ingest_socket, ingest)),
        asyncio.create_task(control.serve(control_socket)),
        asyncio.create_task(_pick_up_spools_every(spools, settings.spool_scan_seconds)),
        asyncio.create_task(_save_ledger(ledger, ledger_path)),
        asyncio.create_task(_tell_systemd(notifier, ingest, fanout)),
        asyncio.create_task(retention.run()),
        *sampling,
    ]
    log.info(
        "trackd serving on %s; WAL at %s; sinks: %s",
        endpoints.ingest,
        wal.directory,
        ", ".join(spec.shown for spec in specs),
    )
    await stop.wait()
    notifier.stopping()
    log.info(
        "trackd stopping: no longer accepting; draining sinks for up to %ss", settings.drain_timeout
    )
    for task in (tasks[0], *sampling):  # nothing new goes into the WAL from here on
        task.cancel()
    await asyncio.to_thread(wal.close)
    await asyncio.sleep(0)  # run the last commit's callback: its acks go out now
    await fanout.drain(ledger.position, settings.drain_timeout)
    for task in tasks[1:]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    Ledger.save(ledger.snapshot(), ledger_path)
    context.destroy(linger=0)
    notifier.close()
    for fd in locks:
        os.close(fd)
    log.info("trackd stopped")
    return 0


def _system_metrics(settings: Settings, ingest: Ingest) -> SystemMetrics | None:
    """The node sampler, unless `system_interval` is 0; its samples go in as messages do."""
    if not settings.system_interval:
        return None
    sampler = NodeSampler(settings.data_dir)
    return SystemMetrics(
        settings.system_interval, sampler, lambda: ingest.ledger.runs, ingest.receive_own
    )


def _tune_gc() -> None:
    """Collect cycles far less often than Python's default.

    Decoding one message of 5,000 rows allocates 10,000 lists and dicts; at the default
    threshold (700) that is 14 collections, and every tenth one walks older objects,
    including the rows of batches the sinks hold. Measured with 4 clients flooding
    (`benchmarks/throughput.py`): 2,745 collections costing 1.0 s of the daemon's 2.2 s
    of CPU; at 50,000, 35 collections and 0.23 s. Rows are freed by reference counting
    anyway: the collector is only there for the odd cycle (asyncio, exceptions). Objects
    from start-up live as long as the daemon, so `freeze` keeps them out of every walk.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


async def _receive(socket: zmq.asyncio.Socket, ingest: Ingest) -> None:
    received = 0
    while True:
        parts = await socket.recv_multipart(copy=True)
        received += 1
        if received % YIELD_EVERY == 0:
            # a receive that finds messages waiting does not yield: without this, a flood
            # would starve the commits, acks and control answers the clients are waiting on
            await asyncio.sleep(0)
        identity = parts[0]

        def reply(payload: bytes, identity: bytes = identity) -> None:
            sent = asyncio.ensure_future(socket.send_multipart([identity, payload]))
            sent.add_done_callback(_ignore_outcome)

        try:
            if len(parts) != 2:
                ingest.refuse_multipart(len(parts) - 1, reply)
            else:
                ingest.receive(parts[1], reply)
        except Exception as exc:  # a bug must cost one message, never the ingest loop
            log.exception("ingest: failed on a message")
            ingest.stats.error("internal", f"internal: {type(exc).__name__}: {exc}")


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """A reply to a client that has gone away is not an error: it will resend."""
    if not future.cancelled():
        future.exception()


class SpoolPickUp:
    """Spool pick-ups, one at a time: the periodic scan and a `flush` request (which takes
    the spools of finished clients first, so that it waits for them too) never interleave."""

    def __init__(self, directory: Path, ingest: Ingest) -> None:
        self.directory = directory
        self.ingest = ingest
        self._lock = asyncio.Lock()

    async def once(self) -> int:
        async with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            taken = await pick_up(self.directory, self.ingest)
        if taken:
            log.info("picked up %d client spool(s)", taken)
        return taken


async def _pick_up_spools_every(spools: SpoolPickUp, every: float) -> None:
    while True:
        await spools.once()
        await asyncio.sleep(every)


def _health(ingest: Ingest, fanout: Fanout) -> str:
    """One line for systemd's STATUS=: the ingest rate and the sink furthest behind."""
    line = f"{ingest.stats.rate(time.time()):.0f} rows/s"
    if fanout.workers:
        worst = max(fanout.workers, key=lambda worker: worker.status()["lag_bytes"]).status()
        lag = f"{worst['lag_bytes']} B, {worst['lag_seconds']:.0f}s"
        line += f"; worst sink lag {lag} ({worst['spec']})"
    return line


async def _tell_systemd(notifier: Notifier, ingest: Ingest, fanout: Fanout) -> None:
    """READY=1 now (sockets bound, WAL recovered), then WATCHDOG=1 at half the interval."""
    if not notifier.enabled:
        return
    notifier.ready(_health(ingest, fanout))
    interval = notifier.watchdog_seconds / 2 if notifier.watchdog_seconds else 10.0
    while True:
        await asyncio.sleep(interval)
        if notifier.watchdog_seconds:
            notifier.watchdog(_health(ingest, fanout))
        else:
            notifier.send(f"STATUS={_health(ingest, fanout)}")


def on_loop(read: Callable[[], T], loop: asyncio.AbstractEventLoop) -> T:
    """`read()` run by the event loop for another thread (retention's ledger snapshot, the
    Prometheus thread's status), which waits for the result.

    The loop owns the ledger and the stats: only there is the ledger consistent with its
    position, and its run table is not changing size under an iteration.
    """

    async def call() -> T:
        return read()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=60)


async def _save_ledger(ledger: Ledger, path: Path) -> None:
    while True:
        await asyncio.sleep(LEDGER_SAVE_SECONDS)
        await asyncio.to_thread(Ledger.save, ledger.snapshot(), path)
