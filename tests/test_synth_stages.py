"""extract_keywords, ground, generate_instruction and the reject marks against fixture replies from the stub server.

The stub's tokenize routes count one token per character, which makes budgets and cuts easy to check exactly.
"""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset
from stub_server import StubServer

from synthq_hf import stages
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.generate_instruction import DemonstrationsError, sample_demonstrations

datasets.disable_progress_bars()

KEYWORDS = json.dumps({"intention": "fix a KeyError", "keywords": ["Python dict", "KeyError", "python DICT"]})
COMPOSITIONS = {"ability": "debugging", "knowledge": "dict.get", "extra_information": "none", "output": "code"}
GROUNDING = json.dumps({"scene": "a student with a failing script", "query_compositions": COMPOSITIONS})
GENERATED = json.dumps(
    {"thought": "t", "scene": "a baker", "query_compositions": COMPOSITIONS, "prompt": "  How long should I proof?  "}
)


def user_message(payload: dict) -> str:
    return next(m["content"] for m in payload["messages"] if m["role"] == "user")


def chat_payloads(stub: StubServer) -> list[dict]:
    return [p for route, p in stub.requests if route == "/v1/chat/completions"]


def demos(n: int, document: str = "a short demo document") -> Dataset:
    return Dataset.from_list(
        [
            {
                "id": f"demo-{i}",
                "prompt": f"seed request number {i}",
                "document": document,
                "scene": f"scene {i}",
                "query_compositions": COMPOSITIONS,
                "ground_error": None,
            }
            for i in range(n)
        ]
    )


# --- extract_keywords ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [KEYWORDS, f"Sure! Here is the JSON you asked for:\n```json\n{KEYWORDS}\n```\nHope it helps."],
    ids=["plain", "prose-around-json"],
)
def test_extract_keywords_reads_the_reply_and_drops_repeated_keywords(stub, make_config, reply) -> None:
    stub.queue(reply)
    out = Dataset.from_dict({"prompt": ["my script crashes with KeyError"]}).map(
        stages.extract_keywords, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert out[0]["intention"] == "fix a KeyError"
    assert out[0]["keywords"] == ["Python dict", "KeyError"]
    assert out[0]["extract_keywords_error"] is None
    assert "my script crashes with KeyError" in user_message(chat_payloads(stub)[0])


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        (["no json here"] * 3, "not valid JSON"),
        ([json.dumps({"intention": "x"})] * 3, "keywords"),
        ([json.dumps({"intention": "x", "keywords": [f"k{i}" for i in range(6)]})] * 3, "keywords"),
        ([""] * 3, "empty reply"),
        ([json.dumps({"intention": "x", "keywords": ["   "]})] * 3, "keywords"),
    ],
    ids=["malformed", "missing-key", "six-keywords", "empty-reply", "blank-keyword"],
)
def test_extract_keywords_bad_replies_become_row_errors(stub, make_config, replies, expected) -> None:
    stub.queue(*replies)
    out = Dataset.from_dict({"prompt": ["a question"], "id": ["q1"]}).map(
        stages.extract_keywords, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert out.num_rows == 1
    assert out[0]["keywords"] is None
    error = out[0]["extract_keywords_error"]
    assert error.startswith("extract_keywords:") and expected in error and "after 3 attempts" in error
    assert len(chat_payloads(stub)) == 3


def test_extract_keywords_empty_prompt_is_a_row_error_without_a_request(stub, make_config) -> None:
    out = Dataset.from_dict({"prompt": ["  \n", "fine"]}).map(
        stages.extract_keywords, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert "empty" in out[0]["extract_keywords_error"]
    assert out[1]["extract_keywords_error"] is None
    assert len(chat_payloads(stub)) == 1


def test_wrong_column_type_and_missing_column_are_one_clear_error(stub, make_config) -> None:
    endpoint = make_config(stub.url)
    with pytest.raises(ColumnError, match=r"'prompt' must hold strings, got int"):
        Dataset.from_dict({"prompt": [3]}).map(stages.extract_keywords, fn_kwargs={"endpoint": endpoint})
    with pytest.raises(ColumnError, match=r"needs an input column 'document'.*\['id', 'prompt'\]"):
        Dataset.from_dict({"prompt": ["p"], "id": ["a"]}).map(stages.ground, fn_kwargs={"endpoint": endpoint})


# --- ground ----------------------------------------------------------------------------------------------------


def test_ground_writes_scene_and_compositions(stub, make_config) -> None:
    stub.queue(GROUNDING)
    out = Dataset.from_dict({"prompt": ["why KeyError?"], "document": ["dict.get returns a default"]}).map(
        stages.ground, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert out[0]["scene"] == "a student with a failing script"
    assert out[0]["query_compositions"] == COMPOSITIONS
    message = user_message(chat_payloads(stub)[0])
    assert "why KeyError?" in message and "dict.get returns a default" in message


def test_ground_without_a_document_keeps_the_row(stub, make_config) -> None:
    out = Dataset.from_dict({"prompt": ["q"], "document": [None]}).map(
        stages.ground, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    assert out[0]["scene"] is None and "empty or missing document" in out[0]["ground_error"]
    assert chat_payloads(stub) == []


def test_a_megabyte_document_is_cut_by_tokens_not_rejected(make_stub, make_config) -> None:
    stub = make_stub("llamacpp")  # one token per character
    stub.queue(GROUNDING)
    document = "word " * 200_000
    out = Dataset.from_dict({"prompt": ["q"], "document": [document]}).map(
        stages.ground, fn_kwargs={"endpoint": make_config(stub.url), "max_document_tokens": 300}
    )
    assert out[0]["ground_error"] is None
    sent = user_message(chat_payloads(stub)[0])
    inside = sent.split("<document>\n", 1)[1].split("\n</document>", 1)[0]
    assert 280 <= len(inside) <= 300  # within a few tokens of the limit, never above
    assert document.startswith(inside)
    tokenized = [p for route, p in stub.requests if route == "/extras/tokenize"]
    assert tokenized and max(len(p["input"]) for p in tokenized) < 300 * 30  # never uploads the megabyte


# --- generate_instruction ----------------------------------------------------------------------------------------


def test_generate_instruction_writes_every_column_and_strips_the_prompt(stub, make_config) -> None:
    stub.queue(GENERATED)
    pool = demos(3)
    out = Dataset.from_dict({"document": ["Proofing dough takes one to three hours."]}).map(
        stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": pool, "k": 2}
    )
    row = out[0]
    assert row["generate_instruction_error"] is None
    assert row["prompt"] == "How long should I proof?"
    assert row["scene"] == "a baker" and row["query_compositions"] == COMPOSITIONS
    assert len(row["demonstration_ids"]) == 2 and set(row["demonstration_ids"]) <= set(pool["id"])
    message = user_message(chat_payloads(stub)[0])
    for demo_id in row["demonstration_ids"]:
        assert f"seed request number {demo_id.split('-')[1]}" in message
    assert "Proofing dough takes one to three hours." in message


def test_demonstration_sampling_is_reproducible_and_varies_across_rows(stub, make_config) -> None:
    stub.seeded_replies = True
    pool = demos(30)
    docs = Dataset.from_dict({"document": [f"document {i}" for i in range(12)]})
    kwargs = {"demonstrations": pool, "k": 4}
    first = docs.map(stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), **kwargs})
    again = docs.map(stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url, cache=False), **kwargs})
    other_seed = docs.map(
        stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url, seed=7, cache=False), **kwargs}
    )
    assert first["demonstration_ids"] == again["demonstration_ids"]
    assert len({tuple(ids) for ids in first["demonstration_ids"]}) > 6  # rows see different examples
    assert first["demonstration_ids"] != other_seed["demonstration_ids"]
    assert all(len(ids) == 4 for ids in first["demonstration_ids"])


