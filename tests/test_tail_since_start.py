"""`trackd tail --since-start`: the WAL from its start, then live, with no gap and no duplicate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections import Counter

import msgpack
import zmq

from conftest import Daemon, finish_client, run_client, wait_for
from trackd import paths
from trackd.since_start import Seam


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


def test_since_start_seam_is_exact_when_the_subscription_is_late(
    daemon: Daemon, env: dict[str, str]
) -> None:
    """The subscription reaches the daemon only after more was logged past the WAL read.

    The join used to sleep 0.3 s and then drop live messages up to the WAL read's end, so
    whatever was logged between that end and the subscription taking effect was lost.
    Now the first live message marks the seam and the WAL is read up to it."""
    daemon.start()
    client = run_client(env, "--name", "late", "--rows", "6000", "--pace", "0.05")
    steps: list[int] = []

    def show(topic: str, frame: bytes) -> None:
        message = msgpack.unpackb(frame)
        if message["t"] == "metrics":
            steps.extend(row[0] for row in message["b"]["rows"])

    seam = Seam(lambda at: daemon.request("wal", position=at, max_bytes=1 << 20), show)
    wait_for(lambda: daemon.status()["ingest"]["rows"] > 0)
    seam.read_to_end()
    read_to = seam.shown
    assert read_to is not None
    wait_for(lambda: tuple(daemon.status()["wal"]["durable_end"]) > read_to)  # logged past it
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(paths.endpoints(None, str(daemon.runtime_dir)).stream)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        while len(steps) < 6000 and socket.poll(30_000):
            topic, frame, packed = socket.recv_multipart()
            seam.live(topic.decode(), frame, tuple(msgpack.unpackb(packed)))
    finally:
        socket.close()
    finish_client(client)
    assert Counter(steps) == Counter(range(6000)), "every row once"
