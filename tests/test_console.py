"""Console capture: every line once, in order, and the terminal's bytes untouched."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import trackd
from conftest import HELPERS, Daemon, wait_for
from trackd.client import console as console_module
from trackd.client.console import ConsoleCapture
from trackd.protocol import VERSION, ProtocolError, decode, encode

PARENT_LINES = [
    "hello 0",
    "hello 1",
    "an error line",
    "part-a part-b part-c",
    "next line",
    "100%|██████████| 40/40",
    "after the bar",
    "after the child",
]
CHILD_LINE = "from the child"
LAST_LINE = "no newline at the end"


def console_script(env: dict[str, str], *args: str, cwd: Path | None = None) -> tuple[bytes, bytes]:
    """Run tests/helpers/console_client.py (in `cwd`); its stdout and stderr bytes."""
    result = subprocess.run(
        [sys.executable, str(HELPERS / "console_client.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout, result.stderr


def console_log(data_dir: Path, name: str) -> list[str]:
    (path,) = (data_dir / "runs" / "console").glob(f"{name}-*/console.log")
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def test_print_stderr_partial_lines_tqdm_and_a_forked_child_arrive_once_in_order(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """Lines from print, stderr, partial writes, a tqdm bar (its last frame only) and a forked
    child arrive once each, in order, and the script's terminal bytes are those of console=off."""
    daemon.start()
    wrapped = console_script(env, "--name", "wrapped")
    off = console_script(env, "--name", "off", "--console", "off")
    assert wrapped == off
    assert b"\r" in wrapped[1]  # the bar did draw frames on the terminal
    daemon.flush()
    lines = console_log(daemon.data_dir, "wrapped")
    assert lines.count(CHILD_LINE) == 1
    lines.remove(CHILD_LINE)  # the child's own session: its place among the parent's may vary
    assert lines == [*PARENT_LINES, LAST_LINE]
    assert not list((daemon.data_dir / "runs" / "console").glob("off-*/console.log"))


