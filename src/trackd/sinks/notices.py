"""Conditions a sink meets again and again, counted for `trackd status` and logged once."""

from __future__ import annotations

import logging


class Notices:
    """Count a recurring condition (a media kind it cannot show, a truncated value); log it once."""

    def __init__(self, sink: str) -> None:
        self._sink = sink
        self.counts: dict[str, int] = {}

    def __call__(self, notice: str) -> None:
        seen = self.counts.get(notice, 0)
        self.counts[notice] = seen + 1
        if not seen:
            logging.getLogger(f"trackd.sinks.{self._sink}").warning("%s: %s", self._sink, notice)
