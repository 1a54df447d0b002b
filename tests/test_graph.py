"""The recipe runner as a graph of named datasets: sources (file, another dataset, generated rows), stages in the
written order (global ones included), shaped configs, and the preference pairs built on it (stub server + the
tiny reward model built here)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import datasets
import pytest
import yaml
from datasets import load_dataset

from synthq_hf.cache import get_cache
from synthq_hf.recipes import RecipeError, bundled_recipes
from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe

datasets.disable_progress_bars()
KEYWORDS = json.dumps({"intention": "group rows", "keywords": ["pandas groupby", "average"]})


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "synthq-cache"))  # index, reward cache, tiny model


def graph(url: str, tmp_path: Path, instructions: dict, **more: dict) -> dict:
    return {
        "name": "graph",
        "cache_path": str(tmp_path / "cache.sqlite"),
        "endpoints": {"generator": {"url": url, "backoff_s": 0.01, "timeout_s": 10}},
        "datasets": {
            "demonstrations": {
                "source": {"dataset": "bundled:seeds", "text_column": "prompt", "as": "prompt", "limit": 3},
                "stages": {"extract_keywords": {}, "search_documents": {}, "ground": {}},
            },
            "instructions": {
                "source": {"dataset": "bundled:corpus", "text_column": "text", "as": "document", "limit": 6},
                "stages": instructions,
            },
            **more,
        },
        "output": {"dir": str(tmp_path / "out")},
    }


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PREFERENCES = {
    "source": {"from": "instructions"},
    "stages": {"generate_responses": {"n": 3}, "annotate_preference": {"model": "bundled:tiny-reward"}},
    "rename": {"prompt": "instruction"},
    "columns": ["id", "instruction", "chosen", "rejected", "reward_margin", "rewards", "responses", "chosen_index",
                "rejected_index", "generate_responses_error", "annotate_preference_error"],
}  # fmt: skip


def rewards_cached(tmp_path: Path) -> int:
    path = tmp_path / "synthq-cache" / "rewards.sqlite"
    get_cache(path).flush()  # scores are queued and committed by a background thread: count what is durable
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def test_preference_pairs_are_dpo_ready_and_a_rerun_asks_and_scores_nothing(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    stub.queue(*[KEYWORDS] * 3)
    stub.seeded_replies = stub.varied_text = True  # every sampled response its own seeded sentence
    data = graph(stub.url, tmp_path, {"generate_instruction": {"k": 2}}, preferences=PREFERENCES)
    out = run_recipe(build_recipe(data))
    report = json.loads((out / "run.json").read_text())
    assert (
        report["counts"]["preferences"]["train"] + report["counts"]["preferences"]["rejected"]
        == (report["counts"]["instructions"]["train"])
    )
    pairs = load_dataset(str(out), "preferences", split="train")
    assert pairs.num_rows > 0
    assert "prompt" not in pairs.column_names  # TRL reads the prompt from inside chosen/rejected
    instructions = {r["id"]: r["prompt"] for r in load_dataset(str(out), "instructions", split="train")}
    for row in pairs:
        assert [m["role"] for m in row["chosen"]] == ["user", "assistant"] == [m["role"] for m in row["rejected"]]
        assert row["chosen"][0]["content"] == row["rejected"][0]["content"] == instructions[row["id"]]
        assert row["instruction"] == instructions[row["id"]]
        assert row["chosen"][1]["content"] == row["responses"][row["chosen_index"]]
        assert row["rejected"][1]["content"] == row["responses"][row["rejected_index"]]
        rewards = row["rewards"]
        assert rewards[row["chosen_index"]] == max(rewards) and rewards[row["rejected_index"]] == min(rewards)
        assert row["reward_margin"] == pytest.approx(max(rewards) - min(rewards))
    assert report["reward_model"] == "bundled:tiny-reward" and report["pairing"] == "best_worst"
    card = (out / "README.md").read_text()
    assert "## Preference pairs" in card and "bundled:tiny-reward" in card
    assert (out / "assets" / "reward_margin.png").is_file()

    sent, scored = len(stub.requests), rewards_cached(tmp_path)
    again = run_recipe(build_recipe(data))  # the same recipe into the same folder: a resume
    assert len(stub.requests) == sent  # every response from the request cache
    assert rewards_cached(tmp_path) == scored  # every reward from the reward cache
    assert load_dataset(str(again), "preferences", split="train").to_list() == pairs.to_list()


def test_identical_responses_go_to_rejected_with_the_reason(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    stub.queue(*[KEYWORDS] * 3)  # free text is "stub reply" for every sample: no pair can be made
    data = graph(stub.url, tmp_path, {"generate_instruction": {"k": 2}}, preferences=PREFERENCES)
    out = run_recipe(build_recipe(data))
    rejected = load_dataset(str(out), "preferences", split="rejected")
    assert rejected.num_rows == json.loads((out / "run.json").read_text())["counts"]["instructions"]["train"]
    assert set(rejected["rejected_by"]) == {"annotate_preference"}
    assert all("responses are the same text" in reason for reason in rejected["reason"])
    assert all(row["instruction"] for row in rejected)  # a rejected row still names its instruction


def test_a_failed_response_rejects_the_row_with_its_reason(make_stub, tmp_path) -> None:
    stub, responder = make_stub("openai"), make_stub("openai")
    stub.queue(*[KEYWORDS] * 3)
    responder.fault_rate, responder.fault_sleep_s = 1.0, 1.0  # every sample refused, reset, broken or too slow
    prefs = {**PREFERENCES, "stages": {**PREFERENCES["stages"], "generate_responses": {"endpoint": "responder"}}}
    data = graph(stub.url, tmp_path, {"generate_instruction": {"k": 2}}, preferences=prefs)
    data["endpoints"]["responder"] = {"url": responder.url, "max_retries": 0, "timeout_s": 0.5}
    out = run_recipe(build_recipe(data))
    rejected = load_dataset(str(out), "preferences", split="rejected")
    assert rejected.num_rows == json.loads((out / "run.json").read_text())["counts"]["instructions"]["train"] > 0
    assert set(rejected["rejected_by"]) == {"generate_responses"}
    assert all(reason.startswith("generate_responses: sample ") for reason in rejected["reason"])
    assert rejected["annotate_preference_error"] == [None] * rejected.num_rows  # the reason is the earlier one


def test_a_global_stage_runs_where_the_recipe_puts_it(make_stub, tmp_path) -> None:
    """dedup before score_instruction: the stub writes the same instruction for every document, so dedup keeps
    one and only that one is scored (a runner that ran global stages last would score all six)."""
    stub = make_stub("openai")
    stub.queue(*[KEYWORDS] * 3)
    stages = {"generate_instruction": {"k": 2}, "dedup": {}, "score_instruction": {}}
    out = run_recipe(build_recipe(graph(stub.url, tmp_path, stages)))
    scored = [p for _, p in stub.requests if "specificity" in json.dumps(p.get("response_format", {}))]
    assert len(scored) == 1
    report = json.loads((out / "run.json").read_text())
    table = [(s["dataset"], s["name"], s["in"], s["out"]) for s in report["stages"] if s["dataset"] == "instructions"]
    assert table == [
        ("instructions", "generate_instruction", 6, 6),
        ("instructions", "dedup", 6, 1),
        ("instructions", "score_instruction", 1, 1),
    ]
    splits = load_dataset(str(out), "instructions")
    assert splits["train"].num_rows == 1 and splits["rejected"].num_rows == 5
    assert set(splits["rejected"]["rejected_by"]) == {"dedup"}
    assert splits["train"][0]["total_score"] is not None


def test_generated_rows_and_the_limit_of_the_main_input(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    data = {
        "name": "made",
        "endpoints": {"generator": {"url": stub.url}},
        "datasets": {"made": {"source": {"generate": 5}, "stages": {"filter": {"threshold": None}}}},
        "output": {"dir": str(tmp_path / "out")},
    }
    out = run_recipe(build_recipe(data), limit=3)
    rows = load_dataset(str(out), "made", split="train")
    assert rows["id"] == ["0", "1", "2"]


def test_columns_naming_nothing_is_refused_before_the_folder_is_touched(make_stub, tmp_path) -> None:
    stub = make_stub("openai")
    prefs = {**PREFERENCES, "columns": ["id", "instruction", "chosen", "score_chosen"]}
    data = graph(stub.url, tmp_path, {"generate_instruction": {}}, preferences=prefs)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"datasets\.preferences\.columns: no stage makes score_chosen") as info:
        run_recipe(build_recipe(data))
    assert "\n" not in str(info.value)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert stub.requests == []


def stub_overrides(name: str, url: str, tmp_path: Path, guard_url: str, judge_url: str) -> dict:
    """A bundled recipe pointed at the stub (Llama-Guard's role at ``guard_url``, the solvability judge at
    ``judge_url``), local data for Hub inputs, the tiny reward model."""
    from synthq_hf.recipes.recipe import RECIPE_DIR

    data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    for role, spec in data["endpoints"].items():
        spec.update(url=guard_url if role == "guard" and guard_url else url, backoff_s=0.01, timeout_s=10)
    for spec in data["datasets"].values():
        source = spec["source"]
        if "dataset" in source and not source["dataset"].startswith("bundled:"):
            source.update(dataset="bundled:corpus", text_column="text", config=None)
        source["limit"] = min(source.get("limit") or 3, 3)
        stages = spec["stages"]
        if "annotate_preference" in stages:
            stages["annotate_preference"].update(model="bundled:tiny-reward", trust_remote_code=False)
        if "balance_topics" in stages:
            stages["balance_topics"].update(target_size=2, n_topics=1)
        if "evolve_instruction" in stages:  # the stub's free text is 12 words: under the paper's 80
            stages["evolve_instruction"]["min_response_words"] = 5
        if "filter_questions" in stages:
            stages["filter_questions"]["endpoint"] = "judge"
            data["endpoints"]["judge"] = {"url": judge_url, "backoff_s": 0.01, "timeout_s": 10}
    data["search"] = {"backend": "bm25", "index": None} if "search" in data else data.get("search")
    data["cache_path"] = str(tmp_path / "cache.sqlite")
    data["output"]["dir"] = str(tmp_path / "out")
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_runs_end_to_end_against_the_stub(name, make_stub, tmp_path) -> None:
    stub, guard, judge = make_stub("vllm"), make_stub("openai"), make_stub("openai")
    stub.chat_template = CHATML  # served for `template: auto`
    stub.seeded_replies = stub.varied_text = True
    guard.queue(*["safe"] * 100)  # Llama-Guard's verdict for every moderated row
    judge.queue(*["It can be solved.\nYes"] * 100)  # the solvability judge's verdict
    recipe = build_recipe(stub_overrides(name, stub.url, tmp_path, guard.url, judge.url))
    out = run_recipe(recipe)
    report = json.loads((out / "run.json").read_text())
    assert list(report["counts"]) == list(recipe.datasets)
    for dataset, spec in recipe.datasets.items():
        counts = report["counts"][dataset]
        if spec.source.from_ is not None:  # every kept row of the source ends up in this config, kept or not
            assert counts["train"] + counts["rejected"] == report["counts"][spec.source.from_]["train"]
    assert sum(c["train"] for c in report["counts"].values()) > 0  # rows made it through, not only rejections
    assert (out / "README.md").is_file()
