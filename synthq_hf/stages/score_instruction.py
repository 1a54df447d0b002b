"""Score an instruction on seven complexity criteria (SynthQuestions §3.3, quality filtering).

Input columns: ``prompt`` (str); optional ``id`` (seeds the request).
Output columns: ``scores`` (dict criterion → 0/1), ``score_analysis`` (dict criterion → one sentence),
``total_score`` (int 0–7), ``score_instruction_error`` (str, ``None`` on success).
Prompts: ``prompts/score_instruction.system.j2``, ``prompts/score_instruction.user.j2``.

The paper keeps instructions that meet at least three criteria; the threshold filter lives with the recipe so
that rejected rows keep their scores and reason.

``FEATURES`` types the output columns. Pass them to ``map`` (``stages.output_features``) when a run may start
with a long streak of failures: ``datasets`` refuses to type a column whose first 1,000 values are all ``None``.
"""

from __future__ import annotations

from typing import Any, Literal

from datasets import Features, Value
from pydantic import BaseModel, Field

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed
from synthq_hf.stages._batch import batchable
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.structured import StageFailure, generate

STAGE = "score_instruction"
CRITERIA = (
    "specificity",
    "domain_knowledge",
    "complexity",
    "problem_solving",
    "creativity",
    "technical_accuracy",
    "real_world_application",
)


class Criterion(BaseModel):
    analysis: str = Field(max_length=120, description="one short sentence")
    score: Literal[0, 1]


class InstructionScore(BaseModel):
    """One field per criterion, in the order the prompt lists them (analysis before score: think, then grade)."""

    specificity: Criterion
    domain_knowledge: Criterion
    complexity: Criterion
    problem_solving: Criterion
    creativity: Criterion
    technical_accuracy: Criterion
    real_world_application: Criterion


FEATURES = Features(
    {
        "scores": {name: Value("int64") for name in CRITERIA},
        "score_analysis": {name: Value("string") for name in CRITERIA},
        "total_score": Value("int64"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {"scores": None, "score_analysis": None, "total_score": None}


@batchable("prompt")
async def score_instruction(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    max_tokens: int = 700,
    attempts: int = 3,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(score_instruction, fn_kwargs={"endpoint": cfg})``.

    Also batched, with the same outputs and far less per-row overhead in ``datasets`` against a fast server:
    ``ds.map(score_instruction, batched=True, batch_size=256, fn_kwargs={"endpoint": cfg}, features=...)`` with
    ``features=stages.output_features(ds.features, score_instruction)`` (see ``_batch``: why the features).
    """
    text = read_text(row, "prompt", STAGE)
    if text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    try:
        result, _ = await generate(
            endpoint,
            prompts.render(STAGE, instruction=text),
            InstructionScore,
            stage=STAGE,
            row_id=row_id(row, text),
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    scores = {name: getattr(result, name).score for name in CRITERIA}
    return {
        "scores": scores,
        "score_analysis": {name: getattr(result, name).analysis for name in CRITERIA},
        "total_score": sum(scores.values()),
        f"{STAGE}_error": None,
    }


STEPS = [Step(name=STAGE, kind="row", fn=score_instruction, features=FEATURES, role="judge")]
