"""Chaos: 4 clients log while the daemon is SIGKILLed every few seconds and MLflow dies too.

Sinks jsonl + mlflow (a real `mlflow server`, sqlite store, on 127.0.0.1). While
the clients log, the daemon is SIGKILLed at random intervals and restarted each
time; meanwhile the MLflow server is SIGKILLed (its process group) and started
again after a pause. At the end every row must be in the JSONL files exactly
once and in MLflow exactly once (`MlflowClient.get_metric_history`), and each
trackd run must be one MLflow run. The clients' worst `log()` latency is
reported, not asserted.

Size: `TRACKD_CHAOS_ROWS` (default 40,000: the short variant in the normal
suite; 1,000,000 is the full one, bounded to 10 minutes). The kill schedule
comes from `TRACKD_CHAOS_SEED` (a fixed default), printed first, so a failure
can be replayed with the same schedule. Figures go to `chaos-results.json` in
the test's tmp dir (or `TRACKD_CHAOS_RESULTS`) and are echoed to the terminal.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import HEAVY, Daemon, jsonl_runs, wait_for
from mlflow_server import MlflowServer

CLIENT = Path(__file__).parent / "chaos_client.py"
CLIENTS = 4
DEFAULT_SEED = 20251122
PROJECT = "chaos"


@dataclass(frozen=True)
class Profile:
    rows: int  # in total, over CLIENTS clients
    log_seconds: float  # the clients spread their rows over this
    daemon_kill_every: tuple[float, float]  # seconds between daemon SIGKILLs, uniform
    mlflow_kills: int
    mlflow_pause: float  # seconds the MLflow server stays dead before it is started again
    budget: float  # seconds for the whole test, MLflow server start included

    @classmethod
    def from_env(cls) -> Profile:
        rows = int(os.environ.get("TRACKD_CHAOS_ROWS", "40000"))
        if rows % CLIENTS:
            raise ValueError(f"TRACKD_CHAOS_ROWS must be a multiple of {CLIENTS}, got {rows}")
        if rows <= 100_000:  # the short variant, in the normal suite
            return cls(rows, 15.0, (2.0, 5.0), 1, 4.0, 240.0)
        # The full one. Each daemon restart costs seconds of CPU (Python, trackd and mlflow
        # imports) and MLflow's delivery restarts with it, so the kills are kept to the
        # logging phase (about 150 s for a million rows); after it the sinks catch up calmly.
        return cls(rows, max(30.0, rows / 6500), (2.0, 6.0), 2, 5.0, 570.0)


PROFILE = Profile.from_env()
SEED = int(os.environ.get("TRACKD_CHAOS_SEED", str(DEFAULT_SEED)))
pytestmark = [
    pytest.mark.timeout(PROFILE.budget + 30),
    pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning"),
    pytest.mark.xdist_group(HEAVY),  # its timings are its figures: one heavy test at a time
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    handle = MlflowServer(tmp_path / "mlflow")
    handle.root.mkdir()
    yield handle
    handle.kill()


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The chaos clients a test starts; any still running at its end are killed by PID."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class Clock:
    def __init__(self, budget: float) -> None:
        self.began = time.monotonic()
        self.deadline = self.began + budget

    def now(self) -> float:
        return time.monotonic() - self.began

    def left(self, floor: float = 1.0) -> float:
        return max(floor, self.deadline - time.monotonic())


def echo(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print past pytest's capture: the seed and the figures belong in the terminal."""
    with capsys.disabled():
        print(f"\n[chaos] {text}", flush=True)


def miscount(steps: Iterable[int], rows: int) -> dict[str, Any]:
    """How a run's steps differ from 0..rows-1 each once: counts and a few examples."""
    seen = Counter(steps)
    missing = [step for step in range(rows) if step not in seen]
    repeated = sorted(step for step, times in seen.items() if times > 1)
    stray = sorted(step for step in seen if not 0 <= step < rows)
    return {
        "count": sum(seen.values()),
        "missing": len(missing),
        "duplicated": len(repeated),
        "stray": len(stray),
        "examples": {"missing": missing[:5], "duplicated": repeated[:5], "stray": stray[:5]},
    }


