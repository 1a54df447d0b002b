"""filter_questions against the stub server and tiny local classifiers (built here, nothing downloaded): the strict
Yes/No verdict on the last line, the language rules, checks in order with no request after a failed one, the
difficulty from an LLM judge or a classifier with its threshold, row errors, routing to ``rejected`` with the
failed check's reason, and one-line refusals of bad parameters before a recipe runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
from datasets import Dataset, load_dataset
from stub_server import StubServer

from synthq_hf import EndpointConfig
from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.filter_questions import (
    FEATURES,
    DifficultyModelError,
    check,
    filter_questions,
    language_problem,
    mark_failed_check,
    parse_solvable,
)
from synthq_hf.stages.reject import split_rejected
from synthq_hf.structured import StageFailure

datasets.disable_progress_bars()
QUESTION = "A train travels 120 km in 1.5 hours. What is its average speed in km/h?"


def chat_payloads(stub: StubServer) -> list[dict]:
    return [p for route, p in stub.requests if route == "/v1/chat/completions"]


def run_one(row: dict[str, Any], endpoint: EndpointConfig, **kwargs: Any) -> dict[str, Any]:
    """The stage on one row, as ``Dataset.map`` calls it: rows run one after another, so queued replies line up."""
    return asyncio.run(filter_questions(row, endpoint=endpoint, **kwargs))


def rating(value: int) -> str:
    return json.dumps({"analysis": "Two steps of arithmetic.", "rating": value})


# --- the verdict -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict", "reasoning"),
    [
        ("Distance and time are given; speed follows.\nYes", True, "Distance and time are given; speed follows."),
        ("The rate is never stated.\n\nNo", False, "The rate is never stated."),
        (
            "yes, but the units are missing, so on reflection it cannot be done.\nNo",
            False,
            "yes, but the units are missing, so on reflection it cannot be done.",
        ),
        ("All data is there.\n**Yes**.", True, "All data is there."),
        ("All data is there.\n**Yes.**", True, "All data is there."),
        ("Fine.\n  YES.  \n\n", True, "Fine."),
        ("no", False, ""),
        ("Yes, everything is given.\nStep one...\nno.", False, "Yes, everything is given.\nStep one..."),
    ],
    ids=["yes", "no", "yes-then-no", "bold-period", "period-in-bold", "caps-spaces", "bare-no", "multi-line"],
)
def test_the_verdict_is_the_last_line(reply: str, verdict: bool, reasoning: str) -> None:
    assert parse_solvable(reply) == (verdict, reasoning)


@pytest.mark.parametrize(
    "reply",
    ["It is solvable.\nThe answer is yes", "Yes\nbecause all the data is given", "Verdict: Yes", "Yes!", "**Yes",
     "Yes No", "Yess", "", "   \n  "],
    ids=["sentence", "yes-first", "label", "exclamation", "half-bold", "both", "typo", "empty", "blank"],
)  # fmt: skip
def test_anything_else_is_no_verdict(reply: str) -> None:
    with pytest.raises(StageFailure):
        parse_solvable(reply)


def test_solvable_reply_fills_the_columns(stub, make_config) -> None:
    stub.queue("Distance and time are given.\n**Yes**.")
    out = run_one({"prompt": QUESTION}, make_config(stub.url))
    assert out == {"language_ok": True, "solvable": True, "solvable_reasoning": "Distance and time are given.",
                   "difficulty": None, "failed_check": None, "failed_reason": None,
                   "filter_questions_error": None}  # fmt: skip
    (payload,) = chat_payloads(stub)
    assert "response_format" not in payload  # free text: the reasoning comes before the verdict
    assert payload["max_tokens"] == 1024 and payload["temperature"] == 0.0
    assert [m["role"] for m in payload["messages"]] == ["system", "user"]
    assert QUESTION in payload["messages"][-1]["content"]


def test_an_unsolvable_verdict_fails_the_check(stub, make_config) -> None:
    stub.queue("yes, it looks complete, but the time is not given.\nNo")
    out = run_one({"prompt": "How fast does the train go?"}, make_config(stub.url))
    assert out["solvable"] is False and out["failed_check"] == "solvable"
    assert out["failed_reason"] == "the model judged it unsolvable"
    assert out["filter_questions_error"] is None


def test_no_verdict_is_asked_again_with_a_new_seed(stub, make_config) -> None:
    stub.queue("It can be solved.\nThe answer is yes", "It can be solved.\nYes")
    out = run_one({"prompt": QUESTION}, make_config(stub.url))
    assert out["solvable"] is True and out["filter_questions_error"] is None
    seeds = [p["seed"] for p in chat_payloads(stub)]
    assert len(seeds) == 2 and seeds[0] != seeds[1]


def test_no_verdict_after_all_attempts_is_a_row_error_with_the_raw_reply(stub, make_config) -> None:
    stub.queue(*["I think the answer is yes"] * 2)
    out = run_one({"prompt": QUESTION}, make_config(stub.url), attempts=2)
    assert out["solvable"] is None and out["language_ok"] is None and out["failed_check"] is None
    assert out["filter_questions_error"].startswith("filter_questions: the last line is not a verdict")
    assert "(after 2 attempts)" in out["filter_questions_error"]
    assert "raw reply: 'I think the answer is yes'" in out["filter_questions_error"]
    assert len(chat_payloads(stub)) == 2


def test_a_reply_cut_off_is_no_verdict(stub, make_config) -> None:
    stub.queue(("finish", "length", "Let me check the\nYes"), "Complete.\nNo")
    out = run_one({"prompt": QUESTION}, make_config(stub.url), max_tokens=8)
    assert out["solvable"] is False and len(chat_payloads(stub)) == 2


def test_a_failed_request_is_a_row_error(stub, make_config) -> None:
    stub.queue(("status", 400))
    out = run_one({"prompt": QUESTION}, make_config(stub.url))
    assert out["solvable"] is None and out["failed_check"] is None
    assert out["filter_questions_error"].startswith("filter_questions: ") and "400" in out["filter_questions_error"]


# --- language ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "language", "problem"),
    [
        (QUESTION, "ascii", None),
        ("Tabs\tand\nnewlines, $x^2 \\leq 4$ {ok}", "ascii", None),
        ("Find the café's profit.", "ascii", "non-ASCII character 'é' at 12"),
        ("Show that x ≤ 4.", "ascii", "non-ASCII character '≤' at 12"),
        ("Un café coûte 2,50 € ; ½ × 3² ≥ 30° – “ok” µm ⁿ", "latin", None),
        ("Straße, Ærø, Łódź", "latin", None),
        ("e\u0301 combining", "latin", None),
        ("Area is π r².", "latin", "character 'π' at 8 is not Latin script, punctuation or a math symbol"),
        ("Combien de 猫 ?", "latin", "character '猫' at 11 is not Latin script, punctuation or a math symbol"),
        ("Smile 🙂", "latin", "character '🙂' at 6 is not Latin script, punctuation or a math symbol"),
    ],
    ids=["ascii", "ascii-controls", "accent", "math-symbol", "latin-mixed", "latin-letters", "combining", "greek",
         "cjk", "emoji"],
)  # fmt: skip
def test_language_rules(text: str, language: str, problem: str | None) -> None:
    assert language_problem(text, language) == problem


def test_a_failed_language_check_sends_no_request(stub, make_config) -> None:
    out = run_one({"prompt": "Résoudre x + 1 = 2."}, make_config(stub.url), checks=["language", "solvable"])
    assert out["language_ok"] is False and out["solvable"] is None and out["failed_check"] == "language"
    assert out["failed_reason"] == "non-ASCII character 'é' at 1"
    assert chat_payloads(stub) == []
    stub.queue("Fine.\nYes")
    latin = run_one({"prompt": "Résoudre x + 1 = 2."}, make_config(stub.url), language="latin")
    assert latin["language_ok"] is True and latin["solvable"] is True and latin["failed_check"] is None
    assert len(chat_payloads(stub)) == 1


# --- order -------------------------------------------------------------------------------------------------------


def test_checks_run_in_the_order_given(stub, make_config) -> None:
    stub.queue("Fine.\nYes")
    out = run_one({"prompt": "Résoudre x + 1 = 2."}, make_config(stub.url), checks=["solvable", "language"])
    assert out["solvable"] is True and out["language_ok"] is False and out["failed_check"] == "language"
    assert len(chat_payloads(stub)) == 1  # solvability asked first, language still checked after


def test_no_difficulty_request_once_solvability_failed(stub, make_config) -> None:
    stub.queue("Nothing is given.\nNo", rating(9))
    out = run_one({"prompt": QUESTION}, make_config(stub.url), checks=["language", "solvable", "difficulty"])
    assert out["failed_check"] == "solvable" and out["difficulty"] is None
    assert len(chat_payloads(stub)) == 1


# --- difficulty --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "failed"), [(3, "3.0 < min_difficulty 4"), (4, None), (8, None)])
def test_difficulty_from_the_llm_judge_and_its_threshold(stub, make_config, value: int, failed: str | None) -> None:
    stub.queue("Fine.\nYes", rating(value))
    out = run_one({"prompt": QUESTION}, make_config(stub.url), checks=["language", "solvable", "difficulty"],
                  min_difficulty=4)  # fmt: skip
    assert out["difficulty"] == float(value)
    assert out["failed_reason"] == failed
    assert out["failed_check"] == (None if failed is None else "difficulty")
    solvable, judge = chat_payloads(stub)
    assert "response_format" in judge and "response_format" not in solvable
    schema = judge["response_format"]["json_schema"]["schema"]["properties"]["rating"]
    assert (schema["minimum"], schema["maximum"]) == (1, 10)


def test_difficulty_without_a_threshold_is_only_recorded(stub, make_config) -> None:
    stub.queue(rating(1))
    out = run_one({"prompt": QUESTION}, make_config(stub.url), checks=["difficulty"])
    assert out["difficulty"] == 1.0 and out["failed_check"] is None and out["language_ok"] is None


def test_an_invalid_rating_is_retried_then_a_row_error(stub, make_config) -> None:
    stub.queue(*[json.dumps({"analysis": "hard", "rating": 11})] * 3)
    out = run_one({"prompt": QUESTION}, make_config(stub.url), checks=["difficulty"], min_difficulty=2)
    assert out["difficulty"] is None and "does not match the schema" in out["filter_questions_error"]
    assert len(chat_payloads(stub)) == 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random one-label Llama classifier with a real tokenizer: a regression score."""
    from synthq_hf.tiny_reward import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("models") / "tiny")


