"""Recipes: YAML → dataclasses, with ``--set a.b=c`` overrides and one-line errors for typos.

A recipe names its endpoints by role (``generator``, ``judge``, ``guard``), its two inputs (``seeds``, ``corpus``),
the search backend, and two pipelines as ordered mappings of ``stage: {parameters}``:

- ``demonstrations``: seeds → ``extract_keywords`` → ``search_documents`` → ``ground``;
- ``instructions``: corpus → ``generate_instruction`` → ``score_instruction`` → ``filter`` → later stages
  (``moderate``, ``dedup``, ``decontaminate``, ``balance_topics``) — each one line.

A stage with no parameters (``score_instruction:`` or ``{}``) runs with its defaults; one set to ``false``
(``--set instructions.moderate=false``) is skipped. Which stages exist, which endpoint role
each uses and whether it streams is :data:`synthq_hf.recipes.runner.STEPS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from synthq_hf.endpoint import EndpointConfig

RECIPE_DIR = Path(__file__).parent


class RecipeError(ValueError):
    """A recipe that cannot run as written: unknown name or key, bad value. Always one line."""


@dataclass
class InputSpec:
    """A dataset: Hub name, local file(s)/folder, or ``bundled:NAME``; ``text_column`` holds the text."""

    dataset: str
    text_column: str = "text"
    config: str | None = None
    split: str = "train"
    streaming: bool = False
    limit: int | None = None


@dataclass
class SearchSpec:
    """``bm25`` with an ``index`` folder (``null``: build one from the corpus, fine for small corpora) or ``web``."""

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
    seeds: InputSpec
    corpus: InputSpec
    description: str = ""
    seed: int = 0
    cache: bool = True
    cache_path: str | None = None
    search: SearchSpec = field(default_factory=SearchSpec)
    demonstrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    instructions: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: OutputSpec = field(default_factory=OutputSpec)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for run.json and the card (endpoint params as a mapping, no secrets: only env var names)."""
        data = dataclasses.asdict(self)
        data["endpoints"] = {role: _endpoint_dict(cfg) for role, cfg in self.endpoints.items()}
        return data


def _endpoint_dict(cfg: EndpointConfig) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data["params"] = dict(cfg.params)
    return data


def bundled_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` that names an unknown key, the valid ones, and where it sits."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise RecipeError(f"unknown key {where}.{key}; valid keys: {', '.join(names)}")
    try:
        return cls(**data)
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
        raise RecipeError(f"--set expects KEY=VALUE (e.g. corpus.limit=10), got {assignment!r}")
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


def build_recipe(data: dict[str, Any]) -> Recipe:
    """Validate the raw mapping into a :class:`Recipe`; endpoint configs get the recipe's seed and cache."""
    from synthq_hf.recipes.runner import STEPS  # the registry lives with the code that runs it

    data = dict(data)
    for required in ("name", "endpoints", "seeds", "corpus"):
        if required not in data:
            raise RecipeError(f"the recipe lacks {required!r}")
    raw_endpoints = data.pop("endpoints")
    if not isinstance(raw_endpoints, dict) or not raw_endpoints:
        raise RecipeError("endpoints must map a role (generator, judge, guard) to an endpoint")
    recipe = _build(
        Recipe,
        {
            **data,
            "endpoints": {},
            "seeds": _build(InputSpec, data["seeds"], "seeds"),
            "corpus": _build(InputSpec, data["corpus"], "corpus"),
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
    for pipeline in ("demonstrations", "instructions"):
        stages = getattr(recipe, pipeline)
        if not isinstance(stages, dict):
            raise RecipeError(f"{pipeline} must map stage names to their parameters")
        cleaned = {}
        for stage, params in stages.items():
            if stage not in STEPS:
                raise RecipeError(f"unknown stage {pipeline}.{stage}; stages: {', '.join(STEPS)}")
            if pipeline == "demonstrations" and STEPS[stage].kind == "global":
                raise RecipeError(f"{stage} works on the whole instructions set; put it under instructions")
            if params is False:
                continue  # switched off: `--set instructions.moderate=false`
            params = {} if params is None else params
            if not isinstance(params, dict):
                raise RecipeError(f"{pipeline}.{stage} must be a mapping of parameters or null")
            STEPS[stage].check(params, f"{pipeline}.{stage}", recipe)
            cleaned[stage] = params
        setattr(recipe, pipeline, cleaned)
    return recipe
