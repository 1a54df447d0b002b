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
    limits = {"max_document_tokens": 200}  # prompt evaluation is slow on 2 CPU cores: keep prompts short
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
            "token_budget": 1200,
            **limits,
        },
    )
    for row in new:
        assert row["generate_instruction_error"] is None, row["generate_instruction_error"]
        assert row["prompt"].strip() and row["thought"] is not None and row["scene"] is not None
        assert set(row["demonstration_ids"]) <= set(seeds["id"])
    assert any(row["demonstration_ids"] for row in new)


def test_the_embedded_server_outlives_the_thread_that_started_it(tmp_path) -> None:
    """datasets.map starts url="local" from a short-lived thread; the server must survive that thread's exit."""
    import os
    import subprocess
    import sys

    script = (
        "import threading, time, urllib.request\n"
        "from synthq_hf.local_server import ensure_local_server\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(ensure_local_server()))\n"
        "t.start(); t.join(); time.sleep(3)\n"
        "print(urllib.request.urlopen(box[0] + '/v1/models', timeout=10).status)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SYNTHQ_LOCAL_URL"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "200"
