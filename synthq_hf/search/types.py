"""What every search backend returns, and the one interface the ``search_documents`` stage talks to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked document. ``text`` is the full document (index) or the page's main text (web).

    ``error`` says why ``text`` is empty when a web page could not be fetched or extracted, so the stage can
    report *why* no hit was usable; local index hits never carry one. The local index returns
    :class:`synthq_hf.search.bm25.IndexHit`, the same attributes read lazily from the index.
    """

    document_id: str
    text: str
    url: str | None
    score: float
    title: str | None = None
    error: str | None = None


class SearchBackend(Protocol):
    """Both backends: ``await backend.search("kw1 kw2", k=10)`` → best first."""

    async def search(self, query: str, k: int = 10) -> list[Hit]: ...


class IndexMissing(FileNotFoundError):
    """No index at the given folder: the message is one line that says how to build it."""


class SearchError(RuntimeError):
    """One search failed (HTTP error, bad reply): a row error, the run goes on."""


class SearchConfigError(ValueError):
    """The search set-up is wrong for every row (e.g. a missing API key): stop, tell the user."""
