"""The dataset card: metadata that huggingface_hub and datasets read back, plots drawn from the written data, and
tables that repeat the run report without adding to it."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest
import yaml
from datasets import Dataset, Features, Value
from huggingface_hub import DatasetCard
from matplotlib.image import imread

from synthq_hf import cards, output
from synthq_hf.stages.score_instruction import CRITERIA

datasets.disable_progress_bars()

SCORED = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),
        "scene": Value("string"),
        "document_id": Value("string"),
        "scores": {name: Value("int64") for name in CRITERIA},
        "total_score": Value("int64"),
        "topic": Value("int64"),
        "rejected_by": Value("string"),
        "reason": Value("string"),
    }
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scores_for(total: int, offset: int) -> dict[str, int]:
    """A 0/1 vector with ``total`` ones, rotated so that criteria differ in pass rate."""
    return {name: int((i + offset) % len(CRITERIA) < total) for i, name in enumerate(CRITERIA)}


def instruction(n: int, total: int | None, topic: int | None = None) -> dict[str, Any]:
    """A scored generated instruction. Kept rows carry empty ``rejected_by``/``reason``: ``datasets`` loads one
    config with one schema, so train and rejected must have the same columns."""
    return {
        "id": f"gen-{n:03d}",
        "prompt": f"I run a small bakery and want to plan flour orders for week {n}; how should I forecast demand?",
        "scene": "A bakery owner planning supplies.",
        "document_id": f"doc-{n % 7:03d}",
        "scores": None if total is None else scores_for(total, n),
        "total_score": total,
        "topic": topic,
        "rejected_by": None,
        "reason": None,
    }


KEPT_SCORES = [3, 4, 4, 5, 5, 5, 6, 7, 3, 4, 5, 6]
LOW_SCORES = [0, 1, 1, 2, 2, 2, 2]


def kept_rows(totals: list[int | None]) -> list[dict[str, Any]]:
    return [instruction(n, total, topic=n % 3) for n, total in enumerate(totals)]


def rejected_rows(low: list[int], failed: int) -> list[dict[str, Any]]:
    rows = []
    for n, total in enumerate(low, start=100):
        rows.append(
            {
                **instruction(n, total),
                "rejected_by": "score_instruction",
                "reason": f"total_score {total} < threshold 3",
            }
        )
    for n in range(200, 200 + failed):
        reason = f"score_instruction: reply is not valid JSON | raw reply: '{{\"specificity\": {n}'"
        rows.append({**instruction(n, None), "rejected_by": "score_instruction", "reason": reason})
    return rows


def demonstrations() -> Dataset:
    return Dataset.from_list(
        [
            {
                "id": f"seed-{n:03d}",
                "prompt": "Why does my pandas groupby with two columns raise a ValueError?",
                "keywords": ["pandas", "groupby"],
                "document": "The groupby method in pandas splits a DataFrame into groups.",
                "scene": "An analyst summarising orders per customer.",
                "query_compositions": {
                    "ability": "debugging",
                    "knowledge": "pandas indexing",
                    "extra_information": "the error text",
                    "output": "fixed code",
                },
            }
            for n in range(5)
        ]
    )


def write_folder(out: Path, kept: list[dict], rejected: list[dict], with_topic: bool = True) -> dict[str, dict]:
    """A folder as the runner writes it: shards through output.write_split, configs in the runner's order."""
    features = SCORED
    if not with_topic:
        kept = [{k: v for k, v in row.items() if k != "topic"} for row in kept]
        rejected = [{k: v for k, v in row.items() if k != "topic"} for row in rejected]
        features = Features({k: v for k, v in SCORED.items() if k != "topic"})
    return {
        "instructions": {
            "train": output.write_split(Dataset.from_list(kept, features=features), out, "instructions", "train"),
            "rejected": output.write_split(
                Dataset.from_list(rejected, features=features), out, "instructions", "rejected"
            ),
        },
        "demonstrations": {"train": output.write_split(demonstrations(), out, "demonstrations", "train")},
    }


