"""Garbage on the ingest socket: refused, counted, answered; the daemon and valid clients go on."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import Daemon, finish_client, jsonl_runs, run_client, wait_for
from trackd.protocol import MAX_FRAME_BYTES, VERSION, encode

ROWS = 20_000
TWENTY_MIB = 20 * 1024 * 1024


def message(**changes: Any) -> dict[str, Any]:
    """A valid metrics message of a session no real client uses, with fields replaced."""
    return {
        "v": VERSION,
        "s": "garbage-sender",
        "q": 1,
        "t": "metrics",
        "r": "no-such-run",
        "b": {"rows": [[0, 1.0, {"loss": 0.5}]]},
        **changes,
    }


# (kind counted in status, the frames of one ZeroMQ message, text the error reply must contain)
GARBAGE: dict[str, tuple[str, list[bytes], str]] = {
    "random-bytes": (
        "malformed",
        [b"\xc1" + random.Random(2).randbytes(4096)],  # 0xc1 is never valid MessagePack
        "frame: not MessagePack",
    ),
    "truncated-msgpack": ("malformed", [encode(message())[:-7]], "frame: not MessagePack"),
    "wrong-envelope-types": (
        "invalid",
        [encode(message(s=12345, q="one"))],
        "s: expected str, got int",
    ),
    "wrong-body-types": (
        "invalid",
        [encode(message(b={"rows": [[0, 1.0, {"loss": "high"}]]}))],
        "b.rows[0].values['loss']: expected a number, got str",
    ),
    "20-mib-frame": (
        "oversized",
        [encode(message(b={"rows": [], "pad": b"\0" * TWENTY_MIB}))],
        f"over the {MAX_FRAME_BYTES}-byte cap",
    ),
    "multipart-junk": ("multipart", [b"junk", b"\x93\x01\x02", b"more junk"], "got 3"),
}


class RawSender:
    """A bare DEALER socket on the daemon's ingest endpoint, outside any trackd client."""

    def __init__(self, runtime_dir: Path) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"ipc://{runtime_dir / 'ingest.sock'}")

    def send(self, parts: list[bytes]) -> str:
        """Send one (possibly multipart) message; return the text of the daemon's error reply."""
        self.socket.send_multipart(parts)
        while True:
            assert self.socket.poll(30_000), "the daemon sent no reply"
            reply = msgpack.unpackb(self.socket.recv())
            if reply.get("t") == "error":
                text: str = reply["error"]
                return text
            assert reply.get("t") == "ack", reply  # a refused, well-addressed message is acked

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def sender(daemon: Daemon) -> Iterator[RawSender]:
    raw = RawSender(daemon.runtime_dir)
    yield raw
    raw.close()


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_gets_an_error_reply_naming_the_problem(
    daemon: Daemon, sender: RawSender, name: str
) -> None:
    """Each kind of garbage is answered with an error naming what was wrong, counted by kind."""
    kind, parts, expected = GARBAGE[name]
    daemon.start()
    assert expected in sender.send(parts)
    assert daemon.status()["ingest"]["errors"] == {kind: 1}
    assert daemon.stop() == 0


def test_garbage_while_a_client_logs_leaves_its_run_complete(
    daemon: Daemon, env: dict[str, str], sender: RawSender
) -> None:
    """Garbage sent while a valid client logs: the daemon stays up, counts every piece exactly,
    and the client's run arrives whole and in order."""
    daemon.start()
    client = run_client(env, "--name", "valid", "--rows", str(ROWS), "--pace", "0.02")
    wait_for(lambda: daemon.status()["ingest"]["rows"] > 0)
    for kind, parts, expected in GARBAGE.values():
        assert expected in sender.send(parts), kind
    assert client.poll() is None, "the client finished before the garbage was sent"
    assert daemon.process is not None
    assert daemon.process.poll() is None

    finish_client(client)
    daemon.flush()
    status = daemon.status()
    assert status["ingest"]["errors"] == dict(Counter(kind for kind, _, _ in GARBAGE.values()))
    assert status["ingest"]["rows"] == ROWS
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert [name.rsplit("-", 1)[0] for name in runs] == ["valid"]
    (rows,) = runs.values()
    assert [row["step"] for row in rows] == list(range(ROWS))
    assert [row["i"] for row in rows] == list(range(ROWS))
    assert daemon.stop() == 0


def test_a_run_start_whose_config_is_not_a_map_does_not_stall_the_sink(
    daemon: Daemon, env: dict[str, str], sender: RawSender
) -> None:
    """A run_start with a list for its config is refused; a valid run after it still arrives."""
    daemon.start()
    body = {"project": "p", "name": "bad", "started": 1.0, "config": [1, 2]}
    sender.socket.send(encode(message(t="run_start", r="bad-run", b=body)))
    assert sender.socket.poll(30_000), "the daemon sent no reply"
    sender.socket.recv()
    finish_client(run_client(env, "--name", "good", "--rows", "1000"))
    caught_up = daemon.request("flush", timeout=15, wait=10)
    assert caught_up, f"the sink stopped delivering: {daemon.status()['sinks']}"
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert [len(rows) for name, rows in runs.items() if name.startswith("good-")] == [1000]
    assert daemon.stop() == 0
