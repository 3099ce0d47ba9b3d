"""The wire format: round trips, validation errors that name the field, record framing."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trackd.protocol import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    VERSION,
    ProtocolError,
    decode,
    encode,
    frame_record,
    iter_records,
)

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False)
NAMES = st.text(max_size=20)
JSON_LEAVES = st.none() | st.booleans() | INT64 | FLOATS | st.text(max_size=20)
JSON_TREES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(NAMES, children, max_size=4),
    max_leaves=20,
)
VALUE_MAPS = st.dictionaries(NAMES, JSON_TREES, max_size=5)
STRING_MAPS = st.dictionaries(NAMES, st.text(max_size=20), max_size=5)
METRIC_VALUES = st.dictionaries(NAMES, st.booleans() | INT64 | FLOATS, max_size=5)
ROWS = st.lists(st.tuples(INT64, FLOATS, METRIC_VALUES).map(list), max_size=20)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "run_start": st.fixed_dictionaries(
        {"project": st.text(max_size=20), "name": st.text(max_size=20), "started": FLOATS},
        optional={
            "group": optional(st.text(max_size=20)),
            "resume": optional(st.sampled_from(["allow", "must"])),
            "host": optional(st.text(max_size=20)),
            "pid": optional(INT64),
            "rank": optional(INT64),
            "local_rank": optional(INT64),
            "world_size": optional(INT64),
            "config": VALUE_MAPS,
            "tags": STRING_MAPS,
        },
    ),
    "metrics": st.fixed_dictionaries({"rows": ROWS}),
    "config": st.fixed_dictionaries({"values": VALUE_MAPS}),
    "summary": st.fixed_dictionaries({"values": VALUE_MAPS}),
    "tags": st.fixed_dictionaries({"values": STRING_MAPS}),
    "artifact": st.fixed_dictionaries({"path": st.text(max_size=40), "name": NAMES}),
    "run_end": st.fixed_dictionaries(
        {"status": st.sampled_from(["finished", "failed"]), "ended": FLOATS},
        optional={"error": optional(st.text(max_size=40))},
    ),
    "alert": st.fixed_dictionaries(
        {
            "ts": FLOATS,
            "title": st.text(max_size=20),
            "text": st.text(max_size=40),
            "level": st.sampled_from(["INFO", "WARN", "ERROR"]),
        }
    ),
}
HISTOGRAM = {"step": 0, "ts": 1.0, "key": "h", "kind": "histogram", "counts": [1, 2]}


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(sorted(BODIES)))
    return {
        "v": VERSION,
        "s": draw(st.text(min_size=1, max_size=32)),
        "q": draw(st.integers(min_value=1, max_value=2**63 - 1)),
        "t": kind,
        "r": draw(st.text(max_size=32)),
        "b": draw(BODIES[kind]),
    }


def envelope(**changes: Any) -> dict[str, Any]:
    """A valid metrics message with some envelope fields replaced (None: removed)."""
    message: dict[str, Any] = {
        "v": VERSION,
        "s": "session-1",
        "q": 1,
        "t": "metrics",
        "r": "run-1",
        "b": {"rows": [[0, 1.5, {"loss": 0.5}]]},
    }
    for key, value in changes.items():
        if value is None:
            message.pop(key)
        else:
            message[key] = value
    return message


def error_of(frame: bytes, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(frame, **kwargs)
    return str(caught.value)


@given(messages())
def test_every_message_type_round_trips(message: dict[str, Any]) -> None:
    """encode then decode gives back the same message, for every type and any valid body."""
    assert decode(encode(message)) == message


@given(st.lists(st.sampled_from([math.nan, math.inf, -math.inf]), min_size=1, max_size=3))
def test_nan_and_inf_metric_values_survive_a_round_trip(specials: list[float]) -> None:
    """NaN and +-Inf metric values are valid and come back as such."""
    values = {f"k{index}": value for index, value in enumerate(specials)}
    decoded = decode(encode(envelope(b={"rows": [[0, 1.0, values]]})))
    for key, value in values.items():
        got = decoded["b"]["rows"][0][2][key]
        assert (math.isnan(got) and math.isnan(value)) or got == value


def test_a_string_metric_value_is_refused_naming_the_row_and_key() -> None:
    """A string where a metric number belongs names b.rows[i].values['key']."""
    frame = encode(envelope(b={"rows": [[0, 1.0, {"acc": 0.5, "loss": "high"}]]}))
    assert "b.rows[0].values['loss']" in error_of(frame)


def test_a_bad_later_row_is_named_by_its_index() -> None:
    """The error names which row is wrong, not just that one is."""
    rows = [[0, 1.0, {"loss": 0.5}], [1, 1.0, {"loss": 0.4}], [2, "now", {"loss": 0.3}]]
    assert error_of(encode(envelope(b={"rows": rows}))).startswith("b.rows[2].ts:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("s", 123),
        ("s", None),
        ("q", "1"),
        ("q", 1.0),
        ("q", True),
        ("t", 7),
        ("r", b"run"),
        ("b", [1, 2]),
        ("b", None),
    ],
)
def test_a_wrong_envelope_field_type_is_named(field: str, value: Any) -> None:
    """A wrong or missing envelope field is refused with an error that starts with its name."""
    assert error_of(encode(envelope(**{field: value}))).startswith(f"{field}: expected")


def test_a_sequence_number_below_one_is_refused() -> None:
    """Sequence numbers start at 1: q=0 is refused naming q."""
    assert error_of(encode(envelope(q=0))).startswith("q: ")


def test_an_unknown_message_type_is_refused_naming_it() -> None:
    """An unknown `t` is refused, naming the type it got."""
    assert error_of(encode(envelope(t="telemetry"))) == "t: unknown message type 'telemetry'"


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_a_wrong_protocol_version_is_refused(version: Any) -> None:
    """Any version but this one is refused, naming v and the version received."""
    text = error_of(encode(envelope(v=version)))
    assert text.startswith("v: unsupported protocol version")
    assert repr(version) in text


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        ("run_start", {"project": "p", "name": 5, "started": 1.0}, "b.name"),
        ("run_start", {"project": "p", "name": "n", "started": 1}, "b.started"),
        ("run_start", {"project": "p", "name": "n", "started": 1.0, "pid": "7"}, "b.pid"),
        ("config", {"values": {"opt": {"lr": b"\x00"}}}, "b.values['opt']['lr']"),
        ("tags", {"values": {"team": 3}}, "b.values['team']"),
        ("summary", {"values": []}, "b.values"),
        ("artifact", {"path": "/x", "name": None}, "b.name"),
        ("run_end", {"status": "crashed", "ended": 1.0}, "b.status"),
        ("run_end", {"status": "failed", "ended": 1.0, "error": 3}, "b.error"),
        ("alert", {"ts": 1.0, "title": "t", "text": "x", "level": "DEBUG"}, "b.level"),
        ("alert", {"ts": 1.0, "title": None, "text": "x", "level": "INFO"}, "b.title"),
        ("alert", {"ts": 1.0, "title": "t", "level": "INFO"}, "b.text"),
        ("media", {**HISTOGRAM, "edges": [0.0, 1.0]}, "b.edges: expected one more edge"),
        ("media", {**HISTOGRAM, "edges": [0.0, 2.0, 1.0]}, "b.edges: edges must not decrease"),
        ("media", {**HISTOGRAM, "counts": [1, "2"], "edges": [0, 1, 2]}, "b.counts[1]"),
        ("media", {**HISTOGRAM, "counts": [1, -2], "edges": [0, 1, 2]}, "b.counts: a bin"),
        ("media", {**HISTOGRAM, "edges": [0.0, math.nan, 2.0]}, "b.edges[1]: expected a finite"),
        ("media", HISTOGRAM, "b.edges: expected list"),
        ("system", {"ts": 1.0, "node": "n", "values": {"cpu": "hot"}}, "b.values['cpu']"),
        (
            "system",
            {"ts": 1.0, "node": "n", "values": {}, "since": [1]},
            "b.since: expected dict or nil",
        ),
        (
            "system",
            {"ts": 1.0, "node": "n", "values": {}, "since": {"network.sent": None}},
            "b.since['network.sent']",
        ),
    ],
)
def test_a_wrong_body_field_is_named(kind: str, body: dict[str, Any], field: str) -> None:
    """A body field of the wrong type or value is refused with an error starting with its path."""
    assert error_of(encode(envelope(t=kind, b=body))).startswith(field)


@pytest.mark.parametrize("config", [[1, 2], 5, "lr=3e-4"])
def test_a_run_start_config_that_is_not_a_map_is_refused(config: Any) -> None:
    """run_start's config must be a map (sinks merge it as one): anything else names b.config."""
    body = {"project": "p", "name": "n", "started": 1.0, "config": config}
    assert error_of(encode(envelope(t="run_start", b=body))).startswith("b.config")


