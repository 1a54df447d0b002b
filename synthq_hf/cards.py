"""Dataset card of a Hub-layout output folder: ``README.md`` (YAML metadata + ``configs:``), PNG plots in ``assets/``.

The card states what the run measured and nothing else. Tables come from the run report; plots and row counts come
from the parquet shards actually written, so the card cannot disagree with the data it describes. A report key that
is missing (or empty) drops its section; nothing is filled in with a guess.

Report keys read (all optional; the runner writes the same dict to ``run.json``):

- ``recipe``: ``{"name": str, "output": {"license": str}, "datasets": {name: {"stages": {stage: params}}}}``, whose
  ``filter`` stage has ``threshold`` (older reports: top-level ``"instructions": {"filter": ...}``); the license
  defaults to ``"other"``, the score threshold to 3 (the paper's; the card says when it is a default).
- ``pretty_name``: str, else ``"synthq-hf: <recipe name>"``, else a generic name.
- ``repo_id``: str, the Hub repo the folder is pushed to; the load snippet names it, else the local folder.
- ``models``: ``{role: model name as the server reported it}``.
- ``endpoints``: ``{role: {"dialect": str, ...}}``; only ``dialect`` is shown (URLs can name private hosts).
- ``prompt_hashes``: ``{stage: hash}``.
- ``sources``: ``{name: description}``, e.g. ``{"seeds": ..., "corpus": ...}``.
- ``stages``: ``[{"name", "in", "out", "rejected", "errors", "dataset"}]`` in pipeline order; ``dataset`` (the named
  dataset the stage ran in) adds a first column when any entry has it.
- ``rejected_reasons``: ``{stage: {reason: count}}``; reasons that differ only by row ids, similarity values or raw
  replies are grouped, then the 10 largest per stage are shown and the rest summed as "other".
- ``usage``: ``{stage: {requests, cache_hits, prompt_tokens, completion_tokens, retries, failures, latency_s, ...}}``;
  every numeric field present is shown.
- ``seed``: int, the run seed; ``seconds``: float, the run's wall-clock duration.
- ``versions``: ``{package: version}``.
- ``diversity``: ``{metric: value}``; shown as a table when present (hook for the diversity stage).
- ``reward_model``: str; ``pairing``: ``"best_worst"`` or ``"mean_minus_2std"``; ``reward_objectives``: [name] in the
  order of each response's objective vector (absent: "objective 1", "objective 2", ...).

Data read: config ``instructions``, splits ``train`` and ``rejected``, columns ``total_score``, ``scores`` (struct of
0/1 criteria) and ``topic`` (train only); config ``preferences``, split ``train``, columns ``rewards``,
``chosen_index``, ``rejected_index``, ``reward_margin`` and ``reward_objectives`` — whichever exist.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from huggingface_hub import DatasetCardData
from matplotlib.figure import Figure

from synthq_hf.output import configs_yaml

TEMPLATE_DIR = Path(__file__).parent / "dataset_cards"
TEMPLATE = "synthq.md.j2"
ASSETS = "assets"
PLOTS = (
    "score_histogram.png",
    "criteria_pass_rates.png",
    "topic_sizes.png",
    "reward_distribution.png",
    "reward_margin.png",
)
DEFAULT_THRESHOLD = 3
SCORED_SPLITS = ("train", "rejected")
PREFERENCES = "preferences"
PREFERENCE_COLUMNS = ("rewards", "chosen_index", "rejected_index", "reward_margin", "reward_objectives")
PAIR_SIDES = ("chosen", "rejected")
PAIRINGS = {
    "best_worst": "its lowest-rewarded one",
    "mean_minus_2std": "one picked by the mean − 2·std rule",
    "best": "none: only the best response is kept",
}
TOP_REASONS = 10
MAX_TOPICS_SHOWN = 40
REASON_CHARS = 100
USAGE_ORDER = (
    "requests",
    "cache_hits",
    "prompt_tokens",
    "completion_tokens",
    "retries",
    "failures",
    "latency_s",
    "seconds",
)
SPLIT_NOTES = {
    ("instructions", "train"): "generated instructions that passed every filter",
    ("instructions", "rejected"): "generated instructions set aside, with `rejected_by` (stage) and `reason`",
    ("demonstrations", "train"): "seed instructions grounded in a document (scene + query compositions)",
    ("preferences", "train"): "instructions with scored responses (chosen / rejected)",
    ("preferences", "rejected"): "instructions no pair was made from, with `rejected_by` (stage) and `reason`",
}
# Reasons that name a row id, a similarity or a matched text are grouped by what they say, not by the details.
_REASON_GROUPS = (
    (re.compile(r"^exact duplicate\b.*", re.S), "exact duplicate"),
    (re.compile(r"^near duplicate\b.*", re.S), "near duplicate"),
    (re.compile(r"^(shares a \d+-gram with eval set \S+?):? .*", re.S), r"\1"),
    (re.compile(r"^whole-text match with a short prompt of (eval set \S+?):? .*", re.S), r"whole-text match with \1"),
)
_SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
)


# --- reading the written data -------------------------------------------------------------------------------------


def _shards(out: Path, configs: Mapping[str, Mapping[str, str]] | None, config: str, split: str) -> list[Path]:
    """The parquet files of (config, split): the card's own glob when given (a split the card does not list has
    none, whatever files an earlier run left), else the writer's naming."""
    pattern = f"{config}/{split}-*.parquet" if configs is None else configs.get(config, {}).get(split)
    return sorted(out.glob(pattern)) if pattern else []