def classifier_logits(folder: Path, text: str) -> list[float]:
    """The model's output on ``text`` as transformers computes it, to compare with what the stage recorded."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        return model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"]).logits[0].tolist()


def test_difficulty_from_a_regression_classifier(stub, make_config, tiny: Path) -> None:
    questions = [QUESTION, "Prove that there are infinitely many primes.", "What is 2 + 2?"]
    scores = [classifier_logits(tiny, q)[0] for q in questions]
    assert len(set(scores)) == 3  # the random weights tell the questions apart
    cut = sorted(scores)[1]
    rows = Dataset.from_dict({"prompt": questions}).map(
        filter_questions,
        fn_kwargs={"endpoint": make_config(stub.url), "checks": ["difficulty"], "difficulty_model": str(tiny),
                   "min_difficulty": cut, "device": "cpu"},
        features=with_prompt_features(),
    )  # fmt: skip
    assert rows["difficulty"] == pytest.approx(scores, abs=1e-5)
    assert rows["failed_check"] == ["difficulty" if s < cut else None for s in scores]
    assert chat_payloads(stub) == []  # in process: no judge asked


def test_difficulty_from_a_two_label_classifier_is_the_positive_probability(stub, make_config, tiny, tmp_path):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny, num_labels=2)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "two")
    logits = torch.tensor(classifier_logits(tmp_path / "two", QUESTION))
    out = run_one({"prompt": QUESTION}, make_config(stub.url), checks=["difficulty"],
                  difficulty_model=str(tmp_path / "two"), device="cpu")  # fmt: skip
    assert out["difficulty"] == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-5)

    LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny, num_labels=3)).save_pretrained(tmp_path / "three")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "three")
    with pytest.raises(DifficultyModelError, match="has 3 labels"):
        run_one({"prompt": QUESTION}, make_config(stub.url), checks=["difficulty"],
                difficulty_model=str(tmp_path / "three"), device="cpu")  # fmt: skip


def with_prompt_features() -> datasets.Features:
    return datasets.Features({"prompt": datasets.Value("string"), **FEATURES})


# --- routing -----------------------------------------------------------------------------------------------------


def test_marking_routes_failed_checks_and_errors_to_rejected(stub, make_config) -> None:
    questions = [QUESTION, "Résoudre x + 1 = 2.", "How fast is the train?", "What is 7 times 8?", "Easy: 1 + 1?"]
    stub.queue("Fine.\nYes", rating(6), "No time given.\nNo", ("status", 400), "Fine.\nYes", rating(2))
    endpoint = make_config(stub.url)
    outs = [
        run_one({"prompt": q}, endpoint, checks=["language", "solvable", "difficulty"], min_difficulty=4)
        for q in questions
    ]  # one after another: the queued replies line up with the rows
    marked = Dataset.from_list([{"prompt": q, **o} for q, o in zip(questions, outs, strict=True)]).map(
        mark_failed_check
    )  # fmt: skip
    kept, rejected = split_rejected(marked)
    assert kept["prompt"] == [QUESTION]
    reasons = dict(zip(rejected["prompt"], rejected["reason"], strict=True))
    assert set(rejected["rejected_by"]) == {"filter_questions"}
    assert reasons["Résoudre x + 1 = 2."] == "language: non-ASCII character 'é' at 1"
    assert reasons["How fast is the train?"] == "solvable: the model judged it unsolvable"
    assert reasons["What is 7 times 8?"].startswith("filter_questions: POST /v1/chat/completions → HTTP 400")
    assert reasons["Easy: 1 + 1?"] == "difficulty: 2.0 < min_difficulty 4"


def test_marking_keeps_an_earlier_reason_and_needs_the_columns() -> None:
    earlier = {"rejected_by": "dedup", "reason": "duplicate", "failed_check": "language"}
    assert mark_failed_check(earlier) == {"rejected_by": "dedup", "reason": "duplicate"}
    with pytest.raises(ColumnError):
        mark_failed_check({"prompt": "x"})


# --- parameters --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"checks": ["language", "solvabel"]},
            "unknown check 'solvabel'; valid checks: language, solvable, difficulty",
        ),
        ({"checks": "language"}, "checks must be a list"),
        ({"checks": []}, "checks is empty"),
        ({"checks": ["language", "language"]}, "names a check twice"),
        ({"language": "french"}, "unknown language 'french'; use one of ascii, latin"),
        ({"min_difficulty": 3}, "need 'difficulty' in checks"),
        ({"checks": ["difficulty"], "difficulty_model": "./no/such/model"}, "does not exist"),
    ],
)
def test_bad_parameters_are_one_line(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        check(**params)
    assert "\n" not in str(err.value)


def test_the_stage_refuses_an_unknown_check_too(stub, make_config) -> None:
    with pytest.raises(ValueError, match="valid checks: language, solvable, difficulty"):
        run_one({"prompt": QUESTION}, make_config(stub.url), checks=["langauge"])
    assert chat_payloads(stub) == []


def recipe(url: str, tmp_path: Path, stage: dict[str, Any]) -> dict[str, Any]:
    source = tmp_path / "questions.jsonl"
    questions = [QUESTION, "Résoudre x + 1 = 2.", "How fast is the train?"]
    source.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    return {
        "name": "filter-test",
        "cache_path": str(tmp_path / "cache.sqlite"),
        "endpoints": {"judge": {"url": url, "backoff_s": 0.01, "timeout_s": 10}},
        "datasets": {
            "questions": {
                "source": {"dataset": str(source), "text_column": "question", "as": "prompt"},
                "stages": {"filter_questions": stage},
            }
        },
        "output": {"dir": str(tmp_path / "out")},
    }


def test_a_recipe_routes_rows_and_refuses_a_bad_check_before_running(stub, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "c"))
    with pytest.raises(ValueError, match="unknown check 'langauge'"):
        run_recipe(build_recipe(recipe(stub.url, tmp_path, {"checks": ["langauge"]})))
    assert chat_payloads(stub) == [] and not (tmp_path / "out").exists()

    stub.queue("Given.\nYes", "No time.\nNo")  # rows run concurrently: both replies pass their own checks
    out = run_recipe(build_recipe(recipe(stub.url, tmp_path, {"checks": ["language", "solvable"]})))
    kept = load_dataset(str(out), "questions", split="train")
    rejected = load_dataset(str(out), "questions", split="rejected")
    assert (kept.num_rows, rejected.num_rows) == (1, 2)
    assert "non-ASCII character 'é' at 1" in " ".join(rejected["reason"])
    assert len(chat_payloads(stub)) == 2  # the French question was never sent
    assert set(rejected["rejected_by"]) == {"filter_questions"}


def test_batched_equals_one_row_at_a_time(stub, make_config) -> None:
    ds = Dataset.from_dict({"prompt": [QUESTION, "Résoudre x + 1 = 2.", "Area is π r²."]})
    kwargs = {"endpoint": make_config(stub.url), "checks": ["language"], "language": "latin"}
    rows = ds.map(filter_questions, fn_kwargs=kwargs, features=with_prompt_features())
    batched = ds.map(filter_questions, fn_kwargs=kwargs, batched=True, batch_size=2, features=with_prompt_features())
    assert rows.to_list() == batched.to_list()
    assert rows["language_ok"] == [True, True, False]
