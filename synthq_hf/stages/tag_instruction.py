"""Tag an instruction with its input quality, difficulty, intent and task category (Magpie, Xu et al. 2024, arXiv
2406.08464 §2.2: the raw queries an aligned model writes from its pre-query template are filtered by LLM tags).

Input columns: ``prompt`` (str); optional ``id`` (seeds the request).
Output columns: ``input_quality`` (str, one of :data:`QUALITY`), ``quality_explanation`` (str),
``difficulty`` (str, one of :data:`DIFFICULTY`), ``intent`` (str: what the user wants, one sentence),
``task_category`` (str, one of :data:`CATEGORIES`), ``tag_instruction_error`` (str, ``None`` on success).
Prompts: ``prompts/tag_instruction.system.j2``, ``prompts/tag_instruction.user.j2``.

Magpie asks three separate prompts (intent and difficulty, quality, category); here one structured request gives
all four tags, since each needs the same reading of the query and a constrained decoder keeps the labels exact.
Labels are ordered (worst/easiest first), so the recipe line filters on them: ``min_quality`` (default
``average``, Magpie's "average or better"), ``min_difficulty``, ``max_difficulty``. Filtering is the ``post``
function :func:`mark_tags`, so a rejected row keeps its tags and says why.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from datasets import Features, Value
from pydantic import BaseModel, Field

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed
from synthq_hf.stages._batch import batchable
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.stages.reject import mark_rejected
from synthq_hf.structured import StageFailure, generate

STAGE = "tag_instruction"

Quality = Literal["very poor", "poor", "average", "good", "excellent"]
Difficulty = Literal["very easy", "easy", "medium", "hard", "very hard"]
Category = Literal[
    "information seeking",
    "reasoning",
    "math",
    "coding",
    "data analysis",
    "creative writing",
    "editing",
    "advice seeking",
    "planning",
    "brainstorming",
    "role playing",
    "others",
]
#: The labels in order, worst (or easiest) first: the order the filters compare in.
QUALITY: tuple[str, ...] = get_args(Quality)
DIFFICULTY: tuple[str, ...] = get_args(Difficulty)
CATEGORIES: tuple[str, ...] = get_args(Category)


class InstructionTags(BaseModel):
    """The tags in the order the prompt asks for them: understand the request first, then judge it."""

    intent: str = Field(max_length=240, description="what the user wants, one sentence")
    task_category: Category
    difficulty: Difficulty
    quality_explanation: str = Field(max_length=400, description="one or two sentences on clarity and context")
    input_quality: Quality


FEATURES = Features(
    {
        "input_quality": Value("string"),
        "quality_explanation": Value("string"),
        "difficulty": Value("string"),
        "intent": Value("string"),
        "task_category": Value("string"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {name: None for name in FEATURES if name != f"{STAGE}_error"}


@batchable("prompt")
async def tag_instruction(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    max_tokens: int = 512,
    attempts: int = 3,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(tag_instruction, fn_kwargs={"endpoint": judge})``, then
    ``ds.map(mark_tags, fn_kwargs={"min_quality": "good"})`` to route rows by their tags.

    The filters (``min_quality``, ``min_difficulty``, ``max_difficulty``) are :func:`mark_tags`'s parameters; a
    recipe line takes both functions' parameters.
    """
    text = read_text(row, "prompt", STAGE)
    if text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    try:
        tags, _ = await generate(
            endpoint,
            prompts.render(STAGE, instruction=text, categories=CATEGORIES),
            InstructionTags,
            stage=STAGE,
            row_id=row_id(row, text),
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    return {**tags.model_dump(), f"{STAGE}_error": None}


def _rank(labels: tuple[str, ...], value: str | None, param: str) -> int | None:
    """The label's place in its order; a label outside it is a typo in the recipe, refused in one line."""
    if value is None:
        return None
    if value not in labels:
        raise ValueError(f"{STAGE}: unknown {param} {value!r}; use one of {', '.join(labels)}")
    return labels.index(value)


def check(
    min_quality: str | None = "average",
    min_difficulty: str | None = None,
    max_difficulty: str | None = None,
    **_: Any,
) -> None:
    """Before the run: every bound is a known label, and the difficulty bounds leave something between them."""
    _rank(QUALITY, min_quality, "min_quality")
    low = _rank(DIFFICULTY, min_difficulty, "min_difficulty")
    high = _rank(DIFFICULTY, max_difficulty, "max_difficulty")
    if low is not None and high is not None and low > high:
        raise ValueError(f"{STAGE}: min_difficulty {min_difficulty!r} is above max_difficulty {max_difficulty!r}")


def mark_tags(
    row: dict[str, Any],
    min_quality: str | None = "average",
    min_difficulty: str | None = None,
    max_difficulty: str | None = None,
) -> dict[str, Any]:
    """``Dataset.map`` function after :func:`tag_instruction`: ``rejected_by``/``reason`` as ``stages.reject``
    writes them. A row an earlier stage rejected or failed keeps that first reason (a prompt that was never
    written is not our rejection); a row we could not tag is rejected with our error (untagged is not good)."""
    check(min_quality, min_difficulty, max_difficulty)
    earlier = mark_rejected(row, threshold=None)
    if earlier["rejected_by"]:
        return earlier
    quality, difficulty = row.get("input_quality"), row.get("difficulty")
    if quality not in QUALITY or difficulty not in DIFFICULTY:
        return {"rejected_by": STAGE, "reason": f"{STAGE}: not tagged"}
    if min_quality is not None and QUALITY.index(quality) < QUALITY.index(min_quality):
        return {"rejected_by": STAGE, "reason": f"{STAGE}: input_quality {quality} < {min_quality}"}
    if min_difficulty is not None and DIFFICULTY.index(difficulty) < DIFFICULTY.index(min_difficulty):
        return {"rejected_by": STAGE, "reason": f"{STAGE}: difficulty {difficulty} < {min_difficulty}"}
    if max_difficulty is not None and DIFFICULTY.index(difficulty) > DIFFICULTY.index(max_difficulty):
        return {"rejected_by": STAGE, "reason": f"{STAGE}: difficulty {difficulty} > {max_difficulty}"}
    return {"rejected_by": None, "reason": None}


STEPS = [
    Step(
        name=STAGE,
        kind="row",
        fn=tag_instruction,
        features=FEATURES,
        role="judge",
        post=mark_tags,
        post_features=REJECT_FEATURES,
        check=check,
    )
]
