"""The write-ahead log: torn-tail recovery (Hypothesis), rotation, and a daemon on a torn log."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, finish_client, jsonl_runs, run_client
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import HEADER_BYTES, frame_record

# As in a real WAL, payloads are never empty (an empty record is damage) and never repeat (each
# carries its own session and sequence number; a repeated one is a copy and is read once).
PAYLOADS = st.lists(st.binary(min_size=1, max_size=120), max_size=25, unique=True)


def write_records(directory: Path, payloads: list[bytes], segment_bytes: int) -> WriteAheadLog:
    """Append `payloads`, each committed before the next is queued; then close the log."""
    wal = WriteAheadLog(directory, segment_bytes=segment_bytes)
    committed = threading.Semaphore(0)
    wal.start_writer(lambda tokens, _end, _seq: [committed.release() for _ in tokens])
    for payload in payloads:
        wal.append(payload, payload)
        assert committed.acquire(timeout=30), "the WAL writer never committed"
    wal.close()
    return wal


def read_back(directory: Path, segment_bytes: int) -> list[bytes]:
    wal = WriteAheadLog(directory, segment_bytes=segment_bytes)
    return [payload for _, payload in wal.scan(wal.start)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


def split_by_segment(payloads: list[bytes], sizes: list[int]) -> list[list[bytes]]:
    """Assign payloads, in order, to segments of the given byte sizes (from the framing alone)."""
    groups: list[list[bytes]] = []
    remaining = iter(payloads)
    for size in sizes:
        group: list[bytes] = []
        used = 0
        while used < size:
            payload = next(remaining)
            group.append(payload)
            used += HEADER_BYTES + len(payload)
        assert used == size, "a segment does not end on a record boundary"
        groups.append(group)
    assert next(remaining, None) is None, "records missing from the segments"
    return groups


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payloads=PAYLOADS,
    segment_bytes=st.sampled_from([64, 256, 1024, 1 << 20]),
    cut_seed=st.integers(min_value=0, max_value=1 << 30),
)
def test_a_tail_cut_at_any_byte_recovers_every_whole_record_before_it(
    tmp_path: Path, payloads: list[bytes], segment_bytes: int, cut_seed: int
) -> None:
    """The last segment cut at an arbitrary byte: recovery keeps exactly the whole records before
    the cut, and the log takes appends again after them."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path)) / "wal"
    write_records(directory, payloads, segment_bytes)
    files = segment_files(directory)
    groups = split_by_segment(payloads, [path.stat().st_size for path in files])
    last = files[-1]
    cut = cut_seed % (last.stat().st_size + 1)
    last.write_bytes(last.read_bytes()[:cut])

    kept = [payload for group in groups[:-1] for payload in group]
    end = 0
    for payload in groups[-1]:
        end += HEADER_BYTES + len(payload)
        if end <= cut:
            kept.append(payload)
    assert read_back(directory, segment_bytes) == kept

    write_records(directory, [b"after recovery"], segment_bytes)
    assert read_back(directory, segment_bytes) == [*kept, b"after recovery"]


def test_recovery_truncates_the_torn_bytes_off_the_file(tmp_path: Path) -> None:
    """Recovery cuts the torn record off the segment file itself and resumes at that offset."""
    directory = tmp_path / "wal"
    write_records(directory, [b"one", b"two"], 1 << 20)
    (last,) = segment_files(directory)
    whole = last.stat().st_size
    with last.open("ab") as handle:
        handle.write(frame_record(b"three, never committed")[:-4])
    wal = WriteAheadLog(directory)
    assert last.stat().st_size == whole
    assert wal.durable_end == (1, whole)


def test_rotation_keeps_every_record_readable_in_order(tmp_path: Path) -> None:
    """With small segments the log spans many files, and scan() reads every record in order."""
    directory = tmp_path / "wal"
    payloads = [f"record {index:03d} ".encode() * (1 + index % 7) for index in range(120)]
    write_records(directory, payloads, 256)
    files = segment_files(directory)
    assert len(files) > 10
    assert [int(path.stem) for path in files] == list(range(1, len(files) + 1))
    assert read_back(directory, 256) == payloads


def test_a_reader_sees_records_across_segments_in_bounded_batches(tmp_path: Path) -> None:
    """read() with a small byte budget, followed position to position, returns every record."""
    directory = tmp_path / "wal"
    payloads = [bytes([index]) * (10 + index) for index in range(60)]
    write_records(directory, payloads, 200)
    wal = WriteAheadLog(directory, segment_bytes=200)
    seen: list[bytes] = []
    position: Position = wal.start
    while batch := wal.read(position, wal.durable_end, 50):
        seen.extend(payload for _, payload in batch)
        position = batch[-1][0]
    assert seen == payloads
    assert position == wal.durable_end


def test_a_daemon_on_a_torn_wal_starts_and_serves(daemon: Daemon, env: dict[str, str]) -> None:
    """A WAL whose tail was torn mid-record (a crash mid-write): the daemon starts, cuts it, keeps
    the earlier run, and delivers a new one."""
    daemon.start()
    finish_client(run_client(env, "--name", "before", "--rows", "2000"))
    daemon.flush()
    assert daemon.stop() == 0
    last = segment_files(daemon.data_dir / "wal")[-1]
    whole = last.stat().st_size
    with last.open("ab") as handle:
        handle.write(frame_record(b"\x86" + b"x" * 500)[:300])

    daemon.start()
    assert daemon.status()["wal"]["durable_end"] == [int(last.stem), whole]
    finish_client(run_client(env, "--name", "after", "--rows", "2000"))
    daemon.flush()
    runs = jsonl_runs(daemon.data_dir / "runs")
    assert sorted(name.rsplit("-", 1)[0] for name in runs) == ["after", "before"]
    for rows in runs.values():
        assert [row["step"] for row in rows] == list(range(2000))
    assert daemon.stop() == 0


def test_the_bytes_behind_skip_a_segment_retention_drops_while_they_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` counts a sink's lag in bytes from the segment listing; retention may drop one
    of them before its size is read (seen as an internal error from `status` under
    on_full=drop_oldest): that segment is no longer behind, and the count goes on."""
    directory = tmp_path / "wal"
    write_records(directory, [bytes([index]) * 50 for index in range(40)], 200)
    wal = WriteAheadLog(directory, segment_bytes=200)
    files = segment_files(directory)
    start, end = (int(files[0].stem), 0), wal.durable_end
    whole = wal.bytes_between(start, end)
    listed = wal.files.numbers()
    dropped = files[1].stat().st_size
    files[1].unlink()  # dropped by retention after the listing was taken
    monkeypatch.setattr(wal.files, "numbers", lambda: listed)
    assert wal.bytes_between(start, end) == whole - dropped
