"""Against the real embedded llama.cpp server (llama-cpp-python + bundled SmolLM2-135M), no doubles.

The tiny model writes weak text; these tests assert only what the stack guarantees: the server answers, the
dialect is detected, constrained decoding yields schema-valid output, and stages fill their columns.
"""

from __future__ import annotations

import asyncio

from datasets import Dataset, load_dataset

from synthq_hf import EndpointConfig, stages
from synthq_hf.cli import main
from synthq_hf.endpoint import get_client
from synthq_hf.stages.score_instruction import CRITERIA, InstructionScore
from synthq_hf.structured import generate, json_schema

ROWS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Plan a three-day hiking trip in the Alps for beginners in early June.",
    "Explain why the sky is blue.",
]


def run(coro):
    return asyncio.run(coro)


def test_detects_llama_cpp_python_and_chats(local_endpoint: EndpointConfig) -> None:
    async def go():
        client = get_client(local_endpoint)
        info = await client.info()
        reply = await client.chat(
            [{"role": "user", "content": "Say hello."}], stage="test_chat", row_id="r1", max_tokens=16
        )
        return info, reply

    info, reply = run(go())
    assert info.dialect == "llamacpp"
    assert info.tokenize_route == "/extras/tokenize"
    assert reply.text.strip()
    assert reply.finish_reason in ("stop", "length")
    assert reply.completion_tokens > 0


def test_tokenize_uses_the_model_tokenizer(local_endpoint: EndpointConfig) -> None:
    async def go():
        client = get_client(local_endpoint)
        return await client.tokenize("Hello world, hello world."), await client.tokenize("Hello")

    long_ids, short_ids = run(go())
    assert all(isinstance(t, int) for t in long_ids)
    assert 0 < len(short_ids) < len(long_ids) < len("Hello world, hello world.")


def test_structured_output_is_schema_valid(local_endpoint: EndpointConfig) -> None:
    async def go():
        return await generate(
            local_endpoint,
            [{"role": "user", "content": f"Grade this instruction on seven criteria as JSON: {ROWS[0]}"}],
            InstructionScore,
            stage="test_structured",
            row_id="r1",
            max_tokens=700,
        )

    result, reply = run(go())
    assert isinstance(result, InstructionScore)
    InstructionScore.model_validate_json(reply.text)  # the raw text itself is valid, not repaired
    for name in CRITERIA:
        limit = json_schema(InstructionScore)["properties"][name]["properties"]["analysis"]["maxLength"]
        assert len(getattr(result, name).analysis) <= limit


def test_score_instruction_map_on_dataset_and_iterable(local_endpoint: EndpointConfig) -> None:
    ds = Dataset.from_dict({"id": ["a", "b", "c"], "prompt": ROWS})
    scored = ds.map(stages.score_instruction, fn_kwargs={"endpoint": local_endpoint})
    assert scored.num_rows == 3
    for row in scored:
        assert row["score_instruction_error"] is None, row["score_instruction_error"]
        assert set(row["scores"]) == set(CRITERIA)
        assert row["total_score"] == sum(row["scores"].values())
        assert 0 <= row["total_score"] <= 7
    # the same rows streamed: answers come from the request cache, identical to the first pass
    streamed = list(ds.to_iterable_dataset().map(stages.score_instruction, fn_kwargs={"endpoint": local_endpoint}))
    assert [r["scores"] for r in streamed] == scored["scores"]


def test_cli_score_writes_a_loadable_folder(local_endpoint: EndpointConfig, tmp_path) -> None:
    out = tmp_path / "out"
    code = main(
        ["score", "--endpoint", local_endpoint.url, "--limit", "2", "--output", str(out),
         "--cache-path", local_endpoint.cache_path]
    )  # fmt: skip
    assert code == 0
    loaded = load_dataset(str(out), "instructions", split="train")
    assert loaded.num_rows == 2
    assert {"prompt", "scores", "score_analysis", "total_score", "score_instruction_error"} <= set(loaded.column_names)
    assert (out / "run.json").is_file()
    assert main(["score", "--endpoint", local_endpoint.url, "--limit", "1", "--output", str(out)]) == 2


def test_endpoint_url_local_starts_the_embedded_server(local_endpoint: EndpointConfig, tmp_path) -> None:
    """url="local" resolves to a server we start ourselves (here reusing the session's via SYNTHQ_LOCAL_URL)."""
    cfg = EndpointConfig(url="local", cache_path=str(tmp_path / "c.sqlite"))

    async def go():
        return await get_client(cfg).info()

    info = run(go())
    assert info.dialect == "llamacpp"
    assert info.base_url.startswith("http://127.0.0.1:")


def test_generate_responses_samples_with_their_own_seeds(local_endpoint: EndpointConfig) -> None:
    rows = Dataset.from_dict({"prompt": ROWS[2:]})
    features = stages.output_features(rows.features, stages.generate_responses)
    kwargs = {"endpoint": local_endpoint, "n": 3, "max_tokens": 24, "temperature": 1.0}
    out = rows.map(stages.generate_responses, fn_kwargs=kwargs, features=features)
    row = out[0]
    assert row["generate_responses_error"] is None
    assert len(row["responses"]) == 3 and all(text.strip() for text in row["responses"])
    assert row["responses_identical"] == (len(set(row["responses"])) == 1)
    again = rows.map(stages.generate_responses, fn_kwargs=kwargs, features=features)  # from the request cache
    assert again[0]["responses"] == row["responses"]
