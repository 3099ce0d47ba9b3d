"""A damaged WAL: flipped bits cost only the records they hit, copied segments are read once.

The WAL files here are laid out by the test exactly as the writer lays them out
(one record per commit, a new segment once the next record would not fit), so
each Hypothesis example costs no fsync. The end-to-end tests run real daemons.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, cli, finish_client, jsonl_runs, run_client, wait_for
from test_wal import segment_files, write_records
from trackd.daemon.wal import Position, WriteAheadLog
from trackd.protocol import HEADER_BYTES, encode, frame_record, iter_records

# Each entry: how many metric rows the message carries, or -1 for a config message.
SHAPES = st.lists(st.integers(min_value=-1, max_value=6), min_size=1, max_size=30)
SEGMENT_BYTES = st.sampled_from([200, 600, 1 << 20])
SEEDS = st.integers(min_value=0, max_value=1 << 40)
FAST = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def envelope(seq: int, rows: int, session: str = "session-a") -> bytes:
    """A protocol message as ingest stores it: the WAL resynchronises only on these."""
    if rows < 0:
        kind, body = "config", {"values": {f"k{seq}": seq}}
    else:
        kind, body = "metrics", {"rows": [[seq * 10 + i, 0.5, {"x": i / 3}] for i in range(rows)]}
    return encode({"v": 1, "s": session, "q": seq, "t": kind, "r": "run-1", "b": body})


def envelopes(shapes: list[int], first: int = 1) -> list[bytes]:
    return [envelope(first + index, rows) for index, rows in enumerate(shapes)]


@dataclass
class Stored:
    """One record as laid out: its file, byte range, and payload."""

    file: int
    start: int
    end: int
    payload: bytes


def lay_out(directory: Path, payloads: list[bytes], segment_bytes: int) -> list[Stored]:
    """Write segments 1, 2, ... as the WAL writer would, one commit per record."""
    directory.mkdir(parents=True)
    stored: list[Stored] = []
    files: list[bytearray] = [bytearray()]
    for payload in payloads:
        record = frame_record(payload)
        if files[-1] and len(files[-1]) + len(record) > segment_bytes:
            files.append(bytearray())
        start = len(files[-1])
        files[-1] += record
        stored.append(Stored(len(files) - 1, start, len(files[-1]), payload))
    for number, data in enumerate(files, start=1):
        (directory / f"{number:020d}.wal").write_bytes(bytes(data))
    return stored


def read_all(wal: WriteAheadLog, budget: int) -> list[tuple[Position, bytes]]:
    """Follow read() position to position, as a sink worker does."""
    seen: list[tuple[Position, bytes]] = []
    position = wal.start
    while batch := wal.read(position, wal.durable_end, budget):
        seen.extend(batch)
        position = batch[-1][0]
    assert position <= wal.durable_end
    return seen


def damage_expected(stored: list[Stored], touched: set[int], sizes: list[int]) -> tuple[int, int]:
    """(spans, bytes) readers must report: each run of damaged records in a row is one span,
    up to the next intact record; a run at the end of the last segment is a torn tail, cut."""
    spans = damaged = 0
    for file, size in enumerate(sizes):
        run: int | None = None
        for index, record in enumerate(stored):
            if record.file != file:
                continue
            if index in touched:
                run = record.start if run is None else run
            elif run is not None:
                spans, damaged, run = spans + 1, damaged + record.start - run, None
        if run is not None and file != len(sizes) - 1:
            spans, damaged = spans + 1, damaged + size - run
    return spans, damaged


def flip(data: bytearray, bit: int) -> None:
    data[bit // 8] ^= 1 << (bit % 8)


@FAST
@given(
    shapes=SHAPES,
    segment_bytes=SEGMENT_BYTES,
    flips=st.lists(st.tuples(SEEDS, SEEDS), min_size=1, max_size=3),
    budget=st.sampled_from([1, 100, 1 << 20]),
)
def test_flipped_bits_cost_only_the_records_they_hit(
    tmp_path: Path,
    shapes: list[int],
    segment_bytes: int,
    flips: list[tuple[int, int]],
    budget: int,
) -> None:
    """Any bits flipped anywhere: the WAL opens, every record whose bytes were not touched is
    read exactly once and in order (by read() in small steps and by scan()), the damage is
    counted exactly, and the record numbers, bytes_between and appends agree with the reads."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path)) / "wal"
    stored = lay_out(directory, envelopes(shapes), segment_bytes)
    files = segment_files(directory)
    sizes = [path.stat().st_size for path in files]
    datas = [bytearray(path.read_bytes()) for path in files]
    for file_seed, bit_seed in flips:
        data = datas[file_seed % len(datas)]
        flip(data, bit_seed % (len(data) * 8))
    for path, data in zip(files, datas, strict=True):
        path.write_bytes(bytes(data))
    touched = {
        index
        for index, record in enumerate(stored)
        if datas[record.file][record.start : record.end] != frame_record(record.payload)
    }
    intact = [record.payload for index, record in enumerate(stored) if index not in touched]
    spans, damaged = damage_expected(stored, touched, sizes)

    wal = WriteAheadLog(directory, segment_bytes=segment_bytes)
    cut = sizes[-1] - files[-1].stat().st_size
    assert [payload for _, payload in read_all(wal, budget)] == intact
    assert [payload for _, payload in wal.scan(wal.start)] == intact
    assert wal.damage() == {
        "corrupt_spans": spans,
        "corrupt_bytes": damaged,
        "duplicate_records": 0,
    }
    assert wal.durable_seq == wal.seq_at(wal.durable_end) == len(intact)
    kept = sum(HEADER_BYTES + len(payload) for payload in intact)
    assert wal.bytes_between(wal.start, wal.durable_end) == kept + damaged
    assert kept + damaged + cut == sum(sizes)

    again = WriteAheadLog(directory, segment_bytes=segment_bytes)
    assert files[-1].stat().st_size == sizes[-1] - cut, "a second opening cut more"
    assert [payload for _, payload in read_all(again, budget)] == intact
    after = envelope(len(shapes) + 1, 2)
    write_records(directory, [after], segment_bytes)
    reopened = WriteAheadLog(directory, segment_bytes=segment_bytes)
    assert [payload for _, payload in reopened.scan(reopened.start)] == [*intact, after]


