"""Ground a seed instruction in its document: the scene behind it and what it is made of (SynthQuestions §3.1).

Input columns: ``prompt`` (str), ``document`` (str, from ``search_documents``); optional ``id``.
Output columns: ``scene`` (str: who asks and why), ``query_compositions`` (struct: ``ability``, ``knowledge``,
``extra_information``, ``output``), ``ground_error`` (str, ``None`` on success).
Prompts: ``prompts/ground.system.j2``, ``prompts/ground.user.j2``.

Grounded seeds are the *demonstrations* that ``generate_instruction`` shows the generator. The document is cut to
``max_document_tokens`` by tokens (see :mod:`synthq_hf.tokens`), so a 1 MB page costs a bounded prompt.
"""

from __future__ import annotations

from typing import Any

from datasets import Features, Value
from pydantic import BaseModel, Field

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.structured import StageFailure, generate
from synthq_hf.tokens import truncate_tokens

STAGE = "ground"
COMPOSITIONS = ("ability", "knowledge", "extra_information", "output")


class QueryCompositions(BaseModel):
    ability: str = Field(max_length=200, description="the skill the assistant must use")
    knowledge: str = Field(max_length=300, description="the facts or expertise the answer rests on")
    extra_information: str = Field(max_length=300, description="material the person supplied, or 'none'")
    output: str = Field(max_length=200, description="the form of answer the person expects")


class Grounding(BaseModel):
    scene: str = Field(max_length=400, description="who the person is and why they ask now")
    query_compositions: QueryCompositions


COMPOSITION_FEATURES = {name: Value("string") for name in COMPOSITIONS}
FEATURES = Features(
    {"scene": Value("string"), "query_compositions": COMPOSITION_FEATURES, f"{STAGE}_error": Value("string")}
)
EMPTY: dict[str, Any] = {"scene": None, "query_compositions": None}


async def ground(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    max_document_tokens: int = 4096,
    tokenizer: str | None = None,
    max_tokens: int = 500,
    attempts: int = 3,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``seeds.map(ground, fn_kwargs={"endpoint": cfg})``."""
    text = read_text(row, "prompt", STAGE)
    document = read_text(row, "document", STAGE)
    if text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    if document is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing document")
    try:
        document, _, _ = await truncate_tokens(document, max_document_tokens, endpoint, tokenizer)
        result, _ = await generate(
            endpoint,
            prompts.render(STAGE, instruction=text, document=document),
            Grounding,
            stage=STAGE,
            row_id=row_id(row, text),
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    return {
        "scene": result.scene.strip(),
        "query_compositions": {name: getattr(result.query_compositions, name).strip() for name in COMPOSITIONS},
        f"{STAGE}_error": None,
    }


STEPS = [Step(name=STAGE, kind="row", fn=ground, features=FEATURES, role="generator")]
