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

PROMPT_DIR = Path(__file__).parent
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(PROMPT_DIR),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=False,
    autoescape=False,
)


@cache
def _template(name: str) -> jinja2.Template:
    return _ENV.get_template(name)


def render(stage: str, **variables: object) -> list[dict[str, str]]:
    """Chat messages for ``stage``: a system message (if the stage has one) and the user message."""
    messages = []
    if (PROMPT_DIR / f"{stage}.system.j2").exists():
        messages.append({"role": "system", "content": _template(f"{stage}.system.j2").render(**variables).strip()})
    messages.append({"role": "user", "content": _template(f"{stage}.user.j2").render(**variables).strip()})
    return messages


@cache
def prompt_hash(stage: str) -> str:
    """Short sha256 over the stage's template files, for provenance."""
    digest = hashlib.sha256()
    for path in sorted(PROMPT_DIR.glob(f"{stage}.*.j2")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
