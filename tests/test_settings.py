"""Configuration precedence: the TOML file, then TRACKD_* variables, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

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
