"""tag_instruction against the stub server: the tags as columns, the ordered labels and the marking that routes
rows by them, bad bounds refused before a run, failures kept as rejected rows, and the bundled magpie recipe end to
end (generator, judge and guard all stubs)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from datasets import Dataset, load_dataset

from synthq_hf import stages
from synthq_hf.recipes import load_recipe
from synthq_hf.recipes.recipe import RECIPE_DIR, build_recipe
from synthq_hf.recipes.runner import run_recipe
from synthq_hf.stages.tag_instruction import CATEGORIES, DIFFICULTY, QUALITY, STAGE, mark_tags, tag_instruction

datasets.disable_progress_bars()

TAGS = {
    "intent": "The user wants a packing list for a winter hike.",
    "task_category": "planning",
    "difficulty": "easy",
    "quality_explanation": "Clear goal, but the length of the hike is not given.",
    "input_quality": "average",
}


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))


def chat_payloads(stub) -> list[dict]:
    return [payload for route, payload in stub.requests if route == "/v1/chat/completions"]


def recipe(url: str, tmp_path: Path, tags: dict, judge_url: str | None = None, rows: int = 8) -> dict:
    """Queries written from nothing by the generator, then tagged by the judge (the generator when none)."""
    endpoints = {"generator": {"url": url, "backoff_s": 0.01, "timeout_s": 10}}
    if judge_url:
        endpoints["judge"] = {"url": judge_url, "backoff_s": 0.01, "timeout_s": 10}
    return {
        "name": "tags",
        "seed": 0,
        "cache_path": str(tmp_path / "cache.sqlite"),
        "endpoints": endpoints,
        "datasets": {
            "queries": {
                "source": {"generate": rows},
                "stages": {"synthesize_from_scratch": {"template": "llama3"}, STAGE: tags},
            }
        },
        "output": {"dir": str(tmp_path / "out")},
    }


def test_the_tags_become_columns_from_one_constrained_request(stub, make_config) -> None:
    stub.queue(json.dumps(TAGS))
    rows = Dataset.from_dict({"id": ["q1"], "prompt": ["What should I pack for a winter hike?"]})
    features = stages.output_features(rows.features, tag_instruction)
    out = rows.map(tag_instruction, fn_kwargs={"endpoint": make_config(stub.url)}, features=features)
    assert out[0] == {"id": "q1", "prompt": "What should I pack for a winter hike?", **TAGS, f"{STAGE}_error": None}
    (payload,) = chat_payloads(stub)
    schema = payload["response_format"]["json_schema"]["schema"]["properties"]
    assert schema["input_quality"]["enum"] == list(QUALITY)  # the decoder can only write one of the labels
    assert schema["difficulty"]["enum"] == list(DIFFICULTY)
    assert schema["task_category"]["enum"] == list(CATEGORIES)
    assert "What should I pack for a winter hike?" in payload["messages"][-1]["content"]
    assert "planning" in payload["messages"][0]["content"]  # the categories are listed to the tagger


def test_the_labels_are_ordered_worst_and_easiest_first() -> None:
    assert QUALITY == ("very poor", "poor", "average", "good", "excellent")
    assert DIFFICULTY == ("very easy", "easy", "medium", "hard", "very hard")


@pytest.mark.parametrize(
    ("quality", "difficulty", "bounds", "reason"),
    [
        ("poor", "easy", {}, "tag_instruction: input_quality poor < average"),
        ("very poor", "easy", {"min_quality": "poor"}, "tag_instruction: input_quality very poor < poor"),
        ("average", "easy", {}, None),
        ("excellent", "very hard", {"min_quality": "good"}, None),
        ("poor", "easy", {"min_quality": None}, None),
        ("good", "very hard", {"max_difficulty": "hard"}, "tag_instruction: difficulty very hard > hard"),
        ("good", "very easy", {"min_difficulty": "easy"}, "tag_instruction: difficulty very easy < easy"),
        ("good", "medium", {"min_difficulty": "medium", "max_difficulty": "medium"}, None),
    ],
)
def test_rows_outside_the_bounds_are_rejected_with_the_reason(quality, difficulty, bounds, reason) -> None:
    row = {"prompt": "p", **TAGS, "input_quality": quality, "difficulty": difficulty, f"{STAGE}_error": None}
    assert mark_tags(row, **bounds) == {"rejected_by": STAGE if reason else None, "reason": reason}


def test_a_run_keeps_exactly_the_rows_at_or_above_min_quality(make_stub, tmp_path) -> None:
    generator, judge = make_stub("openai"), make_stub("openai")
    generator.seeded_replies = generator.varied_text = True
    judge.seeded_replies = True  # each row's labels drawn by its seed, as a sampling tagger would
    out = run_recipe(build_recipe(recipe(generator.url, tmp_path, {"min_quality": "good"}, judge.url)))
    queries = load_dataset(str(out), "queries")
    kept, rejected = queries["train"], queries["rejected"]
    assert kept.num_rows + rejected.num_rows == 8 and kept.num_rows and rejected.num_rows
    assert set(kept["input_quality"]) <= {"good", "excellent"}
    for row in rejected:
        assert row["rejected_by"] == STAGE
        assert row["reason"] == f"tag_instruction: input_quality {row['input_quality']} < good"
    assert all(row["difficulty"] in DIFFICULTY and row["intent"] for row in queries["train"])
    assert len(chat_payloads(judge)) == 8 and not chat_payloads(generator)  # endpoint role: the judge


@pytest.mark.parametrize(
    ("tags", "word"),
    [
        ({"min_quality": "great"}, "'great'"),
        ({"max_difficulty": "impossible"}, "'impossible'"),
        ({"min_difficulty": "hard", "max_difficulty": "easy"}, "above max_difficulty"),
    ],
)
def test_an_unknown_label_is_one_line_before_any_request(make_stub, tmp_path, tags, word) -> None:
    stub = make_stub("openai")
    with pytest.raises(ValueError) as info:
        run_recipe(build_recipe(recipe(stub.url, tmp_path, tags)))
    assert word in str(info.value) and "\n" not in str(info.value)
    assert stub.requests == [] and not (tmp_path / "out").exists()


def test_a_failed_request_is_a_row_error_and_the_row_is_rejected(make_stub, tmp_path) -> None:
    generator, judge = make_stub("openai"), make_stub("openai")
    judge.queue(*[("status", 400, "context length exceeded")] * 3)
    out = run_recipe(build_recipe(recipe(generator.url, tmp_path, {}, judge.url, rows=1)))
    queries = load_dataset(str(out), "queries")
    assert "train" not in queries  # an untagged query is not kept
    (row,) = queries["rejected"]
    assert row["rejected_by"] == STAGE and "HTTP 400" in row["reason"]
    assert row[f"{STAGE}_error"] == row["reason"] and row["input_quality"] is None and row["prompt"]


def test_an_earlier_failure_keeps_its_own_reason_and_costs_no_tag_request(make_stub, tmp_path) -> None:
    generator, judge = make_stub("openai"), make_stub("openai")
    generator.queue(("finish", "length", "a question that never"))  # cut off: no prompt for this row
    out = run_recipe(build_recipe(recipe(generator.url, tmp_path, {}, judge.url, rows=1)))
    (row,) = load_dataset(str(out), "queries")["rejected"]
    assert row["rejected_by"] == "synthesize_from_scratch" and "max_tokens" in row["reason"]
    assert chat_payloads(judge) == []


def magpie_on_stubs(url: str, guard_url: str, tmp_path: Path, rows: int) -> dict:
    """The bundled recipe as written, with every endpoint a stub, the tiny reward model and a few rows."""
    data = yaml.safe_load((RECIPE_DIR / "magpie.yaml").read_text(encoding="utf-8"))
    for role, spec in data["endpoints"].items():
        spec.update(url=guard_url if role == "guard" else url, backoff_s=0.01, timeout_s=10)
    spec = data["datasets"]["magpie"]
    spec["source"]["generate"] = rows
    spec["stages"]["annotate_preference"].update(model="bundled:tiny-reward", trust_remote_code=False)
    data["cache_path"] = str(tmp_path / "cache.sqlite")
    data["output"]["dir"] = str(tmp_path / "out")
    return data


def test_the_bundled_magpie_recipe_runs_end_to_end(make_stub, tmp_path) -> None:
    assert load_recipe("magpie").datasets["magpie"].stages[STAGE] == {"endpoint": "judge", "min_quality": "average"}
    stub, guard = make_stub("openai"), make_stub("openai")
    stub.seeded_replies = stub.varied_text = True  # queries, tags and answers of their own per row
    guard.queue(*["safe"] * 6)  # Llama-Guard's verdict for every moderated query
    out = run_recipe(build_recipe(magpie_on_stubs(stub.url, guard.url, tmp_path, rows=6)))
    magpie = load_dataset(str(out), "magpie")
    kept = magpie["train"]
    rejected = magpie["rejected"] if "rejected" in magpie else []
    assert kept.num_rows + len(rejected) == 6  # every generated row accounted for
    assert kept.num_rows > 0
    for row in kept:
        assert row["prompt"] and row["response"] and isinstance(row["reward"], float)
        assert QUALITY.index(row["input_quality"]) >= QUALITY.index("average") and row["safe"] is True
        assert row["task_category"] in CATEGORIES and row["difficulty"] in DIFFICULTY and row["intent"]
    assert all(row["rejected_by"] == STAGE for row in rejected)  # seeded tags below average, nothing else
    assert {"id", "prompt", "response", "reward", "input_quality", "task_category", "safe"} <= set(kept.column_names)
    assert "best_response" not in kept.column_names and "chosen" not in kept.column_names
    assert len(chat_payloads(guard)) == kept.num_rows  # only queries that passed the tags are moderated
    report = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in report["stages"]][:3] == ["synthesize_from_scratch", STAGE, "moderate"]
    assert (out / "README.md").is_file()
