"""Filter questions synthesised from nothing: language, solvability, difficulty (ScaleQuest, Ding et al. 2024,
arXiv 2410.18693, §question filtering; dedup is the global stage ``dedup``).

Input columns: ``prompt`` (str: a question); optional ``id`` (seeds the requests).
Output columns: ``language_ok`` (bool), ``solvable`` (bool), ``solvable_reasoning`` (str: the judge's reasoning
before its verdict), ``difficulty`` (float), ``failed_check`` (str: the first check that failed, ``None`` when all
passed), ``failed_reason`` (str: why it failed, e.g. ``non-ASCII character 'é' at 14``),
``filter_questions_error`` (str, ``None`` on success). A check that did not run leaves its column ``None``.
Prompts: ``prompts/filter_questions.solvable.{system,user}.j2``, ``prompts/filter_questions.difficulty.{system,
user}.j2`` (the LLM difficulty judge).

Checks run in the order ``checks`` names them, and the first that fails ends the row: a later check sends no
request. That is why language comes first by default: it is free, and a question the model wrote in the wrong
script is not worth a judge's tokens.

- ``language``: ``language="ascii"`` (ScaleQuest's rule): every character is ASCII, so math written with Unicode
  symbols (``≤``, ``π``) fails too. ``language="latin"``: a character passes if it is ASCII; a letter whose Unicode
  name says LATIN (``é``, ``ß``, ``ⁿ``); a combining mark; a space; punctuation (``–``, ``“``); a math symbol
  (``≤``, ``×``); a currency sign; a number such as ``²`` or ``½``; or ``°``/``µ``. Greek letters are letters of
  another script and fail there too. No language-identification model: the rule is about the script.
- ``solvable``: free-text chat, so that the judge reasons before it decides; the verdict is the reply's last
  non-empty line and must be ``Yes`` or ``No`` alone (any case, optional trailing period, optional ``**bold**``).
  "yes" elsewhere in the text counts for nothing: a reply whose last line is "The answer is yes" is no verdict and
  is asked again with a new seed, up to ``attempts`` times, then a row error. A reply cut off at ``max_tokens`` is
  no verdict either.
- ``difficulty``: with ``difficulty_model`` (a local folder or Hub name) a text classifier from ``transformers``
  scores the question in process: its single output for a one-label (regression) model, the probability of label
  1 for a two-label one. Without it an LLM judge rates 1–10 (structured output). ``min_difficulty`` rejects
  scores below it (on that model's scale); without it the score is only recorded.

Routing is :func:`mark_failed_check` (the Step's ``post``): a row whose check failed goes to ``rejected`` with
``rejected_by="filter_questions"`` and ``reason="<check>: <why>"``; a row error goes there with its error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import re
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Features, Value
from pydantic import BaseModel, Field

from synthq_hf import prompts
from synthq_hf.endpoint import EndpointConfig, RequestFailed, get_client
from synthq_hf.stages._batch import batchable
from synthq_hf.stages._common import ColumnError, error_reason, failure, read_text, row_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.structured import StageFailure, generate

STAGE = "filter_questions"
CHECKS = ("language", "solvable", "difficulty")
LANGUAGES = ("ascii", "latin")
INSTALL = 'pip install -e ".[preferences]"'
#: Characters ``language="latin"`` admits beyond its Unicode categories: common in measurements.
LATIN_EXTRA = "°µ"
_LATIN_CATEGORIES = {"Mn", "Zs", "Sm", "Sc", "No"}
_VERDICT = re.compile(r"(?:\*\*(yes|no)\.?\*\*|(yes|no))\.?", re.IGNORECASE)

FEATURES = Features(
    {
        "language_ok": Value("bool"),
        "solvable": Value("bool"),
        "solvable_reasoning": Value("string"),
        "difficulty": Value("float64"),
        "failed_check": Value("string"),
        "failed_reason": Value("string"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = dict.fromkeys(name for name in FEATURES if name != f"{STAGE}_error")


class DifficultyRating(BaseModel):
    """The LLM judge's rating: what solving takes first, then the number (think, then grade)."""

    analysis: str = Field(max_length=400, description="one or two sentences")
    rating: int = Field(ge=1, le=10)


class DifficultyModelError(ValueError):
    """The difficulty model cannot be used as given (missing folder, not a classifier): one line."""


def validate(
    checks: Sequence[str], language: str, difficulty_model: str | None = None, min_difficulty: float | None = None
) -> None:
    """Refuse, in one line, parameters that would fail every row or be silently ignored."""
    valid = ", ".join(CHECKS)
    if isinstance(checks, str) or not isinstance(checks, Sequence):
        raise ValueError(f"{STAGE}: checks must be a list of check names ({valid}), got {checks!r}")
    if not checks:
        raise ValueError(f"{STAGE}: checks is empty; name at least one of {valid}")
    for name in checks:
        if name not in CHECKS:
            raise ValueError(f"{STAGE}: unknown check {name!r}; valid checks: {valid}")
    if len(set(checks)) < len(checks):
        raise ValueError(f"{STAGE}: checks names a check twice: {list(checks)}")
    if language not in LANGUAGES:
        raise ValueError(f"{STAGE}: unknown language {language!r}; use one of {', '.join(LANGUAGES)}")
    if "difficulty" not in checks and (difficulty_model is not None or min_difficulty is not None):
        raise ValueError(f"{STAGE}: difficulty_model and min_difficulty need 'difficulty' in checks")


