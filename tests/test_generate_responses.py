"""generate_responses against the stub server: N seeded requests a row, identical-response marking, failures kept
as row errors, the request cache answering a rerun, and one line for a bad column."""

from __future__ import annotations

import pytest
from datasets import Dataset

from synthq_hf import stages
from synthq_hf.endpoint import derive_seed
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.generate_responses import STAGE

PROMPTS = ["Explain tides to a child.", "Name three uses of borax."]


def chat_payloads(stub) -> list[dict]:
    return [payload for route, payload in stub.requests if route == "/v1/chat/completions"]


def run(rows: Dataset, config, **kwargs) -> Dataset:
    features = stages.output_features(rows.features, stages.generate_responses)
    return rows.map(stages.generate_responses, fn_kwargs={"endpoint": config, **kwargs}, features=features)


def test_n_seeded_requests_a_row_with_the_sampling_parameters(stub, make_config) -> None:
    rows = Dataset.from_dict({"id": ["a", "b"], "prompt": PROMPTS})
    out = run(rows, make_config(stub.url, seed=7), n=3)
    payloads = chat_payloads(stub)
    assert len(payloads) == 6  # one request per sample: TGI ignores n
    assert all(p["temperature"] == 0.8 and p["top_p"] == 0.95 and p["max_tokens"] == 1024 for p in payloads)
    assert all("n" not in p for p in payloads)
    expected = {derive_seed(7, STAGE, rid, sample) for rid in ("a", "b") for sample in range(3)}
    assert {p["seed"] for p in payloads} == expected  # (run seed, stage, row id, sample): six distinct seeds
    assert {p["messages"][-1]["content"] for p in payloads} == set(PROMPTS)  # the instruction as it is
    for row in out:
        assert row["generate_responses_error"] is None
        assert row["responses"] == ["stub reply"] * 3 and row["response_models"] == ["stub-model"] * 3
        assert row["responses_identical"] is True  # no pair can be made from three equal answers


def test_different_responses_are_kept_and_not_marked(stub, make_config) -> None:
    stub.queue("first answer", "second answer")
    out = run(
        Dataset.from_dict({"prompt": PROMPTS[:1]}), make_config(stub.url), n=2, temperature=0.3, system="Be brief."
    )
    row = out[0]
    assert sorted(row["responses"]) == ["first answer", "second answer"]
    assert row["responses_identical"] is False
    payload = chat_payloads(stub)[0]
    assert payload["temperature"] == 0.3
    assert payload["messages"][0] == {"role": "system", "content": "Be brief."}


def test_a_failed_sample_fails_the_row_and_keeps_it(stub, make_config) -> None:
    stub.queue(("status", 400, "prompt too long"))
    out = run(Dataset.from_dict({"prompt": [*PROMPTS[:1], " "]}), make_config(stub.url), n=2)
    failed, empty = out[0], out[1]
    assert failed["responses"] is None and "sample" in failed["generate_responses_error"]
    assert "HTTP 400" in failed["generate_responses_error"]
    assert empty["generate_responses_error"] == "generate_responses: empty or missing prompt"
    assert len(chat_payloads(stub)) == 2  # the blank prompt cost no request


def test_a_rerun_is_answered_by_the_request_cache(stub, make_config) -> None:
    rows = Dataset.from_dict({"prompt": PROMPTS})
    config = make_config(stub.url)
    first = run(rows, config, n=4)
    sent = len(chat_payloads(stub))
    again = run(rows, config, n=4)
    assert sent == 8 and len(chat_payloads(stub)) == sent
    assert again["responses"] == first["responses"]


def test_a_missing_column_is_one_line(stub, make_config) -> None:
    with pytest.raises(ColumnError, match="needs an input column 'prompt'"):
        run(Dataset.from_dict({"text": PROMPTS}), make_config(stub.url))