def full_report() -> dict[str, Any]:
    return {
        "recipe": {
            "name": "synthquestions",
            "output": {"license": "apache-2.0"},
            "instructions": {"filter": {"threshold": 3}},
        },
        "models": {"generator": "SmolLM2-135M-Instruct-Q4_1.gguf", "judge": "Qwen/Qwen2.5-72B-Instruct"},
        "endpoints": {"generator": {"dialect": "llama-cpp-python"}, "judge": {"dialect": "tgi"}},
        "prompt_hashes": {"generate_instruction": "3f2a9c1d0b7e", "score_instruction": "a1b2c3d4e5f6"},
        "sources": {"seeds": "bundled seeds.jsonl (40 rows)", "corpus": "bundled corpus.jsonl (60 documents)"},
        "stages": [
            {"name": "extract_keywords", "in": 5, "out": 5, "rejected": 0, "errors": 0},
            {"name": "generate_instruction", "in": 23, "out": 21, "rejected": 0, "errors": 2},
            {"name": "score_instruction", "in": 21, "out": 12, "rejected": 9, "errors": 2},
        ],
        "rejected_reasons": {
            "score_instruction": {
                "total_score 2 < threshold 3": 4,
                "total_score 1 < threshold 3": 2,
                "total_score 0 < threshold 3": 1,
                "score_instruction: reply is not valid JSON | raw reply: '{\"specificity\": 200'": 1,
                "score_instruction: reply is not valid JSON | raw reply: '{\"specificity\": 201'": 1,
            },
            "dedup": {f"exact duplicate of gen-{n:03d}": 1 for n in range(14)},
        },
        "usage": {
            "generate_instruction": {
                "requests": 23,
                "cache_hits": 4,
                "prompt_tokens": 41234,
                "completion_tokens": 5120,
                "retries": 1,
                "failures": 2,
                "latency_s": 81.5,
            },
            "score_instruction": {"requests": 21, "cache_hits": 0, "prompt_tokens": 9000, "completion_tokens": 7000},
        },
        "seed": 1234,
        "seconds": 754.2,
        "versions": {"synthq-hf": "0.1.0", "datasets": datasets.__version__},
        "repo_id": "someone/synthq-demo",
    }


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    out = tmp_path / "out"
    out.mkdir()
    configs = write_folder(out, kept_rows(KEPT_SCORES), rejected_rows(LOW_SCORES, failed=2))
    return out, configs


