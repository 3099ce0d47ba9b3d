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
* system samples -> Aim's system metrics (`__system__cpu`, `__system__gpu` with context
  {"gpu": I}, ...), what its resource tracker would record in the training process;
  Aim's own tracker, terminal capture and system params are off: the daemon is not the
  training process. Console records are stored as its terminal capture stores
  them (``LogLine`` values in the ``logs`` sequence, a step per line), and the
  run_start's ``code``/``env`` (init(save_code=True)) as params ``trackd.code`` /
  ``trackd.env`` and as Aim's ``__system_params`` (git_info, executable, arguments).

Exactly once with one small checkpoint: the next terminal-log step of each run, so
that console lines re-sent after a crash land on their own steps; a run_start sent
again finds its session's first step in the run (param ``trackd.console_steps``).
Otherwise no checkpoint is needed: Aim keeps
a metric's values keyed by step (a hash of it), so tracking the same key at the same
step again overwrites the value in place instead of adding a point; the sequence's
count and last value move only for a higher step. Params and tags are set, not
appended. So every record re-sent after a crash or a failed write lands on itself.
What remains is knowing that a write is stored before ``write()`` returns:

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

Behind an authenticating proxy (a remote repo only): ``headers`` (a TOML table, or a JSON
object in a spec string) and ``headers_env`` (a table of header name -> the name of an
environment variable of the daemon holding its value, so the secret stays out of the
config file) are sent with every request and WebSocket upgrade. The variables the NTN
setup's clients read are honoured when set in the daemon's environment:
``CF_ACCESS_CLIENT_ID`` / ``CF_ACCESS_CLIENT_SECRET`` (headers ``CF-Access-Client-Id`` /
``CF-Access-Client-Secret``), ``AIM_AUTH_TOKEN`` (``Authorization: Bearer ...``) and
``AIM_CUSTOM_HEADERS`` (a JSON object); ``headers`` and then ``headers_env`` override
them. A 401/403 from the proxy is a retried error naming the status in ``trackd status``.

