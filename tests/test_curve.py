"""CURVE: beyond loopback only with keys; a client without the daemon's key gets nowhere."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client


def free_port_block() -> int:
    """A port P with P+1 and P+2 free too (ingest, stream, control)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port < 65000 and all(_free(port + offset) for offset in (1, 2)):
            return port
    raise AssertionError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def keys(tmp_path: Path, env: dict[str, str]) -> tuple[str, str]:
    """(secret key file, public key text) from `trackd keys generate`."""
    result = cli(env, "keys", "generate", "--dir", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    lines = dict(
        line.split(":  " if line.startswith("daemon") else ": ", 1)
        for line in result.stdout.splitlines()
    )
    secret_file = lines["daemon"].split("=", 1)[1]
    public = lines["clients"].split("=", 1)[1]
    return secret_file, public


def test_curve_pair_on_loopback_delivers_and_a_keyless_client_is_refused(
    tmp_path: Path, daemon: Daemon, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the server key a client's run arrives; without it, nothing does and the daemon lives."""
    secret_file, public = keys(tmp_path, env)
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    env["TRACKD_ENDPOINT"] = endpoint
    monkeypatch.setenv("TRACKD_ENDPOINT", endpoint)  # this process asks the daemon too
    monkeypatch.setenv("TRACKD_CURVE_SERVER_KEY", public)
    daemon.env = {**env, "TRACKD_CURVE_SERVER_KEY": public}
    daemon.start("--endpoint", endpoint, extra_env={"TRACKD_CURVE_SECRET_KEY_FILE": secret_file})

    elsewhere = tmp_path / "keyless-data"  # its spool must not be one the daemon picks up
    keyless = run_client(
        {**env, "TRACKD_DATA_DIR": str(elsewhere)},
        "--name",
        "keyless",
        "--rows",
        "200",
        "--finish-timeout",
        "2",
    )
    keyless.communicate(timeout=60)
    assert keyless.returncode == 0, "the client never raises, even when refused"
    assert len(list((elsewhere / "spool").glob("*.spool"))) == 1, (
        "refused, its run waits in its spool"
    )
    refused = cli(env, "status")
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1

    keyed_env = {**env, "TRACKD_CURVE_SERVER_KEY": public}
    keyed = run_client(keyed_env, "--name", "keyed", "--rows", "300")
    _, err = keyed.communicate(timeout=60)
    assert keyed.returncode == 0, err
    status = cli(keyed_env, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert daemon.process is not None
    assert daemon.process.poll() is None
    from trackd.client.control import request

    assert request("flush", endpoint=endpoint, wait=30, timeout=35) is True
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert [name.rsplit("-", 1)[0] for name in runs] == ["keyed"]
    assert len(next(iter(runs.values()))) == 300


def test_non_loopback_tcp_without_keys_is_refused(env: dict[str, str]) -> None:
    """Listening on every interface without CURVE keys exits non-zero with one line."""
    result = cli(env, "serve", "--endpoint", "tcp://0.0.0.0:1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("trackd: refusing to listen on")
    assert len([line for line in result.stderr.splitlines() if line.startswith("trackd:")]) == 1


def test_the_ipv6_loopback_serves_clients_and_commands(
    daemon: Daemon, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--endpoint tcp://[::1]:PORT` is loopback too: the daemon binds there without keys,
    and a client and `trackd status` reach it through TRACKD_ENDPOINT."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port: int = probe.getsockname()[1]
        if port < 65000:
            break
    endpoint = f"tcp://[::1]:{port}"
    env["TRACKD_ENDPOINT"] = endpoint
    monkeypatch.setenv("TRACKD_ENDPOINT", endpoint)  # this process asks the daemon too
    daemon.env = env
    daemon.start("--endpoint", endpoint)
    status = cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    finish_client(run_client(env, "--name", "six", "--rows", "200"))
    daemon.flush()
    assert [len(rows) for rows in jsonl_runs(daemon.data_dir / "runs").values()] == [200]
