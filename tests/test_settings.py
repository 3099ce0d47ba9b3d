"""Configuration precedence: the TOML file, then TRACKD_* variables, then flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from trackd.daemon.settings import SettingsError, load


def test_environment_beats_file_and_flags_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each key comes from the last source that sets it."""
    config = tmp_path / "config.toml"
    config.write_text(
        'data_dir = "/from/file"\ndrain_timeout = 5\nretry_cap = 9\n'
        '[[sinks]]\nkind = "jsonl"\npath = "/file/runs"\n'
    )
    monkeypatch.setenv("TRACKD_DRAIN_TIMEOUT", "7")
    monkeypatch.setenv("TRACKD_DATA_DIR", "/from/env")
    settings = load(str(config), data_dir="/from/flag")
    assert settings.data_dir == Path("/from/flag")
    assert settings.drain_timeout == 7.0
    assert settings.retry_cap == 9.0
    assert [spec.text for spec in settings.sinks] == ["jsonl:/file/runs"]
    monkeypatch.setenv("TRACKD_SINKS", "jsonl:/env/a,jsonl:/env/b")
    assert [spec.text for spec in load(str(config)).sinks] == ["jsonl:/env/a", "jsonl:/env/b"]
    flagged = load(str(config), sinks=["jsonl:/flag"])
    assert [spec.text for spec in flagged.sinks] == ["jsonl:/flag"]


def test_default_config_path_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$XDG_CONFIG_HOME/trackd/config.toml is the file when --config is not given."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "trackd").mkdir()
    (tmp_path / "trackd" / "config.toml").write_text("linger = 0.5\n")
    assert load().linger == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("on_full = 'explode'", "on_full: expected one of block, drop_oldest, got 'explode'"),
        ("max_wal_bytes = -1", "max_wal_bytes: expected a non-negative number, got -1"),
        ("sinks = 3", "sinks: expected [[sinks]] tables or a list of spec strings"),
        ("[[sinks]]\npath = '/x'", 'sinks: every [[sinks]] table needs kind = "..."'),
        ("surprise = 1", "config: unknown key 'surprise' in"),
        ("not toml at all", "is not valid TOML"),
    ],
)
def test_invalid_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad file fails with a message naming the key and what was expected."""
    config = tmp_path / "config.toml"
    config.write_text(text + "\n")
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        load(str(config))


def test_a_daemon_set_up_by_the_default_file_is_found_by_clients_and_commands(
    env: dict[str, str], dirs: dict[str, Path]
) -> None:
    """data_dir and runtime_dir set only in $XDG_CONFIG_HOME/trackd/config.toml (as DESIGN's
    example sets data_dir): a client with no daemon spools where that daemon picks spools
    up, and clients, `status` and `runs` find it, with no flag and no TRACKD_* variable."""
    data, runtime = dirs["root"] / "configured-data", dirs["root"] / "configured-rt"
    config = Path(env["XDG_CONFIG_HOME"]) / "trackd"
    config.mkdir(parents=True)
    (config / "config.toml").write_text(f'data_dir = "{data}"\nruntime_dir = "{runtime}"\n')
    plain = {k: v for k, v in env.items() if k not in ("TRACKD_DATA_DIR", "TRACKD_RUNTIME_DIR")}
    early = finish_client(
        run_client(plain, "--name", "early", "--rows", "100", "--finish-timeout", "1")
    )
    assert len(list((data / "spool").glob("*.spool"))) == 1
    daemon = Daemon(plain, runtime, data).start()
    try:
        finish_client(run_client(plain, "--name", "live", "--rows", "100"))
        daemon.flush()
        status = cli(plain, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["data_dir"] == str(data)
        wait_for(
            lambda: (
                sorted(run["name"] for run in json.loads(cli(plain, "runs", "--json").stdout))
                == ["early", "live"]
            )
        )
        daemon.flush()
        runs = jsonl_runs(data / "runs")
        assert sorted((name.rsplit("-", 1)[0], len(rows)) for name, rows in runs.items()) == [
            ("early", 100),
            ("live", 100),
        ]
        assert early["id"][:8] in " ".join(runs)
    finally:
        assert daemon.stop() == 0
