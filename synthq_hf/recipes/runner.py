"""Run a recipe: seeds → demonstrations, corpus → instructions, written as a Hub-layout folder with a card.

The corpus side streams: an ``IterableDataset`` flows through the row stages and each row lands in a ``train`` or
``rejected`` shard as it arrives (``output.ShardWriter``), so memory stays flat however large the corpus. Global
stages (dedup, topic balancing) need every row at once; they run afterwards over the written ``train`` split,
which ``datasets`` memory-maps from disk, and send what they drop to ``rejected``.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets.config
from datasets import Dataset, Features, IterableDataset, Value

from synthq_hf import output, prompts
from synthq_hf.endpoint import USAGE, EndpointConfig, get_client
from synthq_hf.inputs import open_dataset, resolve_source
from synthq_hf.recipes.recipe import Recipe, RecipeError
from synthq_hf.stages._common import has_id, with_id
from synthq_hf.stages.reject import FEATURES as REJECT_FEATURES
from synthq_hf.stages.reject import mark_rejected, split_rejected

log = logging.getLogger(__name__)
MARKER = ".synthq-recipe.json"


def _stage(module: str, name: str) -> Callable[[], Callable]:
    def load() -> Callable:
        return getattr(__import__(f"synthq_hf.stages.{module}", fromlist=[name]), name)

    return load


@dataclass(frozen=True)
class Step:
    """How a recipe line runs: ``row`` stages map over rows (streaming), ``global`` ones take the whole split."""

    kind: str
    load: Callable[[], Callable]
    role: str | None = None  # endpoint role it calls; ``endpoint: <role>`` in its parameters picks another
    fixed: tuple[str, ...] = ()  # arguments the runner supplies
    post: Callable[[], Callable] | None = None  # a marking function mapped right after (takes its own parameters)

    def functions(self) -> list[Callable]:
        return [self.load()] + ([self.post()] if self.post else [])

    def split(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The recipe line's parameters for the stage and for its ``post`` function."""
        post_names = set(list(inspect.signature(self.post()).parameters)[1:]) if self.post else set()
        return (
            {k: v for k, v in params.items() if k not in post_names and k != "endpoint"},
            {k: v for k, v in params.items() if k in post_names},
        )

    def check(self, params: dict[str, Any], where: str, recipe: Recipe) -> None:
        allowed = [
            name
            for fn in self.functions()
            for name in list(inspect.signature(fn).parameters)[1:]
            if name not in self.fixed and name != "endpoint"
        ]
        if self.role:
            allowed.append("endpoint")
        for key in params:
            if key not in allowed:
                raise RecipeError(f"unknown parameter {where}.{key}; valid: {', '.join(allowed)}")
        if self.role:
            role = params.get("endpoint", self.role)
            if role not in recipe.endpoints and not (role == "judge" and "generator" in recipe.endpoints):
                raise RecipeError(f"{where} needs endpoints.{role}; the recipe has {', '.join(recipe.endpoints)}")


STEPS: dict[str, Step] = {
    "extract_keywords": Step("row", _stage("extract_keywords", "extract_keywords"), "generator"),
    "search_documents": Step("row", _stage("search_documents", "search_documents"), None, ("index", "web")),
    "ground": Step("row", _stage("ground", "ground"), "generator"),
    "generate_instruction": Step(
        "row", _stage("generate_instruction", "generate_instruction"), "generator", ("demonstrations",)
    ),
    "score_instruction": Step("row", _stage("score_instruction", "score_instruction"), "judge"),
    "filter": Step("mark", _stage("reject", "mark_rejected")),
    "moderate": Step("row", _stage("moderate", "moderate"), "guard", post=_stage("moderate", "mark_unsafe")),
    "dedup": Step("global", _stage("dedup", "dedup")),
    "decontaminate": Step("global", _stage("decontaminate", "decontaminate")),
    "balance_topics": Step("global", lambda: embed_and_balance),
}
#: Columns global stages add to the rows they reject or keep: part of the config's one schema from the start.
GLOBAL_FEATURES = {
    "dedup": Features({"duplicate_of": Value("string")}),
    "balance_topics": Features({"topic": Value("int64"), "topic_label": Value("string")}),
}


