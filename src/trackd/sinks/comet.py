"""Comet sink: each trackd run is one Comet experiment, written through the comet-ml SDK.

Spec: ``comet:PROJECT[?mode=offline|online&workspace=W&offline_directory=D&timeout=S]``
(or a table with ``project = ...``). ``*`` (or an empty target) means each run goes to
the Comet project named after its trackd project. The default mode is offline: Comet's
``OfflineExperiment`` writes an archive per session under ``offline_directory``
(default ``STATE_DIR/archives``, the sink's own state directory), which ``comet upload``
sends later: the air-gapped path Comet users know. ``mode=online`` sends as it goes
(an API key from ``COMET_API_KEY`` or Comet's config file is needed; without one, or
without a reachable server, the sink retries with the reason in ``trackd status``).

How runs appear:

* one trackd run = one Comet experiment, named like the run. Its key (32 hex digits,
  derived from the trackd run id, kept in a RunMap) survives restarts: the first
  session creates the experiment (``OfflineExperiment`` / ``Experiment`` with
  ``experiment_key=``), every later one (a daemon restart, ``resume="allow"``)
  continues it (``ExistingOfflineExperiment`` / ``ExistingExperiment``). Offline, the
  first session's archive is ``KEY.zip`` and session N's ``KEY-N.zip``: upload
  ``KEY.zip`` first, it creates the experiment the others add to.
* config -> parameters (nested dicts as Comet nests them, ``a|b``); tags -> Comet tags
  ``name:value`` (``name`` if the value is empty); the run's metadata ->
  others ``trackd.run_id``, ``trackd.host``, ...; summary -> others; metrics -> Comet
  metrics at their step (Comet stamps them with the delivery time: its SDK takes no
  timestamp). The end -> others ``trackd.status`` and ``trackd.error`` (the
  traceback of a failed run), then the session ends.
* media: images -> ``log_image`` at their step, named by their key; tables ->
  ``log_table`` as ``KEY-STEP.csv``; videos -> ``log_video`` at their step; the caption
  goes to the asset's metadata. Artifacts -> ``log_asset`` named by the artifact's name,
  with ``metadata["trackd.artifact"]`` = {name, sha256}.
* Console capture, system metrics, git and code logging, and every auto-logger are
  off: the daemon is not the training process.

Exactly once. The SDK queues messages to a thread that appends them, a JSON line each,
to ``messages.json`` in the session's directory; its archive is made only when the
session ends. So the sink keeps, in a small fsynced file (``marks.json``), the WAL
position of the last record it handed over (``done``) and, per live session, the size
of ``messages.json`` that holds exactly the records up to ``done``. After every
batch it waits until each queued message is a line of the file (the line count
reaching the streamer's message count), fsyncs the file and the assets copied beside
it, and only then moves the marks. Records at or before ``done`` are skipped: a batch
retried after an error, or re-sent from an older cursor after a crash, lands once.
A session whose daemon died is salvaged when the sink opens: ``messages.json`` cut
back to its marked size becomes the session's archive (with the assets its lines
name and Comet's own ``experiment.json``); a session that died while its archive was
being written is archived the same way, from the complete archive if there is one.
A session whose messages could not all be written (a full disk) is salvaged the same
way at once, and the batch is retried in a new session. Online, a batch is done once
``Experiment.flush()`` has sent it.

Errors: a value the SDK refuses (TypeError/ValueError), a stored file that is gone:
permanent. No API key, no server, a session that did not start, a write not confirmed
in ``timeout`` seconds (default 60), OS errors: retriable.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
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
    response_retriable,
)
from trackd.sinks.media_files import read_table
from trackd.sinks.notices import Notices
from trackd.sinks.runmap import RunMap
from trackd.sinks.stored_files import fsync_directory, stored_file

log = logging.getLogger("trackd.sinks.comet")
MODES = ("offline", "online")
DEFAULT_TIMEOUT = 60.0
MESSAGES = "messages.json"  # the SDK's names inside a session directory and its archive
META = "experiment.json"
ARTIFACT_KEY = "trackd.artifact"
POLL_SECONDS = 0.005
# The daemon is not the training process: no auto-logging, environment or code capture.
QUIET: dict[str, Any] = {
    "log_code": False,
    "log_graph": False,
    "auto_param_logging": False,
    "auto_metric_logging": False,
    "parse_args": False,
    "auto_output_logging": False,
    "log_env_details": False,
    "log_git_metadata": False,
    "log_git_patch": False,
    "log_env_gpu": False,
    "log_env_host": False,
    "log_env_cpu": False,
    "display_summary_level": 0,
}


class CometSink(Sink):
    kind = "comet"
    target_key = "project"
    known_options = ("mode", "workspace", "offline_directory", "timeout")

    def __init__(self, target: str, **options: str) -> None:
        super().__init__(target, **options)
        self._mode = self.choice("mode", MODES, "offline")
        try:
            self._timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        except ValueError:
            raise ValueError(
                f"comet sink: timeout must be seconds, not {options['timeout']!r}"
            ) from None
        self._workspace = options.get("workspace") or None
        self._offline_directory = options.get("offline_directory") or None
        self._notices = Notices("comet")

    def open(self, context: SinkContext) -> None:
        hook = sys.excepthook
        try:
            import comet_ml
        except ImportError as exc:
            raise SinkError(f"comet: {exc}; pip install 'trackd[comet]'", retriable=False) from exc
        finally:
            sys.excepthook = hook  # comet_ml chains its own hook in at import: the daemon's stays
        self._comet: Any = comet_ml
        self._sdk = _Sdk(comet_ml)
        state_dir = context.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        default = state_dir / "archives"
        self._archives = Path(self._offline_directory or default).expanduser()
        self._archives.mkdir(parents=True, exist_ok=True)
        self._sessions_dir = state_dir / "sessions"
        self._keys = RunMap(state_dir / "experiments.json")
        self._marks = _Marks.load(state_dir / "marks.json")
        self._live: dict[str, _Live] = {}
        for run_id, run in self._marks.runs.items():
            if run.live is not None:
                _call(self._salvage, run_id, run)
        if self._mode == "online" and not self._sdk.api_key():
            raise SinkError(
                "comet: online mode needs an API key (COMET_API_KEY or ~/.comet.config);"
                " retrying until one is configured",
                retriable=True,
            )

    # --- delivery -----------------------------------------------------------------------

    def write(self, batch: list[Record]) -> None:
        done = self._marks.done
        try:
            for record in batch:
                if done is not None and tuple(record.position) <= done:
                    continue  # handed over already: a retried batch or a re-sent one
                _call(self._apply, record)
                done = tuple(record.position)
        except _Abandoned:
            raise  # the sessions were archived as of their marks: the rest is sent again
        except BaseException:
            if done != self._marks.done:
                self._settle(done)  # what went before the failed record stays handed over
            raise
        if done != self._marks.done:
            self._settle(done)

    def _apply(self, record: Record) -> None:
        run, body = record.run, record.body
        marks = self._marks.runs.get(run.id)
        if marks is not None and marks.ended is not None:
            if record.type != "run_start" or float(body["started"]) <= marks.ended:
                return  # a record of a session that ended (its archive is made)
            marks.ended = None  # a resumed trackd run: a new session
        live = self._live.get(run.id) or self._start(run)
        handler = self.handler(record.type)
        if handler is None:  # system samples, console lines, alerts: not sent to Comet yet
            self._notices(f"{record.type} records are not sent to Comet; skipped")
            return
        handler(live, record)

    # --- one handler per record type: (the run's live experiment, the record) ---

    @handles("run_start")
    def _on_run_start(self, live: _Live, record: Record) -> None:
        live.experiment.log_parameters(record.run.config)
        self._add_tags(live, record.run.tags)

    @handles("metrics")
    def _on_metrics(self, live: _Live, record: Record) -> None:
        for step, _ts, values in record.body["rows"]:
            numbers = {k: _number(v) for k, v in values.items() if isinstance(v, int | float)}
            if len(numbers) < len(values):
                self._notices("values that are not numbers are not sent to Comet")
            live.experiment.log_metrics(numbers, step=step)

    @handles("config")
    def _on_config(self, live: _Live, record: Record) -> None:
        live.experiment.log_parameters(record.body["values"])

    @handles("tags")
    def _on_tags(self, live: _Live, record: Record) -> None:
        self._add_tags(live, record.body["values"])

    @handles("summary")
    def _on_summary(self, live: _Live, record: Record) -> None:
        live.experiment.log_others(record.body["values"])

    @handles("media")
    def _on_media(self, live: _Live, record: Record) -> None:
        self._media(live.experiment, record.body)

    @handles("artifact")
    def _on_artifact(self, live: _Live, record: Record) -> None:
        body = record.body
        source = stored_file(body, "comet")
        marked = {"name": body["name"], "sha256": body.get("sha256") or source.name}
        live.experiment.log_asset(
            str(source), file_name=body["name"], metadata={ARTIFACT_KEY: marked}
        )

    @handles("run_end")
    def _on_run_end(self, live: _Live, record: Record) -> None:
        body = record.body
        error = body.get("error")
        live.experiment.log_others({"trackd.status": body["status"], "trackd.error": error})
        self._settle(tuple(record.position))
        self._end(record.run.id, float(body["ended"]))

    def _start(self, run: RunInfo) -> _Live:
        """Start the run's next Comet session: the experiment is created by its first."""
        key = self._keys.get(run.id)
        if key is None:
            key = hashlib.sha256(run.id.encode()).hexdigest()[:32]
            self._keys.set(run.id, key)
        marks = self._marks.runs.setdefault(run.id, _RunMarks())
        project = run.project if self.target in ("", "*") else self.target
        session = _Session(
            key=key,
            number=marks.sessions,
            project=project,
            workspace=self._workspace,
            directory=str(self._sessions_dir / f"{key}-{marks.sessions}"),
            started=int(time.time() * 1000),
        )
        marks.sessions += 1
        if self._mode == "offline":
            marks.live = session
        self._marks.save()  # before the SDK writes: a crash now leaves a session to salvage
        if self._mode == "offline":
            experiment = self._sdk.offline(session)
        else:
            experiment = self._sdk.online(session)
        if not experiment.alive:
            # Nothing was logged: the next try is this session again, not a later one.
            marks.sessions, marks.live = session.number, None
            self._marks.save()
            shutil.rmtree(session.directory, ignore_errors=True)
            url = self._sdk.url()
            raise SinkError(
                f"comet: experiment {key} did not start (is {url} reachable?)", retriable=True
            )
        experiment.set_name(run.name)
        experiment.log_others({f"trackd.{k}": v for k, v in run.metadata().items()})
        if marks.tags:
            experiment.add_tags(marks.tags)  # a session's archive carries the tags it was given
        live = self._live[run.id] = _Live(run.id, experiment, session)
        return live

    def _add_tags(self, live: _Live, tags: dict[str, str]) -> None:
        marks = self._marks.runs[live.run_id]
        labels = [f"{name}:{value}" if value else name for name, value in tags.items()]
        new = [label for label in labels if label not in marks.tags]
        if new:
            live.experiment.add_tags(new)
            marks.tags += new

    def _media(self, experiment: Any, body: dict[str, Any]) -> None:
        key, step, kind = body["key"], body["step"], body["kind"]
        if kind == "histogram":
            self._write_histogram(experiment, body)
            return
        source = stored_file(body, "comet")
        metadata = {"caption": body["caption"]} if body.get("caption") else None
        if kind == "table":
            table = read_table(source)
            experiment.log_table(f"{key}-{step}.csv", table["data"], headers=table["columns"])
        elif kind == "video":
            experiment.log_video(
                str(source), name=key, step=step, format=body["format"], metadata=metadata
            )
        elif kind == "image":
            experiment.log_image(str(source), name=key, step=step, metadata=metadata)
        else:
            self._notices(f"{kind} media have no Comet form here; skipped")

    def _write_histogram(self, experiment: Any, body: dict[str, Any]) -> None:
        """Comet's 3D histogram at the step: each bin's midpoint added with its count, the
        form Comet's Histogram takes when converting TensorBoard's (ordered values+counts)."""
        counts, edges = body["counts"], body["edges"]
        histogram = self._comet.Histogram()
        if counts:
            middles = [(low + high) / 2 for low, high in itertools.pairwise(edges)]
            histogram.add(middles, counts=counts)
        experiment.log_histogram_3d(histogram, name=body["key"], step=body["step"])

    # --- durability ---------------------------------------------------------------------

    def _settle(self, done: tuple[int, ...] | None) -> None:
        """Wait until every live session holds what was handed to it, then move the marks."""
        sizes = {}
        try:
            for run_id, live in self._live.items():
                if self._mode == "offline":
                    sizes[run_id] = live.settle(self._timeout)
                elif not live.experiment.flush():
                    raise SinkError("comet: the server did not confirm the writes", retriable=True)
        except SinkError as error:
            # What the sessions hold past their marks cannot be told apart: every one is
            # archived as of its mark, and what came after goes to new sessions.
            for run_id in list(self._live):
                self._abandon(run_id)
            raise _Abandoned(str(error), retriable=True) from error
        for run_id, size in sizes.items():
            self._live[run_id].session.size = size
        self._marks.done = done
        self._marks.save()

    def _abandon(self, run_id: str) -> None:
        """Stop a session; archive what it holds for sure (its messages up to its mark)."""
        live = self._live.pop(run_id)
        with contextlib.suppress(Exception):
            live.experiment.streamer.abort_and_wait(self._timeout)
        live.experiment.alive = False  # the SDK's exit hook leaves it alone
        if self._mode == "offline":
            self._salvage(run_id, self._marks.runs[run_id])

    def _end(self, run_id: str, ended: float) -> None:
        """End the session; its archive holds at least what its mark says (its run_end's
        others included), even if the SDK's end fails halfway."""
        live = self._live.pop(run_id)
        marks = self._marks.runs[run_id]
        try:
            live.experiment.end()
        finally:
            if self._mode == "offline":
                self._salvage(run_id, marks)
            marks.ended = ended
            self._marks.save()

    def _salvage(self, run_id: str, marks: _RunMarks) -> None:
        """Make the archive of a session that is over (see the module docstring)."""
        session = marks.live
        if session is None:
            return
        directory = Path(session.directory)
        target = self._archives / session.archive_name
        if not target.exists():
            made = _complete_archive(directory / "out")
            if made is not None:
                shutil.copyfile(made, target.with_suffix(".partial"))
            else:
                self._rebuild(session, marks, target.with_suffix(".partial"))
            _fsync_file(target.with_suffix(".partial"))
            os.replace(target.with_suffix(".partial"), target)
            fsync_directory(target.parent)
        marks.live = None
        self._marks.save()
        shutil.rmtree(directory, ignore_errors=True)
        log.info("comet: session %s of run %s archived as %s", session.number, run_id, target)

    def _rebuild(self, session: _Session, marks: _RunMarks, target: Path) -> None:
        """An archive from a session directory: its messages cut back to the marked size,
        the files those messages name, and Comet's experiment.json."""
        data = Path(session.directory) / "data"
        try:
            with (data / MESSAGES).open("rb") as handle:
                messages = handle.read(session.size)
        except FileNotFoundError:
            messages = b""
        self._sdk.write_meta(data, session, marks.tags)
        with zipfile.ZipFile(target, "w", allowZip64=True) as archive:
            archive.writestr(MESSAGES, messages)
            archive.write(data / META, META)
            for name in _named_files(messages):
                if (data / name).is_file():
                    archive.write(data / name, name)

    def checkpoint(self) -> dict[str, Any]:
        return {}  # marks.json, saved after every batch, is the sink's state

    def close(self) -> None:
        """End every live session: each becomes an archive; the next record resumes it."""
        for run_id in list(self._live):
            try:
                live = self._live[run_id]
                if self._mode == "offline":
                    live.session.size = live.settle(self._timeout)
                    self._marks.save()
                self._live.pop(run_id)
                live.experiment.end()
                if self._mode == "offline":
                    self._salvage(run_id, self._marks.runs[run_id])
            except Exception:
                log.exception("comet: closing the session of run %s", run_id)
        self._live.clear()


