"""The MLflow sink: `mlflow:http://HOST:PORT`, `mlflow:sqlite:///path.db`, `mlflow:file:/path`.

One trackd run is one MLflow run, in the experiment named after the project,
with `runName` the run name. The pairing is kept in a `RunMap` and the MLflow
run carries the tag `trackd.run_id`, so a restart, a replay or a resume finds
the run again (by the map, else by searching for the tag) instead of making a
second one. Mapping of the records:

* run_start: create (or reuse, setting it RUNNING again) the run; config ->
  params, nested keys joined with "/"; tags plus `trackd.run_id`,
  `trackd.project`, `trackd.group`, `trackd.host`, `trackd.pid`, `trackd.rank`,
  `trackd.local_rank`, `trackd.world_size`, `trackd.started` (`RunInfo.metadata()`);
* metrics: MLflow metrics with their step and timestamp (ms); config: params;
  tags: tags; artifact: an uploaded file or directory;
* media: an artifact `media/KEY/STEP-SHA8.FORMAT` (what `log_image` and `log_table`
  with an `artifact_file` store: the PNG, the GIF video, the table as JSON
  `{"columns", "data"}`, log_table's format), uploaded as the client encoded it;
  the same name each time, so a re-sent record overwrites instead of adding; a
  histogram: the JSON artifact `histograms/KEY/STEP.json` {key, step, counts, edges};
* alert: the JSON artifact `alerts/TS_MS-LEVEL.json` {ts, title, text, level} (MLflow
  has no alerts);
* summary: tags `summary/KEY` (summary values may be any JSON, and a tag is
  overwritten in place, where a metric would add a point to the history);
* run_end: `set_terminated` FINISHED or FAILED, the error in tag `trackd.error`;
* system: metrics `system/NAME` as MLflow's system-metrics monitor names them
  (`system/cpu_utilization_percentage`, `system/gpu_0_utilization_percentage`, ...),
  `system/NODE/NAME` for a node other than rank 0's (see `base.system_node`).
* the code and environment of init(save_code=True): the tags MLflow's own client sets
  (`mlflow.source.name` = the script, `mlflow.source.type` = LOCAL,
  `mlflow.source.git.commit` / `.branch` / `.repoURL` / `.dirty`); the diff is the
  artifact `diff.patch`, as any artifact;
* console: artifact parts `console/console-SESSION-NNNNNN.log` (MLflow cannot append
  to an artifact; see `console_parts`), concatenated in name order the run's console.

Limits: every `log_batch` call carries one kind of entity, at most 1000 metrics
or 100 params or 100 tags (so also under the server's 1 MB request cap). A
server spends far longer storing 1000 metrics than the sink takes to send
them, so the metric calls of a write go out several at once: at most
`in_flight` (default 8 for an `http(s)` server, 1 for a local store, whose calls
run in this process, under the same GIL). Eight, because a server on PostgreSQL
with 2 workers stores 1.3x more with 8 calls at once than with 4 and about its
most from 8 on (`benchmarks/sinks.py --ceiling`). How many of those the sink
uses is spec option `concurrency`: `adaptive` (the default) starts at one call
and adapts to the server's answers (`concurrency.ConcurrencyLimit`: more while
the latency says fewer than three of its calls wait at the server, fewer when it
says more than four do, or on 429/503, timeouts or refusals), so a fleet of
daemons does not push one server past its ceiling; `fixed` always uses
`in_flight`. Param values over 6000 characters and tag values over 8000 are
truncated (a counted notice). Params are immutable in MLflow: the sink knows each
run's params (fetched once per run), skips a key re-logged with the same value and
refuses a changed value. A refused value, or a key MLflow would reject, does not cost
the record's other values: those are stored, then the record goes to the dead
letters with the reason.

Errors: MLflow raises `MlflowException` for everything, a refused connection
included, with an error code that maps to an HTTP status; 5xx, 429 and 408
are retriable, other 4xx permanent. Its REST client retries internally for
minutes by default, so each sink's requests get their own retries (0) and
timeout (5 s), unless the spec options `http_retries` / `http_timeout` or the
environment (`MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT`)
say otherwise: a failing call returns at once and trackd's own backoff does the
retrying, without holding up other sinks. The settings travel with the
calling thread (`_use_http_settings`), never through the process environment,
so two MLflow sinks never see each other's.

Exactly once: params (same value) and tags (overwritten) are idempotent, and so
is `set_terminated`. Metric points are not (the file store appends them again;
SQL stores refuse an exact duplicate with an IntegrityError and then run a
recovery whose cost grew with the run's history, mlflow#24577), so the sink
never sends a point MLflow may have. Before each write it records, in a small
file fsynced in its state directory, two WAL positions: *sent*, the batch's last
record (everything up to it may be in MLflow), and *done*, the last record of
the last write that returned (everything up to it is). A write returns, or
raises, only once none of its calls is in flight any more (after a failed call,
the calls not started are dropped and the others waited for), so the marks
cover every point that may have been sent. After `open()`, the records the
fan-out sends again up to *done* have their points skipped unasked; those
between *done* and *sent* (the one batch in flight at the crash), and after a
failed write those of the batch that failed, are *doubtful*: their steps are
looked up per key (`_not_stored`, a few range lookups per key, whatever the
run's length) and points already there (same key, step, timestamp and value)
are skipped. Runs found by their tag rather than the map (a replay from another
data dir) are checked throughout. A point twice in one call goes once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from trackd.sinks.base import (
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    handles,
    is_retriable_os_error,
    response_retriable,
    retriable_status,
)
from trackd.sinks.concurrency import ConcurrencyLimit, Outcome
from trackd.sinks.console_parts import ConsoleParts
from trackd.sinks.media_files import media_file_name
from trackd.sinks.notices import Notices
from trackd.sinks.paths import relative_path
from trackd.sinks.runmap import RunMap
from trackd.sinks.system_samples import since_run_start, system_node, system_values

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_TAGS_PER_CALL = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARENT_TAG = "mlflow.parentRunId"
HTTP_SETTINGS = {  # spec option -> (http_request argument, MLflow environment variable, default)
    "http_retries": ("max_retries", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
    "http_timeout": ("timeout", "MLFLOW_HTTP_REQUEST_TIMEOUT", "5"),
}
_KEY = re.compile(r"^[/\w.\- :]*$")
_UNSAFE = re.compile(r"[^\w.@+=-]+")
_MARK_BYTES = 128
HISTORY_PAGE = 2500  # the most points get-history-bulk-interval returns (server: 1..2500)
STEPS_PER_LOOKUP = 2000  # distinct steps per lookup: under HISTORY_PAGE with room to spare
_INT32 = 2**31 - 1  # get-history-bulk-interval's start_step / end_step are int32
IN_FLIGHT_HTTP = 8  # log_batch calls at once to a server; a local store takes them one by one

Position = tuple[int, int]
Point = tuple[int, int, float | str]  # step, timestamp in ms, value (NaN as a string)
Outgoing = tuple[str, float, int, int]  # key, value, timestamp in ms, step


class MlflowSink(Sink):
    kind = "mlflow"
    target_key = "tracking_uri"
    # A write's calls run `in_flight` at a time and all end before the next write starts, so
    # each write ends with the server part idle: 20,000 rows (60 calls at 3 keys a row, a few
    # seconds at a PostgreSQL server's ceiling) delivered 82-104% of that ceiling where 5,000
    # (15 calls) delivered 67-71% (benchmarks/README.md, issue 13 §2, fourth pass).
    batch_rows = 20_000
    known_options = ("in_flight", *HTTP_SETTINGS, "concurrency")

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        remote = target.startswith(("http:", "https:"))
        text = options.get("in_flight") or str(IN_FLIGHT_HTTP if remote else 1)
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"mlflow sink: in_flight must be a whole number >= 1, not {text!r}")
        self._in_flight = int(text)
        mode = self.choice("concurrency", ("adaptive", "fixed"), "adaptive")
        self._limit = ConcurrencyLimit(self._in_flight, adaptive=mode == "adaptive")
        self._http = self._http_settings()

    def open(self, context: SinkContext) -> None:
        if self.target.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the spec asked for it
        self._artifact_root: Path | None = None
        if self.target.startswith("sqlite:///"):
            database = Path(self.target.removeprefix("sqlite:///")).expanduser().absolute()
            database.parent.mkdir(parents=True, exist_ok=True)
            self._artifact_root = database.parent / "mlartifacts"  # not the daemon's cwd
        try:
            from mlflow.store.tracking.rest_store import RestStore
            from mlflow.tracking import MlflowClient

            self._client: MlflowClient = MlflowClient(tracking_uri=self.target)
            self._store: Any = _tracking_store(self._client)
            self._call_endpoint = _rest_call_endpoint(self._store, RestStore)
        except Exception as exc:
            mapped = _errors().error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        context.state_dir.mkdir(parents=True, exist_ok=True)
        self._runs = RunMap(context.state_dir / "runs.json")
        self._console = ConsoleParts((context.state or {}).get("console"))
        # nested runs whose parent's MLflow run was not made yet: parent trackd id -> children
        self._orphans: dict[str, list[str]] = dict((context.state or {}).get("orphans", {}))
        self._notices = Notices("mlflow")
        self._experiments: dict[str, str] = {}
        self._params: dict[str, dict[str, str]] = {}  # MLflow run -> params stored
        self._verify: set[str] = set()  # runs found by tag: every point is checked
        self._problems: list[str] = []
        self._good_keys: set[str] = set()
        mark_path = context.state_dir / "written.json"
        self._suspect_until, self._done = self._read_mark(mark_path)
        self._mark = self._suspect_until
        self._mark_fd = os.open(mark_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._pool: ThreadPoolExecutor | None = None
        if self._in_flight > 1:
            self._pool = ThreadPoolExecutor(
                self._in_flight,
                thread_name_prefix="trackd-mlflow",
                initializer=_use_http_settings,
                initargs=(self._http,),
            )

    def _read_mark(self, path: Path) -> tuple[Position | None, Position | None]:
        """(sent, done): every point up to `sent` may be in MLflow, every point up to `done`
        is (a mark of the old form `[segment, offset]` is `sent` alone)."""
        try:
            text = path.read_bytes().strip()
            if not text:
                return None, None
            mark = json.loads(text)
            if mark and isinstance(mark[0], int):
                mark = [mark, None]
            sent, done = mark
            return _position(sent), None if done is None else _position(done)
        except FileNotFoundError:
            return None, None
        except (ValueError, TypeError):
            self._notices(f"unreadable {path.name}; points written just before a crash may repeat")
            return None, None

    def write(self, batch: list[Record]) -> None:
        if not batch:
            return
        if self._suspect_until is not None and batch[0].position > self._suspect_until:
            self._suspect_until = None
        last = batch[-1].position
        if self._mark is None or last > self._mark:
            mark = json.dumps([last, self._done]).encode().ljust(_MARK_BYTES)
            try:
                os.pwrite(self._mark_fd, mark, 0)
                os.fdatasync(self._mark_fd)
            except OSError as exc:  # nothing may be sent unless the mark is durable
                message = f"mlflow: cannot record the delivery mark: {exc}"
                raise SinkError(message, retriable=True) from exc
            self._mark = last
        try:
            with _http_settings_in_this_thread(self._http):  # this sink's, for this call only
                self._write(batch)
        except Exception as exc:
            # Part of the batch may be stored: check it point by point when it comes again.
            self._suspect_until = max(last, self._suspect_until or last)
            self._params.clear()
            mapped = None if isinstance(exc, SinkError) else _errors().error(exc)
            if mapped is None:
                raise  # ours, or else not MLflow's nor the network's: a bug, for the fan-out
            raise mapped from exc
        if self._done is None or last > self._done:  # recorded with the next mark
            self._done = last

    def _write(self, batch: list[Record]) -> None:
        pending: dict[str, list[Outgoing]] = {}
        doubtful: dict[str, list[Outgoing]] = {}  # points that may be in MLflow already
        for record in batch:
            self._problems = []
            run_id, created = self._run_for(record.run)
            if created and record.type != "run_start":
                self._set_tags(run_id, _run_tags(record.run))  # a run whose start was not seen
            if record.type in ("metrics", "system"):
                state = self._delivered(run_id, record.position)
                if state is True:
                    continue  # stored before a crash: nothing to send
                points = (doubtful if state is None else pending).setdefault(run_id, [])
                if record.type == "metrics":
                    for step, ts, values in record.body["rows"]:
                        millis = int(ts * 1000)
                        for key, value in values.items():
                            if self._valid_key(key, "metric"):
                                points.append((key, float(value), millis, step))
                else:
                    self._write_system(record, points)
            else:
                self._flush(pending, doubtful)
                self._apply(run_id, created, record)
            if self._problems:
                self._flush(pending, doubtful)
                raise SinkError("mlflow: " + "; ".join(self._problems), retriable=False)
        self._flush(pending, doubtful)

    def _delivered(self, run_id: str, position: Position) -> bool | None:
        """Whether the points of the record at `position` are in MLflow: True (all of them:
        up to the last write that returned), False (none: past the mark), None (some may be:
        check them)."""
        if run_id in self._verify:
            return None
        if self._suspect_until is None or position > self._suspect_until:
            return False
        if self._done is not None and position <= self._done:
            return True
        return None

    def _flush(
        self, pending: dict[str, list[Outgoing]], doubtful: dict[str, list[Outgoing]]
    ) -> None:
        """Send the points gathered so far (of the doubtful ones, those MLflow does not have),
        as many calls at once as the concurrency limit allows now; return (or raise) only
        when none is in flight any more.

        A point twice in one call is sent once: a SQL store refuses the second copy with an
        IntegrityError and recovers by looking up what it has (mlflow#24577), the file store
        would keep both.

        When a call fails, the calls not started yet are dropped and those in flight are
        waited for before the error is raised: a call still running after `write()` gave up
        could store its points after the retry has checked the history, and they would be
        there twice. The mark covers the whole batch, so the retry checks every point of it,
        those that siblings of the failed call did store included.
        """
        for run_id, points in doubtful.items():
            pending.setdefault(run_id, []).extend(self._not_stored(run_id, points))
        doubtful.clear()
        calls = [
            (run_id, unique[start : start + MAX_METRICS_PER_CALL])
            for run_id, points in pending.items()
            for unique in [list(dict.fromkeys(points))]
            for start in range(0, len(unique), MAX_METRICS_PER_CALL)
        ]
        pending.clear()
        if self._pool is None:
            for run_id, chunk in calls:
                self._log_metrics(run_id, chunk)
            return
        failed = threading.Event()
        futures = []
        for run_id, chunk in calls:
            started = self._limit.acquire()  # waits while the limit's worth are in flight
            if failed.is_set():
                self._limit.release(started, Outcome.UNSENT)  # the rest are never sent
                break
            futures.append(self._pool.submit(self._timed_call, run_id, chunk, started, failed))
        wait(futures)  # started: sending, so its points may land
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error

    def _timed_call(
        self, run_id: str, points: list[Outgoing], started: float, failed: threading.Event
    ) -> None:
        """One metric call through the concurrency limit: its outcome and latency teach it."""
        outcome = Outcome.ERROR
        try:
            self._log_metrics(run_id, points)
            outcome = Outcome.OK
        except Exception as exc:
            mapped = exc if isinstance(exc, SinkError) else _errors().error(exc)
            if mapped is not None and mapped.retriable:
                outcome = Outcome.BACK_PRESSURE
            raise
        finally:
            if outcome is not Outcome.OK:
                failed.set()  # before the slot frees, so the writer sees it when it wakes
            self._limit.release(started, outcome)  # whatever happened: no slot is ever lost

    def concurrency(self) -> dict[str, Any] | None:
        return self._limit.status() if self._in_flight > 1 else None

    def _http_settings(self) -> dict[str, int]:
        settings = {}
        for option, (argument, variable, default) in HTTP_SETTINGS.items():
            text = self.options.get(option) or os.environ.get(variable) or default
            if not text.isdigit():
                raise ValueError(f"mlflow sink: {option} must be a whole number, not {text!r}")
            settings[argument] = int(text)
        return settings

    def _log_metrics(self, run_id: str, points: list[Outgoing]) -> None:
        """One `log_batch` call with metrics only.

        Over HTTP the request body is built here: MLflow's client makes a protobuf message
        of every point and prints it as JSON with protobuf's pure-Python printer, which was
        60% of the daemon's CPU while it delivered (py-spy). The body goes through the REST
        store's `_call_endpoint` (a private method, found in `open()`), so MLflow's own
        credentials, TLS settings and error codes still apply; without it, `log_batch`.
        """
        if self._call_endpoint is None:
            from mlflow.entities import Metric

            metrics = [Metric(key, value, millis, step) for key, value, millis, step in points]
            self._client.log_batch(run_id, metrics=metrics, synchronous=True)
            return
        from mlflow.protos.service_pb2 import LogBatch

        finite = math.isfinite
        body = [
            {
                "key": key,
                "value": value if finite(value) else _non_finite(value),
                "timestamp": millis,
                "step": step,
            }
            for key, value, millis, step in points
        ]
        # The body goes to the wrapped `http_request` as it is (`_REQUESTS.body`), in place
        # of an empty batch: `call_endpoint` would decode it and `requests` encode it again,
        # a third of this thread's CPU, which an MLflow server on the same cores lacks. A
        # request that did not pass the wrapper stored nothing: the body goes MLflow's way.
        # orjson encodes it in a fifth of `json`'s time (the JSONL sink's encoder already).
        _REQUESTS.body = orjson.dumps({"run_id": run_id, "metrics": body})
        try:
            self._call_endpoint(LogBatch, json.dumps({"run_id": run_id}))
        finally:
            unsent, _REQUESTS.body = _REQUESTS.body, None
        if unsent is not None:
            self._call_endpoint(LogBatch, unsent.decode())

    def _write_system(self, record: Record, points: list[Outgoing]) -> None:
        """A sample as MLflow's own system-metrics monitor names it: `system/NAME`, or
        `system/NODE/NAME` for another node's (its `node_id`), at step = whole seconds since
        the run started (MLflow's monitor counts samples; trackd's survive restarts)."""
        body = record.body
        node = system_node(record.run, body["node"])
        prefix = f"system/{node}/" if node else "system/"
        millis = int(body["ts"] * 1000)
        step = max(0, int(body["ts"] - record.run.started))
        for name, value in system_values(since_run_start(body), _SYSTEM_NAMES, _GPU_NAMES).items():
            points.append((prefix + name, value, millis, step))

    def _apply(self, run_id: str, created: bool, record: Record) -> None:
        handler = self.handler(record.type)
        if handler is not None:
            handler(run_id, created, record)

    # --- one handler per record type but the batched metrics and system samples:
    # (the MLflow run id, whether this batch created it, the record) ---

    @handles("run_start")
    def _on_run_start(self, run_id: str, created: bool, record: Record) -> None:
        if not created:
            self._client.update_run(run_id, status="RUNNING")
        self._set_tags(run_id, _run_tags(record.run))
        self._set_tags(run_id, _source_tags(record.body))
        self._console.start(run_id, float(record.body.get("started") or record.run.started))
        self._log_params(run_id, _flatten(record.run.config))

    @handles("config")
    def _on_config(self, run_id: str, created: bool, record: Record) -> None:
        self._log_params(run_id, _flatten(record.body["values"]))

    @handles("tags")
    def _on_tags(self, run_id: str, created: bool, record: Record) -> None:
        self._set_tags(run_id, record.body["values"])

    @handles("summary")
    def _on_summary(self, run_id: str, created: bool, record: Record) -> None:
        summary = _flatten(record.body["values"])
        self._set_tags(run_id, {f"summary/{key}": value for key, value in summary.items()})

    @handles("artifact")
    def _on_artifact(self, run_id: str, created: bool, record: Record) -> None:
        self._log_artifact(run_id, record.body["path"], record.body["name"])

    @handles("media")
    def _on_media(self, run_id: str, created: bool, record: Record) -> None:
        self._log_media(run_id, record.body)

    @handles("alert")
    def _on_alert(self, run_id: str, created: bool, record: Record) -> None:
        self._write_alert(run_id, record.body)

    @handles("console")
    def _on_console(self, run_id: str, created: bool, record: Record) -> None:
        self._write_console(run_id, record)

    @handles("run_end")
    def _on_run_end(self, run_id: str, created: bool, record: Record) -> None:
        body = record.body
        if body.get("error"):
            self._set_tags(run_id, {"trackd.error": body["error"]})
        if last := self._console.end(run_id):
            self._upload_text(run_id, "console", *last)
        status = "FINISHED" if body["status"] == "finished" else "FAILED"
        self._client.set_terminated(run_id, status, end_time=int(body["ended"] * 1000))
        self._params.pop(run_id, None)
        self._verify.discard(run_id)

    def _log_media(self, run_id: str, body: dict[str, Any]) -> None:
        if body["kind"] == "histogram":
            self._write_histogram(run_id, body)
        else:
            self._log_artifact(run_id, body["path"], f"media/{media_file_name(body)}")

    def _write_histogram(self, run_id: str, body: dict[str, Any]) -> None:
        """The JSON artifact `histograms/KEY/STEP.json` (MLflow has no histogram form):
        {"key", "step", "counts", "edges"}; a re-sent record overwrites it."""
        histogram = {key: body[key] for key in ("key", "step", "counts", "edges")}
        if body.get("caption") is not None:
            histogram["caption"] = body["caption"]
        name = f"histograms/{relative_path(body['key'])}/{body['step']}.json"
        self._client.log_text(run_id, json.dumps(histogram), name)

    def _write_alert(self, run_id: str, body: dict[str, Any]) -> None:
        """MLflow has no alerts: each is the JSON artifact `alerts/TS_MS-LEVEL.json`
        {"ts", "title", "text", "level"}, named by its time so a re-sent one overwrites."""
        alert = {key: body[key] for key in ("ts", "title", "text", "level")}
        name = f"alerts/{round(body['ts'] * 1000)}-{body['level']}.json"
        self._client.log_text(run_id, json.dumps(alert), name)

    def _write_console(self, run_id: str, record: Record) -> None:
        """Console lines as artifact parts `console/console-SESSION-NNNNNN.log` (see
        console_parts): closed parts go up once, the open one at most every few seconds."""
        for name, text in self._console.add(run_id, record.body["lines"], record.run.started):
            self._upload_text(run_id, "console", name, text)
        if due := self._console.due(run_id):
            self._upload_text(run_id, "console", *due)

    def _upload_text(self, run_id: str, folder: str, name: str, text: str) -> None:
        with tempfile.TemporaryDirectory(prefix="trackd-mlflow-") as temporary:
            path = Path(temporary) / name
            path.write_text(text, encoding="utf-8", errors="replace")
            self._client.log_artifact(run_id, str(path), artifact_path=folder)

    def checkpoint(self) -> dict[str, Any]:
        """The open console parts and the nested runs still waiting for their parent's MLflow
        run: the records they came from are behind the saved cursor."""
        return {"console": self._console.state(), "orphans": self._orphans}

    # --- runs and experiments ----------------------------------------------------------

    def _run_for(self, run: RunInfo) -> tuple[str, bool]:
        """The MLflow run of a trackd run, and whether it was created just now."""
        run_id = self._runs.get(run.id)
        if run_id is not None:
            return run_id, False
        experiment_id = self._experiment(run.project)
        found = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`trackd.run_id` = '{run.id}'", max_results=1
        )
        created = not found
        if found:
            run_id = found[0].info.run_id
            self._verify.add(run_id)
        else:
            started = int(run.started * 1000) or None
            tag = {"trackd.run_id": run.id}  # the other tags go through _set_tags' checks
            new = self._client.create_run(
                experiment_id, start_time=started, tags=tag, run_name=run.name
            )
            run_id = new.info.run_id
            self._params[run_id] = {}
        self._runs.set(run.id, run_id)
        for child in self._orphans.pop(run.id, ()):
            self._client.set_tag(child, PARENT_TAG, run_id)
        return run_id, created

    def _experiment(self, project: str) -> str:
        from mlflow.exceptions import MlflowException

        if project not in self._experiments:
            experiment = self._client.get_experiment_by_name(project)
            if experiment is None:
                location = None
                if self._artifact_root is not None:
                    location = (self._artifact_root / _UNSAFE.sub("_", project)).as_uri()
                try:
                    self._experiments[project] = self._client.create_experiment(
                        project, artifact_location=location
                    )
                except MlflowException as exc:  # created meanwhile by someone else
                    experiment = self._client.get_experiment_by_name(project)
                    if experiment is None:
                        raise exc from None
            if experiment is not None:
                if experiment.lifecycle_stage != "active":
                    raise SinkError(
                        f"mlflow: experiment {project!r} is deleted; restore it", retriable=False
                    )
                self._experiments[project] = experiment.experiment_id
        return self._experiments[project]

    # --- params, tags, artifacts -------------------------------------------------------

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if run_id not in self._params:
            self._params[run_id] = dict(self._client.get_run(run_id).data.params)
        stored = self._params[run_id]
        new: dict[str, str] = {}
        for key, value in params.items():
            if not self._valid_key(key, "param"):
                continue
            text = self._truncate(value, MAX_PARAM_VALUE, "param")
            if key not in stored:
                new[key] = text
            elif stored[key] != text:
                self._problems.append(
                    f"param {key!r} is {stored[key][:100]!r} and MLflow params cannot change;"
                    f" {text[:100]!r} not stored"
                )
        items = list(new.items())
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_CALL):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_CALL]
            self._client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
            stored.update(chunk)

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = self._with_parent(run_id, tags)
        items = [
            RunTag(key, self._truncate(value, MAX_TAG_VALUE, "tag"))
            for key, value in tags.items()
            if self._valid_key(key, "tag")
        ]
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_CALL):
            chunk = items[start : start + MAX_PARAMS_TAGS_PER_CALL]
            self._client.log_batch(run_id, tags=chunk, synchronous=True)

    def _with_parent(self, run_id: str, tags: dict[str, str]) -> dict[str, str]:
        """A nested run's `mlflow.parentRunId` (set by `trackd.mlflow.start_run(nested=True)`)
        names its parent's trackd run; MLflow nests runs under the parent's MLflow run id.
        Runs of different sessions arrive in any order (live, or spools picked up later), so
        a child may come before its parent: it gets the tag when the parent's run is made."""
        parent = tags.get(PARENT_TAG)
        if not parent:
            return tags
        mapped = self._runs.get(parent)
        if mapped:
            return {**tags, PARENT_TAG: mapped}
        if run_id not in self._orphans.setdefault(parent, []):
            self._orphans[parent].append(run_id)
        return {key: value for key, value in tags.items() if key != PARENT_TAG}

    def _log_artifact(self, run_id: str, path: str, name: str) -> None:
        """Upload under `name` (MLflow names a file by its basename, so copy when they differ)."""
        source = Path(path)
        if source.is_dir():
            self._client.log_artifacts(run_id, path, artifact_path=name)
            return
        if not source.is_file():
            raise SinkError(f"mlflow: artifact {path!r} no longer exists", retriable=False)
        folder = posixpath.dirname(name) or None
        if source.name == posixpath.basename(name):
            self._client.log_artifact(run_id, path, artifact_path=folder)
            return
        with tempfile.TemporaryDirectory(prefix="trackd-mlflow-") as temporary:
            copy = Path(temporary) / posixpath.basename(name)
            shutil.copyfile(source, copy)
            self._client.log_artifact(run_id, str(copy), artifact_path=folder)

    # --- helpers -----------------------------------------------------------------------

    def _not_stored(self, run_id: str, points: list[Outgoing]) -> list[Outgoing]:
        """The points MLflow does not have yet, asking only about their own steps.

        The cost must not grow with the run's length: a run of a million points is checked
        after a crash as fast as a short one. MLflow's `get-history` has no step filter (it
        returns a key's whole history), and a run's latest metrics tell only the highest
        step stored, not the gaps that calls in flight at once leave below it. Its
        `get-history-bulk-interval` takes a step range and is answered from the
        (run_uuid, key, step) index with at most 2,500 points: the doubtful steps are asked
        for in ranges of at most 2,000 distinct steps, and a range that comes back full
        (MLflow then samples it) is halved until it does not. The doubtful points are those
        of one batch (see `_delivered`), so a check after a crash costs a few lookups per key.
        """
        by_key: dict[str, list[Outgoing]] = {}
        for point in points:
            by_key.setdefault(point[0], []).append(point)
        fresh: list[Outgoing] = []
        for key, group in by_key.items():
            steps = sorted({point[3] for point in group})
            stored: set[Point] = set()
            for start in range(0, len(steps), STEPS_PER_LOOKUP):
                chunk = steps[start : start + STEPS_PER_LOOKUP]
                stored |= self._stored(run_id, key, chunk[0], chunk[-1])
            fresh += [p for p in group if (p[3], p[2], _identity(p[1])) not in stored]
        return fresh

    def _stored(self, run_id: str, key: str, low: int, high: int) -> set[Point]:
        """The points of one metric with steps `low`..`high` that MLflow has."""
        if low < 0 or high > _INT32:  # beyond the request's int32: the whole history
            history = self._client.get_metric_history(run_id, key)
            return {_point(m) for m in history if low <= m.step <= high}
        found = self._history_between(run_id, key, low, high)
        if len(found) < HISTORY_PAGE:
            return {_point(metric) for metric in found}
        if low == high:  # one step logged 2,500 times or more: no range is small enough
            return {_point(m) for m in self._client.get_metric_history(run_id, key)
                    if m.step == low}  # fmt: skip
        middle = (low + high) // 2
        return self._stored(run_id, key, low, middle) | self._stored(run_id, key, middle + 1, high)

    def _history_between(self, run_id: str, key: str, low: int, high: int) -> list[Any]:
        """`get-history-bulk-interval` of one run: through the REST store's `_call_endpoint`
        (the client has no such call), or the local store's own method."""
        if self._call_endpoint is None:
            found: list[Any] = self._store.get_metric_history_bulk_interval(
                run_ids=[run_id], metric_key=key, max_results=HISTORY_PAGE,
                start_step=low, end_step=high,
            )  # fmt: skip
            return found
        from mlflow.protos.service_pb2 import GetMetricHistoryBulkInterval

        request = {
            "run_ids": [run_id], "metric_key": key, "start_step": low, "end_step": high,
            "max_results": HISTORY_PAGE,
        }  # fmt: skip
        response: Any = self._call_endpoint(GetMetricHistoryBulkInterval, json.dumps(request))
        return list(response.metrics)

    def _valid_key(self, key: str, what: str) -> bool:
        """MLflow's own rules for metric, param and tag names; a broken one is a problem."""
        if key in self._good_keys:
            return True
        normal = posixpath.normpath(key)
        if (
            _KEY.match(key)
            and len(key) <= MAX_KEY
            and normal == key
            and normal != "."
            and not normal.startswith(("..", "/"))
        ):
            if len(self._good_keys) < 100_000:
                self._good_keys.add(key)
            return True
        problem = f"{what} name {key[:MAX_KEY]!r} is not valid in MLflow; not stored"
        if problem not in self._problems:
            self._problems.append(problem)
        return False

    def _truncate(self, value: str, limit: int, what: str) -> str:
        if len(value) <= limit:
            return value
        self._notices(f"{what} values over MLflow's {limit}-character limit are truncated")
        return value[:limit]

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if getattr(self, "_mark_fd", -1) >= 0:
            os.close(self._mark_fd)
            self._mark_fd = -1


MB = 1e-6  # MLflow's monitors report megabytes (10^6 bytes)
# trackd's sample names -> MLflow's (mlflow/system_metrics/metrics/*_monitor.py); names its
# monitors do not have follow their pattern.
_SYSTEM_NAMES = {
    "cpu": ("cpu_utilization_percentage", 1.0),
    "memory.used": ("system_memory_usage_megabytes", MB),
    "memory.percent": ("system_memory_usage_percentage", 1.0),
    "memory.available": ("system_memory_available_megabytes", MB),
    "swap.used": ("swap_usage_megabytes", MB),
    "swap.percent": ("swap_usage_percentage", 1.0),
    "disk.percent": ("disk_usage_percentage", 1.0),
    "disk.used": ("disk_usage_megabytes", MB),
    "disk.free": ("disk_available_megabytes", MB),
    "disk.read_bytes": ("disk_read_megabytes", MB),
    "disk.write_bytes": ("disk_write_megabytes", MB),
    "network.recv": ("network_receive_megabytes", MB),
    "network.sent": ("network_transmit_megabytes", MB),
    "proc.cpu": ("process_cpu_utilization_percentage", 1.0),
    "proc.rss": ("process_memory_rss_megabytes", MB),
    "proc.threads": ("process_threads", 1.0),
}
_GPU_NAMES = {
    "util": ("gpu_{i}_utilization_percentage", 1.0),
    "memory.percent": ("gpu_{i}_memory_usage_percentage", 1.0),
    "memory.used": ("gpu_{i}_memory_usage_megabytes", MB),
    "memory.total": ("gpu_{i}_memory_total_megabytes", MB),
    "power": ("gpu_{i}_power_usage_watts", 1.0),
    "power.percent": ("gpu_{i}_power_usage_percentage", 1.0),
    "temp": ("gpu_{i}_temperature_celsius", 1.0),
    "clock.sm": ("gpu_{i}_sm_clock_mhz", 1.0),
    "proc.memory": ("gpu_{i}_process_memory_usage_megabytes", MB),
}


def _run_tags(run: RunInfo) -> dict[str, str]:
    return {**run.tags, **{f"trackd.{key}": str(value) for key, value in run.metadata().items()}}


def _source_tags(start: dict[str, Any]) -> dict[str, str]:
    """The tags MLflow's own client sets from the code a run started from (its default and
    git run-context providers): source name and type, git commit, branch, repo URL, dirty."""
    code, env = start.get("code") or {}, start.get("env") or {}
    argv = env.get("argv") or []
    tags = (
        {
            "mlflow.source.name": str(argv[0]) if argv and argv[0] else "<console>",
            "mlflow.source.type": "LOCAL",
        }
        if env
        else {}
    )
    for key, field in (("commit", "commit"), ("branch", "branch"), ("repoURL", "remote")):
        if code.get(field) is not None:
            tags[f"mlflow.source.git.{key}"] = str(code[field])
    if code:
        tags["mlflow.source.git.dirty"] = str(bool(code.get("dirty"))).lower()
    return tags


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config as MLflow params: keys joined with "/", values as MLflow prints them."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, list | dict):
            flat[prefix + key] = json.dumps(value, default=str)
        else:
            flat[prefix + key] = str(value)
    return flat


def _position(value: Any) -> Position:
    segment, offset = value
    return int(segment), int(offset)


def _point(metric: Any) -> Point:
    return int(metric.step), int(metric.timestamp), _identity(float(metric.value))


def _identity(value: float) -> float | str:
    """A value as stored: SQL stores keep NaN as a flag and clamp infinities to the float max."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return math.copysign(1.7976931348623157e308, value)
    return value


def _non_finite(value: float) -> str:
    """NaN or an infinity as protobuf's JSON mapping writes a double: as a string."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _tracking_store(client: Any) -> Any:
    """``MlflowClient._tracking_client.store`` (private; see `_rest_call_endpoint`), or None."""
    return getattr(getattr(client, "_tracking_client", None), "store", None)


def _rest_call_endpoint(store: Any, rest_store: type[Any]) -> CallEndpoint | None:
    """The REST store's request call, for metric batches sent as prebuilt JSON (see
    `_log_metrics`); None where there is none (a non-HTTP store, or an MLflow without it).

    MLflow's private names this sink uses, all listed here (tests/test_sdk_private_names.py
    fails naming each when MLflow changes it; pyproject.toml bounds the version):

    * ``MlflowClient._tracking_client.store``: the client's tracking store (`_tracking_store`),
      also asked for `get_metric_history_bulk_interval` where there is no REST call;
    * ``RestStore._call_endpoint(api, json_body)``: one request with MLflow's credentials,
      TLS settings and error codes. Without either, metrics go through the public
      ``MlflowClient.log_batch``: slower, nothing lost;
    * ``mlflow.utils.rest_utils.http_request``, wrapped once per process by
      `_use_http_settings` so that each sink's calls use its own retries and timeout
      (the REST store looks it up on every call), and a metric batch's body goes out as
      the sink encoded it. Without it, MLflow's own settings apply.
    """
    call: CallEndpoint | None = getattr(store, "_call_endpoint", None)
    return call if isinstance(store, rest_store) else None


CallEndpoint = Callable[[type[Any], str], object]


@functools.cache
def _errors() -> ErrorTable:
    """MLflow's and its HTTP stack's exceptions as retriable or permanent (made once the
    sink has imported MLflow)."""
    import requests
    from mlflow.exceptions import MlflowException

    return ErrorTable(
        "mlflow",
        {
            MlflowException: _mlflow_retriable,
            requests.HTTPError: response_retriable,  # one without a response: as an OSError
            requests.ConnectionError: True,
            requests.Timeout: True,
            OSError: is_retriable_os_error,
        },
    )


def _mlflow_retriable(exc: BaseException) -> bool:
    """By the HTTP status MLflow gives the exception's error code (unknown: a 500)."""
    from mlflow.exceptions import ERROR_CODE_TO_HTTP_STATUS

    return retriable_status(ERROR_CODE_TO_HTTP_STATUS.get(getattr(exc, "error_code", ""), 500))


# .settings: the http_request arguments of the sink calling; .body: a log_batch call's
# encoded body, sent in place of the JSON `call_endpoint` passes (see `_log_metrics`)
_REQUESTS = threading.local()


@contextlib.contextmanager
def _http_settings_in_this_thread(settings: dict[str, int]) -> Iterator[None]:
    """This sink's settings for the calls in the block; the thread's own come back after it
    (a thread that is not the sink's, e.g. a caller's in a test, keeps MLflow's defaults)."""
    previous = getattr(_REQUESTS, "settings", {})
    _use_http_settings(settings)
    try:
        yield
    finally:
        _REQUESTS.settings = previous


def _use_http_settings(settings: dict[str, int]) -> None:
    """Make this thread's MLflow requests use `settings` (the thread runs one sink's calls).

    MLflow reads its retries and timeout from the process environment on every request,
    unless they are passed to `http_request`, which its REST store never does; clients of
    one tracking URI even share one store. So `http_request` is wrapped, once per process,
    to pass the settings of the sink whose thread is calling; a thread no sink set up goes
    on as before.
    """
    from mlflow.utils import rest_utils

    _REQUESTS.settings = settings
    if getattr(rest_utils.http_request, "trackd_http", False):
        return
    request: Any = rest_utils.http_request

    @functools.wraps(request)  # its signature stays MLflow's (the contract test reads it)
    def http_request(*args: Any, **kwargs: Any) -> Any:
        for argument, value in getattr(_REQUESTS, "settings", {}).items():
            if kwargs.get(argument) is None:
                kwargs[argument] = value
        body = getattr(_REQUESTS, "body", None)
        if body is not None and "json" in kwargs:
            _REQUESTS.body = None  # taken: `_log_metrics` sees it was sent
            del kwargs["json"]
            kwargs["data"] = body
            headers = kwargs.get("extra_headers") or {}
            kwargs["extra_headers"] = {**headers, "Content-Type": "application/json"}
        return request(*args, **kwargs)

    http_request.trackd_http = True  # type: ignore[attr-defined]
    rest_utils.http_request = http_request
