"""systemd integration: the units verify as installed, and the daemon speaks the notify protocol."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import Daemon, cli


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the machine's systemd"
    return subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )


def test_user_unit_as_installed_verifies(tmp_path: Path, env: dict[str, str]) -> None:
    """`service install --user` writes a unit with this trackd's path that verifies."""
    result = cli({**env, "XDG_CONFIG_HOME": str(tmp_path)}, "service", "install", "--user")
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "systemd" / "user" / "trackd.service"
    text = unit.read_text()
    executable = Path(sys.executable).parent / "trackd"
    assert f"ExecStart={executable} serve" in text
    for setting in (
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=",
        "RuntimeDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ReadWritePaths=",
    ):
        assert setting in text, setting
    # ProtectSystem=strict makes every path read-only but these: a sink the config puts in
    # the user's home (DESIGN's example: ~/trackd-runs) must stay writable
    writable = [line for line in text.splitlines() if line.startswith("ReadWritePaths=")]
    assert writable == ["ReadWritePaths=-%h"]
    checked = verify(unit)
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_system_template_verifies_for_an_instance(tmp_path: Path, env: dict[str, str]) -> None:
    """The system template, instantiated for a user, verifies; its stop timeout exceeds drain."""
    result = cli(env, "service", "install", "--system", "--print")
    assert result.returncode == 0, result.stderr
    template = tmp_path / "trackd@.service"
    template.write_text(result.stdout)
    instance = tmp_path / "trackd@root.service"
    instance.symlink_to(template)
    checked = verify(instance)
    assert checked.returncode == 0, checked.stderr + checked.stdout
    stop = next(line for line in result.stdout.splitlines() if line.startswith("TimeoutStopSec="))
    assert int(stop.split("=")[1]) > 30, "TimeoutStopSec must exceed the default drain_timeout"


def test_notify_protocol_ready_watchdog_stopping(
    tmp_path: Path, daemon: Daemon, env: dict[str, str]
) -> None:
    """Under a NOTIFY_SOCKET the daemon sends READY=1, then WATCHDOG=1, then STOPPING=1."""
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    try:
        daemon.start(extra_env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        seen: list[str] = []
        while "WATCHDOG=1" not in seen:
            seen.extend(listener.recv(4096).decode().splitlines())
        assert daemon.stop() == 0
        while "STOPPING=1" not in seen:
            seen.extend(listener.recv(4096).decode().splitlines())
    finally:
        listener.close()
    order = [field for field in seen if field in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
    assert order[0] == "READY=1"
    assert order[1] == "WATCHDOG=1"
    assert order[-1] == "STOPPING=1"
    assert any(field.startswith("STATUS=") and "rows/s" in field for field in seen)
    assert f"MAINPID={daemon.process.pid if daemon.process else -1}" in seen
