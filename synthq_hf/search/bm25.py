"""Local BM25 index over any Hugging Face dataset's text column, on tantivy.

Why tantivy and not bm25s (DESIGN §5 asked for the measurement; ``scripts/bench/search.py``, 2 shared cores):
100k generated docs: tantivy 12 s build / 88 MB on disk / ~1,600 queries/s with text fetched; bm25s 29-46 s /
~0.8 GB more RSS / 200-530 queries/s returning ids only. tantivy also streams (no corpus in RAM), stores text, id
and url beside the postings and opens memory-mapped. 1M docs: 269 s build, 849 MB, 1.7-1.9 ms CPU per query
(about 1,000 queries/s on 2 idle cores). Scoring is exhaustive: tantivy-py always wraps ``TopDocs`` in a
``MultiCollector``, which turns off tantivy's block-max WAND; an upstream fix would make large indexes faster.
Hits read their stored fields lazily (:class:`IndexHit`): the stage mostly reads one of the ``k``, -15% CPU per
query. Dropping frequent query terms was measured and rejected: top-1 agreement falls to 89-93%.

Folder layout: tantivy's own files plus ``synthq_index.json`` (what was indexed, how many documents, the
tokenizer). A build writes into ``<out>.partial`` and renames it at the end, so a killed build never leaves a
folder that loads as an index.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import tantivy

from synthq_hf.search.types import Hit, IndexMissing
from synthq_hf.stages._common import ColumnError

META_FILE = "synthq_index.json"
FORMAT = 1
#: English stemming and lowercasing: "running cats" finds "run" and "cat". Web corpora (FineWeb) are mostly
#: English; pass ``tokenizer="default"`` (lowercase only) for other languages.
DEFAULT_TOKENIZER = "en_stem"
#: Everything that is not a word character or space: tantivy's query syntax (``+ - : " ( ) ^ ~ *`` …) lives here,
#: and keywords such as ``C++`` or ``"x: y"`` must be searched as words, never parsed as operators.
_NOT_WORD = re.compile(r"[^\w\s]+|_")  # "_" too: tantivy splits key_error into a phrase, which needs positions
#: Dropped from English queries (kept when nothing else is left): their BM25 weight is near zero, but their
#: posting lists hold nearly every document, so "history of the roman empire" costs several times "history roman
#: empire" for the same ranking.
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i if in into is it its of on or our she so that the "
    "their them then there these they this to was we were what when which who will with you your".split()
)


def build_hint(path: str | os.PathLike) -> str:
    return f"synthq index build --dataset NAME_OR_FILES --text-column text --out {path}"


def _open_source(
    source: Any, split: str, streaming: bool, config: str | None
) -> tuple[Iterable[dict[str, Any]], int | None, str]:
    """(rows, row count if known, a description) for a Hub name, local files, or a (Iterable)Dataset."""
    import datasets

    from synthq_hf.inputs import open_dataset

    if isinstance(source, datasets.Dataset | datasets.IterableDataset):
        total = source.num_rows if isinstance(source, datasets.Dataset) else None
        return source, total, f"<{type(source).__name__}>"
    files = [str(source)] if isinstance(source, str | os.PathLike) else [str(f) for f in source]
    try:
        ds = open_dataset(files, config=config, split=split, streaming=streaming)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"index build: {err}") from None
    description = ", ".join(files) + (f" ({config})" if config else "")
    total = ds.num_rows if isinstance(ds, datasets.Dataset) else None
    if total is None and getattr(ds, "info", None) and ds.info.splits and split in ds.info.splits:
        total = ds.info.splits[split].num_examples or None
    return ds, total, description


def _schema(tokenizer: str) -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    # 'freq' (no positions): BM25 needs term frequencies only; we never run phrase queries. Smaller, faster build.
    builder.add_text_field("text", stored=True, tokenizer_name=tokenizer, index_option="freq")
    builder.add_text_field("document_id", stored=True, tokenizer_name="raw", index_option="basic")
    builder.add_text_field("url", stored=True, tokenizer_name="raw", index_option="basic")
    return builder.build()


def _column(row: dict[str, Any], name: str, kind: str) -> Any:
    if name not in row:
        raise ColumnError(f"index build: no {kind} column {name!r}; the dataset has columns {sorted(row)}")
    return row[name]


def _add_rows(
    writer: tantivy.IndexWriter,
    rows: Iterable[dict[str, Any]],
    text_column: str,
    id_column: str | None,
    url_column: str | None,
) -> tuple[int, int]:
    """Add every row with text; returns (documents added, rows skipped for empty text)."""
    documents = skipped = 0
    for number, row in enumerate(rows):
        text = _column(row, text_column, "text")
        if text is not None and not isinstance(text, str):
            raise ColumnError(f"index build: column {text_column!r} must hold strings, got {type(text).__name__}")
        if not text or not text.strip():
            skipped += 1
            continue
        doc_id = _column(row, id_column, "id") if id_column else None
        fields = {"text": text, "document_id": str(number if doc_id is None else doc_id)}
        url = _column(row, url_column, "url") if url_column else None
        if url:
            fields["url"] = str(url)
        writer.add_document(tantivy.Document(**fields))
        documents += 1
    return documents, skipped


def build_index(
    dataset_name_or_files: Any,
    text_column: str = "text",
    out: str | os.PathLike = "index",
    id_column: str | None = None,
    url_column: str | None = None,
    split: str = "train",
    streaming: bool = True,
    limit: int | None = None,
    config: str | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    overwrite: bool = False,
    heap_mb: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Index ``text_column`` of a dataset into the folder ``out``; returns the index's metadata.

    ``dataset_name_or_files``: a Hub dataset name (``config`` picks its subset), local json/jsonl/parquet/csv
    file(s), or a ``Dataset``/``IterableDataset``. Streaming is the default so a corpus larger than memory or disk
    cache indexes as it downloads. Rows whose text is empty are skipped (counted). ``document_id`` is
    ``id_column``'s value, else the row's position in the source.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    rows, total, description = _open_source(dataset_name_or_files, split, streaming, config)
    if limit is not None:
        rows = itertools.islice(rows, limit)
        total = min(total, limit) if total else limit
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    index = tantivy.Index(_schema(tokenizer), path=str(partial))
    writer = index.writer(heap_mb * 1_000_000, 0)
    started = time.monotonic()
    bar = tqdm(rows, total=total, desc=f"indexing {out.name}", unit="doc", disable=not progress)
    try:
        documents, skipped = _add_rows(writer, bar, text_column, id_column, url_column)
        writer.commit()
        writer.wait_merging_threads()
    except BaseException:
        del writer, index
        shutil.rmtree(partial, ignore_errors=True)
        raise
    meta = {
        "format": FORMAT,
        "backend": "tantivy",
        "source": description,
        "split": split,
        "text_column": text_column,
        "id_column": id_column,
        "url_column": url_column,
        "tokenizer": tokenizer,
        "documents": documents,
        "skipped_empty": skipped,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    _INDEXES.pop((os.getpid(), str(out.resolve())), None)
    return meta


class IndexHit:
    """A :class:`Hit` whose stored fields (text, id, url) are read from the index on first access.

    Why: the stage reads the text of the hits it inspects, usually only the first, and reading a document
    decompresses its store block (~0.02 ms); fetching all ``k`` eagerly was ~0.2 ms of a ~1.5 ms query.
    """

    __slots__ = ("_address", "_doc", "_searcher", "score")
    title = None
    error = None

    def __init__(self, searcher: tantivy.Searcher, address: tantivy.DocAddress, score: float):
        self.score = score
        self._searcher = searcher
        self._address = address
        self._doc: tantivy.Document | None = None

    def _field(self, name: str) -> Any:
        if self._doc is None:
            self._doc = self._searcher.doc(self._address)
        return self._doc.get_first(name)

    @property
    def document_id(self) -> str:
        return self._field("document_id")

    @property
    def text(self) -> str:
        return self._field("text")

    @property
    def url(self) -> str | None:
        return self._field("url")

    def to_hit(self) -> Hit:
        return Hit(self.document_id, self.text, self.url, self.score)

    def __repr__(self) -> str:
        return f"IndexHit(score={self.score:.3f}, segment={self._address.segment_ord}, doc={self._address.doc})"


class Bm25Index:
    """A built index, opened read-only. Use :func:`load_index` (one per process and path)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise IndexMissing(f"no search index at {self.path}; build one with: {build_hint(self.path)}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise IndexMissing(f"{self.path} holds an index of another format; rebuild it: {build_hint(self.path)}")
        self._index = tantivy.Index.open(str(self.path))
        self._searcher = self._index.searcher()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self._searcher.num_docs

    def search_sync(self, query: str, k: int = 10) -> list[IndexHit]:
        """Top ``k`` documents for free text ``query`` (any words match; BM25 ranks); stored fields load lazily."""
        words = _NOT_WORD.sub(" ", query).lower().split()
        if self.meta.get("tokenizer") == "en_stem":
            words = [w for w in words if w not in STOPWORDS] or words
        if not words or k <= 0:
            return []
        parsed = self._index.parse_query(" ".join(words), ["text"])
        found = self._searcher.search(parsed, k, count=False).hits
        fetch = k
        # Documents that tie with the k-th may lie past the cut, and which of them tantivy returns depends on how
        # the build laid out its segments (threads, merges): fetch until the cut falls between two scores.
        while len(found) == fetch and found[-1][0] == found[k - 1][0]:
            fetch *= 4
            found = self._searcher.search(parsed, fetch, count=False).hits
        hits = [IndexHit(self._searcher, address, score) for score, address in found]
        return rank(hits)[:k]

    async def search(self, query: str, k: int = 10) -> list[IndexHit]:
        """The backend interface (:class:`synthq_hf.search.SearchBackend`), in a worker thread: tantivy lets go
        of the GIL while it scores, so the rows an async ``map`` keeps in flight search on all cores at once.
        """
        return await asyncio.to_thread(self.search_sync, query, k)

    def search_many(self, queries: Sequence[str], k: int = 10, threads: int | None = None) -> list[list[IndexHit]]:
        """Many queries on all cores (tantivy releases the GIL while it searches)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(threads or os.cpu_count() or 1, thread_name_prefix="synthq-bm25")
        return list(self._pool.map(lambda q: self.search_sync(q, k), queries, chunksize=64))


def rank(hits: list[IndexHit]) -> list[IndexHit]:
    """Best score first; equal scores by ``document_id``, so every build of one corpus ranks alike.

    Only tied hits have their stored id read (hits load their fields lazily, and ties are rare in prose).
    """
    seen = Counter(hit.score for hit in hits)
    return sorted(hits, key=lambda h: (-h.score, h.document_id if seen[h.score] > 1 else ""))


_INDEXES: dict[tuple[int, str], Bm25Index] = {}
_LOCK = threading.Lock()


def load_index(path: str | os.PathLike) -> Bm25Index:
    """The process-wide open index at ``path``: opened on first use, then reused by every row and map call."""
    resolved = str(Path(path).expanduser().resolve())
    key = (os.getpid(), resolved)
    index = _INDEXES.get(key)
    if index is None:
        with _LOCK:
            index = _INDEXES.get(key)
            if index is None:
                index = _INDEXES[key] = Bm25Index(resolved)
    return index
