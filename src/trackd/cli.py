"""The `trackd` command.

Every failure a user can cause or meet (no daemon, a bad spec, an unreadable
file) ends with one line on stderr and a non-zero exit: 1 for "cannot do it
now", 2 for "what you asked for is wrong". Never a traceback.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from trackd.client.control import DaemonUnreachable, request

F = TypeVar("F", bound=Callable[..., Any])
_connection_options = [
    click.option("--runtime-dir", default=None, help="Directory of the daemon's ipc sockets."),
    click.option("--endpoint", default=None, help="tcp://HOST:PORT of the daemon."),
]


def _connection(function: F) -> F:
    for option in reversed(_connection_options):
        function = option(function)
    return function


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"trackd: {message}", err=True)
    sys.exit(code)


STREAM_POLL_MS = 200  # `tail`: how long Ctrl-C may wait while nothing arrives


def _ask(command: str, runtime_dir: str | None, endpoint: str | None, **arguments: Any) -> Any:
    try:
        return request(command, endpoint=endpoint, runtime_dir=runtime_dir, **arguments)
    except DaemonUnreachable as exc:
        _fail(f"{exc} (start it with `trackd serve`)")
    except (RuntimeError, ValueError) as exc:
        _fail(str(exc), 2)


def _guard(function: F) -> F:
    """Turn a stray exception into one line; keep the traceback behind --debug."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:  # `trackd tail | head`: the reader is gone, so stop quietly
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush
            sys.exit(141)  # what a Unix tool killed by SIGPIPE reports: 128 + 13
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            logging.getLogger("trackd").debug("unexpected error", exc_info=True)
            _fail(f"{type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="trackd")
def main() -> None:
    """trackd: a local logging daemon for ML experiment tracking."""


@main.command()
@click.option("--config", "config", default=None, help="TOML config file.")
@click.option("--data-dir", default=None, help="WAL, spools, cursors and default JSONL runs.")
@click.option("--sink", "sinks", multiple=True, help="Sink spec, e.g. jsonl:PATH (repeatable).")
@click.option("--metrics-addr", default=None, help="Serve Prometheus metrics on HOST:PORT.")
@click.option("--log-level", default="INFO", show_default=True)
@_connection
@_guard
def serve(
    config: str | None,
    data_dir: str | None,
    sinks: tuple[str, ...],
    metrics_addr: str | None,
    log_level: str,
    runtime_dir: str | None,
    endpoint: str | None,
) -> None:
    """Run the daemon in the foreground."""
    from trackd.daemon import server
    from trackd.daemon.settings import SettingsError, load

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load(
            config,
            data_dir=data_dir,
            runtime_dir=runtime_dir,
            endpoint=endpoint,
            sinks=list(sinks) or None,
            metrics_addr=metrics_addr,
        )
    except SettingsError as exc:
        _fail(str(exc), 2)
    try:
        sys.exit(asyncio.run(server.serve(settings)))
    except server.StartupError as exc:
        _fail(str(exc))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_connection
@_guard
def status(as_json: bool, runtime_dir: str | None, endpoint: str | None) -> None:
    """The daemon's health: ingest, WAL, and each sink's lag, retries and errors."""
    result = _ask("status", runtime_dir, endpoint)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from trackd.cli_views import print_status

    print_status(result)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@_connection
@_guard
def runs(as_json: bool, runtime_dir: str | None, endpoint: str | None) -> None:
    """Runs known to the daemon."""
    result = _ask("runs", runtime_dir, endpoint)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from trackd.cli_views import print_runs

    print_runs(result)


@main.command()
@click.option("--project", default=None, help="Only this project.")
@click.option("--run", "run_name", default=None, help="Only this run (by name).")
@click.option("--key", "keys", multiple=True, help="Only metrics whose name matches this glob.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--since-start", is_flag=True, help="Replay the WAL from its start, then follow.")
@click.option("--lines", is_flag=True, help="Plain lines even on a terminal (no live view).")
@click.option("--console", is_flag=True, help="Add the runs' console lines (plain lines).")
@_connection
@_guard
def tail(
    project: str | None,
    run_name: str | None,
    keys: tuple[str, ...],
    as_json: bool,
    since_start: bool,
    lines: bool,
    console: bool,
    runtime_dir: str | None,
    endpoint: str | None,
) -> None:
    """Print the live stream of everything logged.

    On a terminal it is a compact live view: per run and key, the latest value and a
    sparkline of the recent ones; piped (or with --lines or --json), one line per row.
    With --since-start the stream is subscribed to first, then the WAL is read
    through the control socket; the first live message past it marks the seam, up
    to which the WAL is read (trackd/since_start.py): no gap and no duplicate.
    Console lines (stdout/stderr of the runs) are shown only with --console, as
    `PROJECT/RUN [stdout] TEXT` lines (so --console implies --lines).
    """
    import msgpack
    import zmq

    from trackd import paths
    from trackd.client.curve import prepare

    _ask("status", runtime_dir, endpoint)
    socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    address = paths.endpoints(endpoint, runtime_dir).stream
    prepare(socket, address)
    socket.connect(address)
    prefix = f"{project}/" + (f"{run_name}/" if run_name else "") if project else ""
    socket.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    view = None
    if sys.stdout.isatty() and not (as_json or lines or console):
        from trackd.cli_views import LiveView

        view = LiveView(keys)

    def show(topic: str, frame: bytes) -> None:
        topic_project, topic_run, _ = topic.split("/", 2)
        if (project is None or topic_project == project) and (
            run_name is None or topic_run == run_name
        ):
            message = msgpack.unpackb(frame)
            if view is not None:
                view.add(f"{topic_project}/{topic_run}", message)
                return
            if message["t"] != "console":
                shown = _tail_lines(topic_project, topic_run, message, keys, as_json)
            elif console:
                shown = _console_lines(topic_project, topic_run, message, as_json)
            else:
                shown = []
            for line in shown:
                click.echo(line)

    if view is not None:
        view.start()

    seam = None
    if since_start:
        from trackd.since_start import Seam

        def read_wal(position: list[int] | None) -> dict[str, Any]:
            chunk: dict[str, Any] = _ask(
                "wal", runtime_dir, endpoint, position=position, max_bytes=1 << 20
            )
            return chunk

        seam = Seam(read_wal, show)
        seam.read_to_end()
    try:
        while True:
            # A bounded wait, not a blocking recv: Ctrl-C may be delivered to another thread
            # (the view's refresh), and Python runs its handler only in the main thread, at
            # its next bytecode, so a recv blocked while nothing is logged would ignore it.
            if not socket.poll(STREAM_POLL_MS):
                continue
            topic, frame, packed = socket.recv_multipart()
            if seam is not None:
                seam.live(topic.decode(), frame, tuple(msgpack.unpackb(packed)))
            else:
                show(topic.decode(), frame)
    finally:
        if view is not None:
            view.stop()
        socket.close()


def _tail_lines(
    project: str, run: str, message: dict[str, Any], keys: tuple[str, ...], as_json: bool
) -> list[str]:
    from trackd.daemon.settings import redact
    from trackd.protocol import INTERNAL_TYPES

    kind = message["t"]
    body = message["b"] if kind == "metrics" else redact(message["b"])
    if kind in INTERNAL_TYPES:
        return []
    if kind != "metrics":
        if keys:
            return []
        if as_json:
            return [json.dumps({"project": project, "run": run, "type": kind, **body}, default=str)]
        if kind == "alert":
            from trackd.cli_views import alert_line

            return [f"{project}/{run} alert {alert_line(body)}"]
        return [f"{project}/{run} {kind} {json.dumps(body, default=str)}"]
    lines = []
    for step, ts, values in body["rows"]:
        shown = values
        if keys:
            shown = {k: v for k, v in values.items() if any(fnmatch.fnmatch(k, g) for g in keys)}
            if not shown:
                continue
        if as_json:
            lines.append(
                json.dumps({"project": project, "run": run, "step": step, "ts": ts, **shown})
            )
        else:
            text = " ".join(f"{k}={_number(v)}" for k, v in shown.items())
            lines.append(f"{project}/{run} step={step} {text}")
    return lines


def _console_lines(project: str, run: str, message: dict[str, Any], as_json: bool) -> list[str]:
    if as_json:
        return [
            json.dumps({"project": project, "run": run, "ts": ts, "stream": stream, "text": text})
            for ts, stream, text in message["b"]["lines"]
        ]
    return [f"{project}/{run} [{stream}] {text}" for _, stream, text in message["b"]["lines"]]


def _number(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--sink", "sinks", multiple=True, help="Sink spec to deliver to (repeatable).")
@click.option("--run", "run_name", default=None, help="Only this run (name or id).")
@click.option("--into-daemon", is_flag=True, help="Hand the spool to the running daemon.")
@_connection
@_guard
def replay(
    source: Path,
    sinks: tuple[str, ...],
    run_name: str | None,
    into_daemon: bool,
    runtime_dir: str | None,
    endpoint: str | None,
) -> None:
    """Deliver a client spool (offline mode) or a daemon data dir to sinks."""
    from trackd.daemon import replay as replaying

    try:
        files = replaying.source_files(source)
    except replaying.SourceError as exc:
        _fail(str(exc))
    if into_daemon:
        if run_name is not None:
            _fail("replay: --run picks a run for --sink; --into-daemon hands whole spools over", 2)
        _hand_to_daemon(files, runtime_dir, endpoint)
        return
    if not sinks:
        _fail("replay: name at least one --sink SPEC (or use --into-daemon)", 2)
    from trackd.daemon.settings import SettingsError, load

    try:
        settings = load(None, sinks=list(sinks))
    except SettingsError as exc:
        _fail(str(exc), 2)
    try:
        asyncio.run(_replay(settings, source, files, run_name))
    except replaying.SourceError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"replay: cannot read {source}: {exc.strerror or exc}")


async def _replay(settings: Any, source: Path, files: list[Path], run_name: str | None) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from trackd.daemon import replay as replaying
    from trackd.daemon.delivery import Backoff

    ledger = replaying.base_ledger(source, files)
    total = replaying.count(files, ledger, run_name)
    if not total:  # said before any sink is opened, or a progress bar drawn
        if run_name is None or next(replaying.read_messages(files), None) is None:
            raise replaying.SourceError(f"replay: {source} holds no readable trackd records")
        raise replaying.SourceError(f"replay: {source} holds no run {run_name!r}")
    backoff = Backoff(settings.retry_base, settings.retry_cap)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        started = time.monotonic()
        work = []
        for spec in settings.sinks:
            task = bar.add_task(spec.shown, total=total, rate="")

            def advance(n: int, task: Any = task) -> None:
                done = bar.tasks[task].completed + n
                rate = done / max(time.monotonic() - started, 1e-6)
                bar.update(task, advance=n, rate=f"{rate:,.0f} records/s")

            work.append(
                replaying.replay_into(
                    spec,
                    files,
                    replaying.file_stores(source),
                    ledger,
                    run_name,
                    settings.data_dir / "replay",
                    backoff,
                    advance,
                )
            )
        done = await asyncio.gather(*work)
    for delivery in done:
        stats = delivery.stats
        click.echo(
            f"{delivery.spec.shown}: {stats.delivered_records} records delivered "
            f"({stats.delivered_rows} rows), {stats.dead_letters} dead letters"
        )


def _hand_to_daemon(files: list[Path], runtime_dir: str | None, endpoint: str | None) -> None:
    """Copy spools into the daemon's spool folder (hidden name, then rename): it ingests them."""
    import shutil

    from trackd.protocol import SPOOL_SUFFIX

    if any(path.suffix != SPOOL_SUFFIX for path in files):
        _fail("replay --into-daemon takes spool files (a spool or a folder of them), not a WAL")
    spool = Path(_ask("status", runtime_dir, endpoint)["data_dir"]) / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    for path in files:
        hidden = spool / f".{path.name}.tmp"
        shutil.copyfile(path, hidden)
        hidden.rename(spool / path.name)
    click.echo(f"handed {len(files)} spool(s) to the daemon")


@main.group()
def keys() -> None:
    """CURVE keys for a daemon listening beyond loopback."""


@keys.command("generate")
@click.option("--dir", "directory", default=None, help="Where to write them (DATA_DIR/keys).")
@_guard
def keys_generate(directory: str | None) -> None:
    """Write a server keypair; print what the daemon and its clients need."""
    import zmq.auth

    from trackd import paths

    target = Path(directory or Path(paths.data_dir()) / "keys").expanduser()
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_file, secret_file = zmq.auth.create_certificates(str(target), "server")
    public, _ = zmq.auth.load_certificate(public_file)
    click.echo(f"daemon:  TRACKD_CURVE_SECRET_KEY_FILE={secret_file}")
    click.echo(f"clients: TRACKD_CURVE_SERVER_KEY={public.decode()}")


@main.group()
def config() -> None:
    """Inspect trackd's configuration."""


@config.command("show")
@click.option("--config", "config_file", default=None, help="TOML config file.")
@_guard
def config_show(config_file: str | None) -> None:
    """Print the effective configuration (file, then TRACKD_* environment), secrets redacted."""
    from trackd.daemon.settings import SettingsError, load, redacted

    try:
        settings = load(config_file)
    except SettingsError as exc:
        _fail(str(exc), 2)
    click.echo(json.dumps(redacted(settings), indent=2))


@main.group()
def service() -> None:
    """Run trackd under systemd."""


@service.command("install")
@click.option("--user", "scope", flag_value="user", default=True, help="A user unit (default).")
@click.option("--system", "scope", flag_value="system", help="A system template, one per user.")
@click.option("--print", "just_print", is_flag=True, help="Print the unit instead of writing it.")
@_guard
def service_install(scope: str, just_print: bool) -> None:
    """Write the systemd unit for this installation."""
    from trackd import service as units

    if just_print:
        click.echo(units.render(scope), nl=False)
        return
    try:
        path = units.install(scope)
    except OSError as exc:
        _fail(f"cannot write {units.destination(scope)}: {exc.strerror}")
    click.echo(f"wrote {path}")
    if scope == "user":
        click.echo("next: systemctl --user daemon-reload && systemctl --user enable --now trackd")
    else:
        click.echo("next: systemctl daemon-reload && systemctl enable --now trackd@USER")


@main.command()
@click.option("--project", default="demo", show_default=True)
@click.option("--name", default=None, help="Run name (default: generated).")
@click.option("--steps", default=200, show_default=True)
@click.option("--delay", default=0.02, show_default=True, help="Seconds between steps.")
@_connection
@_guard
def demo(
    project: str,
    name: str | None,
    steps: int,
    delay: float,
    runtime_dir: str | None,
    endpoint: str | None,
) -> None:
    """Push a simulated training run through the daemon."""
    import os

    import trackd

    if runtime_dir:
        os.environ["TRACKD_RUNTIME_DIR"] = runtime_dir
    _ask("status", runtime_dir, endpoint)  # a demo *through the daemon*: there must be one
    rng = random.Random(0)
    config = {"lr": 3e-4, "batch_size": 64, "optimizer": "adamw", "steps": steps}
    run = trackd.init(project=project, name=name, config=config, endpoint=endpoint)
    click.echo(f"demo: logging {steps} steps to {project}/{run.name} (id {run.id[:8]})")
    loss = 2.5
    for step in range(steps):
        loss = max(0.05, loss * (1 - 0.02 * rng.random()) + 0.01 * rng.gauss(0, 1))
        accuracy = 1 - math.exp(-step / max(steps / 4, 1)) * 0.9
        run.log({"loss": loss, "acc": accuracy, "lr": 3e-4 * (1 - step / steps)}, step=step)
        time.sleep(delay)
    run.set_summary({"best_loss": loss})
    delivered = run.flush(timeout=10)
    run.finish()
    if not delivered:
        _fail("demo: the daemon did not ack the run in 10 s; it waits in the local spool")
    click.echo(f"demo: done; every step is durable in the daemon's WAL ({steps} rows)")
