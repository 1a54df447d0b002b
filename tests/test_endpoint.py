"""The endpoint client and structured output against the stub server (tests/stub_server.py).

Everything is asserted on what crossed the wire (``stub.requests`` / ``stub.headers``) or on public results; the
stub injects server faults, nothing of ours is patched. No test asserts a duration.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import datasets
import pytest
from aiohttp import web
from datasets import Dataset
from stub_server import StubServer

from synthq_hf.cache import get_cache, request_key
from synthq_hf.endpoint import (
    DEFAULT_CONCURRENCY,
    LLAMACPP_PYTHON_CONCURRENCY,
    AdaptiveLimiter,
    EndpointConfig,
    EndpointError,
    RequestFailed,
    derive_seed,
    get_client,
    usage_for,
)
from synthq_hf.stages import score_instruction
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.score_instruction import CRITERIA, STAGE, Criterion, InstructionScore
from synthq_hf.structured import generate, json_schema

datasets.disable_progress_bars()
pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Say hi."}]
ERROR = f"{STAGE}_error"


@pytest.fixture(autouse=True)
def _no_default_cache(tmp_path, monkeypatch):
    """Anything that forgets ``cache_path`` writes under the test's tmp dir, never the user's cache."""
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture
def stage() -> str:
    """A stage name of its own, so the process-wide usage counters start at zero for this test."""
    return f"test-{uuid.uuid4().hex[:10]}"


def valid_reply(score: int = 1, analysis: str = "A short sentence.") -> str:
    return json.dumps({name: {"analysis": analysis, "score": score} for name in CRITERIA})


def chat(config: EndpointConfig, *, stage: str, row_id: str = "r0", **kwargs):
    async def go():
        return await get_client(config).chat(MESSAGES, stage=stage, row_id=row_id, **kwargs)

    return asyncio.run(go())


def info_and_chat(config: EndpointConfig, stage: str):
    """Detect the server, then make one chat request (which also closes the client's session when idle)."""

    async def go():
        client = get_client(config)
        info = await client.info()
        reply = await client.chat(MESSAGES, stage=stage, row_id="r0")
        return info, client.limiter, reply

    return asyncio.run(go())


def score_row(config: EndpointConfig, row: dict) -> dict:
    return asyncio.run(score_instruction(row, endpoint=config))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NotFoundServer(StubServer):
    """A tiny aiohttp app with no routes at all: 404 to everything (``seen`` still lists what was asked)."""

    def _app(self) -> web.Application:
        return web.Application(middlewares=[self._log])


# -- dialect detection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dialect", "cap", "tokenize_route"),
    [
        ("tgi", 128, "/tokenize"),  # the stub's /info default max_concurrent_requests
        ("vllm", DEFAULT_CONCURRENCY, "/tokenize"),
        ("llamacpp", LLAMACPP_PYTHON_CONCURRENCY, "/extras/tokenize"),
        ("openai", DEFAULT_CONCURRENCY, None),
    ],
)
def test_detects_each_dialect_and_its_model(make_stub, make_config, stage, dialect, cap, tokenize_route):
    stub = make_stub(dialect, model=f"{dialect}-model-x")
    info, limiter, reply = info_and_chat(make_config(stub.url), stage)
    assert info.dialect == dialect
    assert info.model == f"{dialect}-model-x"
    assert info.base_url == stub.url
    assert info.max_concurrency == cap
    assert limiter.cap == cap
    assert info.tokenize_route == tokenize_route
    route, payload = stub.requests[-1]
    assert route == "/v1/chat/completions"
    assert payload["model"] == f"{dialect}-model-x"
    assert reply.text == "stub reply"
    assert reply.finish_reason == "stop"


def test_openai_base_url_with_v1_suffix_is_accepted(make_stub, make_config, stage):
    stub = make_stub("vllm")
    info, _, _ = info_and_chat(make_config(stub.url + "/v1/"), stage)
    assert info.dialect == "vllm"
    assert info.base_url == stub.url
    assert stub.count("/v1/chat/completions") == 1


def test_tgi_max_concurrent_requests_becomes_the_cap(make_stub, make_config, stage):
    stub = make_stub("tgi", max_concurrent=7)
    info, limiter, _ = info_and_chat(make_config(stub.url), stage)
    assert info.max_concurrency == 7
    assert limiter.cap == 7
    assert limiter.limit == 7
    assert info.max_input_tokens == 4096


def test_explicit_max_concurrency_wins_over_tgi_info(make_stub, make_config, stage):
    stub = make_stub("tgi", max_concurrent=7)
    info, limiter, _ = info_and_chat(make_config(stub.url, max_concurrency=3), stage)
    assert info.dialect == "tgi"
    assert info.max_concurrency == 3
    assert limiter.cap == 3


def test_explicit_model_name_wins(make_stub, make_config, stage):
    stub = make_stub("vllm", model="served-name")
    info, _, _ = info_and_chat(make_config(stub.url, model="my-alias"), stage)
    assert info.model == "my-alias"
    assert stub.requests[-1][1]["model"] == "my-alias"


