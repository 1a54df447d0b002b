"""Let a per-row async stage also take ``batched=True`` batches, running the batch's rows concurrently.

Why: ``datasets`` runs an async per-row function by keeping up to
``datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL`` (1000) tasks alive and, for every row it adds,
waiting on all of them with ``asyncio.wait``: a cost per row that grows with the rows pending, and that against a
fast server is more CPU than the request itself (measured with ``scripts/bench/client_ceiling.py``). With
``batched=True`` that bookkeeping is paid once per batch; the rows of a batch still run concurrently (up to
:data:`ROWS_IN_FLIGHT` workers per batch) and the endpoint's limiter still caps the requests in flight.

How to apply it, to a stage ``async def f(row: dict, **kwargs) -> dict`` that returns its new columns::

    @batchable("prompt")  # an input column whose value in one row is never a list
    async def my_stage(row: dict[str, Any], endpoint: EndpointConfig, ...) -> dict[str, Any]:
        ...

Both forms then work, with identical outputs: ``ds.map(my_stage, fn_kwargs=...)`` (one row, as before) and
``ds.map(my_stage, batched=True, batch_size=256, fn_kwargs=...)`` (on ``Dataset`` and ``IterableDataset``).
A batch is recognised by ``column`` holding a list; so name a column whose per-row value is a scalar (a stage
whose every input column holds lists per row cannot use this helper as is). ``with_indices``/``with_rank`` are
not supported in the batched form (the extra positional arguments are batch-level lists, not per-row values).

Pass ``features=stages.output_features(ds.features, my_stage)`` to ``Dataset.map`` in the batched form: it writes
each batch as it comes, so the first batch fixes every column's type, and a column that is all ``None`` there
(``<stage>_error`` in a batch without failures) can take no value later: the run dies at the first failed row.
(Per row the first 1,000 rows decide instead; the same trap, further away.) A stage cannot return typed Arrow
arrays instead: ``Dataset.map`` accepts only lists, NumPy, pandas or tensors from a batched function.

``datasets`` starts every batch task it holds at once (up to the same 1000), and each batch keeps up to
:data:`ROWS_IN_FLIGHT` rows going, so up to 64,000 requests can be built and waiting on the endpoint's limiter;
the batches' outputs stay in memory until ``datasets`` writes them. For very large datasets lower that
``datasets`` knob rather than raising ``batch_size``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

RowStage = Callable[..., Awaitable[dict[str, Any]]]


def batchable(column: str) -> Callable[[RowStage], RowStage]:
    """Decorator: the stage accepts a row (as before) or a batch (``column`` holds a list); see the module doc."""

    def wrap(stage: RowStage) -> RowStage:
        @functools.wraps(stage)
        async def row_or_batch(row: Mapping[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
            if column in row and isinstance(row[column], list):
                columns = {name: row[name] for name in row.keys()}  # formats each column once (a LazyBatch)
                if _is_batch(columns):
                    return await run_batch(stage, columns, *args, **kwargs)
            return await stage(row, *args, **kwargs)  # a row (one with a list in ``column`` is the stage's error)

        return row_or_batch

    return wrap


def _is_batch(columns: dict[str, Any]) -> bool:
    """Every column a list, all of one length: what ``datasets`` passes with ``batched=True``."""
    values = list(columns.values())
    return all(isinstance(value, list) for value in values) and len({len(value) for value in values}) == 1


#: Rows of one batch in flight at once: enough for one batch alone to fill the default endpoint concurrency (64),
#: and ``datasets`` runs many batches together. A fixed set of workers rather than a task per row: a task costs
#: ~5 µs to make and schedule, and a row waiting on the limiter would hold its request body in memory.
ROWS_IN_FLIGHT = 64


async def run_batch(stage: RowStage, columns: dict[str, list[Any]], *args: Any, **kwargs: Any) -> dict[str, list]:
    """Run ``stage`` on every row of a batch (column name → values), up to :data:`ROWS_IN_FLIGHT` at a time.

    Outputs keep the rows' order. If a row raises (a :class:`ColumnError`, an :class:`EndpointError`), the other
    rows are cancelled and the error propagates, as it would from the per-row form.
    """
    names = list(columns)
    rows = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    if not rows:
        return {}
    outputs: list[dict[str, Any]] = [{}] * len(rows)
    todo = iter(enumerate(rows))

    async def worker() -> None:
        for i, row in todo:
            outputs[i] = await stage(row, *args, **kwargs)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(len(rows), ROWS_IN_FLIGHT))]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for task in workers:
            task.cancel()
        raise
    new_columns = dict.fromkeys(name for output in outputs for name in output)
    return {name: [output.get(name) for output in outputs] for name in new_columns}
