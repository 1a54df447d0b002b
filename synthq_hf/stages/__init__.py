"""Stages: plain functions for ``Dataset.map`` / ``IterableDataset.map``, one module each (DESIGN §4)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from datasets import Features

from synthq_hf.stages.score_instruction import score_instruction


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


__all__ = ["output_features", "score_instruction"]