Errors: a value Aim refuses (TypeError/ValueError, e.g. a sequence changing type):
permanent. Locks, connections, timeouts, the server's errors and OS errors: retriable.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trackd.sinks.base import (
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    call_mapped,
    handles,
    is_retriable_os_error,
    retriable_status,
)
from trackd.sinks.markdown import markdown_table
from trackd.sinks.media_files import read_table
from trackd.sinks.notices import Notices
from trackd.sinks.paths import relative_path
from trackd.sinks.runmap import RunMap
from trackd.sinks.stored_files import stored_file
from trackd.sinks.system_samples import since_run_start, system_node

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
    known_options = ("timeout", "artifacts_uri", "headers", "headers_env")

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
        self._headers = remote_headers(options, os.environ) if self._remote else {}
        if not self._remote and ("headers" in options or "headers_env" in options):
            raise ValueError("aim sink: headers and headers_env are for a remote repo (aim://)")
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
        from aim.ext.resource.log import LogLine

        self._log_line: type[Any] = LogLine
        self._log_steps: dict[str, int] = dict((context.state or {}).get("log_steps", {}))
        self._repo: Any = _call(self._connect)
        self._confirmation = _Confirmation(self._repo) if self._remote else None
        if self._artifacts_uri is None:
            beside = context.state_dir if self._remote else Path(self.target).expanduser()
            name = "artifacts" if self._remote else "aim-artifacts"
            self._artifacts_uri = (beside.resolve() / name).as_uri()

    def _connect(self) -> Any:
        """The repo: a remote one connects to its server now; a local one is created if new."""
        if self._remote:
            return _remote_repo(self._aim, self.target, self._headers)
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
        info = record.run
        run, created = self._run(info)
        if record.type == "run_start" and not created:
            self._start(run, info)
        handler = self.handler(record.type)
        if handler is not None:
            handler(run, info, record.body)

    # --- one handler per record type: (the Aim run, its trackd run, the record's body) ---

    @handles("run_start")
    def _on_run_start(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        self._write_code_state(run, body)
        self._start_console_session(run, info.id, float(body.get("started") or info.started))

    @handles("metrics")
    def _on_metrics(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        for step, ts, values in body["rows"]:
            self._track(run, step, ts, values)

    @handles("config")
    def _on_config(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        _set_params(run, "hparams", body["values"])

    @handles("summary")
    def _on_summary(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        _set_params(run, "summary", body["values"])

    @handles("tags")
    def _on_tags(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        self._set_tags(run, info.id, body["values"])

    @handles("run_end")
    def _on_run_end(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        ended = {"status": body["status"], "error": body.get("error"), "ended": body["ended"]}
        _set_params(run, "trackd", ended)
        self._close_run(info.id)
        self._log_steps.pop(info.id, None)

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

    @handles("system")
    def _write_system(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        """A sample as Aim's resource tracker stores it: `__system__NAME`, a GPU's with
        context {"gpu": I}, another node's (not rank 0's) with {"node": NODE} as well; at
        step = milliseconds since the run started (Aim keys a value by its step, so two
        samples must never share one; its own tracker counts them instead)."""
        node = system_node(info, body["node"])
        step = max(0, int((body["ts"] - info.started) * 1000))
        by_context: dict[int | None, dict[str, float]] = {}
        for key, value in since_run_start(body).items():
            gpu: int | None = None
            name = _SYSTEM_NAMES.get(key)
            if key.startswith("gpu."):
                index, _, rest = key[4:].partition(".")
                gpu, name = (int(index), _GPU_NAMES.get(rest)) if index.isdigit() else (None, None)
            if name is not None:
                by_context.setdefault(gpu, {})[f"__system__{name}"] = value
        for gpu, values in by_context.items():
            context = ({} if gpu is None else {"gpu": gpu}) | ({"node": node} if node else {})
            self._track(run, step, body["ts"], values, context=context or None)

    def _track(
        self,
        run: Any,
        step: int,
        ts: float,
        values: dict[str, Any],
        media: bool = False,
        context: dict[str, Any] | None = None,
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
            run.track(numbers, step=step, context=context)
        else:
            track(numbers, ts, None, step, None, context=context)
        self._sent()

    def _start_console_session(self, run: Any, run_id: str, started: float) -> None:
        """The first terminal-log step of this session of the run, kept in the run itself
        (param `trackd.console_steps.SESSION`): a run_start delivered again after a crash
        finds it, so the session's lines, re-sent after it, land on the steps they had."""
        key = ("trackd", "console_steps", f"{started:.6f}".replace(".", "_"))
        base = run.get(key)
        if not isinstance(base, int):
            logs = run.get_terminal_logs()
            base = logs.last_step() + 1 if logs else 0
            run[key] = base
        self._log_steps[run_id] = base

    @handles("console")
    def _write_console(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        """Console lines as Aim's own terminal capture stores them: `LogLine`s in the run's
        `logs` sequence (empty context), one step per line, with the line's time, counted
        from the session's first step (`_start_console_session`); a run whose start this
        sink never saw continues after the lines Aim holds (as Aim does on resume)."""
        step = self._log_steps.get(info.id)
        if step is None:
            logs = run.get_terminal_logs()
            step = logs.last_step() + 1 if logs else 0
        for ts, _, text in body["lines"]:
            self._track(run, step, ts, {"logs": self._log_line(text)}, media=True)
            step += 1
        self._log_steps[info.id] = step

    def _write_code_state(self, run: Any, body: dict[str, Any]) -> None:
        """init(save_code=True)'s code and env: params `trackd.code` / `trackd.env`, and
        `__system_params` as Aim's own `log_system_params` fills it (git_info, executable,
        arguments) so Aim's run page shows them where it shows its own."""
        code, env = body.get("code"), body.get("env")
        if code is None and env is None:
            return
        _set_params(run, "trackd", {"code": code, "env": env})
        code, env = code or {}, env or {}
        system: dict[str, Any] = {
            "git_info": {
                "branch": code.get("branch"),
                "remote_origin_url": code.get("remote"),
                "commit": {"hash": code.get("commit"), "timestamp": None, "author": None},
            }
            if code
            else {},
            "executable": env.get("executable"),
            "arguments": env.get("argv"),
        }
        if env.get("cuda_visible_devices") is not None:
            system["env_variables"] = {"CUDA_VISIBLE_DEVICES": env["cuda_visible_devices"]}
        run["__system_params"] = system

    def checkpoint(self) -> dict[str, Any]:
        """The next terminal-log step of each run with console lines: records re-sent from
        the saved cursor land on the steps they had, overwriting themselves."""
        return {"log_steps": dict(self._log_steps)}

    @handles("artifact")
    def _log_artifact(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
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

    @handles("alert")
    def _write_alert(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
        """Into the run's log records (`run.log_warning`'s sequence, the UI's Logs tab). The
        step is the alert's time in microseconds, so a re-sent alert lands on itself."""
        from aim.sdk.logging.log_record import LogRecord

        text = body["title"] + (f": {body['text']}" if body["text"] else "")
        level = ALERT_LOG_LEVELS[body["level"]]
        value = LogRecord(text, level, timestamp=body["ts"], logger_info=("trackd.alert", 0))
        step = round(body["ts"] * 1_000_000)
        self._track(run, step, body["ts"], {"__log_records": value}, media=True)

    @handles("media")
    def _media(self, run: Any, info: RunInfo, body: dict[str, Any]) -> None:
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


# trackd's sample names -> Aim's resource tracker's (aim/ext/resource/stat.py: `cpu` is the
# process's CPU %, as there); names Aim's tracker does not have follow its pattern.
_SYSTEM_NAMES = {
    "proc.cpu": "cpu",
    "memory.percent": "memory_percent",
    "proc.memory.percent": "p_memory_percent",
    "disk.percent": "disk_percent",
    "cpu": "node_cpu",
    "memory.used": "memory_used",
    "proc.rss": "p_memory_rss",
    "proc.threads": "p_threads",
    "swap.percent": "swap_percent",
    "network.sent": "network_sent",
    "network.recv": "network_recv",
}
_GPU_NAMES = {
    "util": "gpu",
    "memory.percent": "gpu_memory_percent",
    "temp": "gpu_temp",
    "power": "gpu_power_watts",
    "power.percent": "gpu_power_percent",
    "memory.used": "gpu_memory_used",
    "clock.sm": "gpu_sm_clock",
    "proc.memory": "gpu_p_memory_used",
}


SEED_HEADERS = {
    "CF_ACCESS_CLIENT_ID": "CF-Access-Client-Id",
    "CF_ACCESS_CLIENT_SECRET": "CF-Access-Client-Secret",
}


def remote_headers(options: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The headers for a remote repo: the NTN setup's variables, then `headers`, then
    `headers_env` (see the module docstring); a bad option is a ValueError naming it."""
    headers = {
        name: environ[variable] for variable, name in SEED_HEADERS.items() if environ.get(variable)
    }
    if environ.get("AIM_AUTH_TOKEN"):
        headers["Authorization"] = f"Bearer {environ['AIM_AUTH_TOKEN']}"
    if environ.get("AIM_CUSTOM_HEADERS"):
        headers |= _header_table(environ["AIM_CUSTOM_HEADERS"], "the AIM_CUSTOM_HEADERS variable")
    headers |= _header_table(options.get("headers", "{}"), "option headers")
    for name, variable in _header_table(
        options.get("headers_env", "{}"), "option headers_env"
    ).items():
        value = environ.get(variable)
        if value is None:
            raise ValueError(
                f"aim sink: option headers_env: the variable {variable!r} (for header {name!r})"
                " is not set in the daemon's environment"
            )
        headers[name] = value
    return headers


def _header_table(text: str, where: str) -> dict[str, str]:
    try:
        table = json.loads(text)
    except ValueError:
        table = None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f'aim sink: {where} must be a table of strings, e.g. {{"X-Name": "..."}}')
    return {str(name): value for name, value in table.items()}


def _refusal(target: str, headers: dict[str, str]) -> SinkError | None:
    """A clear error if the server, or a proxy in front of it, refuses our requests with
    401/403 (Aim itself would fail on reading the refusal as JSON, naming neither)."""
    import requests

    for scheme in ("http", "https"):  # as Aim's client probes the server
        url = f"{scheme}://{target.removeprefix(REMOTE)}/status/"
        try:
            response = requests.get(url, headers=headers, timeout=10, allow_redirects=False)
        except requests.RequestException:
            continue  # no answer: Aim's own connection error says that
        if response.status_code in (401, 403):
            break
        if response.ok:
            return None
    else:
        return None
    sent = ", ".join(sorted(headers)) or "none"
    return SinkError(
        f"aim: {target} answered {response.status_code} {response.reason}: an access proxy"
        f" refuses the headers sent (headers: {sent}); set the sink's headers/headers_env or"
        " CF_ACCESS_CLIENT_ID/CF_ACCESS_CLIENT_SECRET, AIM_AUTH_TOKEN, AIM_CUSTOM_HEADERS",
        retriable=True,
    )


_CLIENT_SWAP = threading.Lock()


def _remote_repo(aim: Any, target: str, headers: dict[str, str]) -> Any:
    """A remote repo whose client sends `headers` with every request.

    Aim's ``Client`` keeps its headers in ``request_headers``, but sets it to ``{}`` in
    its constructor, which already makes requests (a proxy answers them 401), and its
    ``refresh_ws`` (a reconnect after the server or proxy went away) opens the WebSocket
    without them. So, the private uses, listed here: a subclass whose ``request_headers``
    are this sink's (Aim's assignment ignored) and whose ``refresh_ws`` reconnects through
    the ``ws`` property, which sends them; and ``aim.sdk.repo.Client``, the name the Repo
    constructor looks its client class up by, pointed at the subclass while this repo is
    made (under a lock, restored at once: another repo gets Aim's own client).
    """
    refused = _refusal(target, headers)
    if refused is not None:
        raise refused
    if not headers:
        return aim.Repo(target)
    from aim.ext.transport.client import Client
    from aim.sdk import repo

    repo_module: Any = repo

    class HeaderClient(Client):
        @property
        def request_headers(self) -> dict[str, str]:
            return dict(headers)

        @request_headers.setter
        def request_headers(self, value: dict[str, str]) -> None:
            pass  # Aim's own `{}`

        def refresh_ws(self) -> None:
            self._ws = None
            _ = self.ws  # connects now, with the headers, as Aim's refresh_ws would without

    with _CLIENT_SWAP:
        previous, repo_module.Client = repo_module.Client, HeaderClient
        try:
            return aim.Repo(target)
        finally:
            repo_module.Client = previous


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
    return call_mapped(_ERRORS, function, *args)


def _response_retriable(exc: BaseException) -> bool | None:
    """An HTTP error from the server (requests' errors are OSErrors); 401/403: credentials
    an operator (or the proxy's owner) can fix, not a bad record."""
    code = getattr(getattr(exc, "response", None), "status_code", None)
    if not isinstance(code, int):
        return None
    return code in (401, 403) or retriable_status(code)


_ERRORS = ErrorTable(
    "aim",
    {TypeError: False, ValueError: False, OSError: is_retriable_os_error, RuntimeError: True},
    # Where the SDK's own errors come from: Aim, its RocksDB binding, its transport.
    sdk_modules=frozenset({"aim", "aimrocks", "requests", "urllib3", "websockets", "filelock"}),
    first=_response_retriable,
)