def test_sampling_helper_is_a_pure_function_of_seed_and_row() -> None:
    pool = [{"id": str(i)} for i in range(50)]
    assert sample_demonstrations(pool, 5, 0, "row-1") == sample_demonstrations(pool, 5, 0, "row-1")
    assert sample_demonstrations(pool, 5, 0, "row-1") != sample_demonstrations(pool, 5, 0, "row-2")
    assert len(sample_demonstrations(pool[:3], 10, 0, "row-1")) == 3


def test_demonstrations_join_only_while_the_prompt_fits_the_budget(make_stub, make_config) -> None:
    stub = make_stub("llamacpp")  # one token per character: the budget is a character count here
    stub.queue(*[GENERATED] * 3)
    pool = demos(10, document="d" * 400)
    docs = Dataset.from_dict({"document": ["x" * 5000, "short document", "y" * 5000]})
    budget = 3500  # the fixed prompt (~1,300) + a 1,500-token document leave room for one ~550-token example
    out = docs.map(
        stages.generate_instruction,
        fn_kwargs={
            "endpoint": make_config(stub.url),
            "demonstrations": pool,
            "k": 10,
            "token_budget": budget,
            "max_document_tokens": 1500,
        },
    )
    assert out["generate_instruction_error"] == [None, None, None]
    sent = {user_message(p).split("<document>\n")[-1][:1]: p for p in chat_payloads(stub)}  # by row document
    for first_char, ids in zip("xsy", out["demonstration_ids"], strict=True):
        payload = sent[first_char]
        text = sum(len(m["content"]) + 8 for m in payload["messages"])
        assert text <= budget
        assert 0 < len(ids) < 10  # some examples fit, not all
        assert user_message(payload).count("Example ") == len(ids)
    long_row = user_message(sent["x"])
    assert "x" * 1400 in long_row and "x" * 1501 not in long_row  # the row's document cut to 1,500 tokens
    assert len(out[1]["demonstration_ids"]) > len(out[0]["demonstration_ids"])  # a short document leaves room


def test_rows_with_a_ground_error_are_not_used_as_demonstrations(stub, make_config) -> None:
    stub.queue(GENERATED)
    pool = demos(4).map(lambda row, i: {"ground_error": "ground: failed" if i % 2 else None}, with_indices=True)
    out = Dataset.from_dict({"document": ["doc"]}).map(
        stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": pool, "k": 10}
    )
    assert sorted(out[0]["demonstration_ids"]) == ["demo-0", "demo-2"]