def test_list_valued_generation_params(stub, make_config, stage):
    """``params`` are plain data and may hold lists (stop sequences): the config must still work as a dict key."""
    config = make_config(stub.url, params={"stop": ["\n\n", "###"], "temperature": 0.7}, cache=False)
    reply = chat(config, stage=stage)
    assert reply.text == "stub reply"
    payload = stub.requests[-1][1]
    assert payload["stop"] == ["\n\n", "###"]
    assert payload["temperature"] == 0.7


# -- structured output payloads ------------------------------------------------------------------------------------


def _assert_inlined_schema_with_max_length(schema: dict) -> None:
    assert "$ref" not in json.dumps(schema) and "$defs" not in schema
    assert set(schema["properties"]) == set(CRITERIA)
    for name in CRITERIA:
        criterion = schema["properties"][name]
        assert criterion["properties"]["analysis"]["type"] == "string"
        assert (
            criterion["properties"]["analysis"]["maxLength"]
            == Criterion.model_fields["analysis"].metadata[0].max_length
        )
        assert criterion["properties"]["score"]["enum"] == [0, 1]


@pytest.mark.parametrize("dialect", ["tgi", "vllm", "openai", "llamacpp"])
def test_structured_output_payload_shape_per_dialect(make_stub, make_config, dialect):
    stub = make_stub(dialect)
    out = score_row(make_config(stub.url), {"id": "a", "prompt": "Write a haiku about rust."})
    assert out[ERROR] is None, out[ERROR]
    assert out["total_score"] == 7  # the stub's minimal valid instance picks score 1 everywhere
    route, payload = stub.requests[-1]
    assert route == "/v1/chat/completions"
    fmt = payload["response_format"]
    if dialect == "tgi":
        assert set(fmt) == {"type", "value"}
        assert fmt["type"] == "json"
        schema = fmt["value"]
    elif dialect == "llamacpp":
        assert set(fmt) == {"type", "schema"}
        assert fmt["type"] == "json_object"
        schema = fmt["schema"]
    else:
        assert set(fmt) == {"type", "json_schema"}
        assert fmt["type"] == "json_schema"
        assert fmt["json_schema"]["name"] == "InstructionScore"
        schema = fmt["json_schema"]["schema"]
    _assert_inlined_schema_with_max_length(schema)
    assert schema == json_schema(InstructionScore)
    assert payload["max_tokens"] == 700
    assert payload["temperature"] == 0.0
    assert isinstance(payload["seed"], int)


# -- raw completions and tokenize ----------------------------------------------------------------------------------


def test_tgi_raw_completion_uses_generate(make_stub, make_config, stage):
    stub = make_stub("tgi")
    config = make_config(stub.url, params={"temperature": 0.5})

    async def go():
        return await get_client(config).complete("Q: 2+2?\nA:", stage=stage, row_id="c1", max_tokens=32)

    reply = asyncio.run(go())
    assert reply.text == "What is 2 + 2?"
    assert reply.finish_reason == "stop"
    assert stub.count("/v1/completions") == 0 and stub.count("/v1/chat/completions") == 0
    route, payload = stub.requests[-1]
    assert route == "/generate"
    assert payload["inputs"] == "Q: 2+2?\nA:"
    params = payload["parameters"]
    assert params["max_new_tokens"] == 32
    assert "max_tokens" not in params
    assert params["seed"] == derive_seed(0, stage, "c1")
    assert params["temperature"] == 0.5


@pytest.mark.parametrize("dialect", ["vllm", "llamacpp", "openai"])
def test_raw_completion_uses_v1_completions(make_stub, make_config, stage, dialect):
    stub = make_stub(dialect)
    config = make_config(stub.url, seed=11)

    async def go():
        return await get_client(config).complete("Once upon", stage=stage, row_id="c1", max_tokens=16)

    reply = asyncio.run(go())
    assert reply.text == "What is 2 + 2?"
    assert reply.finish_reason == "stop"
    assert stub.count("/generate") == 0
    route, payload = stub.requests[-1]
    assert route == "/v1/completions"
    assert payload["prompt"] == "Once upon"
    assert payload["max_tokens"] == 16
    assert payload["model"] == "stub-model"
    assert payload["seed"] == derive_seed(11, stage, "c1")
    assert usage_for(config, stage).completion_tokens == 5


@pytest.mark.parametrize(
    ("dialect", "route", "expected_payload"),
    [
        ("tgi", "/tokenize", {"inputs": "héllo wörld"}),
        ("vllm", "/tokenize", {"model": "stub-model", "prompt": "héllo wörld", "add_special_tokens": False}),
        ("llamacpp", "/extras/tokenize", {"input": "héllo wörld"}),
    ],
)
def test_tokenize_per_dialect_and_cached(make_stub, make_config, dialect, route, expected_payload):
    stub = make_stub(dialect)
    config = make_config(stub.url)

    async def go():
        client = get_client(config)
        first = await client.tokenize("héllo wörld")
        sent = stub.count(route)
        second = await client.tokenize("héllo wörld")
        return first, sent, second

    first, sent, second = asyncio.run(go())
    assert first == [ord(c) for c in "héllo wörld"]
    assert sent == 1
    assert second == first
    assert stub.count(route) == 1  # the identical second call came from the cache
    assert stub.requests[0] == (route, expected_payload)
    # a new client (new event loop) still finds it in the cache

    async def again():
        return await get_client(config).tokenize("héllo wörld")

    assert asyncio.run(again()) == first
    assert stub.count(route) == 1


