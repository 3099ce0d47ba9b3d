"""`trackd tail` on a terminal: a live view with the latest value and a sparkline per key."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import trackd
from conftest import Daemon
from trackd.cli_views import SPARKS

# `trackd tail` as a shell on a terminal starts it: with Ctrl-C (SIGINT) at its default. A
# suite started in the background (`make test &`) passes on SIGINT ignored, which survives exec.
AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'trackd'; "
    "runpy.run_module('trackd', run_name='__main__', alter_sys=True)"
)


def read_screen(
    fd: int, until: str, seconds: float, process: subprocess.Popen[bytes] | None = None
) -> str:
    """What the terminal showed until `until` appeared, or `process` ended (or the time ran
    out). A terminal is read all the while: a pty nobody reads fills, and the program's next
    write to it blocks (the view then cannot even stop on Ctrl-C)."""
    seen = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and until.encode() not in seen:
        if process is not None and process.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen.decode(errors="replace")


def test_terminal_view_shows_latest_values_and_sparklines(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """On a pty, each key gets a line with its latest value and a sparkline of recent ones."""
    daemon.start()
    run = trackd.init(project="view", name="r")
    for step in range(40):
        run.log({"loss": 1.0 / (step + 1), "acc": step / 40}, step=step)
    assert run.flush(10)
    primary, secondary = pty.openpty()
    tail = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL, "tail", "--since-start"],
        env={**env, "COLUMNS": "120", "TERM": "xterm"},
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    screen = ""
    try:
        screen = read_screen(primary, "0.025", 20)  # loss at step 39, the last row drawn
    finally:
        tail.send_signal(signal.SIGINT)
        # the terminal goes on being read until it stops
        after = read_screen(primary, "\0", 10, tail)
        try:
            tail.wait(1)
        except subprocess.TimeoutExpired:
            tail.kill()
            tail.wait(10)
            pytest.fail(f"trackd tail did not stop on Ctrl-C; it showed {screen + after!r}")
        finally:
            os.close(primary)
            run.finish()
    assert "loss" in screen
    assert "acc" in screen
    assert "0.975" in screen, "the latest acc (39/40) is shown"
    assert any(mark in screen for mark in SPARKS[1:]), "a sparkline is drawn"
    assert "Traceback" not in screen
