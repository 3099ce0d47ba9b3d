"""The JSONL sink's fast line encoder writes what `json` would read back, row for row."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from trackd.sinks.jsonl import json_lines

SCALARS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
KEYS = st.one_of(st.text(max_size=12), st.sampled_from(["},{", ":null", "step", "ts", '"}\n{']))
ROWS = st.lists(
    st.fixed_dictionaries({"step": st.integers(0, 2**63 - 1), "ts": st.floats()}).flatmap(
        lambda head: st.dictionaries(KEYS, SCALARS, max_size=4).map(lambda v: {**head, **v})
    ),
    max_size=30,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(ROWS)
def test_every_row_is_one_line_that_reads_back_as_the_row(rows: list[dict[str, Any]]) -> None:
    data = json_lines(rows)
    lines = data.decode().split("\n")
    assert lines[-1] == ""
    assert len(lines) - 1 == len(rows)
    for line, row in zip(lines, rows, strict=False):
        back = json.loads(line)
        assert list(back) == list(row)
        assert all(_same(row[key], back[key]) for key in row), (line, row)


def test_nan_and_infinities_stay_themselves_not_null() -> None:
    data = json_lines([{"step": 1, "ts": 1.0, "loss": math.nan, "up": math.inf, "down": -math.inf}])
    assert data == b'{"step":1,"ts":1.0,"loss":NaN,"up":Infinity,"down":-Infinity}\n'


def test_a_key_holding_the_separator_does_not_split_its_row() -> None:
    rows = [{"step": 1, "ts": 1.0, "a},{b": 2}, {"step": 2, "ts": 2.0, "a},{b": 3}]
    assert [json.loads(line) for line in json_lines(rows).splitlines()] == rows
