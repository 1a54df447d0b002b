"""Remove rows that overlap evaluation prompts (a global stage: ``Dataset -> (kept, rejected)``).

Input columns: ``prompt`` (str, configurable). Evaluation sets: local files (``.json``/``.jsonl``/``.parquet``/
``.csv``), local dataset folders or Hub names (``"name"`` or ``"name:config:split"``; without a split every split
is checked, since a copied test prompt is contamination whichever split it came from), or ``Dataset`` objects.
Output: ``kept`` (input order, columns unchanged) and ``rejected`` (input order, plus ``rejected_by`` =
``"decontaminate"`` and ``reason``, naming the eval set and the matched n-gram, cut short).

How: both sides go through :func:`synthq_hf.stages.dedup.normalize` (casefold, NFKC, punctuation stripped,
whitespace collapsed) and are split into words; a row is contaminated when it shares any word ``ngram``-gram
(13 by default, the convention since GPT-3's contamination study) with an eval prompt. An eval prompt shorter than
``ngram`` words has no such n-gram; it matches by **whole text** (the row's normalised text equals it). Not by a
shorter n-gram or containment: the words of a five-word question appear inside countless unrelated prompts, and
rejecting all of them would throw away clean data to catch what equality already catches, the verbatim copy.

The eval n-grams live in one in-memory dict (n-gram → eval set name): fine for benchmark-sized eval sets
(hundreds of thousands of prompts); the training side is streamed in batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features, load_dataset

from synthq_hf.stages._common import ColumnError
from synthq_hf.stages._step import Step
from synthq_hf.stages.dedup import _check_text_column, normalize

STAGE = "decontaminate"
log = logging.getLogger(__name__)

#: Eval columns tried, in order, when ``eval_column`` is not given (after the training ``column`` itself).
EVAL_COLUMNS = ("prompt", "question", "instruction", "problem", "input", "query", "text")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_SHOWN = 80  # characters of a matched n-gram or text shown in ``reason``


def _load(source: str | Dataset, position: int) -> list[tuple[str, Dataset]]:
    """(label, dataset) for each split of one eval source."""
    if isinstance(source, Dataset):
        return [(source.info.dataset_name or f"eval_sets[{position}]", source)]
    path = Path(source)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{STAGE}: cannot read eval set {source!r}: use one of {sorted(_BUILDERS)}")
        return [(source, load_dataset(builder, data_files=str(path), split="train"))]
    name, config, split = ([*source.split(":"), None, None])[:3]
    loaded = load_dataset(name, config or None, split=split or None)
    if isinstance(loaded, DatasetDict):
        return [(f"{name}:{config or ''}:{key}" if config else f"{name}[{key}]", part) for key, part in loaded.items()]
    return [(source, loaded)]


def _eval_column(ds: Dataset, label: str, column: str, eval_column: str | None) -> str:
    if eval_column is not None:
        if eval_column not in ds.column_names:
            raise ColumnError(f"{STAGE}: eval set {label} has no column {eval_column!r}; it has {ds.column_names}")
        return eval_column
    for name in (column, *EVAL_COLUMNS):
        if name in ds.column_names:
            return name
    raise ColumnError(
        f"{STAGE}: eval set {label} has none of the columns {[column, *EVAL_COLUMNS]}; it has {ds.column_names}: "
        "pass eval_column="
    )


def build_index(
    eval_sets: list[str | Dataset], column: str, eval_column: str | None, ngram: int
) -> tuple[dict[str, str], dict[str, str]]:
    """(word n-gram → eval set label, whole normalised text of eval prompts shorter than n → label)."""
    grams: dict[str, str] = {}
    whole: dict[str, str] = {}
    for position, source in enumerate(eval_sets):
        for label, part in _load(source, position):
            name = _eval_column(part, label, column, eval_column)
            log.info("%s: eval set %s: %d prompts from column %r", STAGE, label, part.num_rows, name)
            for batch in part.select_columns([name]).iter(batch_size=10_000):
                for text in batch[name]:
                    if not isinstance(text, str) or not text.strip():
                        continue
                    words = normalize(text).split()
                    if len(words) < ngram:
                        whole.setdefault(" ".join(words), label)
                    for start in range(len(words) - ngram + 1):
                        grams.setdefault(" ".join(words[start : start + ngram]), label)
    return grams, whole


def _match(text: str | None, grams: dict[str, str], whole: dict[str, str], ngram: int) -> str | None:
    """The reason ``text`` is contaminated, or ``None``."""
    if not isinstance(text, str) or not text.strip():
        return None
    words = normalize(text).split()
    if len(words) < ngram:
        joined = " ".join(words)
        if joined in whole:
            return f"whole-text match with a short prompt of eval set {whole[joined]}: {_cut(joined)!r}"
        return None
    for start in range(len(words) - ngram + 1):
        gram = " ".join(words[start : start + ngram])
        if gram in grams:
            return f"shares a {ngram}-gram with eval set {grams[gram]}: {_cut(gram)!r}"
    return None


def _cut(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def decontaminate(
    ds: Dataset,
    eval_sets: list[str | Dataset],
    column: str = "prompt",
    eval_column: str | None = None,
    ngram: int = 13,
    batch_size: int = 10_000,
) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into (kept, rejected) by word ``ngram``-gram overlap with ``eval_sets``; see the module docstring.

    ``eval_column`` names the prompt column of every eval set; by default the first of ``column``,
    :data:`EVAL_COLUMNS` that the set has (logged). Rows with an empty prompt are kept: they overlap nothing.
    """
    _check_text_column(ds, column, STAGE)
    if ngram < 1:
        raise ValueError(f"{STAGE}: ngram must be at least 1, got {ngram}")
    grams, whole = build_index(eval_sets, column, eval_column, ngram)
    reasons: list[str | None] = []
    for batch in ds.select_columns([column]).iter(batch_size=batch_size):
        reasons.extend(_match(text, grams, whole, ngram) for text in batch[column])
    hit = np.fromiter((r is not None for r in reasons), dtype=bool, count=len(reasons))
    kept = ds.select(np.flatnonzero(~hit))
    rejected = ds.select(np.flatnonzero(hit))
    rejected = rejected.remove_columns([c for c in ("rejected_by", "reason") if c in ds.column_names])
    rejected = rejected.add_column("rejected_by", [STAGE] * rejected.num_rows)
    rejected = rejected.add_column("reason", [r for r in reasons if r is not None])
    log.info(
        "%s: %d rows → kept %d, rejected %d (%d eval n-grams, %d short eval prompts)",
        STAGE,
        ds.num_rows,
        kept.num_rows,
        rejected.num_rows,
        len(grams),
        len(whole),
    )
    return kept, rejected


STEPS = [Step(name=STAGE, kind="global", fn=decontaminate, features=Features({}))]