def section(text: str, title: str) -> str:
    """The markdown under ``## title`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the markdown tables in ``text`` (header and separator rows dropped)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-:| ]+\|$", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [row for row in rows if row[0] not in ("stage", "reason", "config", "criterion", "role", "measure")]


def test_front_matter_parses_and_drives_load_dataset(folder, tmp_path):
    out, configs = folder
    path = cards.write_card(out, full_report(), configs)
    assert path == out / "README.md"

    card = DatasetCard(path.read_text(encoding="utf-8"))
    data = card.data.to_dict()
    assert data["configs"] == yaml.safe_load(output.configs_yaml(configs))["configs"]
    assert data["configs"][0]["config_name"] == "instructions" and data["configs"][0]["default"] is True
    assert data["license"] == "apache-2.0"
    assert data["language"] == ["en"]
    assert data["task_categories"] == ["text-generation"]
    assert data["tags"] == ["synthetic", "synthq-hf", "instruction-tuning"]
    assert data["size_categories"] == ["n<1K"]
    assert data["pretty_name"] == "synthq-hf: synthquestions"
    assert DatasetCard(str(card)).data.to_dict() == data  # serialising the parsed card changes nothing

    loaded = datasets.load_dataset(str(out), "instructions", cache_dir=str(tmp_path / "hf-cache"))
    assert set(loaded) == {"train", "rejected"}
    assert loaded["train"].num_rows == len(KEPT_SCORES)
    assert loaded["rejected"].num_rows == len(LOW_SCORES) + 2
    assert set(loaded["rejected"]["rejected_by"]) == {"score_instruction"}
    demos = datasets.load_dataset(str(out), "demonstrations", split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert demos.num_rows == 5


def test_size_category_and_license_default(folder):
    out, configs = folder
    report = full_report()
    del report["recipe"]["output"]
    cards.write_card(out, report, configs)
    data = DatasetCard((out / "README.md").read_text(encoding="utf-8")).data.to_dict()
    assert data["license"] == "other"
    assert [cards.size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000, 3 * 10**12)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
        "n>1T",
    ]


def test_plots_are_pngs_referenced_by_relative_path(folder):
    out, configs = folder
    text = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    for name in ("score_histogram.png", "criteria_pass_rates.png", "topic_sizes.png"):
        png = out / "assets" / name
        raw = png.read_bytes()
        assert raw.startswith(PNG_SIGNATURE), name
        pixels = imread(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
        assert pixels.std() > 0.05, f"{name} is blank"
        assert f"](assets/{name})" in text


def test_histogram_counts_match_the_data(folder):
    out, configs = folder
    expected = Counter(KEPT_SCORES + LOW_SCORES)  # the two failed rows carry no score
    assert cards.score_histogram(out) == dict(sorted(expected.items()))
    assert cards.score_histogram(out, configs) == dict(sorted(expected.items()))

    rates = cards.pass_rates(out, configs)
    assert list(rates) == list(CRITERIA)
    rows = [instruction(n, t) for n, t in enumerate(KEPT_SCORES)] + [
        instruction(n, t) for n, t in enumerate(LOW_SCORES, start=100)
    ]
    for name in CRITERIA:
        assert rates[name] == pytest.approx(sum(r["scores"][name] for r in rows) / len(rows))

    text = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    scores = section(text, "Scores")
    assert f"{len(KEPT_SCORES) + len(LOW_SCORES)} instructions carry a score" in scores
    assert "2 have\nnone because scoring failed" in scores
    assert "the run report records none" not in scores  # the recipe recorded its threshold
    assert cards.topic_sizes(out, configs) == {"0": 4, "1": 4, "2": 4}


def test_counts_table_matches_the_report(folder):
    out, configs = folder
    report = full_report()
    text = cards.write_card(out, report, configs).read_text(encoding="utf-8")
    rows = table_rows(section(text, "Pipeline"))
    expected = [
        [s["name"], str(s["in"]), str(s["out"]), str(s["rejected"]), str(s["errors"])] for s in report["stages"]
    ]
    assert rows == expected

    contents = table_rows(section(text, "Contents"))
    assert [row[:3] for row in contents] == [
        ["`instructions`", "`train`", str(len(KEPT_SCORES))],
        ["`instructions`", "`rejected`", str(len(LOW_SCORES) + 2)],
        ["`demonstrations`", "`train`", "5"],
    ]


def test_rejection_reasons_grouped_and_capped(folder):
    out, configs = folder
    text = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    rejected = section(text, "Why rows were rejected")
    by_stage = dict(re.findall(r"^\*\*(\w+)\*\*\n\n(.*?)(?=^\*\*|\Z)", rejected, re.M | re.S))
    assert table_rows(by_stage["score_instruction"]) == [
        ["total_score 2 < threshold 3", "4"],
        ["score_instruction: reply is not valid JSON", "2"],
        ["total_score 1 < threshold 3", "2"],
        ["total_score 0 < threshold 3", "1"],
    ]
    assert "raw reply" not in rejected
    assert table_rows(by_stage["dedup"]) == [["exact duplicate", "14"]]

    many = {f"reason number {n:02d}": n + 1 for n in range(15)}
    ranked = cards.top_reasons(many)
    assert len(ranked) == 11
    assert ranked[0] == ("reason number 14", 15)
    assert ranked[-1] == ("other (5 kinds)", 1 + 2 + 3 + 4 + 5)


def test_run_details_from_the_report(folder):
    out, configs = folder
    text = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    assert 'load_dataset("someone/synthq-demo", "instructions")' in text
    run = section(text, "Run")
    assert "`1234`" in run
    assert "12 min 34 s" in run
    assert table_rows(run)[:2] == [
        ["generator", "SmolLM2-135M-Instruct-Q4_1.gguf", "llama-cpp-python"],
        ["judge", "Qwen/Qwen2.5-72B-Instruct", "tgi"],
    ]
    assert "`3f2a9c1d0b7e`" in run and "`a1b2c3d4e5f6`" in run
    assert "bundled corpus.jsonl (60 documents)" in run
    assert "arXiv:2506.03968" in text

    usage = section(text, "Model usage")
    header = next(line for line in usage.splitlines() if line.startswith("| stage |"))
    assert header.startswith(
        "| stage | requests | cache_hits | prompt_tokens | completion_tokens | retries | failures | latency_s |"
    )
    assert table_rows(usage) == [
        ["generate_instruction", "23", "4", "41,234", "5,120", "1", "2", "81.5"],
        ["score_instruction", "21", "0", "9,000", "7,000", "", "", ""],
    ]


def test_no_scored_rows_says_so_and_draws_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    kept = [instruction(n, None) for n in range(3)]
    rejected = rejected_rows([], failed=2)
    configs = write_folder(out, kept, rejected, with_topic=False)
    assert cards.score_histogram(out, configs) == {}
    assert cards.pass_rates(out, configs) == {}

    text = cards.write_card(out, {}, configs).read_text(encoding="utf-8")
    assert "No instruction in this dataset carries a score" in section(text, "Scores")
    assert not (out / "assets" / "score_histogram.png").exists()
    assert not (out / "assets" / "criteria_pass_rates.png").exists()
    assert not (out / "assets").exists()
    assert "assets/" not in text


def test_missing_report_sections_are_omitted(folder):
    out, configs = folder
    cards.write_card(out, full_report(), configs)  # an earlier card of the same folder, with everything
    text = cards.write_card(out, {}, configs).read_text(encoding="utf-8")
    for title in ("Run", "Pipeline", "Why rows were rejected", "Model usage", "Diversity"):
        assert f"## {title}" not in text
    for invented in ("SmolLM2", "someone/synthq-demo", "Run seed", "Duration", "prompt hash", "Source of"):
        assert invented not in text
    assert f'load_dataset("{out.resolve()}", "instructions")' in text
    assert "the run report records none" in section(text, "Scores")  # the default threshold says it is a default
    data = DatasetCard(text).data.to_dict()
    assert data["pretty_name"] == "synthq-hf synthetic instructions" and data["license"] == "other"

    partial = copy.deepcopy(full_report())
    partial["usage"] = {}
    partial["rejected_reasons"] = {"score_instruction": {}}
    partial["diversity"] = {"distinct_2": 0.71, "mean_pairwise_cosine": 0.318}
    text = cards.write_card(out, partial, configs).read_text(encoding="utf-8")
    assert "## Model usage" not in text and "## Why rows were rejected" not in text
    assert table_rows(section(text, "Diversity")) == [["distinct_2", "0.71"], ["mean_pairwise_cosine", "0.318"]]


def test_stale_plots_are_removed(folder, tmp_path):
    out, configs = folder
    cards.write_card(out, full_report(), configs)
    assert (out / "assets" / "topic_sizes.png").exists()
    for path in (out / "instructions").glob("*.parquet"):
        path.unlink()
    configs = write_folder(out, kept_rows(KEPT_SCORES), rejected_rows(LOW_SCORES, failed=0), with_topic=False)
    text = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    assert not (out / "assets" / "topic_sizes.png").exists()
    assert "## Topics" not in text


# --- preference pairs -----------------------------------------------------------------------------------------------

MESSAGE = [{"role": Value("string"), "content": Value("string")}]
PREFERENCE = Features(
    {
        "id": Value("string"),
        "prompt": Value("string"),
        "responses": [Value("string")],
        "rewards": [Value("float64")],
        "reward_objectives": [[Value("float64")]],
        "chosen": MESSAGE,
        "rejected": MESSAGE,
        "reward_margin": Value("float64"),
        "chosen_index": Value("int64"),
        "rejected_index": Value("int64"),
        "reward_truncated": [Value("bool")],
        "rejected_by": Value("string"),
        "reason": Value("string"),
    }
)
OBJECTIVES = [f"helpsteer-like-{j:02d}" for j in range(19)]
# Per pair: three responses' rewards; the chosen response is the best, the rejected one the worst, at varying places.
PAIR_REWARDS = [[0.9, 0.1, 0.5], [0.2, 0.8, 0.4], [0.3, 0.6, 0.7], [0.05, 0.35, 0.95]]


def objective_vector(n: int, kind: str) -> list[float]:
    """Chosen responses score 0.5 + j/100 on objective j on average over the pairs, rejected ones j/100, middle ones
    9 (so a mean taken over the wrong response shows); each pair is offset by (n - 1.5)/10, which averages out."""
    base = {"chosen": 0.5, "rejected": 0.0, "middle": 9.0}[kind]
    return [base + j / 100 + (n - 1.5) / 10 for j in range(19)]


def pair(n: int, rewards: list[float]) -> dict[str, Any]:
    best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
    kinds = ["chosen" if i == best else "rejected" if i == worst else "middle" for i in range(len(rewards))]
    responses = [f"answer {i} to question {n}" for i in range(len(rewards))]
    prompt = f"question {n}"
    return {
        "id": f"gen-{n:03d}",
        "prompt": prompt,
        "responses": responses,
        "rewards": rewards,
        "reward_objectives": [objective_vector(n, kind) for kind in kinds],
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": responses[best]}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": responses[worst]}],
        "reward_margin": rewards[best] - rewards[worst],
        "chosen_index": best,
        "rejected_index": worst,
        "reward_truncated": [False] * len(rewards),
        "rejected_by": None,
        "reason": None,
    }


def unpaired(n: int) -> dict[str, Any]:
    return {
        **{name: None for name in PREFERENCE},
        "id": f"gen-{n:03d}",
        "prompt": f"question {n}",
        "responses": ["same", "same", "same"],
        "rejected_by": "generate_responses",
        "reason": "identical responses",
    }


def with_preferences(out: Path, configs: dict[str, dict], train: list[dict], rejected: list[dict]) -> dict[str, dict]:
    """``configs`` plus a ``preferences`` config; an empty split gets no file and no entry, as the runner does it
    (``datasets`` cannot build an empty ``Dataset.from_list``, so it is not written at all)."""
    splits = {
        split: output.write_split(Dataset.from_list(rows, features=PREFERENCE), out, "preferences", split)
        for split, rows in (("train", train), ("rejected", rejected))
        if rows
    }
    return output.present({**configs, "preferences": splits})


def preference_report() -> dict[str, Any]:
    return {
        **full_report(),
        "reward_model": "RLHFlow/ArmoRM-Llama3-8B-v0.1",
        "pairing": "best_worst",
        "reward_objectives": OBJECTIVES,
    }


@pytest.fixture
def preference_folder(folder) -> tuple[Path, dict[str, dict]]:
    out, configs = folder
    train = [pair(n, rewards) for n, rewards in enumerate(PAIR_REWARDS)]
    return out, with_preferences(out, configs, train, [unpaired(10), unpaired(11)])


def flat(text: str) -> str:
    return " ".join(text.split())


def test_preference_section_counts_models_and_plots(preference_folder):
    out, configs = preference_folder
    text = cards.write_card(out, preference_report(), configs).read_text(encoding="utf-8")
    pairs = flat(section(text, "Preference pairs"))
    assert f"holds {len(PAIR_REWARDS)} pairs; 2 instructions gave no pair and are in `rejected`" in pairs
    assert "Reward model: `RLHFlow/ArmoRM-Llama3-8B-v0.1`." in pairs
    assert "Pairing: `best_worst`, the highest-rewarded response (`chosen`) against its lowest-rewarded one" in pairs
    chosen = sum(max(r) for r in PAIR_REWARDS) / len(PAIR_REWARDS)
    rejected = sum(min(r) for r in PAIR_REWARDS) / len(PAIR_REWARDS)
    assert f"Mean reward: chosen {chosen:.3f}, rejected {rejected:.3f}." in pairs
    assert f"Mean `reward_margin`: {chosen - rejected:.3f}." in pairs
    made = flat(section(text, "How it was made"))
    assert "3 responses were sampled per instruction and scored by a reward model (`RLHFlow/" in made
    assert "the best-scored and worst-scored responses became `chosen` and `rejected`" in made
    assert 'load_dataset("someone/synthq-demo", "instructions")' in text
    assert ["`preferences`", "`rejected`", "2"] in [row[:3] for row in table_rows(section(text, "Contents"))]

    for name in ("reward_distribution.png", "reward_margin.png"):
        png = out / "assets" / name
        assert png.read_bytes().startswith(PNG_SIGNATURE), name
        assert imread(png).std() > 0.05, f"{name} is blank"
        assert f"](assets/{name})" in text


def test_preference_stats_pick_the_chosen_and_rejected_responses(preference_folder):
    out, configs = preference_folder
    stats = cards.preference_stats(out, configs)
    assert stats["pairs"] == len(PAIR_REWARDS)
    assert stats["responses"] == {3: len(PAIR_REWARDS)}
    assert sorted(stats["rewards"]) == pytest.approx(sorted(r for rewards in PAIR_REWARDS for r in rewards))
    assert list(stats["chosen"]) == pytest.approx([max(r) for r in PAIR_REWARDS])
    assert list(stats["rejected"]) == pytest.approx([min(r) for r in PAIR_REWARDS])
    assert list(stats["margins"]) == pytest.approx([max(r) - min(r) for r in PAIR_REWARDS])
    assert len(stats["objectives"]) == 19
    for j, (chosen, rejected) in enumerate(stats["objectives"]):
        assert chosen == pytest.approx(0.5 + j / 100)
        assert rejected == pytest.approx(j / 100)


def test_objective_table_names_from_the_report_else_positions(preference_folder):
    out, configs = preference_folder
    text = cards.write_card(out, preference_report(), configs).read_text(encoding="utf-8")
    rows = [row for row in table_rows(section(text, "Preference pairs")) if row[0] != "objective"]
    assert rows[0] == [OBJECTIVES[0], "0.500", "0.000"]
    assert rows[18] == [OBJECTIVES[18], "0.680", "0.180"]
    assert [row[0] for row in rows] == OBJECTIVES

    report = preference_report()
    del report["reward_objectives"], report["reward_model"], report["pairing"]
    text = cards.write_card(out, report, configs).read_text(encoding="utf-8")
    pairs = section(text, "Preference pairs")
    rows = [row for row in table_rows(pairs) if row[0] != "objective"]
    assert [row[0] for row in rows] == [f"objective {j}" for j in range(1, 20)]
    assert "Reward model: not named by the run report." in flat(pairs)
    assert "Pairing" not in pairs and "2·std" not in text  # no pairing recorded, none claimed


def test_plain_reward_model_has_no_objective_table(folder):
    out, configs = folder
    train = [{**pair(n, rewards), "reward_objectives": None} for n, rewards in enumerate(PAIR_REWARDS)]
    configs = with_preferences(out, configs, train, [unpaired(10)])
    report = {**preference_report(), "pairing": "mean_minus_2std"}
    text = cards.write_card(out, report, configs).read_text(encoding="utf-8")
    pairs = section(text, "Preference pairs")
    assert "objective" not in pairs
    assert "1 instruction gave no pair and is in `rejected`" in flat(pairs)
    assert "mean − 2·std rule" in pairs and "mean − 2·std rule" in section(text, "How it was made")
    assert (out / "assets" / "reward_margin.png").exists()


def test_no_preference_pairs_no_section(preference_folder, tmp_path):
    out, configs = preference_folder
    cards.write_card(out, preference_report(), configs)  # an earlier card of this folder, with pairs
    assert (out / "assets" / "reward_distribution.png").exists()

    for only_rejected in (False, True):
        kept = {k: v for k, v in configs.items() if k != "preferences"}
        if only_rejected:  # every instruction unpaired: the train split is empty and has no file
            kept = with_preferences(out, kept, [], [unpaired(10)])
            assert "train" not in kept["preferences"]
        text = cards.write_card(out, preference_report(), kept).read_text(encoding="utf-8")
        assert "## Preference pairs" not in text
        assert "responses were sampled" not in text
        assert not (out / "assets" / "reward_distribution.png").exists()
        assert not (out / "assets" / "reward_margin.png").exists()


# --- report shapes --------------------------------------------------------------------------------------------------


def test_threshold_from_either_recipe_shape(folder):
    new = {
        "datasets": {
            "demonstrations": {"source": {"dataset": "bundled:seeds"}, "stages": {"ground": {}}},
            "instructions": {"source": {"dataset": "bundled:corpus"}, "stages": {"filter": {"threshold": 5}}},
            "preferences": {"source": {"dataset": "instructions"}, "stages": {"filter": {"threshold": 2}}},
        }
    }
    assert cards._threshold({"recipe": new}) == (5, True)
    assert cards._threshold({"recipe": {"instructions": {"filter": {"threshold": 4}}}}) == (4, True)
    switched_off = {"datasets": {"instructions": {"stages": {"filter": False}}}}
    assert cards._threshold({"recipe": switched_off}) == (cards.DEFAULT_THRESHOLD, False)
    assert cards._threshold({}) == (cards.DEFAULT_THRESHOLD, False)
    defaults_first = {"datasets": {"a": {"stages": {"filter": None}}, "b": {"stages": {"filter": {"threshold": 6}}}}}
    assert cards._threshold({"recipe": defaults_first}) == (cards.DEFAULT_THRESHOLD, False)
    off_first = {"datasets": {"a": {"stages": {"filter": False}}, "b": {"stages": {"filter": {"threshold": 6}}}}}
    assert cards._threshold({"recipe": off_first}) == (6, True)

    out, configs = folder
    text = cards.write_card(out, {"recipe": new}, configs).read_text(encoding="utf-8")
    scores = flat(section(text, "Scores"))
    assert "below the threshold, 5, are rejected" in scores and "records none" not in scores


def test_pipeline_table_gains_a_dataset_column(folder):
    out, configs = folder
    report = full_report()
    report["stages"] = [
        {"dataset": "demonstrations", "name": "ground", "in": 5, "out": 5, "rejected": 0, "errors": 0},
        {"dataset": "instructions", "name": "score_instruction", "in": 21, "out": 12, "rejected": 9, "errors": 2},
        {"name": "dedup", "in": 12, "out": 11, "rejected": 1, "errors": 0},
    ]
    pipeline = section(cards.write_card(out, report, configs).read_text(encoding="utf-8"), "Pipeline")
    assert "| dataset | stage | in | out | rejected | errors |" in pipeline
    assert table_rows(pipeline)[1:] == [
        ["demonstrations", "ground", "5", "5", "0", "0"],
        ["instructions", "score_instruction", "21", "12", "9", "2"],
        ["", "dedup", "12", "11", "1", "0"],
    ]


def test_a_run_without_a_filter_says_no_threshold_was_applied(tmp_path) -> None:
    """``synthq score`` is a one-stage recipe: nothing was filtered, and the card must not claim otherwise."""
    from synthq_hf.cards import _threshold

    recipe = {"datasets": {"instructions": {"stages": {"score_instruction": {}}}}}
    assert _threshold({"recipe": recipe}) == (None, True)
    filtered = {"datasets": {"instructions": {"stages": {"score_instruction": {}, "filter": {"threshold": 4}}}}}
    assert _threshold({"recipe": filtered}) == (4, True)


def test_the_method_told_is_the_one_that_ran(folder):
    """A recipe without SynthQuestions' stages (ScaleQuest, Magpie…) is described by its own name and description."""
    out, configs = folder
    synthq = cards.write_card(out, full_report(), configs).read_text(encoding="utf-8")
    assert "SynthQuestions (Zhu et al., 2025" in synthq
    report = {
        **full_report(),
        "recipe": {"name": "scalequest", "description": "Questions from scratch.", "datasets": {}},
        "stages": [{"dataset": "questions", "name": "synthesize_from_scratch", "in": 3, "out": 3}],
    }
    other = cards.write_card(out, report, configs).read_text(encoding="utf-8")
    assert "SynthQuestions (Zhu et al., 2025" not in other
    assert "made by the recipe `scalequest`: Questions from scratch." in other