def test_a_million_lines_arrive_once_in_order_with_the_terminal_unchanged(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A script printing 1,000,000 lines keeps up: each line once, in order, none dropped,
    and its stdout and stderr bytes are byte-identical to a run with console="off"."""
    daemon.start()
    count = 1_000_000
    flood = ("--flood", str(count), "--no-fork")
    wrapped = console_script(env, "--name", "flood", *flood)
    off = console_script(env, "--name", "flood-off", "--console", "off", *flood)
    assert wrapped == off
    daemon.flush(timeout=300)
    lines = console_log(daemon.data_dir, "flood")
    flooded = lines[len(PARENT_LINES) : len(PARENT_LINES) + count]
    assert flooded == [f"flood {index}" for index in range(count)]
    assert lines == [*PARENT_LINES, *flooded, LAST_LINE]


def test_offline_runs_capture_the_console_too(daemon: Daemon, env: dict[str, str]) -> None:
    """console="wrap" is the default offline as well: the spool carries the lines."""
    daemon.start()
    console_script(env, "--name", "offline", "--mode", "offline", "--no-fork")
    root = daemon.data_dir / "runs" / "console"
    wait_for(lambda: '"finished"' in "".join(p.read_text() for p in root.glob("*/run.json")))
    assert console_log(daemon.data_dir, "offline") == [*PARENT_LINES, LAST_LINE]


# --- the capture itself, on streams of its own ------------------------------------------


class Streams:
    """sys.stdout and sys.stderr replaced by StringIOs for one test (pytest's are restored)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdout", self.out)
        monkeypatch.setattr(sys, "stderr", self.err)


def delivered(capture: ConsoleCapture, final: bool = True) -> list[list[object]]:
    messages: list[dict[str, list[list[object]]]] = []
    capture.deliver(lambda kind, body: messages.append(body), final=final)
    return [line for body in messages for line in body["lines"]]


def test_a_line_over_the_cap_is_cut_with_a_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line longer than MAX_LINE_CHARS arrives cut to the cap, the marker naming what was cut."""
    streams = Streams(monkeypatch)
    capture = ConsoleCapture()
    capture.install()
    cap = console_module.MAX_LINE_CHARS
    print("x" * (cap + 10) + "\nshort")
    sys.stdout.write("y" * (3 * cap))  # held partial, cut while held
    sys.stdout.write("y" * 5)
    capture.uninstall()
    lines = [line[2] for line in delivered(capture)]
    assert lines == [
        "x" * cap + " [trackd: 10 characters cut]",
        "short",
        "y" * cap + f" [trackd: {2 * cap + 5} characters cut]",
    ]
    assert streams.out.getvalue() == "x" * (cap + 10) + "\nshort\n" + "y" * (3 * cap + 5)


def test_stdout_and_stderr_lines_keep_their_stream_and_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interleaved stdout and stderr lines come out in the order written, each with its stream."""
    Streams(monkeypatch)
    capture = ConsoleCapture()
    capture.install()
    print("one")
    print("two", file=sys.stderr)
    print("three")
    capture.uninstall()
    got = [(line[1], line[2]) for line in delivered(capture)]
    assert got == [("stdout", "one"), ("stderr", "two"), ("stdout", "three")]
    assert all(isinstance(line[0], float) for line in delivered(capture))


def test_writes_past_the_bound_are_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the delivery thread behind by more than the bound, later writes are dropped (the
    terminal still gets them) and one marker line says how many."""
    streams = Streams(monkeypatch)
    monkeypatch.setattr(console_module, "MAX_PENDING_WRITES", 4)
    capture = ConsoleCapture()
    capture.install()
    for index in range(6):
        sys.stdout.write(f"{index}\n")
    capture.uninstall()
    lines = [line[2] for line in delivered(capture)]
    assert lines == ["0", "1", "2", "3", console_module.DROP_MARKER.format(2)]
    assert streams.out.getvalue() == "".join(f"{index}\n" for index in range(6))


def test_a_flood_wakes_the_delivery_thread_once_well_before_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flood that starts while the delivery thread sleeps between a quiet run's polls wakes
    it once, an eighth of the way to the bound, from either stream; a fresh process flooding
    /dev/null filled the bound in one 0.2 s sleep (test_daemon_killed_mid_flood...)."""
    Streams(monkeypatch)
    wakes: list[int] = []
    capture = ConsoleCapture(wake=lambda: wakes.append(len(capture._pending)))
    capture.install()
    for index in range(console_module.WAKE_AT * 2):
        (sys.stdout if index % 2 else sys.stderr).write(f"{index}\n")
    capture.uninstall()
    assert wakes == [console_module.WAKE_AT + 1]


def test_finish_unhooks_and_a_later_wrapper_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uninstalled while still the stream's write, the capture is gone; under a wrapper added
    after it, it stays in that chain as a pass-through and the later wrapper keeps working."""
    streams = Streams(monkeypatch)
    capture = ConsoleCapture()
    capture.install()
    assert "write" in vars(streams.out)
    capture.uninstall()
    assert "write" not in vars(streams.out)  # the class's write again

    first = ConsoleCapture()
    first.install()
    second = ConsoleCapture()
    second.install()
    first.uninstall()  # not outermost: stays as a pass-through
    print("after")
    second.uninstall()
    assert [line[2] for line in delivered(second)] == ["after"]
    assert delivered(first) == []
    assert streams.out.getvalue() == "after\n"


def test_a_stream_replaced_after_init_is_not_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text redirected into another object after init (redirect_stdout) is not console output."""
    import contextlib

    Streams(monkeypatch)
    capture = ConsoleCapture()
    capture.install()
    elsewhere = io.StringIO()
    with contextlib.redirect_stdout(elsewhere):
        print("redirected")
    print("shown")
    capture.uninstall()
    assert [line[2] for line in delivered(capture)] == ["shown"]
    assert elsewhere.getvalue() == "redirected\n"


def test_carriage_return_frames_keep_the_last_state_of_the_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frames redrawn with "\\r" collapse to the last one; one held across deliveries too."""
    Streams(monkeypatch)
    capture = ConsoleCapture()
    capture.install()
    sys.stderr.write("\r 10%")
    sys.stderr.write("\r 50%")
    assert delivered(capture, final=False) == []  # held: no newline yet
    sys.stderr.write("\r100%\n")
    sys.stderr.write("done\r\n")  # a CRLF ending is just the line
    sys.stderr.write("old text\r")
    sys.stderr.write("new\n")
    capture.uninstall()
    assert [line[2] for line in delivered(capture)] == ["100%", "done", "new"]


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        pytest.param({"console": "redirect"}, ValueError, "console", id="console"),
        pytest.param({"save_code": "yes"}, TypeError, "save_code", id="save_code"),
    ],
)
def test_a_wrong_console_or_save_code_raises_naming_it(
    dirs: dict[str, Path], arguments: dict[str, Any], error: type[Exception], named: str
) -> None:
    """init(console=...) other than "wrap"/"off", or a non-bool save_code, raises naming it."""
    stdout_write = vars(sys.stdout).get("write")
    with pytest.raises(error, match=named):
        trackd.init(project="bad", **arguments)
    assert vars(sys.stdout).get("write") is stdout_write, "a refused init() wrapped stdout"


def test_daemon_killed_mid_flood_still_every_line_once_in_order(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """kill -9 of the daemon while a script floods its console, then a restart: console.log
    holds every line exactly once, in order (acked lines from the WAL, the rest re-sent)."""
    daemon.start()
    count = 1_000_000
    flood = ("--flood", str(count), "--no-fork")
    script = subprocess.Popen(
        [sys.executable, str(HELPERS / "console_client.py"), "--name", "killed", *flood],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = daemon.data_dir / "runs" / "console"

    def delivered_some() -> bool:
        found = list(root.glob("killed-*/console.log"))
        return bool(found) and found[0].stat().st_size > 100_000

    wait_for(delivered_some, timeout=120)
    assert script.poll() is None, "the script ended before the kill: nothing was in flight"
    daemon.kill()
    daemon.start()
    assert script.wait(300) == 0
    wait_for(lambda: '"finished"' in "".join(p.read_text() for p in root.glob("*/run.json")))
    daemon.flush()
    lines = console_log(daemon.data_dir, "killed")
    assert lines == [*PARENT_LINES, *(f"flood {i}" for i in range(count)), LAST_LINE]


def test_the_traceback_of_an_uncaught_exception_is_in_the_console(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A script dying of an uncaught exception: its traceback (printed by the chained hook
    before the run ends) is the end of console.log, as in W&B's Logs tab."""
    from test_client import CRASHING_SCRIPT, python

    daemon.start()
    result = python(env, CRASHING_SCRIPT.format(hook=""))
    assert result.returncode == 1
    assert "ValueError: boom-4711" in result.stderr
    root = daemon.data_dir / "runs" / "crash"
    wait_for(lambda: '"failed"' in "".join(p.read_text() for p in root.glob("*/run.json")))
    daemon.flush()
    (path,) = root.glob("c-*/console.log")
    lines = path.read_text().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom-4711"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param({"lines": "text"}, "b.lines", id="lines-not-a-list"),
        pytest.param({"lines": [[1.0, "stdout"]]}, r"b.lines\[0\]", id="short-line"),
        pytest.param({"lines": [[1, "stdout", "x"]]}, r"b.lines\[0\].ts", id="ts-not-float"),
        pytest.param({"lines": [[1.0, "stdin", "x"]]}, r"b.lines\[0\].stream", id="stream"),
        pytest.param({"lines": [[1.0, "stdout", b"x"]]}, r"b.lines\[0\].text", id="bytes-text"),
    ],
)
def test_a_malformed_console_message_is_refused_naming_the_field(
    body: dict[str, Any], named: str
) -> None:
    """The protocol refuses a console body that is not [[ts, stdout|stderr, text], ...]."""
    message = {"v": VERSION, "s": "s", "q": 1, "t": "console", "r": "r", "b": body}
    with pytest.raises(ProtocolError, match=named):
        decode(encode(message))


def test_a_run_start_with_a_code_state_that_is_not_a_map_is_refused() -> None:
    """run_start's code and env are maps (or nil)."""
    body = {"project": "p", "name": "n", "started": 1.0, "code": "abc123"}
    message = {"v": VERSION, "s": "s", "q": 1, "t": "run_start", "r": "r", "b": body}
    with pytest.raises(ProtocolError, match=r"b\.code"):
        decode(encode(message))
    body["code"], body["env"] = None, {"argv": ["x"], "python": "3.11.7"}
    assert decode(encode(message))["b"]["env"]["argv"] == ["x"]
