"""Classify a prompt (or a prompt's response) with a Llama Guard 3 safety model (DESIGN §4, stage ``moderate``).

Input columns: ``prompt`` (str); optional response column (``response_column=``, str); optional ``id`` (seeds
the request).
Output columns: ``safe`` (bool), ``safety_categories`` (list of str, each ``"<code> <name>"`` such as
``"S1 Violent Crimes"``; empty when safe), ``moderate_error`` (str, ``None`` on success).
Prompts: none with ``template="server"``; ``prompts/moderate.user.j2`` with ``template="inline"``.

Protocol. Llama-Guard-3-8B served by TGI or vLLM applies its own chat template, which holds the task, the
fourteen hazard categories and the conversation; so by default (``template="server"``) the stage sends the
conversation as plain chat messages: the prompt as the user turn and, with ``response_column``, the response as
the assistant turn (the guard then judges the response). ``template="inline"`` is for servers that apply an
ordinary chat template (our llama.cpp fallback): the instructions, categories and conversation are rendered into
one user message. On llama-cpp-python the inline path also sends a GBNF grammar of the answer format, so even a
model that is no guard writes a parseable verdict (it is still no judge of safety).

Parse rules (:func:`parse_verdict`), strict where it matters and lenient about layout:
- The verdict is the reply's first word, ``safe`` or ``unsafe``, any case, after whitespace and markup such as
  ``**`` or quotes. Anything else ("I cannot help with that") is not a verdict: the request is retried with a
  new seed, then the row gets ``moderate_error`` with the raw reply. The stage never guesses a verdict.
- Categories are the ``S<number>`` codes anywhere after the verdict, any case, separated by anything (commas,
  spaces, newlines); duplicates are dropped, order kept. Other text after the verdict is ignored.
- Codes outside S1–S14 are kept and reported as ``"S99 (unknown)"``; the verdict still counts.
- ``unsafe`` with no code is unsafe with no categories: the model card scores "unsafe" by the first token alone,
  so the verdict stands without a list (``mark_unsafe`` gives the reason "unsafe (no category given)").
- ``safe`` followed by codes contradicts itself and is treated like junk.
- An ``unsafe`` reply cut off at ``max_tokens`` may have lost codes (or cut "S12" to "S1"): treated like junk.
  The default of 48 tokens fits all fourteen codes in Llama 3's tokenizer.

Policy. Moderation only marks; routing is :func:`mark_unsafe`, which writes ``rejected_by``/``reason`` like
``stages.reject.mark_rejected`` so ``split_rejected`` sends the rows to ``rejected``: ``policy="drop"`` rejects
unsafe rows (``rejected_by="moderate"``, reason = the categories), ``policy="flag"`` keeps them, flagged by
``safe == False``. Under both, a row moderation could not judge is rejected, never passed as safe.

Categories are the Llama Guard 3 model card's hazard taxonomy (MLCommons' 13 hazards plus code interpreter
abuse); the model's own chat template words a few of them more briefly (e.g. "Self-Harm").
"""

from __future__ import annotations

import re
from typing import Any, Literal

from datasets import Features, List, Value
from pydantic import BaseModel

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed, get_client
from synthq_hf.stages._batch import batchable
from synthq_hf.stages._common import ColumnError, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.structured import StageFailure

STAGE = "moderate"
CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
#: The answer format as a llama.cpp grammar, sent on the inline path to llama-cpp-python servers.
GRAMMAR = r"""root ::= "safe" | "unsafe\n" code ("," code)*
code ::= "S1" [0-4]? | "S" [2-9]
"""

FEATURES = Features(
    {"safe": Value("bool"), "safety_categories": List(Value("string")), f"{STAGE}_error": Value("string")}
)
EMPTY: dict[str, Any] = {"safe": None, "safety_categories": None}

_VERDICT = re.compile(r"[^a-z0-9]*(unsafe|safe)\b(.*)", re.DOTALL)
_CODE = re.compile(r"\bs0*(\d{1,3})\b")
NOT_A_VERDICT = "reply is not a Llama Guard verdict ('safe', or 'unsafe' then category codes)"


class Verdict(BaseModel):
    """A parsed reply: ``categories`` hold ``"<code> <name>"``, or ``"<code> (unknown)"`` outside S1–S14."""

    safe: bool
    categories: list[str]


def category_label(code: str) -> str:
    name = CATEGORIES.get(code)
    return f"{code} {name}" if name else f"{code} (unknown)"


def parse_verdict(text: str) -> Verdict:
    """The verdict in a guard's reply (see the module doc's parse rules); :class:`StageFailure` if there is none."""
    match = _VERDICT.match(text.strip().lower())
    if match is None:
        raise StageFailure(NOT_A_VERDICT, text)
    codes = list(dict.fromkeys(f"S{int(digits)}" for digits in _CODE.findall(match.group(2))))
    if match.group(1) == "safe":
        if codes:
            raise StageFailure(f"reply says safe but names categories {', '.join(codes)}", text)
        return Verdict(safe=True, categories=[])
    return Verdict(safe=False, categories=[category_label(code) for code in codes])


