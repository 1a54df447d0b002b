"""What every stage shares: reading an input column safely, a stable row id, and the failure record."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

#: Longest input text a stage sends as-is (characters). Longer text is a row error, not a request the
#: server will reject after a long upload; stages that take documents truncate by tokens instead.
MAX_TEXT_CHARS = 200_000


class ColumnError(ValueError):
    """The dataset lacks a column a stage needs, or holds the wrong type: a fix for the user, not a row error."""


def read_text(row: Mapping[str, Any], column: str, stage: str) -> str | None:
    """The text in ``column``; ``None`` when it is missing/empty (the stage records a row error).

    Raises :class:`ColumnError` when the column does not exist at all or is not a string column, because then
    every row would fail the same way.
    """
    if column not in row:
        raise ColumnError(f"{stage} needs an input column {column!r}; the dataset has columns {sorted(row.keys())}")
    value = row[column]
    if value is None:
        return None
    if not isinstance(value, str):
        raise ColumnError(f"{stage}: column {column!r} must hold strings, got {type(value).__name__}")
    return value if value.strip() else None


def has_id(row: Mapping[str, Any]) -> bool:
    """Whether the row carries an id of its own (a missing, null or empty ``id`` is none)."""
    value = row.get("id")
    return value is not None and value != ""


def row_id(row: Mapping[str, Any], *texts: str) -> str:
    """The row's ``id`` column if it has one, else a hash of its input text: stable across runs and shards."""
    if has_id(row):
        return str(row["id"])
    return hashlib.blake2b("\0".join(texts).encode(), digest_size=12).hexdigest()


def with_id(row: Mapping[str, Any], text_column: str) -> dict[str, str]:
    """``map`` function: the row's :func:`row_id` written into its ``id`` column (text), so that every output row
    is named by the id its requests are seeded with; a row without one gets the hash of its text."""
    text = row.get(text_column)
    return {"id": row_id(row, text if isinstance(text, str) else "")}


def failure(stage: str, columns: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """The stage's output columns set to their empty value, plus ``<stage>_error``: the row is kept."""
    return {**columns, f"{stage}_error": reason}


def error_reason(stage: str, err: Exception) -> str:
    """The ``<stage>_error`` text for a failed request or an invalid reply (which carries the raw reply)."""
    describe = getattr(err, "describe", None)
    return describe(stage) if callable(describe) else f"{stage}: {err}"
