"""Logged tables as Markdown, for backends whose only form for a table is text."""

from __future__ import annotations

from typing import Any


def markdown_table(table: dict[str, Any], caption: str | None) -> str:
    """A logged table as Markdown, for backends whose only form for it is text."""
    columns = [str(column) for column in table["columns"]]
    lines = [f"| {' | '.join(markdown_cell(c) for c in columns)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(markdown_cell(str(v)) for v in row)} |" for row in table["data"]]
    return "\n".join(([caption, ""] if caption else []) + lines)


def markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
