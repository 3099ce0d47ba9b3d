"""Secret-looking config values never reach a terminal: tail and config show redact them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trackd
from conftest import Daemon, cli


def test_tail_redacts_secret_config_values(daemon: Daemon, env: dict[str, str]) -> None:
    """A run's api_key and nested password show as *** in tail; other values as they are."""
    daemon.start()
    run = trackd.init(
        project="sec", name="r", config={"api_key": "sk-123", "lr": 0.1, "db": {"password": "pw"}}
    )
    run.log({"loss": 1.0})
    run.finish()
    tail = subprocess.Popen(
        [sys.executable, "-m", "trackd", "tail", "--since-start", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stdout is not None
        start = json.loads(tail.stdout.readline())
    finally:
        tail.kill()
        tail.communicate(timeout=10)
    assert start["type"] == "run_start"
    assert start["config"] == {"api_key": "***", "lr": 0.1, "db": {"password": "***"}}
    assert "sk-123" not in json.dumps(start)


def test_config_show_redacts_sink_secrets(env: dict[str, str]) -> None:
    """Sink options and URL passwords that look secret are masked in config show."""
    shown = cli(
        {**env, "TRACKD_SINKS": "jsonl:/tmp/x?api_token=abc,jsonl://user:hunter2@h/y"},
        "config",
        "show",
    )
    assert shown.returncode == 0, shown.stderr
    assert "abc" not in shown.stdout
    assert "hunter2" not in shown.stdout
    sinks = json.loads(shown.stdout)["sinks"]
    assert sinks[0]["api_token"] == "***"
    assert sinks[1]["target"] == "//user:***@h/y"


def test_config_show_with_an_invalid_file_exits_2_naming_the_key(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """A wrong type in the TOML file: exit 2, one line naming the key and what was expected."""
    bad = tmp_path / "bad.toml"
    bad.write_text('drain_timeout = "soon"\n')
    shown = cli(env, "config", "show", "--config", str(bad))
    assert shown.returncode == 2
    assert shown.stderr.strip().splitlines() == [
        "trackd: drain_timeout: expected a float, got 'soon'"
    ]
