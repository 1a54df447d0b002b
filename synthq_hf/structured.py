"""Structured output: pydantic model → JSON schema → the server's dialect → parse → validate.

Constrained decoding gives structure even from a 135M model, but only if each server gets the payload shape it
understands (TGI ``{"type":"json","value":…}``, vLLM/OpenAI ``json_schema``, llama-cpp-python
``{"type":"json_object","schema":…}``; it answers HTTP 500 to the other two). Validation decides success: an
invalid or cut-off reply (``finish_reason == "length"``) is retried with a new seed inside a bounded loop, then
becomes a :class:`StageFailure` that the stage records as ``<stage>_error``. Nothing is patched up.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from synthq_hf.endpoint import EndpointConfig, Reply, get_client

M = TypeVar("M", bound=BaseModel)
RAW_LIMIT = 300


class StageFailure(Exception):
    """A row a stage could not process; the stage turns it into ``<stage>_error`` and keeps the row."""

    def __init__(self, reason: str, raw: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw

    def describe(self, stage: str) -> str:
        text = f"{stage}: {self.reason}"
        if self.raw is not None:
            raw = self.raw if len(self.raw) <= RAW_LIMIT else self.raw[:RAW_LIMIT] + "…"
            text += f" | raw reply: {raw!r}"
        return text


def _inline_refs(schema: dict) -> dict:
    """Replace ``$ref`` with the definitions they point to: not every grammar engine follows references."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items() if k not in ("$defs", "title")}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


@cache
def json_schema(model: type[BaseModel]) -> dict:
    return _inline_refs(model.model_json_schema())


@cache
def _response_format(model: type[BaseModel], dialect: str) -> dict:
    """Built once per (model, dialect) and shared: never mutate it; :func:`response_format` copies."""
    schema = json_schema(model)
    if dialect == "tgi":
        return {"type": "json", "value": schema}
    if dialect == "llamacpp":
        return {"type": "json_object", "schema": _cap_lengths(schema, LLAMACPP_MAX_LENGTH)}
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": schema, "strict": True}}


#: llama.cpp's grammar parser refuses a string rule repeated more than ~1,000 times (MAX_REPETITION_THRESHOLD is
#: 2,000 over the rules being repeated); measured with the bundled model: maxLength 1000 compiles, 1001 fails,
#: and llama-cpp-python's server does not answer an error but dies (segfault) on the next sampled token.
LLAMACPP_MAX_LENGTH = 1000


def _cap_lengths(schema: Any, cap: int) -> Any:
    """``schema`` with every ``maxLength`` above ``cap`` lowered to ``cap`` (validation keeps the model's own)."""
    if isinstance(schema, dict):
        capped = {key: _cap_lengths(value, cap) for key, value in schema.items()}
        if isinstance(capped.get("maxLength"), int) and capped["maxLength"] > cap:
            capped["maxLength"] = cap
        return capped
    if isinstance(schema, list):
        return [_cap_lengths(item, cap) for item in schema]
    return schema


@cache
def _response_format_json(model: type[BaseModel], dialect: str) -> orjson.Fragment:
    """:func:`_response_format` serialised once, keys sorted: every request embeds these bytes as they are.

    The schema is most of a request's JSON and nearly all of its dict keys; sorting and serialising it for every
    request (the client sends canonical, sorted-key JSON) cost more than the rest of the payload together.
    """
    return orjson.Fragment(orjson.dumps(_response_format(model, dialect), option=orjson.OPT_SORT_KEYS))


def response_format(model: type[BaseModel], dialect: str) -> dict:
    """The ``response_format`` payload for ``dialect`` (tgi, vllm, openai, llamacpp): a fresh copy, yours to edit."""
    return orjson.loads(orjson.dumps(_response_format(model, dialect)))


def parse_reply(text: str, model: type[M]) -> M:
    """Validate ``text`` as ``model``; tolerate prose or code fences around one JSON object, nothing more."""
    text = text.strip()
    if not text:
        raise StageFailure("empty reply", text)
    try:
        return model.model_validate_json(text)
    except ValidationError as err:
        first_error = err
    # strict=False admits raw control characters (a newline) inside strings: llama-cpp-python's JSON grammar
    # allows them (its `char` rule is [^"\\], llama.cpp's excludes \x00-\x1F), so its constrained output is
    # otherwise-valid JSON that a strict parser refuses. The object must still validate against the model.
    decoder = json.JSONDecoder(strict=False)
    schema_error: ValidationError | None = None
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
            return model.model_validate(obj)
        except json.JSONDecodeError:
            pass
        except ValidationError as err:  # an inner or unrelated object: keep looking, report the first
            schema_error = schema_error or err
        start = text.find("{", start + 1)
    if schema_error is not None:
        raise StageFailure(f"reply does not match the schema: {_first(schema_error)}", text)
    raise StageFailure(f"reply is not valid JSON: {_first(first_error)}", text)


def _first(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e.get("loc", ())) or "<root>"
    return f"{loc}: {e.get('msg')}"


async def generate(
    endpoint: EndpointConfig,
    messages: list[dict],
    model: type[M],
    *,
    stage: str,
    row_id: str,
    max_tokens: int,
    attempts: int = 3,
    sample: int = 0,
    **params: Any,
) -> tuple[M, Reply]:
    """One structured chat call: up to ``attempts`` replies (each with its own seed) until one validates."""
    client = get_client(endpoint)
    info = await client.info()
    fmt = _response_format_json(model, info.dialect)
    failure = StageFailure("no attempt made")
    for attempt in range(max(1, attempts)):
        reply = await client.chat(
            messages,
            stage=stage,
            row_id=row_id,
            sample=sample,
            attempt=attempt,
            response_format=fmt,
            max_tokens=max_tokens,
            **params,
        )
        if reply.finish_reason == "length":
            failure = StageFailure(f"reply cut off at max_tokens={max_tokens}", reply.text)
            continue
        try:
            return parse_reply(reply.text, model), reply
        except StageFailure as err:
            failure = err
    failure.reason = f"{failure.reason} (after {max(1, attempts)} attempts)"
    raise failure
