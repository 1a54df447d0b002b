"""Recipes: loading and its one-line errors, and whole runs against the stub server (schema-valid replies)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import load_dataset

from synthq_hf.cli import main
from synthq_hf.recipes import RecipeError, bundled_recipes, load_recipe
from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe

datasets.disable_progress_bars()


def recipe_data(url: str, tmp_path: Path, **changes) -> dict:
    data = {
        "name": "test",
        "seed": 0,
        "cache_path": str(tmp_path / "cache.sqlite"),
        "endpoints": {"generator": {"url": url, "backoff_s": 0.01, "timeout_s": 10}},
        "seeds": {"dataset": "bundled:seeds", "text_column": "prompt", "limit": 3},
        "corpus": {"dataset": "bundled:corpus", "text_column": "text", "streaming": True, "limit": 5},
        "search": {"backend": "bm25", "index": None},
        "demonstrations": {"extract_keywords": {}, "search_documents": {}, "ground": {}},
        "instructions": {
            "generate_instruction": {"k": 2, "token_budget": 4000},
            "score_instruction": {},
            "filter": {"threshold": 3},
        },
        "output": {"dir": str(tmp_path / "out")},
    }
    data.update(changes)
    return data


KEYWORDS = json.dumps({"intention": "group rows", "keywords": ["pandas groupby", "average"]})


def stub_for_run(make_stub, seeds: int = 3):
    """A stub whose first replies are the seeds' keywords (the demonstrations run first), so search finds
    bundled documents; every later reply is the smallest schema-valid object."""
    stub = make_stub("openai")
    stub.queue(*[KEYWORDS] * seeds)
    return stub


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "synthq-cache"))  # the demo index is built in here


# --- loading ---------------------------------------------------------------------------------------------------


def test_bundled_recipes_load_and_overrides_reach_the_fields() -> None:
    recipe = load_recipe(
        "demo",
        [
            "datasets.instructions.source.limit=2",
            "endpoints.generator.url=http://x:1",
            "datasets.instructions.stages.filter.threshold=5",
        ],
    )
    assert list(recipe.datasets) == ["demonstrations", "instructions", "preferences"]
    instructions = recipe.datasets["instructions"]
    assert instructions.source.limit == 2
    assert recipe.endpoints["generator"].url == "http://x:1"
    assert instructions.stages["filter"] == {"threshold": 5}
    assert list(instructions.stages) == ["generate_instruction", "score_instruction", "filter", "dedup"]
    assert recipe.datasets["preferences"].source.from_ == "instructions"
    assert recipe.main == "instructions"
    synthquestions = load_recipe("synthquestions")
    assert synthquestions.datasets["instructions"].source.streaming is True
    assert "preferences" not in load_recipe("synthquestions", ["datasets.preferences=false"]).datasets


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["datasets.instructions.source.limitt=3"],
            "unknown key datasets.instructions.source.limitt; valid keys: dataset, text_column",
        ),
        (
            ["datasets.instructions.stages.score_instruction.thresh=3"],
            "unknown parameter datasets.instructions.stages.score_instruction.thresh",
        ),
        (["datasets.instructions.stages.rank=1"], "unknown stage datasets.instructions.stages.rank"),
        (["datasets.instructions.stages.score_instruction.endpoint=guard"], "needs endpoints.guard"),
        (["corpus.limit=3"], "'corpus' is a key of the older recipe form; this recipe lists datasets"),
        (["datasets.preferences.source.from=nowhere"], "'nowhere' is not a dataset listed before 'preferences'"),
        (
            ["datasets.instructions.stages.generate_instruction.demonstrations=preferences"],
            "'preferences' is not a dataset listed before 'instructions'",
        ),
        (["datasets.preferences.source.dataset=x.jsonl"], "needs exactly one of dataset, from, generate"),
        (["nonsense"], "--set expects KEY=VALUE"),
        (["endpoints.generator.dialect=grpc"], "unknown dialect 'grpc'"),
    ],
)
def test_recipe_mistakes_are_one_line(overrides, message) -> None:
    with pytest.raises(RecipeError, match=message.replace(".", r"\.").replace("(", r"\(")) as info:
        load_recipe("demo", overrides)
    assert "\n" not in str(info.value)


def test_unknown_recipe_lists_the_bundled_ones(capsys) -> None:
    assert main(["run", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    listed = ", ".join(bundled_recipes())
    assert {"demo", "synthquestions", "scalequest", "scalequest_demo"} <= set(bundled_recipes())
    assert err.strip() == f"error: unknown recipe 'no-such-recipe'; bundled recipes: {listed}"


def test_yaml_typo_names_the_line(tmp_path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nendpoints:\n  generator: {url: local\nseeds: {}\n", encoding="utf-8")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} line") and "not valid YAML" in err and "\n" not in err


def test_a_stage_can_be_switched_off(tmp_path) -> None:
    data = recipe_data("http://x:1", tmp_path)
    data["instructions"]["score_instruction"] = False
    assert list(build_recipe(data).datasets["instructions"].stages) == ["generate_instruction", "filter"]


# --- runs against the stub server --------------------------------------------------------------------------------


def test_a_run_writes_loadable_configs_and_loses_no_row(make_stub, tmp_path) -> None:
    stub = stub_for_run(make_stub)
    stub.seeded_replies = True  # criteria scores vary with the seed: some rows pass the threshold, some do not
    out = run_recipe(build_recipe(recipe_data(stub.url, tmp_path)))
    instructions = load_dataset(str(out), "instructions")
    assert set(instructions) == {"train", "rejected"}  # seeded scores: some pass the threshold, some do not
    assert instructions["train"].num_rows + instructions["rejected"].num_rows == 5  # every corpus row accounted for
    assert all(score >= 3 for score in instructions["train"]["total_score"])
    assert set(instructions["train"]["rejected_by"]) == {None}
    for row in instructions["rejected"]:
        assert row["rejected_by"] and row["reason"]
    assert {"document", "prompt", "scene", "query_compositions", "demonstration_ids", "scores"} <= set(
        instructions["train"].column_names
    )
    demos = load_dataset(str(out), "demonstrations")
    assert sum(split.num_rows for split in demos.values()) == 3  # an empty rejected split is left out
    assert {"keywords", "document", "scene", "query_compositions"} <= set(demos["train"].column_names)
    report = json.loads((out / "run.json").read_text())
    assert report["counts"]["instructions"] == {
        "train": instructions["train"].num_rows,
        "rejected": instructions["rejected"].num_rows,
    }
    assert [s["name"] for s in report["stages"]] == [
        "extract_keywords",
        "search_documents",
        "ground",
        "generate_instruction",
        "score_instruction",
    ]
    score = report["stages"][-1]
    assert score["in"] == 5 and score["out"] == instructions["train"].num_rows
    assert report["models"] == {"generator": "stub-model"}
    assert report["endpoints"] == {"generator": {"dialect": "openai"}}
    card = (out / "README.md").read_text()
    assert "| generator | stub-model | openai |" in card
    assert "threshold, 3" in card and "(the paper's value" not in card  # the recipe's threshold, recorded
    assert report["usage"]["generate_instruction"]["requests"] == 5


def test_overrides_reach_the_stage_request(make_stub, tmp_path) -> None:
    stub = stub_for_run(make_stub)
    data = recipe_data(stub.url, tmp_path)
    data["instructions"]["generate_instruction"]["max_tokens"] = 123
    data["instructions"]["score_instruction"] = {"temperature": 0.25}
    run_recipe(build_recipe(data))
    payloads = [p for route, p in stub.requests if route == "/v1/chat/completions"]
    generate = [p for p in payloads if "thought" in json.dumps(p.get("response_format", {}))]
    score = [p for p in payloads if "specificity" in json.dumps(p.get("response_format", {}))]
    assert len(generate) == 5 and all(p["max_tokens"] == 123 for p in generate)
    assert len(score) == 5 and all(p["temperature"] == 0.25 for p in score)


def test_the_same_recipe_resumes_and_another_is_refused(make_stub, tmp_path, capsys) -> None:
    stub = stub_for_run(make_stub)
    data = recipe_data(stub.url, tmp_path)
    first = run_recipe(build_recipe(data))
    shards = sorted(p.name for p in (first / "instructions").glob("*.parquet"))
    sent = len(stub.requests)
    again = run_recipe(build_recipe(data))  # same recipe, same folder: resumes from the request cache
    assert sorted(p.name for p in (again / "instructions").glob("*.parquet")) == shards  # same content digests
    assert len([r for r, _ in stub.requests[sent:] if r.startswith("/v1/chat")]) == 0
    other = recipe_data(stub.url, tmp_path, seed=1)
    with pytest.raises(Exception, match="holds another recipe's run; pass --overwrite"):
        run_recipe(build_recipe(other))
    stub.queue(*[KEYWORDS] * 3)  # a new seed: new keyword requests
    run_recipe(build_recipe(other), overwrite=True)


def test_streaming_corpus_is_read_only_as_far_as_the_limit(make_stub, tmp_path) -> None:
    stub = stub_for_run(make_stub)
    corpus = tmp_path / "big.jsonl"
    with corpus.open("w") as fh:
        for i in range(3000):
            fh.write(
                json.dumps({"id": f"d{i}", "text": f"pandas groupby note {i} on the average of topic {i % 7}"}) + "\n"
            )
    data = recipe_data(stub.url, tmp_path)
    data["corpus"] = {"dataset": str(corpus), "streaming": True, "limit": 4}
    data["search"] = {"backend": "bm25", "index": None}
    out = run_recipe(build_recipe(data))
    generate = [p for r, p in stub.requests if "thought" in json.dumps(p.get("response_format", {}))]
    assert len(generate) == 4
    rows = load_dataset(str(out), "instructions")
    assert sum(split.num_rows for split in rows.values()) == 4


def test_an_iterable_corpus_is_consumed_lazily(make_stub, tmp_path) -> None:
    stub = stub_for_run(make_stub)
    pulled: list[int] = []

    def rows():
        for i in range(100_000):
            pulled.append(i)
            yield {"id": f"g{i}", "text": f"generated document {i} on subject {i % 11}"}

    corpus = datasets.IterableDataset.from_generator(rows)
    data = recipe_data(stub.url, tmp_path)
    data["corpus"]["limit"] = 6
    out = run_recipe(build_recipe(data), corpus=corpus)
    assert len(pulled) < 100  # read as far as the limit (plus a small look-ahead), never materialised
    rows_out = load_dataset(str(out), "instructions")
    assert sum(split.num_rows for split in rows_out.values()) == 6


def test_later_stages_plug_in_as_one_line_each(make_stub, tmp_path) -> None:
    """moderate (its own guard endpoint) and dedup (a global stage) join with one recipe line each."""
    stub = stub_for_run(make_stub)  # every generated prompt is the same schema-minimal text: all duplicates
    guard = make_stub("openai")
    guard.queue("safe", "safe", "safe", "unsafe\nS10", "unsafe\nS1,S10")
    data = recipe_data(stub.url, tmp_path)
    data["endpoints"]["guard"] = {"url": guard.url, "backoff_s": 0.01}
    data["instructions"]["moderate"] = {"policy": "drop"}
    data["instructions"]["dedup"] = {}
    out = run_recipe(build_recipe(data))
    rows = load_dataset(str(out), "instructions")
    assert rows["train"].num_rows == 1
    rejected = rows["rejected"]
    assert sorted(rejected["rejected_by"]) == ["dedup", "dedup", "moderate", "moderate"]
    unsafe = [r for r in rejected if r["rejected_by"] == "moderate"]
    assert all(r["reason"].startswith("unsafe: ") and "S10 Hate" in r["reason"] for r in unsafe)
    dups = [r for r in rejected if r["rejected_by"] == "dedup"]
    assert all(r["duplicate_of"] == rows["train"][0]["id"] for r in dups)
    assert guard.count("/v1/chat/completions") == 5
    report = json.loads((out / "run.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert (stages["moderate"]["in"], stages["moderate"]["out"]) == (5, 3)
    assert (stages["dedup"]["in"], stages["dedup"]["out"]) == (3, 1)


def test_rows_rejected_by_the_filter_cost_no_moderation_request(make_stub, tmp_path) -> None:
    stub = stub_for_run(make_stub)
    guard = make_stub("openai")
    data = recipe_data(stub.url, tmp_path)
    data["endpoints"]["guard"] = {"url": guard.url, "backoff_s": 0.01}
    data["instructions"]["filter"] = {"threshold": 8}  # nothing can reach 8 of 7: every row is rejected
    data["instructions"]["moderate"] = {}
    out = run_recipe(build_recipe(data))
    assert guard.count("/v1/chat/completions") == 0
    rows = load_dataset(str(out), "instructions")
    assert set(rows) == {"rejected"} and set(rows["rejected"]["rejected_by"]) == {"score_instruction"}


def test_balance_topics_plugs_in_and_the_card_shows_topics(make_stub, tmp_path) -> None:
    """A global stage that embeds (packaged MiniLM), fits topics and keeps a target size; the rest -> rejected."""
    stub = stub_for_run(make_stub)
    data = recipe_data(stub.url, tmp_path)
    data["instructions"]["balance_topics"] = {"target_size": 2, "n_topics": 3}
    out = run_recipe(build_recipe(data))
    rows = load_dataset(str(out), "instructions")
    assert rows["train"].num_rows == 2
    assert [r["reason"] for r in rows["rejected"]] == ["balance"] * 3
    assert all(t is not None for t in rows["train"]["topic"]) and "embedding" not in rows["train"].column_names
    report = json.loads((out / "run.json").read_text())
    assert {"mean_cosine_distance (kept)", "vendi_score (before balancing)"} <= set(report["diversity"])
    card = (out / "README.md").read_text()
    assert "assets/topic_sizes.png" in card and "vendi_score (kept)" in card
