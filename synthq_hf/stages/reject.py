"""Route rows to ``rejected`` instead of dropping them: failed stages and instructions below the score threshold.

Input columns: ``total_score`` (int or ``None``, from ``score_instruction``) and any ``<stage>_error`` columns.
Output columns: ``rejected_by`` (str: the stage that rejected the row, ``None`` when kept), ``reason`` (str).

The paper keeps instructions that meet at least three of the seven criteria (``threshold=3``). Marking is a
row function so it streams: a writer sends each row to ``train`` or ``rejected`` in one pass. For an in-memory
``Dataset``, :func:`split_rejected` does that split.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, Features, Value

from synthq_hf.stages._step import Step

FEATURES = Features({"rejected_by": Value("string"), "reason": Value("string")})


def mark_rejected(row: dict[str, Any], threshold: int | None = 3, score_column: str = "total_score") -> dict[str, Any]:
    """``Dataset.map`` function: the first failed stage, else a score below ``threshold``, else kept.

    A row already marked (an earlier ``mark_rejected``) keeps its first reason. ``threshold=None`` only routes
    failures.
    """
    if row.get("rejected_by"):
        return {"rejected_by": row["rejected_by"], "reason": row.get("reason")}
    for column, value in row.items():
        if column.endswith("_error") and value:
            return {"rejected_by": column.removesuffix("_error"), "reason": str(value)}
    if threshold is not None:
        score = row.get(score_column)
        if score is None:
            return {"rejected_by": "score_instruction", "reason": f"no {score_column}"}
        if score < threshold:
            return {"rejected_by": "score_instruction", "reason": f"{score_column} {score} < threshold {threshold}"}
    return {"rejected_by": None, "reason": None}


def split_rejected(ds: Dataset) -> tuple[Dataset, Dataset]:
    """(kept, rejected) of a marked dataset. Both keep every column (kept rows with empty ``rejected_by`` and
    ``reason``): the splits of one Hub config must share a schema for ``load_dataset`` to open them."""
    if "rejected_by" not in ds.column_names:
        raise ValueError("split_rejected needs a 'rejected_by' column: map mark_rejected over the dataset first")
    kept = ds.filter(lambda marks: [m is None for m in marks], input_columns="rejected_by", batched=True)
    rejected = ds.filter(lambda marks: [m is not None for m in marks], input_columns="rejected_by", batched=True)
    return kept, rejected


#: The recipe line ``filter: {threshold: 3}``: marks, never requests, so it also sees rows already rejected.
STEPS = [Step(name="filter", kind="row", fn=mark_rejected, features=FEATURES, skip_rejected=False)]