def test_a_damaged_record_mid_segment_is_skipped_logged_once_and_not_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery used to cut the last segment at the first bad CRC, taking acked records after
    it along; now it keeps the file whole and readers step over the one bad record."""
    directory = tmp_path / "wal"
    payloads = envelopes([3, 3, 3])
    stored = lay_out(directory, payloads, 1 << 20)
    (path,) = segment_files(directory)
    data = bytearray(path.read_bytes())
    flip(data, 8 * (stored[1].start + HEADER_BYTES + 5) + 2)
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="trackd.wal"):
        wal = WriteAheadLog(directory)
        assert path.stat().st_size == len(data)
        assert wal.durable_end == (1, len(data))
        for _ in range(2):
            assert [payload for _, payload in read_all(wal, 1 << 20)] == [payloads[0], payloads[2]]
        assert wal.durable_seq == wal.seq_at(wal.durable_end) == 2
    assert wal.damage()["corrupt_bytes"] == stored[1].end - stored[1].start
    skips = [r.getMessage() for r in caplog.records if "damaged bytes" in r.getMessage()]
    assert skips == [
        f"wal: segment 1: skipped {stored[1].end - stored[1].start} damaged bytes at offset "
        f"{stored[1].start} (a corrupt record); reading resumes at offset {stored[1].end}"
    ]


@FAST
@given(
    shapes=SHAPES,
    segment_bytes=st.sampled_from([200, 600]),
    source_seed=SEEDS,
    placement=st.sampled_from(["next", "gap", "first"]),
    extra=st.integers(min_value=0, max_value=3),
)
def test_a_copied_segment_is_read_once(
    tmp_path: Path,
    shapes: list[int],
    segment_bytes: int,
    source_seed: int,
    placement: str,
    extra: int,
) -> None:
    """A segment restored under another number (after the last, past a gap, or before the
    first), optionally with new records after the copied ones: every record is read once,
    the copies are counted, and the log still takes appends."""
    directory = Path(tempfile.mkdtemp(dir=tmp_path)) / "wal"
    payloads = envelopes(shapes)
    stored = lay_out(directory, payloads, segment_bytes)
    files = segment_files(directory)
    source = source_seed % len(files)
    extras = envelopes([1] * extra, first=len(shapes) + 1)
    number = {"next": len(files) + 1, "gap": len(files) + 5, "first": 0}[placement]
    copy = directory / f"{number:020d}.wal"
    copy.write_bytes(files[source].read_bytes() + b"".join(map(frame_record, extras)))
    copied = sum(1 for record in stored if record.file == source)

    wal = WriteAheadLog(directory, segment_bytes=segment_bytes)
    read = [payload for _, payload in read_all(wal, 100)]
    if placement == "first":  # the copy is read first, and its original is the repeat
        assert sorted(read) == sorted([*payloads, *extras])
    else:
        assert read == [*payloads, *extras]
    assert wal.damage() == {"corrupt_spans": 0, "corrupt_bytes": 0, "duplicate_records": copied}
    assert wal.durable_seq == wal.seq_at(wal.durable_end) == len(read)

    after = envelope(len(shapes) + extra + 1, 2)
    write_records(directory, [after], segment_bytes)
    reopened = WriteAheadLog(directory, segment_bytes=segment_bytes)
    assert [payload for _, payload in reopened.scan(reopened.start)] == [*read, after]


# --- end to end: a daemon on a damaged WAL --------------------------------------------------

SMALL_SEGMENTS = {"TRACKD_WAL_SEGMENT_BYTES": str(16 * 1024)}


def wal_records(directory: Path) -> list[tuple[Path, int, int, dict]]:
    """(file, start, end, message) for every record of an undamaged WAL."""
    found = []
    for path in segment_files(directory):
        start = 0
        for end, payload in iter_records(path.read_bytes()):
            found.append((path, start, end, msgpack.unpackb(payload)))
            start = end
    return found


def steps(rows: list[dict]) -> list[int]:
    return [row["step"] for row in rows]


def log_a_run(daemon: Daemon, env: dict[str, str], sink: Path, name: str, rows: int) -> None:
    """Log `rows` rows in many small messages (paced), and stop the daemon once delivered."""
    daemon.start("--sink", f"jsonl:{sink}", extra_env=SMALL_SEGMENTS)
    # 0.25 s every 100 rows: the client packs a quiet run every 0.2 s, so ~100 rows a record
    finish_client(run_client(env, "--name", name, "--rows", str(rows), "--pace", "0.25"))
    daemon.flush()
    assert daemon.stop() == 0


def by_name(root: Path) -> dict[str, list[dict]]:
    return {name.rsplit("-", 1)[0]: rows for name, rows in jsonl_runs(root).items()}


def test_a_daemon_on_a_wal_with_flipped_bits_delivers_every_intact_record(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """Three metric records damaged, one bit each, in different segments: a daemon starts on
    that WAL, a new sink gets every other row once and in order, status counts the three
    damaged stretches, and new runs still arrive whole in both sinks."""
    first, second = tmp_path / "first", tmp_path / "second"
    log_a_run(daemon, env, first, "before", 3000)
    records = wal_records(daemon.data_dir / "wal")
    candidates = [
        (path, start, end, message)
        for (path, start, end, message), following in itertools.pairwise(records)
        if message["t"] == "metrics" and following[0] == path
    ]
    files = sorted({path for path, *_ in candidates})
    assert len(files) >= 3, f"the run filled only {len(files)} segments"
    damaged = [
        next(c for c in candidates if c[0] == path)
        for path in (files[0], files[len(files) // 2], files[-1])
    ]
    lost: set[int] = set()
    for path, start, end, message in damaged:
        data = bytearray(path.read_bytes())
        flip(data, 8 * (start + (end - start) // 2))
        path.write_bytes(bytes(data))
        lost |= {row[0] for row in message["b"]["rows"]}

    daemon.start("--sink", f"jsonl:{first}", "--sink", f"jsonl:{second}", extra_env=SMALL_SEGMENTS)
    finish_client(run_client(env, "--name", "after", "--rows", "2000"))
    daemon.flush()
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["wal"]["corrupt_spans"] == 3
    assert status["wal"]["corrupt_bytes"] == sum(end - start for _, start, end, _ in damaged)
    assert daemon.stop() == 0
    assert steps(by_name(second)["before"]) == [s for s in range(3000) if s not in lost]
    assert len(lost) > 0
    for root in (first, second):
        assert steps(by_name(root)["after"]) == list(range(2000))
    assert steps(by_name(first)["before"]) == list(range(3000))


def test_a_restored_copy_of_a_segment_reaches_each_sink_once(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """A backup restore put a copy of an old segment after the last one, beyond every sink's
    cursor: the daemon starts, sets the copy aside, and neither the sink that had delivered
    everything nor a new one gets any row twice."""
    first, second = tmp_path / "first", tmp_path / "second"
    log_a_run(daemon, env, first, "before", 3000)
    wal_dir = daemon.data_dir / "wal"
    files = segment_files(wal_dir)
    assert len(files) >= 3, f"the run filled only {len(files)} segments"
    source = files[len(files) // 2]
    copy = wal_dir / f"{int(files[-1].stem) + 1:020d}.wal"
    shutil.copyfile(source, copy)
    copied = len(list(iter_records(source.read_bytes())))

    daemon.start("--sink", f"jsonl:{first}", "--sink", f"jsonl:{second}", extra_env=SMALL_SEGMENTS)
    assert copy.with_name(copy.name + ".duplicate").exists()
    assert not copy.exists()
    finish_client(run_client(env, "--name", "after", "--rows", "2000"))
    daemon.flush()
    assert daemon.status()["wal"]["duplicate_records"] == copied
    assert daemon.stop() == 0
    for root in (first, second):
        runs = by_name(root)
        assert steps(runs["before"]) == list(range(3000))
        assert steps(runs["after"]) == list(range(2000))


def test_replay_of_a_damaged_data_dir_skips_only_the_damaged_record(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """`trackd replay DATA_DIR` over a WAL with one bit flipped mid-segment: every row outside
    the damaged record arrives once, in order, and the data dir is left exactly as it was."""
    log_a_run(daemon, env, tmp_path / "live", "before", 3000)
    records = wal_records(daemon.data_dir / "wal")
    path, start, end, message = next(
        (path, start, end, message)
        for (path, start, end, message), following in itertools.pairwise(records)
        if message["t"] == "metrics" and following[0] == path and start > 0
    )
    data = bytearray(path.read_bytes())
    flip(data, 8 * (start + (end - start) // 2))
    path.write_bytes(bytes(data))
    lost = {row[0] for row in message["b"]["rows"]}
    before = {p.name: p.read_bytes() for p in (daemon.data_dir / "wal").iterdir()}

    out = tmp_path / "replayed"
    result = cli(env, "replay", str(daemon.data_dir), "--sink", f"jsonl:{out}", timeout=120)
    assert result.returncode == 0, result.stderr
    assert steps(by_name(out)["before"]) == [s for s in range(3000) if s not in lost]
    assert 0 < len(lost) < 3000
    assert {p.name: p.read_bytes() for p in (daemon.data_dir / "wal").iterdir()} == before


def test_a_record_over_the_default_frame_cap_is_data_not_damage(tmp_path: Path) -> None:
    """`max_frame_bytes` may be raised above the protocol's 16 MiB default: a record that large
    between two small ones is read whole, nothing is counted as damage, and nothing is cut."""
    big = envelope(2, rows=0) + b"\0" * (20 << 20)  # a frame's length, not its content, matters
    segment = 64 << 20
    stored = lay_out(tmp_path / "wal", [envelope(1, 3), big, envelope(3, 3)], segment)
    wal = WriteAheadLog(tmp_path / "wal", segment)
    assert [payload for _, payload in read_all(wal, 1 << 20)] == [s.payload for s in stored]
    assert wal.damage() == {"corrupt_spans": 0, "corrupt_bytes": 0, "duplicate_records": 0}
    assert wal.durable_end == (1, stored[-1].end)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_damaged_tail_found_while_running_holds_the_sink_without_spinning(
    daemon: Daemon, env: dict[str, str], tmp_path: Path
) -> None:
    """The last record of the live segment damaged while a slow sink is busy: the sink stops
    before it without burning a core (it used to re-read in a tight loop: ~2 CPU-seconds in 3),
    and goes on as soon as a valid record follows."""
    out = tmp_path / "out"
    daemon.start("--sink", f"slow:{out}?delay=4")
    finish_client(run_client(env, "--name", "a", "--rows", "10"))  # the sink's first batch
    finish_client(run_client(env, "--name", "b", "--rows", "10"))
    segment = segment_files(daemon.data_dir / "wal")[-1]
    data = bytearray(segment.read_bytes())
    ends = [0] + [end for end, _ in iter_records(bytes(data))]
    start, end = ends[-2], ends[-1]  # b's run_end, not yet read: the sink is in its first write
    flip(data, 8 * (start + (end - start) // 2))
    with segment.open("r+b") as handle:
        handle.seek(start)
        handle.write(bytes(data[start:end]))
    [name] = daemon.status()["sinks"]
    wait_for(lambda: daemon.status()["sinks"][name]["delivered_rows"] == 20, timeout=60)
    assert daemon.process is not None
    before = _cpu_seconds(daemon.process.pid)
    time.sleep(3)
    assert _cpu_seconds(daemon.process.pid) - before < 1.0

    finish_client(run_client(env, "--name", "c", "--rows", "10"))
    daemon.flush()
    assert daemon.status()["wal"]["corrupt_spans"] == 1
    assert {name: steps(rows) for name, rows in by_name(out).items()} == {
        "a": list(range(10)),
        "b": list(range(10)),
        "c": list(range(10)),
    }
