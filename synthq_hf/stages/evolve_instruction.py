"""Evolve an instruction over several rounds, eliminating failed evolutions (Evol-Instruct: WizardLM, Xu et al.
2023, arXiv 2304.12244, §3: instruction evolver and instruction eliminator).

Input columns: ``prompt`` (str, the seed instruction, never overwritten); optional ``id`` (seeds the requests and
the choice of operation).
Output columns: ``evolved_prompt`` (str: the last surviving instruction, the seed itself when no round survived),
``evolved_response`` (str: the response to ``evolved_prompt``, ``None`` when no round survived), ``evolution``
(list of ``{round, operation, instruction, eliminated_by}``, one per round; ``eliminated_by`` is ``None`` for a
kept round, else the rule's name), ``evolution_rounds_kept`` (int), ``evolve_instruction_error`` (str, ``None``
on success).
Prompts: ``prompts/evolve_instruction.system.j2`` / ``.user.j2`` (one template, the operation a Jinja variable),
``prompts/evolve_instruction.gain.system.j2`` / ``.user.j2`` (the information-gain check). The response is asked with
the candidate as the user turn as it is, like ``generate_responses``: it is what a model answers to it.

Each round picks one operation with ``random.Random(derive_seed(run seed, "evolve_instruction.operation", row id,
round))``: five in-depth ones (``add_constraints``, ``deepen``, ``concretize``, ``increase_reasoning``,
``complicate_input``) and the in-breadth one (``breadth``: a new instruction in the same domain on a rarer
topic). The candidate is then checked against the paper's elimination rules, cheapest first, and the first rule
that fires names the elimination (a candidate eliminated by one rule costs no further request):

1. ``copied_template_words``: it contains wording of our prompt (:data:`TEMPLATE_WORDS`) its parent did not.
2. ``no_information_gain``: it adds nothing to its parent: the same text once whitespace and case are folded (no
   request), else by the LLM's verdict (reasoning, then a strict JSON boolean ``adds_information``; a reply that
   is not one is a row error, the stage never guesses). The paper asks whether the two are equal; we ask the
   same question the other way round, so that the verdict names the rule.
3. ``refusal``: the response opens with a refusal (:data:`REFUSAL_MARKERS` in its first
   :data:`REFUSAL_OPENING_CHARS` characters): a refusal says so up front, while "sorry to hear" deep inside a
   long answer is no refusal.
4. ``too_short``: the response has fewer than ``min_response_words`` words (the paper's 80): a model that could
   not really answer.

An eliminated round leaves the row on its last survivor, and the next round evolves that survivor again (with
its own operation): one bad draw costs a round, not the row's whole evolution. A row whose every round was
eliminated is routed to ``rejected`` by :func:`mark_all_eliminated` (the recipe runs it right after the stage).
A failed request or an invalid reply fails the row (columns ``None`` and the error), as in every stage.
"""

from __future__ import annotations

import random
import re
from typing import Any

from datasets import Features, List, Value
from pydantic import BaseModel, Field, StrictBool

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed, derive_seed, get_client
from synthq_hf.stages._common import ColumnError, error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.structured import StageFailure, generate

STAGE = "evolve_instruction"
DEPTH_OPERATIONS = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input")
BREADTH_OPERATIONS = ("breadth",)
OPERATIONS = DEPTH_OPERATIONS + BREADTH_OPERATIONS
RULES = ("copied_template_words", "no_information_gain", "refusal", "too_short")

#: Wording of our evolution prompt (lower case, matched case-insensitively) that has no business in a new
#: instruction, plus the labels of the paper's prompt, which models trained on Evol-Instruct data echo.
TEMPLATE_WORDS = (
    "original instruction",
    "rewritten instruction",
    "evolved instruction",
    "given instruction",
    "<instruction>",
    "</instruction>",
    "#rewritten prompt#",
    "#given prompt#",
    "rewritten prompt",
    "given prompt",
)
#: Openings of a refusal (lower case, straight apostrophes), matched as whole words.
REFUSAL_MARKERS = (
    "sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i can not",
    "i am unable",
    "i'm unable",
    "i won't",
    "i will not",
    "as an ai",
)
REFUSAL_OPENING_CHARS = 300
_REFUSAL = re.compile(r"\b(?:" + "|".join(re.escape(m) for m in REFUSAL_MARKERS) + r")\b")