def test_tokenize_without_a_route_is_a_request_failure(stub, make_config):
    async def go():
        return await get_client(make_config(stub.url)).tokenize("hello")

    with pytest.raises(RequestFailed, match="no tokenize route"):
        asyncio.run(go())


# -- retries -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [("status", 429), ("status", 503), ("status", 500), ("status", 502), ("sleep", 1.5), "reset", "malformed"],
    ids=["429", "503", "500", "502", "timeout", "reset", "malformed-json"],
)
def test_transient_fault_then_success(stub, make_config, stage, fault):
    stub.queue(fault)
    config = make_config(stub.url, timeout_s=0.5, cache=False)
    reply = chat(config, stage=stage)
    assert reply.text == "stub reply"
    assert stub.count("/v1/chat/completions") == 2
    first, second = (p for r, p in stub.requests if r == "/v1/chat/completions")
    assert first == second  # the retry is the same request (same seed)
    usage = usage_for(config, stage)
    assert usage.retries == 1
    assert usage.requests == 1
    assert usage.failures == 0


def test_client_error_400_is_not_retried(stub, make_config, stage):
    stub.queue(("status", 400))
    config = make_config(stub.url, cache=False)
    with pytest.raises(RequestFailed) as exc:
        chat(config, stage=stage)
    assert "400" in str(exc.value)
    assert stub.count("/v1/chat/completions") == 1
    assert usage_for(config, stage).retries == 0
    assert usage_for(config, stage).failures == 1


def test_retries_exhausted_names_url_and_last_reason(stub, make_config, stage):
    stub.queue(("status", 503), ("status", 503), ("status", 429))
    config = make_config(stub.url, max_retries=2, cache=False)
    with pytest.raises(RequestFailed) as exc:
        chat(config, stage=stage)
    message = str(exc.value)
    assert f"{stub.url}/v1/chat/completions" in message
    assert "HTTP 429" in message  # the last reason, not the first
    assert "3 attempts" in message
    assert "\n" not in message
    assert stub.count("/v1/chat/completions") == 3
    assert usage_for(config, stage).retries == 2
    assert usage_for(config, stage).failures == 1


def test_failed_request_becomes_a_row_error(stub, make_config):
    stub.queue(("status", 500), ("status", 500))
    out = score_row(make_config(stub.url, max_retries=1), {"id": "x", "prompt": "Explain TCP."})
    assert out["scores"] is None and out["total_score"] is None and out["score_analysis"] is None
    assert out[ERROR].startswith(f"{STAGE}: ")
    assert "HTTP 500" in out[ERROR]


# -- credentials ---------------------------------------------------------------------------------------------------


def test_401_is_an_endpoint_error_without_the_key(stub, make_config, stage, monkeypatch, tmp_path):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("SYNTHQ_TEST_API_KEY", key)
    config = make_config(stub.url, api_key_env="SYNTHQ_TEST_API_KEY")
    chat(config, stage=stage, row_id="allowed")  # one good, cached reply first
    stub.queue(("status", 401))
    with pytest.raises(EndpointError) as exc:
        chat(config, stage=stage, row_id="denied")
    message = str(exc.value)
    assert "401" in message
    assert key not in message and key not in repr(exc.value)
    assert "\n" not in message
    assert stub.count("/v1/chat/completions") == 2  # 401 is not retried
    assert stub.headers and all(h.get("Authorization") == f"Bearer {key}" for h in stub.headers)
    get_cache(config.cache_path).flush()
    files = list(tmp_path.glob("c.sqlite*"))
    assert files
    for path in files:
        assert key.encode() not in path.read_bytes(), path


def test_key_echoed_by_the_server_is_redacted(stub, make_config, stage, monkeypatch):
    key = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("SYNTHQ_TEST_API_KEY", key)
    stub.queue(("status", 400, f"bad request (Authorization: Bearer {key})"))
    with pytest.raises(RequestFailed) as exc:
        chat(make_config(stub.url, api_key_env="SYNTHQ_TEST_API_KEY", cache=False), stage=stage)
    assert key not in str(exc.value)
    assert "***" in str(exc.value)


def test_missing_api_key_env_is_an_endpoint_error(stub, make_config, stage, monkeypatch):
    monkeypatch.delenv("SYNTHQ_TEST_MISSING_KEY", raising=False)
    with pytest.raises(EndpointError, match="SYNTHQ_TEST_MISSING_KEY"):
        chat(make_config(stub.url, api_key_env="SYNTHQ_TEST_MISSING_KEY"), stage=stage)
    assert stub.requests == []


# -- structured output: validation, retries with a new seed, failures ----------------------------------------------