def _read(paths: list[Path], columns: tuple[str, ...]) -> list[pa.Table]:
    """Only the wanted columns that each shard has: a few narrow columns, counted with arrow (millions of rows)."""
    return [pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names]) for path in paths]


def _value_counts(column: pa.ChunkedArray) -> dict[Any, int]:
    counts = pc.value_counts(pc.drop_null(column)).to_pylist()
    return {item["values"]: item["counts"] for item in counts}


def _scored_columns(out: Path, configs: Mapping[str, Mapping[str, str]] | None) -> list[pa.Table]:
    paths = [p for split in SCORED_SPLITS for p in _shards(out, configs, "instructions", split)]
    return _read(paths, ("total_score", "scores"))


def score_histogram(out: Path, configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[int, int]:
    """{total_score: rows} over every scored instruction, kept and rejected (a histogram of kept rows alone would
    show only the scores that passed). Rows without a score are not counted; no scored rows gives ``{}``."""
    counts: Counter[int] = Counter()
    for table in _scored_columns(out, configs):
        if "total_score" in table.column_names:
            counts.update({int(k): n for k, n in _value_counts(table["total_score"]).items()})
    return dict(sorted(counts.items()))


def pass_rates(out: Path, configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, float]:
    """{criterion: share of scored rows that meet it}, criteria in the order of the ``scores`` struct."""
    passed: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for table in _scored_columns(out, configs):
        if "scores" not in table.column_names or not pa.types.is_struct(table["scores"].type):
            continue
        for field in table["scores"].type:
            values = pc.struct_field(table["scores"], field.name)  # null where the whole struct is null
            passed[field.name] += pc.sum(values).as_py() or 0
            seen[field.name] += pc.count(values).as_py()
    return {name: passed[name] / seen[name] for name in seen if seen[name]}


def topic_sizes(out: Path, configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, int]:
    """{topic: kept rows}, largest first; ``{}`` when the kept instructions carry no ``topic`` column."""
    counts: Counter[str] = Counter()
    for table in _read(_shards(out, configs, "instructions", "train"), ("topic",)):
        if "topic" in table.column_names:
            counts.update({str(k): n for k, n in _value_counts(table["topic"]).items()})
    return dict(counts.most_common())


def _pick(lists: pa.Array, index: pa.Array) -> pa.Array:
    """Per row, the item of a per-response list at that row's index (the chosen or rejected response). Rows whose
    list or index is missing, or whose index is past the list's end, are left out rather than guessed."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0)
    valid = pc.fill_null(pc.and_(pc.greater_equal(index, 0), pc.less(index, lengths)), False)
    lists, index, lengths = lists.filter(valid), index.filter(valid), lengths.filter(valid).to_numpy()
    starts = np.cumsum(lengths) - lengths
    return pc.list_flatten(lists).take(pa.array(starts + index.to_numpy()))


def _floats(values: pa.Array) -> np.ndarray:
    return pc.drop_null(values).to_numpy(zero_copy_only=False).astype(float)


def preference_stats(out: Path, configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """What the ``preferences`` train split holds, read in record batches (the column of objective vectors can be
    the widest in the folder). ``{}`` when that split has no rows, else::

        {"pairs": int, "responses": Counter({responses per row: rows}),
         "rewards": every response's reward, "chosen": chosen rewards, "rejected": rejected rewards,
         "margins": reward_margin values (numpy float arrays),
         "objectives": [(mean over chosen, mean over rejected) per objective position]}
    """
    arrays: dict[str, list[np.ndarray]] = {"rewards": [], "chosen": [], "rejected": [], "margins": []}
    responses: Counter[int] = Counter()
    sums = {side: Counter() for side in PAIR_SIDES}
    counts = {side: Counter() for side in PAIR_SIDES}
    pairs = 0
    for path in _shards(out, configs, PREFERENCES, "train"):
        file = pq.ParquetFile(path)
        pairs += file.metadata.num_rows
        columns = [c for c in PREFERENCE_COLUMNS if c in file.schema_arrow.names]
        for batch in file.iter_batches(columns=columns) if columns else ():
            have = set(batch.schema.names)
            if "rewards" in have:
                arrays["rewards"].append(_floats(pc.list_flatten(batch["rewards"])))
                responses.update(_value_counts(pc.list_value_length(batch["rewards"])))
            if "reward_margin" in have:
                arrays["margins"].append(_floats(batch["reward_margin"]))
            for side in PAIR_SIDES:
                if f"{side}_index" not in have:
                    continue
                if "rewards" in have:
                    arrays[side].append(_floats(_pick(batch["rewards"], batch[f"{side}_index"])))
                if "reward_objectives" in have:
                    vectors = _pick(batch["reward_objectives"], batch[f"{side}_index"])
                    lengths = pc.fill_null(pc.list_value_length(vectors), 0)
                    for j in range(pc.max(lengths).as_py() or 0):
                        values = pc.list_element(vectors.filter(pc.greater(lengths, j)), j)
                        sums[side][j] += pc.sum(values).as_py() or 0.0
                        counts[side][j] += pc.count(values).as_py()
    if not pairs:
        return {}
    width = max([*counts["chosen"], *counts["rejected"], -1]) + 1
    objectives = [
        tuple(sums[side][j] / counts[side][j] if counts[side][j] else None for side in PAIR_SIDES) for j in range(width)
    ]
    stats = {name: np.concatenate(parts) if parts else np.array([]) for name, parts in arrays.items()}
    return {"pairs": pairs, "responses": responses, **stats, "objectives": objectives}


def split_rows(out: Path, configs: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    """[{config, split, rows}] from the shards' parquet metadata (no data is read)."""
    rows = []
    for config, splits in configs.items():
        for split in splits:
            count = sum(pq.ParquetFile(p).metadata.num_rows for p in _shards(out, configs, config, split))
            rows.append({"config": config, "split": split, "rows": count, "note": SPLIT_NOTES.get((config, split), "")})
    return rows


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket for a row count."""
    for bound, label in _SIZES:
        if rows < bound:
            return label
    return "n>1T"


# --- report tables ----------------------------------------------------------------------------------------------


def reason_group(reason: str) -> str:
    """One line per kind of reason: drop raw replies, ids and matched text, cut to a table cell's length."""
    text = " ".join(str(reason).split(" | raw reply:", 1)[0].split())
    for pattern, replacement in _REASON_GROUPS:
        if pattern.match(text):
            text = pattern.sub(replacement, text)
            break
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def top_reasons(reasons: Mapping[str, int], top: int = TOP_REASONS) -> list[tuple[str, int]]:
    """The ``top`` largest reason groups, then ``other (N kinds)`` with the rest summed."""
    grouped: Counter[str] = Counter()
    for reason, count in reasons.items():
        grouped[reason_group(reason)] += int(count)
    ranked = sorted(grouped.items(), key=lambda item: (-item[1], item[0]))
    shown, rest = ranked[:top], ranked[top:]
    if rest:
        shown.append((f"other ({len(rest)} kinds)", sum(count for _, count in rest)))
    return shown


def _usage_table(usage: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) with the known counters first; only numeric fields, only those some stage reports."""
    fields = {k for counters in usage.values() for k, v in counters.items() if isinstance(v, int | float)}
    columns = [k for k in USAGE_ORDER if k in fields] + sorted(fields - set(USAGE_ORDER))
    rows = [[stage, *(counters.get(k) for k in columns)] for stage, counters in usage.items()]
    return columns, rows


def _dialect(endpoint: Any) -> str | None:
    """The server kind of a report's endpoint entry; nothing else of it (a URL can name a private host)."""
    return endpoint.get("dialect") if isinstance(endpoint, Mapping) else None


def _threshold(report: Mapping[str, Any]) -> tuple[int | None, bool]:
    """(score threshold, whether the recipe recorded it). Recipes name their datasets now
    (``datasets: {name: {stages: ...}}``); older reports keep the stages under ``instructions``. The first dataset
    with a ``filter`` stage is the one that filtered; a recipe of the new form without one filtered nothing
    (e.g. ``synthq score``): ``(None, True)``."""
    recipe = report.get("recipe") or {}
    datasets = recipe.get("datasets") or {}
    if datasets and not any("filter" in ((d or {}).get("stages") or {}) for d in datasets.values()):
        return None, True
    candidates = [(d or {}).get("stages") or {} for d in (recipe.get("datasets") or {}).values()]
    candidates.append(recipe.get("instructions") or {})
    # As in recipes, ``filter: null`` runs with defaults and ``filter: false`` is switched off.
    filters = [stages["filter"] or {} for stages in candidates if stages.get("filter", False) is not False]
    value = filters[0].get("threshold") if filters else None
    return (DEFAULT_THRESHOLD, False) if value is None else (int(value), True)


def _objective_rows(
    means: list[tuple[float | None, float | None]], names: list[str] | None
) -> list[tuple[str, float | None, float | None]]:
    """(name, chosen mean, rejected mean) per objective; the names come from the run report, since only the reward
    stage knows its model's objectives, and positions stand in for names it did not record."""
    names = list(names or [])
    return [
        (names[j] if j < len(names) else f"objective {j + 1}", chosen, rejected)
        for j, (chosen, rejected) in enumerate(means)
    ]


def _samples(responses: Mapping[int, int]) -> str | None:
    """Responses per instruction as one number, or a range when rows differ."""
    sizes = [n for n in responses if n]
    if not sizes:
        return None
    return str(min(sizes)) if min(sizes) == max(sizes) else f"{min(sizes)}–{max(sizes)}"


def _duration(seconds: float) -> str:
    if float(seconds) < 60:
        return f"{float(seconds):.1f} s"
    minutes, secs = divmod(round(float(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s"


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _fixed(value: float | None) -> str:
    """Three decimals for a mean; rounding noise around zero must not print as ``-0.000``."""
    return "" if value is None else f"{round(float(value), 3) + 0.0:.3f}"


def _cell(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


# --- plots --------------------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    """Figure without pyplot: no global backend switch in the caller's process, nothing left open."""
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def plot_histogram(histogram: Mapping[int, int], threshold: int | None, path: Path) -> None:
    """``threshold`` None: nothing was filtered, so no line and no colour for the rejected side."""
    xs = list(range(0, max(7, *histogram) + 1))
    ys = [histogram.get(x, 0) for x in xs]
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    bars = ax.bar(xs, ys, color=["#c8553d" if threshold is not None and x < threshold else "#2d7dd2" for x in xs])
    ax.bar_label(bars, labels=[str(y) if y else "" for y in ys], fontsize=8)
    if threshold is not None:
        ax.axvline(threshold - 0.5, color="black", linestyle="--", linewidth=1)
        ax.text(threshold - 0.45, max(ys) * 0.95, f"threshold {threshold}", fontsize=8, va="top")
    ax.set_xticks(xs)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("total_score (criteria met)")
    ax.set_ylabel("instructions")
    ax.set_title(f"Scores of {sum(ys):,} scored instructions (kept and rejected)", fontsize=10)
    _save(fig, path)


def plot_pass_rates(rates: Mapping[str, float], path: Path) -> None:
    names = list(rates)[::-1]
    fig = Figure(figsize=(6, 0.45 * len(names) + 1.2))
    ax = fig.add_subplot()
    bars = ax.barh(names, [rates[n] for n in names], color="#2d7dd2")
    ax.bar_label(bars, labels=[f"{rates[n]:.0%}" for n in names], fontsize=8, padding=2)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("share of scored instructions meeting the criterion")
    _save(fig, path)


def plot_topics(sizes: Mapping[str, int], path: Path) -> None:
    shown = list(sizes.items())[:MAX_TOPICS_SHOWN]
    fig = Figure(figsize=(max(6, 0.25 * len(shown) + 2), 3.4))
    ax = fig.add_subplot()
    ax.bar(range(len(shown)), [n for _, n in shown], color="#2d7dd2")
    ax.set_xticks(range(len(shown)), [t for t, _ in shown], rotation=90, fontsize=7)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("topic")
    ax.set_ylabel("kept instructions")
    title = f"Largest {len(shown)} of {len(sizes)} topics" if len(sizes) > len(shown) else f"{len(sizes)} topics"
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def plot_rewards(rewards: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, path: Path) -> None:
    """All responses' rewards as bars, chosen and rejected as outlines on the same bins: where the pair's two
    sides sit within the whole distribution."""
    bins = np.histogram_bin_edges(rewards, bins=30)
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    ax.hist(rewards, bins=bins, color="#c9d6e3", label=f"all responses ({len(rewards):,})")
    ax.hist(chosen, bins=bins, histtype="step", linewidth=1.6, color="#2d7dd2", label=f"chosen ({len(chosen):,})")
    ax.hist(rejected, bins=bins, histtype="step", linewidth=1.6, color="#c8553d", label=f"rejected ({len(rejected):,})")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("reward")
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_margins(margins: np.ndarray, path: Path) -> None:
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    ax.hist(margins, bins=30, color="#2d7dd2")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("reward_margin")
    ax.set_ylabel("pairs")
    ax.set_title(f"Reward margins of {len(margins):,} pairs", fontsize=10)
    _save(fig, path)


# --- the card -----------------------------------------------------------------------------------------------------


def card_metadata(report: Mapping[str, Any], configs: Mapping[str, Mapping[str, str]], rows: int) -> DatasetCardData:
    """YAML front matter: Hub metadata plus ``configs:`` exactly as :func:`output.configs_yaml` writes them."""
    recipe = report.get("recipe") or {}
    name = recipe.get("name")
    pretty = report.get("pretty_name") or (f"synthq-hf: {name}" if name else "synthq-hf synthetic instructions")
    return DatasetCardData(
        pretty_name=pretty,
        license=(recipe.get("output") or {}).get("license", "other"),
        language=["en"],
        task_categories=["text-generation"],
        tags=["synthetic", "synthq-hf", "instruction-tuning"],
        size_categories=[size_category(rows)],
        configs=yaml.safe_load(configs_yaml(configs))["configs"],
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["num"] = _num
    env.filters["cell"] = _cell
    env.filters["fixed"] = _fixed
    return env


def write_card(out: Path, report: Mapping[str, Any], configs: Mapping[str, Mapping[str, str]]) -> Path:
    """Write ``out/README.md`` and its plots under ``out/assets/``; returns the README's path.

    ``configs`` is {config: {split: path glob}} as returned by :func:`output.write_split`, first config the default.
    """
    out = Path(out)
    assets = out / ASSETS
    assets.mkdir(exist_ok=True)
    for name in PLOTS:  # a plot from an earlier card of this folder must not outlive its data
        (assets / name).unlink(missing_ok=True)

    threshold, threshold_recorded = _threshold(report)
    histogram = score_histogram(out, configs)
    rates = pass_rates(out, configs)
    topics = topic_sizes(out, configs)
    if histogram:
        plot_histogram(histogram, threshold, assets / "score_histogram.png")
    if rates:
        plot_pass_rates(rates, assets / "criteria_pass_rates.png")
    if topics:
        plot_topics(topics, assets / "topic_sizes.png")
    preferences = preference_stats(out, configs) if PREFERENCES in configs else {}
    if len(preferences.get("rewards", ())):
        plot_rewards(
            preferences["rewards"], preferences["chosen"], preferences["rejected"], assets / "reward_distribution.png"
        )
    if len(preferences.get("margins", ())):
        plot_margins(preferences["margins"], assets / "reward_margin.png")
    if not any(assets.iterdir()):
        assets.rmdir()

    contents = split_rows(out, configs)
    metadata = card_metadata(report, configs, sum(r["rows"] for r in contents))
    instruction_rows = sum(r["rows"] for r in contents if r["config"] == "instructions" and r["split"] in SCORED_SPLITS)
    models = report.get("models") or {}
    endpoints = report.get("endpoints") or {}
    usage_columns, usage_rows = _usage_table(report.get("usage") or {})
    reasons = {stage: top_reasons(r) for stage, r in (report.get("rejected_reasons") or {}).items() if r}
    stages = report.get("stages") or []
    pairs = None
    if preferences:
        pairs = {
            "pairs": preferences["pairs"],
            "unpaired": sum(r["rows"] for r in contents if (r["config"], r["split"]) == (PREFERENCES, "rejected")),
            "samples": _samples(preferences["responses"]),
            "reward_model": report.get("reward_model"),
            "pairing": report.get("pairing"),
            "pairing_text": PAIRINGS.get(report.get("pairing")),
            "mean_chosen": float(preferences["chosen"].mean()) if len(preferences["chosen"]) else None,
            "mean_rejected": float(preferences["rejected"].mean()) if len(preferences["rejected"]) else None,
            "mean_margin": float(preferences["margins"].mean()) if len(preferences["margins"]) else None,
            "reward_plot": bool(len(preferences["rewards"])),
            "margin_plot": bool(len(preferences["margins"])),
            "objectives": _objective_rows(preferences["objectives"], report.get("reward_objectives")),
        }
    body = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            pretty_name=metadata.pretty_name,
            # The SynthQuestions account only where its stages ran; other recipes say what they are.
            synthquestions=any(s.get("name") == "generate_instruction" for s in report.get("stages") or []),
            recipe_name=(report.get("recipe") or {}).get("name"),
            description=(report.get("recipe") or {}).get("description"),
            load_target=report.get("repo_id") or str(out.resolve()),
            load_config="instructions" if "instructions" in configs else next(iter(configs), None),
            contents=contents,
            seed=report.get("seed"),
            duration=_duration(report["seconds"]) if report.get("seconds") is not None else None,
            sources=report.get("sources") or {},
            models=[
                {"role": role, "model": models.get(role), "dialect": _dialect(endpoints.get(role))}
                for role in dict.fromkeys([*models, *endpoints])
            ],
            prompt_hashes=report.get("prompt_hashes") or {},
            versions=report.get("versions") or {},
            stages=stages,
            stage_datasets=any("dataset" in s for s in stages),
            reasons=reasons,
            top_reasons=TOP_REASONS,
            threshold=threshold,
            threshold_recorded=threshold_recorded,
            histogram=histogram,
            scored=sum(histogram.values()),
            unscored=instruction_rows - sum(histogram.values()),
            rates=rates,
            topics=topics,
            max_topics=MAX_TOPICS_SHOWN,
            diversity=report.get("diversity") or {},
            pairs=pairs,
            usage_columns=usage_columns,
            usage_rows=usage_rows,
        )
    )
    path = out / "README.md"
    path.write_text(f"---\n{metadata.to_yaml()}\n---\n\n{body.strip()}\n", encoding="utf-8")
    return path