class _Abandoned(SinkError):
    """Sessions stopped and archived as of their marks: nothing of the batch is settled."""


@dataclass
class _Session:
    """One session of a Comet experiment: where its SDK writes, and what it holds for sure."""

    key: str
    number: int
    project: str
    workspace: str | None
    directory: str  # data/ is the SDK's session directory, out/ where its archive goes
    started: int  # ms, as Comet stamps
    size: int = 0  # bytes of data/messages.json that hold the records up to `done`

    @property
    def archive_name(self) -> str:
        return f"{self.key}.zip" if self.number == 0 else f"{self.key}-{self.number}.zip"


@dataclass
class _RunMarks:
    sessions: int = 0  # how many sessions the experiment has had
    live: _Session | None = None
    tags: list[str] = field(default_factory=list)  # every label the experiment was given
    ended: float | None = None  # when its trackd run ended (a later record is re-sent)


@dataclass
class _Marks:
    """What the sink has handed over, durable: saved (fsynced, atomically) after each batch."""

    path: Path
    done: tuple[int, ...] | None = None
    runs: dict[str, _RunMarks] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _Marks:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path)
        runs = {}
        for run_id, value in saved["runs"].items():
            live = value.pop("live")
            runs[run_id] = _RunMarks(**value, live=_Session(**live) if live else None)
        done = saved["done"]
        return cls(path, tuple(done) if done is not None else None, runs)

    def save(self) -> None:
        runs = {run_id: asdict(run) for run_id, run in self.runs.items()}
        text = json.dumps({"done": self.done, "runs": runs})
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