def language_problem(text: str, language: str = "ascii") -> str | None:
    """Why ``text`` fails the language rule (the first offending character and its index), ``None`` if it passes."""
    for i, ch in enumerate(text):
        if ch.isascii():
            continue
        if language == "ascii":
            return f"non-ASCII character {ch!r} at {i}"
        if not _latin_ok(ch):
            return f"character {ch!r} at {i} is not Latin script, punctuation or a math symbol"
    return None


def _latin_ok(ch: str) -> bool:
    if ch in LATIN_EXTRA:
        return True
    category = unicodedata.category(ch)
    if category.startswith("L"):
        return "LATIN" in unicodedata.name(ch, "")
    return category in _LATIN_CATEGORIES or category.startswith("P")


def parse_solvable(text: str) -> tuple[bool, str]:
    """(verdict, reasoning) from a judge's free-text reply; :class:`StageFailure` when the last non-empty line is
    not ``Yes`` or ``No`` alone (see the module doc)."""
    body = text.strip()
    if not body:
        raise StageFailure("empty reply", text)
    cut = body.rfind("\n")
    last, reasoning = body[cut + 1 :].strip(), body[: cut + 1].strip()
    match = _VERDICT.fullmatch(last)
    if match is None:
        raise StageFailure("the last line is not a verdict (Yes or No alone)", text)
    return (match.group(1) or match.group(2)).lower() == "yes", reasoning


async def _ask_solvable(
    endpoint: EndpointConfig, question: str, rid: str, max_tokens: int, attempts: int, temperature: float
) -> tuple[bool, str]:
    """Up to ``attempts`` requests (each with its own seed) until a reply ends in a verdict."""
    client = get_client(endpoint)
    messages = prompts.render(f"{STAGE}.solvable", question=question)
    failed = StageFailure("no attempt made")
    for attempt in range(max(1, attempts)):
        reply = await client.chat(
            messages, stage=STAGE, row_id=rid, attempt=attempt, max_tokens=max_tokens, temperature=temperature
        )
        if reply.finish_reason == "length":
            failed = StageFailure(f"reply cut off at max_tokens={max_tokens}", reply.text)
            continue
        try:
            return parse_solvable(reply.text)
        except StageFailure as err:
            failed = err
    failed.reason = f"{failed.reason} (after {max(1, attempts)} attempts)"
    raise failed


