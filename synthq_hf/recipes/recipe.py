"""Recipes: YAML → dataclasses, with ``--set a.b=c`` overrides and one-line errors for typos.

A recipe names its endpoints by role (``generator``, ``judge``, ``guard``), the search backend, and a list of
**named datasets**, run in the order written. Each one is

- a ``source``: a file/folder/Hub dataset (``dataset: …``, with ``text_column`` and ``as``, the column name the
  stages read), another named dataset of this run (``from: instructions``: its ``train`` split), or rows made
  from nothing (``generate: 1000``: ids ``0`` … ``999``);
- ``stages``: an ordered mapping ``stage: {parameters}`` of row stages (streamed) and global stages (over the
  rows kept so far), run in exactly that order;
- what it writes: a config of the same name with ``train`` and ``rejected`` splits; ``rename`` and ``columns``
  shape its rows (e.g. DPO-ready preference pairs).

A stage with no parameters (``score_instruction:`` or ``{}``) runs with its defaults; one set to ``false``
(``--set datasets.instructions.stages.moderate=false``) is skipped, and so is a dataset set to ``false``.
Which stages exist is :func:`synthq_hf.stages.registry.steps`: each stage module declares its own.

The older two-pipeline form (top-level ``seeds``, ``corpus``, ``demonstrations``, ``instructions``) still loads:
it is read as the datasets ``demonstrations`` (seeds, text as ``prompt``) and ``instructions`` (corpus, text as
``document``).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synthq_hf.endpoint import EndpointConfig
from synthq_hf.stages._step import Step
from synthq_hf.stages.registry import steps

RECIPE_DIR = Path(__file__).parent
#: YAML keys that are Python keywords, and the field each fills.
_ALIASES = {"from": "from_", "as": "as_"}


class RecipeError(ValueError):
    """A recipe that cannot run as written: unknown name or key, bad value. Always one line."""


@dataclass
class SourceSpec:
    """Where a dataset's rows come from: exactly one of ``dataset`` (Hub name, local file(s)/folder, or
    ``bundled:NAME``), ``from`` (a named dataset of this run, its train split) or ``generate`` (N rows).

    ``text_column`` holds the text in an outside dataset; ``as`` renames it to the column the stages read
    (``prompt``, ``document``). ``limit`` caps the rows read (streamed rows count).
    """

    dataset: str | None = None
    text_column: str = "text"
    config: str | None = None
    split: str = "train"
    streaming: bool = False
    limit: int | None = None
    from_: str | None = None
    generate: int | None = None
    as_: str | None = None

    def __post_init__(self) -> None:
        chosen = {"dataset": self.dataset, "from": self.from_, "generate": self.generate}
        given = [key for key, value in chosen.items() if value is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of dataset, from, generate; got {', '.join(given) or 'none'}")
        if self.generate is not None and (not isinstance(self.generate, int) or self.generate < 1):
            raise ValueError(f"generate must be a positive number of rows, got {self.generate!r}")

    def as_dict(self) -> dict[str, Any]:
        return {key.rstrip("_"): value for key, value in dataclasses.asdict(self).items()}


@dataclass
class DatasetSpec:
    """A named dataset of the run: its source, its stages in order, and how its config's rows are shaped."""

    source: SourceSpec
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    rename: dict[str, str] = field(default_factory=dict)
    columns: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.as_dict(),
            "stages": self.stages,
            "rename": self.rename,
            "columns": self.columns,
        }


@dataclass
class SearchSpec:
    """``bm25`` with an ``index`` folder (``null``: build one from the main input, fine for small corpora) or
    ``web``."""

    backend: str = "bm25"
    index: str | None = None
    web: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSpec:
    dir: str = "synthq-output/run"
    license: str = "other"
    shard_rows: int = 50_000
    pretty_name: str | None = None


