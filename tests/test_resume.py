"""Run identity and resume, trackio's rule: "must" continues the latest run of the project
and name (an error only if there is none), "allow" continues it or starts one, None and
"never" always start a new run; a resume the client cannot resolve (offline, no daemon)
is resolved by the daemon, so it is still one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import trackd
from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from trackd.daemon.ledger import Ledger
from trackd.protocol import VERSION


def log_rows(env: dict[str, str], rows: int, *args: str) -> str:
    """A training process of its own: `rows` rows to p/long (flags: --resume, --mode ...)."""
    run_id: str = finish_client(run_client(env, "--name", "long", "--rows", str(rows), *args))["id"]
    return run_id


def steps_of(daemon: Daemon) -> dict[str, list[int]]:
    """{run dir: steps of its rows, in order} of the JSONL sink, once it caught up."""
    daemon.flush()
    return {
        run_dir: [row["step"] for row in rows]
        for run_dir, rows in jsonl_runs(daemon.data_dir / "runs").items()
    }


def test_must_continues_a_run_started_without_resume(daemon: Daemon, env: dict[str, str]) -> None:
    """init(p, n) ... finish(), then init(p, n, resume="must") in another process: the same
    run, its steps continuing after the last one (the defect of issue 10)."""
    daemon.start()
    first = log_rows(env, 5)
    second = log_rows(env, 3, "--resume", "must")
    assert second == first
    assert steps_of(daemon) == {f"long-{first[:8]}": list(range(8))}
    [run] = daemon.request("runs")
    assert (run["id"], run["rows"], run["last_step"], run["status"]) == (first, 8, 7, "finished")


def test_must_refuses_when_no_run_of_that_name_exists(daemon: Daemon) -> None:
    daemon.start()
    with pytest.raises(ValueError, match="resume='must' but the daemon knows no run p/none"):
        trackd.init(project="p", name="none", resume="must")


def test_allow_starts_a_run_once_then_continues_it(daemon: Daemon, env: dict[str, str]) -> None:
    daemon.start()
    first = log_rows(env, 2, "--resume", "allow")
    assert log_rows(env, 2, "--resume", "allow") == first
    assert steps_of(daemon) == {f"long-{first[:8]}": [0, 1, 2, 3]}


@pytest.mark.parametrize("resume", [None, "never"])
def test_never_starts_a_new_run_under_the_same_name(
    daemon: Daemon, env: dict[str, str], resume: str | None
) -> None:
    daemon.start()
    args = () if resume is None else ("--resume", resume)
    first, second = log_rows(env, 2, *args), log_rows(env, 2, *args)
    assert first != second
    assert steps_of(daemon) == {f"long-{first[:8]}": [0, 1], f"long-{second[:8]}": [0, 1]}


def test_a_resume_continues_after_a_last_step_that_held_media(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """The run's highest step was a histogram's (step 3, after rows 0-2): a resume starts at 4."""
    daemon.start()
    first = log_rows(env, 3, "--media-last")
    log_rows(env, 2, "--resume", "must")
    [steps] = steps_of(daemon).values()
    assert steps == [0, 1, 2, 3, 4, 5]
    [run] = daemon.request("runs")
    assert (run["id"], run["last_step"]) == (first, 5)


def test_an_offline_resume_is_resolved_by_the_daemon_into_the_one_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """mode="offline" with resume="must": the spool, picked up by a daemon started after
    it, lands in the run it resumes, its steps after that run's; still one run."""
    daemon.start()
    first = log_rows(env, 4)
    assert daemon.stop() == 0
    log_rows(env, 3, "--mode", "offline", "--resume", "must")
    daemon.start()
    wait_for(lambda: daemon.request("runs")[0]["rows"] == 7)
    assert steps_of(daemon) == {f"long-{first[:8]}": list(range(7))}
    [run] = daemon.request("runs")
    assert (run["id"], run["status"]) == (first, "finished")


def test_a_resume_with_no_daemon_reachable_is_still_one_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """resume="allow" while no daemon runs: the client cannot ask, spools, and the daemon
    started later resolves the resume: one run, steps 0-5."""
    daemon.start()
    first = log_rows(env, 3)
    assert daemon.stop() == 0
    log_rows(env, 3, "--resume", "allow", "--finish-timeout", "0.5")
    daemon.start()
    wait_for(lambda: daemon.request("runs")[0]["rows"] == 6)
    assert steps_of(daemon) == {f"long-{first[:8]}": list(range(6))}
    assert len(daemon.request("runs")) == 1