class _Live:
    """A session's experiment and how far its streamer has written."""

    def __init__(self, run_id: str, experiment: Any, session: _Session) -> None:
        self.run_id = run_id
        self.experiment = experiment
        self.session = session
        self._messages = Path(session.directory) / "data" / MESSAGES
        self._scanned = 0
        self._lines = 0
        self._synced: set[str] = set()

    def settle(self, timeout: float) -> int:
        """Wait until every message queued is a line of messages.json; fsync the file and
        the assets beside it; the size that holds them all."""
        wanted = _queued(self.experiment.streamer)
        deadline = time.monotonic() + timeout
        with self._messages.open("rb") as handle:
            while True:
                handle.seek(self._scanned)
                data = handle.read()
                end = data.rfind(b"\n") + 1
                self._lines += data.count(b"\n", 0, end)
                self._scanned += end
                if self._lines >= wanted:
                    break
                if time.monotonic() > deadline or not self.experiment.streamer.is_alive():
                    raise SinkError(
                        f"comet: {wanted - self._lines} messages not written to"
                        f" {self._messages} within {timeout:g}s (disk full?)",
                        retriable=True,
                    )
                time.sleep(POLL_SECONDS)
        directory = self._messages.parent
        for name in os.listdir(directory):
            if name not in self._synced and name != MESSAGES:
                _fsync_file(directory / name)
                self._synced.add(name)
        _fsync_file(self._messages)
        fsync_directory(directory)
        return self._scanned


