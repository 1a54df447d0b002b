"""A prompt written as a given person would write it (Persona Hub: Ge et al. 2024, "Scaling Synthetic Data
Creation with 1,000,000,000 Personas", arXiv 2406.20094, §3 persona-driven synthesis).

Input columns: ``persona`` (str, a description of one person; ``column=`` reads another); optional ``id`` (seeds
the request).
Output columns: ``prompt`` (str: the message that person would send), ``persona_kind`` (str: which kind of message
was asked for), ``persona_prompt_error`` (str, ``None`` on success).
Prompts: ``prompts/persona_prompt.system.j2``, ``prompts/persona_prompt.user.j2`` (one pair; the user template
words the task by ``kind``, so ``prompt_hash`` covers every kind).

The persona is what makes the prompts diverse: the same request ("write a math problem") steered through a
million different people lands in a million different corners of the topic space. Kinds (:data:`KINDS`):
``instruction`` (a request to an assistant), ``math`` (a hard, self-contained math problem, no solution) and
``knowledge`` (a question or writing request that needs expert knowledge).

One kind per stage line. A recipe that wants several kinds from the same personas declares one dataset per kind
(see ``recipes/persona.yaml``): each kind is a different product, with its own config, its own later stages
(a math problem wants a solvability check, an instruction a quality score) and its own counts in the card; a
``kinds`` list inside one stage would mix them in one config and multiply rows behind the recipe's back.
The request seed comes from (run seed, stage, row id): a rerun asks the same questions and the request cache
answers them; two kinds for one persona send different messages, so they are cached apart.
"""

from __future__ import annotations

from typing import Annotated, Any

from datasets import Features, Value
from pydantic import BaseModel, Field, StringConstraints

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed
from synthq_hf.stages._common import error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.structured import StageFailure, generate

STAGE = "persona_prompt"
#: The kinds of message the user template knows how to ask for.
KINDS = ("instruction", "math", "knowledge")


class PersonaPrompt(BaseModel):
    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)] = Field(
        description="the message the person would send, in their own voice"
    )


FEATURES = Features({"prompt": Value("string"), "persona_kind": Value("string"), f"{STAGE}_error": Value("string")})
EMPTY: dict[str, Any] = {"prompt": None, "persona_kind": None}


def check(kind: str = "instruction", **_: Any) -> None:
    """Before the run (and on every call): a kind the template words, refused in one line otherwise."""
    if kind not in KINDS:
        raise ValueError(f"{STAGE}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")


async def persona_prompt(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    kind: str = "instruction",
    column: str = "persona",
    max_tokens: int = 512,
    attempts: int = 3,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``personas.map(persona_prompt, fn_kwargs={"endpoint": cfg, "kind": "math"})``.

    Sampled (``temperature`` 0.7) rather than greedy: the point of the method is diversity, and the seed per row
    keeps a rerun identical all the same.
    """
    check(kind)
    persona = read_text(row, column, STAGE)
    if persona is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing persona")
    try:
        result, _ = await generate(
            endpoint,
            prompts.render(STAGE, persona=persona.strip(), kind=kind),
            PersonaPrompt,
            stage=STAGE,
            row_id=row_id(row, persona),
            max_tokens=max_tokens,
            attempts=attempts,
            temperature=temperature,
        )
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    return {"prompt": result.prompt, "persona_kind": kind, f"{STAGE}_error": None}


STEPS = [Step(name=STAGE, kind="row", fn=persona_prompt, features=FEATURES, role="generator", check=check)]
