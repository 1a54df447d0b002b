"""Stages: plain functions for ``Dataset.map`` / ``IterableDataset.map``, one module each (DESIGN §4)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from datasets import Features

from synthq_hf.stages.annotate_preference import annotate_preference
from synthq_hf.stages.balance_topics import balance_topics, diversity, topic_sizes
from synthq_hf.stages.decontaminate import decontaminate
from synthq_hf.stages.dedup import dedup
from synthq_hf.stages.embed import embed, embed_dataset
from synthq_hf.stages.evolve_instruction import evolve_instruction, mark_all_eliminated
from synthq_hf.stages.extract_keywords import extract_keywords
from synthq_hf.stages.filter_questions import filter_questions, mark_failed_check
from synthq_hf.stages.generate_instruction import generate_instruction
from synthq_hf.stages.generate_responses import generate_responses
from synthq_hf.stages.ground import ground
from synthq_hf.stages.moderate import mark_unsafe, moderate
from synthq_hf.stages.persona_prompt import persona_prompt
from synthq_hf.stages.reject import mark_rejected, split_rejected
from synthq_hf.stages.score_instruction import score_instruction
from synthq_hf.stages.search_documents import search_documents
from synthq_hf.stages.synthesize_from_scratch import synthesize_from_scratch
from synthq_hf.stages.tag_instruction import mark_tags, tag_instruction


def output_features(input_features: Features | None, *stages: Callable) -> Features | None:
    """Input features plus the typed output columns of ``stages``: the ``features=`` argument for ``map``.

    Needed because ``datasets`` cannot type a column whose first writer batch is all ``None`` (a run that starts
    with many failed rows); with explicit features every batch has one schema. ``None`` in gives ``None`` out
    (an ``IterableDataset`` whose features are unknown).
    """
    if input_features is None:
        return None
    merged = dict(input_features)
    for stage in stages:
        merged.update(sys.modules[stage.__module__].FEATURES)
    return Features(merged)


__all__ = [
    "annotate_preference",
    "balance_topics",
    "decontaminate",
    "dedup",
    "diversity",
    "embed",
    "embed_dataset",
    "evolve_instruction",
    "extract_keywords",
    "filter_questions",
    "generate_instruction",
    "generate_responses",
    "ground",
    "mark_all_eliminated",
    "mark_failed_check",
    "mark_rejected",
    "mark_tags",
    "mark_unsafe",
    "moderate",
    "output_features",
    "persona_prompt",
    "score_instruction",
    "search_documents",
    "split_rejected",
    "synthesize_from_scratch",
    "tag_instruction",
    "topic_sizes",
]