class _Sdk:
    """The comet-ml calls, with the SDK's private names this sink needs listed here, once:

    * ``CometExperiment._setup_streamer``: overridden to put the session directory
      (``tmpdir``, which the SDK makes with ``tempfile.mkdtemp()`` in the system temp
      directory) under the sink's state directory, where a crash cannot lose it;
    * ``BaseStreamer._counter``: how many messages were queued (see `_queued`);
    * ``config.get_global_experiment`` / ``set_global_experiment``: the SDK ends the
      process's "global" experiment when it starts another (one experiment per training
      script), which would end every other run's session in the daemon; so none is
      global while a session starts, and the previous global one (none) is restored.
    """

    def __init__(self, comet_ml: Any) -> None:
        self._comet = comet_ml

        def placed(base: Any) -> Any:
            class Placed(base):  # type: ignore[misc]
                trackd_directory: str
                tmpdir: str

                def _setup_streamer(self) -> bool:
                    os.rmdir(self.tmpdir)  # the empty one the SDK made
                    self.tmpdir = self.trackd_directory
                    return bool(super()._setup_streamer())

            return Placed

        self._offline = placed(comet_ml.OfflineExperiment)
        self._offline_existing = placed(comet_ml.ExistingOfflineExperiment)

    def offline(self, session: _Session) -> Any:
        directory = Path(session.directory)
        shutil.rmtree(directory, ignore_errors=True)  # a session that never wrote a mark
        (directory / "data").mkdir(parents=True)
        (directory / "out").mkdir()
        kind = self._offline if session.number == 0 else self._offline_existing
        kind.trackd_directory = str(directory / "data")
        return self._alongside(
            kind,
            project_name=session.project,
            workspace=session.workspace,
            experiment_key=session.key,
            offline_directory=str(directory / "out"),
            **QUIET,
        )

    def online(self, session: _Session) -> Any:
        kind = self._comet.Experiment if session.number == 0 else self._comet.ExistingExperiment
        return self._alongside(
            kind,
            project_name=session.project,
            workspace=session.workspace,
            experiment_key=session.key,
            **QUIET,
        )

    def _alongside(self, kind: Any, **arguments: Any) -> Any:
        """An experiment started beside the others, none of them ended by it."""
        config = self._comet.config
        with _GLOBAL_EXPERIMENT:
            previous = config.get_global_experiment()
            config.set_global_experiment(None)
            try:
                return kind(**arguments)
            finally:
                config.set_global_experiment(previous)

    def api_key(self) -> str | None:
        config = self._comet.config
        key: str | None = config.get_api_key(None, config.get_config())
        return key

    def url(self) -> str:
        return str(self._comet.config.get_config()["comet.url_override"])

    def write_meta(self, directory: Path, session: _Session, tags: list[str]) -> None:
        from comet_ml import constants, offline_utils

        create, get = constants.RESUME_STRATEGY_CREATE, constants.RESUME_STRATEGY_GET
        offline_utils.write_experiment_meta_file(
            tempdir=str(directory),
            experiment_key=session.key,
            workspace=session.workspace,  # type: ignore[arg-type]  # None: the user's default
            project_name=session.project,
            start_time=session.started,
            stop_time=int(time.time() * 1000),
            tags=tags,
            resume_strategy=create if session.number == 0 else get,
            user_provided_experiment_key=True,
        )


