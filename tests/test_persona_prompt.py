"""persona_prompt against the stub server: each kind's task sent with the persona, one line for an unknown kind, a
row error for an empty persona, seeded requests, and the bundled ``persona`` recipe end to end."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset, load_dataset

from synthq_hf import stages
from synthq_hf.endpoint import derive_seed
from synthq_hf.inputs import check_jsonl, open_dataset, resolve_source
from synthq_hf.recipes import load_recipe
from synthq_hf.recipes.runner import run_recipe
from synthq_hf.stages.persona_prompt import KINDS, STAGE, persona_prompt

datasets.disable_progress_bars()

PERSONAS = [
    "A lighthouse keeper on a remote Norwegian island who repairs diesel generators.",
    "A pastry chef in Lyon experimenting with sugar-free macarons.",
]


def chat_payloads(stub) -> list[dict]:
    return [payload for route, payload in stub.requests if route == "/v1/chat/completions"]


def run(rows: Dataset, config, **kwargs) -> Dataset:
    features = stages.output_features(rows.features, persona_prompt)
    return rows.map(persona_prompt, fn_kwargs={"endpoint": config, **kwargs}, features=features)


def test_each_kind_sends_its_own_task_with_the_persona(stub, make_config) -> None:
    rows = Dataset.from_dict({"id": ["lk"], "persona": PERSONAS[:1]})
    sent = {}
    for kind in KINDS:
        stub.queue(json.dumps({"prompt": f"  My {kind} message.  "}))
        row = run(rows, make_config(stub.url), kind=kind)[0]
        assert row == {**rows[0], "prompt": f"My {kind} message.", "persona_kind": kind, "persona_prompt_error": None}
        payload = chat_payloads(stub)[-1]
        assert "prompt" in json.dumps(payload["response_format"])  # the pydantic model's schema constrains it
        user = payload["messages"][-1]["content"]
        assert PERSONAS[0] in user
        sent[kind] = user
    assert len(set(sent.values())) == len(KINDS)  # the task differs by kind, the persona is the same
    system = {p["messages"][0]["content"] for p in chat_payloads(stub)}
    assert len(system) == 1  # one role for every kind: only the task changes


def test_an_unknown_kind_is_one_line_before_any_request(stub, make_config, tmp_path, monkeypatch) -> None:
    rows = Dataset.from_dict({"persona": PERSONAS})
    with pytest.raises(ValueError, match=r"^persona_prompt: unknown kind 'poem'; use one of instruction, math, know"):
        run(rows, make_config(stub.url), kind="poem")
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    overrides = [f"endpoints.generator.url={stub.url}", "datasets.math.stages.persona_prompt.kind=poem"]
    with pytest.raises(ValueError, match="unknown kind 'poem'") as info:
        run_recipe(load_recipe("persona", overrides), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert stub.requests == [] and not (tmp_path / "out").exists()  # refused before the folder or a request


def test_an_empty_persona_is_a_row_error_and_costs_no_request(stub, make_config) -> None:
    rows = Dataset.from_dict({"id": ["a", "b", "c", "d"], "who": [PERSONAS[0], "", None, "  \n"]})
    out = run(rows, make_config(stub.url), kind="math", column="who")
    assert out[0]["prompt"] == "ok" and out[0]["persona_kind"] == "math" and out[0]["persona_prompt_error"] is None
    for row in out.select(range(1, 4)):
        assert row["prompt"] is None and row["persona_kind"] is None
        assert row["persona_prompt_error"] == "persona_prompt: empty or missing persona"
    assert len(chat_payloads(stub)) == 1


def test_a_reply_that_never_validates_is_kept_as_a_row_error(stub, make_config) -> None:
    stub.queue("Sure! Here is a question.", json.dumps({"prompt": "   "}), json.dumps({"text": "x"}))
    row = run(Dataset.from_dict({"persona": PERSONAS[:1]}), make_config(stub.url))[0]
    assert row["prompt"] is None and row["persona_kind"] is None
    assert row["persona_prompt_error"].startswith("persona_prompt: reply does not match the schema")
    assert "(after 3 attempts)" in row["persona_prompt_error"]
    assert len({p["seed"] for p in chat_payloads(stub)}) == 3  # each attempt with its own seed


def test_the_run_seed_decides_the_requests(stub, make_config, tmp_path) -> None:
    stub.seeded_replies = stub.varied_text = True
    rows = Dataset.from_dict({"id": ["a", "b"], "persona": PERSONAS})

    def requests_and_prompts(seed: int, cache: str) -> tuple[list[dict], list[str]]:
        before = len(chat_payloads(stub))
        out = run(rows, make_config(stub.url, seed=seed, cache_path=str(tmp_path / cache)), kind="knowledge")
        payloads = sorted(chat_payloads(stub)[before:], key=lambda p: p["seed"])
        return payloads, out["prompt"]

    first, first_prompts = requests_and_prompts(7, "one.sqlite")
    again, again_prompts = requests_and_prompts(7, "two.sqlite")  # a fresh cache: the requests are sent again
    assert first == again and first_prompts == again_prompts
    assert {p["seed"] for p in first} == {derive_seed(7, STAGE, rid) for rid in ("a", "b")}
    assert all(p["temperature"] == 0.7 and p["max_tokens"] == 512 for p in first)
    other, other_prompts = requests_and_prompts(8, "three.sqlite")
    assert {p["seed"] for p in other}.isdisjoint(p["seed"] for p in first) and other_prompts != first_prompts


def test_the_bundled_personas_resolve_and_are_distinct() -> None:
    path = resolve_source("bundled:personas")
    assert check_jsonl(path, text_column="persona") >= 25
    rows = open_dataset("bundled:personas", text_column="persona")
    assert len(set(rows["id"])) == len(rows) and len(set(rows["persona"])) == len(rows)
    assert all(len(p.split()) >= 8 for p in rows["persona"])  # a description, not a job title


def test_the_bundled_recipe_runs_end_to_end_against_the_stub(stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    recipe = load_recipe("persona")
    assert recipe.endpoints["generator"].url == "local"
    assert {name: spec.stages["persona_prompt"]["kind"] for name, spec in recipe.datasets.items()} == {
        "instructions": "instruction",
        "math": "math",
    }
    stub.seeded_replies = stub.varied_text = True
    overrides = [
        f"endpoints.generator.url={stub.url}",
        "endpoints.generator.backoff_s=0.01",
        f"cache_path={tmp_path / 'cache.sqlite'}",
        f"output.dir={tmp_path / 'out'}",
    ]
    out = run_recipe(load_recipe("persona", overrides))
    personas = open_dataset("bundled:personas", text_column="persona").select(range(4))
    report = json.loads((out / "run.json").read_text())
    assert list(report["counts"]) == ["instructions", "math"]
    assert STAGE in report["prompt_hashes"]
    for config, kind in (("instructions", "instruction"), ("math", "math")):
        kept = load_dataset(str(out), config, split="train")
        assert report["counts"][config] == {"train": 4, "rejected": 0}  # seeded replies: no duplicate to drop
        assert set(kept["persona_kind"]) == {kind} and all(kept["prompt"])
        assert kept["id"] == personas["id"]
    users = [p["messages"][-1]["content"] for p in chat_payloads(stub)]
    assert len(users) == 8 and len(set(users)) == 8  # two datasets from one source: each persona asked twice
    assert all(sum(persona in u for u in users) == 2 for persona in personas["persona"])


def test_duplicate_prompts_go_to_rejected_with_the_reason(stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    overrides = [f"endpoints.generator.url={stub.url}", f"cache_path={tmp_path / 'cache.sqlite'}"]
    out = run_recipe(load_recipe("persona", overrides), tmp_path / "out")  # every reply the same: {"prompt": "ok"}
    rejected = load_dataset(str(out), "instructions", split="rejected")
    assert load_dataset(str(out), "instructions", split="train")["prompt"] == ["ok"]
    assert len(rejected) == 3 and set(rejected["rejected_by"]) == {"dedup"} and all(rejected["reason"])
