"""score_instruction behaviour that needs exact server replies: typed output and failures that keep the row."""

from __future__ import annotations

import json

import datasets
import pytest
from datasets import Dataset
from stub_server import StubServer

from synthq_hf import EndpointConfig, stages
from synthq_hf.stages.score_instruction import CRITERIA, FEATURES

datasets.disable_progress_bars()


def good_reply(score: int) -> str:
    return json.dumps({name: {"analysis": "fine", "score": score} for name in CRITERIA})


def test_a_long_streak_of_failures_still_writes_typed_columns(tmp_path) -> None:
    """datasets cannot type a column whose first 1,000 values are None; output_features fixes the schema."""
    rows = 1300
    failing = 1100
    with StubServer() as stub:
        stub.queue(*(["not json"] * failing))
        stub.queue(*([good_reply(1)] * (rows - failing)))
        cfg = EndpointConfig(url=stub.url, cache=False, max_concurrency=8)
        ds = Dataset.from_dict({"prompt": [f"instruction {i}" for i in range(rows)]})
        out = ds.map(
            stages.score_instruction,
            fn_kwargs={"endpoint": cfg, "attempts": 1},
            features=stages.output_features(ds.features, stages.score_instruction),
        )
    assert out.num_rows == rows
    errors = out["score_instruction_error"]
    assert sum(e is not None for e in errors) == failing
    assert all("not valid JSON" in e and "'not json'" in e for e in errors if e is not None)
    totals = [t for t in out["total_score"] if t is not None]
    assert totals == [7] * (rows - failing)
    assert out.features["scores"] == FEATURES["scores"]


def test_raw_newlines_inside_strings_parse_but_the_schema_still_rules() -> None:
    """llama-cpp-python's JSON grammar lets raw control characters into strings; the object is still checked."""
    from synthq_hf.stages.score_instruction import InstructionScore
    from synthq_hf.structured import StageFailure, parse_reply

    good = "{" + ", ".join(f'"{c}": {{"analysis": "first line\nsecond", "score": 0}}' for c in CRITERIA) + "}"
    assert parse_reply(good, InstructionScore).creativity.analysis == "first line\nsecond"
    missing = "{" + ", ".join(f'"{c}": {{"analysis": "x\ny", "score": 0}}' for c in CRITERIA[:-1]) + "}"
    try:
        parse_reply(missing, InstructionScore)
    except StageFailure as err:
        assert "real_world_application" in err.reason
    else:
        raise AssertionError("a reply missing a criterion must fail")


# -- the batched form (stages/_batch.py) ---------------------------------------------------------------------------

BATCH_ROWS = {
    "id": [f"r{i}" if i % 3 else None for i in range(11)],  # some rows seed from their text instead of an id
    "prompt": [f"Instruction {i}: plan a week of meals." if i != 4 else "   " for i in range(11)],  # one empty
}


def _seeded_stub() -> StubServer:
    """Replies whose scores depend on each request's seed, so rows mixed up between forms would show."""
    stub = StubServer()
    stub.seeded_replies = True
    return stub


def test_batched_form_gives_the_per_row_outputs(tmp_path) -> None:
    with _seeded_stub() as stub:
        cfg = EndpointConfig(url=stub.url, cache=False)
        ds = Dataset.from_dict(BATCH_ROWS)
        per_row = ds.map(stages.score_instruction, fn_kwargs={"endpoint": cfg})
        row_payloads = sorted(json.dumps(p, sort_keys=True) for _, p in stub.requests)
        features = stages.output_features(ds.features, stages.score_instruction)  # see stages/_batch.py
        batched = ds.map(
            stages.score_instruction, batched=True, batch_size=4, fn_kwargs={"endpoint": cfg}, features=features
        )
        batch_payloads = sorted(json.dumps(p, sort_keys=True) for _, p in stub.requests[len(row_payloads) :])
    assert batched.to_list() == per_row.to_list()
    assert batch_payloads == row_payloads  # the same requests crossed the wire
    totals = per_row["total_score"]
    assert len(set(t for t in totals if t is not None)) > 1  # the seeded replies really differ per row
    assert per_row[4]["score_instruction_error"] is not None and per_row[4]["total_score"] is None
    assert sum(e is None for e in per_row["score_instruction_error"]) == 10


def test_batched_form_on_an_iterable_dataset(tmp_path) -> None:
    with _seeded_stub() as stub:
        cfg = EndpointConfig(url=stub.url, cache=False)
        expected = Dataset.from_dict(BATCH_ROWS).map(stages.score_instruction, fn_kwargs={"endpoint": cfg}).to_list()
        streamed = (
            Dataset.from_dict(BATCH_ROWS)
            .to_iterable_dataset()
            .map(stages.score_instruction, batched=True, batch_size=3, fn_kwargs={"endpoint": cfg})
        )
        rows = list(streamed)
    assert rows == expected


def test_batched_form_reads_the_cache_the_per_row_form_wrote(tmp_path) -> None:
    with _seeded_stub() as stub:
        cfg = EndpointConfig(url=stub.url, cache_path=str(tmp_path / "c.sqlite"))
        ds = Dataset.from_dict(BATCH_ROWS)
        per_row = ds.map(stages.score_instruction, fn_kwargs={"endpoint": cfg})
        sent = len(stub.requests)
        features = stages.output_features(ds.features, stages.score_instruction)
        batched = ds.map(
            stages.score_instruction, batched=True, batch_size=5, fn_kwargs={"endpoint": cfg}, features=features
        )
        assert len(stub.requests) == sent  # every row a cache hit: nothing sent
    assert batched.to_list() == per_row.to_list()


def test_batched_form_raises_the_per_row_column_errors() -> None:
    from synthq_hf.stages._common import ColumnError

    cfg = EndpointConfig(url="http://127.0.0.1:9", cache=False)  # never contacted: the column check comes first
    for columns, expected in (({"text": ["a", "b"]}, "'prompt'"), ({"prompt": [1, 2]}, "int")):
        with pytest.raises(ColumnError, match=expected):
            Dataset.from_dict(columns).map(stages.score_instruction, batched=True, fn_kwargs={"endpoint": cfg})


def test_a_row_whose_prompt_is_a_list_is_still_a_column_error() -> None:
    """The batch test (every column a list of one length) must not mistake such a row for a batch."""
    from synthq_hf.stages._common import ColumnError

    cfg = EndpointConfig(url="http://127.0.0.1:9", cache=False)
    ds = Dataset.from_dict({"prompt": [["a", "b"]], "id": ["x"]})
    with pytest.raises(ColumnError, match="list"):
        ds.map(stages.score_instruction, fn_kwargs={"endpoint": cfg})
