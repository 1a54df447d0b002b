"""Find a grounding document for a seed's keywords (SynthQuestions §3.1: seeds are grounded in retrieved web text).

Input columns: ``keywords`` (list of str, from ``extract_keywords``) or, when there is no ``keywords`` column, a
``query`` column (str). ``column=`` picks one explicitly.
Output columns: ``document`` (str), ``document_id`` (str), ``document_url`` (str or ``None``), ``search_score``
(float: BM25 for the index; the provider's score, else 1/rank, for the web), ``search_documents_error`` (str,
``None`` on success).
Prompts: none (not an LLM stage). Backends: :mod:`synthq_hf.search` (DESIGN §5).

Which hit is kept: the best-ranked one whose text is non-empty and is not a *near-copy of the query*. A document
is a near-copy when more than ``NEAR_COPY`` (80%) of its character 5-shingles (lowercased, punctuation folded to
spaces) also occur in the query. That one rule covers both failure modes seen in search results: a page that *is*
the query (Jaccard near 1 implies this share near 1) and a short page that holds the query almost whole plus a
few words (a title-only page, a tag page). A long document that contains the query as one sentence among many
passes, since most of its shingles are its own. Such pages ground nothing: the generator would only restate the
seed.

Backends arrive as data in ``fn_kwargs`` — ``index="path/to/index"`` or ``web=WebSearchConfig(...)`` — so that
``datasets`` can fingerprint the call; the live index or HTTP session is resolved here, once per process / loop.
The fingerprint sees the index *path*, not its contents: after rebuilding an index in place, map with
``load_from_cache_file=False`` (or build to a new folder).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from datasets import Features, Value

from synthq_hf.search import Hit, SearchBackend, SearchError, WebSearchConfig, get_web_search, load_index
from synthq_hf.stages._common import ColumnError, failure, read_text
from synthq_hf.stages._step import Step

STAGE = "search_documents"
#: Share of a document's character shingles found in the query above which the document is a near-copy.
NEAR_COPY = 0.8
SHINGLE = 5

FEATURES = Features(
    {
        "document": Value("string"),
        "document_id": Value("string"),
        "document_url": Value("string"),
        "search_score": Value("float64"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {"document": None, "document_id": None, "document_url": None, "search_score": None}
_FOLD = re.compile(r"[\W_]+")


def _shingles(text: str) -> set[str]:
    folded = " ".join(_FOLD.sub(" ", text.lower()).split())
    if len(folded) <= SHINGLE:
        return {folded} if folded else set()
    return {folded[i : i + SHINGLE] for i in range(len(folded) - SHINGLE + 1)}


def is_near_copy(query: str, document: str, threshold: float = NEAR_COPY) -> bool:
    """True when more than ``threshold`` of the document's 5-character shingles also occur in the query."""
    doc = _shingles(document)
    if not doc:
        return True
    return len(doc & _shingles(query)) / len(doc) > threshold


def query_text(row: Mapping[str, Any], column: str | None = None) -> str | None:
    """The search query for ``row``: its keywords joined by spaces, or its ``query`` text; ``None`` when empty.

    Raises :class:`ColumnError` when neither column exists or the column holds the wrong type.
    """
    name = column or ("keywords" if "keywords" in row else "query" if "query" in row else None)
    if name is None:
        raise ColumnError(f"{STAGE} needs a 'keywords' or 'query' column; the dataset has columns {sorted(row)}")
    if name != "keywords":
        return read_text(row, name, STAGE)
    if name not in row:
        raise ColumnError(f"{STAGE} needs an input column 'keywords'; the dataset has columns {sorted(row)}")
    keywords = row[name]
    if keywords is None:
        return None
    if not isinstance(keywords, list | tuple) or not all(isinstance(k, str) or k is None for k in keywords):
        raise ColumnError(f"{STAGE}: column 'keywords' must hold lists of strings, got {keywords!r:.80}")
    words = [k.strip() for k in keywords if k and k.strip()]
    return " ".join(words) or None


def _backend(index: str | os.PathLike | None, web: WebSearchConfig | None) -> SearchBackend:
    if (index is None) == (web is None):
        raise ValueError(f"{STAGE}: pass exactly one of index= (a BM25 index folder) or web= (a WebSearchConfig)")
    if web is not None:
        if not isinstance(web, WebSearchConfig):
            raise TypeError(f"{STAGE}: web= must be a WebSearchConfig, got {type(web).__name__}")
        return get_web_search(web)
    return load_index(index)


def pick(query: str, hits: list[Hit]) -> Hit | None:
    """The first hit with text that is not a near-copy of the query.

    Reads ``text`` of the hits it inspects only, in rank order: index hits load stored fields on first access,
    so the rest of the ``k`` are never read from disk.
    """
    for hit in hits:
        if hit.text and hit.text.strip() and not is_near_copy(query, hit.text):
            return hit
    return None


async def search_documents(
    row: dict[str, Any],
    index: str | os.PathLike | None = None,
    web: WebSearchConfig | None = None,
    k: int = 10,
    column: str | None = None,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(search_documents, fn_kwargs={"index": "indexes/fineweb-bm25"})``.

    ``k``: how many hits to consider before giving up on the row (all of them may be empty or near-copies).
    A missing index or a missing API key raises: every row would fail the same way.
    """
    backend = _backend(index, web)
    query = query_text(row, column)
    if query is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing {column or 'keywords/query'}")
    try:
        hits = await backend.search(query, k)
    except SearchError as err:
        return failure(STAGE, EMPTY, f"{STAGE}: {err}")
    if not hits:
        return failure(STAGE, EMPTY, f"{STAGE}: no results for {query[:200]!r}")
    best = pick(query, hits)
    if best is None:
        reasons = sorted({hit.error for hit in hits if hit.error})
        detail = f"; page errors: {'; '.join(reasons)[:300]}" if reasons else ""
        return failure(
            STAGE, EMPTY, f"{STAGE}: all {len(hits)} results for {query[:200]!r} are empty or near-copies{detail}"
        )
    return {
        "document": best.text,
        "document_id": best.document_id,
        "document_url": best.url,
        "search_score": float(best.score),
        f"{STAGE}_error": None,
    }


STEPS = [
    Step(name=STAGE, kind="row", fn=search_documents, features=FEATURES, needs={"index": "search", "web": "search"})
]
