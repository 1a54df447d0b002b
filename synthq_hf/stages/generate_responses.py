"""N sampled responses per instruction: the candidates a reward model ranks into preference pairs (SynthQuestions
release: 100K pairs annotated with ArmoRM; issue 10).

Input columns: ``prompt`` (str); optional ``id`` (seeds the requests).
Output columns: ``responses`` (list of N str, in sample order), ``response_models`` (list of N str: the model each
came from, as the server names it), ``responses_identical`` (bool: all N the same text, so no pair can be made),
``generate_responses_error`` (str, ``None`` on success).
Prompts: none of ours: the instruction is the user turn as it is (``system=`` adds a system turn), since the
responses are what a model answers to that instruction, not to our wording around it.

One request per sample, each with its own seed from (run seed, stage, row id, sample): TGI ignores ``n``, and
separate seeds make a rerun ask exactly the same N questions, so the request cache answers all of them. The N
go out concurrently. A sample that fails for good fails the row (a pair drawn from fewer candidates than asked
would be a different experiment); the row keeps its place with the reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from datasets import Features, List, Value

from synthq_hf.endpoint import EndpointConfig, RequestFailed, get_client
from synthq_hf.stages._common import failure, read_text, row_id
from synthq_hf.stages._step import Step

STAGE = "generate_responses"

FEATURES = Features(
    {
        "responses": List(Value("string")),
        "response_models": List(Value("string")),
        "responses_identical": Value("bool"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {"responses": None, "response_models": None, "responses_identical": None}


async def generate_responses(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    n: int = 5,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_tokens: int = 1024,
    system: str | None = None,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(generate_responses, fn_kwargs={"endpoint": cfg, "n": 5})``."""
    if n < 1:
        raise ValueError(f"{STAGE}: n must be at least 1, got {n}")
    text = read_text(row, "prompt", STAGE)
    if text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    client = get_client(endpoint)
    rid = row_id(row, text)
    params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    replies = await asyncio.gather(
        *(client.chat(messages, stage=STAGE, row_id=rid, sample=i, **params) for i in range(n)),
        return_exceptions=True,  # every sample ends (and is cached) before the row decides
    )
    for sample, reply in enumerate(replies):
        if isinstance(reply, RequestFailed):
            return failure(STAGE, EMPTY, f"{STAGE}: sample {sample + 1} of {n}: {reply}")
        if isinstance(reply, BaseException):
            raise reply  # the endpoint itself (unreachable, credentials): one line for the whole run
    model = (await client.info()).model
    responses = [reply.text for reply in replies]
    return {
        "responses": responses,
        "response_models": [model] * n,
        "responses_identical": len(set(responses)) == 1,
        f"{STAGE}_error": None,
    }


STEPS = [Step(name=STAGE, kind="row", fn=generate_responses, features=FEATURES, role="generator")]
