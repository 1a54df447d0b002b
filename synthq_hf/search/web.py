"""Web search backend: a search API for URLs, then each page downloaded and reduced to its main text.

Providers (their documented JSON):
- ``searxng``: ``GET {base_url}/search?q=…&format=json`` → ``{"results": [{"url", "title", "content", "score"…}]}``.
  The instance must allow the json format (``search.formats`` in its settings.yml), else it answers 403.
- ``brave``: ``GET https://api.search.brave.com/res/v1/web/search?q=…&count=N`` with header
  ``X-Subscription-Token`` → ``{"web": {"results": [{"url", "title", "description"…}]}}``.

Pages: aiohttp with a per-request timeout, a byte cap (``Content-Length`` checked first, then the body read in
chunks up to the cap), and a content-type check (HTML, XHTML or plain text only: a PDF or an image is no
document). Main text: trafilatura (boilerplate — nav, footer, cookie banners — removed), run in a worker thread
because it is CPU work that would stall every other request on the loop.

Politeness: aiohttp's connector caps connections per host (``per_host_concurrency``) and overall
(``max_concurrency``); both the search API and the pages go through it.

Cache: search replies and extracted page text are stored in a SQLite file (:mod:`synthq_hf.cache`, default
``~/.cache/synthq/web.sqlite``), keyed by provider, instance host, query and count, or by page URL: never by the
API key. Pages that fail for good (4xx, wrong type, too large) are cached as failures; timeouts, 5xx and
connection errors are not, so a later run retries them.

Secrets: the API key is read from the environment variable named in the config (``BRAVE_API_KEY`` by default)
when the request is made; it never appears in the config, an error, a log line or a cache key.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import orjson

from synthq_hf.cache import default_cache_path, get_cache, request_key
from synthq_hf.search.types import Hit, SearchConfigError, SearchError

BRAVE_URL = "https://api.search.brave.com/res/v1/web/search"
TEXT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")
#: Bump when extraction changes, so cached page text made the old way is not reused.
EXTRACTION_VERSION = 1


class FetchError(Exception):
    """A page could not be turned into text; ``permanent`` failures are cached, the others retried next run."""

    def __init__(self, reason: str, permanent: bool):
        super().__init__(reason)
        self.permanent = permanent


@dataclass(frozen=True)
class WebSearchConfig:
    """What to ask and how politely: plain data, safe in ``fn_kwargs`` (hashable, picklable, no secret).

    ``base_url``: the SearxNG instance (required for searxng); for brave it defaults to the public API.
    ``fetch_pages=False`` keeps the provider's snippet as the text (cheap, but a snippet is not a document).
    """

    provider: Literal["searxng", "brave"] = "searxng"
    base_url: str | None = None
    api_key_env: str | None = None
    fetch_pages: bool = True
    timeout_s: float = 15.0
    max_page_bytes: int = 3_000_000
    max_concurrency: int = 32
    per_host_concurrency: int = 2
    max_retries: int = 2
    cache: bool = True
    cache_path: str | None = None
    user_agent: str = "synthq-hf/0.1 (document search for instruction synthesis)"

    def __post_init__(self) -> None:
        if self.provider not in ("searxng", "brave"):
            raise SearchConfigError(f"web search provider must be 'searxng' or 'brave', not {self.provider!r}")
        if self.provider == "searxng" and not self.base_url:
            raise SearchConfigError("web search: searxng needs base_url (the instance, e.g. http://localhost:8888)")

    @property
    def key_env(self) -> str | None:
        return self.api_key_env or ("BRAVE_API_KEY" if self.provider == "brave" else None)


def _host(url: str) -> str:
    """Host and port only: what errors and cache keys may show of a URL that could carry credentials."""
    return urlsplit(url).hostname or "?"


class WebSearch:
    """Live backend for one event loop; get it with :func:`get_web_search`."""

    def __init__(self, config: WebSearchConfig):
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._cache = get_cache(config.cache_path or default_web_cache()) if config.cache else None
        self._active = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_concurrency, limit_per_host=self.config.per_host_concurrency
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                headers={"User-Agent": self.config.user_agent},
            )
        return self._session

    async def close(self) -> None:
        """Close the connections and commit the cache. Called whenever nothing is in flight (usually: the map is
        done), because ``datasets`` never closes its event loop and a ``num_proc`` worker may be ended early.
        """
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        if self._cache is not None:
            self._cache.flush()

    # -- the interface ----------------------------------------------------------------------------------------
    async def search(self, query: str, k: int = 10) -> list[Hit]:
        """Top ``k`` results with each page's main text (``text=""`` and ``error`` set when a page failed)."""
        self._active += 1
        try:
            return await self._search(query, k)
        finally:
            self._active -= 1
            if self._active == 0:
                await self.close()

    async def _search(self, query: str, k: int) -> list[Hit]:
        results = await self.results(query, k)
        if not self.config.fetch_pages:
            return [Hit(_doc_id(r["url"]), r["snippet"], r["url"], r["score"], r["title"]) for r in results]
        pages = await asyncio.gather(*(self._page(r["url"]) for r in results))
        return [
            Hit(_doc_id(r["url"]), text, r["url"], r["score"], r["title"], error)
            for r, (text, error) in zip(results, pages, strict=True)
        ]

    # -- search API -------------------------------------------------------------------------------------------
    async def results(self, query: str, k: int = 10) -> list[dict[str, Any]]:
        """The provider's top ``k`` results as ``{url, title, snippet, score}`` (cached)."""
        cfg = self.config
        key = request_key("web:search", {"provider": cfg.provider, "host": _host(self._api_url()), "q": query, "k": k})
        if self._cache is not None and (cached := self._cache.get(key)) is not None:
            return orjson.loads(cached)
        if cfg.provider == "brave":
            params = {"q": query, "count": str(min(k, 20))}
            reply = await self._get_json(self._api_url(), params, {"X-Subscription-Token": self._api_key()})
            items = (reply.get("web") or {}).get("results") or []
            snippet_field = "description"
        else:
            headers = {"Authorization": f"Bearer {self._api_key()}"} if cfg.key_env else {}
            reply = await self._get_json(self._api_url(), {"q": query, "format": "json"}, headers)
            items = reply.get("results") or []
            snippet_field = "content"
        results = []
        for rank, item in enumerate(item for item in items if isinstance(item, dict) and item.get("url")):
            if len(results) == k:
                break
            score = item.get("score")
            results.append(
                {
                    "url": str(item["url"]),
                    "title": str(item.get("title") or ""),
                    "snippet": str(item.get(snippet_field) or ""),
                    # SearxNG reports its own score; Brave reports none, so rank stands in (1, 1/2, 1/3…).
                    "score": float(score) if isinstance(score, int | float) else 1.0 / (rank + 1),
                }
            )
        if self._cache is not None:
            self._cache.put(key, orjson.dumps(results))
        return results

    def _api_url(self) -> str:
        if self.config.provider == "brave":
            return self.config.base_url or BRAVE_URL
        return self.config.base_url.rstrip("/") + "/search"

    def _api_key(self) -> str:
        name = self.config.key_env
        value = os.environ.get(name) if name else None
        if not value:
            raise SearchConfigError(f"web search ({self.config.provider}): environment variable {name} is not set")
        return value

    async def _get_json(self, url: str, params: dict[str, str], headers: dict[str, str]) -> dict[str, Any]:
        where = f"{self.config.provider} search at {_host(url)}"
        for attempt in range(self.config.max_retries + 1):
            retry = attempt < self.config.max_retries
            try:
                async with self._http().get(url, params=params, headers={"Accept": "application/json", **headers}) as r:
                    if r.status == 200:
                        body = await r.read()
                        try:
                            reply = orjson.loads(body)
                        except orjson.JSONDecodeError:
                            raise SearchError(f"{where}: reply is not JSON: {body[:120]!r}") from None
                        if not isinstance(reply, dict):
                            raise SearchError(f"{where}: reply is not a JSON object")
                        return reply
                    if r.status in (401, 403) and self.config.provider == "searxng":
                        raise SearchConfigError(
                            f"{where}: HTTP {r.status}; enable the json format (search.formats) on the instance"
                        )
                    if r.status in (401, 403):
                        raise SearchConfigError(f"{where}: HTTP {r.status}; check the key in {self.config.key_env}")
                    if r.status == 429 or r.status >= 500:
                        if retry:
                            await asyncio.sleep(min(2.0**attempt, 10.0))
                            continue
                    raise SearchError(f"{where}: HTTP {r.status}")
            except (TimeoutError, aiohttp.ClientError) as err:
                if retry:
                    await asyncio.sleep(min(2.0**attempt, 10.0))
                    continue
                raise SearchError(f"{where}: {type(err).__name__} {str(err)[:120]}".strip()) from None
        raise SearchError(f"{where}: gave up")  # not reached: the last attempt returns or raises

    # -- pages ------------------------------------------------------------------------------------------------
    async def _page(self, url: str) -> tuple[str, str | None]:
        """(text, None) or ("", reason); consults and fills the cache."""
        key = request_key("web:page", {"url": url, "v": EXTRACTION_VERSION, "cap": self.config.max_page_bytes})
        if self._cache is not None and (cached := self._cache.get(key)) is not None:
            entry = orjson.loads(cached)
            return entry["text"], entry["error"]
        try:
            text, error, permanent = await self.fetch_text(url), None, True
        except FetchError as err:
            text, error, permanent = "", str(err), err.permanent
        if self._cache is not None and permanent:
            self._cache.put(key, orjson.dumps({"text": text, "error": error}))
        return text, error

    async def fetch_text(self, url: str) -> str:
        """Download ``url`` and return its main text; raises :class:`FetchError` with a short reason."""
        cfg = self.config
        where = f"page at {_host(url)}"
        try:
            async with self._http().get(url, headers={"Accept": "text/html,application/xhtml+xml,text/plain"}) as r:
                if r.status != 200:
                    permanent = 400 <= r.status < 500 and r.status not in (408, 429)
                    raise FetchError(f"{where}: HTTP {r.status}", permanent)
                kind = r.content_type  # aiohttp: 'application/octet-stream' when the header is missing
                if kind not in TEXT_TYPES:
                    raise FetchError(f"{where}: content type {kind} is not HTML or text", True)
                if r.content_length is not None and r.content_length > cfg.max_page_bytes:
                    raise FetchError(f"{where}: {r.content_length} bytes, over the {cfg.max_page_bytes} cap", True)
                body = bytearray()
                async for chunk in r.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > cfg.max_page_bytes:
                        raise FetchError(f"{where}: over the {cfg.max_page_bytes} byte cap", True)
                charset = r.charset
        except TimeoutError:
            raise FetchError(f"{where}: no complete reply within {cfg.timeout_s} s", False) from None
        except aiohttp.ClientError as err:
            raise FetchError(f"{where}: {type(err).__name__}", False) from None
        if kind == "text/plain":
            text = bytes(body).decode(charset or "utf-8", errors="replace").strip()
        else:
            text = (await asyncio.to_thread(_extract, bytes(body), url)) or ""
        if not text:
            raise FetchError(f"{where}: no main text found", True)
        return text


