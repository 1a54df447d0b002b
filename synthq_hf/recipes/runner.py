"""Run a recipe: its named datasets in order, each one source → its stages in order → a config with
``train`` and ``rejected`` splits, written as a Hub-layout folder with a card.

Row stages stream: an ``IterableDataset`` (or a ``Dataset``) flows through chained ``map`` calls and each row
lands in a ``train`` or ``rejected`` shard as it arrives (``output.ShardWriter``), so memory stays flat however
large the corpus. A global stage needs every row at once: the rows kept so far are written first, the stage runs
over them (``datasets`` memory-maps them from disk), sends what it drops to ``rejected``, and the stages after
it go on from what it kept. The runner knows no stage by name: each stage module declares its
:class:`~synthq_hf.stages._step.Step` (:mod:`synthq_hf.stages.registry`).

Resuming: every answer is in the durable request cache, so running the same recipe into the same folder again
re-sends only what was never answered and writes the same output.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets.config
from datasets import Dataset, Features, IterableDataset, Value

from synthq_hf import output, prompts
from synthq_hf.endpoint import EndpointConfig, get_client
from synthq_hf.inputs import open_dataset, resolve_source
from synthq_hf.recipes.recipe import DatasetSpec, Recipe, RecipeError, SourceSpec
from synthq_hf.stages._common import has_id, with_id
from synthq_hf.stages._step import Step
from synthq_hf.stages.registry import steps
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.stages.reject import mark_rejected

log = logging.getLogger(__name__)
MARKER = ".synthq-recipe.json"
WORK = ".work"

Rows = Dataset | IterableDataset


@dataclass
class Run:
    """What one run holds while it goes: resources opened up front, the named datasets' kept rows, the counts."""

    recipe: Recipe
    out: Path
    inputs: dict[str, Rows]
    search: dict[str, Any]
    limit: int | None = None
    engine: str = "datasets"
    train: dict[str, Dataset] = field(default_factory=dict)
    derived_ids: Counter[str] = field(default_factory=Counter)

    def tokens(self) -> int:
        return sum(
            u.prompt_tokens + u.completion_tokens for cfg in self.recipe.endpoints.values() for u in cfg.usage.values()
        )


@dataclass
class Result:
    """One named dataset's outcome: its splits' shard globs, its rows per stage, rejection reasons, figures."""

    splits: dict[str, str | None]
    table: list[dict[str, Any]]
    reasons: dict[str, dict[str, int]]
    stats: dict[str, dict[str, Any]]
    facts: dict[str, Any]


def _fill_id(row: dict[str, Any], text_column: str, source: str, counts: Counter[str]) -> dict[str, str]:
    if not has_id(row):
        counts[source] += 1
    return with_id(row, text_column)


def _with_ids(ds: Rows, text_column: str, source: str, counts: Counter[str]) -> Rows:
    """Every row with a text ``id``: its own, else the hash its requests are seeded with (counted for the card).
    Output rows can then always be named, e.g. by ``demonstration_ids`` and ``duplicate_of``."""
    features = Features({**ds.features, "id": Value("string")})
    kwargs = {"text_column": text_column, "source": source, "counts": counts}
    return _map(ds, _fill_id, kwargs, features, f"{source} ids")


