"""Document search for grounding (DESIGN §5): a local BM25 index (tantivy) or a web search API + page text.

Both backends answer ``await backend.search(query, k) -> list[Hit]``. Stages receive *data* in ``fn_kwargs``
(an index path, a frozen :class:`WebSearchConfig`) and resolve the live object here: :func:`load_index` once per
process and path, :func:`get_web_search` once per event loop and config.
"""

from synthq_hf.search.types import Hit, IndexMissing, SearchBackend, SearchConfigError, SearchError  # isort: skip
from synthq_hf.search.bm25 import Bm25Index, build_index, load_index
from synthq_hf.search.cli import add_index_commands
from synthq_hf.search.web import FetchError, WebSearch, WebSearchConfig, get_web_search

__all__ = [
    "Bm25Index",
    "FetchError",
    "Hit",
    "IndexMissing",
    "SearchBackend",
    "SearchConfigError",
    "SearchError",
    "WebSearch",
    "WebSearchConfig",
    "add_index_commands",
    "build_index",
    "get_web_search",
    "load_index",
]