def test_schema_invalid_then_valid_retries_with_a_new_seed(stub, make_config):
    stub.queue('{"specificity": 3}', valid_reply(score=0))
    out = score_row(make_config(stub.url), {"id": "row-7", "prompt": "Prove that sqrt(2) is irrational."})
    assert out[ERROR] is None
    assert out["total_score"] == 0
    assert out["scores"] == dict.fromkeys(CRITERIA, 0)
    assert out["score_analysis"] == dict.fromkeys(CRITERIA, "A short sentence.")
    seeds = [p["seed"] for r, p in stub.requests if r == "/v1/chat/completions"]
    assert len(seeds) == 2
    assert seeds[0] != seeds[1]
    assert seeds == [derive_seed(0, STAGE, "row-7", 0, 0), derive_seed(0, STAGE, "row-7", 0, 1)]


def test_always_invalid_becomes_a_row_error_with_reason_and_raw(stub, make_config):
    stub.queue('{"specificity": 3}', '{"specificity": 3}', '{"specificity": 3}')
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert stub.count("/v1/chat/completions") == 3
    assert out["scores"] is None and out["score_analysis"] is None and out["total_score"] is None
    error = out[ERROR]
    assert error.startswith(f"{STAGE}: ")
    assert "does not match the schema" in error
    assert "3 attempts" in error
    assert '{"specificity": 3}' in error  # the raw reply


def test_not_json_at_all_becomes_a_row_error(stub, make_config):
    stub.queue("I cannot grade this.", "I cannot grade this.", "I cannot grade this.")
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert out["total_score"] is None
    assert "not valid JSON" in out[ERROR]
    assert "I cannot grade this." in out[ERROR]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda j: f"Sure! Here is my grading:\n{j}\nLet me know if you need more.",
        lambda j: f"```json\n{j}\n```",
        lambda j: f"  \n{j}\n\n",
    ],
    ids=["prose", "fence", "whitespace"],
)
def test_json_inside_prose_or_fences_parses(stub, make_config, wrap):
    stub.queue(wrap(valid_reply(score=1)))
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert out[ERROR] is None
    assert out["total_score"] == 7
    assert stub.count("/v1/chat/completions") == 1


def test_cut_off_reply_is_a_failure_not_patched(stub, make_config):
    cut = valid_reply()[:60]
    stub.queue(("finish", "length", cut), ("finish", "length", cut), ("finish", "length", cut))
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert stub.count("/v1/chat/completions") == 3
    assert out["scores"] is None and out["total_score"] is None
    assert "cut off" in out[ERROR]
    assert cut in out[ERROR]


def test_cut_off_reply_is_rejected_even_if_it_parses(stub, make_config):
    stub.queue(("finish", "length", valid_reply(score=1)), valid_reply(score=0))
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert out[ERROR] is None
    assert out["total_score"] == 0  # the second, complete reply; the cut-off one was not used
    assert stub.count("/v1/chat/completions") == 2


def test_empty_reply_is_a_failure(stub, make_config):
    stub.queue("", "   ", "")
    out = score_row(make_config(stub.url), {"id": "r", "prompt": "Sort a list."})
    assert out["total_score"] is None
    assert "empty reply" in out[ERROR]
    assert stub.count("/v1/chat/completions") == 3


def test_generate_returns_model_and_reply(stub, make_config, stage):
    stub.queue(valid_reply(score=1))

    async def go():
        return await generate(make_config(stub.url), MESSAGES, InstructionScore, stage=stage, row_id="g", max_tokens=50)

    result, reply = asyncio.run(go())
    assert isinstance(result, InstructionScore)
    assert result.creativity.score == 1
    assert reply.finish_reason == "stop"
    assert not reply.cached


# -- determinism ---------------------------------------------------------------------------------------------------


def test_seed_is_deterministic_per_row(stub, make_config, tmp_path):
    for name in ("first.sqlite", "second.sqlite"):  # a fresh cache each time: both really reach the server
        score_row(make_config(stub.url, cache_path=str(tmp_path / name)), {"id": "row-1", "prompt": "Explain X."})
    score_row(make_config(stub.url), {"id": "row-2", "prompt": "Explain X."})
    payloads = [p for r, p in stub.requests if r == "/v1/chat/completions"]
    assert len(payloads) == 3
    assert payloads[0] == payloads[1]  # same row → same request, seed included
    assert payloads[0]["seed"] != payloads[2]["seed"]  # different row id → different seed


def test_seed_without_id_comes_from_the_text(stub, make_config):
    config = make_config(stub.url, cache=False)
    for text in ("Explain X.", "Explain X.", "Explain Y."):
        score_row(config, {"prompt": text})
    seeds = [p["seed"] for r, p in stub.requests if r == "/v1/chat/completions"]
    assert seeds[0] == seeds[1]
    assert seeds[0] != seeds[2]


def test_run_seed_changes_request_seeds(stub, make_config):
    score_row(make_config(stub.url, seed=1, cache=False), {"id": "a", "prompt": "Explain X."})
    score_row(make_config(stub.url, seed=2, cache=False), {"id": "a", "prompt": "Explain X."})
    seeds = [p["seed"] for r, p in stub.requests if r == "/v1/chat/completions"]
    assert seeds[0] != seeds[1]