@dataclass
class DifficultyModel:
    """A loaded text classifier; one per (model, device) per process. ``lock``: rows run concurrently in one
    event loop, and the forward passes go to a thread one at a time."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: str
    max_length: int
    inputs: frozenset[str]  # the tokenizer outputs the model's forward accepts (Llama takes no token_type_ids)
    lock: threading.Lock = field(default_factory=threading.Lock)


_MODELS: dict[tuple[str, str | None], DifficultyModel] = {}
_LOADING = threading.Lock()


def load_difficulty_model(model: str, device: str | None = None) -> DifficultyModel:
    with _LOADING:
        if (model, device) not in _MODELS:
            _MODELS[model, device] = _load(model, device)
        return _MODELS[model, device]


def _local_folder(model: str) -> Path | None:
    """The folder ``model`` names, ``None`` for a Hub name; a path-like name that does not exist is refused."""
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise DifficultyModelError(f"{STAGE}: difficulty model folder {path} does not exist")
    return None


def _load(model: str, device: str | None) -> DifficultyModel:
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"{STAGE}: difficulty_model runs in process: `{INSTALL}` (torch, transformers)") from err
    folder = _local_folder(model)
    source = str(folder) if folder else model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        net = AutoModelForSequenceClassification.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DifficultyModelError(f"{STAGE}: cannot load difficulty model {model!r}: {first}") from err
    if net.config.num_labels not in (1, 2):
        raise DifficultyModelError(
            f"{STAGE}: difficulty model {model!r} has {net.config.num_labels} labels: a score needs 1 (regression) "
            "or 2 (positive = label 1)"
        )
    net.to(device).eval()
    limits = (tokenizer.model_max_length, getattr(net.config, "max_position_embeddings", None))
    sane = [n for n in limits if isinstance(n, int) and 0 < n <= 1_000_000]
    accepted = frozenset(inspect.signature(net.forward).parameters)
    return DifficultyModel(net, tokenizer, device, min(sane) if sane else 512, accepted)


def _classify(dm: DifficultyModel, text: str) -> float:
    import torch

    encoded = dm.tokenizer(text, truncation=True, max_length=dm.max_length, return_tensors="pt")
    inputs = {k: v.to(dm.device) for k, v in encoded.items() if k in dm.inputs}
    with dm.lock, torch.inference_mode():
        logits = dm.model(**inputs).logits[0].float()
    return float(logits[0]) if logits.shape[-1] == 1 else float(torch.softmax(logits, -1)[1])


async def _difficulty(
    endpoint: EndpointConfig,
    question: str,
    rid: str,
    difficulty_model: str | None,
    device: str | None,
    max_tokens: int,
    attempts: int,
    temperature: float,
) -> float:
    if difficulty_model is not None:
        dm = await asyncio.to_thread(load_difficulty_model, difficulty_model, device)
        return await asyncio.to_thread(_classify, dm, question)
    rating, _ = await generate(
        endpoint,
        prompts.render(f"{STAGE}.difficulty", question=question),
        DifficultyRating,
        stage=STAGE,
        row_id=rid,
        max_tokens=max_tokens,
        attempts=attempts,
        temperature=temperature,
    )
    return float(rating.rating)


@batchable("prompt")
async def filter_questions(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    checks: Sequence[str] = ("language", "solvable"),
    language: str = "ascii",
    difficulty_model: str | None = None,
    min_difficulty: float | None = None,
    max_tokens: int = 1024,
    attempts: int = 3,
    temperature: float = 0.0,
    device: str | None = None,
) -> dict[str, Any]:
    """``Dataset.map`` function: ``ds.map(filter_questions, fn_kwargs={"endpoint": judge, "checks": [...]})``.

    ``endpoint`` is the judge (solvability, and difficulty without ``difficulty_model``). ``max_tokens`` bounds a
    judge's reply: room to reason, then the verdict. ``attempts`` counts replies per request: a reply without a
    verdict is asked again with a new seed (at temperature 0 a retry mostly repeats the reply, so it covers a
    transient bad reply, not a model that ignores the format). ``device`` is the classifier's (default: cuda if
    there is one).
    """
    validate(checks, language, difficulty_model, min_difficulty)
    question = read_text(row, "prompt", STAGE)
    if question is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    out: dict[str, Any] = {**EMPTY, f"{STAGE}_error": None}
    rid = row_id(row, question)
    for name in checks:
        why: str | None = None
        try:
            if name == "language":
                why = language_problem(question, language)
                out["language_ok"] = why is None
            elif name == "solvable":
                out["solvable"], out["solvable_reasoning"] = await _ask_solvable(
                    endpoint, question, rid, max_tokens, attempts, temperature
                )
                why = None if out["solvable"] else "the model judged it unsolvable"
            else:
                score = await _difficulty(
                    endpoint, question, rid, difficulty_model, device, max_tokens, attempts, temperature
                )
                out["difficulty"] = score
                if min_difficulty is not None and score < min_difficulty:
                    why = f"{round(score, 4)} < min_difficulty {min_difficulty}"
        except (StageFailure, RequestFailed) as err:
            return failure(STAGE, EMPTY, error_reason(STAGE, err))
        if why is not None:
            out["failed_check"], out["failed_reason"] = name, why
            break
    return out


def mark_failed_check(row: dict[str, Any]) -> dict[str, Any]:
    """``Dataset.map`` function after :func:`filter_questions`: ``rejected_by``/``reason`` as ``stages.reject``
    writes them, so ``split_rejected`` routes the rows. A row already marked keeps its first reason."""
    if row.get("rejected_by"):
        return {"rejected_by": row["rejected_by"], "reason": row.get("reason")}
    if "failed_check" not in row:
        raise ColumnError(f"mark_failed_check needs the columns of {STAGE}; the dataset has {sorted(row.keys())}")
    error = row.get(f"{STAGE}_error")
    if error:
        return {"rejected_by": STAGE, "reason": str(error)}
    if row["failed_check"]:
        return {"rejected_by": STAGE, "reason": f"{row['failed_check']}: {row.get('failed_reason')}"}
    return {"rejected_by": None, "reason": None}


def check(
    checks: Sequence[str] = ("language", "solvable"),
    language: str = "ascii",
    difficulty_model: str | None = None,
    min_difficulty: float | None = None,
    **_: Any,
) -> None:
    """Before the run: the check names, the language, and for a classifier the extra and its folder, so that a
    typo is one line now rather than a failure after the questions were generated."""
    validate(checks, language, difficulty_model, min_difficulty)
    if difficulty_model is None:
        return
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise ImportError(f"{STAGE}: difficulty_model runs in process and needs torch and transformers: `{INSTALL}`")
    _local_folder(difficulty_model)


STEPS = [
    Step(
        name=STAGE,
        kind="row",
        fn=filter_questions,
        features=FEATURES,
        role="judge",
        post=mark_failed_check,
        post_features=REJECT_FEATURES,
        check=check,
    )
]
