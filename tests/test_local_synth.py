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


def test_a_long_string_field_does_not_crash_the_llama_cpp_server(local_endpoint: EndpointConfig) -> None:
    """maxLength > 1000 made llama.cpp's grammar parser fail and llama-cpp-python's server segfault."""
    from pydantic import BaseModel, Field

    from synthq_hf.endpoint import get_client
    from synthq_hf.structured import StageFailure, generate

    class Essay(BaseModel):
        text: str = Field(max_length=5000)

    async def go() -> str:
        try:
            await generate(
                local_endpoint,
                [{"role": "user", "content": "Write one sentence about rain."}],
                Essay,
                stage="test_long_field",
                row_id="r1",
                max_tokens=60,
                attempts=1,
            )
        except StageFailure:  # cut off at max_tokens is fine: the question is whether the server survives
            pass
        reply = await get_client(local_endpoint).chat(
            [{"role": "user", "content": "Say hi."}], stage="test_long_field", row_id="r2", max_tokens=5
        )
        return reply.text

    assert isinstance(asyncio.run(go()), str)


def test_synthq_run_demo_end_to_end(local_endpoint: EndpointConfig, tmp_path, monkeypatch, capsys) -> None:
    """The README's main job with a tiny limit, on the real embedded server, then opened with load_dataset."""
    from datasets import load_dataset

    from synthq_hf.cli import main

    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    code = main(
        ["run", "demo", "--limit", "2", "--set", "datasets.demonstrations.source.limit=2", "--output", str(out)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert f'load_dataset("{out.resolve()}", "instructions")' in printed
    instructions = load_dataset(str(out), "instructions")
    assert sum(split.num_rows for split in instructions.values()) == 2  # every streamed row is kept or rejected
    for split in instructions.values():
        assert {"prompt", "scene", "total_score", "rejected_by", "reason"} <= set(split.column_names)
    demos = load_dataset(str(out), "demonstrations")
    assert sum(split.num_rows for split in demos.values()) == 2
    card = (out / "README.md").read_text()
    assert "| generator | smollm2-135m-instruct-q4_1 | llamacpp |" in card
    report = json.loads((out / "run.json").read_text())
    assert (
        report["usage"]["generate_instruction"]["requests"] + report["usage"]["generate_instruction"]["cache_hits"] >= 2
    )
    counts = report["counts"]
    # preferences are made from the kept instructions: each one is a pair or a rejected row with its reason
    assert counts["preferences"]["train"] + counts["preferences"]["rejected"] == counts["instructions"]["train"]
    if counts["preferences"]["train"]:
        pairs = load_dataset(str(out), "preferences", split="train")
        assert [m["role"] for m in pairs[0]["chosen"]] == ["user", "assistant"]


def test_a_dead_embedded_server_is_named_as_such() -> None:
    """If the embedded server dies mid-run, the error says so (with its last log line), not just 'cannot reach'."""
    import os
    import subprocess
    import sys

    script = (
        "import asyncio\n"
        "import synthq_hf.local_server as ls\n"
        "from synthq_hf.endpoint import EndpointConfig, EndpointError, get_client\n"
        "ls.ensure_local_server()\n"
        "ls._SERVER.process.kill(); ls._SERVER.process.wait()\n"
        "async def info():\n"
        "    return await get_client(EndpointConfig(url='local', max_retries=0)).info()\n"
        "try:\n"
        "    asyncio.run(info())\n"
        "except EndpointError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SYNTHQ_LOCAL_URL"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "the embedded llama.cpp server exited (code -9)" in done.stdout, done.stdout + done.stderr[-2000:]


def test_scalequest_demo_on_the_embedded_server(local_endpoint: EndpointConfig, tmp_path, monkeypatch) -> None:
    """The demo-sized ScaleQuest recipe on the real server: questions from the bare ChatML user prefix, filtered,
    answered and reward-ranked; every generated row is a question kept or rejected with its reason."""
    from datasets import load_dataset

    from synthq_hf.cli import main

    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "scalequest"
    assert main(["run", "scalequest_demo", "--limit", "2", "--output", str(out)]) == 0
    report = json.loads((out / "run.json").read_text())
    counts = report["counts"]
    assert counts["questions"]["train"] + counts["questions"]["rejected"] == 2
    assert counts["sft"]["train"] + counts["sft"]["rejected"] == counts["questions"]["train"]
    usage = report["usage"]["synthesize_from_scratch"]
    assert usage["requests"] + usage["cache_hits"] == 2  # one raw completion per generated row
    questions = load_dataset(str(out), "questions")
    for split in questions.values():
        for row in split:
            if row["rejected_by"]:
                assert row["reason"], row
            else:
                assert row["prompt"] and row["prefix_source"] == "preset:chatml" and row["language_ok"], row
    if counts["sft"]["train"]:
        sft = load_dataset(str(out), "sft", split="train")
        assert {"question", "response", "reward"} <= set(sft.column_names)
        assert all(row["response"] and row["reward"] is not None for row in sft)