async def skip_rejected(row: dict[str, Any], _stage_fn: Callable, _empty: dict, **kwargs: Any) -> dict[str, Any]:
    """Run ``_stage_fn`` unless an earlier step already rejected the row: no requests for rows that are out.

    A skipped row gets the stage's columns empty (and no ``<stage>_error``): its reason is the earlier one.
    """
    if row.get("rejected_by"):
        return _empty
    result = _stage_fn(row, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _map(ds: Rows, fn: Callable, kwargs: dict, features: Features, desc: str, **extra: Any) -> Rows:
    map_kwargs: dict[str, Any] = {"fn_kwargs": kwargs, "features": features, **extra}
    if isinstance(ds, Dataset):
        map_kwargs.update(desc=desc, load_from_cache_file=False)
    return ds.map(fn, **map_kwargs)


def _summary(reason: str | None) -> str:
    """A rejection reason without the raw reply and attempt count: rows with the same cause group together."""
    text = (reason or "").split(" | raw reply", 1)[0]
    return text.replace(" (after 3 attempts)", "").strip()[:160]


class _Tally:
    """Counts per stage while rows stream past: who rejected what, and each stage's row errors."""

    def __init__(self, dataset: str, stages: list[str]):
        self.dataset, self.stages = dataset, list(stages)
        self.rows = 0
        self.rejected_by: Counter[str] = Counter()
        self.reasons: dict[str, Counter[str]] = {}
        self.errors: Counter[str] = Counter()

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        for stage in self.stages:
            if row.get(f"{stage}_error"):
                self.errors[stage] += 1
        by = row.get("rejected_by")
        if by:
            self.rejected_by[by] += 1
            self.reasons.setdefault(by, Counter())[_summary(row.get("reason"))] += 1
            if by not in self.stages:  # a marking line (filter) rejects in the name of the stage it reads
                self.stages.append(by)

    def table(self) -> list[dict[str, Any]]:
        rows, table = self.rows, []
        for stage in self.stages:
            rejected = self.rejected_by.get(stage, 0)
            table.append(
                {
                    "dataset": self.dataset,
                    "name": stage,
                    "in": rows,
                    "out": rows - rejected,
                    "rejected": rejected,
                    "errors": self.errors[stage],
                }
            )
            rows -= rejected
        return table


class _Progress:
    """Rows/s, tokens/s, errors and ETA while rows stream: a tqdm bar on a terminal, a plain line every
    ``every_s`` seconds otherwise (logs and CI keep a readable record)."""

    def __init__(self, name: str, total: int | None, tokens: Callable[[], int], every_s: float = 15.0):
        from tqdm.auto import tqdm

        self.name, self.total, self.tokens, self.every_s = name, total, tokens, every_s
        self.started = self.last = time.monotonic()
        self.rows = 0
        self.bar = tqdm(total=total, desc=name, unit="row", mininterval=1.0) if sys.stderr.isatty() else None

    def update(self, kept: int, rejected: int, errors: int) -> None:
        self.rows += 1
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            rate = self.tokens() / max(now - self.started, 1e-9)
            self.bar.set_postfix(kept=kept, rejected=rejected, errors=errors, tok_s=f"{rate:.0f}", refresh=False)
        elif now - self.last >= self.every_s or self.rows == self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            eta = f", ETA {(self.total - self.rows) * elapsed / self.rows:.0f}s" if self.total else ""
            print(
                f"{self.name}: {self.rows}{f'/{self.total}' if self.total else ''} rows "
                f"({kept} kept, {rejected} rejected, {errors} errors), {self.rows / elapsed:.2f} rows/s, "
                f"{self.tokens() / elapsed:.0f} tokens/s{eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare(out: Path, recipe: Recipe, overwrite: bool) -> None:
    """Refuse to mix runs: a folder holding another recipe's run needs ``--overwrite``; the same recipe resumes."""
    marker = out / MARKER
    resolved = json.dumps(recipe.as_dict(), sort_keys=True, default=str)
    partial = out / f"{MARKER}.partial"  # a marker being written when a run was killed: not a file of the user's
    if out.exists() and any(entry != partial for entry in out.iterdir()):
        same = marker.exists() and marker.read_text(encoding="utf-8") == resolved
        if not (same or overwrite):
            what = "another recipe's run" if marker.exists() else "files that are not a synthq run"
            raise output.OutputError(f"{out} holds {what}; pass --overwrite or choose another --output")
        if same and not overwrite:
            log.info("resuming %s: answers already in the request cache are not requested again", out)
    out.mkdir(parents=True, exist_ok=True)
    # The marker is replaced first (atomically) and everything else removed after it: a run killed while it
    # clears the folder leaves a folder that still says whose it is, and the next run resumes instead of
    # refusing "files that are not a synthq run".
    partial.write_text(resolved, encoding="utf-8")
    partial.replace(marker)
    for entry in out.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _index_for(recipe: Recipe) -> str:
    """The BM25 index folder: the recipe's, or one built once from the main input and kept in the cache."""
    if recipe.search.index:
        return recipe.search.index
    spec = recipe.datasets[recipe.main].source
    source = resolve_source(spec.dataset) if spec.dataset else None
    if source is None or not Path(source).exists():
        raise RecipeError(
            "search.index is not set and the main input is not a local file to index; build one with "
            f"`synthq index build --dataset {spec.dataset} --text-column {spec.text_column} "
            "--out DIR` and pass --set search.index=DIR"
        )
    from synthq_hf.cache import default_cache_path
    from synthq_hf.search.bm25 import build_index

    stat = Path(source).stat()
    key = hashlib.blake2b(f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8)
    folder = default_cache_path().parent / "indexes" / f"{Path(source).stem}-{key.hexdigest()}"
    if not folder.exists():  # build_index writes to <folder>.partial and renames: a folder is a finished index
        columns = open_dataset(source, split=spec.split, text_column=spec.text_column).column_names
        build_index(
            source,
            text_column=spec.text_column,
            out=folder,
            id_column="id" if "id" in columns else None,
            url_column="url" if "url" in columns else None,
            split=spec.split,
            streaming=False,
            progress=False,
        )
    return str(folder)


def _search(recipe: Recipe) -> dict[str, Any]:
    """The search backend, opened once for every stage that needs it: ``{"index": folder}`` or ``{"web": …}``."""
    registry = steps()
    wanted = any(
        "search" in registry[stage].needs.values() for spec in recipe.datasets.values() for stage in spec.stages
    )
    if not wanted:
        return {}
    if recipe.search.backend == "web":
        from synthq_hf.search.web import WebSearchConfig

        return {"web": WebSearchConfig(**recipe.search.web)}
    return {"index": _index_for(recipe)}


def _describe_endpoints(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """``models`` (role → model as the server reported it) and ``endpoints`` (role → dialect) for the card:
    no URLs (they can name private hosts), no keys."""

    async def info(cfg: EndpointConfig) -> dict[str, Any]:
        found = await get_client(cfg).info()
        return {"dialect": found.dialect, "model": found.model}

    models, endpoints = {}, {}
    for role, cfg in recipe.endpoints.items():
        try:
            found = asyncio.run(info(cfg))
        except Exception as err:  # the card says the server could not be asked; the run itself succeeded
            endpoints[role] = {"error": str(err).splitlines()[0][:200]}
            continue
        models[role] = found["model"]
        endpoints[role] = {"dialect": found["dialect"]}
    return {"models": models, "endpoints": endpoints}


def _open_inputs(recipe: Recipe, given: dict[str, Rows]) -> dict[str, Rows]:
    """Every outside source, opened (and, for local files, checked line by line) before the folder is touched."""
    opened = {}
    for name, spec in recipe.datasets.items():
        source = spec.source
        if name in given:
            opened[name] = given[name]
        elif source.dataset is not None:
            opened[name] = open_dataset(
                source.dataset,
                config=source.config,
                split=source.split,
                streaming=source.streaming,
                text_column=source.text_column,
            )
    return opened


def _check_shapes(run: Run) -> None:
    """Every dataset's config schema worked out before anything runs, so a ``columns`` naming a column no stage
    makes is refused before the folder is touched, not after an hour of requests."""
    known: dict[str, Features] = {}
    for name, spec in run.recipe.datasets.items():
        source = spec.source
        if source.from_ is not None:
            base = known[source.from_]
        elif source.generate is not None:
            base = Features({"id": Value("string")})
        else:
            rows = run.inputs[name]
            if isinstance(rows, IterableDataset) and rows.features is None:
                rows = rows._resolve_features()
            base = {source.as_ or k if k == source.text_column else k: v for k, v in rows.features.items()}
            base = Features({**base, "id": Value("string")})
        _, shaped = _schema(base, name, spec)
        back = {new: old for old, new in spec.rename.items()}
        known[name] = Features({back.get(k, k): v for k, v in shaped.items() if k not in REJECT_FEATURES})


def _generated(n: int) -> Iterator[dict[str, str]]:
    for i in range(n):
        yield {"id": str(i)}


def _source_rows(run: Run, name: str, source: SourceSpec) -> tuple[Rows, int | None]:
    """The dataset's rows as its stages read them (text column renamed, ids filled) and how many, if known."""
    limit = (run.limit or source.limit) if name == run.recipe.main else source.limit
    if source.from_ is not None:
        rows = run.train[source.from_]
        if limit:
            rows = rows.select(range(min(limit, rows.num_rows)))
    elif source.generate is not None:
        n = min(source.generate, limit) if limit else source.generate
        rows = IterableDataset.from_generator(
            _generated, gen_kwargs={"n": n}, features=Features({"id": Value("string")})
        )
        return rows, n
    else:
        rows = run.inputs[name]
        if limit and isinstance(rows, IterableDataset):
            rows = rows.take(limit)  # counts streamed rows; nothing past them is read
        elif limit:
            rows = rows.select(range(min(limit, len(rows))))
        if isinstance(rows, IterableDataset) and rows.features is None:
            rows = rows._resolve_features()
    text = source.text_column if source.from_ is None else None
    if source.as_ and text and text != source.as_:
        rows = rows.rename_column(text, source.as_)
        text = source.as_
    if source.from_ is None:
        rows = _with_ids(rows, text or source.as_ or "text", name, run.derived_ids)
    total = limit if isinstance(rows, IterableDataset) else rows.num_rows
    return rows, total


def _call_kwargs(run: Run, step: Step, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage's keyword arguments (endpoint and needs resolved) and its ``post`` function's."""
    post_names = set(list(inspect.signature(step.post).parameters)[1:]) if step.post else set()
    kwargs = {k: v for k, v in params.items() if k not in post_names and k != "endpoint"}
    post_kwargs = {k: v for k, v in params.items() if k in post_names}
    if step.role:
        role = params.get("endpoint", step.role)
        if role == "judge" and role not in run.recipe.endpoints:
            role = "generator"
        kwargs["endpoint"] = run.recipe.endpoints[role]
    for param, kind in step.needs.items():
        if kind == "search":
            if param in run.search:
                kwargs[param] = run.search[param]
        elif kind == "dataset":
            kwargs[param] = run.train[params.get(param, param)]
    return kwargs, post_kwargs


@dataclass
class Line:
    """A stage line resolved once, for whichever engine maps it (``_chain`` here, actors in
    :mod:`synthq_hf.ray_engine`): the same keyword arguments, skipping rule and features for both."""

    name: str
    step: Step
    kwargs: dict[str, Any]
    post_kwargs: dict[str, Any]
    skip: bool  # rows an earlier stage rejected are skipped (a row stage after a marking)
    features: Features  # after the stage
    post_features: Features  # after its ``post`` marking (the same when it has none)
    marked: Features  # after ``mark_rejected``


def lines(run: Run, features: Features, stages: list[tuple[str, dict[str, Any]]]) -> list[Line]:
    """The stage lines over rows of ``features``, in order."""
    registry, resolved = steps(), []
    for name, params in stages:
        step = registry[name]
        kwargs, post_kwargs = _call_kwargs(run, step, params)
        skip = "rejected_by" in features and step.skip_rejected and step.kind == "row"
        after = Features({**features, **step.features})
        post = Features({**after, **(step.post_features or {})}) if step.post else after
        # A row this stage failed is out from here on: later stages skip it (no requests) and their own marking
        # cannot claim it, so its reason stays this stage's.
        features = Features({**post, **REJECT_FEATURES})
        resolved.append(Line(name, step, kwargs, post_kwargs, skip, after, post, features))
    return resolved


def _chain(run: Run, rows: Rows, stages: list[tuple[str, dict[str, Any]]]) -> Rows:
    """The row and batch stages as chained ``map`` calls, then the marking that routes failed rows."""
    for line in lines(run, rows.features, stages):
        step, fn, kwargs = line.step, line.step.fn, line.kwargs
        if line.skip:
            kwargs = {**kwargs, "_stage_fn": fn, "_empty": dict.fromkeys(step.features)}
            fn = skip_rejected
        extra = {"batched": True, "batch_size": step.batch_size} if step.kind == "batch" else {}
        rows = _map(rows, fn, kwargs, line.features, line.name, **extra)
        if step.post:
            rows = _map(rows, step.post, line.post_kwargs, line.post_features, f"{line.name} marks")
        rows = _map(rows, mark_rejected, {"threshold": None}, line.marked, f"{line.name} failures")
    if not stages:
        features = Features({**rows.features, **REJECT_FEATURES})
        rows = _map(rows, mark_rejected, {"threshold": None}, features, "mark rejected")
    return rows


def _schema(base: Features, name: str, spec: DatasetSpec) -> tuple[Features, Features]:
    """(every column the stages make, the config's schema). Both are known before the first row: every split of a
    config must share one schema for ``load_dataset`` to open them, so both carry the columns every stage adds
    (global ones too) from the start. The config's schema applies the dataset's ``rename`` and ``columns``."""
    registry = steps()
    full = dict(base)
    for stage in spec.stages:
        step = registry[stage]
        full.update(step.features)
        if step.post_features:
            full.update(step.post_features)
    full.update(REJECT_FEATURES)
    shaped = {spec.rename.get(k, k): v for k, v in full.items()}
    if spec.columns is not None:
        missing = [c for c in spec.columns if c not in shaped]
        if missing:
            raise RecipeError(
                f"datasets.{name}.columns: no stage makes {', '.join(missing)}; there are {', '.join(shaped)}"
            )
        shaped = {k: shaped[k] for k in dict.fromkeys([*spec.columns, *REJECT_FEATURES])}
    return Features(full), Features(shaped)


def _shaped(row: dict[str, Any], rename: dict[str, str]) -> dict[str, Any]:
    return {rename.get(k, k): v for k, v in row.items()} if rename else row


def _conform(ds: Dataset, features: Features, rename: dict[str, str]) -> Dataset:
    """``ds`` with the config's columns: renamed, missing ones added empty, then cast to the one schema."""
    if rename:
        ds = ds.rename_columns({k: v for k, v in rename.items() if k in ds.column_names})
    for name, feature in features.items():
        if name not in ds.column_names:
            ds = ds.add_column(name, [None] * ds.num_rows, feature=feature)
    return ds.select_columns(list(features)).cast(features)


def _segments(spec: DatasetSpec) -> list[list[tuple[str, dict[str, Any]]]]:
    """The stages cut after each global stage: each segment streams its row stages, then runs its global one."""
    registry = steps()
    segments: list[list[tuple[str, dict[str, Any]]]] = [[]]
    for stage, params in spec.stages.items():
        segments[-1].append((stage, params))
        if registry[stage].kind == "global":
            segments.append([])
    return segments


def _run_dataset(run: Run, name: str, spec: DatasetSpec) -> Result:
    """One named dataset: its stages in order, streamed between global stages, into its config."""
    registry = steps()
    rows, total = _source_rows(run, name, spec.source)
    full, shaped = _schema(rows.features, name, spec)
    shard_rows = run.recipe.output.shard_rows
    result = Result({}, [], {}, {}, {})
    for stage, params in spec.stages.items():
        describe = registry[stage].describe
        if describe is not None:
            result.facts.update(describe(**params))
    rejected = output.ShardWriter(run.out, name, "rejected", shaped, shard_rows=shard_rows)
    segments = _segments(spec)
    kept: Rows = rows
    train_glob = None
    for number, segment in enumerate(segments):
        row_stages = [(s, p) for s, p in segment if registry[s].kind != "global"]
        final = number == len(segments) - 1
        # Rows kept before a global stage keep every column (later stages may read one the config leaves out).
        folder, features, rename = (run.out, shaped, spec.rename) if final else (run.out / WORK / name, full, {})
        writer = output.ShardWriter(folder, f"{name}-{number}" if not final else name, "train", features, shard_rows)
        if row_stages or number == 0 or isinstance(kept, IterableDataset):
            if run.engine == "ray":
                from synthq_hf.ray_engine import ray_chain

                mapped = ray_chain(run, kept, row_stages)
            else:
                mapped = _chain(run, kept, row_stages)
            table, reasons = _stream(run, name, mapped, (writer, rename), (rejected, spec.rename), total, row_stages)
            result.table += table
            result.reasons.update(reasons)
        else:
            writer.add_dataset(_conform(kept, features, rename))
        glob = writer.close()
        if final:
            train_glob = glob
            break
        stage, params = segment[-1]
        kept = _kept_rows(folder, glob, full)
        before, dropped_rows = kept.num_rows, 0
        if before:
            print(f"{name}: {stage} over {before} kept rows", file=sys.stderr, flush=True)
            kept, dropped, *figures = registry[stage].fn(kept, **params)
            dropped_rows = dropped.num_rows
            result.reasons[stage] = dict(Counter(_summary(r) for r in dropped["reason"]))
            rejected.add_dataset(_conform(dropped, shaped, spec.rename))
            if figures and figures[0]:
                result.stats[stage] = dict(figures[0])
            total = kept.num_rows
        result.table.append(
            {"dataset": name, "name": stage, "in": before, "out": before - dropped_rows, "rejected": dropped_rows}
            | {"errors": 0}
        )
    shutil.rmtree(run.out / WORK, ignore_errors=True)
    back = {new: old for old, new in spec.rename.items()}
    train = _kept_rows(run.out, train_glob, shaped)
    run.train[name] = train.rename_columns({k: v for k, v in back.items() if k in train.column_names})
    result.splits = {"train": train_glob, "rejected": rejected.close()}
    return result


def _kept_rows(folder: Path, glob: str | None, features: Features) -> Dataset:
    """A written train split as a ``Dataset`` for what comes next (empty, with its schema, when nothing was
    kept), without its empty ``rejected_by``/``reason``: global stages write their own."""
    if glob is None:
        ds = Dataset.from_dict({k: [] for k in features}, features=features)
    else:
        ds = Dataset.from_parquet(sorted(str(p) for p in folder.glob(glob)))
    return ds.remove_columns([c for c in REJECT_FEATURES if c in ds.column_names])


def _stream(
    run: Run,
    name: str,
    mapped: Rows,
    train_to: tuple[output.ShardWriter, dict[str, str]],
    rejected_to: tuple[output.ShardWriter, dict[str, str]],
    total: int | None,
    stages: list[tuple[str, dict[str, Any]]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Pull every row through the chain into train or rejected (each writer with its renaming), counting."""
    (train, train_rename), (rejected, rejected_rename) = train_to, rejected_to
    registry = steps()
    tally = _Tally(name, [s for s, _ in stages if registry[s].skip_rejected])
    # A Dataset's maps already ran (with their own bars) by now; a stream does its work as it is read here.
    streamed = isinstance(mapped, IterableDataset)
    progress = _Progress(name, total, run.tokens) if streamed else None
    kept_rows = rejected_rows = errors = 0
    for row in mapped:  # (a Dataset of 0 rows cannot become an IterableDataset: it has no shard)
        tally.add(row)
        if row.get("rejected_by"):
            rejected.add(_shaped(row, rejected_rename))
            rejected_rows += 1
            errors += any(row.get(f"{s}_error") for s in tally.stages)
        else:
            train.add(_shaped(row, train_rename))
            kept_rows += 1
        if progress is not None:
            progress.update(kept_rows, rejected_rows, errors)
    if progress is not None:
        progress.close()
    return tally.table(), {k: dict(v) for k, v in tally.reasons.items()}


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    corpus: Rows | None = None,
    sources: dict[str, Rows] | None = None,
    engine: str = "datasets",
    ray_address: str | None = None,
) -> Path:
    """Run ``recipe`` into ``out_dir`` (default ``recipe.output.dir``); optionally push the folder to the Hub.

    ``sources`` replaces named datasets' outside sources with datasets built in Python (e.g. an
    ``IterableDataset`` from a generator); ``corpus`` is the same for the main input (:attr:`Recipe.main`).
    The recipe's ``text_column``, ``as`` and ``limit`` still apply. ``limit`` caps the main input.
    ``engine="ray"`` runs the row stages on Ray Data (:mod:`synthq_hf.ray_engine`), on the cluster at
    ``ray_address`` (default: the one Ray finds, else a local one); the output is the same.
    """
    if engine not in ("datasets", "ray"):
        raise ValueError(f"unknown engine {engine!r}: use datasets or ray")
    if engine == "ray":  # no Ray: said before anything is read or built
        from synthq_hf.ray_engine import require_ray

        require_ray()
    out = Path(out_dir or recipe.output.dir)
    given = dict(sources or {})
    if corpus is not None:
        given[recipe.main] = corpus
    inputs = _open_inputs(recipe, given)  # bad input is refused before the folder is touched
    registry = steps()
    for spec in recipe.datasets.values():
        for stage, params in spec.stages.items():
            if registry[stage].check is not None:
                registry[stage].check(**params)
    run = Run(recipe, out, inputs, _search(recipe), limit, engine)
    _check_shapes(run)
    if engine == "ray":  # no cluster there: refused before the folder is touched
        from synthq_hf.ray_engine import connect

        connect(ray_address)
    _prepare(out, recipe, overwrite)
    # datasets keeps up to this many rows in flight per async map and, per finished row, waits on all of them
    # (O(in flight) each): twice the widest endpoint's concurrency keeps servers busy at a fraction of the cost.
    widest = max((cfg.max_concurrency or 128 for cfg in recipe.endpoints.values()), default=128)
    previous = datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL
    datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = max(16, 2 * widest)
    started = time.monotonic()
    for cfg in recipe.endpoints.values():
        cfg.usage.clear()
    results: dict[str, Result] = {}
    try:
        for name, spec in recipe.datasets.items():
            results[name] = _run_dataset(run, name, spec)
    finally:
        datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = previous
    configs = {name: result.splits for name, result in results.items()}
    report = _report(run, results, started, push_to_hub)
    output.write_run_report(out, report)
    print(f"writing the dataset card in {out}", file=sys.stderr, flush=True)
    _write_card(out, report, output.present(configs))
    if push_to_hub:
        from synthq_hf.hub import push_folder

        push_folder(out, push_to_hub, private=private)
    return out


def _report(run: Run, results: dict[str, Result], started: float, push_to_hub: str | None) -> dict[str, Any]:
    recipe = run.recipe
    reasons: dict[str, dict[str, int]] = {}
    for name, result in results.items():
        for stage, counts in result.reasons.items():
            reasons[f"{name}.{stage}" if stage in reasons else stage] = counts
    facts: dict[str, Any] = {}
    for result in results.values():
        facts.update(result.facts)
    stats = {name: result.stats for name, result in results.items() if result.stats}
    stages_used = [stage for spec in recipe.datasets.values() for stage in spec.stages]
    usage: dict[str, dict[str, float]] = {}
    for cfg in recipe.endpoints.values():
        for stage, counted in cfg.usage.items():
            merged = usage.setdefault(stage, dict.fromkeys(counted.as_dict(), 0))
            for key, value in counted.as_dict().items():
                merged[key] += value
    return {
        **facts,
        "recipe": recipe.as_dict(),
        "limit": run.limit,
        "seed": recipe.seed,
        "seconds": round(time.monotonic() - started, 2),
        "stages": [row for result in results.values() for row in result.table],
        "rejected_reasons": reasons,
        "counts": {
            name: {split: _count(run.out, pattern) for split, pattern in result.splits.items()}
            for name, result in results.items()
        },
        **_describe_endpoints(recipe),
        "stats": stats,
        "diversity": {k: v for per in stats.values() for figures in per.values() for k, v in figures.items()},
        "pretty_name": recipe.output.pretty_name,
        "prompt_hashes": {s: prompts.prompt_hash(s) for s in stages_used if any(prompts.PROMPT_DIR.glob(f"{s}.*.j2"))},
        "sources": {name: _describe_source(run, name, spec.source) for name, spec in recipe.datasets.items()},
        "derived_ids": dict(run.derived_ids),
        "usage": usage,
        "versions": output.package_versions(),
        "repo_id": push_to_hub,
    }


def _describe_source(run: Run, name: str, source: SourceSpec) -> str:
    if source.from_ is not None:
        return f"the train split of {source.from_}"
    if source.generate is not None:
        return f"{source.generate} rows generated from nothing"
    derived = run.derived_ids[name]
    text = source.dataset if name not in run.inputs or source.dataset else "a dataset given in Python"
    return f"{text} ({derived} rows without an id got the hash of their text as id)" if derived else str(text)


def _count(out: Path, pattern: str | None) -> int:
    import pyarrow.parquet as pq

    if pattern is None:
        return 0
    return sum(pq.ParquetFile(path).metadata.num_rows for path in sorted(out.glob(pattern)))


def _write_card(out: Path, report: dict[str, Any], configs: dict[str, dict[str, str]]) -> None:
    from synthq_hf.cards import write_card

    write_card(out, report, configs)
