"""Aim sink: each trackd run is one Aim run, in a local repo or through an `aim server`.

Spec: ``aim:PATH`` (a local repo; created if missing) or ``aim:aim://HOST:PORT`` (a
remote tracking server), with ``?timeout=SECONDS`` (default 10) for how long a write
waits for the server to confirm it and ``?artifacts_uri=URI`` for where artifacts go. A
table takes ``repo = ...``.

How runs appear:

* experiment: the trackd project (DESIGN.md); run name: the trackd run name. The Aim
  run hash is kept in a RunMap, so a restart, a replay or a resumed trackd run
  continues the same Aim run (``Run(run_hash=...)``); Aim chooses hashes itself.
* config -> params ``hparams`` (Aim's convention), merged key by key, so a resumed
  run's init config does not drop what ``log_config()`` added; summary -> params
  ``summary``; tags -> Aim tags ``name:value`` (``name`` if the value is empty; a new
  value replaces the tag of the old one); run metadata and the end -> params
  ``trackd`` (run_id, project, group, host, pid, rank, started, status "running" /
  "finished" / "failed", error, ended), and the run is closed, which sets its end time.
* metrics -> one Aim metric per key, each row at its step with the client's time
  (through the SDK's tracker, ``run.track`` would stamp the delivery time instead).
  Values that are not numbers are skipped (a counted notice).
* artifact -> ``run.log_artifact(path, name=NAME)``, Aim's own call: the file is copied
  (streamed) to ``ARTIFACTS_URI/RUN_HASH/NAME`` and listed in ``run.artifacts``. Aim
  stores artifacts only for a run with an artifacts URI; a run that has none gets the
  ``artifacts_uri`` option, by default ``file://PATH/aim-artifacts`` beside a local repo
  (it moves with the repo, and is where `aim up` on that machine can read it), and
  ``file://STATE_DIR/artifacts`` (the sink's state directory) for a remote repo, since
  Aim copies artifacts from the logging process, never through its server. A run that
  has a URI (set by its first session, or by hand) keeps it. The file is not copied
  again when the run already lists the artifact under NAME from the same stored file
  (the store path names the content), so a re-sent record costs one lookup.
* media: images -> ``aim.Image`` sequences under their key at their step (overwritten in
  place when re-sent, as metrics are); tables -> ``aim.Text`` sequences holding the table
  as Markdown (the caption first), Aim having no table form and its text explorer
  showing text per step; videos have no Aim form (Aim has Image, Audio, Text,
  Distribution and Figure; an animated GIF as an ``aim.Image`` keeps its first frame
  only), so they are a counted notice; histograms -> ``aim.Distribution`` at their step.
* alerts -> the run's log records (``run.log_warning``'s sequence: Aim's Logs tab), at
  their level.
  System metrics, terminal capture and system params are off: the daemon is not the
  training process.

Exactly once with no checkpoint. Aim keeps a metric's values keyed by step (a hash
of it), so tracking the same key at the same step again overwrites the value in
place instead of adding a point; the sequence's count and last value move only for
a higher step. Params and tags are set, not appended. So every record re-sent after
a crash or a failed write lands on itself. What remains is knowing that a write is
stored before ``write()`` returns:

* local repo: ``track`` writes each row in one RocksDB write batch, which goes to
  RocksDB's own write-ahead log before the call returns, so it survives the daemon
  being killed. A killed daemon leaves its runs' soft locks behind; Aim removes a
  lock whose process is gone on the same machine, so the next daemon reopens them.
* remote: the SDK sends writes from a background queue and retries them itself, for
  as long as it takes, when the server goes away. ``write()`` waits for that queue to
  drain (the server has answered every message) for at most ``timeout`` seconds, after
  every few hundred rows (the SDK sends one row per round trip: a whole batch could
  outlast any timeout, at every retry). If it does not drain, the error is retriable,
  the retry queues nothing until the queue has drained, and the batch then sent again
  overwrites the same steps. When the daemon itself dies, the server keeps its runs
  open until it has missed the client's heartbeats for 5 minutes; until then reopening
  them is a retriable lock error. A daemon stopped while the server is away drops what
  the SDK still holds, unconfirmed and so sent again by the next daemon, and exits
  (see ``close()``: Aim alone would wait for the server forever).

Errors: a value Aim refuses (TypeError/ValueError, e.g. a sequence changing type):
permanent. Locks, connections, timeouts, the server's errors and OS errors: retriable.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from pathlib import Path
from typing import Any

from trackd.sinks.base import (
    Notices,
    Record,
    RunInfo,
    RunMap,
    Sink,
    SinkContext,
    SinkError,
    is_retriable_os_error,
    markdown_table,
    read_table,
    relative_path,
    retriable_status,
    stored_file,
)

REMOTE = "aim://"
DEFAULT_TIMEOUT = 10.0
CONFIRM_ROWS = 200
# The daemon is not the training process: no system metrics, terminal capture or env dump.
QUIET: dict[str, Any] = {
    "system_tracking_interval": None,
    "log_system_params": False,
    "capture_terminal_logs": False,
}


ALERT_LOG_LEVELS = {"INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}


class AimSink(Sink):
    kind = "aim"
    target_key = "repo"
    known_options = ("timeout", "artifacts_uri")

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        if not target:
            raise ValueError(
                "aim sink: needs a repo, e.g. aim:/path/to/repo or aim:aim://HOST:PORT"
            )
        try:
            self._timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            raise ValueError(
                f"aim sink: timeout must be seconds, not {options['timeout']!r}"
            ) from None
        self._remote = target.startswith(REMOTE)
        self._artifacts_uri = options.get("artifacts_uri") or None
        if self._artifacts_uri is not None and "://" not in self._artifacts_uri:
            raise ValueError(
                f"aim sink: artifacts_uri needs a scheme (file://, s3://), "
                f"got {self._artifacts_uri!r}"
            )
        self._notices = Notices("aim")

    def open(self, context: SinkContext) -> None:
        try:
            import aim
            from aim.sdk.errors import MissingRunError
        except ImportError as exc:
            raise SinkError(f"aim: {exc}; pip install 'trackd[aim]'", retriable=False) from exc
        self._aim: Any = aim
        self._missing_run: type[Exception] = MissingRunError
        self._run_ids = RunMap(context.state_dir / "runs.json")
        self._runs: dict[str, Any] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._unconfirmed = 0
        self._repo: Any = _call(self._connect)
        self._confirmation = _Confirmation(self._repo) if self._remote else None
        if self._artifacts_uri is None:
            beside = context.state_dir if self._remote else Path(self.target).expanduser()
            name = "artifacts" if self._remote else "aim-artifacts"
            self._artifacts_uri = (beside.resolve() / name).as_uri()

    def _connect(self) -> Any:
        """The repo: a remote one connects to its server now; a local one is created if new."""
        if self._remote:
            return self._aim.Repo(self.target)
        path = Path(self.target).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return self._aim.Repo(str(path), init=not self._aim.Repo.exists(str(path)))

    # --- delivery -----------------------------------------------------------------------

    def write(self, batch: list[Record]) -> None:
        self._confirm()  # what a failed write left queued goes first, and once
        for record in batch:
            _call(self._apply, record)
        self._confirm()

    def _confirm(self) -> None:
        self._unconfirmed = 0
        if self._confirmation is not None and not self._confirmation.wait(self._timeout):
            raise SinkError(
                f"aim: {self.target} has not confirmed the writes within {self._timeout:g}s",
                retriable=True,
            )

    def _sent(self) -> None:
        """Count a row sent; a remote repo confirms every CONFIRM_ROWS of them. The SDK
        sends one row per round trip, so the timeout must bound a few hundred of them, not
        a whole batch (a record alone can hold 20,000 rows): else a batch that takes longer
        than the timeout would be sent again and again and never confirmed."""
        self._unconfirmed += 1
        if self._unconfirmed >= CONFIRM_ROWS:
            self._confirm()

    def _apply(self, record: Record) -> None:
        info, body = record.run, record.body
        run, created = self._run(info)
        if record.type == "run_start" and not created:
            self._start(run, info)
        elif record.type == "metrics":
            for step, ts, values in body["rows"]:
                self._track(run, step, ts, values)
        elif record.type == "config":
            _set_params(run, "hparams", body["values"])
        elif record.type == "summary":
            _set_params(run, "summary", body["values"])
        elif record.type == "tags":
            self._set_tags(run, info.id, body["values"])
        elif record.type == "artifact":
            self._log_artifact(run, body)
        elif record.type == "media":
            self._media(run, body)
        elif record.type == "alert":
            self._write_alert(run, body)
        elif record.type == "run_end":
            _set_params(
                run,
                "trackd",
                {"status": body["status"], "error": body.get("error"), "ended": body["ended"]},
            )
            self._close_run(info.id)

    def _run(self, info: RunInfo) -> tuple[Any, bool]:
        """The open Aim run of a trackd run, reopened by its hash, else created (and mapped
        before anything is written to it); and whether it was created."""
        run = self._runs.get(info.id)
        if run is not None:
            return run, False
        known = self._run_ids.get(info.id)
        if known is not None:
            try:
                run = self._runs[info.id] = self._aim.Run(known, repo=self._repo, **QUIET)
                return run, False
            except self._missing_run:
                self._notices("a mapped Aim run is gone from the repo; a new one replaces it")
        run = self._runs[info.id] = self._aim.Run(repo=self._repo, experiment=info.project, **QUIET)
        self._run_ids.set(info.id, run.hash)
        self._start(run, info)
        return run, True

    def _start(self, run: Any, info: RunInfo) -> None:
        run.name = info.name
        _set_params(run, "hparams", info.config)
        meta = {**info.metadata(), "status": "running", "error": None, "ended": None}
        _set_params(run, "trackd", meta)
        self._set_tags(run, info.id, info.tags)

    def _track(
        self, run: Any, step: int, ts: float, values: dict[str, Any], media: bool = False
    ) -> None:
        numbers = (
            values
            if media
            else {key: value for key, value in values.items() if isinstance(value, int | float)}
        )
        if len(numbers) < len(values):
            self._notices("values that are not numbers are not sent to Aim")
        if not numbers:
            return
        # Aim's tracker stores a row with the time it is given; `run.track` passes now().
        track = getattr(getattr(run, "_tracker", None), "_track", None)
        if track is None:
            run.track(numbers, step=step)
        else:
            track(numbers, ts, None, step, None, context=None)
        self._sent()

    def _log_artifact(self, run: Any, body: dict[str, Any]) -> None:
        name = relative_path(body["name"])
        if name != body["name"]:
            self._notices("artifact names became relative paths below the run's artifacts")
        source = stored_file(body, "aim")
        listed = run.artifacts.get(name)
        if listed is not None and listed.path == source.as_posix():
            return  # a re-sent record: Aim lists an artifact once its copy is complete
        if run.artifacts_uri is None:
            run.set_artifacts_uri(self._artifacts_uri)
        run.log_artifact(str(source), name=name, block=True)
        self._sent()

    def _write_histogram(self, run: Any, body: dict[str, Any]) -> None:
        """An ``aim.Distribution`` of the counts over the edges' range: Aim's bins are of
        equal width, so uneven edges (a user's np_histogram) are spread evenly (a notice)."""
        counts, edges = body["counts"], body["edges"]
        if not counts:
            return
        width = (edges[-1] - edges[0]) / len(counts)
        if any(
            abs(high - low - width) > 1e-9 * max(1.0, abs(width))
            for low, high in itertools.pairwise(edges)
        ):
            self._notices("histograms with uneven bins are shown with even bins in Aim")
        value = self._aim.Distribution(hist=counts, bin_range=(edges[0], edges[-1]))
        self._track(run, body["step"], body["ts"], {body["key"]: value}, media=True)

    def _write_alert(self, run: Any, body: dict[str, Any]) -> None:
        """Into the run's log records (`run.log_warning`'s sequence, the UI's Logs tab). The
        step is the alert's time in microseconds, so a re-sent alert lands on itself."""
        from aim.sdk.logging.log_record import LogRecord

        text = body["title"] + (f": {body['text']}" if body["text"] else "")
        level = ALERT_LOG_LEVELS[body["level"]]
        value = LogRecord(text, level, timestamp=body["ts"], logger_info=("trackd.alert", 0))
        step = round(body["ts"] * 1_000_000)
        self._track(run, step, body["ts"], {"__log_records": value}, media=True)

    def _media(self, run: Any, body: dict[str, Any]) -> None:
        kind = body["kind"]
        if kind == "histogram":
            self._write_histogram(run, body)
            return
        if kind == "video":
            self._notices("videos have no Aim form; skipped")
            return
        source = stored_file(body, "aim")
        if kind == "table":
            text = markdown_table(read_table(source), body.get("caption"))
            value = self._aim.Text(text)
        else:
            from PIL import Image as PILImage  # Aim depends on Pillow

            with PILImage.open(source) as opened:
                opened.load()
                value = self._aim.Image(opened.copy(), caption=body.get("caption") or "")
        self._track(run, body["step"], body["ts"], {body["key"]: value}, media=True)

    def _set_tags(self, run: Any, run_id: str, tags: dict[str, str]) -> None:
        """One Aim tag per trackd tag name: a new value replaces the old value's tag."""
        known = self._tags.get(run_id)
        if known is None:
            known = self._tags[run_id] = {}
            for label in run.tags:
                name, _, value = str(label).partition(":")
                known[name] = value
        for name, value in tags.items():
            old = known.get(name)
            if old is not None and old != value:
                run.remove_tag(f"{name}:{old}" if old else name)
            if old != value:
                run.add_tag(f"{name}:{value}" if value else name)
                known[name] = value

    def _close_run(self, run_id: str) -> None:
        run = self._runs.get(run_id)
        if run is not None:
            self._confirm()  # closing waits on the SDK's queue without a timeout
            del self._runs[run_id]
            self._tags.pop(run_id, None)
            run.close()

    def close(self) -> None:
        """Close every open run (Aim sets its end time; the next record reopens it).

        Remote, with the server away, closing would wait for it forever: the writes the
        SDK still holds are dropped instead (none was confirmed, so the cursor is before
        them and the next daemon sends them again). And Aim's own cleanup at exit waits
        for a flag its cleanup thread sets only if no step of it raised, which every step
        does when the server refuses connections: the daemon would never exit. So a
        remote sink lets the exit go ahead; its runs are closed here already.
        """
        if self._confirmation is not None and not self._confirmation.wait(self._timeout):
            self._confirmation.abandon()
        runs, self._runs = self._runs, {}
        for run in runs.values():
            with contextlib.suppress(Exception):
                run.close()
        if self._remote:
            from aim.ext.cleanup import AutoClean

            AutoClean.stop_signal.set()


def _set_params(run: Any, group: str, values: dict[str, Any]) -> None:
    """Set params one key at a time under `group`, so earlier keys stay."""
    for key, value in values.items():
        run[group, key] = value


class _Confirmation:
    """Whether the SDK's queue of writes to a remote repo has drained, with a timeout
    (the queue only has a blocking wait). A waiter thread is started once per drain and
    reused while it is still waiting, so retries do not pile up threads."""

    def __init__(self, repo: Any) -> None:
        self._queue = repo._client.get_queue()  # what Run.close() itself waits on
        self._drained: threading.Event | None = None

    def wait(self, timeout: float) -> bool:
        if self._drained is None:
            drained = self._drained = threading.Event()

            def wait_for_drain() -> None:
                self._queue.wait_for_finish()
                drained.set()

            threading.Thread(target=wait_for_drain, name="trackd-aim-confirm", daemon=True).start()
        if not self._drained.wait(timeout):
            return False
        self._drained = None
        return True

    def abandon(self) -> None:
        """Drop the queued writes and refuse new ones, so no wait on the queue blocks."""
        queue, tasks = self._queue, self._queue._queue
        with tasks.mutex:
            queue._shutdown = True
            tasks.queue.clear()
            tasks.unfinished_tasks = 0
            tasks.all_tasks_done.notify_all()


def _call(function: Any, *args: Any) -> Any:
    """Call the SDK; map what it raises to a SinkError (anything else is a bug here)."""
    try:
        return function(*args)
    except SinkError:
        raise
    except Exception as exc:
        error = _mapped(exc)
        if error is None:
            raise
        raise error from exc


def _mapped(exc: Exception) -> SinkError | None:
    message = f"aim: {type(exc).__name__}: {exc}"
    module = type(exc).__module__
    code = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(code, int):  # an HTTP error from the server (requests' errors are OSErrors)
        return SinkError(message, retriable=retriable_status(code))
    if isinstance(exc, TypeError | ValueError):
        return SinkError(message, retriable=False)
    if isinstance(exc, OSError):
        return SinkError(message, retriable=is_retriable_os_error(exc))
    if isinstance(exc, RuntimeError) or module.split(".")[0] in _SDK_MODULES:
        return SinkError(message, retriable=True)
    return None


# Where the SDK's own errors come from: Aim, its RocksDB binding, its transport.
_SDK_MODULES = frozenset({"aim", "aimrocks", "requests", "urllib3", "websockets", "filelock"})
