"""The ``ray`` engine: a dataset's row and batch stages as ``map_batches`` over a ``ray.data`` dataset.

Why Ray Data and not a scheduler of ours: it already places actors across a cluster, scales an actor pool between
``(min, max)``, retries failed tasks and streams blocks with backpressure. What stays ours is what makes the
output the same as the ``datasets`` engine's:

- **The same calls.** Each stage line becomes one actor class (:class:`_StageActor`) that does for a block of rows
  exactly what :func:`synthq_hf.recipes.runner._chain` does with chained ``map`` calls: the stage (rows an earlier
  stage rejected skipped), its ``post`` marking, then ``mark_rejected``; the output is cast to the same features.
- **One client per actor.** ``__call__`` is a coroutine, so Ray runs it on the actor's own event loop, which lives
  as long as the actor: :func:`~synthq_hf.endpoint.get_client` gives one client per (actor, endpoint), and the
  rows of a block are sent concurrently (``asyncio.gather``).
- **Replicas.** An endpoint's ``replicas`` (a list of server URLs) are spread over the actors by actor index:
  actor *i* talks to ``replicas[i % n]``. The request cache key has no URL in it, so replicas share answers.
- **Order.** Rows carry their position in a hidden column; each window is put back in that order in the driver
  (Ray's ``preserve_order`` is on too), so the runner's ``_stream`` writes the same shards.
- **Aligned batches.** Blocks hold a multiple of every batch stage's ``batch_size`` rows, and a batch stage cuts
  its blocks at the same row positions as ``datasets`` does from the first row: a model sees the same batches.

- **Nothing lost, nothing twice.** An actor that dies has its block retried on another (Ray restarts actors and
  retries their tasks); the driver checks that every position of a window came back exactly once.
- **One cache across hosts.** Actors write shards of the request cache (:mod:`synthq_hf.cache`), never the
  shared file; the driver folds the shards of workers that are gone into it before and after the run. A worker
  that redoes a dead one's rows finds the answers it had committed.
- **Nothing read from the driver's disk.** Earlier datasets a stage reads (``needs: dataset``) travel to the
  actors in memory, so only the search index and the caches need a folder every node sees.

The source is read in the driver, in windows of :data:`WINDOW_ROWS` rows, so a streamed corpus never has to fit
in memory; each window is one Ray Data run, and two run at once so the servers never wait for a window to start.
Global stages stay with the runner (over the written train split).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import socket
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from datasets import Features

from synthq_hf.cache import SHARD_ENV, default_cache_path, flush_all, merge_shards
from synthq_hf.endpoint import EndpointConfig, Usage
from synthq_hf.stages.reject import mark_rejected

EXTRA = 'pip install -e ".[ray]"'
#: Rows read from the source per Ray Data run: bounds the driver's memory for a streamed corpus
#: (``SYNTHQ_RAY_WINDOW_ROWS`` sets it; rounded to whole blocks).
WINDOW_ROWS = 8192
#: Windows run at once (each its own Ray Data run): the next one starts while the last blocks of this one finish.
WINDOWS_IN_FLIGHT = 2
#: Rows per block (rounded up to a multiple of every batch stage's batch size): the unit an actor gets at once.
BLOCK_ROWS = 64
#: The hidden column holding each row's position in the segment's input.
ROW = "__synthq_row"
#: CPUs an actor of a row stage reserves: it waits on the network, so several share a core.
ROW_STAGE_CPUS = 0.25


class RayEngineError(Exception):
    """The Ray cluster cannot be used (unreachable address); one line naming it."""


def require_ray() -> None:
    """Refuse in one line, naming the extra, where Ray Data is not installed."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError(f"the ray engine needs Ray Data, which is not installed: {EXTRA}") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (``None``: the one Ray finds, or a local one), once per process.

    The address is checked with a plain TCP connect first: ``ray.init`` waits a long time on an address where
    nothing listens, and the user should hear at once which address is wrong.
    """
    require_ray()
    import ray

    if ray.is_initialized():
        return
    if address and address != "auto":
        parsed = urlparse(address if "://" in address else f"tcp://{address}")
        port = parsed.port or (10001 if parsed.scheme == "ray" else 6379)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=5).close()
        except OSError as err:
            raise RayEngineError(f"cannot reach the Ray cluster at {address}: {err}") from None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # ray raises ConnectionError, RuntimeError, … depending on the address kind
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RayEngineError(f"cannot use the Ray cluster at {address or 'auto'}: {first}") from None


@dataclass
class _Stage:
    """A stage line as an actor runs it: what ``_chain`` would map, resolved in the driver."""

    name: str
    kind: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    skip: bool
    empty: dict[str, None]
    post: Callable[..., Any] | None
    post_kwargs: dict[str, Any]
    batch_size: int
    features: Features  # the rows' features after this stage (and its marking)
    roles: dict[str, str]  # keyword argument → endpoint role, for the usage counts


def _stages(run: Any, features: Features, stages: list[tuple[str, dict[str, Any]]]) -> list[_Stage]:
    """The stage lines as :func:`~synthq_hf.recipes.runner.lines` resolves them for ``_chain``, made ready to
    travel: datasets in memory, and each endpoint argument's role for the usage counts."""
    from synthq_hf.recipes.runner import lines

    resolved = []
    for line in lines(run, features, stages):
        step = line.step
        roles = {
            param: role
            for param, value in line.kwargs.items()
            if isinstance(value, EndpointConfig)
            for role, cfg in run.recipe.endpoints.items()
            if cfg is value
        }
        kwargs = {k: _in_memory(v) for k, v in line.kwargs.items()}
        empty = dict.fromkeys(step.features)
        resolved.append(
            _Stage(line.name, step.kind, step.fn, kwargs, line.skip, empty, step.post, line.post_kwargs,
                   step.batch_size, line.marked, roles)
        )  # fmt: skip
    return resolved