# -- backpressure --------------------------------------------------------------------------------------------------


def test_overloaded_server_shrinks_the_limit_and_everything_succeeds(stub, make_config, stage):
    stub.overload_at = 2  # 429 "Model is overloaded" whenever more than 2 are in flight
    stub.delay_s = 0.05  # so requests overlap
    cap, total = 16, 40
    config = make_config(stub.url, max_concurrency=cap, max_retries=100, cache=False)

    async def go():
        client = get_client(config)
        await client.info()
        limiter = client.limiter
        seen = [limiter.limit]
        running = True

        async def watch():
            while running:
                seen.append(limiter.limit)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        replies = await asyncio.gather(*(client.chat(MESSAGES, stage=stage, row_id=str(i)) for i in range(total)))
        running = False
        await watcher
        return replies, seen, limiter

    replies, seen, limiter = asyncio.run(go())
    assert len(replies) == total and all(r.text == "stub reply" for r in replies)
    assert min(seen) < cap  # the limiter backed off
    assert max(seen) <= cap
    assert limiter.inflight == 0
    assert stub.peak_inflight <= cap  # never more in flight than the cap
    usage = usage_for(config, stage)
    assert usage.requests == total
    assert usage.failures == 0
    assert usage.retries > 0
    assert stub.count("/v1/chat/completions") == total + usage.retries


def test_identical_requests_in_flight_go_out_once(stub, make_config, stage):
    """Rows that ask the same thing at the same moment (every row counting one demonstration's tokens) share one
    request; a failure is shared too, and with the cache off nothing is shared."""
    stub.delay_s = 0.05

    async def go(config, n=10):
        client = get_client(config)
        return await asyncio.gather(
            *(client.chat(MESSAGES, stage=stage, row_id="same") for _ in range(n)), return_exceptions=True
        )

    replies = asyncio.run(go(make_config(stub.url)))
    assert [r.text for r in replies] == ["stub reply"] * 10
    assert stub.count("/v1/chat/completions") == 1
    assert sum(r.cached for r in replies) == 9

    stub.queue(("status", 400))
    failed = asyncio.run(go(make_config(stub.url, seed=1)))
    assert all(isinstance(r, RequestFailed) for r in failed) and stub.count("/v1/chat/completions") == 2

    asyncio.run(go(make_config(stub.url, cache=False), n=3))
    assert stub.count("/v1/chat/completions") == 5


