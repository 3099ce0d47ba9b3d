"""The daemon's settings: a TOML file, then `TRACKD_*` environment variables, then flags.

Each later source overrides the earlier ones key by key. `TRACKD_SINKS` and
`--sink` take spec strings; the file takes `[[sinks]]` tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from trackd import paths
from trackd.protocol import MAX_FRAME_BYTES
from trackd.sinks.base import SinkSpec, looks_secret, sink_class_for


class SettingsError(ValueError):
    """A setting that cannot be used; the text names the key and what was expected."""


@dataclass
class Settings:
    # `load` reads the config file itself (the one named by --config, else the default)
    data_dir: Path = field(default_factory=lambda: Path(paths.data_dir(from_file=False)))
    runtime_dir: Path = field(default_factory=lambda: Path(paths.runtime_dir(from_file=False)))
    endpoint: str | None = None
    sinks: list[SinkSpec] = field(default_factory=list)
    drain_timeout: float = 30.0
    retry_base: float = 0.5
    retry_cap: float = 60.0
    linger: float = 0.02
    checkpoint_seconds: float = 0.5
    spool_scan_seconds: float = 2.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    retain: float = 7 * 24 * 3600.0
    max_wal_bytes: int = 10 * 1024**3
    on_full: str = "block"
    wal_segment_bytes: int = 64 * 1024**2
    metrics_addr: str | None = None
    system_interval: float = 10.0
    curve_secret_key_file: Path | None = None

    @property
    def endpoints(self) -> paths.Endpoints:
        return paths.endpoints(self.endpoint, self.runtime_dir)

    @property
    def default_sink(self) -> SinkSpec:
        return SinkSpec("jsonl", str(self.data_dir / "runs"), {})


_SCALARS = {
    "drain_timeout": float,
    "retry_base": float,
    "retry_cap": float,
    "linger": float,
    "checkpoint_seconds": float,
    "spool_scan_seconds": float,
    "max_frame_bytes": int,
    "retain": float,
    "max_wal_bytes": int,
    "wal_segment_bytes": int,
    "system_interval": float,
}
MIN_SYSTEM_INTERVAL = 0.5
_ON_FULL = ("block", "drop_oldest")


def redact(tree: Any) -> Any:
    """A copy of config-like data with the values of secret-looking keys masked."""
    if isinstance(tree, dict):
        return {k: "***" if looks_secret(str(k)) else redact(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(item) for item in tree]
    return tree


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, with every secret-looking sink option masked."""
    shown: dict[str, Any] = {}
    for item in fields(Settings):
        value = getattr(settings, item.name)
        if item.name == "sinks":
            specs = value or [settings.default_sink]
            value = [
                {"kind": spec.kind, "target": spec.shown_target, "name": spec.name}
                | spec.shown_options
                for spec in specs
            ]
        elif isinstance(value, Path):
            value = str(value)
        shown[item.name] = value
    return shown


def config_path(explicit: str | None) -> Path:
    return Path(explicit).expanduser() if explicit else Path(paths.config_file())


def load(config: str | None = None, **flags: Any) -> Settings:
    """Settings from the file (if any), the environment and the non-None `flags`."""
    values: dict[str, Any] = {}
    path = config_path(config)
    if config or path.exists():
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"config: cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config: {path} is not valid TOML: {exc}") from exc
        values.update(_from_file(table, path))
    for item in fields(Settings):
        env = os.environ.get(f"TRACKD_{item.name.upper()}")
        if env is not None and env != "":
            values[item.name] = env
    values.update({key: value for key, value in flags.items() if value not in (None, (), [])})
    return _build(values)


def _from_file(table: dict[str, Any], path: Path) -> dict[str, Any]:
    known = {item.name for item in fields(Settings)}
    for key in table:
        if key not in known:
            raise SettingsError(f"config: unknown key {key!r} in {path}")
    values = dict(table)
    if "sinks" in values:
        if not isinstance(values["sinks"], list):
            raise SettingsError("sinks: expected [[sinks]] tables or a list of spec strings")
        try:
            values["sinks"] = [
                SinkSpec.parse(item) if isinstance(item, str) else SinkSpec.from_table(item)
                for item in values["sinks"]
            ]
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
    return values


def _build(values: dict[str, Any]) -> Settings:
    settings = Settings()
    for key, value in values.items():
        if key in ("data_dir", "runtime_dir", "curve_secret_key_file"):
            setattr(settings, key, Path(str(value)).expanduser())
        elif key == "endpoint":
            settings.endpoint = str(value)
            try:
                settings.endpoints  # noqa: B018 - validates the address
            except ValueError as exc:
                raise SettingsError(str(exc)) from exc
        elif key == "sinks":
            settings.sinks = _sinks(value)
        elif key == "metrics_addr":
            host, _, port = str(value).rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"metrics_addr: expected HOST:PORT, got {value!r}")
            settings.metrics_addr = str(value)
        elif key == "on_full":
            if value not in _ON_FULL:
                raise SettingsError(
                    f"on_full: expected one of {', '.join(_ON_FULL)}, got {value!r}"
                )
            settings.on_full = str(value)
        elif key in _SCALARS:
            try:
                number = _SCALARS[key](value)
            except (TypeError, ValueError) as exc:
                raise SettingsError(
                    f"{key}: expected a {_SCALARS[key].__name__}, got {value!r}"
                ) from exc
            if number < 0:
                raise SettingsError(f"{key}: expected a non-negative number, got {value!r}")
            if key == "system_interval" and 0 < number < MIN_SYSTEM_INTERVAL:
                raise SettingsError(
                    f"system_interval: expected 0 (off) or at least {MIN_SYSTEM_INTERVAL} "
                    f"seconds, got {value!r}"
                )
            setattr(settings, key, number)
    return settings


def _sinks(value: object) -> list[SinkSpec]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise SettingsError(f"sinks: expected spec strings, got {value!r}")
    specs = []
    for item in items:
        try:
            spec = item if isinstance(item, SinkSpec) else SinkSpec.parse(str(item).strip())
            sink_class_for(spec.kind)
        except ValueError as exc:
            raise SettingsError(f"sinks: {exc}") from exc
        specs.append(spec)
    return specs