# Request kinds within a round: each request of a row gets its own sample index, so its own seed.
_EVOLVE, _JUDGE, _RESPOND = 0, 1, 2


class EvolvedInstruction(BaseModel):
    instruction: str = Field(min_length=1, max_length=4000, description="the rewritten instruction, on its own")


class Gain(BaseModel):
    """Reasoning before the verdict: think, then decide. ``StrictBool``: only JSON ``true``/``false`` count."""

    reasoning: str = Field(max_length=600, description="one to three sentences")
    adds_information: StrictBool


ROUND_FEATURES = {
    "round": Value("int64"),
    "operation": Value("string"),
    "instruction": Value("string"),
    "eliminated_by": Value("string"),
}
FEATURES = Features(
    {
        "evolved_prompt": Value("string"),
        "evolved_response": Value("string"),
        "evolution": List(ROUND_FEATURES),
        "evolution_rounds_kept": Value("int64"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = {
    "evolved_prompt": None,
    "evolved_response": None,
    "evolution": None,
    "evolution_rounds_kept": None,
}


def check(rounds: int = 3, operations: list[str] | None = None, min_response_words: int = 80, **_: Any) -> None:
    """Refuse a bad recipe line before any request: rounds, operation names, the word threshold."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"{STAGE}: rounds must be a positive number, got {rounds!r}")
    if operations is not None:
        unknown = [op for op in operations if op not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(
                f"{STAGE}: unknown operations {', '.join(map(str, unknown)) or '(none given)'}; "
                f"use some of {', '.join(OPERATIONS)}"
            )
    if not isinstance(min_response_words, int) or min_response_words < 0:
        raise ValueError(f"{STAGE}: min_response_words must be a number >= 0, got {min_response_words!r}")


def pick_operation(run_seed: int, rid: str, round_number: int, operations: tuple[str, ...]) -> str:
    """The round's operation, from (run seed, row id, round) only: a rerun evolves every row the same way."""
    return random.Random(derive_seed(run_seed, f"{STAGE}.operation", rid, round_number)).choice(operations)


def copied_template_words(candidate: str, parent: str) -> list[str]:
    """Our prompt's words in ``candidate`` that ``parent`` did not already hold (those it inherited honestly)."""
    text, before = candidate.casefold(), parent.casefold()
    return [word for word in TEMPLATE_WORDS if word in text and word not in before]


def is_refusal(response: str) -> bool:
    opening = response[:REFUSAL_OPENING_CHARS].casefold().replace("\u2019", "'")
    return _REFUSAL.search(opening) is not None


def _folded(text: str) -> str:
    return " ".join(text.casefold().split())


async def evolve_instruction(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    rounds: int = 3,
    operations: list[str] | None = None,
    min_response_words: int = 80,
    max_tokens: int = 1024,
    judge_max_tokens: int = 256,
    attempts: int = 3,
    temperature: float = 0.7,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(evolve_instruction, fn_kwargs={"endpoint": cfg, "rounds": 3})``.

    ``max_tokens`` bounds both the evolved instruction and the response; ``temperature`` applies to both (the
    information-gain check runs at 0: a verdict, not a sample). Requests per row: up to three a round (evolve, compare,
    respond), fewer when a cheap rule eliminates the candidate first.
    """
    check(rounds, operations, min_response_words)
    chosen = tuple(operations) if operations else OPERATIONS
    seed_text = read_text(row, "prompt", STAGE)
    if seed_text is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    rid = row_id(row, seed_text)
    survivor, response, history = seed_text, None, []
    try:
        for number in range(1, rounds + 1):
            operation = pick_operation(endpoint.seed, rid, number, chosen)
            candidate, answer, rule = await _round(
                endpoint, rid, number, operation, survivor, min_response_words, max_tokens, judge_max_tokens,
                attempts, temperature,
            )  # fmt: skip
            history.append({"round": number, "operation": operation, "instruction": candidate, "eliminated_by": rule})
            if rule is None:
                survivor, response = candidate, answer
    except (StageFailure, RequestFailed) as err:
        return failure(STAGE, EMPTY, error_reason(STAGE, err))
    return {
        "evolved_prompt": survivor,
        "evolved_response": response,
        "evolution": history,
        "evolution_rounds_kept": sum(1 for entry in history if entry["eliminated_by"] is None),
        f"{STAGE}_error": None,
    }


async def _round(
    endpoint: EndpointConfig,
    rid: str,
    number: int,
    operation: str,
    parent: str,
    min_response_words: int,
    max_tokens: int,
    judge_max_tokens: int,
    attempts: int,
    temperature: float,
) -> tuple[str, str | None, str | None]:
    """One round: (candidate, its response or ``None``, the rule that eliminated it or ``None``)."""
    sample = 3 * number
    evolved, _ = await generate(
        endpoint,
        prompts.render(STAGE, operation=operation, instruction=parent),
        EvolvedInstruction,
        stage=STAGE,
        row_id=rid,
        sample=sample + _EVOLVE,
        max_tokens=max_tokens,
        attempts=attempts,
        temperature=temperature,
    )
    candidate = evolved.instruction.strip()
    if copied_template_words(candidate, parent):
        return candidate, None, "copied_template_words"
    if _folded(candidate) == _folded(parent):
        return candidate, None, "no_information_gain"
    verdict, _ = await generate(
        endpoint,
        prompts.render(f"{STAGE}.gain", first=parent, second=candidate),
        Gain,
        stage=STAGE,
        row_id=rid,
        sample=sample + _JUDGE,
        max_tokens=judge_max_tokens,
        attempts=attempts,
        temperature=0.0,
    )
    if not verdict.adds_information:
        return candidate, None, "no_information_gain"
    reply = await get_client(endpoint).chat(
        [{"role": "user", "content": candidate}],
        stage=STAGE,
        row_id=rid,
        sample=sample + _RESPOND,
        max_tokens=max_tokens,
        temperature=temperature,
    )
    answer = reply.text.strip()
    if is_refusal(answer):
        return candidate, answer, "refusal"
    if len(answer.split()) < min_response_words:
        return candidate, answer, "too_short"
    return candidate, answer, None


def mark_all_eliminated(row: dict[str, Any]) -> dict[str, Any]:
    """``Dataset.map`` function after :func:`evolve_instruction`: ``rejected_by``/``reason`` as ``stages.reject``
    writes them. A row no round survived is no evolved instruction (it is its seed again): rejected, with the
    rules that eliminated its rounds. A row already marked keeps its first reason; a failed row is rejected."""
    if row.get("rejected_by"):
        return {"rejected_by": row["rejected_by"], "reason": row.get("reason")}
    if "evolution" not in row:
        raise ColumnError(f"mark_all_eliminated needs the column 'evolution'; the dataset has {sorted(row.keys())}")
    error = row.get(f"{STAGE}_error")
    if error:
        return {"rejected_by": STAGE, "reason": str(error)}
    history = row["evolution"] or []
    if not row.get("evolution_rounds_kept"):
        rules = dict.fromkeys(entry["eliminated_by"] for entry in history if entry["eliminated_by"])
        return {"rejected_by": STAGE, "reason": f"{STAGE}: every round eliminated ({', '.join(rules)})"}
    return {"rejected_by": None, "reason": None}


STEPS = [
    Step(
        name=STAGE,
        kind="row",
        fn=evolve_instruction,
        features=FEATURES,
        role="generator",
        post=mark_all_eliminated,
        post_features=REJECT_FEATURES,
        check=check,
    )
]
