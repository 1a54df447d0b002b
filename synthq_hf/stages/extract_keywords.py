"""Extract the intention and search keywords of a seed instruction (SynthQuestions §3.1, attribution step 1).

Input columns: ``prompt`` (str); optional ``id`` (seeds the request).
Output columns: ``intention`` (str), ``keywords`` (list of 1–5 str), ``extract_keywords_error`` (str, ``None`` on
success).
Prompts: ``prompts/extract_keywords.system.j2``, ``prompts/extract_keywords.user.j2``.

The keywords feed ``search_documents``: titles of books, songs, films and articles stay whole and typos are fixed
so the search finds the page the person had in mind.
"""

from __future__ import annotations

from typing import Annotated, Any

from datasets import Features, List, Value
from pydantic import BaseModel, Field, StringConstraints

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.structured import StageFailure, generate

STAGE = "extract_keywords"
Keyword = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=80)]


class Keywords(BaseModel):
    intention: str = Field(max_length=240, description="what the person wants to get done, one sentence")
    keywords: list[Keyword] = Field(min_length=1, max_length=5, description="search keywords, most useful first")


FEATURES = Features(
    {"intention": Value("string"), "keywords": List(Value("string")), f"{STAGE}_error": Value("string")}
)
EMPTY: dict[str, Any] = {"intention": None, "keywords": None}


async def extract_keywords(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    max_tokens: int = 200,
    attempts: int = 3,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``seeds.map(extract_keywords, fn_kwargs={"endpoint": cfg})``."""
    text = read_text(row, "prompt", STAGE)
    if text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    try:
        result, _ = await generate(
            endpoint,
            prompts.render(STAGE, instruction=text),
            Keywords,
            stage=STAGE,
            row_id=row_id(row, text),
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    # Case-insensitive de-duplication keeps the model's order: a repeated keyword adds nothing to a search.
    seen: set[str] = set()
    keywords = [k for k in result.keywords if not (k.casefold() in seen or seen.add(k.casefold()))]
    return {"intention": result.intention.strip(), "keywords": keywords, f"{STAGE}_error": None}


STEPS = [Step(name=STAGE, kind="row", fn=extract_keywords, features=FEATURES, role="generator")]