def _extract(html: bytes, url: str) -> str | None:
    import trafilatura

    return trafilatura.extract(html, url=url, include_comments=False, include_tables=True, favor_precision=True)


def _doc_id(url: str) -> str:
    return "web:" + hashlib.blake2b(url.encode(), digest_size=8).hexdigest()


_CLIENTS: dict[int, tuple[asyncio.AbstractEventLoop, dict[WebSearchConfig, WebSearch]]] = {}


def get_web_search(config: WebSearchConfig) -> WebSearch:
    """The live backend for ``config`` on the running loop (``datasets.map`` makes a new loop per call)."""
    loop = asyncio.get_running_loop()
    entry = _CLIENTS.get(id(loop))
    if entry is None or entry[0] is not loop:
        for loop_id, (old_loop, _) in list(_CLIENTS.items()):
            if old_loop.is_closed() or not old_loop.is_running():
                del _CLIENTS[loop_id]
        entry = _CLIENTS[id(loop)] = (loop, {})
    client = entry[1].get(config)
    if client is None:
        client = entry[1][config] = WebSearch(config)
    return client


def default_web_cache() -> Path:
    """``web.sqlite`` next to the request cache (``$SYNTHQ_CACHE_DIR`` or ``~/.cache/synthq``)."""
    return default_cache_path().with_name("web.sqlite")
