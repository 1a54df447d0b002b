"""How a stage tells the recipe runner what it is: one :class:`Step` declared next to the stage's code.

The runner knows no stage by name. It reads each stage module's ``STEPS`` (see :mod:`synthq_hf.stages.registry`)
and from a step learns how to call it:

- ``row``: ``fn(row, **params) -> new columns``, mapped over rows (streams; async functions run concurrently);
- ``batch``: ``fn(batch, **params) -> new columns``, mapped with ``batched=True`` (streams too), for stages that
  earn batching (an in-process model);
- ``global``: ``fn(ds, **params) -> (kept, rejected, stats)`` over a whole ``Dataset`` (the split written so far):
  ``rejected`` rows carry ``rejected_by`` and ``reason``; ``stats`` is a plain mapping of figures for the report
  and card (``{}`` when there are none). Counts come back as values, never through module-level state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from datasets import Features

Kind = Literal["row", "batch", "global"]


@dataclass(frozen=True)
class Step:
    """A recipe line's stage.

    ``features``: the columns the stage adds (a global stage: the columns it adds to the rows it keeps or rejects),
    so that every split of a config shares one schema from the first row on. ``role``: the endpoint role it calls
    (``endpoint: <role>`` in the recipe picks another). ``needs``: parameters the runner supplies rather than the
    recipe, by what they are: ``"search"`` (the run's search backend: ``index`` or ``web``), ``"dataset"`` (the
    train split of a named dataset of this run; the recipe may name which, the parameter name is the default).
    ``post``: a marking row function mapped right after (it takes its own parameters from the same recipe line).
    ``skip_rejected``: rows an earlier stage rejected get this stage's columns empty, without requests.
    ``describe``: from the recipe line's parameters, facts for the run report and card (e.g. which reward model).
    ``check``: called with the line's parameters before anything runs, to refuse in one line what would otherwise
    fail hours later (a model folder that does not exist, an extra that is not installed).
    """

    name: str
    kind: Kind
    fn: Callable[..., Any]
    features: Features
    role: str | None = None
    needs: Mapping[str, str] = field(default_factory=dict)
    post: Callable[..., Any] | None = None
    post_features: Features | None = None
    batch_size: int = 64
    skip_rejected: bool = True
    describe: Callable[..., Mapping[str, Any]] | None = None
    check: Callable[..., None] | None = None
