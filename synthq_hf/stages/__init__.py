"""Stages: plain functions for ``Dataset.map`` / ``IterableDataset.map``, one module each (DESIGN §4)."""

from synthq_hf.stages.score_instruction import score_instruction

__all__ = ["score_instruction"]
