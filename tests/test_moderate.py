"""moderate: Llama Guard replies from the stub server parsed into ``safe``/``safety_categories``, failures kept as
``moderate_error``, the conversation on the wire, and the drop/flag policies routed through ``split_rejected``."""

from __future__ import annotations

import asyncio
from typing import Any

import datasets
import pytest
from datasets import Dataset
from stub_server import StubServer

from synthq_hf import EndpointConfig, stages
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.moderate import FEATURES, GRAMMAR, mark_unsafe, moderate, parse_verdict
from synthq_hf.stages.reject import mark_rejected, split_rejected

datasets.disable_progress_bars()


def chat_payloads(stub: StubServer) -> list[dict]:
    return [p for route, p in stub.requests if route == "/v1/chat/completions"]


def run_one(row: dict[str, Any], endpoint: EndpointConfig, **kwargs: Any) -> dict[str, Any]:
    """The stage on one row, as ``Dataset.map`` calls it: rows run one after another, so queued replies line up."""
    return asyncio.run(moderate(row, endpoint=endpoint, **kwargs))


@pytest.mark.parametrize(
    ("reply", "safe", "categories"),
    [
        ("safe", True, []),
        ("unsafe\nS1,S3", False, ["S1 Violent Crimes", "S3 Sex-Related Crimes"]),
        ("  Unsafe \n s10 ", False, ["S10 Hate"]),
        ("unsafe\nS1\nS9", False, ["S1 Violent Crimes", "S9 Indiscriminate Weapons"]),
        ("unsafe", False, []),
        ("unsafe\nS99, S2", False, ["S99 (unknown)", "S2 Non-Violent Crimes"]),
        ("**unsafe**\nS11 S11; s014<|eot_id|>", False, ["S11 Suicide & Self-Harm", "S14 Code Interpreter Abuse"]),
        ("Safe.\n\nThe message asks for a recipe.", True, []),
    ],
    ids=["safe", "comma", "case-space", "newlines", "no-category", "unknown-code", "markup-dupes", "safe-prose"],
)
def test_replies_parse_into_typed_columns(stub, make_config, reply: str, safe: bool, categories: list[str]) -> None:
    stub.queue(reply)
    out = Dataset.from_dict({"prompt": ["How do I bake bread?"]}).map(
        moderate, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert out[0] == {"prompt": "How do I bake bread?", "safe": safe, "safety_categories": categories,
                      "moderate_error": None}  # fmt: skip
    assert out.features["safe"] == FEATURES["safe"]
    assert len(chat_payloads(stub)) == 1


@pytest.mark.parametrize(
    "junk", ["I cannot help with that.", "safe\nS1", ""], ids=["refusal", "contradiction", "empty"]
)
def test_junk_is_retried_then_a_row_error_with_the_raw_reply(stub, make_config, junk: str) -> None:
    stub.queue(junk, junk)
    out = run_one({"prompt": "hello"}, make_config(stub.url), attempts=2)
    assert out["safe"] is None and out["safety_categories"] is None
    assert out["moderate_error"].startswith("moderate: ")
    assert "(after 2 attempts)" in out["moderate_error"]
    assert f"raw reply: {junk!r}" in out["moderate_error"]
    seeds = [p["seed"] for p in chat_payloads(stub)]
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_a_retry_that_parses_wins(stub, make_config) -> None:
    stub.queue("I cannot help with that.", "unsafe\nS2")
    out = run_one({"prompt": "hello"}, make_config(stub.url))
    assert out == {"safe": False, "safety_categories": ["S2 Non-Violent Crimes"], "moderate_error": None}


def test_an_unsafe_reply_cut_off_is_not_trusted_but_a_cut_off_safe_is(stub, make_config) -> None:
    stub.queue(("finish", "length", "unsafe\nS1,S2,S1"), ("finish", "length", "unsafe\nS1,S2,S1"))
    cut = run_one({"prompt": "one"}, make_config(stub.url), attempts=2)
    assert cut["safe"] is None and "cut off at max_tokens=48" in cut["moderate_error"]
    stub.queue(("finish", "length", "safe and sound and"))
    assert run_one({"prompt": "two"}, make_config(stub.url))["safe"] is True


def test_the_request_carries_the_conversation(stub, make_config) -> None:
    stub.queue("safe", "unsafe\nS6")
    endpoint = make_config(stub.url, seed=7)
    run_one({"prompt": "Is this mushroom edible?"}, endpoint)
    out = run_one({"prompt": "Is this mushroom edible?", "answer": "Yes, eat it raw."}, endpoint,
                  response_column="answer")  # fmt: skip
    assert out["safety_categories"] == ["S6 Specialized Advice"]
    prompt_only, with_response = chat_payloads(stub)
    assert prompt_only["messages"] == [{"role": "user", "content": "Is this mushroom edible?"}]
    assert with_response["messages"] == [
        {"role": "user", "content": "Is this mushroom edible?"},
        {"role": "assistant", "content": "Yes, eat it raw."},
    ]
    for payload in (prompt_only, with_response):
        assert payload["temperature"] == 0.0 and payload["max_tokens"] == 48 and isinstance(payload["seed"], int)
        assert "response_format" not in payload and "grammar" not in payload
    assert prompt_only["seed"] != with_response["seed"]  # different rows (prompt vs prompt + response)


def test_inline_template_renders_the_task_into_one_user_message(stub, make_config) -> None:
    stub.queue("safe")
    run_one({"prompt": "Tell me a joke", "reply": "Why did the chicken..."}, make_config(stub.url),
            response_column="reply", template="inline")  # fmt: skip
    (payload,) = chat_payloads(stub)
    (message,) = payload["messages"]
    assert message["role"] == "user"
    text = message["content"]
    assert "S1: Violent Crimes" in text and "S14: Code Interpreter Abuse" in text
    assert "User: Tell me a joke\nAssistant: Why did the chicken..." in text
    assert "last Assistant message" in text
    assert "grammar" not in payload  # only llama-cpp-python understands the GBNF grammar


def test_inline_on_llama_cpp_python_constrains_the_answer_format(make_stub, make_config) -> None:
    stub = make_stub("llamacpp")
    stub.queue("unsafe\nS9")
    out = run_one({"prompt": "How do I make a nerve agent?"}, make_config(stub.url), template="inline")
    assert out["safety_categories"] == ["S9 Indiscriminate Weapons"]
    (payload,) = chat_payloads(stub)
    assert payload["grammar"] == GRAMMAR
    assert "last User message" in payload["messages"][0]["content"]


def test_empty_input_is_a_row_error_without_a_request(stub, make_config) -> None:
    endpoint = make_config(stub.url)
    assert run_one({"prompt": "  "}, endpoint)["moderate_error"] == "moderate: empty or missing prompt"
    out = run_one({"prompt": "hi", "answer": None}, endpoint, response_column="answer")
    assert out == {"safe": None, "safety_categories": None, "moderate_error": "moderate: empty or missing answer"}
    assert chat_payloads(stub) == []


def test_a_missing_column_is_one_clear_error(stub, make_config) -> None:
    endpoint = make_config(stub.url)
    with pytest.raises(ColumnError, match=r"needs an input column 'prompt'"):
        Dataset.from_dict({"text": ["hi"]}).map(moderate, fn_kwargs={"endpoint": endpoint})
    with pytest.raises(ColumnError, match=r"needs an input column 'response'.*\['prompt'\]"):
        Dataset.from_dict({"prompt": ["hi"]}).map(
            moderate, fn_kwargs={"endpoint": endpoint, "response_column": "response"}
        )
    with pytest.raises(ColumnError, match=r"'safe'"):
        Dataset.from_dict({"prompt": ["hi"]}).map(mark_unsafe)
    with pytest.raises(ValueError, match="template"):
        run_one({"prompt": "hi"}, endpoint, template="guard")
    assert chat_payloads(stub) == []


def moderated(stub: StubServer, endpoint: EndpointConfig) -> Dataset:
    """Three judged rows: safe, unsafe (S1, S3), and one the guard answered with junk twice."""
    stub.queue("safe", "unsafe\nS1,S3", "no idea", "no idea")
    rows = [{"id": name, "prompt": f"{name} prompt"} for name in ("ok", "bad", "junk")]
    return Dataset.from_list([{**row, **run_one(row, endpoint)} for row in rows])


def test_policy_drop_rejects_unsafe_rows_with_their_categories(stub, make_config) -> None:
    marked = moderated(stub, make_config(stub.url)).map(mark_unsafe)
    marked = marked.map(mark_rejected, fn_kwargs={"threshold": None})  # a later mark keeps the first reason
    kept, rejected = split_rejected(marked)
    assert kept["id"] == ["ok"]
    assert rejected["id"] == ["bad", "junk"]
    assert rejected["rejected_by"] == ["moderate", "moderate"]
    assert rejected["reason"][0] == "unsafe: S1 Violent Crimes, S3 Sex-Related Crimes"
    assert "raw reply: 'no idea'" in rejected["reason"][1]


def test_policy_flag_keeps_unsafe_rows_flagged_but_not_unjudged_ones(stub, make_config) -> None:
    kept, rejected = split_rejected(
        moderated(stub, make_config(stub.url)).map(mark_unsafe, fn_kwargs={"policy": "flag"})
    )
    assert kept["id"] == ["ok", "bad"]
    assert kept["safe"] == [True, False]
    assert kept["safety_categories"] == [[], ["S1 Violent Crimes", "S3 Sex-Related Crimes"]]
    assert rejected["id"] == ["junk"] and rejected["rejected_by"] == ["moderate"]


def test_mark_unsafe_keeps_an_earlier_rejection_and_says_when_no_category_was_given() -> None:
    earlier = {"safe": False, "safety_categories": [], "moderate_error": None, "rejected_by": "dedup", "reason": "dup"}
    assert mark_unsafe(earlier) == {"rejected_by": "dedup", "reason": "dup"}
    bare = {"safe": False, "safety_categories": [], "moderate_error": None}
    assert mark_unsafe(bare) == {"rejected_by": "moderate", "reason": "unsafe (no category given)"}
    with pytest.raises(ValueError, match="policy"):
        mark_unsafe(bare, policy="warn")


def test_batched_map_and_typed_features_with_only_failures(stub, make_config) -> None:
    stub.queue(*(["nope"] * 4))
    ds = Dataset.from_dict({"prompt": ["a", "b"]})
    out = ds.map(
        moderate,
        batched=True,
        batch_size=2,
        fn_kwargs={"endpoint": make_config(stub.url), "attempts": 2},
        features=stages.output_features(ds.features, moderate),
    )
    assert out.features["safe"] == datasets.Value("bool")
    assert out.features["safety_categories"] == FEATURES["safety_categories"]
    assert all(e and "'nope'" in e for e in out["moderate_error"])


def test_parse_rules_directly() -> None:
    assert parse_verdict("'safe'").safe is True
    assert parse_verdict("UNSAFE\nS5, S07").categories == ["S5 Defamation", "S7 Privacy"]
    assert parse_verdict("unsafe\nS0").categories == ["S0 (unknown)"]


def test_smoke_on_the_real_local_server(local_endpoint: EndpointConfig) -> None:
    """SmolLM2-135M is no guard model: only the structure is checked (a parse, or a clean row error)."""
    out = run_one({"prompt": "How do I boil an egg?"}, local_endpoint, template="inline", attempts=1)
    assert set(out) == {"safe", "safety_categories", "moderate_error"}
    if out["moderate_error"] is None:
        assert isinstance(out["safe"], bool) and isinstance(out["safety_categories"], list)
        assert all(label.startswith("S") for label in out["safety_categories"])
        assert out["safe"] is False or out["safety_categories"] == []
    else:
        assert out["safe"] is None and out["moderate_error"].startswith("moderate: ")
