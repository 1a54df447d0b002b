"""Prompt templates, one pair per LLM stage: ``<stage>.system.j2`` and ``<stage>.user.j2``.

Templates are data, not code: edit the wording without touching a stage. ``StrictUndefined`` turns a missing
variable into an error at render time instead of a silently empty prompt. :func:`prompt_hash` goes into the
run report and the dataset card so a dataset says exactly which wording produced it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import jinja2
import jinja2.meta

PROMPT_DIR = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROMPT_DIR),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=False,
    autoescape=False,
)


def _load(name: str) -> jinja2.Template:
    template = _ENV.get_template(name)
    # Template.globals is a ChainMap (template → environment globals) that jinja copies into a dict on every
    # render: about half the cost of rendering a prompt. Nothing changes globals after load.
    template.globals = dict(template.globals)
    return template


@cache
def _templates(stage: str) -> tuple[jinja2.Template | None, jinja2.Template]:
    """The stage's (system template or ``None``, user template), loaded once per process."""
    system = f"{stage}.system.j2"
    return (_load(system) if (PROMPT_DIR / system).exists() else None), _load(f"{stage}.user.j2")


@cache
def _constant(stage: str) -> str | None:
    """The stage's system message when its template takes no variables: rendered once, not once per row."""
    system, _ = _templates(stage)
    if system is None:
        return None
    source = _ENV.loader.get_source(_ENV, f"{stage}.system.j2")[0]
    if jinja2.meta.find_undeclared_variables(_ENV.parse(source)):
        return None
    return system.render().strip()


def render(stage: str, **variables: object) -> list[dict[str, str]]:
    """Chat messages for ``stage``: a system message (if the stage has one) and the user message."""
    system, user = _templates(stage)
    messages = []
    if system is not None:
        content = _constant(stage)
        if content is None:
            content = system.render(**variables).strip()
        messages.append({"role": "system", "content": content})
    messages.append({"role": "user", "content": user.render(**variables).strip()})
    return messages


@cache
def _part(name: str) -> jinja2.Template:
    return _load(f"{name}.j2")


def render_part(name: str, **variables: object) -> str:
    """A template fragment such as ``generate_instruction.demo``: stages that budget tokens render pieces alone."""
    return _part(name).render(**variables).strip()


@cache
def prompt_hash(stage: str) -> str:
    """Short sha256 over the stage's template files, for provenance."""
    digest = hashlib.sha256()
    for path in sorted(PROMPT_DIR.glob(f"{stage}.*.j2")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
