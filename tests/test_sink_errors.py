"""The one mapping from an SDK's exceptions to SinkError (`ErrorTable`), as each sink uses it."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from trackd.sinks.base import ErrorTable, SinkError, call_mapped, mapped_errors


class SdkError(Exception):
    """An SDK's base error."""


class SdkUsageError(SdkError, ValueError):
    """An SDK error that is also a ValueError: its own entry wins over both bases'."""


class Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


TABLE = ErrorTable(
    "demo",
    {
        SdkUsageError: True,
        SdkError: lambda exc: None if "unknown" in str(exc) else False,
        ValueError: False,
        OSError: lambda exc: getattr(exc, "errno", None) != errno.EINVAL,
    },
    sdk_modules=frozenset({"sqlite3"}),
    first=lambda exc: True if getattr(exc, "response", None) else None,
)


def test_the_most_specific_class_in_the_mro_decides() -> None:
    """A subclass's entry wins over an entry of any of its bases."""
    assert TABLE.retriable(SdkUsageError("x")) is True
    assert TABLE.retriable(SdkError("x")) is False
    assert TABLE.retriable(ValueError("x")) is False


def test_a_kind_that_cannot_tell_passes_the_lookup_up_the_mro() -> None:
    """A function that answers None leaves the decision to the next class up."""
    assert TABLE.retriable(SdkError("unknown")) is None
    assert TABLE.retriable(OSError(errno.EINVAL, "bad")) is False
    assert TABLE.retriable(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is True


def test_first_judges_before_the_table_and_sdk_modules_after_it() -> None:
    """A carried response decides first; an uncovered class of an SDK module is retriable."""
    error = ValueError("429")
    error.response = Response(429)  # type: ignore[attr-defined]
    assert TABLE.retriable(error) is True
    assert TABLE.retriable(sqlite3.Warning("w")) is True
    assert TABLE.retriable(KeyError("a bug")) is None


def test_mapped_errors_raise_a_sink_error_naming_the_sink_and_what_failed() -> None:
    """The SinkError says which sink and what it did; the SDK's exception is its cause."""
    cause = OSError(errno.ENOSPC, "full")
    with (
        pytest.raises(SinkError, match=r"^demo: cannot append: .*full") as caught,
        mapped_errors(TABLE, "cannot append"),
    ):
        raise cause
    assert caught.value.retriable
    assert caught.value.__cause__ is cause


def test_a_bug_and_a_sink_error_pass_through_unchanged() -> None:
    """What the table does not cover is raised as is, and so is a sink's own SinkError."""
    with pytest.raises(KeyError):
        call_mapped(TABLE, {}.__getitem__, "missing")
    own = SinkError("demo: mine", retriable=False)

    def fails() -> None:
        raise own

    with pytest.raises(SinkError) as caught:
        call_mapped(TABLE, fails)
    assert caught.value is own


def test_call_mapped_passes_arguments_and_returns_the_result() -> None:
    """Keyword arguments reach the SDK call (wandb's `config.update(..., allow_val_change=)`)."""
    assert call_mapped(TABLE, dict, [("a", 1)], b=2) == {"a": 1, "b": 2}
