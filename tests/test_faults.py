"""Faults at recipe level: a 2,000-row recipe run against a server that answers 20 % of requests with a 429, a
503, a dropped connection, a reply too slow to wait for or broken JSON gives exactly the fault-free run's
dataset: every row in train + rejected, none twice, the same rows with the same replies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from stub_server import FAULTS, WORDS

from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe

ROWS = 2000


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "synthq-cache"))  # the corpus index is built in here


def recipe(url: str, tmp_path: Path, name: str) -> dict:
    rng = random.Random(1)
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text(
            "".join(
                json.dumps({"id": f"d{i:05d}", "text": f"Document {i}: {' '.join(rng.choices(WORDS, k=12))}."}) + "\n"
                for i in range(ROWS)
            )
        )
    return {
        "name": "faults",
        "seed": 5,
        "cache_path": str(tmp_path / f"{name}.sqlite"),
        # 10 retries: at a 20 % fault rate a request fails 11 times running with odds of 2e-8
        "endpoints": {
            "generator": {"url": url, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 0.5, "max_retries": 10}
        },
        "seeds": {"dataset": "bundled:seeds", "text_column": "prompt", "limit": 4},
        "corpus": {"dataset": str(corpus), "text_column": "text", "streaming": True},
        "search": {"backend": "bm25", "index": None},
        "demonstrations": {"extract_keywords": {}, "search_documents": {"k": 3}, "ground": {}},
        "instructions": {
            "generate_instruction": {"k": 2, "token_budget": 4000},
            "score_instruction": {},
            "filter": {"threshold": 3},
            "dedup": {},
        },
        "output": {"dir": str(tmp_path / name), "shard_rows": 500},
    }


def rows_of(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*/*.parquet")):
        config_split = f"{path.parent.name}/{path.name.split('-')[0]}"
        found.setdefault(config_split, []).extend(pq.read_table(path).to_pylist())
    return found


@pytest.mark.timeout(900)
def test_a_run_under_20_percent_faults_gives_the_fault_free_dataset(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    stub.seeded_replies = stub.varied_text = True  # replies differ per request, so a mispairing would show
    clean = run_recipe(build_recipe(recipe(stub.url, tmp_path, "clean")))
    clean_requests = len(stub.requests)
    asked = {json.dumps(payload, sort_keys=True) for _, payload in stub.requests}

    stub.fault_rate = 0.2
    stub.fault_sleep_s = 0.8  # past the client's 0.5 s timeout
    faulty = run_recipe(build_recipe(recipe(stub.url, tmp_path, "faulty")))
    faulty_requests = len(stub.requests) - clean_requests

    injected = sum(stub.faults_injected.values())
    assert set(stub.faults_injected) == set(FAULTS)  # every kind of fault happened
    assert injected >= 0.15 * faulty_requests  # and about a fifth of the requests met one
    assert {json.dumps(payload, sort_keys=True) for _, payload in stub.requests[clean_requests:]} == asked
    # Faults were retried, not skipped: about one more request each (a little less when an injected slow reply
    # lands within the timeout check's tick; on a loaded machine an ordinary reply may time out too).
    assert faulty_requests - len(asked) >= 0.9 * injected

    clean_rows, faulty_rows = rows_of(clean), rows_of(faulty)
    instructions = faulty_rows["instructions/train"] + faulty_rows.get("instructions/rejected", [])
    assert sorted(r["id"] for r in instructions) == [f"d{i:05d}" for i in range(ROWS)]  # all, once each
    assert not any(r.get(f"{s}_error") for r in instructions for s in ("generate_instruction", "score_instruction"))
    assert faulty_rows == clean_rows  # the same rows, with the same replies, in the same shards
    assert sorted(p.name for p in faulty.glob("*/*.parquet")) == sorted(p.name for p in clean.glob("*/*.parquet"))
    report = json.loads((faulty / "run.json").read_text())
    assert report["counts"] == json.loads((clean / "run.json").read_text())["counts"]
    assert report["usage"]["score_instruction"]["retries"] > 0
