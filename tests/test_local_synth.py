"""The SynthQuestions stages against the real embedded llama.cpp server: seeds → keywords → ground → generate.

Only what the stack guarantees is asserted (schema-valid, filled columns, budgets measured by the server's own
tokenizer); the tiny model's wording is not judged.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from datasets import Dataset

from synthq_hf import EndpointConfig, stages, tokens

DATA = Path(stages.__file__).parent.parent / "data"


def read_jsonl(name: str, n: int) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_truncation_by_the_servers_tokenizer(local_endpoint: EndpointConfig) -> None:
    text = " ".join(row["text"] for row in read_jsonl("corpus.jsonl", 10))
    cut, count, was_cut = asyncio.run(tokens.truncate_tokens(text, 200, local_endpoint))
    measured = asyncio.run(tokens.count_tokens(cut, local_endpoint))
    assert was_cut and text.startswith(cut)
    assert count == measured and 180 <= measured <= 200


def test_seeds_to_demonstrations_to_new_instructions(local_endpoint: EndpointConfig) -> None:
    seeds = Dataset.from_list(read_jsonl("seeds.jsonl", 2))
    keyed = seeds.map(stages.extract_keywords, fn_kwargs={"endpoint": local_endpoint})
    for row in keyed:
        assert row["extract_keywords_error"] is None, row["extract_keywords_error"]
        assert 1 <= len(row["keywords"]) <= 5 and all(k.strip() for k in row["keywords"])
        assert row["intention"]

    corpus = read_jsonl("corpus.jsonl", 4)
    with_docs = keyed.add_column("document", [doc["text"] for doc in corpus[:2]])
    limits = {"max_document_tokens": 256}
    demos = with_docs.map(stages.ground, fn_kwargs={"endpoint": local_endpoint, **limits})
    for row in demos:
        assert row["ground_error"] is None, row["ground_error"]
        assert row["scene"] and set(row["query_compositions"]) == {
            "ability",
            "knowledge",
            "extra_information",
            "output",
        }

    docs = Dataset.from_list([{"id": doc["id"], "text": doc["text"]} for doc in corpus[2:4]])
    new = docs.map(
        stages.generate_instruction,
        fn_kwargs={
            "endpoint": local_endpoint,
            "demonstrations": demos,
            "document_column": "text",
            "k": 2,
            "token_budget": 2500,
            **limits,
        },
    )
    for row in new:
        assert row["generate_instruction_error"] is None, row["generate_instruction_error"]
        assert row["prompt"].strip() and row["thought"] is not None and row["scene"] is not None
        assert set(row["demonstration_ids"]) <= set(seeds["id"])
    assert any(row["demonstration_ids"] for row in new)
