"""Human-readable views for `trackd status` and `trackd runs` (rich tables)."""

from __future__ import annotations

import fnmatch
import math
import time
from collections import deque
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

SPARKS = "▁▂▃▄▅▆▇█"
PIPED_WIDTH = 400
HISTORY = 40


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    seconds = time.time() - timestamp
    return (
        f"{seconds:.0f}s ago"
        if seconds < 120
        else time.strftime("%H:%M:%S", time.localtime(timestamp))
    )


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _console() -> Console:
    """The terminal's width on a terminal; piped (`trackd status | grep`, a log file), as
    wide as the lines are, where rich would cut every table down to 80 columns."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


def print_status(status: dict[str, Any]) -> None:
    console = _console()
    ingest, wal = status["ingest"], status["wal"]
    console.print(
        f"[bold]trackd {status['version']}[/] pid {status['pid']}, up {status['uptime']:.0f}s, "
        f"data {status['data_dir']}"
    )
    console.print(
        f"ingest: {ingest['rows_per_second']:.0f} rows/s, {ingest['rows']} rows in "
        f"{ingest['messages']} messages, {ingest['duplicates']} duplicates, "
        f"{ingest['errors_total']} errors"
        + (f" (last: {ingest['last_error']})" if ingest["last_error"] else "")
    )
    console.print(
        f"wal: {_bytes(wal['bytes'])} in {wal['segments']} segment(s) of "
        f"{_bytes(wal['max_bytes'])} allowed (on_full={wal['on_full']})"
        + (", [red]ingest blocked: the WAL is full[/]" if wal["blocked"] else "")
        + (f", [red]{wal['dropped_rows']} rows dropped[/]" if wal["dropped_rows"] else "")
        + (f", [red]{wal['last_error']}[/]" if wal["last_error"] else "")
    )
    console.print(f"runs: {status['runs']['running']} running, {status['runs']['total']} known")
    _print_system(console, status.get("system"))
    table = Table(
        "sink",
        "lag",
        "delivered rows",
        "calls",
        "retries",
        "dead letters",
        "last success",
        "last error",
    )
    for sink in status["sinks"].values():
        table.add_row(
            sink["spec"],
            f"{sink['lag_records']} rec, {_bytes(sink['lag_bytes'])}, {sink['lag_seconds']:.1f}s",
            str(sink["delivered_rows"]),
            _calls(sink.get("concurrency")),
            str(sink["retries"]),
            str(sink["dead_letters"]),
            _ago(sink["last_success"]),
            sink["last_error"] or "-",
        )
    console.print(table)
    if status.get("alerts"):
        console.print("recent alerts:")
        for alert in status["alerts"]:
            console.print(
                f"  {_ago(alert['ts'])} {alert['project']}/{alert['name']} " + alert_line(alert),
                markup=False,
            )


def _calls(concurrency: dict[str, Any] | None) -> str:
    """A sink's concurrent calls: `3/8 adaptive` is a limit of 3 now, of at most 8."""
    if not concurrency:
        return "-"
    return f"{concurrency['limit']}/{concurrency['ceiling']} {concurrency['mode']}"


def alert_line(body: dict[str, Any]) -> str:
    """One alert as `tail` and `status` show it: `[LEVEL] title: text`."""
    return f"[{body['level']}] {body['title']}" + (f": {body['text']}" if body["text"] else "")


def _print_system(console: Console, system: dict[str, Any] | None) -> None:
    """What the sampler found (once), and the latest node sample."""
    if not system or not system.get("interval"):
        console.print("system metrics: off")
        return
    console.print(
        f"system metrics: every {system['interval']:g}s on {system['node']}, "
        f"{system['samples']} samples stored; {system['found'] or 'starting'}"
        + (f", [red]{system['errors']} failed[/]" if system["errors"] else "")
        + (f", {system['dropped']} dropped (WAL full)" if system["dropped"] else "")
    )
    latest = system.get("latest")
    if latest:
        shown = ", ".join(f"{key} {value:.4g}" for key, value in sorted(latest["values"].items()))
        console.print(f"  latest ({_ago(latest['ts'])}): {shown}", highlight=False)


def print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table("project", "name", "id", "status", "rows", "last step", "started")
    for run in sorted(runs, key=lambda r: r.get("started") or 0):
        table.add_row(
            run["project"],
            run["name"],
            run["id"][:8],
            run["status"],
            str(run["rows"]),
            str(run["last_step"]),
            _ago(run["started"]),
        )
    _console().print(table)


def sparkline(values: deque[float]) -> str:
    """Recent values as block characters scaled between their own min and max."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(
        SPARKS[int((v - low) / span * (len(SPARKS) - 1))] if math.isfinite(v) else " "
        for v in values
    )


class LiveView:
    """`trackd tail` on a terminal: one line per run and key, the latest value and a sparkline."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = keys
        self._series: dict[tuple[str, str], deque[float]] = {}
        self._steps: dict[tuple[str, str], int] = {}
        self._events: deque[str] = deque(maxlen=3)
        self._live = Live(self, refresh_per_second=4, transient=False)

    def add(self, run: str, message: dict[str, Any]) -> None:
        kind, body = message["t"], message["b"]
        if kind != "metrics":
            if kind in ("run_start", "run_end"):
                self._events.append(f"{run}: {kind} {body.get('status', '')}".rstrip())
            elif kind == "alert":
                self._events.append(f"{run}: alert {alert_line(body)}")
            return
        for step, _, values in body["rows"]:
            for key, value in values.items():
                if self._keys and not any(fnmatch.fnmatch(key, g) for g in self._keys):
                    continue
                series = self._series.setdefault((run, key), deque(maxlen=HISTORY))
                series.append(float(value))
                self._steps[(run, key)] = step

    def __rich__(self) -> Table:
        table = Table("run", "key", "step", "latest", "recent", box=None, pad_edge=False)
        for (run, key), series in sorted(self._series.items()):
            table.add_row(
                run, key, str(self._steps[(run, key)]), f"{series[-1]:.6g}", sparkline(series)
            )
        if self._events:
            table.caption = " | ".join(self._events)
        return table

    def start(self) -> None:
        self._live.start()

    def stop(self) -> None:
        self._live.stop()