def test_a_histogram_travels_inline_without_a_store_file() -> None:
    """A histogram media body needs counts and edges, and no path, sha256, size or format."""
    for counts, edges in (([1, 2], [0.0, 0.5, 1.0]), ([], []), ([0.5], [1, 1])):
        message = envelope(t="media", b={**HISTOGRAM, "counts": counts, "edges": edges})
        assert decode(encode(message)) == message


def test_a_bad_body_error_carries_the_sender() -> None:
    """A well-addressed message with a bad body reports (session, seq) so it can be answered."""
    frame = encode(envelope(q=7, b={"rows": [[0, 1.0, {"loss": "x"}]]}))
    with pytest.raises(ProtocolError) as caught:
        decode(frame)
    assert caught.value.sender == ("session-1", 7)


def test_an_oversized_frame_is_refused_before_decoding() -> None:
    """A frame over the 16 MiB default cap is refused with its size and the cap named."""
    frame = encode(envelope(b={"rows": [], "pad": b"\0" * MAX_FRAME_BYTES}))
    text = error_of(frame)
    assert text.startswith("frame: ")
    assert str(len(frame)) in text
    assert str(MAX_FRAME_BYTES) in text


def test_a_smaller_cap_applies_when_given() -> None:
    """decode(max_bytes=N) refuses a valid frame longer than N."""
    frame = encode(envelope())
    assert decode(frame, max_bytes=len(frame)) == envelope()
    assert f"{len(frame) - 1}-byte cap" in error_of(frame, max_bytes=len(frame) - 1)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_protocol_error(frame: bytes) -> None:
    """Arbitrary bytes never raise anything but ProtocolError (the daemon never dies of input)."""
    with contextlib.suppress(ProtocolError):
        decode(frame)


