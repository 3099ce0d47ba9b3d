"""trackd.Histogram (W&B's and trackio's two forms) and alert levels, on the client side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trackd
from trackd.client.run import _level

FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(FINITE, min_size=1, max_size=200), st.integers(min_value=1, max_value=80))
def test_a_plain_list_is_binned_as_numpy_histogram_bins_it(values: list[float], bins: int) -> None:
    """Without NumPy, a list gets numpy.histogram's counts and (within rounding) its edges."""
    histogram = trackd.Histogram(values, num_bins=bins)
    counts, edges = np.histogram(np.asarray(values), bins=bins)
    assert histogram.edges == pytest.approx(edges.tolist(), rel=1e-9, abs=1e-9)
    assert sum(histogram.counts) == len(values)
    # a value exactly on an inner edge may fall either side by rounding: compare totals near it
    assert np.abs(np.asarray(histogram.counts) - counts).sum() <= 2 * sum(
        1 for v in values if np.isclose(edges[1:-1], v, rtol=0, atol=1e-9).any()
    )


def test_non_finite_values_are_left_out_and_none_left_gives_an_empty_histogram() -> None:
    """NaN and infinities are dropped before binning, as trackio and W&B do."""
    assert trackd.Histogram([1.0, float("nan"), 3.0, float("inf")], num_bins=2).counts == [1, 1]
    empty = trackd.Histogram([float("nan")])
    assert (empty.counts, empty.edges) == ([], [])


def test_numpy_arrays_and_tensors_are_flattened_and_binned() -> None:
    """A 2-D array and a tensor give the same histogram as their flat values."""
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    expected = trackd.Histogram(list(range(12)), num_bins=4)
    for value in (array, torch.arange(12).reshape(3, 4)):
        got = trackd.Histogram(value, num_bins=4)
        assert (got.counts, got.edges) == (expected.counts, expected.edges)


def test_an_array_is_binned_by_numpy_as_trackio_bins_it() -> None:
    """A NumPy array (or tensor, or boolean array) gets numpy.histogram's exact counts and
    edges, its non-finite values left out."""
    data = np.random.default_rng(0).normal(size=10_000)
    counts, edges = np.histogram(data, bins=64)
    with_nan = np.concatenate([data, [np.nan, np.inf]])
    histogram = trackd.Histogram(with_nan)
    assert (histogram.counts, histogram.edges) == (counts.tolist(), edges.tolist())
    assert trackd.Histogram(np.array([True, False, True]), num_bins=2).counts == [1, 2]


def test_np_histogram_is_taken_as_it_is() -> None:
    """np_histogram=(counts, edges) keeps numpy's counts and edges as plain lists."""
    counts, edges = np.histogram([0.1, 0.2, 0.9], bins=3, range=(0.0, 1.0))
    histogram = trackd.Histogram(np_histogram=(counts, edges))
    assert histogram.counts == [2, 0, 1]
    assert histogram.edges == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert histogram.meta() == {"counts": histogram.counts, "edges": histogram.edges}
    assert {type(v) for v in histogram.counts} == {int}  # plain numbers, as MessagePack packs
    assert {type(v) for v in histogram.edges} == {float}
    unsigned = trackd.Histogram(np_histogram=(np.array([3, 1], np.uint8), np.arange(3)))
    assert (unsigned.counts, unsigned.edges) == ([3, 1], [0.0, 1.0, 2.0])
    assert {type(v) for v in unsigned.edges} == {float}
    series = trackd.Histogram(np_histogram=(pd.Series([2, 1]), pd.Series([0.0, 0.5, 1.0])))
    assert (series.counts, series.edges) == ([2, 1], [0.0, 0.5, 1.0])
    with pytest.raises(TypeError, match="counts\\[1\\]"):  # pandas' missing value
        trackd.Histogram(np_histogram=(pd.Series([2, None], dtype="Int64"), [0.0, 0.5, 1.0]))


def test_bins_are_capped_at_512_as_wandb_and_trackio_cap_them() -> None:
    assert len(trackd.Histogram(list(range(2000)), num_bins=2000).counts) == 512


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "text"),
    [
        ((), {}, ValueError, "either sequence or np_histogram"),
        (([1],), {"np_histogram": ([1], [0, 1])}, ValueError, "either sequence"),
        (([1, "x"],), {}, TypeError, "sequence[1]"),
        (("abc",), {}, TypeError, "sequence"),
        (([1],), {"num_bins": 0}, ValueError, "num_bins"),
        ((), {"np_histogram": ([1, 2], [0, 1])}, ValueError, "one more edge than counts"),
        ((), {"np_histogram": ([1, -1], [0, 1, 2])}, ValueError, "counts >= 0"),
        ((), {"np_histogram": ([1, 1], [0, 2, 1])}, ValueError, "must not decrease"),
        ((), {"np_histogram": [1, 2, 3]}, TypeError, "(counts, edges) pair"),
        ((), {"np_histogram": ([1] * 513, range(514))}, ValueError, "513 bins, at most 512"),
        ((np.array(["a", "b"]),), {}, TypeError, "dtype <U1"),
        # NumPy arrays of numbers skip the per-value type check: the value checks still apply
        ((), {"np_histogram": (np.array([1, -1]), np.arange(3.0))}, ValueError, "counts >= 0"),
        ((), {"np_histogram": (np.ones(2), np.array([0, np.nan, 2]))}, ValueError, "finite"),
        ((), {"np_histogram": (np.ones(2), np.array([0.0, 2, 1]))}, ValueError, "not decrease"),
        ((), {"np_histogram": (np.ones(2, bool), np.arange(3.0))}, TypeError, "counts[0]"),
        ((), {"np_histogram": (np.ones(2), np.arange(4.0))}, ValueError, "one more edge"),
    ],
)
def test_a_bad_histogram_is_refused_naming_the_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=None) as caught:
        trackd.Histogram(*args, **kwargs)
    assert text in str(caught.value)


class _AlertLevel:
    """Stands in for an enum member (W&B's AlertLevel.WARN has value "WARN", trackio's "warn")."""

    def __init__(self, value: str) -> None:
        self.value = value


@pytest.mark.parametrize(
    ("given_level", "level"),
    [
        ("INFO", "INFO"),
        ("warn", "WARN"),
        ("Warning", "WARN"),
        ("error", "ERROR"),
        (_AlertLevel("WARN"), "WARN"),
        (_AlertLevel("error"), "ERROR"),
    ],
)
def test_alert_levels_are_taken_in_wandb_and_trackio_forms(given_level: object, level: str) -> None:
    assert _level(given_level) == level


@pytest.mark.parametrize("given_level", ["DEBUG", 3, None])
def test_an_unknown_alert_level_is_refused(given_level: object) -> None:
    with pytest.raises(ValueError, match="level must be one of"):
        _level(given_level)


def test_alert_refuses_a_missing_title_and_a_non_string_text(
    dirs: dict[str, Any],
) -> None:
    run = trackd.init("p", "alerts", mode="offline")
    with pytest.raises(TypeError, match="title"):
        run.alert("", "text")
    with pytest.raises(TypeError, match="text"):
        run.alert("title", 3)  # type: ignore[arg-type]
    run.finish()
