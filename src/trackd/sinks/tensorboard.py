"""TensorBoard sink: each trackd run is one TensorBoard run directory.

    LOGDIR/PROJECT/RUNNAME-RUNID8/events.out.tfevents.trackd.RUNID8

What lands where, all of it readable by TensorBoard's own EventAccumulator:

* metrics rows -> scalars (`simple_value`, as tensorboardX and tf.summary v1
  write them), one event per row, at the row's step and its client wall time;
* the run_start config -> the HParams dashboard (a session start info, in the
  session group of the trackd group, else of the run alone) and, whole, the
  text `trackd/config`; later `log_config()` values -> more `trackd/config`
  text at the run's current step, since TensorBoard keeps the first session
  info of a run and would not show a changed one;
* the run's identity, tags, summary and artifacts (by reference: TensorBoard
  stores no files) -> the texts `trackd/run`, `trackd/tags`, `trackd/summary`,
  `trackd/artifacts`;
* media -> images at the row's step (`add_image`'s form: a PNG in a Summary.Image), a
  GIF video as an animated image (`add_video`'s form, as tensorboardX writes it), a
  table as a markdown text under its key, a histogram as a histogram summary
  (`add_histogram`'s HistogramProto); an MP4 video has no TensorBoard form (a counted
  notice);
* alerts -> rows of the text `trackd/alerts` (TensorBoard has no alerts);
* system samples -> scalars `system/NAME` under trackd's names (`system/cpu`,
  `system/gpu.0.util`, ...), at step = seconds since the run started;
* run_end -> the text `trackd/status` and an HParams session end info
  (STATUS_SUCCESS or STATUS_FAILURE), the status column of the HParams table.

TensorBoard has no run ids: the directory follows from the run, so there is no
RunMap, and a resumed run (same trackd id) appends to the same file.

Exactly once across crashes. TensorBoard reads every record of an events file,
so a batch the fan-out re-sends after a crash must not be appended twice.
Skipping re-sent rows up to a per-run (step, wall time) watermark kept in the
checkpoint would not do: rows written after the last checkpoint are already in
the file when the saved cursor says they are not. So files are cut back instead:

* `checkpoint()` fsyncs what was appended since the last one and returns the
  size of every file still being appended to, with an epoch number;
* before the first append to a file that checkpoint does not cover (a new run,
  a resumed one), the file's size goes to a journal in the state directory,
  fsynced, after a marker of the current epoch;
* `open()` cuts each file back to its size in the saved checkpoint, or else to
  its first journal entry after the saved epoch, and the fan-out re-sends
  from the saved cursor;
* a batch that fails midway is undone the same way before it is retried.

Every recorded size is a frame boundary, so a frame torn by a crash mid-write is
cut with the rest. A TensorBoard watching the directory live may already have
read what recovery cuts; it shows those points twice until it is reloaded.

The SDK (tensorboard) is imported in `open()`; tensorboardX is not needed, since
its writer's background thread and self-named files would defeat the cutting.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trackd.sinks.append_only import AppendOnlyFiles
from trackd.sinks.base import (
    ErrorTable,
    Record,
    RunInfo,
    Sink,
    SinkContext,
    SinkError,
    handles,
    is_retriable_os_error,
    mapped_errors,
)
from trackd.sinks.markdown import markdown_cell, markdown_table
from trackd.sinks.notices import Notices
from trackd.sinks.paths import path_component
from trackd.sinks.system_samples import since_run_start, system_node

_JOURNAL_NAME = "presizes.jsonl"


class TensorboardSink(Sink):
    kind = "tensorboard"
    target_key = "logdir"
    known_options = ()

    def open(self, context: SinkContext) -> None:
        self._encoder = _Encoder()
        self.root = Path(self.target).expanduser()
        state = context.state or {}
        with mapped_errors(_ERRORS, f"cannot prepare {self.root}"):
            self.root.mkdir(parents=True, exist_ok=True)
            context.state_dir.mkdir(parents=True, exist_ok=True)
            self._files = AppendOnlyFiles(self.root, context.state_dir / _JOURNAL_NAME, state)
        # The last step of each open run, so that texts land at the step they belong to.
        self._steps: dict[str, int] = {str(k): int(v) for k, v in state.get("steps", {}).items()}
        self._notices = Notices(self.kind)

    def write(self, batch: list[Record]) -> None:
        pending: dict[str, _Pending] = {}
        with mapped_errors(_ERRORS, "cannot encode a record"):
            for record in batch:
                run = record.run
                if run.id not in pending:
                    pending[run.id] = _Pending(_relative_file(run))
                self._encode(record, pending[run.id])
        with mapped_errors(_ERRORS, "cannot append"):
            try:
                self._files.begin()
                for entry in pending.values():
                    self._files.append(
                        entry.relative, self._encoder.header(), entry.buffer.getvalue()
                    )
            except OSError:
                self._files.undo()
                raise
        for run_id, entry in pending.items():
            if entry.ended:
                self._steps.pop(run_id, None)
                self._files.finish(entry.relative)

    def _encode(self, record: Record, out: _Pending) -> None:
        out.ended = record.type == "run_end"
        handler = self.handler(record.type)
        if handler is None:
            self._notices(f"{record.type} records have no TensorBoard form; skipped")
            return
        handler(record, out, self._steps.get(record.run.id, 0))

    # --- one handler per record type: (the record, the events gathered for its run's
    # file, the run's last step) ---

    @handles("metrics")
    def _on_metrics(self, record: Record, out: _Pending, step: int) -> None:
        for row_step, ts, values in record.body["rows"]:
            numbers = self._numbers(values)
            if numbers:
                out.add(self._encoder.scalars(row_step, ts, numbers))
            step = row_step
        self._steps[record.run.id] = step

    @handles("run_start")
    def _on_run_start(self, record: Record, out: _Pending, step: int) -> None:
        run, encoder = record.run, self._encoder
        out.add(encoder.text("trackd/run", step, run.started, _table(_identity(run))))
        out.add(encoder.hparams(_hparams(run.config), run.group or out.group, run.started))
        if run.config:
            out.add(encoder.text("trackd/config", step, run.started, _table(run.config)))
        if run.tags:
            out.add(encoder.text("trackd/tags", step, run.started, _table(run.tags)))

    @handles("config", "tags", "summary")
    def _on_values(self, record: Record, out: _Pending, step: int) -> None:
        tag = f"trackd/{record.type}"
        out.add(self._encoder.text(tag, step, time.time(), _table(record.body["values"])))

    @handles("artifact")
    def _on_artifact(self, record: Record, out: _Pending, step: int) -> None:
        text = _table({record.body["name"]: record.body["path"]})
        out.add(self._encoder.text("trackd/artifacts", step, time.time(), text))

    @handles("media")
    def _on_media(self, record: Record, out: _Pending, step: int) -> None:
        self._media(record.body, out)

    @handles("alert")
    def _on_alert(self, record: Record, out: _Pending, step: int) -> None:
        self._write_alert(record.body, step, out)

    @handles("system")
    def _on_system(self, record: Record, out: _Pending, step: int) -> None:
        self._write_system(record, out)

    @handles("run_end")
    def _on_run_end(self, record: Record, out: _Pending, step: int) -> None:
        body = record.body
        failed = body["status"] != "finished"
        error = "".join(f"\n    {line}" for line in (body.get("error") or "").splitlines())
        status = body["status"] + (f"\n{error}" if error else "")  # the error as code
        out.add(self._encoder.text("trackd/status", step, body["ended"], status))
        out.add(self._encoder.session_end(failed, body["ended"]))

    def _write_alert(self, body: dict[str, Any], step: int, out: _Pending) -> None:
        """TensorBoard has no alerts: each is a row of the text `trackd/alerts`."""
        text = _table({"level": body["level"], "title": body["title"], "text": body["text"]})
        out.add(self._encoder.text("trackd/alerts", step, body["ts"], text))

    def _write_histogram(self, body: dict[str, Any], out: _Pending) -> None:
        if body["counts"]:
            out.add(self._encoder.histogram(body["key"], body["step"], body["ts"], body))

    def _write_system(self, record: Record, out: _Pending) -> None:
        """A sample as scalars `system/NAME` (trackd's names; `system/NODE/NAME` for a node
        other than rank 0's), at step = whole seconds since the run started."""
        body = record.body
        node = system_node(record.run, body["node"])
        prefix = f"system/{node}/" if node else "system/"
        step = max(0, int(body["ts"] - record.run.started))
        values = {prefix + key: float(value) for key, value in since_run_start(body).items()}
        out.add(self._encoder.scalars(step, body["ts"], values))

    def _media(self, body: dict[str, Any], out: _Pending) -> None:
        if body["kind"] == "histogram":
            self._write_histogram(body, out)
            return
        if body["kind"] == "video" and body["format"] != "gif":
            self._notices(f"{body['format']} videos have no TensorBoard form; skipped")
            return
        try:
            with open(body["path"], "rb") as handle:
                data = handle.read()
        except FileNotFoundError as exc:
            raise SinkError(
                f"tensorboard: media {body['path']!r} is gone", retriable=False
            ) from exc
        step, ts, key = body["step"], body["ts"], body["key"]
        if body["kind"] == "table":
            table = json.loads(data)
            out.add(self._encoder.text(key, step, ts, markdown_table(table, body.get("caption"))))
        else:
            size = (int(body.get("height") or 0), int(body.get("width") or 0))
            out.add(self._encoder.image(key, step, ts, data, size))

    def _numbers(self, values: dict[str, Any]) -> dict[str, float]:
        numbers = {}
        for key, value in values.items():
            if isinstance(value, int | float):
                numbers[key] = float(value)
            else:
                self._notices(f"{type(value).__name__} values are not scalars; skipped")
        return numbers

    def checkpoint(self) -> dict[str, Any]:
        """Make the appended events durable, then describe the files as they now are."""
        return {**self._files.checkpoint(), "steps": dict(self._steps)}

    def close(self) -> None:
        files = getattr(self, "_files", None)
        if files is not None:
            files.close_all()


@dataclass
class _Pending:
    """One run's events of a batch, framed, to be appended in one write."""

    relative: str
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    ended: bool = False

    @property
    def group(self) -> str:
        """The HParams session group of a run without a trackd group: its own directory."""
        return self.relative.rsplit("/", 1)[0]

    def add(self, framed: bytes) -> None:
        self.buffer.write(framed)


class _Encoder:
    """TensorBoard's own protos and record framing, imported when the sink opens."""

    def __init__(self) -> None:
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2  # type: ignore[import-untyped]
            from tensorboard.plugins.hparams import (  # type: ignore[import-untyped]
                api_pb2,
                plugin_data_pb2,
                summary_v2,
            )
            from tensorboard.plugins.hparams import metadata as hparams_metadata
            from tensorboard.plugins.text import metadata as text_metadata  # type: ignore[import-untyped]
            from tensorboard.summary.writer.record_writer import (  # type: ignore[import-untyped]
                RecordWriter,
            )
            from tensorboard.util import tensor_util  # type: ignore[import-untyped]
        except ImportError as exc:
            raise SinkError(
                f"tensorboard: {exc}; install it with pip install 'trackd[tensorboard]'",
                retriable=False,
            ) from exc
        self._event = event_pb2.Event
        self._summary = summary_pb2.Summary
        self._histogram = summary_pb2.HistogramProto
        self._api = api_pb2
        self._plugin_data = plugin_data_pb2
        self._hparams_pb = summary_v2.hparams_pb
        self._hparams_metadata = hparams_metadata
        self._text_metadata = text_metadata.create_summary_metadata("", "")
        self._tensor = tensor_util.make_tensor_proto
        self._record_writer = RecordWriter

    def _frame(self, event: Any) -> bytes:
        buffer = io.BytesIO()
        self._record_writer(buffer).write(event.SerializeToString())
        return buffer.getvalue()

    def header(self) -> bytes:
        """The first record of every events file; its version also stops TensorBoard
        from purging points it would otherwise take for orphans of a restart."""
        return self._frame(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, step: int, wall_time: float, values: dict[str, float]) -> bytes:
        summary = self._summary(
            value=[self._summary.Value(tag=key, simple_value=v) for key, v in values.items()]
        )
        return self._frame(self._event(wall_time=wall_time, step=step, summary=summary))

    def text(self, tag: str, step: int, wall_time: float, markdown: str) -> bytes:
        value = self._summary.Value(
            tag=tag, metadata=self._text_metadata, tensor=self._tensor([markdown])
        )
        summary = self._summary(value=[value])
        return self._frame(self._event(wall_time=wall_time, step=step, summary=summary))

    def image(
        self, tag: str, step: int, wall_time: float, encoded: bytes, size: tuple[int, int]
    ) -> bytes:
        """A PNG, or an animated GIF: TensorBoard's image dashboard shows both."""
        picture = self._summary.Image(
            height=size[0], width=size[1], colorspace=3, encoded_image_string=encoded
        )
        summary = self._summary(value=[self._summary.Value(tag=tag, image=picture)])
        return self._frame(self._event(wall_time=wall_time, step=step, summary=summary))

    def histogram(self, tag: str, step: int, wall_time: float, body: dict[str, Any]) -> bytes:
        """`add_histogram`'s form (a HistogramProto, as tensorboardX writes it): each bucket
        its right edge and count; sum and sum of squares from the bucket centres."""
        counts, edges = body["counts"], body["edges"]
        centres = [(low + high) / 2 for low, high in itertools.pairwise(edges)]
        histogram = self._histogram(
            min=edges[0],
            max=edges[-1],
            num=sum(counts),
            sum=sum(c * x for c, x in zip(counts, centres, strict=True)),
            sum_squares=sum(c * x * x for c, x in zip(counts, centres, strict=True)),
            bucket_limit=edges[1:],
            bucket=counts,
        )
        summary = self._summary(value=[self._summary.Value(tag=tag, histo=histogram)])
        return self._frame(self._event(wall_time=wall_time, step=step, summary=summary))

    def hparams(self, values: dict[str, bool | float | str], group: str, started: float) -> bytes:
        summary = self._hparams_pb(values, trial_id=group, start_time_secs=started)
        return self._frame(self._event(wall_time=started, summary=summary))

    def session_end(self, failed: bool, ended: float) -> bytes:
        api, metadata = self._api, self._hparams_metadata
        status = api.STATUS_FAILURE if failed else api.STATUS_SUCCESS
        info = self._plugin_data.SessionEndInfo(status=status, end_time_secs=ended)
        content = self._plugin_data.HParamsPluginData(session_end_info=info)
        value = self._summary.Value(
            tag=metadata.SESSION_END_INFO_TAG,
            metadata=metadata.create_summary_metadata(content),
            tensor=metadata.NULL_TENSOR,
        )
        summary = self._summary(value=[value])
        return self._frame(self._event(wall_time=ended, summary=summary))


def _relative_file(run: RunInfo) -> str:
    run_dir = f"{path_component(run.project)}/{path_component(run.name)}-{run.id[:8]}"
    return f"{run_dir}/events.out.tfevents.trackd.{run.id[:8]}"


def _identity(run: RunInfo) -> dict[str, Any]:
    fields = {
        "id": run.id,
        "project": run.project,
        "name": run.name,
        "group": run.group,
        "host": run.host,
        "pid": run.pid,
        "rank": run.rank,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(run.started)),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config maps as "a/b" keys, the way the client flattens logged values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _hparams(config: dict[str, Any]) -> dict[str, bool | float | str]:
    """What the HParams plugin can hold: bools, numbers and strings; the rest as JSON."""
    hparams: dict[str, bool | float | str] = {}
    for key, value in _flatten(config).items():
        if value is None:
            continue
        if isinstance(value, bool | int | float | str):
            hparams[key] = value
        else:
            hparams[key] = json.dumps(value, default=str)
    return hparams


def _table(values: dict[str, Any]) -> str:
    """A Markdown table, which TensorBoard's text dashboard renders."""
    rows = ["| key | value |", "| --- | --- |"]
    for key, value in _flatten(values).items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"| {markdown_cell(key)} | {markdown_cell(shown)} |")
    return "\n".join(rows)


# A value the event format cannot hold is permanent; the disk's failures mostly pass.
_ERRORS = ErrorTable(
    "tensorboard", {OSError: is_retriable_os_error, TypeError: False, ValueError: False}
)
