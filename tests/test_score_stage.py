"""score_instruction behaviour that needs exact server replies: typed output and failures that keep the row."""

from __future__ import annotations

import json

import datasets
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