def conversation(prompt: str, response: str | None) -> list[dict[str, str]]:
    """The turns a guard judges: with a response, the guard classifies the response (the last turn)."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def inline_messages(prompt: str, response: str | None) -> list[dict[str, str]]:
    """One user message holding the task, the categories and the conversation, for servers without the guard's
    template."""
    role = "User" if response is None else "Assistant"
    return prompts.render(STAGE, prompt=prompt, response=response, role=role, categories=CATEGORIES)


@batchable("prompt")
async def moderate(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    response_column: str | None = None,
    template: Literal["server", "inline"] = "server",
    max_tokens: int = 48,
    attempts: int = 2,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(moderate, fn_kwargs={"endpoint": guard})``.

    ``endpoint`` is the guard model's own endpoint, not the generator's. ``attempts`` is small because at
    temperature 0 a retry mostly repeats the reply; it covers a transient bad reply, not a model that ignores the
    format. Also batched: ``ds.map(moderate, batched=True, batch_size=256, fn_kwargs=...)`` (see ``_batch``).
    """
    if template not in ("server", "inline"):
        raise ValueError(f"{STAGE}: template must be 'server' or 'inline', got {template!r}")
    prompt = read_text(row, "prompt", STAGE)
    response = read_text(row, response_column, STAGE) if response_column is not None else None
    if prompt is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    if response_column is not None and response is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing {response_column}")
    texts = (prompt,) if response is None else (prompt, response)
    messages = conversation(prompt, response) if template == "server" else inline_messages(prompt, response)
    try:
        verdict = await _classify(endpoint, messages, row_id(row, *texts), template, max_tokens, attempts, temperature)
    except StageFailure as err:
        return failure(STAGE, EMPTY, err.describe(STAGE))
    except RequestFailed as err:
        return failure(STAGE, EMPTY, f"{STAGE}: {err}")
    return {"safe": verdict.safe, "safety_categories": verdict.categories, f"{STAGE}_error": None}


async def _classify(
    endpoint: EndpointConfig,
    messages: list[dict[str, str]],
    rid: str,
    template: str,
    max_tokens: int,
    attempts: int,
    temperature: float,
) -> Verdict:
    """Up to ``attempts`` requests (each with its own seed) until one reply parses."""
    client = get_client(endpoint)
    extra: dict[str, Any] = {}
    if template == "inline" and (await client.info()).dialect == "llamacpp":
        extra["grammar"] = GRAMMAR
    failed = StageFailure("no attempt made")
    for attempt in range(max(1, attempts)):
        reply = await client.chat(
            messages,
            stage=STAGE,
            row_id=rid,
            attempt=attempt,
            max_tokens=max_tokens,
            temperature=temperature,
            **extra,
        )
        try:
            verdict = parse_verdict(reply.text)
        except StageFailure as err:
            failed = err
            continue
        if not verdict.safe and reply.finish_reason == "length":
            failed = StageFailure(f"reply cut off at max_tokens={max_tokens}; categories may be missing", reply.text)
            continue
        return verdict
    failed.reason = f"{failed.reason} (after {max(1, attempts)} attempts)"
    raise failed


def mark_unsafe(row: dict[str, Any], policy: Literal["drop", "flag"] = "drop") -> dict[str, Any]:
    """``Dataset.map`` function after :func:`moderate`: ``rejected_by``/``reason`` as ``stages.reject`` writes
    them, so ``split_rejected`` routes the rows.

    A row already marked keeps its first reason. A row moderation failed on is rejected under both policies
    (unjudged is not safe); an unsafe row is rejected with ``policy="drop"`` and kept with ``policy="flag"``.
    """
    if policy not in ("drop", "flag"):
        raise ValueError(f"mark_unsafe: policy must be 'drop' or 'flag', got {policy!r}")
    if row.get("rejected_by"):
        return {"rejected_by": row["rejected_by"], "reason": row.get("reason")}
    if "safe" not in row:
        raise ColumnError(f"mark_unsafe needs the column 'safe' from moderate; the dataset has {sorted(row.keys())}")
    error = row.get(f"{STAGE}_error")
    if error:
        return {"rejected_by": STAGE, "reason": str(error)}
    if row["safe"] is None:
        return {"rejected_by": STAGE, "reason": "not moderated"}
    if not row["safe"] and policy == "drop":
        categories = row.get("safety_categories") or []
        reason = f"unsafe: {', '.join(categories)}" if categories else "unsafe (no category given)"
        return {"rejected_by": STAGE, "reason": reason}
    return {"rejected_by": None, "reason": None}


STEPS = [
    Step(
        name=STAGE,
        kind="row",
        fn=moderate,
        features=FEATURES,
        role="guard",
        post=mark_unsafe,
        post_features=REJECT_FEATURES,
    )
]