def test_an_offline_allow_with_no_run_to_resume_is_a_new_run(
    daemon: Daemon, env: dict[str, str]
) -> None:
    second = log_rows(env, 2, "--mode", "offline", "--resume", "allow")
    daemon.start()
    wait_for(lambda: daemon.request("runs") and daemon.request("runs")[0]["rows"] == 2)
    assert steps_of(daemon) == {f"long-{second[:8]}": [0, 1]}


def _message(seq: int, kind: str, run: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"v": VERSION, "s": f"session-{run}", "q": seq, "t": kind, "r": run, "b": body}


def test_the_ledger_rebuilds_a_resolved_resume_from_the_stored_run_start(tmp_path: Path) -> None:
    """After a crash the ledger is its checkpoint plus the WAL: the rewritten run_start alone
    (provisional id and step shift in it) makes later messages resolve the same way, and a
    checkpoint keeps the mapping too."""
    start = {"project": "p", "name": "n", "started": 1.0}
    ledger = Ledger()
    ledger.apply(_message(1, "run_start", "old", start))
    ledger.apply(_message(2, "metrics", "old", {"rows": [[0, 1.0, {}], [9, 1.0, {}]]}))
    resume = _message(1, "run_start", "new", {**start, "resolve": True, "resume": "must"})
    stored = ledger.resolve(resume)
    assert (stored["r"], stored["b"]["alias"], stored["b"]["step_offset"]) == ("old", "new", 10)
    row = _message(2, "metrics", "new", {"rows": [[0, 2.0, {"x": 1}]]})
    expected = {**row, "r": "old", "b": {"rows": [[10, 2.0, {"x": 1}]]}}
    assert ledger.resolve(row) == expected
    media = _message(3, "media", "new", {"step": 1, "key": "k"})
    assert ledger.resolve(media)["b"]["step"] == 11

    recovered = Ledger()
    recovered.apply(_message(1, "run_start", "old", start))
    recovered.apply(stored)
    assert recovered.resolve(row) == expected
    path = tmp_path / "ledger.msgpack"
    Ledger.save(recovered.snapshot(), path)
    assert Ledger.load(path).resolve(row) == expected
    other = _message(1, "metrics", "unrelated", {"rows": [[0, 1.0, {}]]})
    assert ledger.resolve(other) is other


def test_a_daemon_killed_while_it_resolves_a_resume_keeps_one_run_every_row_once(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """A resume started with no daemon, whose rows reach a daemon started later, killed -9
    mid-stream and restarted: the resume stays resolved (rebuilt from the WAL), so the run
    is still one, and every row is in it once, steps 0..N in order."""
    daemon.start()
    first = log_rows(env, 5)
    assert daemon.stop() == 0
    rows = 4000
    client = run_client(
        env, "--name", "long", "--rows", str(rows), "--resume", "must", "--pace", "0.2"
    )
    assert client.stderr is not None
    assert b"cannot ask the daemon" in client.stderr.readline()  # so it leaves it to the daemon
    daemon.start()
    wait_for(lambda: daemon.request("runs")[0]["rows"] > 5, timeout=60)
    daemon.kill()
    daemon.start()
    assert finish_client(client)["id"] != first  # a provisional id: the daemon resolved it
    wait_for(lambda: daemon.request("runs")[0]["rows"] == rows + 5, timeout=60)
    assert steps_of(daemon) == {f"long-{first[:8]}": list(range(rows + 5))}
    [run] = daemon.request("runs")
    assert (run["id"], run["status"], run["last_step"]) == (first, "finished", rows + 4)


def test_replay_straight_to_a_sink_resolves_an_offline_resume_against_the_source(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """`trackd replay DATA_DIR --sink ...` (no daemon): the run in the WAL and an offline
    resume of it in the spool are delivered as one run, steps continuing."""
    daemon.start()
    first = log_rows(env, 4)
    assert daemon.stop() == 0
    log_rows(env, 3, "--mode", "offline", "--resume", "allow")
    out = tmp_path / "out"
    result = cli(env, "replay", str(daemon.data_dir), "--sink", f"jsonl:{out}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert {
        run_dir: [row["step"] for row in rows] for run_dir, rows in jsonl_runs(out).items()
    } == {f"long-{first[:8]}": list(range(7))}
