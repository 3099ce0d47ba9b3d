"""`trackd tail --since-start`: the WAL from its start, then live, with no gap and no duplicate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter

from conftest import Daemon, finish_client, run_client


def test_since_start_joins_the_live_stream_without_gap_or_duplicate(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """Rows logged before, during and after tail starts each appear exactly once."""
    daemon.start()
    finish_client(run_client(env, "--name", "before", "--rows", "3000"))
    during = run_client(env, "--name", "during", "--rows", "6000", "--pace", "0.05")
    tail = subprocess.Popen(
        [sys.executable, "-m", "trackd", "tail", "--since-start", "--json", "--project", "p"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[dict[str, object]] = []
    expected = 3000 + 6000 + 2000

    def read() -> None:
        assert tail.stdout is not None
        for line in tail.stdout:
            row = json.loads(line)
            if "step" in row:
                lines.append(row)
            if len(lines) >= expected:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        finish_client(during)
        finish_client(run_client(env, "--name", "after", "--rows", "2000"))
        reader.join(60)
    finally:
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
        assert tail.stdout is not None
        assert tail.stderr is not None
        tail.stdout.close()
        tail.stderr.close()
    counts = Counter((row["run"], row["step"]) for row in lines)
    assert len(lines) == expected, f"got {len(lines)} rows"
    assert set(counts.values()) == {1}, "no row twice"
    for run, rows in (("before", 3000), ("during", 6000), ("after", 2000)):
        assert sorted(step for name, step in counts if name == run) == list(range(rows))
