"""The async LLM client every stage talks through: dialects, concurrency, backpressure, retries, cache, usage.

Stages receive an :class:`EndpointConfig` (plain, hashable data, so ``datasets`` can fingerprint ``fn_kwargs``) and
call :func:`get_client` inside the running event loop. ``datasets.map`` makes a new loop per call, and connections
belong to the loop that opened them, so there is one live client per (loop, config).

Why not huggingface_hub / aiohttp / tenacity on the hot path: measured here against a zero-latency stub,
``AsyncInferenceClient`` does ~800 req/s, aiohttp ~7,000 (~140 µs of CPU a request) and :mod:`synthq_hf.http`
(an asyncio protocol over the llhttp parser) ~40,000 (~25 µs); a tenacity ``AsyncRetrying`` block costs ~40 µs
per call. The retry loop below is a plain ``for`` with full-jitter exponential backoff; huggingface_hub is still
used for the token (``get_token()``). The speed target and its figures: ``scripts/bench/client_ceiling.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import os
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

import orjson

from synthq_hf.cache import RequestCache, body_key, get_cache, request_key
from synthq_hf.http import Pool

Dialect = Literal["auto", "tgi", "vllm", "llamacpp", "openai"]
DEFAULT_CONCURRENCY = 64
#: llama-cpp-python serves one request at a time: one in service and one queued keeps it busy.
LLAMACPP_PYTHON_CONCURRENCY = 2
_HF_HOST_SUFFIXES = ("huggingface.co", "hf.space", "huggingface.cloud")


class EndpointError(Exception):
    """A problem with the endpoint itself (unreachable, unknown protocol, auth); stops the run with one line."""


class RequestFailed(Exception):
    """One request failed for good (retries spent, or a 4xx that will not change); becomes ``<stage>_error``."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to reach an LLM server. Plain data: safe in ``fn_kwargs`` and in recipes.

    ``url`` is a server root (``http://tgi:8080``), an OpenAI-style base (``.../v1``), or ``"local"`` for the
    embedded llama.cpp server with the bundled SmolLM2 model. ``params`` are default generation parameters
    (e.g. ``{"temperature": 0.7}``) sent with every request unless a stage overrides them. ``seed`` is the run
    seed from which every request's own seed is derived. Secrets never live here: ``api_key_env`` names the
    environment variable that holds the key (HF endpoints fall back to ``huggingface_hub.get_token()``).
    """

    url: str
    model: str | None = None
    dialect: Dialect = "auto"
    max_concurrency: int | None = None
    timeout_s: float = 300.0
    max_retries: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    api_key_env: str | None = None
    params: Any = ()
    seed: int = 0
    cache: bool = True
    cache_path: str | None = None
    #: Server URLs of the same model for the ``ray`` engine, spread over its actors (``url`` is what the
    #: ``datasets`` engine and the card use). Not part of the request cache key: replicas share answers.
    replicas: tuple[str, ...] = ()
    #: Requests, cache hits, tokens and latency by stage, counted by every client made from this config: the
    #: run that made the config reads them (``run.json``, the card, progress). Not part of its identity.
    usage: dict[str, Usage] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dialect not in ("auto", "tgi", "vllm", "llamacpp", "openai"):
            raise ValueError(f"unknown dialect {self.dialect!r}: use auto, tgi, vllm, llamacpp or openai")
        params = self.params
        if isinstance(params, dict):
            params = tuple(sorted(params.items()))
        object.__setattr__(self, "params", tuple(tuple(p) for p in params))
        replicas = (self.replicas,) if isinstance(self.replicas, str) else self.replicas
        object.__setattr__(self, "replicas", tuple(replicas))

    def __hash__(self) -> int:
        params = orjson.dumps(dict(self.params), option=orjson.OPT_SORT_KEYS)
        return hash(
            (
                self.url,
                self.model,
                self.dialect,
                self.max_concurrency,
                self.api_key_env,
                params,
                self.seed,
                self.cache,
                self.cache_path,
            )
        )

    @property
    def generation_params(self) -> dict[str, Any]:
        return dict(self.params)

    def replace(self, **changes: Any) -> EndpointConfig:
        """A changed copy that counts into the same :attr:`usage` (it is the same run's endpoint)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["params"] = dict(self.params)
        fields.update(changes)
        return EndpointConfig(**fields)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for recipes and reports: the fields that say what the endpoint is, not what it counted."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "usage"}
        data["params"] = dict(self.params)
        data["replicas"] = list(self.replicas)
        if not self.replicas:  # an endpoint without replicas reads as it did before they existed (resume markers)
            del data["replicas"]
        return data


@dataclass
class ServerInfo:
    """What probing the server found out; held by the client that probed."""

    base_url: str
    dialect: str
    model: str
    max_concurrency: int
    tokenize_route: str | None
    max_input_tokens: int | None = None


@dataclass
class Usage:
    """Per-stage counters that feed progress, ``run.json`` and the dataset card."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    retries: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


_HEAP_LOCK = threading.Lock()
_heap_holders = 0
_heap_frozen = False


def hold_heap() -> None:
    """While requests are in flight, keep the garbage collector off the objects that existed before them.

    Why: a fast server answers thousands of requests a second, and every answer allocates; that triggers
    full collections, and each one walks every object in the process — with ``datasets``, pyarrow and
    pydantic imported that is ~120k objects, ~100 ms a walk. Measured with ``scripts/bench/client_ceiling.py``:
    5-7 such walks per 10,000 rows, ~85 µs a row, more than all of synthq's own work per request.
    ``gc.freeze()`` moves the existing objects out of the collector's generations (O(1)); objects made during
    the run are collected as usual. When the last client goes idle, ``gc.unfreeze()`` hands the old objects
    back, so cyclic garbage among them is collected then: nothing leaks, and at most the heap that existed
    before the first request waits. A process that froze its heap itself (``gc.get_freeze_count()`` > 0) or
    turned the collector off is left as it is.
    """
    global _heap_holders, _heap_frozen
    with _HEAP_LOCK:
        if _heap_holders == 0 and gc.isenabled() and gc.get_freeze_count() == 0:
            gc.freeze()
            _heap_frozen = True
        _heap_holders += 1


def release_heap() -> None:
    """The counterpart of :func:`hold_heap`: the last holder unfreezes what it froze."""
    global _heap_holders, _heap_frozen
    with _HEAP_LOCK:
        _heap_holders -= 1
        if _heap_holders == 0 and _heap_frozen:
            gc.unfreeze()
            _heap_frozen = False


def usage_for(config: EndpointConfig, stage: str) -> Usage:
    """The counters of ``stage`` on ``config``: clients come and go with event loops, the config's counts stay."""
    usage = config.usage.get(stage)
    if usage is None:
        usage = config.usage[stage] = Usage()
    return usage


def derive_seed(run_seed: int, stage: str, row_id: str, sample: int = 0, attempt: int = 0) -> int:
    """A request seed from (run seed, stage, row id, sample, attempt): stable across runs and processes."""
    digest = hashlib.blake2b(f"{run_seed}\0{stage}\0{row_id}\0{sample}\0{attempt}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % (2**31 - 1)


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class AdaptiveLimiter:
    """Caps requests in flight; cuts the cap on 429/503, trims it when latency climbs, grows it back.

    Servers like TGI refuse (429) when overloaded, but vLLM and llama.cpp saturate by queueing, so latency is the
    only signal there. Latency is normalised per completion token and compared with the best seen recently;
    anything under ``latency_floor_s`` is never called congestion (that is client-side noise, not a server queue).

    Refusals converge instead of oscillating (measured: a cut at most every 0.5 s let the cap climb back between
    cuts, and 70 % of requests to a server refusing above 8 in flight were refused):

    - *One cut per window.* Every cut starts a new epoch; a refusal of a request sent before the last cut says
      nothing new (it was sent under the old cap) and is ignored, however many of them come back.
    - *A gentle cut, a remembered ceiling.* A refusal sets ``ceiling`` to the cap that was refused and cuts to
      ``OVERLOAD_CUT`` of it (not half: a sawtooth between W/2 and W serves 75 % of what the server can). Below
      ``ceiling - 1`` the cap grows back quickly (one slot per window of answers); near the ceiling it probes
      ``PROBE_SLOWDOWN`` times slower, so a refusal comes only every few windows; above it (the server grew), quickly
      again.
    - *Retry-After holds everyone.* A rate-limited API that says when to come back gets no request before then.
    """

    OVERLOAD_CUT = 0.75
    PROBE_SLOWDOWN = 12

    def __init__(self, cap: int, *, latency_tolerance: float = 3.0, latency_floor_s: float = 0.25):
        self.cap = max(1, cap)
        self.limit = float(self.cap)
        self.inflight = 0
        self.epoch = 0  # cuts so far; a request remembers the epoch it was sent in
        self.ceiling: float | None = None  # the cap last refused by the server
        self.latency_tolerance = latency_tolerance
        self.latency_floor_s = latency_floor_s
        self._waiters: deque[asyncio.Future] = deque()
        self._last_cut = 0.0
        self._hold_until = 0.0
        self._hold_timer: asyncio.TimerHandle | None = None
        self._baseline: float | None = None
        self._recent: float | None = None
        self.min_limit_by_latency = max(1, self.cap // 16)

    async def acquire(self) -> int:
        """Wait for a slot; returns the epoch the request goes out in (pass it to :meth:`on_overload`)."""
        if self.inflight < int(self.limit) and not self._waiters and not self._hold_until:
            self.inflight += 1
            return self.epoch
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        return self.epoch

    def release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        if self._hold_until:
            wait = self._hold_until - time.monotonic()
            if wait > 0:
                if self._hold_timer is None and self._waiters:
                    self._hold_timer = asyncio.get_running_loop().call_later(wait, self._end_hold)
                return
            self._hold_until = 0.0
        while self._waiters and self.inflight < int(self.limit):
            fut = self._waiters.popleft()
            if not fut.done():
                self.inflight += 1
                fut.set_result(None)

    def _end_hold(self) -> None:
        self._hold_timer = None
        self._wake()

    def on_overload(self, sent_epoch: int | None = None, retry_after: float | None = None) -> None:
        """A 429/503 for a request sent in ``sent_epoch`` (``None``: count it whenever it was sent)."""
        if retry_after:
            self._hold_until = max(self._hold_until, time.monotonic() + retry_after)
        if sent_epoch is not None and sent_epoch < self.epoch:
            return  # sent under a cap that has been cut since: this refusal is already accounted for
        self.epoch += 1
        self._last_cut = time.monotonic()
        self.ceiling = self.limit
        self.limit = max(1.0, float(int(self.limit * self.OVERLOAD_CUT)))

    def on_success(self, latency_s: float, completion_tokens: int) -> None:
        per_token = latency_s / (completion_tokens + 1)
        recent = self._recent = per_token if self._recent is None else 0.9 * self._recent + 0.1 * per_token
        baseline = self._baseline
        if baseline is None or per_token < baseline:
            baseline = per_token
        self._baseline = baseline = baseline * 1.001  # forget an old best slowly
        congested = (
            latency_s > self.latency_floor_s
            and recent > self.latency_tolerance * baseline
            and self.limit > self.min_limit_by_latency
        )
        if congested:
            now = time.monotonic()
            if now - self._last_cut > latency_s:
                self._last_cut = now
                self.limit = max(float(self.min_limit_by_latency), self.limit * 0.9)
        elif self.limit < self.cap:
            step = 1.0 / self.limit  # one slot per window of answers
            ceiling = self.ceiling
            if ceiling is not None and ceiling - 1.0 <= self.limit < ceiling + 1.0:
                step /= self.PROBE_SLOWDOWN  # near the cap the server refused: probe, do not charge
            self.limit = min(float(self.cap), self.limit + step)
            self._wake()


def _base_url(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base


def _resolve_api_key(config: EndpointConfig) -> str | None:
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise EndpointError(f"environment variable {config.api_key_env} (api_key_env) is not set")
        return key
    host = urlparse(config.url).hostname or ""
    if host.endswith(_HF_HOST_SUFFIXES):
        from huggingface_hub import get_token

        return get_token()
    return None


async def _probe(pool: Pool, route: str) -> tuple[int | str, Any]:
    """GET a route; returns (status, json-or-None), or ("unreachable", reason) when nothing answered."""
    try:
        resp = await pool.request("GET", route, timeout_s=10)
    except (TimeoutError, OSError) as err:
        return "unreachable", _describe(err)
    if resp.status != 200:
        return resp.status, None
    try:
        return 200, orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return 200, None


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


async def _first_model(pool: Pool) -> str | None:
    status, body = await _probe(pool, "/v1/models")
    if status == 200 and isinstance(body, dict) and body.get("data"):
        return str(body["data"][0].get("id"))
    return None


async def detect_server(pool: Pool, config: EndpointConfig, base: str) -> ServerInfo:
    """Find out which server speaks at ``base`` (once per client): TGI, vLLM, llama.cpp or generic OpenAI."""
    tried: list[str] = []
    unreachable: list[str] = []
    refused: list[int] = []
    want = config.dialect

    async def probe(route: str) -> Any:
        status, body = await _probe(pool, route)
        tried.append(f"GET {route} → {status}")
        if status == "unreachable":
            unreachable.append(body)
            return None
        if status in (401, 403):
            refused.append(status)
        return body if status == 200 else None

    dialect, model, cap, tokenize_route, max_input = None, None, None, None, None
    if want in ("auto", "tgi"):
        info = await probe("/info")
        if isinstance(info, dict) and "model_id" in info:
            dialect, model = "tgi", info.get("model_id")
            cap, tokenize_route = info.get("max_concurrent_requests"), "/tokenize"
            max_input = info.get("max_input_tokens") or info.get("max_input_length")
    if dialect is None and want in ("auto", "vllm"):
        if isinstance(await probe("/version"), dict):
            dialect, tokenize_route = "vllm", "/tokenize"
    if dialect is None and want in ("auto", "llamacpp"):
        spec = await probe("/openapi.json")
        if isinstance(spec, dict) and "llama.cpp Python" in str(spec.get("info", {}).get("title", "")):
            dialect, tokenize_route, cap = "llamacpp", "/extras/tokenize", LLAMACPP_PYTHON_CONCURRENCY
        else:
            props = await probe("/props")
            if isinstance(props, dict):
                dialect, tokenize_route, cap = "llamacpp", "/tokenize", props.get("total_slots")
    if dialect is None and want in ("auto", "openai"):
        models = await probe("/v1/models")
        if isinstance(models, dict) and models.get("data"):
            dialect, model = "openai", str(models["data"][0].get("id"))
    if dialect is None:
        if unreachable and len(unreachable) == len(tried):
            from synthq_hf.local_server import exit_note  # the embedded server may have died: say so

            note = exit_note(base)
            if note:
                raise EndpointError(f"cannot reach {base}: {note}")
            raise EndpointError(f"cannot reach {base} ({unreachable[-1]}); tried {', '.join(tried)}")
        if refused and len(refused) == len(tried):
            raise EndpointError(
                f"{base} refused the credentials (HTTP {refused[-1]}); set HF_TOKEN / log in with "
                "`hf auth login`, or name the key's environment variable in api_key_env"
            )
    if dialect is None and want != "auto":
        dialect = want  # the user said what it is; trust them and only look for a model name
    if dialect is None:
        raise EndpointError(
            f"{base} speaks none of the known LLM server routes ({'; '.join(tried)}): "
            "expected TGI, vLLM, llama.cpp or an OpenAI-compatible server"
        )
    if model is None and dialect != "tgi":
        model = await _first_model(pool)
    return ServerInfo(
        base_url=base,
        dialect=dialect,
        model=config.model or model or "default",
        max_concurrency=config.max_concurrency or int(cap or DEFAULT_CONCURRENCY),
        tokenize_route=tokenize_route,
        max_input_tokens=max_input,
    )


class EndpointClient:
    """The live client for one (event loop, config). Get it with :func:`get_client`, never build it in a stage."""

    def __init__(self, config: EndpointConfig):
        self.config = config
        self._api_key = _resolve_api_key(config)
        self._headers: dict[str, str] = {}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        self._base: str | None = None
        self._pool: Pool | None = None
        self._info: ServerInfo | None = None
        self._detecting: tuple[asyncio.Future[ServerInfo], asyncio.Event] | None = None
        self.limiter: AdaptiveLimiter | None = None
        self.cache: RequestCache | None = get_cache(config.cache_path) if config.cache else None
        self._params = config.generation_params
        self._active = 0
        #: cache key → the answer of that request while it is in flight: identical requests made meanwhile wait
        #: for it instead of going out again (rows counting one demonstration's tokens all start at once).
        self._flying: dict[bytes, asyncio.Future[bytes]] = {}

    # -- plumbing -------------------------------------------------------------------------------------------
    def _pool_now(self) -> Pool:
        if self._pool is None or self._pool.closed:
            self._pool = Pool(self._base, self._headers, self.config.timeout_s)
        return self._pool

    def _enter(self) -> None:
        if self._active == 0:
            hold_heap()
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            release_heap()
            self._idle()

    def _idle(self) -> None:
        """Nothing in flight (usually: the map is done). ``datasets`` never closes its loop, so close the
        connections here; and commit the cache now, since a ``num_proc`` worker may be terminated before the
        writer's next tick.
        """
        if self._active == 0 and self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
        if self.cache is not None:
            self.cache.flush()

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def info(self) -> ServerInfo:
        """What the server is (detected once per client). Callers that arrive during detection all wait for that
        one detection and all go on when it ends. (A lock let them through one per event-loop turn: a batched map
        starts thousands of rows before detection ends, and that trickle became the run's concurrency, measured
        at 3 requests in flight of 64.) A failed detection fails every waiter; the next call tries again.
        """
        if self._info is None:
            detecting = self._detecting
            if detecting is None:
                detecting = self._detecting = (asyncio.ensure_future(self._detect_once()), asyncio.Event())
                detecting[0].add_done_callback(lambda task, done=detecting[1]: (_retrieve(task), done.set()))
            # An Event, not a shield per waiter: thousands of rows wait here at the start of a batched map, and a
            # shield cost ~5 µs a row. Cancelling a waiter cancels only its own wait, never the detection.
            await detecting[1].wait()
            if self._info is None:
                if self._detecting is detecting:
                    self._detecting = None
                raise detecting[0].exception()
        return self._info

    async def _detect_once(self) -> ServerInfo:
        info = await self._detect()
        self.limiter = AdaptiveLimiter(info.max_concurrency)
        self._info = info
        return info

    async def _detect(self) -> ServerInfo:
        url = self.config.url
        if url == "local":
            from synthq_hf.local_server import ensure_local_server

            url = await asyncio.to_thread(ensure_local_server)
        # Once per client, i.e. per (event loop, config): a few GETs per map call, and never a stale answer
        # about a URL that now serves something else.
        self._base = _base_url(url)
        self._enter()
        try:
            return await detect_server(self._pool_now(), self.config, self._base)
        finally:
            self._leave()

    async def get_json(self, route: str) -> dict[str, Any]:
        """GET a server route that describes it (e.g. llama.cpp's ``/props``); not cached: it is no answer.

        Raises :class:`EndpointError` when the server does not serve it, like :meth:`post` does."""
        info = self._info or await self.info()
        self._enter()
        try:
            status, body = await _probe(self._pool_now(), route)
        finally:
            self._leave()
        if status != 200 or not isinstance(body, dict):
            raise EndpointError(f"{info.base_url}{route} does not serve this route (HTTP {status})")
        return body

    # -- the request loop -----------------------------------------------------------------------------------
    async def post(self, route: str, payload: dict, *, stage: str, cache_key: dict | None = None) -> tuple[Any, bool]:
        """POST JSON with cache, concurrency cap, retries and usage; returns (reply JSON, was_cached).

        ``cache_key`` identifies the request in the cache when the payload alone does not (default: the payload).
        The payload is serialised once, with sorted keys: those bytes are both the body and the cache key's input
        (values may be ``orjson.Fragment``, JSON serialised in advance, e.g. a schema shared by every request).
        """
        info = self._info or await self.info()
        usage = usage_for(self.config, stage)
        cache = self.cache
        body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        if cache is None:
            data, _ = await self._send(info, route, body, usage, b"")
            return data, False
        key = body_key(route, body) if cache_key is None else request_key(route, cache_key)
        hit = cache.get(key)
        if hit is not None:
            usage.cache_hits += 1
            return orjson.loads(hit), True
        flying = self._flying.get(key)
        if flying is not None:  # the same request is in flight: its answer is this one's
            try:
                raw = await asyncio.shield(flying)
            except asyncio.CancelledError:
                if not flying.cancelled():
                    raise  # this caller was cancelled
                return await self.post(route, payload, stage=stage, cache_key=cache_key)  # the sender was
            usage.cache_hits += 1
            return orjson.loads(raw), True
        flying = self._flying[key] = asyncio.get_running_loop().create_future()
        try:
            data, raw = await self._send(info, route, body, usage, key)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                flying.cancel()
            else:
                flying.set_exception(err)
                flying.exception()  # retrieved: nobody may be waiting
            raise
        else:
            flying.set_result(raw)
        finally:
            del self._flying[key]
        return data, False

    async def _send(self, info: ServerInfo, route: str, body: bytes, usage: Usage, key: bytes) -> tuple[Any, bytes]:
        """The request loop: limiter slot, POST, retries with backoff; stores the answer under ``key``."""
        cache = self.cache
        url = info.base_url + route
        limiter = self.limiter
        config = self.config
        last = ""
        self._enter()
        try:
            for attempt in range(config.max_retries + 1):
                if attempt:
                    usage.retries += 1
                epoch = await limiter.acquire()
                start = time.monotonic()
                retry_after = None
                try:
                    resp = await self._pool_now().request("POST", route, body)
                    raw = resp.body
                    status = resp.status
                    if status == 200:
                        data = orjson.loads(raw)
                        latency = time.monotonic() - start
                        usage.requests += 1
                        usage.latency_s += latency
                        tokens = _usage_tokens(data)
                        usage.prompt_tokens += tokens[0]
                        usage.completion_tokens += tokens[1]
                        limiter.on_success(latency, tokens[1])
                        if cache is not None:
                            cache.put(key, raw)
                        return data, raw
                    last = f"HTTP {status}: {_snippet(raw)}"
                    if status in (429, 503):
                        retry_after = _retry_after(resp.header("retry-after"))
                        limiter.on_overload(epoch, retry_after)
                    elif status in (401, 403):
                        raise EndpointError(
                            f"{url} refused the credentials (HTTP {status}); set HF_TOKEN / log in with "
                            "`hf auth login`, or name the key's environment variable in api_key_env"
                        )
                    elif status in (404, 405):
                        raise EndpointError(f"{url} does not serve this route (HTTP {status})")
                    elif status < 500 and status != 408:
                        usage.failures += 1
                        raise RequestFailed(self._redact(f"POST {route} → {last}"))
                except (TimeoutError, OSError) as err:
                    last = _describe(err)
                except orjson.JSONDecodeError:
                    last = f"malformed JSON reply: {_snippet(raw)}"
                finally:
                    limiter.release()
                if attempt < config.max_retries:
                    delay = min(config.max_backoff_s, config.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
                    await asyncio.sleep(max(delay, retry_after or 0.0))
            usage.failures += 1
            raise RequestFailed(self._redact(f"POST {url} failed after {config.max_retries + 1} attempts: {last}"))
        finally:
            self._leave()

    # -- routes -----------------------------------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict],
        *,
        stage: str,
        row_id: str,
        sample: int = 0,
        attempt: int = 0,
        response_format: dict | orjson.Fragment | None = None,
        **params: Any,
    ) -> Reply:
        """``/v1/chat/completions``; the seed comes from (run seed, stage, row id, sample, attempt).

        ``response_format`` may be an ``orjson.Fragment`` of JSON with sorted keys (see :meth:`post`).
        """
        info = self._info or await self.info()
        payload = {"model": info.model, "messages": messages, **self._params, **params}
        payload["seed"] = derive_seed(self.config.seed, stage, row_id, sample, attempt)
        if response_format is not None:
            payload["response_format"] = response_format
        data, cached = await self.post("/v1/chat/completions", payload, stage=stage)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise RequestFailed(f"chat reply without choices[0].message: {_snippet(orjson.dumps(data))}") from err
        prompt_tokens, completion_tokens = _usage_tokens(data)
        return Reply(text, choice.get("finish_reason"), prompt_tokens, completion_tokens, cached)

    async def complete(self, prompt: str, *, stage: str, row_id: str, sample: int = 0, **params: Any) -> Reply:
        """Raw completion (no chat template applied by the server): TGI ``/generate``, else ``/v1/completions``."""
        info = self._info or await self.info()
        merged = {**self._params, **params}
        seed = derive_seed(self.config.seed, stage, row_id, sample)
        if info.dialect == "tgi":
            parameters = {k: v for k, v in merged.items() if k != "max_tokens"}
            parameters["max_new_tokens"] = merged.get("max_tokens", parameters.get("max_new_tokens", 512))
            parameters["seed"] = seed
            parameters["details"] = True
            data, cached = await self.post(
                "/generate", {"model": info.model, "inputs": prompt, "parameters": parameters}, stage=stage
            )
            details = data.get("details") or {}
            finish = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}.get(
                details.get("finish_reason"), details.get("finish_reason")
            )
            return Reply(data.get("generated_text", ""), finish, 0, details.get("generated_tokens", 0), cached)
        payload = {"model": info.model, "prompt": prompt, **merged, "seed": seed}
        data, cached = await self.post("/v1/completions", payload, stage=stage)
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError) as err:
            raise RequestFailed(f"completion reply without choices[0]: {_snippet(orjson.dumps(data))}") from err
        prompt_tokens, completion_tokens = _usage_tokens(data)
        return Reply(choice.get("text", ""), choice.get("finish_reason"), prompt_tokens, completion_tokens, cached)

    async def tokenize(self, text: str) -> list[int]:
        """Token ids from the server's own tokenizer (cached like any request)."""
        info = self._info or await self.info()
        route = info.tokenize_route
        if route is None:
            raise RequestFailed(f"{info.base_url} ({info.dialect}) has no tokenize route")
        if route == "/extras/tokenize":
            payload: dict = {"input": text}
        elif info.dialect == "tgi":
            payload = {"inputs": text}
        elif info.dialect == "vllm":
            payload = {"model": info.model, "prompt": text, "add_special_tokens": False}
        else:
            payload = {"content": text}
        # Tokenizers differ per model: the model name joins the cache key even where the route doesn't take it.
        data, _ = await self.post(route, payload, stage="tokenize", cache_key={**payload, "_model": info.model})
        if isinstance(data, list):  # TGI: [{"id":…, "text":…, "start":…, "stop":…}, …]
            return [int(tok["id"]) for tok in data]
        tokens = data.get("tokens", [])
        return [int(t["id"]) if isinstance(t, dict) else int(t) for t in tokens]


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _usage_tokens(data: Any) -> tuple[int, int]:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 60.0) if value else None
    except ValueError:
        return None


#: id(loop) → [loop, {config: client}, (config, client) last asked for]
_CLIENTS: dict[int, list[Any]] = {}


def get_client(config: EndpointConfig) -> EndpointClient:
    """The live client for ``config`` on the running event loop (made on first use).

    Called once per row: a map passes the same config object to every row, so the last one asked for is checked
    by identity first; hashing a config (it serialises ``params``) costs more than the rest of this.
    """
    loop = asyncio.get_running_loop()
    entry = _CLIENTS.get(id(loop))
    if entry is None or entry[0] is not loop:
        # A new loop (datasets.map makes one per call): forget clients of loops that are gone or stopped.
        for loop_id, (old_loop, *_) in list(_CLIENTS.items()):
            if old_loop.is_closed() or not old_loop.is_running():
                del _CLIENTS[loop_id]
        entry = _CLIENTS[id(loop)] = [loop, {}, (None, None)]
    last_config, last_client = entry[2]
    if last_config is config:
        return last_client
    clients = entry[1]
    client = clients.get(config)
    if client is None:
        client = clients[config] = EndpointClient(config)
    entry[2] = (config, client)
    return client


__all__ = [
    "EndpointClient",
    "EndpointConfig",
    "EndpointError",
    "Reply",
    "RequestFailed",
    "ServerInfo",
    "Usage",
    "derive_seed",
    "get_client",
    "usage_for",
]