def _in_memory(value: Any) -> Any:
    """A ``datasets.Dataset`` read from files, as one that pickles its rows: an actor on another node has no
    access to the driver's output folder."""
    import datasets
    from datasets.table import InMemoryTable

    if not isinstance(value, datasets.Dataset) or isinstance(value.data, InMemoryTable):
        return value
    value = value.flatten_indices() if value._indices is not None else value
    return datasets.Dataset(InMemoryTable(value.data.table), info=value.info.copy(), split=value.split)


def _cache_paths(stages: list[_Stage]) -> set[Path]:
    """Every cache file the stages' workers may write shards of: the endpoints' and any ``cache_path`` given, and
    every cache in the default folder (the reward and embedding caches live there)."""
    paths = {default_cache_path()}
    for stage in stages:
        for value in stage.kwargs.values():
            if isinstance(value, EndpointConfig) and value.cache_path:
                paths.add(Path(value.cache_path))
        if stage.kwargs.get("cache_path"):
            paths.add(Path(stage.kwargs["cache_path"]))
    folders = {path.expanduser().parent for path in paths}
    return {p.expanduser() for p in paths} | {s.with_suffix("") for f in folders for s in f.glob("*.sqlite.shards")}


async def _maybe(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


class _Coordinator:
    """One small actor per segment: hands out actor indexes (which replica an actor talks to) and sums the
    usage counts the actors report, so ``run.json`` and the card count every request like the other engine."""

    def __init__(self) -> None:
        self.index = -1
        self.usage: dict[tuple[str, str], dict[str, float]] = {}

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def add_usage(self, role: str, stage: str, delta: dict[str, float]) -> None:
        total = self.usage.setdefault((role, stage), dict.fromkeys(delta, 0))
        for key, value in delta.items():
            total[key] += value

    def totals(self) -> dict[tuple[str, str], dict[str, float]]:
        return self.usage


class _StageActor:
    """One stage line over blocks of rows, in an actor that keeps its event loop (and so its clients)."""

    def __init__(self, stage: _Stage, coordinator: Any, env: dict[str, str]) -> None:
        import ray

        # Set here, not as a runtime_env: an actor with a runtime_env of its own cannot take one of the workers
        # Ray has already started (the start-up measured the same either way on one machine; a cluster is where
        # fresh workers cost more).
        os.environ.update(env)
        self.stage, self.coordinator = stage, coordinator
        index = ray.get(coordinator.next_index.remote())
        for param, value in stage.kwargs.items():
            if isinstance(value, EndpointConfig) and value.replicas:
                stage.kwargs[param] = value.replace(url=value.replicas[index % len(value.replicas)])
        self.configs = {p: v for p, v in stage.kwargs.items() if isinstance(v, EndpointConfig)}
        self.counted = {p: self._usage(p) for p in self.configs}

    def _usage(self, param: str) -> dict[str, float]:
        usage = self.configs[param].usage.get(self.stage.name) or Usage()
        return usage.as_dict()

    async def __call__(self, block: Any) -> Any:
        import pyarrow as pa

        rows = block.to_pylist()
        await self._apply(rows)
        stage = self.stage
        flush_all()  # answers are durable before their rows are handed on
        for param in self.configs:
            now = self._usage(param)
            delta = {k: v - self.counted[param].get(k, 0) for k, v in now.items()}
            self.counted[param] = now
            await self.coordinator.add_usage.remote(stage.roles[param], stage.name, delta)
        encoded = [stage.features.encode_example(row) | {ROW: row[ROW]} for row in rows]
        return pa.Table.from_pylist(encoded, _with_row(stage.features))

    async def _apply(self, rows: list[dict[str, Any]]) -> None:
        """What ``_chain``'s three maps do for this stage, on these rows, in place."""
        from synthq_hf.recipes.runner import skip_rejected

        stage = self.stage
        if stage.kind == "batch":  # cut where datasets cuts: every batch_size rows from the segment's first
            groups: dict[int, list[dict[str, Any]]] = {}
            for row in rows:
                groups.setdefault(row[ROW] // stage.batch_size, []).append(row)
            for group in groups.values():
                columns = {k: [row[k] for row in group] for k in group[0] if k != ROW}
                new = await _maybe(stage.fn(columns, **stage.kwargs))
                for i, row in enumerate(group):
                    row.update({k: v[i] for k, v in new.items()})
        else:
            if stage.skip:
                calls = [skip_rejected(row, stage.fn, stage.empty, **stage.kwargs) for row in rows]
            else:
                calls = [_maybe(stage.fn(row, **stage.kwargs)) for row in rows]
            for row, new in zip(rows, await asyncio.gather(*calls), strict=True):
                row.update(new)
        if stage.post is not None:
            for row in rows:
                row.update(await _maybe(stage.post(row, **stage.post_kwargs)))
        for row in rows:
            row.update(mark_rejected(row, threshold=None))


def _windows(rows: Any, features: Features, size: int) -> Iterator[list[dict[str, Any]]]:
    window: list[dict[str, Any]] = []
    for position, row in enumerate(rows):
        window.append(features.encode_example(row) | {ROW: position})
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def ray_chain(run: Any, rows: Any, stages: list[tuple[str, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The rows after the row and batch stages ``stages``, in source order, as ``_chain`` would give them."""
    import pyarrow as pa
    import ray
    import ray.data

    from synthq_hf.recipes.runner import _chain

    if not stages:  # nothing to send anywhere: only the marking, done where the rows are
        yield from _chain(run, rows, stages)
        return
    resolved = _stages(run, rows.features, stages)
    block_rows = math.lcm(BLOCK_ROWS, *(s.batch_size for s in resolved if s.kind == "batch"))
    window_rows = block_rows * max(1, int(os.environ.get("SYNTHQ_RAY_WINDOW_ROWS", WINDOW_ROWS)) // block_rows)
    if any(isinstance(v, EndpointConfig) and v.url == "local" for stage in resolved for v in stage.kwargs.values()):
        from synthq_hf.local_server import ensure_local_server

        ensure_local_server()  # one embedded server, started here: its URL travels to the actors in the env below
    # The driver's synthq settings (cache folder, local server) travel with the actors, who write cache shards.
    env = {k: v for k, v in os.environ.items() if k.startswith("SYNTHQ_")} | {SHARD_ENV: "1"}
    caches = _cache_paths(resolved)
    for path in caches:  # answers of workers killed in an earlier run, and a main file whole for immutable readers
        merge_shards(path)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    coordinator = ray.remote(num_cpus=0)(_Coordinator).remote()

    def run_window(window: list[dict[str, Any]]) -> list[dict[str, Any]]:
        table = pa.Table.from_pylist(window, _with_row(rows.features))
        ds = ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)])
        for stage in resolved:
            servers = [len(v.replicas) for v in stage.kwargs.values() if isinstance(v, EndpointConfig)]
            replicas = max([1, *servers])
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"stage": stage, "coordinator": coordinator, "env": env},
                batch_format="pyarrow",
                batch_size=block_rows,
                zero_copy_batch=True,
                concurrency=(replicas, 2 * replicas),  # every replica fed from the start; room to grow
                num_cpus=ROW_STAGE_CPUS if stage.kind == "row" else 1,
                # A batch stage runs a model in its actor (the reward model): on a cluster with GPUs, one each.
                num_gpus=1 if stage.kind == "batch" and gpus else 0,
                # An actor that dies is started again and the block it held is done again: Ray Data gives its
                # actors max_restarts=-1 and max_task_retries=-1 unless told otherwise, so we tell it nothing.
            )
        out = [row for block in ds.iter_batches(batch_format="pyarrow", batch_size=None) for row in block.to_pylist()]
        return list(_in_order(out, window[0][ROW], len(window)))

    # Two windows in flight: the next one's actors start while this one's last blocks finish, so the servers do
    # not idle between windows (16,384 rows on two stub replicas: 242-246 → 260-261 rows/s).
    with ThreadPoolExecutor(max_workers=WINDOWS_IN_FLIGHT, thread_name_prefix="synthq-ray-window") as pool:
        pending: deque[Future[list[dict[str, Any]]]] = deque()
        for window in _windows(rows, rows.features, window_rows):
            pending.append(pool.submit(run_window, window))
            if len(pending) == WINDOWS_IN_FLIGHT:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    for (role, stage_name), counted in ray.get(coordinator.totals.remote()).items():
        usage = run.recipe.endpoints[role].usage.setdefault(stage_name, Usage())
        for key, value in counted.items():
            setattr(usage, key, getattr(usage, key) + value)
    ray.kill(coordinator)
    for path in caches:
        merge_shards(path)


def _in_order(rows: list[dict[str, Any]], first: int, count: int) -> Iterator[dict[str, Any]]:
    """A window's rows by position, each exactly once: a block done twice (a retry whose first try had already
    answered) gives its rows once; a position missing is an error, never a row quietly gone."""
    by_position = {}
    for row in rows:
        by_position.setdefault(row.pop(ROW), row)
    missing = [p for p in range(first, first + count) if p not in by_position]
    if missing:
        raise RuntimeError(f"the ray engine lost {len(missing)} rows of a window (positions {missing[:5]}…)")
    for position in range(first, first + count):
        yield by_position[position]


def _with_row(features: Features) -> Any:
    import pyarrow as pa

    schema = features.arrow_schema
    return schema.append(pa.field(ROW, pa.int64()))