@given(messages(), st.data())
def test_truncated_messagepack_is_refused_as_a_frame_error(
    message: dict[str, Any], data: st.DataObject
) -> None:
    """A valid frame cut short is refused as not MessagePack."""
    frame = encode(message)
    cut = data.draw(st.integers(min_value=1, max_value=len(frame) - 1))
    assert error_of(frame[:cut]).startswith("frame: ")


def test_a_frame_that_is_not_a_map_is_refused() -> None:
    """A MessagePack value other than a map is refused as a frame error."""
    assert error_of(msgpack.packb([1, 2, 3])) == "frame: expected a map, got list"


@given(st.lists(st.binary(max_size=300), max_size=30))
def test_iter_records_returns_exactly_the_framed_payloads(payloads: list[bytes]) -> None:
    """Concatenated frame_record()s read back as exactly the payloads, with their end offsets."""
    buffer = b"".join(frame_record(payload) for payload in payloads)
    records = list(iter_records(buffer))
    assert [payload for _, payload in records] == payloads
    ends = [end for end, _ in records]
    expected_ends = []
    offset = 0
    for payload in payloads:
        offset += HEADER_BYTES + len(payload)
        expected_ends.append(offset)
    assert ends == expected_ends


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=30), st.data())
def test_iter_records_stops_at_a_torn_tail(payloads: list[bytes], data: st.DataObject) -> None:
    """A buffer cut at any byte yields exactly the whole records before the cut."""
    buffer = b"".join(frame_record(payload) for payload in payloads)
    cut = data.draw(st.integers(min_value=0, max_value=len(buffer)))
    whole, offset = [], 0
    for payload in payloads:
        offset += HEADER_BYTES + len(payload)
        if offset <= cut:
            whole.append(payload)
    assert [payload for _, payload in iter_records(buffer[:cut])] == whole


@given(st.lists(st.binary(min_size=1, max_size=100), min_size=2, max_size=10), st.data())
def test_iter_records_stops_at_a_corrupted_record(
    payloads: list[bytes], data: st.DataObject
) -> None:
    """A record whose payload fails its CRC ends the read: only the records before it come back."""
    index = data.draw(st.integers(min_value=0, max_value=len(payloads) - 1))
    framed = [bytearray(frame_record(payload)) for payload in payloads]
    framed[index][HEADER_BYTES] ^= 0xFF
    buffer = b"".join(bytes(record) for record in framed)
    assert [payload for _, payload in iter_records(buffer)] == payloads[:index]