def test_no_usable_demonstration_is_one_clear_error(stub, make_config) -> None:
    pool = demos(2).map(lambda row: {"ground_error": "ground: failed"})
    with pytest.raises(DemonstrationsError, match="none of the 2 demonstration rows is grounded"):
        Dataset.from_dict({"document": ["doc"]}).map(
            stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": pool}
        )
    with pytest.raises(DemonstrationsError, match=r"lacks columns \['scene'"):
        Dataset.from_dict({"document": ["doc"]}).map(
            stages.generate_instruction,
            fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": demos(2).remove_columns("scene")},
        )


def test_generate_instruction_failures_keep_the_row(stub, make_config) -> None:
    stub.queue(*["{}"] * 3)
    out = Dataset.from_dict({"document": ["doc", " "]}).map(
        stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": demos(2)}
    )
    assert out.num_rows == 2
    assert "does not match the schema" in out[0]["generate_instruction_error"]
    assert "empty or missing document" in out[1]["generate_instruction_error"]
    assert out[0]["prompt"] is None and out[1]["demonstration_ids"] is None


def test_document_column_can_be_named(stub, make_config) -> None:
    stub.queue(GENERATED)
    out = Dataset.from_dict({"text": ["fineweb-style text column"]}).map(
        stages.generate_instruction,
        fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": demos(1), "document_column": "text"},
    )
    assert out[0]["generate_instruction_error"] is None
    assert "fineweb-style text column" in user_message(chat_payloads(stub)[0])


# --- reject marks ----------------------------------------------------------------------------------------------


def test_mark_rejected_routes_failures_and_low_scores_and_loses_nothing() -> None:
    ds = Dataset.from_dict(
        {
            "prompt": ["good", "low", "failed", "unscored", "edge"],
            "generate_instruction_error": [None, None, "generate_instruction: cut off", None, None],
            "total_score": [5, 2, None, None, 3],
        }
    )
    marked = ds.map(stages.mark_rejected, fn_kwargs={"threshold": 3})
    kept, rejected = stages.split_rejected(marked)
    assert kept["prompt"] == ["good", "edge"]
    assert kept["rejected_by"] == [None, None] and kept["reason"] == [None, None]
    assert rejected["prompt"] == ["low", "failed", "unscored"]
    assert rejected["rejected_by"] == ["score_instruction", "generate_instruction", "score_instruction"]
    assert rejected["reason"] == ["total_score 2 < threshold 3", "generate_instruction: cut off", "no total_score"]
    again, _ = stages.split_rejected(marked.map(stages.mark_rejected, fn_kwargs={"threshold": 6}))
    assert again["prompt"] == []  # a second mark keeps earlier reasons and adds its own
    assert kept.num_rows + rejected.num_rows == ds.num_rows


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([f"Here you go:\n{GROUNDING}\nAnything else?"], None),
        ([json.dumps({"scene": "s"})] * 3, "query_compositions"),
        ([json.dumps({"scene": "s", "query_compositions": {"ability": "a"}})] * 3, "knowledge"),
        (["{not json"] * 3, "not valid JSON"),
        ([""] * 3, "empty reply"),
    ],
    ids=["prose-around-json", "missing-compositions", "missing-composition-keys", "malformed", "empty"],
)
def test_ground_fixture_replies(stub, make_config, replies, expected) -> None:
    stub.queue(*replies)
    out = Dataset.from_dict({"prompt": ["why KeyError?"], "document": ["dict.get returns a default"]}).map(
        stages.ground, fn_kwargs={"endpoint": make_config(stub.url)}
    )
    if expected is None:
        assert out[0]["ground_error"] is None and out[0]["query_compositions"] == COMPOSITIONS
    else:
        assert out[0]["scene"] is None and expected in out[0]["ground_error"]


@pytest.mark.parametrize(
    ("replies", "expected"),
    [
        ([f"```json\n{GENERATED}\n```"], None),
        ([json.dumps({"thought": "t", "scene": "s", "query_compositions": COMPOSITIONS})] * 3, "prompt"),
        ([json.dumps({**json.loads(GENERATED), "prompt": "   "})] * 3, "prompt"),
        (["garbage"] * 3, "not valid JSON"),
    ],
    ids=["fenced", "missing-prompt", "blank-prompt", "malformed"],
)
def test_generate_instruction_fixture_replies(stub, make_config, replies, expected) -> None:
    stub.queue(*replies)
    out = Dataset.from_dict({"document": ["Proofing dough takes one to three hours."]}).map(
        stages.generate_instruction, fn_kwargs={"endpoint": make_config(stub.url), "demonstrations": demos(2)}
    )
    if expected is None:
        assert out[0]["generate_instruction_error"] is None and out[0]["prompt"] == "How long should I proof?"
    else:
        assert out[0]["prompt"] is None and expected in out[0]["generate_instruction_error"]