def embed_and_balance(
    ds: Dataset,
    target_size: int,
    n_topics: int = 100,
    sample_size: int = 200_000,
    seed: int = 0,
    model: str | None = None,
    embed_batch_size: int = 256,
    num_proc: int | None = None,
) -> tuple[Dataset, Dataset]:
    """The recipe's ``balance_topics`` line: embed the prompts (packaged MiniLM unless ``model`` names another
    sentence-transformers folder), then select ``target_size`` rows round-robin over BERTopic topics.

    The embeddings are not written to the output (1.5 KB a row); the diversity of the kept rows against all rows
    is kept in ``DIVERSITY`` for the run report. Needs the ``topics`` extra (torch, sentence-transformers, bertopic).
    """
    from synthq_hf.stages.balance_topics import balance_topics, diversity
    from synthq_hf.stages.embed import embed_dataset

    if "embedding" not in ds.column_names:
        ds = embed_dataset(ds, batch_size=embed_batch_size, num_proc=num_proc, model=model)
    kept, rejected = balance_topics(ds, target_size, n_topics=n_topics, sample_size=sample_size, seed=seed)
    DIVERSITY.clear()
    for name, part in (("kept", kept), ("before balancing", ds)):
        for metric, value in diversity(part, seed=seed).items():
            DIVERSITY[f"{metric} ({name})"] = value
    return kept, rejected


#: Diversity figures of the last :func:`embed_and_balance` (the card shows them).
DIVERSITY: dict[str, float] = {}
#: Rows per input (``seeds``, ``corpus``) of the last run that had no id and got the hash of their text.
DERIVED_IDS: Counter[str] = Counter()


def _fill_id(row: dict[str, Any], text_column: str, source: str) -> dict[str, str]:
    if not has_id(row):
        DERIVED_IDS[source] += 1
    return with_id(row, text_column)


def _with_ids(ds: Dataset | IterableDataset, text_column: str, source: str) -> Dataset | IterableDataset:
    """Every row with a text ``id``: its own, else the hash its requests are seeded with (counted for the card).
    Output rows can then always be named, e.g. by ``demonstration_ids`` and ``duplicate_of``."""
    features = Features({**ds.features, "id": Value("string")})
    return _map(ds, _fill_id, {"text_column": text_column, "source": source}, features, f"{source} ids")