def _number(value: float) -> float:
    """A metric value as Comet takes it: a bool as 0/1 (Comet would store the text "True")."""
    return int(value) if isinstance(value, bool) else value


_GLOBAL_EXPERIMENT = threading.Lock()  # two Comet sinks in one daemon start sessions in turn


def _queued(streamer: Any) -> int:
    """Messages queued to the streamer so far: each becomes one line of messages.json."""
    return int(streamer._counter)


def _complete_archive(directory: Path) -> Path | None:
    """The archive the SDK finished in `directory`, if any (a torn zip has no directory
    at its end, and the empty one the SDK makes at start holds no messages)."""
    for path in directory.glob("*.zip"):
        try:
            with zipfile.ZipFile(path) as archive:
                if MESSAGES in archive.namelist():
                    return path
        except (zipfile.BadZipFile, OSError):
            continue
    return None


def _named_files(messages: bytes) -> list[str]:
    """The files the upload messages of a messages.json name (beside it in the archive)."""
    names = []
    for line in messages.splitlines():
        with contextlib.suppress(ValueError):
            name = json.loads(line).get("payload", {}).get("file_path")
            if isinstance(name, str):
                names.append(os.path.basename(name))
    return names


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _call(function: Any, *args: Any) -> Any:
    """Call the SDK; map what it raises to a SinkError (anything else is a bug here)."""
    return call_mapped(_ERRORS, function, *args)


_ERRORS = ErrorTable(
    "comet",
    {OSError: is_retriable_os_error, TypeError: False, ValueError: False},
    # Where the SDK's own errors come from: Comet and its transport.
    sdk_modules=frozenset({"comet_ml", "requests", "urllib3"}),
    first=response_retriable,
)
