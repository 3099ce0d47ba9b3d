"""A remote Aim server behind an authenticating proxy (the NTN setup): a real `aim
server` on loopback, a reverse proxy in front of it (tests/helpers/auth_proxy.py) that
refuses requests without the access headers, and the daemon's aim sink sending them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Daemon, cli, finish_client, free_port, run_client, wait_for
from helpers import auth_proxy, until_client
from test_sink_aim import AimServer, assert_every_step_once, read_aim
from trackd.sinks.aim import AimSink, remote_headers
from trackd.sinks.base import SinkSpec

ACCESS = {"CF-Access-Client-Id": "id-7f3a.access", "CF-Access-Client-Secret": "s3cret-9b1c"}


class Proxy:
    """The proxy's process: started, stopped (SIGKILL: connections drop as in a crash) and
    started again on the same port."""

    def __init__(self, upstream: int, log: Path) -> None:
        self.port = free_port()
        self.upstream = upstream
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = auth_proxy.start(self.port, self.upstream, ACCESS, self.log)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[AimServer, Proxy]]:
    server = AimServer(tmp_path / "server-repo", tmp_path / "aim-server.log")
    server.start()
    proxy = Proxy(server.port, tmp_path / "proxy.log")
    proxy.start()
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()


def refused_by_proxy(log: Path) -> list[str]:
    """The requests the proxy refused, but for the test's own probes (urllib's)."""
    lines = log.read_text().splitlines()
    return [
        line for line in lines if ('" 401 ' in line or '" 403 ' in line) and "urllib" not in line
    ]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in ACCESS.values():
            assert secret not in text


def test_with_the_seed_headers_every_step_lands_through_a_proxy_restart(
    daemon: Daemon, env: dict[str, str], proxied: tuple[AimServer, Proxy], tmp_path: Path
) -> None:
    """The NTN variables CF_ACCESS_CLIENT_ID/SECRET in the daemon's environment become the
    access headers of every request and WebSocket upgrade; the proxy SIGKILLed mid-run
    and started again: the sink reconnects with the headers, every step lands once; the
    secret is in no log line or status field."""
    server, proxy = proxied
    spec = f"aim:aim://127.0.0.1:{proxy.port}?timeout=2"
    name = SinkSpec.parse(spec).name
    seed = {
        "CF_ACCESS_CLIENT_ID": ACCESS["CF-Access-Client-Id"],
        "CF_ACCESS_CLIENT_SECRET": ACCESS["CF-Access-Client-Secret"],
        "TRACKD_DRAIN_TIMEOUT": "2",
    }
    stop = tmp_path / "stop"

    def delivered() -> int:
        return int(daemon.status()["sinks"][name]["delivered_rows"])

    daemon.start("--sink", spec, extra_env=seed)
    client = until_client.start(env, "behind", stop, per_tick=10, tick=0.05)
    wait_for(lambda: delivered() > 300, timeout=60)
    proxy.stop()
    wait_for(lambda: daemon.status()["sinks"][name]["retries"] >= 1, timeout=60)
    before = delivered()
    proxy.start()
    wait_for(lambda: delivered() > before + 100, timeout=90)
    stop.touch()
    rows = finish_client(client)["rows"]
    daemon.flush(timeout=120)
    status = daemon.status()
    assert status["sinks"][name]["dead_letters"] == 0
    assert daemon.stop() == 0
    server.stop()

    found = read_aim(env, server.repo)
    assert list(found) == ["behind"]
    assert_every_step_once(found["behind"], rows)
    assert found["behind"]["params"]["trackd"]["status"] == "finished"
    assert refused_by_proxy(proxy.log) == []
    upgrade = 'write-instruction/ HTTP/1.1" 101'  # the WebSocket, through the restarted proxy
    assert upgrade in proxy.log.read_text()
    assert_no_secret(json.dumps(status), daemon.log())


def test_without_the_headers_status_names_the_401_then_configured_the_run_is_delivered(
    daemon: Daemon, env: dict[str, str], proxied: tuple[AimServer, Proxy], tmp_path: Path
) -> None:
    """No headers: the sink retries and `trackd status` names the proxy's 401. Configured
    (a [[sinks]] table with `headers_env` naming the daemon's variables, and a wrong
    `headers` value they override) and restarted: the whole run is delivered, once; the
    secrets show in neither `config show` nor status nor the log."""
    server, proxy = proxied
    target = f"aim://127.0.0.1:{proxy.port}"
    spec = f"aim:{target}?timeout=2"
    quick = {"TRACKD_DRAIN_TIMEOUT": "2"}
    daemon.start("--sink", spec, extra_env=quick)
    rows = 200
    run = finish_client(run_client(env, "--name", "refused", "--rows", str(rows)))
    name = SinkSpec.parse(spec).name
    wait_for(lambda: "401" in (daemon.status()["sinks"][name]["last_error"] or ""), timeout=60)
    error = daemon.status()["sinks"][name]["last_error"]
    assert f"{target} answered 401 Unauthorized" in error
    assert daemon.status()["sinks"][name]["dead_letters"] == 0
    assert daemon.stop() == 0

    config = tmp_path / "trackd.toml"
    config.write_text(
        "[[sinks]]\n"
        'kind = "aim"\n'
        f'repo = "{target}"\n'
        'timeout = "2"\n'
        'headers = {"CF-Access-Client-Secret" = "wrong", "X-Trace" = "t1"}\n'
        'headers_env = {"CF-Access-Client-Id" = "PROXY_ID",'
        ' "CF-Access-Client-Secret" = "PROXY_SECRET"}\n'
    )
    variables = {
        "PROXY_ID": ACCESS["CF-Access-Client-Id"],
        "PROXY_SECRET": ACCESS["CF-Access-Client-Secret"],
    }
    shown = cli({**env, **variables}, "config", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    [sink] = json.loads(shown.stdout)["sinks"]
    assert json.loads(sink["headers"]) == {"CF-Access-Client-Secret": "***", "X-Trace": "***"}
    daemon.start("--config", str(config), extra_env={**quick, **variables})
    daemon.flush(timeout=120)
    status = daemon.status()
    [(configured, sink_status)] = status["sinks"].items()
    assert configured != name
    assert sink_status["dead_letters"] == 0
    assert daemon.stop() == 0
    server.stop()

    found = read_aim(env, server.repo)
    assert list(found) == ["refused"]
    assert_every_step_once(found["refused"], rows)
    assert found["refused"]["params"]["trackd"]["run_id"] == run["id"]
    assert refused_by_proxy(proxy.log), "the first daemon was refused"
    assert_no_secret(shown.stdout, json.dumps(status), daemon.log())
    assert "wrong" not in shown.stdout + json.dumps(status)


def test_headers_from_the_seed_variables_then_the_options() -> None:
    """The NTN variables map to their headers; `headers`, then `headers_env`, override."""
    environ = {
        "CF_ACCESS_CLIENT_ID": "id",
        "CF_ACCESS_CLIENT_SECRET": "secret",
        "AIM_AUTH_TOKEN": "tok",
        "AIM_CUSTOM_HEADERS": '{"X-Team": "ntn", "CF-Access-Client-Id": "custom-id"}',
        "MY_SECRET": "from-env",
    }
    assert remote_headers({}, environ) == {
        "CF-Access-Client-Id": "custom-id",
        "CF-Access-Client-Secret": "secret",
        "Authorization": "Bearer tok",
        "X-Team": "ntn",
    }
    options = {
        "headers": '{"X-Team": "option"}',
        "headers_env": '{"CF-Access-Client-Secret": "MY_SECRET"}',
    }
    assert remote_headers(options, environ) == {
        "CF-Access-Client-Id": "custom-id",
        "CF-Access-Client-Secret": "from-env",
        "Authorization": "Bearer tok",
        "X-Team": "option",
    }
    assert remote_headers({}, {}) == {}


def test_bad_header_options_are_refused_naming_them() -> None:
    """A headers_env variable the daemon lacks, a headers value that is no table, and
    headers on a local repo: a ValueError naming what is wrong, at start-up."""
    with pytest.raises(ValueError, match=r"'ABSENT' .* not set"):
        AimSink("aim://127.0.0.1:1", headers_env='{"X-Id": "ABSENT"}')
    with pytest.raises(ValueError, match="option headers must be a table"):
        AimSink("aim://127.0.0.1:1", headers="Bearer x")
    with pytest.raises(ValueError, match="for a remote repo"):
        AimSink("/tmp/repo", headers='{"X-Id": "1"}')