def mlflow_chaos(
    server: MlflowServer,
    kills: list[float],
    pause: float,
    clock: Clock,
    stop: threading.Event,
    log: list[dict[str, Any]],
) -> None:
    """SIGKILL the MLflow server at each time in `kills`, start it again `pause` s later."""
    for at in kills:
        if stop.wait(max(0.0, at - clock.now())):
            return
        server.kill()
        down = clock.now()
        if stop.wait(pause):
            return
        server.start()
        log.append({"killed_at": round(down, 2), "down_seconds": round(clock.now() - down, 2)})


def test_chaos_every_row_exactly_once_in_jsonl_and_mlflow(
    tmp_path: Path,
    daemon: Daemon,
    env: dict[str, str],
    server: MlflowServer,
    clients: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """N rows from 4 clients through random daemon SIGKILLs and MLflow outages: each row once."""
    profile, rng = PROFILE, random.Random(SEED)
    per_client = profile.rows // CLIENTS
    echo(
        capsys,
        f"seed {SEED} (replay: TRACKD_CHAOS_SEED={SEED} TRACKD_CHAOS_ROWS={profile.rows}); "
        f"{profile.rows} rows from {CLIENTS} clients over {profile.log_seconds:.0f} s, "
        f"daemon SIGKILL every {profile.daemon_kill_every} s, {profile.mlflow_kills} MLflow kills",
    )
    out = tmp_path / "runs"
    results_path = Path(os.environ.get("TRACKD_CHAOS_RESULTS") or tmp_path / "chaos-results.json")
    results: dict[str, Any] = {
        "seed": SEED,
        "rows": profile.rows,
        "client_count": CLIENTS,
        "log_seconds_target": profile.log_seconds,
        "passed": False,
    }
    clock = Clock(profile.budget)
    stop = threading.Event()
    chaos: threading.Thread | None = None
    try:
        server.start()
        results["mlflow_start_seconds"] = round(clock.now(), 2)
        serve = ("--sink", f"jsonl:{out}", "--sink", f"mlflow:{server.uri}")
        daemon.start(*serve)
        names = [f"c{index}" for index in range(CLIENTS)]
        logging_began = clock.now()
        for name in names:
            arguments = ["--project", PROJECT, "--name", name, "--rows", str(per_client)]
            arguments += ["--seconds", str(profile.log_seconds)]
            clients.append(
                subprocess.Popen(
                    [sys.executable, str(CLIENT), *arguments],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        # Each client's stdout is read on its own thread so that a full pipe never stalls it.
        outputs: dict[str, tuple[bytes, bytes]] = {}
        readers = [
            threading.Thread(
                target=lambda name=name, process=process: outputs.__setitem__(
                    name, process.communicate()
                ),
                daemon=True,
            )
            for name, process in zip(names, clients, strict=True)
        ]
        for reader in readers:
            reader.start()

        slots, spread = profile.mlflow_kills, profile.log_seconds
        kills_at = [
            logging_began + rng.uniform((i + 0.15) / slots, (i + 0.45) / slots) * spread
            for i in range(slots)
        ]
        outages: list[dict[str, Any]] = []
        failures: list[BaseException] = []

        def run_mlflow_chaos() -> None:
            try:
                mlflow_chaos(server, kills_at, profile.mlflow_pause, clock, stop, outages)
            except BaseException as exc:
                failures.append(exc)

        chaos = threading.Thread(target=run_mlflow_chaos, name="mlflow-chaos", daemon=True)
        chaos.start()

        # The daemon: SIGKILL at random intervals while any client is still running.
        daemon_kills: list[float] = []
        next_kill = clock.now() + rng.uniform(*profile.daemon_kill_every)
        while any(process.poll() is None for process in clients):
            if clock.now() > profile.budget - 60:
                raise AssertionError("the clients did not finish within the time budget")
            if clock.now() < next_kill:
                time.sleep(0.05)
                continue
            daemon.kill()
            daemon_kills.append(round(clock.now(), 2))
            time.sleep(rng.uniform(0.0, 0.5))
            daemon.start(*serve)
            next_kill = clock.now() + rng.uniform(*profile.daemon_kill_every)
        results["clients_done_seconds"] = round(clock.now(), 2)
        results["daemon_kills"] = len(daemon_kills)
        results["daemon_killed_at"] = daemon_kills
        for reader in readers:
            reader.join(10)
        reports = {}
        for name, process in zip(names, clients, strict=True):
            stdout, stderr = outputs[name]
            assert process.returncode == 0, f"client {name}: {stderr.decode(errors='replace')}"
            reports[name] = json.loads(stdout.decode().strip().splitlines()[-1])
        results["client_reports"] = reports
        results["worst_log_seconds"] = max(r["worst_log_seconds"] for r in reports.values())
        results["p999_log_seconds"] = max(r["p999_log_seconds"] for r in reports.values())
        results["log_calls_over_10ms"] = sum(r["log_calls_over_10ms"] for r in reports.values())
        for report in reports.values():  # when, on the test's clock: compare with the kills
            at = logging_began + report["worst_log_step"] / per_client * profile.log_seconds
            report["worst_log_at_seconds"] = round(at, 2)

        chaos.join(clock.left())
        assert not chaos.is_alive(), "the MLflow chaos thread did not end"
        if failures:
            raise failures[0]
        results["mlflow_kills"] = len(outages)
        results["mlflow_outages"] = outages
        assert len(outages) == profile.mlflow_kills, "the MLflow server was not killed as planned"

        # Calm: what dead clients left in spools is picked up, then every sink catches up.
        spool = daemon.data_dir / "spool"
        wait_for(lambda: not list(spool.glob("*.spool")), timeout=clock.left())
        left = clock.left()
        caught_up = daemon.request("flush", timeout=left + 5, wait=left)
        sinks = {s["spec"].split(":")[0]: s for s in daemon.status()["sinks"].values()}
        shown = ("delivered_rows", "lag_records", "retries", "dead_letters", "last_error")
        results["sinks"] = {kind: {k: sink[k] for k in shown} for kind, sink in sinks.items()}
        assert caught_up, f"the sinks did not catch up within the budget: {results['sinks']}"
        results["delivered_seconds"] = round(clock.now(), 2)

        # Every row once in JSONL.
        ids = {name: reports[name]["id"] for name in names}
        runs = jsonl_runs(out)
        assert sorted(runs) == sorted(f"{name}-{ids[name][:8]}" for name in names)
        jsonl = {}
        for name in names:
            rows = runs[f"{name}-{ids[name][:8]}"]
            jsonl[name] = miscount((row["step"] for row in rows), per_client)
            jsonl[name]["values_match"] = all(row["i"] == row["step"] for row in rows)
        results["jsonl"] = jsonl

        # Every row once in MLflow: one MLflow run per trackd run, each point once.
        from mlflow.tracking import MlflowClient

        api = MlflowClient(tracking_uri=server.uri)
        experiment = api.get_experiment_by_name(PROJECT)
        assert experiment is not None
        found = api.search_runs([experiment.experiment_id], max_results=100)
        results["mlflow_runs"] = sorted(run.info.run_name for run in found)

        def read_back(run: Any) -> dict[str, Any]:
            history = api.get_metric_history(run.info.run_id, "i")
            counted = miscount((point.step for point in history), per_client)
            counted["values_match"] = all(point.value == float(point.step) for point in history)
            counted["status"] = run.info.status
            return counted

        # one thread per run: the server serialises its share, but decoding overlaps it
        with ThreadPoolExecutor(len(found) or 1) as pool:
            counts = list(pool.map(read_back, found))
        mlflow = {run.info.run_name: counted for run, counted in zip(found, counts, strict=True)}
        results["mlflow"] = mlflow
        results["checked_seconds"] = round(clock.now(), 2)

        whole = {
            "count": per_client,
            "missing": 0,
            "duplicated": 0,
            "stray": 0,
            "values_match": True,
        }
        for name in names:
            assert {k: jsonl[name][k] for k in whole} == whole, f"jsonl {name}: {jsonl[name]}"
        assert results["mlflow_runs"] == names, "each trackd run is exactly one MLflow run"
        for name in names:
            assert {k: mlflow[name][k] for k in whole} == whole, f"mlflow {name}: {mlflow[name]}"
            assert mlflow[name]["status"] == "FINISHED"
        assert all(sink["dead_letters"] == 0 for sink in sinks.values()), results["sinks"]
        assert daemon.stop() == 0
        results["passed"] = True
    finally:
        stop.set()  # a failed test leaves no MLflow restart behind it
        if chaos is not None:
            chaos.join(150)
        results["wall_seconds"] = round(clock.now(), 2)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        summary = {
            key: results.get(key)
            for key in (
                "passed",
                "seed",
                "rows",
                "daemon_kills",
                "mlflow_kills",
                "worst_log_seconds",
                "p999_log_seconds",
                "log_calls_over_10ms",
                "delivered_seconds",
                "wall_seconds",
            )
        }
        echo(capsys, f"results {results_path}: {json.dumps(summary)}")
