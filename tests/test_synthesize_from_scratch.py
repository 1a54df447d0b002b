"""synthesize_from_scratch: the user prefix from presets, the server's own template (vLLM, TGI, llama.cpp) or a
tokenizer_config.json, one seeded raw completion per row, and the one-line refusals (stub servers)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_dataset

from synthq_hf.endpoint import EndpointConfig
from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe
from synthq_hf.stages.synthesize_from_scratch import (
    PRESETS,
    TemplateError,
    render_user_prefix,
    resolve_prefix,
    synthesize_from_scratch,
)

# Minimal templates of three families, written for the tests (they keep each family's turn markers).
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DEEPSEEK = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
NO_USER_TURN = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def config(url: str, tmp_path: Path, **more) -> EndpointConfig:
    return EndpointConfig(url=url, cache_path=str(tmp_path / "c.sqlite"), backoff_s=0.01, **more)


def run_rows(cfg: EndpointConfig, n: int = 3, **kwargs) -> list[dict]:
    ds = Dataset.from_dict({"id": [str(i) for i in range(n)]})
    return ds.map(synthesize_from_scratch, fn_kwargs={"endpoint": cfg, **kwargs}, load_from_cache_file=False).to_list()


def completions(stub) -> list[dict]:
    return [p for route, p in stub.requests if route in ("/v1/completions", "/generate")]


def test_a_preset_is_sent_as_the_raw_prompt_with_its_stop_and_the_papers_sampling(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    stub.seeded_replies = stub.varied_text = True
    rows = run_rows(config(stub.url, tmp_path), template="qwen")
    sent = completions(stub)
    assert [p["prompt"] for p in sent] == [PRESETS["qwen"].text] * 3
    assert sent[0]["prompt"].endswith("<|im_start|>user\n") and "You are a helpful assistant." in sent[0]["prompt"]
    assert all(p["stop"] == ["<|im_end|>"] for p in sent)
    assert (sent[0]["temperature"], sent[0]["top_p"], sent[0]["max_tokens"]) == (1.0, 0.99, 1024)
    assert len({p["seed"] for p in sent}) == 3  # one seeded sample per row
    assert len({r["prompt"] for r in rows}) == 3 and all(r["prefix_source"] == "preset:qwen" for r in rows)
    again = run_rows(config(stub.url, tmp_path), template="qwen")  # the same seeds: answered by the cache
    assert again == rows and len(completions(stub)) == 3


def test_tgi_gets_generate_with_stop_and_single_line_adds_a_newline(make_stub, tmp_path) -> None:
    stub = make_stub("tgi")
    run_rows(config(stub.url, tmp_path), n=1, template="llama3", single_line=True)
    (sent,) = completions(stub)
    assert sent["inputs"] == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    assert sent["parameters"]["stop"] == ["<|eot_id|>", "\n"]
    assert sent["parameters"]["max_new_tokens"] == 1024


@pytest.mark.parametrize(
    ("dialect", "template", "prefix", "stop"),
    [
        ("vllm", CHATML_WITH_DEFAULT_SYSTEM, PRESETS["qwen"].text, ("<|im_end|>",)),
        ("tgi", LLAMA3, "<s><|start_header_id|>user<|end_header_id|>\n\n", ("<|eot_id|>",)),
        ("llama-server", DEEPSEEK, "<s>User: ", ("\n\nAssistant:",)),
    ],
)
def test_auto_reads_the_servers_own_template(dialect, template, prefix, stop, make_stub, tmp_path) -> None:
    stub = make_stub(dialect)
    stub.chat_template = template
    rows = run_rows(config(stub.url, tmp_path), n=2)
    sent = completions(stub)
    assert sent[0]["prompt" if dialect != "tgi" else "inputs"] == prefix
    found = asyncio.run(resolve_prefix(config(stub.url, tmp_path)))
    assert found.text == prefix and found.stop == stop
    assert all(r["prefix_source"] == "server" for r in rows)


def test_a_local_tokenizer_config_gives_the_prefix(tmp_path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(
        json.dumps(
            {"chat_template": DEEPSEEK, "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
        )
    )
    found = asyncio.run(resolve_prefix(EndpointConfig(url="unused"), tokenizer_config=str(tmp_path)))
    assert found.text == "<｜begin▁of▁sentence｜>User: "
    assert found.stop == ("\n\nAssistant:", "<｜end▁of▁sentence｜>")
    assert found.source == "tokenizer_config"


def test_a_template_without_a_user_turn_is_one_line() -> None:
    with pytest.raises(TemplateError, match="has no user turn") as info:
        render_user_prefix(NO_USER_TURN)
    assert "\n" not in str(info.value)


def test_cut_or_empty_completions_are_row_errors(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    stub.queue(("finish", "length", "What is the"), "   ", "Why is the sky blue?")
    rows = run_rows(config(stub.url, tmp_path), template="chatml")
    errors = sorted(r["synthesize_from_scratch_error"] or "" for r in rows)
    assert errors[0] == ""  # the one good row
    assert "cut at max_tokens=1024" in errors[1] + errors[2] and "wrote nothing" in errors[1] + errors[2]
    assert sorted(r["prompt"] or "" for r in rows)[-1] == "Why is the sky blue?"


def recipe_file(tmp_path: Path, url: str, **stage) -> Path:
    data = {
        "name": "from-scratch",
        "cache_path": str(tmp_path / "c.sqlite"),
        "endpoints": {"generator": {"url": url, "backoff_s": 0.01}},
        "datasets": {"questions": {"source": {"generate": 5}, "stages": {"synthesize_from_scratch": stage}}},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def synthq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "synthq_hf.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_generated_rows_become_questions_in_a_recipe(make_stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "cache"))
    stub = make_stub("openai")
    stub.seeded_replies = stub.varied_text = True
    data = yaml.safe_load(recipe_file(tmp_path, stub.url, template="chatml").read_text())
    out = run_recipe(build_recipe(data), limit=4)
    rows = load_dataset(str(out), "questions", split="train")
    assert rows["id"] == ["0", "1", "2", "3"] and all(q.endswith("?") for q in rows["prompt"])


@pytest.mark.parametrize(
    ("case", "culprit"),
    [
        (
            "chat-only API",
            "has no raw-completion route: synthesize_from_scratch needs /v1/completions or TGI /generate",
        ),
        ("no user turn", "the chat template has no user turn"),
        ("no template exposed", "does not expose its chat template; set template:"),
        ("unknown preset", "unknown template 'mistral'"),
    ],
)
def test_refusals_are_one_line(case, culprit, make_stub, tmp_path) -> None:
    stub = make_stub("vllm" if case == "no user turn" else "openai")
    stub.completions_route = case != "chat-only API"
    stub.chat_template = NO_USER_TURN
    stage = {"chat-only API": {"template": "chatml"}, "unknown preset": {"template": "mistral"}}.get(case, {})
    result = synthq(tmp_path, "run", str(recipe_file(tmp_path, stub.url, **stage)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1 and culprit in lines[0], result.stderr
