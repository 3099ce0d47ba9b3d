"""The `Run` a training script logs to."""

from __future__ import annotations

import os
import threading
import time

from trackd import paths
from trackd.client.artifacts import store_artifact, store_bytes
from trackd.client.transport import MediaMessage, Message, Transport
from trackd.client.values import WithMedia, json_tree, metric_row, scalar, string_map
from trackd.protocol import ALERT_LEVELS

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs `import trackd` ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any, Final, Literal

    from trackd.client.console import ConsoleCapture

    Mode = Literal["online", "offline", "disabled"]
MODES = ("online", "offline", "disabled")
RESUME_QUERY_SECONDS = 2.0
RANKS = ("zero", "all")
RESUME = (None, "never", "allow", "must")
CONSOLE = ("wrap", "off")
_STEP_MIN: Final = -(2**63)
_STEP_END: Final = 2**63


class Run:
    """One training run. `log()` costs microseconds and never waits on the daemon or a sink."""

    def __init__(
        self,
        project: str,
        name: str | None = None,
        group: str | None = None,
        config: dict[str, Any] | None = None,
        tags: dict[str, str] | list[str] | None = None,
        resume: str | None = None,
        mode: Mode = "online",
        endpoint: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        ranks: str = "zero",
        console: str = "wrap",
        save_code: bool = True,
        *,
        run_id: str | None = None,
    ) -> None:
        """`run_id` names the run outright (the drop-in shims pass W&B's `id=` and MLflow's
        `start_run(run_id=...)`); by default it is derived from the name or random."""
        if not isinstance(project, str) or not project:
            raise TypeError(f"init(): project must be a non-empty string, got {project!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"init(): name must be a non-empty string or None, got {name!r}")
        if group is not None and not isinstance(group, str):
            raise TypeError(f"init(): group must be a string or None, got {group!r}")
        if mode not in MODES:
            raise ValueError(f"init(): mode must be one of {MODES}, got {mode!r}")
        if resume not in RESUME:
            raise ValueError(f"init(): resume must be one of {RESUME}, got {resume!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id.isprintable()):
            raise TypeError(f"init(): run_id must be a printable string, got {run_id!r}")
        if resume == "never" or (resume == "allow" and name is None and run_id is None):
            resume = None  # no name, nothing to continue: "allow" starts a run, as trackio does
        if resume is not None and name is None and run_id is None:
            raise ValueError("init(): resume='must' needs a name: a run is resumed by its name")
        if ranks not in RANKS:
            raise ValueError(f"init(): ranks must be one of {RANKS}, got {ranks!r}")
        _check_console_options(console, save_code)
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        job = _distributed_job() if rank is not None and (world or 0) > 1 else None
        self.project = project
        self.name = name or (
            f"job-{_digest(job)[:8]}" if job else time.strftime("run-%Y%m%d-%H%M%S")
        )
        self.group = group
        if run_id:
            self.id = run_id
        elif job is not None:  # every process of the job logs into one run
            self.id = _digest(f"trackd:{project}/{self.name}/{job}")
            if ranks == "zero" and rank != 0:
                mode = "disabled"
        else:
            self.id = os.urandom(16).hex()
        self._prefix = f"rank{rank}/" if job is not None and ranks == "all" else ""
        self._ends_run = job is None or rank == 0
        self.mode: Mode = mode
        self.config: dict[str, Any] = json_tree(config or {}, "init(): config")
        started = time.time()
        start_body = {
            "project": project,
            "name": self.name,
            "group": group,
            "resume": resume,
            "config": dict(self.config),  # log_config() updates self.config before this is sent
            "tags": string_map(tags or {}, "init(): tags"),
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "rank": rank,
            "local_rank": _env_int("LOCAL_RANK"),
            "world_size": world,
            "join": job is not None and rank != 0,
            "started": started,
        }
        self._owner_pid = os.getpid()
        self._step = 0
        if resume is not None and run_id and mode == "online":
            self._step = self._resume_by_id(resume, endpoint)  # the id says which run: no resolve
        elif resume is not None and job is None and mode != "disabled":
            start_body["resolve"] = not self._resume(resume, endpoint, mode)
        self._lock = threading.Lock()
        self._finished = mode == "disabled"
        self._on_finished: Callable[[Any], None] | None = None  # set by the registry
        self._transport: Transport | None = None
        self._console: ConsoleCapture | None = None
        diff = _record_code_state(start_body) if save_code and mode != "disabled" else b""
        # What the run keeps on this machine, its spool and its files (artifacts, media), goes
        # under `dir` when given: copying that folder then carries the whole run to `replay`.
        self._store_dir = os.fspath(dir) if dir else paths.data_dir()
        if mode != "disabled":
            self._endpoint = None if mode == "offline" else paths.endpoints(endpoint).ingest
            self._spool_dir = os.fspath(dir) if dir else paths.spool_dir(self._store_dir)
            self._transport = self._new_transport()
            self._transport.send("run_start", start_body)
            self._start_body = start_body
            if diff:
                self._send_diff(diff)
            if console == "wrap":
                self._start_console()
        self._enqueue = self._transport.queue_row if self._transport else None

    def _resume(self, resume: str, endpoint: str | None, mode: str) -> bool:
        """Continue the latest run of this project and name (trackio's rule), its id and
        its steps, as the daemon knows them; with resume="must", refuse when there is none.
        False when the daemon cannot be asked (offline, or unreachable): then the run_start
        says so (`resolve`) and the daemon resolves the resume when it stores the run, so a
        resume is one run whichever way its messages arrive (see Ledger.resolve)."""
        from trackd.client.control import DaemonUnreachable, request

        if mode == "offline":
            return False
        try:
            known = request(
                "latest",
                endpoint=endpoint,
                timeout=RESUME_QUERY_SECONDS,
                project=self.project,
                name=self.name,
            )
        except (DaemonUnreachable, RuntimeError, ValueError) as exc:
            import logging

            logging.getLogger("trackd").warning(
                "trackd: cannot ask the daemon about %s/%s to resume it (%s); "
                "the daemon will resume it when it receives the run",
                self.project,
                self.name,
                exc,
            )
            return False
        if known is None:
            if resume == "must":
                raise ValueError(
                    f"init(): resume='must' but the daemon knows no run {self.project}/{self.name}"
                )
            return True
        self.id = str(known["id"])
        last = known.get("last_step")
        self._step = 0 if last is None else int(last) + 1
        return True

    def _send_diff(self, diff: bytes) -> None:
        """The uncommitted changes against HEAD, as the run's artifact `diff.patch`."""
        stored, digest, size = store_bytes(diff, self._store_dir)
        self._send(
            "artifact", {"path": stored, "name": "diff.patch", "sha256": digest, "size": size}
        )

    def _start_console(self) -> None:
        from trackd.client.console import ConsoleCapture

        transport = self._transport
        self._console = ConsoleCapture(None if transport is None else transport.wake)
        self._console.install()
        if transport is not None:
            transport.console = self._console

    def _drain_console(self, final: bool = False) -> None:
        """Queue the console lines written so far (all of them at the end, partial ones too),
        so that they come before whatever is queued next (a flush, the run's end)."""
        console, transport = self._console, self._transport
        if console is None or transport is None:
            return
        if final:
            console.uninstall()
            transport.console = None
        console.deliver(transport.send, final=final)

    def _resume_by_id(self, resume: str, endpoint: str | None) -> int:
        """The step after the last of the run with this id (a shim's W&B `id=` or MLflow
        `run_id=`); with resume="must", refuse an id the daemon does not know. A daemon that
        cannot be asked leaves the steps to the caller (the shims keep the last step)."""
        from trackd.client.control import DaemonUnreachable, request

        try:
            known = request("run", endpoint=endpoint, timeout=RESUME_QUERY_SECONDS, id=self.id)
        except (DaemonUnreachable, RuntimeError, ValueError):
            return 0
        if known is None:
            if resume == "must":
                raise ValueError(f"init(): resume='must' but the daemon knows no run {self.id}")
            return 0
        last = known.get("last_step")
        return 0 if last is None else int(last) + 1

    def _new_transport(self) -> Transport:
        return Transport(
            run_id=self.id,
            session=os.urandom(16).hex(),
            endpoint=self._endpoint,
            spool_dir=self._spool_dir,
        )

    # --- logging -----------------------------------------------------------------

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Queue one row; `step` auto-increments when omitted. Nested dicts flatten with "/".

        A row with its step given takes no lock, so a `log()` that races `finish()` on
        another thread may queue its row after the run's end: the sinks then get it after
        `run_end`, or, once the delivery thread has stopped, never."""
        enqueue = self._enqueue
        if enqueue is None:
            return
        try:
            row = metric_row(values, self._prefix)
        except WithMedia as found:
            self._log_media(found, step)
            return
        if step is None:
            # The run counts the step: under the lock, so that the steps of threads logging
            # at once are queued in order (W&B drops a row whose step is below its last).
            with self._lock:
                if self._enqueue is not None:  # not finished since
                    step = self._step
                    self._step = step + 1
                    self._enqueue(step, time.time(), row)
            return
        if type(step) is not int or not _STEP_MIN <= step < _STEP_END:
            step = _step(step)
        self._step = step + 1
        enqueue(step, time.time(), row)  # no lock: see `transport` on what crosses threads

    def _log_media(self, found: WithMedia, step: int | None) -> None:
        """The slow path of a row with media: queue the row's numbers and one `media`
        message per object under the same step, in that order.

        A file the user named (a video) is stored here, since it may be deleted once this
        returns; encoded bytes are stored by the delivery thread (`MediaMessage`), as the
        store fsyncs, and the file need only be durable before its message is sent."""
        messages = []
        for key, item in found.media:
            body: dict[str, Any] = {"key": key, "kind": item.kind, "caption": item.caption}
            body.update(item.meta())
            if item.inline:
                messages.append(Message("media", body))
                continue
            body["format"] = item.format
            if item.source is None:
                messages.append(MediaMessage(body, item, self._store_dir))
                continue
            stored, digest, size = store_artifact(item.source, self._store_dir)
            body.update(path=stored, sha256=digest, size=size)
            messages.append(Message("media", body))
        transport = self._transport
        with self._lock:
            enqueue = self._enqueue
            if enqueue is None or transport is None:
                return
            step = self._step if step is None else _step(step)
            self._step = step + 1
            ts = time.time()
            if found.row:
                enqueue(step, ts, found.row)
            for message in messages:
                message.body.update(step=step, ts=ts)
                transport.put(message)

    def log_config(self, values: dict[str, Any]) -> None:
        """Merge into the run's config (params in MLflow, config in W&B)."""
        tree = json_tree(_mapping(values, "log_config()"), "log_config()")
        self.config.update(tree)
        self._send("config", {"values": tree})

    def set_tags(self, values: dict[str, str] | list[str]) -> None:
        self._send("tags", {"values": string_map(values, "set_tags()")})

    def set_summary(self, values: dict[str, Any]) -> None:
        """Override the summary (by default each metric's last value)."""
        self._send(
            "summary", {"values": json_tree(_mapping(values, "set_summary()"), "set_summary()")}
        )

    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Store a file with the run; the original may be deleted as soon as this returns.

        The file goes into trackd's content-addressed store (DATA_DIR/artifacts, or the
        run's `dir`/artifacts) here, in the caller's thread, because only that makes it safe
        the moment the call returns: a hard link where the store is on the same filesystem,
        else a streamed copy. This call therefore takes time in proportion to the file
        (hashing it, and copying it across filesystems), unlike `log()`. A hard-linked file
        changed *in place* later changes the stored artifact too; deleting or replacing it
        (as checkpoints are) is safe.
        """
        if self._transport is None or self._finished:
            return
        source = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(source):
            raise ValueError(f"log_artifact(): {source!r} is not a file")
        stored, digest, size = store_artifact(source, self._store_dir)
        body = {"path": stored, "name": name or os.path.basename(source), "sha256": digest}
        self._send("artifact", {**body, "size": size})

    def alert(self, title: str, text: str = "", level: object = "INFO") -> None:
        """Record an alert on the run (W&B's and trackio's call): `trackd tail` shows it,
        `trackd status` lists it, and sinks whose backend has alerts pass it on.
        `level` is INFO, WARN or ERROR, in any case, or W&B's / trackio's AlertLevel."""
        if not isinstance(title, str) or not title:
            raise TypeError(f"alert(): title must be a non-empty string, got {title!r}")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise TypeError(f"alert(): text must be a string, got {type(text).__name__}")
        self._send(
            "alert", {"ts": time.time(), "title": title, "text": text, "level": _level(level)}
        )

    def _send(self, type_: str, body: dict[str, Any]) -> None:
        if self._transport is not None and not self._finished:
            self._transport.send(type_, body)

    # --- delivery ----------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """True once the daemon has durably stored everything logged before this call."""
        if self._transport is None:
            return True
        self._drain_console()
        return self._transport.flush(timeout)

    def finish(self, status: str | None = None, timeout: float = 10.0) -> None:
        """End the run; wait at most `timeout` for acks and leave the rest in the spool."""
        self._finish(status or "finished", None, timeout)

    def _finish(self, status: str, error: str | None, timeout: float) -> None:
        if status not in ("finished", "failed"):
            raise ValueError(f"finish(): status must be 'finished' or 'failed', got {status!r}")
        with self._lock:
            finished, self._finished = self._finished, True
            self._enqueue = None
        transport = self._transport
        if not finished and transport is not None:  # a disabled run starts finished
            self._drain_console(final=True)
            if os.getpid() == self._owner_pid and self._ends_run:
                transport.send("run_end", {"status": status, "error": error, "ended": time.time()})
            transport.close(timeout)
        if self._on_finished is not None:
            self._on_finished(self)

    def _after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker) logs to the same run through its own session."""
        self._lock = threading.Lock()
        if self._transport is None or self._finished:
            return
        self._transport.abandon()
        self._transport = self._new_transport()
        if not self._start_body.get("resolve"):
            # The parent's run_start may still be queued in the parent, and this session's rows
            # could reach the daemon first and land in a placeholder run: announce the run as
            # a joining rank does, with the parent's own start (its pid: the system sampler
            # measures this process as the parent's child). The daemon keeps whichever start
            # comes first and turns a later join into a `joined` record.
            body = {**self._start_body, "config": dict(self.config), "join": True}
            self._transport.send("run_start", body)
        self._enqueue = self._transport.queue_row
        if self._console is not None:
            self._console.after_fork()
            self._transport.console = self._console

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None or (exc_type is SystemExit and getattr(exc, "code", 1) in (None, 0)):
            self.finish()  # `sys.exit()` or `sys.exit(0)` in the block is a clean end
        else:
            import traceback

            self._finish("failed", "".join(traceback.format_exception(exc_type, exc, tb)), 10.0)

    def __repr__(self) -> str:
        return f"<trackd.Run {self.project}/{self.name} id={self.id[:8]} mode={self.mode}>"


def _digest(text: str) -> str:
    """A run id from a name: the same project, name and job always give the same id, so every
    rank of a distributed job logs into one run without asking anyone."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _distributed_job() -> str:
    """What the processes of one launch share: torchrun's run id, else the rendezvous address."""
    explicit = os.environ.get("TORCHELASTIC_RUN_ID")
    if explicit and explicit != "none":
        return explicit
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _check_console_options(console: object, save_code: object) -> None:
    if console not in CONSOLE:
        raise ValueError(f"init(): console must be one of {CONSOLE}, got {console!r}")
    if not isinstance(save_code, bool):
        raise TypeError(f"init(): save_code must be a bool, got {type(save_code).__name__}")


def _record_code_state(start_body: dict[str, Any]) -> bytes:
    """Put `code` and `env` into the run_start body; return the diff against HEAD."""
    from trackd.client.codestate import environment, git_state

    code, diff = git_state()
    start_body["code"] = code
    start_body["env"] = environment()
    return diff


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else None


def _step(step: object) -> int:
    """A step the sinks can store: an int of 64 bits, signed (MLflow's, and what MessagePack
    packs), checked here so that a bad one fails its `log()`, not the delivery thread."""
    value = step if type(step) is int else scalar(step, "log(): step")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"log(): step must be an int, got {type(step).__name__}")
    if not _STEP_MIN <= value < _STEP_END:
        raise ValueError(f"log(): step must fit in a signed 64-bit int, got {value}")
    return value


def _level(level: object) -> str:
    """INFO, WARN or ERROR from a string in any case or an enum member (W&B's AlertLevel
    has the values "INFO"..., trackio's "info"...); WARNING is taken for WARN."""
    value = getattr(level, "value", level)
    name = value.upper() if isinstance(value, str) else None
    name = "WARN" if name == "WARNING" else name
    if name not in ALERT_LEVELS:
        raise ValueError(f"alert(): level must be one of {list(ALERT_LEVELS)}, got {level!r}")
    return name


def _mapping(values: object, what: str) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise TypeError(f"{what}: values must be a dict, got {type(values).__name__}")
    return values
