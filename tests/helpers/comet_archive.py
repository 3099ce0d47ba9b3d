"""Comet offline archives read back as `comet upload` would send them: each archive's
experiment.json and the JSON messages of its messages.json, per experiment key."""

from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import free_port


@dataclass
class Archive:
    """One session of an experiment: the first creates it, later ones add to it."""

    name: str
    meta: dict[str, Any]
    messages: list[dict[str, Any]]
    files: dict[str, bytes] = field(default_factory=dict)

    def payloads(self, kind: str) -> list[dict[str, Any]]:
        return [message["payload"] for message in self.messages if message["type"] == kind]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [payload["metric"] for payload in self.payloads("metric_msg")]

    @property
    def parameters(self) -> dict[str, Any]:
        params = [p.get("param") or p["params"] for p in self.payloads("parameter_msg")]
        return {p["paramName"]: p["paramValue"] for p in params if p["source"] == "manual"}

    @property
    def others(self) -> dict[str, Any]:
        return {payload["key"]: payload["value"] for payload in self.payloads("log_other")}

    @property
    def uploads(self) -> list[dict[str, Any]]:
        return self.payloads("file_upload")


def comet_env(root: Path) -> dict[str, str]:
    """For a daemon with a Comet sink: no API key, no config file, no error reports, and a
    server URL nobody answers (a free loopback port), so nothing can reach Comet's servers.
    Comet's own HTTP retries are off: against that port they back off for about a minute
    before an online session gives up, and the retry a test checks is trackd's."""
    return {
        "COMET_API_KEY": "",
        "COMET_CONFIG": str(root / "no-comet.config"),
        "COMET_URL_OVERRIDE": f"http://127.0.0.1:{free_port()}/clientlib/",
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_HTTP_SESSION_RETRY_TOTAL": "0",
        "COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL": "0",
        "COMET_GET_OR_ADD_EXPERIMENT_RETRY_CONNECT": "0",
    }


def read_archives(directory: Path) -> dict[str, list[Archive]]:
    """{experiment key: its archives, the creating one first, then in session order}."""
    found: dict[str, list[Archive]] = defaultdict(list)
    for path in directory.glob("*.zip"):
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read("experiment.json"))
            lines = archive.read("messages.json").decode().splitlines()
            files = {name: archive.read(name) for name in archive.namelist()}
        messages = [json.loads(line) for line in lines]
        found[meta["offline_id"]].append(Archive(path.name, meta, messages, files))
    for archives in found.values():
        archives.sort(key=lambda a: int(a.name.removesuffix(".zip").partition("-")[2] or 0))
    return dict(found)


def metric_steps(archives: list[Archive], name: str) -> list[int]:
    return [m["step"] for a in archives for m in a.metrics if m["metricName"] == name]
