"""evolve_instruction against the stub server: each elimination rule fires on its scripted reply and only then,
the next round evolves the survivor, operations are seeded per (run seed, row id, round), failures stay row
errors, an all-eliminated row is rejected with its rules, and the bundled evol_instruct recipe runs end to end."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import yaml
from datasets import Dataset, load_dataset

from synthq_hf import prompts
from synthq_hf.endpoint import derive_seed
from synthq_hf.recipes import load_recipe
from synthq_hf.recipes.recipe import RECIPE_DIR, build_recipe
from synthq_hf.recipes.runner import run_recipe
from synthq_hf.stages.evolve_instruction import FEATURES, OPERATIONS, STAGE, TEMPLATE_WORDS, evolve_instruction

datasets.disable_progress_bars()
SEED = "Write a Python function that reverses a string."
SEED_ROWS = {"id": ["r1"], "prompt": [SEED]}
FIRST = "Write a Python function that reverses a string without slicing or reversed(), and explain its cost."
SECOND = "Write a Python function that reverses a string of Unicode grapheme clusters without slicing."
GAIN = json.dumps({"reasoning": "The second adds a constraint.", "adds_information": True})
NO_GAIN = json.dumps({"reasoning": "Only the wording changed.", "adds_information": False})
LONG = " ".join(f"word{i}" for i in range(120))  # a full answer: no refusal, over 80 words
LONG_2 = " ".join(f"term{i}" for i in range(120))


def evolved(text: str) -> str:
    return json.dumps({"instruction": text})


def chats(stub) -> list[dict]:
    return [payload for route, payload in stub.requests if route == "/v1/chat/completions"]


def run(rows: dict, config, **kwargs) -> Dataset:
    ds = Dataset.from_dict(rows)
    features = datasets.Features({**ds.features, **FEATURES})
    return ds.map(evolve_instruction, fn_kwargs={"endpoint": config, **kwargs}, features=features)


def test_a_kept_round_is_the_parent_of_the_next(stub, make_config) -> None:
    stub.queue(evolved(FIRST), GAIN, LONG, evolved(SECOND), GAIN, LONG_2)
    row = run(SEED_ROWS, make_config(stub.url), rounds=2)[0]
    assert row["evolve_instruction_error"] is None
    assert row["prompt"] == SEED  # the seed column is left as it was
    assert row["evolved_prompt"] == SECOND and row["evolved_response"] == LONG_2
    assert row["evolution_rounds_kept"] == 2
    assert [(e["round"], e["instruction"], e["eliminated_by"]) for e in row["evolution"]] == [
        (1, FIRST, None),
        (2, SECOND, None),
    ]
    sent = chats(stub)
    assert len(sent) == 6  # evolve, compare, respond per round
    assert SEED in sent[0]["messages"][-1]["content"]
    assert sent[1]["messages"] == prompts.render(f"{STAGE}.gain", first=SEED, second=FIRST)
    assert sent[1]["temperature"] == 0.0  # a verdict, not a sample
    assert sent[2]["messages"] == [{"role": "user", "content": FIRST}]  # the candidate as it is
    assert FIRST in sent[3]["messages"][-1]["content"]  # round 2 evolves round 1's survivor
    assert len({p["seed"] for p in sent}) == 6


REFUSAL = "I'm sorry, but I can't help with that. " + LONG  # long, so only the refusal rule can fire
COPIED = [f"{word.upper()} {FIRST}" for word in TEMPLATE_WORDS[:3]] + [
    f"#Rewritten Prompt#: {FIRST}",
    f"{FIRST} (Unlike the given prompt, handle emoji.)",
]


@pytest.mark.parametrize(
    ("script", "rule", "requests"),
    [
        ([evolved(FIRST), NO_GAIN], "no_information_gain", 2),
        ([evolved("  write a python function that REVERSES a string.  ")], "no_information_gain", 1),
        ([evolved(FIRST), GAIN, REFUSAL], "refusal", 3),
        ([evolved(FIRST), GAIN, "I\u2019m unable to do this. " + LONG], "refusal", 3),
        ([evolved(FIRST), GAIN, "def rev(s): return s[::-1]"], "too_short", 3),
        *[([evolved(text)], "copied_template_words", 1) for text in COPIED],
    ],
    ids=["judge-no-gain", "same-text", "sorry", "unable-curly-quote", "too-short"] + [f"copied-{i}" for i in range(5)],
)
def test_each_rule_eliminates_on_its_reply(stub, make_config, script, rule, requests) -> None:
    stub.queue(*script)
    row = run(SEED_ROWS, make_config(stub.url), rounds=1)[0]
    assert row["evolve_instruction_error"] is None
    assert row["evolution"][0]["eliminated_by"] == rule
    assert row["evolution_rounds_kept"] == 0
    assert row["evolved_prompt"] == SEED and row["evolved_response"] is None  # the survivor is the seed
    assert len(chats(stub)) == requests  # an eliminated candidate costs no further request


@pytest.mark.parametrize(
    ("candidate", "response", "min_words"),
    [
        (FIRST, LONG, 80),
        (FIRST, "five words are enough here", 5),  # exactly at the threshold
        (FIRST, LONG + " I am sorry this took long.", 80),  # "sorry" far from the opening is no refusal
        ("Reverse it; given prompt means the user's input text.", LONG, 80),  # the parent already says it
    ],
    ids=["full-answer", "at-threshold", "late-sorry", "inherited-words"],
)
def test_no_rule_fires_on_a_good_candidate(stub, make_config, candidate, response, min_words) -> None:
    parent = "Reverse the given prompt; given prompt means the user's input text."
    stub.queue(evolved(candidate), GAIN, response)
    row = run({"id": ["r1"], "prompt": [parent]}, make_config(stub.url), rounds=1, min_response_words=min_words)[0]
    assert row["evolution"][0]["eliminated_by"] is None
    assert (row["evolved_prompt"], row["evolved_response"], row["evolution_rounds_kept"]) == (candidate, response, 1)


def test_one_word_under_the_threshold_is_too_short(stub, make_config) -> None:
    stub.queue(evolved(FIRST), GAIN, "four words only here")
    row = run(SEED_ROWS, make_config(stub.url), rounds=1, min_response_words=5)[0]
    assert row["evolution"][0]["eliminated_by"] == "too_short"


def test_an_eliminated_round_retries_from_the_survivor(stub, make_config) -> None:
    stub.queue(evolved(FIRST), NO_GAIN, evolved(SECOND), GAIN, LONG)
    row = run(SEED_ROWS, make_config(stub.url), rounds=2)[0]
    assert [e["eliminated_by"] for e in row["evolution"]] == ["no_information_gain", None]
    second_evolve = chats(stub)[2]["messages"][-1]["content"]
    assert SEED in second_evolve and FIRST not in second_evolve
    assert row["evolved_prompt"] == SECOND and row["evolution_rounds_kept"] == 1


def test_a_verdict_that_is_not_a_json_boolean_is_a_row_error(stub, make_config) -> None:
    stub.queue(evolved(FIRST), json.dumps({"reasoning": "Same task.", "adds_information": "no"}))
    row = run(SEED_ROWS, make_config(stub.url), rounds=1, attempts=1)[0]
    assert row["evolved_prompt"] is None and row["evolution"] is None
    assert "adds_information" in row["evolve_instruction_error"] and "raw reply" in row["evolve_instruction_error"]


def test_a_failed_request_keeps_the_row_with_its_error(stub, make_config) -> None:
    stub.queue(evolved(FIRST), GAIN, ("status", 400, "prompt too long"))
    out = run({"id": ["r1", "r2"], "prompt": [SEED, "  "]}, make_config(stub.url), rounds=2)
    failed, blank = out[0], out[1]
    assert out.num_rows == 2
    assert failed["evolved_prompt"] is None and failed["evolution"] is None
    assert failed["evolution_rounds_kept"] is None
    assert "HTTP 400" in failed["evolve_instruction_error"]
    assert blank["evolve_instruction_error"] == "evolve_instruction: empty or missing prompt"
    assert len(chats(stub)) == 3  # the blank prompt cost no request


def expected_operations(run_seed: int, rid: str, rounds: int, operations: tuple[str, ...]) -> list[str]:
    return [
        random.Random(derive_seed(run_seed, f"{STAGE}.operation", rid, n)).choice(operations)
        for n in range(1, rounds + 1)
    ]


def test_rounds_and_operations_are_seeded_per_row_and_round(make_stub, make_config, tmp_path) -> None:
    rows = {"id": ["a", "b", "c", "d"], "prompt": [f"Explain topic {i} to a beginner." for i in range(4)]}
    stub = make_stub("openai")  # unscripted: "stub reply" is too short, every round falls
    first = run(rows, make_config(stub.url, seed=3), rounds=3)
    again = run(rows, make_config(make_stub("openai").url, seed=3, cache_path=str(tmp_path / "other.sqlite")), rounds=3)
    assert first["evolution"] == again["evolution"]  # a rerun with no cache evolves every row the same way
    chosen = []
    for row in first:
        ops = [e["operation"] for e in row["evolution"]]
        assert [e["round"] for e in row["evolution"]] == [1, 2, 3]
        assert ops == expected_operations(3, row["id"], 3, OPERATIONS)
        chosen += ops
    assert len(set(chosen)) > 1
    # the evolution prompt sent is the one for the recorded operation
    sent = {p["messages"][-1]["content"] for p in chats(stub) if "response_format" in p}
    for row in first:
        for entry in row["evolution"]:
            user = prompts.render(STAGE, operation=entry["operation"], instruction=row["prompt"])[-1]["content"]
            assert user in sent
    other = run(rows, make_config(make_stub("openai").url, seed=4, cache_path=str(tmp_path / "4.sqlite")), rounds=3)

    def operations(out: Dataset) -> list[list[str]]:
        return [[entry["operation"] for entry in row] for row in out["evolution"]]

    assert operations(other) != operations(first)  # another run seed, other draws
    only = run(rows, make_config(stub.url, seed=3), rounds=2, operations=["breadth"])
    assert {e["operation"] for r in only["evolution"] for e in r} == {"breadth"}


@pytest.mark.parametrize(
    ("params", "message"),
    [({"rounds": 0}, "rounds must be"), ({"operations": ["deeper"]}, "unknown operations deeper")],
)
def test_bad_parameters_are_refused(stub, make_config, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        run(SEED_ROWS, make_config(stub.url), **params)


def recipe_data(url: str, tmp_path, limit: int) -> dict:
    data = yaml.safe_load((RECIPE_DIR / "evol_instruct.yaml").read_text())
    data["endpoints"]["generator"].update(url=url, backoff_s=0.01, timeout_s=10)
    data["cache_path"] = str(tmp_path / "cache.sqlite")
    data["datasets"]["evolved"]["source"]["limit"] = limit
    data["output"]["dir"] = str(tmp_path / "out")
    return data


def test_the_bundled_recipe_loads() -> None:
    recipe = load_recipe("evol_instruct")
    assert recipe.endpoints["generator"].url == "local"
    assert list(recipe.datasets["evolved"].stages) == ["evolve_instruction", "dedup"]


def test_every_round_eliminated_lands_in_rejected_with_its_rules(make_stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    stub = make_stub("openai")
    stub.queue(evolved(f"Rewritten instruction: {FIRST}"), evolved(SECOND), NO_GAIN)  # one row: requests in order
    out = run_recipe(build_recipe(recipe_data(stub.url, tmp_path, limit=1)))
    assert json.loads((out / "run.json").read_text())["counts"]["evolved"]["train"] == 0
    (row,) = load_dataset(str(out), "evolved", split="rejected")
    assert row["rejected_by"] == STAGE
    assert row["reason"] == "evolve_instruction: every round eliminated (copied_template_words, no_information_gain)"
    assert [e["eliminated_by"] for e in row["evolution"]] == ["copied_template_words", "no_information_gain"]


def test_the_bundled_recipe_runs_end_to_end(make_stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    stub = make_stub("openai")
    # Two rows run concurrently, so their requests interleave: one reply fits all three kinds. pydantic ignores
    # the keys a model lacks, so it is an evolved instruction and a verdict of gain; as free text it is a
    # response of over 80 words. Round 2 returns the same instruction: no gain, eliminated without a request.
    text = "Summarise the causes of the 1929 crash for a history class, " + LONG
    universal = json.dumps({"instruction": text, "reasoning": "It asks for more.", "adds_information": True})
    stub.queue(*[universal] * 8)  # 4 requests a row: evolve, compare, respond; evolve
    out = run_recipe(build_recipe(recipe_data(stub.url, tmp_path, limit=2)))
    train = load_dataset(str(out), "evolved", split="train")
    rejected = load_dataset(str(out), "evolved", split="rejected")
    columns = yaml.safe_load((RECIPE_DIR / "evol_instruct.yaml").read_text())["datasets"]["evolved"]["columns"]
    assert train.column_names == [*columns, "rejected_by", "reason"]
    assert len(chats(stub)) == 8
    seed_file = str(RECIPE_DIR.parent / "data" / "seeds.jsonl")
    seeds = {r["id"]: r["prompt"] for r in load_dataset("json", data_files=seed_file, split="train")}
    (kept,) = train
    assert kept["prompt"] == seeds[kept["id"]] and kept["evolved_prompt"] == text
    assert kept["evolved_response"] == universal and kept["evolution_rounds_kept"] == 1
    assert [e["eliminated_by"] for e in kept["evolution"]] == [None, "no_information_gain"]
    (duplicate,) = rejected  # both rows evolved into the same instruction: dedup keeps the first
    assert duplicate["rejected_by"] == "dedup" and duplicate["duplicate_of"] == kept["id"]
