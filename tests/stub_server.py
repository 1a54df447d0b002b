"""A small local HTTP server speaking the OpenAI / TGI / vLLM / llama-cpp-python routes, for fault injection.

It stands in for servers that cannot run here (TGI, vLLM) and injects what a real server does under stress
(429, 503, timeouts, connection resets, malformed JSON). It is a test double for a *server*: it records every
request it receives so tests assert on what actually crossed the wire, and it never touches our code.

Replies: by default a chat request with a JSON schema gets a minimal valid instance of that schema; tests can
queue exact replies or faults with :meth:`StubServer.queue`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from typing import Any

from aiohttp import web
from app_server import AppServer

#: Words for :func:`instance_of`'s varied strings: enough of them that two requests' texts rarely look alike.
WORDS = (
    "river orbit ledger violin basalt pepper glacier invoice sonnet kernel harbor quartz mural tariff lantern "
    "enzyme compass saddle meadow circuit canyon walnut beacon fossil turbine pigment marble thistle vapor cobalt "
    "prairie lattice monsoon ember syntax ferry orchard plasma granite willow cipher tundra velvet parcel"
).split()


def instance_of(schema: dict, rng: random.Random | None = None, varied: bool = False) -> Any:
    """Smallest value that validates against a (ref-free) JSON schema: what a constrained decoder would emit.

    With ``rng`` (seeded from the request's seed), enum choices vary like a sampling model's would, so tests can
    tell whether two runs got the same answers for the same requests; with ``varied`` too, strings are a dozen
    words drawn by ``rng``, so rows get texts of their own (dedup keeps them apart) that a rerun reproduces.
    """
    if "enum" in schema:
        return rng.choice(schema["enum"]) if rng is not None else schema["enum"][-1]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if "anyOf" in schema:
        return instance_of(schema["anyOf"][0], rng, varied)
    if kind == "object":
        return {name: instance_of(sub, rng, varied) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [instance_of(schema["items"], rng, varied)] * max(1, schema.get("minItems", 1))
    if kind == "string" and varied and rng is not None:
        text = " ".join(rng.choice(WORDS) for _ in range(12)).ljust(schema.get("minLength", 1), "o")
        return text[: schema.get("maxLength", len(text))].strip() or "ok"
    if kind == "string":
        return "ok" * max(1, schema.get("minLength", 1))
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return True
    return None


def schema_of(payload: dict) -> dict | None:
    fmt = payload.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return fmt["json_schema"]["schema"]
    if fmt.get("type") == "json_object":
        return fmt.get("schema")
    if fmt.get("type") == "json":
        return fmt.get("value")
    return None


#: What ``fault_rate`` injects: refusals, a dropped connection, a reply too slow to wait for, broken JSON.
FAULTS = ("429", "503", "reset", "timeout", "malformed")


class StubServer(AppServer):
    """Run with ``with StubServer(dialect="tgi") as stub: stub.url``; inspect ``stub.requests``."""

    def __init__(
        self,
        dialect: str = "openai",
        model: str = "stub-model",
        max_concurrent: int | None = None,
        api_key: str | None = None,
    ):
        self.dialect = dialect
        self.api_key = api_key  # when set, every route answers 401 without ``Authorization: Bearer <api_key>``
        self.model = model
        self.max_concurrent = max_concurrent
        self.requests: list[tuple[str, dict]] = []
        self.headers: list[dict[str, str]] = []  # the request headers of each entry in ``requests``
        self.seen: list[str] = []  # "METHOD /path" of every request that reached the server, probes included
        self._script: deque = deque()
        self.inflight = 0
        self.peak_inflight = 0
        self.overload_at: int | None = None  # answer 429 whenever more than this many are in flight
        self.overloaded: list[int] = []  # the indexes in ``requests`` of those refused for ``overload_at``
        self.delay_s = 0.0
        self.seeded_replies = False  # vary enum choices with the request's seed (see instance_of)
        self.varied_text = False  # with seeded_replies: strings too, a dozen seeded words (see instance_of)
        self.retry_after: str | None = None  # a Retry-After header on every 429/503 it answers
        # Random faults: this share of generation requests (with no scripted action) get one of FAULTS, drawn
        # from a seeded generator; ``faults_injected`` counts them by kind.
        self.fault_rate = 0.0
        self.fault_sleep_s = 2.0  # how long an injected "timeout" holds the reply (longer than the client waits)
        self.faults_injected: dict[str, int] = {}
        self._fault_rng = random.Random(0)
        self.arrivals: list[float] = []  # time.monotonic() at which each entry of ``requests`` arrived
        # The model's chat template (Jinja, as in tokenizer_config.json), served the way each server exposes it:
        # vLLM /tokenize with messages + /detokenize, TGI /chat_tokenize, llama.cpp's server /props.
        self.chat_template: str | None = None
        self.completions_route = True  # False: a chat-only API (no /v1/completions)

    # -- scripting ----------------------------------------------------------------------------------------
    def queue(self, *actions: Any) -> None:
        """Queue what the next POSTs get, in order: a string (the reply content), ``("status", code)``,
        ``("status", code, body)`` (that status with a raw text body, e.g. a server echoing the request),
        ``("sleep", seconds)`` (then a normal reply), ``"reset"`` (drop the connection), ``"malformed"``
        (HTTP 200 with broken JSON), ``("finish", reason, content)``."""
        self._script.extend(actions)

    def count(self, route: str) -> int:
        return sum(1 for r, _ in self.requests if r == route)

    def open_connections(self) -> int:
        """How many client connections the server holds open right now (keep-alive included)."""

        async def count() -> int:
            return len(self._runner.server.connections)

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(5)

    # -- routes -------------------------------------------------------------------------------------------
    @web.middleware
    async def _log(self, request: web.Request, handler) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.path}")
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Authorization header is correct, but the token seems invalid"},
                                     status=401)  # fmt: skip
        return await handler(request)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._log, self._auth])
        app.router.add_get("/v1/models", self._models)
        if self.dialect == "tgi":
            app.router.add_get("/info", self._info)
            app.router.add_post("/generate", self._generate)
            app.router.add_post("/tokenize", self._tokenize)
        if self.dialect == "vllm":
            app.router.add_get("/version", self._version)
            app.router.add_post("/tokenize", self._tokenize)
        if self.dialect == "llamacpp":
            app.router.add_get("/openapi.json", self._openapi)
            app.router.add_post("/extras/tokenize", self._tokenize)
        if self.dialect == "llama-server":  # llama.cpp's own server (not llama-cpp-python): /props, /tokenize
            app.router.add_get("/props", self._props)
            app.router.add_post("/tokenize", self._tokenize)
        if self.dialect == "vllm":
            app.router.add_post("/detokenize", self._detokenize)
        if self.dialect == "tgi":
            app.router.add_post("/chat_tokenize", self._chat_tokenize)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions_or_404)
        return app

    async def _completions_or_404(self, request: web.Request) -> web.StreamResponse:
        """Decided per request: the app is built before a test can switch the route off."""
        if not self.completions_route:
            return web.json_response({"error": "Not Found"}, status=404)
        return await self._completions(request)

    def _rendered(self, messages: list[dict]) -> str:
        """The chat template applied as the servers do it (transformers' Jinja settings), for a generation."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template or "").render(
            messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
        )

    async def _props(self, request: web.Request) -> web.Response:
        return web.json_response({"chat_template": self.chat_template, "bos_token": "<s>", "total_slots": 4})

    async def _detokenize(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self._record(request, payload)
        return web.json_response({"prompt": "".join(chr(i) for i in payload["tokens"])})

    async def _chat_tokenize(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self._record(request, payload)
        text = self._rendered(payload["messages"])
        return web.json_response({"tokenize_response": [{"id": ord(c)} for c in text], "templated_text": text})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"info": {"title": "🦙 llama.cpp Python API"}})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _info(self, request: web.Request) -> web.Response:
        info = {"model_id": self.model, "max_concurrent_requests": self.max_concurrent or 128, "max_input_tokens": 4096}
        return web.json_response(info)

    def _record(self, request: web.Request, payload: dict) -> None:
        self.requests.append((request.path, payload))
        self.headers.append(dict(request.headers))
        self.arrivals.append(time.monotonic())

    async def _tokenize(self, request: web.Request) -> web.Response:
        payload = await request.json()
        self._record(request, payload)
        text = payload.get("inputs") or payload.get("prompt") or payload.get("input") or payload.get("content") or ""
        if "messages" in payload:  # vLLM: the chat template applied first
            text = self._rendered(payload["messages"])
        ids = [ord(c) for c in text]  # one token per character: easy to reason about in tests
        if self.dialect == "tgi":
            return web.json_response([{"id": i, "text": chr(i), "start": n, "stop": n + 1} for n, i in enumerate(ids)])
        return web.json_response({"tokens": ids, "count": len(ids)})

    async def _guarded(self, request: web.Request, make_reply) -> web.StreamResponse:
        payload = await request.json()
        self._record(request, payload)
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            if self.overload_at is not None and self.inflight > self.overload_at:
                self.overloaded.append(len(self.requests) - 1)
                return web.json_response({"error": "Model is overloaded"}, status=429, headers=self._retry_header())
            action = self._script.popleft() if self._script else None
            if action is None and self.fault_rate and self._fault_rng.random() < self.fault_rate:
                kind = self._fault_rng.choice(FAULTS)
                self.faults_injected[kind] = self.faults_injected.get(kind, 0) + 1
                action = {"429": ("status", 429), "503": ("status", 503), "timeout": ("sleep", self.fault_sleep_s)}.get(
                    kind, kind
                )
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if isinstance(action, tuple) and action[0] == "status" and len(action) > 2:
                return web.Response(text=action[2], status=action[1], headers=self._retry_header(action[1]))
            if isinstance(action, tuple) and action[0] == "status":
                return web.json_response(
                    {"error": f"injected {action[1]}"}, status=action[1], headers=self._retry_header(action[1])
                )
            if isinstance(action, tuple) and action[0] == "sleep":
                await asyncio.sleep(action[1])
                action = None
            if action == "reset":
                request.transport.abort()
                raise ConnectionResetError("injected reset")
            if action == "malformed":
                return web.Response(body=b'{"choices": [{"message": ', content_type="application/json")
            finish, content = "stop", None
            if isinstance(action, tuple) and action[0] == "finish":
                finish, content = action[1], action[2]
            elif isinstance(action, str):
                content = action
            return make_reply(payload, content, finish)
        finally:
            self.inflight -= 1

    def _retry_header(self, status: int = 429) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after and status in (429, 503) else {}

    def _free_text(self, payload: dict, default: str) -> str:
        """A raw completion: with seeded, varied replies a seeded question, else ``default``."""
        if self.seeded_replies and self.varied_text:
            rng = random.Random(payload.get("seed"))
            return " ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "?"
        return default

    def _content_for(self, payload: dict, content: str | None) -> str:
        if content is not None:
            return content
        schema = schema_of(payload)
        rng = random.Random(payload.get("seed")) if self.seeded_replies else None
        if schema:
            return json.dumps(instance_of(schema, rng, self.varied_text))
        if rng is not None and self.varied_text:  # free text (e.g. sampled responses): a seeded sentence
            return " ".join(rng.choice(WORDS) for _ in range(12))
        return "stub reply"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        def reply(payload: dict, content: str | None, finish: str) -> web.Response:
            text = self._content_for(payload, content)
            return web.json_response({
                "id": "chatcmpl-stub", "object": "chat.completion", "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text) // 4,
                          "total_tokens": 10 + len(text) // 4},
            })  # fmt: skip

        return await self._guarded(request, reply)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        def reply(payload: dict, content: str | None, finish: str) -> web.Response:
            text = content if content is not None else self._free_text(payload, "What is 2 + 2?")
            return web.json_response({
                "id": "cmpl-stub", "object": "text_completion", "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
            })  # fmt: skip

        return await self._guarded(request, reply)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        def reply(payload: dict, content: str | None, finish: str) -> web.Response:
            text = content if content is not None else self._free_text(payload.get("parameters", {}), "What is 2 + 2?")
            reason = {"stop": "eos_token", "length": "length"}.get(finish, finish)
            return web.json_response(
                {"generated_text": text, "details": {"finish_reason": reason, "generated_tokens": 5}}
            )

        return await self._guarded(request, reply)