async def skip_rejected(row: dict[str, Any], _stage_fn: Callable, **kwargs: Any) -> dict[str, Any]:
    """Run ``_stage_fn`` unless an earlier step already rejected the row: no requests for rows that are out.

    A skipped row gets the stage's columns empty (and no ``<stage>_error``): its reason is the earlier one.
    """
    if row.get("rejected_by"):
        return {name: None for name in sys.modules[_stage_fn.__module__].FEATURES}
    result = _stage_fn(row, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _endpoint(recipe: Recipe, step: Step, params: dict[str, Any]) -> EndpointConfig:
    role = params.get("endpoint", step.role)
    if role == "judge" and role not in recipe.endpoints:
        role = "generator"
    return recipe.endpoints[role]


def _features(module_name: str) -> Features:
    return sys.modules[module_name].FEATURES


def _apply_row_steps(
    ds: Dataset | IterableDataset,
    pipeline: dict[str, dict[str, Any]],
    recipe: Recipe,
    features: Features,
    extra: dict[str, Any],
) -> tuple[Dataset | IterableDataset, Features]:
    """Chain the pipeline's row stages as ``map`` calls; returns the dataset and its final features."""
    for name, params in pipeline.items():
        step = STEPS[name]
        if step.kind == "global":
            continue
        fn = step.load()
        kwargs, post_kwargs = step.split(params)
        if step.role:
            kwargs["endpoint"] = _endpoint(recipe, step, params)
        kwargs.update({key: extra[key] for key in step.fixed if key in extra})
        if "rejected_by" in features and step.kind == "row":  # after the filter: rejected rows cost nothing
            kwargs["_stage_fn"], fn = fn, skip_rejected
            features = Features({**features, **_features(kwargs["_stage_fn"].__module__)})
        else:
            features = Features({**features, **_features(fn.__module__)})
        ds = _map(ds, fn, kwargs, features, name)
        if step.post:
            features = Features({**features, **REJECT_FEATURES})  # post functions are marking functions
            ds = _map(ds, step.post(), post_kwargs, features, f"{name} marks")
    return ds, features


def _map(ds: Dataset | IterableDataset, fn: Callable, kwargs: dict, features: Features, desc: str):
    map_kwargs: dict[str, Any] = {"fn_kwargs": kwargs, "features": features}
    if isinstance(ds, Dataset):
        map_kwargs.update(desc=desc, load_from_cache_file=False)
    return ds.map(fn, **map_kwargs)


def _summary(reason: str | None) -> str:
    """A rejection reason without the raw reply and attempt count: rows with the same cause group together."""
    text = (reason or "").split(" | raw reply", 1)[0]
    return text.replace(" (after 3 attempts)", "").strip()[:160]


class _Tally:
    """Counts per stage while rows stream past: who rejected what, and each stage's row errors."""

    def __init__(self, stages: list[str]):
        self.stages = stages
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

    def table(self) -> list[dict[str, Any]]:
        rows, table = self.rows, []
        for stage in self.stages:
            rejected = self.rejected_by.get(stage, 0)
            table.append(
                {"name": stage, "in": rows, "out": rows - rejected, "rejected": rejected, "errors": self.errors[stage]}
            )
            rows -= rejected
        return table


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
    """The BM25 index folder: the recipe's, or one built once from a local corpus and kept in the cache."""
    if recipe.search.index:
        return recipe.search.index
    source = resolve_source(recipe.corpus.dataset)
    if not Path(source).exists():
        raise RecipeError(
            "search.index is not set and the corpus is not a local file to index; build one with "
            f"`synthq index build --dataset {recipe.corpus.dataset} --text-column {recipe.corpus.text_column} "
            "--out DIR` and pass --set search.index=DIR"
        )
    from synthq_hf.cache import default_cache_path
    from synthq_hf.search.bm25 import build_index

    stat = Path(source).stat()
    key = hashlib.blake2b(f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=8)
    folder = default_cache_path().parent / "indexes" / f"{Path(source).stem}-{key.hexdigest()}"
    if not folder.exists():  # build_index writes to <folder>.partial and renames: a folder is a finished index
        columns = open_dataset(source, split=recipe.corpus.split, text_column=recipe.corpus.text_column).column_names
        build_index(
            source,
            text_column=recipe.corpus.text_column,
            out=folder,
            id_column="id" if "id" in columns else None,
            url_column="url" if "url" in columns else None,
            split=recipe.corpus.split,
            streaming=False,
            progress=False,
        )
    return str(folder)


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


def _demonstrations(recipe: Recipe, out: Path) -> tuple[Dataset, dict[str, str], list[dict[str, Any]], dict]:
    spec = recipe.seeds
    seeds = open_dataset(spec.dataset, config=spec.config, split=spec.split, text_column=spec.text_column)
    if recipe.seeds.limit:
        seeds = seeds.select(range(min(recipe.seeds.limit, len(seeds))))
    if recipe.seeds.text_column != "prompt":
        seeds = seeds.rename_column(recipe.seeds.text_column, "prompt")
    seeds = _with_ids(seeds, "prompt", "seeds")
    extra: dict[str, Any] = {}
    if "search_documents" in recipe.demonstrations:
        if recipe.search.backend == "web":
            from synthq_hf.search.web import WebSearchConfig

            extra["web"] = WebSearchConfig(**recipe.search.web)
        else:
            extra["index"] = _index_for(recipe)
    mapped, features = _apply_row_steps(seeds, recipe.demonstrations, recipe, seeds.features, extra)
    marked = mapped.map(
        mark_rejected,
        fn_kwargs={"threshold": None},
        features=Features({**features, **REJECT_FEATURES}),
        load_from_cache_file=False,
        desc="mark rejected",
    )
    tally = _Tally(list(recipe.demonstrations))
    marks = [c for c in marked.column_names if c.endswith("_error") or c in ("rejected_by", "reason")]
    for row in marked.select_columns(marks):
        tally.add(row)
    kept, rejected = split_rejected(marked)
    splits = {
        "train": output.write_split(kept, out, "demonstrations", "train"),
        "rejected": output.write_split(rejected, out, "demonstrations", "rejected"),
    }
    return kept, splits, tally.table(), {k: dict(v) for k, v in tally.reasons.items()}


class _Progress:
    """Rows/s, tokens/s, errors and ETA while rows stream: a tqdm bar on a terminal, a plain line every
    ``every_s`` seconds otherwise (logs and CI keep a readable record)."""

    def __init__(self, total: int | None, every_s: float = 15.0):
        from tqdm.auto import tqdm

        self.total, self.every_s = total, every_s
        self.started = self.last = time.monotonic()
        self.rows = 0
        self.bar = tqdm(total=total, desc="instructions", unit="row", mininterval=1.0) if sys.stderr.isatty() else None

    def update(self, kept: int, rejected: int, errors: int) -> None:
        self.rows += 1
        tokens = sum(u.prompt_tokens + u.completion_tokens for u in USAGE.values())
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
            rate = tokens / max(now - self.started, 1e-9)
            self.bar.set_postfix(kept=kept, rejected=rejected, errors=errors, tok_s=f"{rate:.0f}", refresh=False)
        elif now - self.last >= self.every_s or self.rows == self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            eta = f", ETA {(self.total - self.rows) * elapsed / self.rows:.0f}s" if self.total else ""
            print(
                f"instructions: {self.rows}{f'/{self.total}' if self.total else ''} rows "
                f"({kept} kept, {rejected} rejected, {errors} errors), {self.rows / elapsed:.2f} rows/s, "
                f"{tokens / elapsed:.0f} tokens/s{eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _instructions(
    recipe: Recipe,
    out: Path,
    demonstrations: Dataset,
    limit: int | None,
    corpus: Dataset | IterableDataset | None = None,
) -> tuple[dict[str, str], list[dict[str, Any]], dict]:
    spec = recipe.corpus
    if corpus is None:
        corpus = open_dataset(
            spec.dataset, config=spec.config, split=spec.split, streaming=spec.streaming, text_column=spec.text_column
        )
    limit = limit or spec.limit
    if limit and isinstance(corpus, IterableDataset):
        corpus = corpus.take(limit)  # counts streamed rows; nothing past them is read
    elif limit:
        corpus = corpus.select(range(min(limit, len(corpus))))
    if isinstance(corpus, IterableDataset) and corpus.features is None:
        corpus = corpus._resolve_features()
    if spec.text_column != "document":
        corpus = corpus.rename_column(spec.text_column, "document")
    corpus = _with_ids(corpus, "document", "corpus")
    row_steps = {k: v for k, v in recipe.instructions.items() if STEPS[k].kind != "global"}
    mapped, features = _apply_row_steps(corpus, row_steps, recipe, corpus.features, {"demonstrations": demonstrations})
    filtering = "filter" in recipe.instructions
    features = Features({**features, **REJECT_FEATURES})
    if "filter" not in recipe.instructions:
        mapped = mapped.map(mark_rejected, fn_kwargs={"threshold": None}, features=features)
    # Every split of a config must share one schema (datasets refuses to load it otherwise): train carries the
    # empty rejected_by/reason columns, and both carry the columns global stages add, from the start.
    global_steps = {k: v for k, v in recipe.instructions.items() if STEPS[k].kind == "global"}
    for name in global_steps:
        features = Features({**features, **GLOBAL_FEATURES.get(name, {})})
    shard_rows = recipe.output.shard_rows
    streamed_to = out / ".work" if global_steps else out  # global stages rewrite train from this first pass
    train = output.ShardWriter(streamed_to, "instructions", "train", features, shard_rows=shard_rows)
    rejected = output.ShardWriter(out, "instructions", "rejected", features, shard_rows=shard_rows)
    stages_seen = [s for s in row_steps if s != "filter"]
    if filtering and "score_instruction" not in stages_seen:
        stages_seen.append("score_instruction")  # the filter's rejections are the score's
    tally = _Tally(stages_seen)
    progress = _Progress(limit)
    kept_rows = rejected_rows = errors = 0
    for row in mapped if isinstance(mapped, IterableDataset) else mapped.to_iterable_dataset():
        tally.add(row)
        if row.get("rejected_by"):
            rejected.add(row)
            rejected_rows += 1
            errors += any(row.get(f"{s}_error") for s in stages_seen)
        else:
            train.add(row)
            kept_rows += 1
        progress.update(kept_rows, rejected_rows, errors)
    progress.close()
    train_glob = train.close()
    table, reasons = tally.table(), {k: dict(v) for k, v in tally.reasons.items()}
    if global_steps:
        kept = None
        if train_glob:  # kept rows' empty rejected_by/reason go: global stages write their own
            kept = Dataset.from_parquet(sorted(str(p) for p in streamed_to.glob(train_glob)))
            kept = kept.remove_columns([c for c in REJECT_FEATURES if c in kept.column_names])
        for name, params in global_steps.items():
            before = kept.num_rows if kept is not None else 0
            dropped = 0
            if kept is not None and before:
                print(f"instructions: {name} over {before} kept rows", file=sys.stderr, flush=True)
                kept, dropped_rows = STEPS[name].load()(kept, **params)
                dropped = dropped_rows.num_rows
                marks = Counter(_summary(r) for r in dropped_rows["reason"])
                reasons[name] = dict(marks)
                rejected.add_dataset(_conform(dropped_rows, features))
            table.append({"name": name, "in": before, "out": before - dropped, "rejected": dropped, "errors": 0})
        final = output.ShardWriter(out, "instructions", "train", features, shard_rows=shard_rows)
        if kept is not None:
            final.add_dataset(_conform(kept, features))
        train_glob = final.close()
        shutil.rmtree(streamed_to, ignore_errors=True)
    return {"train": train_glob, "rejected": rejected.close()}, table, reasons


def _conform(ds: Dataset, features: Features) -> Dataset:
    """``ds`` with the config's columns: missing ones added empty, then cast to the one schema."""
    for name, feature in features.items():
        if name not in ds.column_names:
            ds = ds.add_column(name, [None] * ds.num_rows, feature=feature)
    return ds.select_columns(list(features)).cast(features)


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    corpus: Dataset | IterableDataset | None = None,
) -> Path:
    """Run ``recipe`` into ``out_dir`` (default ``recipe.output.dir``); optionally push the folder to the Hub.

    ``corpus`` replaces the recipe's corpus source with a dataset built in Python (e.g. an ``IterableDataset``
    from a generator); the recipe's ``text_column`` and ``limit`` still apply.
    """
    out = Path(out_dir or recipe.output.dir)
    _prepare(out, recipe, overwrite)
    # datasets keeps up to this many rows in flight per async map and, per finished row, waits on all of them
    # (O(in flight) each): twice the widest endpoint's concurrency keeps servers busy at a fraction of the cost.
    widest = max((cfg.max_concurrency or 128 for cfg in recipe.endpoints.values()), default=128)
    previous = datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL
    datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = max(16, 2 * widest)
    started = time.monotonic()
    USAGE.clear()
    DIVERSITY.clear()
    DERIVED_IDS.clear()
    try:
        demonstrations, demo_splits, demo_table, demo_reasons = _demonstrations(recipe, out)
        instruction_splits, table, reasons = _instructions(recipe, out, demonstrations, limit, corpus)
    finally:
        datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = previous
    configs = {"instructions": instruction_splits, "demonstrations": demo_splits}
    stages_used = [*recipe.demonstrations, *recipe.instructions]
    report = {
        "recipe": recipe.as_dict(),
        "limit": limit,
        "seed": recipe.seed,
        "seconds": round(time.monotonic() - started, 2),
        "stages": demo_table + table,
        "rejected_reasons": {**demo_reasons, **reasons},
        "counts": {
            config: {split: _count(out, pattern) for split, pattern in splits.items()}
            for config, splits in configs.items()
        },
        **_describe_endpoints(recipe),
        "diversity": dict(DIVERSITY) if "balance_topics" in recipe.instructions else None,
        "pretty_name": recipe.output.pretty_name,
        "prompt_hashes": {
            s: prompts.prompt_hash(s) for s in stages_used if (prompts.PROMPT_DIR / f"{s}.user.j2").exists()
        },
        "sources": {
            name: f"{source} ({DERIVED_IDS[name]} rows without an id got the hash of their text as id)"
            if DERIVED_IDS[name]
            else source
            for name, source in (("seeds", recipe.seeds.dataset), ("corpus", recipe.corpus.dataset))
        },
        "derived_ids": dict(DERIVED_IDS),
        "usage": {stage: usage.as_dict() for stage, usage in USAGE.items()},
        "versions": output.package_versions(),
        "repo_id": push_to_hub,
    }
    output.write_run_report(out, report)
    print(f"writing the dataset card in {out}", file=sys.stderr, flush=True)
    _write_card(out, report, output.present(configs))
    if push_to_hub:
        from synthq_hf.hub import push_folder

        push_folder(out, push_to_hub, private=private)
    return out


def _count(out: Path, pattern: str | None) -> int:
    import pyarrow.parquet as pq

    if pattern is None:
        return 0
    return sum(pq.ParquetFile(path).metadata.num_rows for path in sorted(out.glob(pattern)))


def _write_card(out: Path, report: dict[str, Any], configs: dict[str, dict[str, str]]) -> None:
    try:
        from synthq_hf.cards import write_card
    except ImportError:  # the card module is optional until it lands; a minimal card keeps the folder loadable
        counts = report["counts"]["instructions"]
        output.write_readme(
            out,
            configs,
            f"# {report['recipe']['name']}\n\n{counts['train']} instructions kept, {counts['rejected']} rejected; "
            "see run.json for what ran.\n",
        )
        return
    write_card(out, report, configs)
