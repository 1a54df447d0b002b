"""Write a new instruction grounded in a corpus document, shown grounded seeds as examples (SynthQuestions §3.2).

Input columns: ``document`` (str; ``document_column=`` names another, e.g. FineWeb's ``text``); optional ``id``.
Output columns: ``thought`` (str), ``scene`` (str), ``query_compositions`` (struct: ``ability``, ``knowledge``,
``extra_information``, ``output``), ``prompt`` (str: the new instruction), ``demonstration_ids`` (list of str),
``generate_instruction_error`` (str, ``None`` on success).
Prompts: ``prompts/generate_instruction.system.j2``, ``.user.j2`` and ``.demo.j2`` (one example block).

Demonstrations: the ``ground`` output (a ``Dataset`` with ``prompt``, ``document``, ``scene``,
``query_compositions``; rows with a ``ground_error`` or empty fields are skipped). For each row, ``k`` of them are
sampled with a seed derived from the run seed and the row id, so a rerun shows the same examples and neighbouring
rows see different ones. They join the prompt in sampled order while the whole prompt (system + user messages,
counted by tokens, :mod:`synthq_hf.tokens`) stays within ``token_budget``; one that does not fit is skipped and
the next one tried. The row's document is cut to ``max_document_tokens`` tokens (and further if the fixed part of
the prompt leaves less room); each example's document to ``max_demo_document_tokens`` (default: the same limit).
Keep ``token_budget`` plus the reply's ``max_tokens`` within the server's context window.
"""

from __future__ import annotations

import random
from typing import Annotated, Any

from datasets import Dataset, Features, List, Value
from pydantic import BaseModel, Field, StringConstraints

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed, derive_seed, get_client
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.ground import COMPOSITION_FEATURES, COMPOSITIONS, QueryCompositions
from synthq_hf.structured import StageFailure, generate
from synthq_hf.tokens import count_tokens, truncate_tokens

STAGE = "generate_instruction"
#: Tokens a chat template adds around each message (role header, separators); a safe upper bound for the
#: templates of common instruct models, added to the counted text so the budget holds for the whole request.
MESSAGE_OVERHEAD_TOKENS = 8


class GeneratedInstruction(BaseModel):
    """Field order is generation order: the model reasons (thought) before it writes the request."""

    thought: str = Field(max_length=600, description="what in the document could prompt a real request, and who")
    scene: str = Field(max_length=400, description="who the person is and why they ask now")
    query_compositions: QueryCompositions
    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = Field(
        max_length=1000, description="the new request, self-contained"
    )


FEATURES = Features(
    {
        "thought": Value("string"),
        "scene": Value("string"),
        "query_compositions": COMPOSITION_FEATURES,
        "prompt": Value("string"),
        "demonstration_ids": List(Value("string")),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {
    "thought": None,
    "scene": None,
    "query_compositions": None,
    "prompt": None,
    "demonstration_ids": None,
}


class DemonstrationsError(ValueError):
    """The demonstrations dataset cannot serve as examples: every row would fail the same way."""


_POOLS: dict[str, list[dict[str, Any]]] = {}


def demonstration_pool(demonstrations: Dataset) -> list[dict[str, Any]]:
    """The usable grounded seeds, read once per process (keyed by the dataset's fingerprint)."""
    key = demonstrations._fingerprint
    pool = _POOLS.get(key)
    if pool is not None:
        return pool
    needed = {"prompt", "document", "scene", "query_compositions"}
    missing = needed - set(demonstrations.column_names)
    if missing:
        raise DemonstrationsError(
            f"{STAGE}: the demonstrations dataset lacks columns {sorted(missing)} (it has "
            f"{demonstrations.column_names}); pass the output of the ground stage"
        )
    pool = []
    for row in demonstrations.to_list():
        compositions = row.get("query_compositions") or {}
        fields = [row.get(name) for name in ("prompt", "document", "scene")]
        fields += [compositions.get(name) for name in COMPOSITIONS]
        if row.get("ground_error") or not all(isinstance(v, str) and v.strip() for v in fields):
            continue
        pool.append({**row, "id": row_id(row, row["prompt"])})
    _POOLS[key] = pool
    return pool


def sample_demonstrations(pool: list[dict[str, Any]], k: int, run_seed: int, rid: str) -> list[dict[str, Any]]:
    """``k`` demonstrations for row ``rid``: the same for the same (run seed, row), different across rows."""
    rng = random.Random(derive_seed(run_seed, f"{STAGE}:demonstrations", rid))
    return [pool[i] for i in rng.sample(range(len(pool)), min(k, len(pool)))]


async def _messages_tokens(messages: list[dict[str, str]], endpoint: EndpointConfig, tokenizer: str | None) -> int:
    total = 0
    for message in messages:
        total += await count_tokens(message["content"], endpoint, tokenizer) + MESSAGE_OVERHEAD_TOKENS
    return total


async def generate_instruction(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    demonstrations: Dataset,
    k: int = 10,
    token_budget: int = 7500,
    max_document_tokens: int = 4096,
    max_demo_document_tokens: int | None = None,
    tokenizer: str | None = None,
    document_column: str = "document",
    max_tokens: int = 1000,
    attempts: int = 3,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``docs.map(generate_instruction, fn_kwargs={"endpoint": e, "demonstrations": d})``."""
    document = read_text(row, document_column, STAGE)
    pool = demonstration_pool(demonstrations) if k > 0 else []
    if k > 0 and not pool:
        raise DemonstrationsError(
            f"{STAGE}: none of the {len(demonstrations)} demonstration rows is grounded (all have a ground_error "
            "or empty prompt/document/scene/compositions); check the ground stage's output or pass k=0"
        )
    if document is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing {document_column}")
    rid = row_id(row, document)
    try:
        fixed = await _messages_tokens(prompts.render(STAGE, document="", examples=[]), endpoint, tokenizer)
        budget = token_budget
        info = await get_client(endpoint).info()
        if info.max_input_tokens:
            budget = min(budget, info.max_input_tokens)
        room = min(max_document_tokens, budget - fixed)
        if room <= 0:
            return failure(STAGE, EMPTY, f"{STAGE}: token_budget={budget} leaves no room for the document")
        document, document_tokens, _ = await truncate_tokens(document, room, endpoint, tokenizer)
        used = fixed + document_tokens
        examples: list[str] = []
        chosen: list[str] = []
        demo_limit = max_demo_document_tokens or max_document_tokens
        for demo in sample_demonstrations(pool, k, endpoint.seed, rid):
            demo_document, _, _ = await truncate_tokens(demo["document"], demo_limit, endpoint, tokenizer)
            block = prompts.render_part(f"{STAGE}.demo", **{**demo, "document": demo_document})
            # "Example N" header and the blank line after the block: a handful of tokens.
            cost = await count_tokens(block, endpoint, tokenizer) + 6
            if used + cost > budget:
                continue
            used += cost
            examples.append(block)
            chosen.append(demo["id"])
        result, _ = await generate(
            endpoint,
            prompts.render(STAGE, document=document, examples=examples),
            GeneratedInstruction,
            stage=STAGE,
            row_id=rid,
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    return {
        "thought": result.thought.strip(),
        "scene": result.scene.strip(),
        "query_compositions": {name: getattr(result.query_compositions, name).strip() for name in COMPOSITIONS},
        "prompt": result.prompt.strip(),
        "demonstration_ids": chosen,
        f"{STAGE}_error": None,
    }


STEPS = [
    Step(
        name=STAGE,
        kind="row",
        fn=generate_instruction,
        features=FEATURES,
        role="generator",
        needs={"demonstrations": "dataset"},
    )
]