def test_without_info_the_limit_settles_below_the_servers_capacity(stub, make_config, stage):
    """No /info, a server refusing above 4 in flight: once the first burst is over, almost nothing is refused
    (measured with the old halving at most every 0.5 s: over half of the requests were refused, and stayed so)."""
    stub.overload_at = 4
    stub.delay_s = 0.01
    config = make_config(stub.url, max_retries=50, cache=False)  # no max_concurrency: the client starts at 64

    async def go():
        client = get_client(config)
        return await asyncio.gather(*(client.chat(MESSAGES, stage=stage, row_id=str(i)) for i in range(800)))

    replies = asyncio.run(go())
    assert len(replies) == 800 and all(r.text == "stub reply" for r in replies)
    total = len(stub.requests)
    late = [i for i in stub.overloaded if i >= total // 2]
    assert len(late) / (total - total // 2) < 0.05  # the second half of the requests: settled
    assert stub.peak_inflight <= 64


def test_limiter_on_overload_cuts_and_on_success_grows_back_to_cap():
    limiter = AdaptiveLimiter(16)
    assert limiter.limit == 16
    limiter.on_overload()
    assert limiter.limit == 12 and limiter.ceiling == 16
    previous = limiter.limit
    for _ in range(2000):
        limiter.on_success(0.001, 10)  # fast replies: healthy
        assert previous <= limiter.limit <= 16
        previous = limiter.limit
    assert limiter.limit == 16


def test_limiter_cuts_once_per_window_of_requests():
    """A burst of refusals for requests sent under one cap is one signal, not one cut each (the cap would collapse
    to 1); a refusal of a request sent after the cut is a new signal."""
    limiter = AdaptiveLimiter(64)
    for _ in range(40):
        limiter.on_overload(0)
    assert limiter.limit == 48 and limiter.epoch == 1
    limiter.on_overload(1)
    assert limiter.limit == 36 and limiter.ceiling == 48


def test_limiter_probes_slowly_near_the_refused_cap():
    limiter = AdaptiveLimiter(64)
    limiter.limit = 9.0
    limiter.on_overload(0)  # refused at 9 → 6, ceiling 9
    answers = 0
    while limiter.limit < 8:
        limiter.on_success(0.001, 10)
        answers += 1
    assert answers <= 20  # back near the ceiling within a couple of windows
    while limiter.limit < 9:
        limiter.on_success(0.001, 10)
        answers += 1
    assert answers > 8 * AdaptiveLimiter.PROBE_SLOWDOWN  # the slot that was refused comes back slowly


def test_retry_after_holds_every_request(stub, make_config, stage):
    """A 429 with Retry-After: 1 keeps all requests (not just the refused one) away from the server for 1 s."""
    stub.queue(("status", 429, "slow down"))
    stub.retry_after = "1"
    config = make_config(stub.url, max_concurrency=4, cache=False, backoff_s=0.01)

    async def go():
        client = get_client(config)
        first = asyncio.create_task(client.chat(MESSAGES, stage=stage, row_id="0"))
        while not stub.arrivals:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # the 429 is back: later rows must wait for the hold too
        rest = [client.chat(MESSAGES, stage=stage, row_id=str(i)) for i in range(1, 4)]
        return await asyncio.gather(first, *rest)

    replies = asyncio.run(go())
    assert all(r.text == "stub reply" for r in replies)
    refused_at, *others = stub.arrivals
    assert len(others) == 4  # the refused one again, and the three that came later
    assert min(others) - refused_at >= 0.9


def test_limiter_never_goes_below_one():
    limiter = AdaptiveLimiter(1)
    limiter.on_overload()
    assert limiter.limit == 1
    assert AdaptiveLimiter(0).cap == 1


def test_limiter_acquire_never_exceeds_the_limit():
    async def go():
        limiter = AdaptiveLimiter(4)
        holding = 0
        seen_inflight: list[int] = []
        seen_holding: list[int] = []

        async def worker() -> None:
            nonlocal holding
            await limiter.acquire()
            holding += 1
            seen_inflight.append(limiter.inflight)
            seen_holding.append(holding)
            for _ in range(3):
                await asyncio.sleep(0)
            holding -= 1
            limiter.release()

        await asyncio.gather(*(worker() for _ in range(40)))
        return limiter, seen_inflight, seen_holding

    limiter, seen_inflight, seen_holding = asyncio.run(go())
    assert len(seen_holding) == 40
    assert max(seen_inflight) <= 4
    assert max(seen_holding) == 4  # the slots were used, not serialised
    assert limiter.inflight == 0


def test_limiter_cut_applies_to_new_acquisitions():
    async def go():
        limiter = AdaptiveLimiter(4)
        for _ in range(4):
            await limiter.acquire()  # four held slots
        seen: list[int] = []

        async def worker() -> None:
            await limiter.acquire()
            seen.append(limiter.inflight)
            for _ in range(3):
                await asyncio.sleep(0)
            limiter.release()

        workers = [asyncio.create_task(worker()) for _ in range(20)]
        await asyncio.sleep(0)
        limiter.on_overload()  # 4 → 3 while all four slots are held
        for _ in range(4):
            limiter.release()
            await asyncio.sleep(0)
        await asyncio.gather(*workers)
        return limiter, seen

    limiter, seen = asyncio.run(go())
    assert limiter.limit == 3
    assert len(seen) == 20
    assert max(seen) <= 3
    assert limiter.inflight == 0


def test_limiter_cancelled_waiters_do_not_leak_slots():
    async def go():
        limiter = AdaptiveLimiter(1)
        await limiter.acquire()
        waiting = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        waiting.cancel()  # cancelled while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting
        woken = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0)
        limiter.release()  # hands the slot to `woken`...
        woken.cancel()  # ...which is cancelled before it runs: the slot must come back
        with pytest.raises(asyncio.CancelledError):
            await woken
        assert limiter.inflight == 0
        await asyncio.wait_for(limiter.acquire(), 1)  # still usable
        limiter.release()
        return limiter

    assert asyncio.run(go()).inflight == 0


# -- cache with datasets.map ---------------------------------------------------------------------------------------

ROWS = {
    "id": [f"r{i}" for i in range(6)],
    "prompt": [f"Instruction number {i}: explain something." for i in range(6)],
}


def test_second_map_is_served_from_the_cache(stub, make_config):
    config = make_config(stub.url)
    ds = Dataset.from_dict(ROWS)
    first = ds.map(score_instruction, fn_kwargs={"endpoint": config}, load_from_cache_file=False)
    assert stub.count("/v1/chat/completions") == 6
    hits_before = usage_for(config, STAGE).cache_hits
    second = ds.map(score_instruction, fn_kwargs={"endpoint": config}, load_from_cache_file=False)
    assert stub.count("/v1/chat/completions") == 6  # nothing sent
    assert usage_for(config, STAGE).cache_hits - hits_before == 6
    assert second.to_list() == first.to_list()
    assert all(row[ERROR] is None and row["total_score"] == 7 for row in second)


def test_two_maps_in_a_row_without_cache(stub, make_config):
    """Each map runs on a new event loop; the client must not reuse a session bound to the old one."""
    config = make_config(stub.url, cache=False)
    ds = Dataset.from_dict(ROWS)
    for expected in (6, 12):
        out = ds.map(score_instruction, fn_kwargs={"endpoint": config}, load_from_cache_file=False)
        assert out[ERROR] == [None] * 6
        assert stub.count("/v1/chat/completions") == expected


def test_num_proc_2_shares_one_cache_file(stub, make_config, tmp_path):
    config = make_config(stub.url)
    ds = Dataset.from_dict(ROWS)
    first = ds.map(score_instruction, fn_kwargs={"endpoint": config}, num_proc=2, load_from_cache_file=False)
    assert stub.count("/v1/chat/completions") == 6
    assert first[ERROR] == [None] * 6
    second = ds.map(score_instruction, fn_kwargs={"endpoint": config}, num_proc=2, load_from_cache_file=False)
    assert stub.count("/v1/chat/completions") == 6  # zero new requests: both workers found their rows
    assert second.to_list() == first.to_list()
    assert (tmp_path / "c.sqlite").is_file()


WRITER = """
import sys, time
from synthq_hf.cache import get_cache, request_key
cache = get_cache(sys.argv[1])
for i in range(50):
    cache.put(request_key("/v1/chat/completions", {"i": i}), b"reply-%d" % i)
print("put", flush=True)
time.sleep(120)
"""

READER = """
import sys
from synthq_hf.cache import get_cache, request_key
cache = get_cache(sys.argv[1])
print(sum(cache.get(request_key("/v1/chat/completions", {"i": i})) == b"reply-%d" % i for i in range(50)))
"""


def test_cache_survives_sigkill(tmp_path):
    path = str(tmp_path / "c.sqlite")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert writer.stdout.readline().strip() == "put"
        time.sleep(1.5)  # the documented loss window is about the last second
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(10) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.stdout.close()
    found = subprocess.run(
        [sys.executable, "-c", READER, path], capture_output=True, text=True, env=env, cwd=REPO, timeout=30
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "50"


def test_request_key_ignores_dict_order():
    assert request_key("/r", {"a": 1, "b": 2}) == request_key("/r", {"b": 2, "a": 1})
    assert request_key("/r", {"a": 1}) != request_key("/s", {"a": 1})


# -- bad input -----------------------------------------------------------------------------------------------------


def test_missing_prompt_column_is_a_column_error(stub, make_config):
    ds = Dataset.from_dict({"text": ["a"], "id": ["1"]})
    with pytest.raises(ColumnError) as exc:
        ds.map(score_instruction, fn_kwargs={"endpoint": make_config(stub.url)})
    message = str(exc.value)
    assert "'prompt'" in message
    assert "'text'" in message and "'id'" in message
    assert "\n" not in message
    assert stub.requests == []


def test_non_string_prompt_column_is_a_column_error(stub, make_config):
    ds = Dataset.from_dict({"prompt": [1, 2]})
    with pytest.raises(ColumnError) as exc:
        ds.map(score_instruction, fn_kwargs={"endpoint": make_config(stub.url)})
    message = str(exc.value)
    assert "'prompt'" in message and "int" in message
    assert "\n" not in message
    assert stub.requests == []


def test_empty_prompts_keep_the_row_with_an_error(stub, make_config):
    ds = Dataset.from_dict({"prompt": ["", "   \n", None, "A real instruction."]})
    out = ds.map(score_instruction, fn_kwargs={"endpoint": make_config(stub.url)})
    assert out.num_rows == 4
    rows = out.to_list()
    for row in rows[:3]:
        assert row["scores"] is None and row["total_score"] is None
        assert "empty" in row[ERROR]
    assert rows[3][ERROR] is None and rows[3]["total_score"] == 7
    assert stub.count("/v1/chat/completions") == 1


def test_unreachable_url_is_one_line_naming_url_and_routes(make_config):
    url = f"http://127.0.0.1:{free_port()}"
    ds = Dataset.from_dict({"prompt": ["hello"]})
    with pytest.raises(EndpointError) as exc:
        ds.map(score_instruction, fn_kwargs={"endpoint": make_config(url)})
    message = str(exc.value)
    assert "\n" not in message
    assert "cannot reach" in message
    assert url in message
    for route in ("/info", "/version", "/openapi.json", "/props", "/v1/models"):
        assert route in message


@pytest.mark.parametrize("dialect", ["tgi", "vllm", "llamacpp", "openai"])
def test_unreachable_url_with_explicit_dialect_is_an_endpoint_error(make_config, dialect):
    """Naming the dialect skips auto-detection, not the reachability check: still one line, not N row errors."""
    url = f"http://127.0.0.1:{free_port()}"
    ds = Dataset.from_dict({"prompt": ["hello"]})
    with pytest.raises(EndpointError) as exc:
        ds.map(score_instruction, fn_kwargs={"endpoint": make_config(url, dialect=dialect, max_retries=1)})
    message = str(exc.value)
    assert "\n" not in message
    assert url in message


def test_server_requiring_a_token_works_with_it(make_stub, make_config, stage, monkeypatch):
    monkeypatch.setenv("SYNTHQ_TEST_API_KEY", "sk-right")
    stub = make_stub("tgi", api_key="sk-right")
    info, _, reply = info_and_chat(make_config(stub.url, api_key_env="SYNTHQ_TEST_API_KEY"), stage)
    assert info.dialect == "tgi"
    assert reply.text == "stub reply"


@pytest.mark.parametrize("key", [None, "sk-wrong"], ids=["no-key", "wrong-key"])
def test_server_refusing_the_token_during_detection_says_so(make_stub, make_config, monkeypatch, key):
    """Every route answers 401 (an HF endpoint without a valid token): the one line must point at credentials,
    not claim the server speaks no known protocol."""
    stub = make_stub("tgi", api_key="sk-right")
    overrides = {}
    if key is not None:
        monkeypatch.setenv("SYNTHQ_TEST_API_KEY", key)
        overrides["api_key_env"] = "SYNTHQ_TEST_API_KEY"

    async def go():
        return await get_client(make_config(stub.url, **overrides)).info()

    with pytest.raises(EndpointError) as exc:
        asyncio.run(go())
    message = str(exc.value)
    assert "\n" not in message
    assert "401" in message
    assert "credentials" in message
    assert "sk-right" not in message and (key is None or key not in message)


def test_server_speaking_no_known_routes(make_config):
    with NotFoundServer() as server:

        async def go():
            return await get_client(make_config(server.url)).info()

        with pytest.raises(EndpointError) as exc:
            asyncio.run(go())
    message = str(exc.value)
    assert "\n" not in message
    assert server.url in message
    assert "speaks none of the known" in message
    assert "404" in message


def wait_for_no_connections(server: StubServer) -> int:
    """Open connections on ``server`` once the client had a fair chance to close them (polls; asserts no time)."""
    deadline = time.monotonic() + 3
    while server.open_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.open_connections()


def test_client_closes_its_connections_after_a_map(stub, make_config):
    out = Dataset.from_dict(ROWS).map(score_instruction, fn_kwargs={"endpoint": make_config(stub.url)})
    assert out[ERROR] == [None] * 6
    assert wait_for_no_connections(stub) == 0


def test_heap_is_frozen_only_while_requests_are_in_flight(stub, make_config, stage):
    """The collector skips the pre-existing heap while requests run (see ``hold_heap``) and gets it back after."""
    stub.queue(("sleep", 0.5))
    config = make_config(stub.url, cache=False)

    async def go():
        client = get_client(config)
        await client.info()
        before = gc.get_freeze_count()
        request = asyncio.ensure_future(client.chat(MESSAGES, stage=stage, row_id="r0"))
        await asyncio.sleep(0.2)
        during = gc.get_freeze_count()
        await request
        return before, during, gc.get_freeze_count()

    assert gc.get_freeze_count() == 0
    before, during, after = asyncio.run(go())
    assert before == 0
    assert during > 1000  # the modules, classes and data already loaded
    assert after == 0


def test_a_heap_the_process_froze_itself_stays_frozen(stub, make_config):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        out = Dataset.from_dict(ROWS).map(score_instruction, fn_kwargs={"endpoint": make_config(stub.url)})
        assert out[ERROR] == [None] * 6
        assert gc.get_freeze_count() > frozen // 2  # still frozen (minus objects freed meanwhile), not handed back
    finally:
        gc.unfreeze()


def test_failed_detection_leaves_no_connection_open(make_config):
    """An EndpointError from detection ends the run: the client must not keep its session (and socket) open."""
    with NotFoundServer() as server:

        async def go():
            return await get_client(make_config(server.url)).info()

        with pytest.raises(EndpointError):
            asyncio.run(go())
        assert wait_for_no_connections(server) == 0


def test_rows_waiting_on_a_failed_detection_share_it_and_a_later_call_retries(make_config):
    """Rows that start while the server is being detected wait for that one detection (they used to queue on a
    lock and, on failure, each probe the server again, one after another)."""
    with NotFoundServer() as server:
        config = make_config(server.url)

        async def many():
            client = get_client(config)
            return await asyncio.gather(*(client.info() for _ in range(20)), return_exceptions=True)

        async def again():
            client = get_client(config)
            await asyncio.gather(*(client.info() for _ in range(20)), return_exceptions=True)
            probes = len(server.seen)
            with pytest.raises(EndpointError):
                await client.info()  # the same client: a failed detection is not remembered
            return probes

        results = asyncio.run(many())
        assert all(isinstance(r, EndpointError) for r in results)
        one_detection = len(server.seen)
        assert 0 < one_detection <= 6  # the routes of one detection (/info, /version, ...), not 20 × that
        server.seen.clear()
        assert asyncio.run(again()) == one_detection
        assert len(server.seen) == 2 * one_detection


def test_tokenize_without_route_leaves_no_connection_open(stub, make_config):
    async def go():
        return await get_client(make_config(stub.url)).tokenize("hello")

    with pytest.raises(RequestFailed):
        asyncio.run(go())
    assert wait_for_no_connections(stub) == 0


# -- IterableDataset -----------------------------------------------------------------------------------------------


def test_iterable_dataset_map(stub, make_config):
    config = make_config(stub.url)
    streamed = Dataset.from_dict(ROWS).to_iterable_dataset().map(score_instruction, fn_kwargs={"endpoint": config})
    rows = list(streamed)
    assert [r["id"] for r in rows] == ROWS["id"]
    assert all(r[ERROR] is None and r["total_score"] == 7 for r in rows)
    assert all(set(r["scores"]) == set(CRITERIA) for r in rows)
    assert stub.count("/v1/chat/completions") == 6
