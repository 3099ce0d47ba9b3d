"""Sinks dispatch on a record's type through one table (`Sink.handlers`, `@handles`)."""

from __future__ import annotations

from typing import Any

import pytest

from trackd.protocol import INTERNAL_TYPES, MESSAGE_TYPES
from trackd.sinks.base import Sink, handles, sink_class_for

DELIVERED = MESSAGE_TYPES - INTERNAL_TYPES


class Base(Sink):
    kind = "demo"
    target_key = "path"

    @handles("metrics")
    def _on_metrics(self, seen: list[str]) -> None:
        seen.append("base metrics")

    @handles("config", "tags")
    def _on_values(self, seen: list[str]) -> None:
        seen.append("base values")


class Derived(Base):
    @handles("metrics")
    def _on_rows(self, seen: list[str]) -> None:
        seen.append("derived metrics")


def test_a_subclass_inherits_its_bases_handlers_and_may_replace_one() -> None:
    """The table is the base's with the subclass's marks over it; the base keeps its own."""
    seen: list[str] = []
    for record_type in ("metrics", "tags"):
        handler: Any = Derived("x").handler(record_type)
        handler(seen)
    base_handler: Any = Base("x").handler("metrics")
    base_handler(seen)
    assert seen == ["derived metrics", "base values", "base metrics"]
    assert Derived("x").handler("alert") is None


@pytest.mark.parametrize(
    ("kind", "unhandled"),
    [
        ("jsonl", set()),
        ("mlflow", {"metrics", "system"}),  # batched per call in write(), not per record
        ("wandb", set()),
        ("aim", set()),
        ("tensorboard", {"console"}),  # counted as a notice
        ("trackio", {"console"}),  # counted as a notice
        ("comet", {"system", "console", "alert"}),  # counted as a notice
    ],
)
def test_each_sink_handles_every_delivered_type_but_those_it_names(
    kind: str, unhandled: set[str]
) -> None:
    """Each built-in sink's table covers the delivered types, each by a method of its own."""
    sink_class = sink_class_for(kind)
    assert DELIVERED - set(sink_class.handlers) == unhandled
    assert set(sink_class.handlers) <= DELIVERED
    for name in sink_class.handlers.values():
        assert callable(getattr(sink_class, name))
