"""Token counting and truncation by tokens, for stages that must fit documents and demonstrations into a budget.

Where counts come from, in order:

1. a local ``tokenizer.json`` (``tokenizer=`` path, read with the ``tokenizers`` library): exact, offline, and
   truncation cuts at the token's character offset;
2. the endpoint's own tokenize route (TGI/vLLM/llama.cpp ``/tokenize``, llama-cpp-python ``/extras/tokenize``),
   through the request cache: exact for the model that will read the prompt. A route returns ids without
   offsets, so truncation cuts by the measured characters-per-token ratio and re-counts until the piece fits
   (one to three extra requests, each cached);
3. neither (a plain OpenAI-compatible server): an estimate of :data:`CHARS_PER_TOKEN` characters per token, said
   once in the log. Budgets then hold only approximately; pass ``tokenizer=`` for exact ones.

Counts are memoised per process by (source, text hash): demonstrations recur across thousands of rows.
"""

from __future__ import annotations

import hashlib
import logging
from functools import cache
from typing import Any

from synthq_hf.endpoint import EndpointConfig, get_client

log = logging.getLogger(__name__)

#: Characters per token assumed when nothing can count (English prose with BPE vocabularies runs ~4).
CHARS_PER_TOKEN = 4
#: No tokenizer here spends more characters than this on one token in ordinary text; a text is cut to
#: ``limit * MAX_CHARS_PER_TOKEN`` characters before it is sent to be counted, so a 1 MB document costs a small
#: request, not a megabyte upload.
MAX_CHARS_PER_TOKEN = 24
_COUNTS: dict[tuple[str, bytes], int] = {}
_warned: set[str] = set()


@cache
def _local_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("a local tokenizer file needs the 'tokenizers' package: pip install tokenizers") from err
    return Tokenizer.from_file(path)


async def _source(endpoint: EndpointConfig | None, tokenizer: str | None) -> str:
    """Which counter applies: ``file:<path>``, ``endpoint:<model>`` or ``estimate``."""
    if tokenizer:
        return f"file:{tokenizer}"
    if endpoint is not None:
        info = await get_client(endpoint).info()
        if info.tokenize_route is not None:
            return f"endpoint:{info.base_url}:{info.model}"
        if info.base_url not in _warned:
            _warned.add(info.base_url)
            log.warning(
                "%s has no tokenize route: token budgets use an estimate of %d characters per token; "
                "pass tokenizer=<tokenizer.json> for exact counts",
                info.base_url,
                CHARS_PER_TOKEN,
            )
    return "estimate"


async def count_tokens(text: str, endpoint: EndpointConfig | None = None, tokenizer: str | None = None) -> int:
    """Tokens in ``text`` as the endpoint's model (or the given tokenizer file) sees it, without special tokens."""
    source = await _source(endpoint, tokenizer)
    return await _count(text, source, endpoint, tokenizer)


async def _count(text: str, source: str, endpoint: EndpointConfig | None, tokenizer: str | None) -> int:
    key = (source, hashlib.blake2b(text.encode(), digest_size=16).digest())
    found = _COUNTS.get(key)
    if found is not None:
        return found
    if source == "estimate":
        count = -(-len(text) // CHARS_PER_TOKEN)
    elif source.startswith("file:"):
        count = len(_local_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids)
    else:
        count = len(await get_client(endpoint).tokenize(text))
    _COUNTS[key] = count
    return count


async def truncate_tokens(
    text: str, limit: int, endpoint: EndpointConfig | None = None, tokenizer: str | None = None
) -> tuple[str, int, bool]:
    """``text`` cut to at most ``limit`` tokens: (text, its token count, whether it was cut).

    The cut falls on a token boundary with a local tokenizer; with an endpoint it falls within a few tokens of
    ``limit`` (never above).
    """
    source = await _source(endpoint, tokenizer)
    if source.startswith("file:"):
        encoding = _local_tokenizer(tokenizer).encode(text, add_special_tokens=False)
        if len(encoding.ids) <= limit:
            return text, len(encoding.ids), False
        end = encoding.offsets[limit - 1][1] if limit > 0 else 0
        return text[:end], limit, True
    if source == "estimate":
        if len(text) <= limit * CHARS_PER_TOKEN:
            return text, await _count(text, source, endpoint, tokenizer), False
        piece = text[: limit * CHARS_PER_TOKEN]
        return piece, await _count(piece, source, endpoint, tokenizer), True
    cut = text[: limit * MAX_CHARS_PER_TOKEN]
    count = await _count(cut, source, endpoint, tokenizer)
    if count <= limit and len(cut) == len(text):
        return text, count, False
    # Interpolate between a length that fits and one that does not, by the counts measured at each, until the
    # piece is within 2% of the limit (usually two or three counts, each a cached request).
    fit, fit_count = 0, 0
    over, over_count = len(cut), count
    if count <= limit:
        fit, fit_count = len(cut), count
    for _ in range(8):
        if fit_count >= limit * 0.98 or over - fit <= 1 or over_count <= limit:
            break
        guess = fit + int((over - fit) * (limit - fit_count) / (over_count - fit_count))
        guess = min(max(guess, fit + 1), over - 1)
        guess_count = await _count(text[:guess], source, endpoint, tokenizer)
        if guess_count <= limit:
            fit, fit_count = guess, guess_count
        else:
            over, over_count = guess, guess_count
    return text[:fit], fit_count, True