@dataclass
class Recipe:
    name: str
    endpoints: dict[str, EndpointConfig]
    datasets: dict[str, DatasetSpec]
    description: str = ""
    seed: int = 0
    cache: bool = True
    cache_path: str | None = None
    search: SearchSpec = field(default_factory=SearchSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    @property
    def main(self) -> str:
        """The dataset ``--limit`` caps: the last one read from outside (a file, the Hub, or generated)."""
        outside = [name for name, spec in self.datasets.items() if spec.source.from_ is None]
        return outside[-1]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for run.json and the card (endpoint params as a mapping, no secrets: only env var names)."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "cache": self.cache,
            "cache_path": self.cache_path,
            "endpoints": {role: cfg.as_dict() for role, cfg in self.endpoints.items()},
            "search": dataclasses.asdict(self.search),
            "datasets": {name: spec.as_dict() for name, spec in self.datasets.items()},
            "output": dataclasses.asdict(self.output),
        }


def bundled_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` that names an unknown key, the valid ones, and where it sits."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    names = [f.name.rstrip("_") if f.name.rstrip("_") in _ALIASES else f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise RecipeError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
    try:
        return cls(**{_ALIASES.get(key, key): value for key, value in data.items()})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where}: {err}") from None


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars: ``3`` is an int, ``null`` is None, ``[a, b]`` a list, else a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to the raw recipe mapping (before validation, so typos are caught there)."""
    if "=" not in assignment:
        raise RecipeError(f"--set expects KEY=VALUE (e.g. endpoints.generator.url=http://tgi:8080), got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping")
        node = child
    node[parts[-1]] = _parse_value(value)


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A bundled recipe by name (``demo``, ``synthquestions``) or a YAML file, with ``--set`` overrides."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise RecipeError(f"unknown recipe {name_or_path!r}; bundled recipes: {', '.join(bundled_recipes())}")
    elif not path.exists():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    return build_recipe(data)


def legacy_datasets(data: dict[str, Any]) -> dict[str, Any]:
    """The two-pipeline form (``seeds`` + ``demonstrations``, ``corpus`` + ``instructions``) as named datasets.

    Errors keep the old form's paths (``corpus.limitt``, ``instructions.rank``), the ones the user wrote.
    """
    data = dict(data)
    for required in ("seeds", "corpus"):
        if required not in data:
            raise RecipeError(f"the recipe lacks 'datasets' (or the older {required!r})")
    datasets = {}
    for name, source, column in (("demonstrations", "seeds", "prompt"), ("instructions", "corpus", "document")):
        spec = data.pop(source)
        if isinstance(spec, dict):
            spec = {**spec, "as": spec.get("as", column)}
        datasets[name] = {"source": spec, "stages": data.pop(name, None) or {}, "_where": (source, name)}
    data["datasets"] = datasets
    return data


def build_recipe(data: dict[str, Any]) -> Recipe:
    """Validate the raw mapping into a :class:`Recipe`; endpoint configs get the recipe's seed and cache."""
    data = dict(data)
    if "datasets" not in data:
        data = legacy_datasets(data)
    for old in ("seeds", "corpus", "demonstrations", "instructions"):
        if old in data:  # e.g. an older `--set corpus.limit=10` on a recipe written with `datasets:`
            names = ", ".join(data["datasets"]) if isinstance(data["datasets"], dict) else "?"
            raise RecipeError(
                f"{old!r} is a key of the older recipe form; this recipe lists datasets ({names}): set "
                f"datasets.<name>.source.… or datasets.<name>.stages.… instead"
            )
    for required in ("name", "endpoints"):
        if required not in data:
            raise RecipeError(f"the recipe lacks {required!r}")
    raw_endpoints = data.pop("endpoints")
    if not isinstance(raw_endpoints, dict) or not raw_endpoints:
        raise RecipeError("endpoints must map a role (generator, judge, guard) to an endpoint")
    raw_datasets = data.pop("datasets")
    if not isinstance(raw_datasets, dict) or not raw_datasets:
        raise RecipeError("datasets must map names to {source: …, stages: …}")
    recipe = _build(
        Recipe,
        {
            **data,
            "endpoints": {},
            "datasets": {},
            "search": _build(SearchSpec, data.get("search") or {}, "search"),
            "output": _build(OutputSpec, data.get("output") or {}, "output"),
        },
        "recipe",
    )
    for role, spec in raw_endpoints.items():
        if spec is None:
            continue
        spec = dict(spec)
        spec.setdefault("seed", recipe.seed)
        spec.setdefault("cache", recipe.cache)
        spec.setdefault("cache_path", recipe.cache_path)
        recipe.endpoints[role] = _build(EndpointConfig, spec, f"endpoints.{role}")
    for name, raw in raw_datasets.items():
        if raw is False:
            continue  # switched off: `--set datasets.preferences=false`
        recipe.datasets[name] = _dataset(recipe, name, raw)
    if not recipe.datasets:
        raise RecipeError("every dataset of the recipe is switched off")
    return recipe


def _dataset(recipe: Recipe, name: str, raw: Any) -> DatasetSpec:
    where = f"datasets.{name}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with source and stages, got {type(raw).__name__}")
    raw = dict(raw)
    source_where, stages_where = raw.pop("_where", (f"{where}.source", f"{where}.stages"))
    if "source" not in raw:
        raise RecipeError(f"{where} lacks a source (dataset: …, from: <dataset>, or generate: N)")
    source = _build(SourceSpec, raw["source"], source_where)
    earlier = list(recipe.datasets)
    if source.from_ is not None and source.from_ not in earlier:
        raise RecipeError(_unknown_dataset(f"{source_where}.from", source.from_, name, earlier))
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise RecipeError(f"{stages_where} must map stage names to their parameters")
    registry = steps()
    cleaned = {}
    for stage, params in stages.items():
        if stage not in registry:
            raise RecipeError(f"unknown stage {stages_where}.{stage}; stages: {', '.join(registry)}")
        if params is False:
            continue  # switched off: `--set datasets.instructions.stages.moderate=false`
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RecipeError(f"{stages_where}.{stage} must be a mapping of parameters or null")
        check_params(registry[stage], params, f"{stages_where}.{stage}", recipe, earlier, name)
        cleaned[stage] = params
    return _build(DatasetSpec, {**raw, "source": source, "stages": cleaned}, where)


def _unknown_dataset(where: str, value: Any, name: str, earlier: list[str]) -> str:
    listed = ", ".join(earlier) if earlier else "none: it is the first"
    return f"{where}: {value!r} is not a dataset listed before {name!r} (datasets run in order; before it: {listed})"


def check_params(
    step: Step, params: dict[str, Any], where: str, recipe: Recipe, earlier: list[str], dataset: str
) -> None:
    """Unknown parameters, endpoint roles the recipe lacks, and dataset references, each named in one line."""
    functions = [step.fn] + ([step.post] if step.post else [])
    allowed = [
        name
        for fn in functions
        for name in list(inspect.signature(fn).parameters)[1:]
        if step.needs.get(name) != "search" and name != "endpoint"
    ]
    if step.role:
        allowed.append("endpoint")
    for key in params:
        if key not in allowed:
            raise RecipeError(f"unknown parameter {where}.{key}; valid: {', '.join(allowed)}")
    if step.role:
        role = params.get("endpoint", step.role)
        if role not in recipe.endpoints and not (role == "judge" and "generator" in recipe.endpoints):
            raise RecipeError(f"{where} needs endpoints.{role}; the recipe has {', '.join(recipe.endpoints)}")
    for param, kind in step.needs.items():
        if kind == "dataset":
            value = params.get(param, param)
            if value not in earlier:
                raise RecipeError(_unknown_dataset(f"{where}.{param}", value, dataset, earlier))
