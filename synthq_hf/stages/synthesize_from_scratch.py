"""Instructions from nothing: raw completion of a chat template's *user prefix* with nothing after it, so the
model writes the user's turn itself (ScaleQuest, Ding et al. 2024, arXiv 2410.18693 §3.1 "question generation";
Magpie, Xu et al. 2024, arXiv 2406.08464, the "pre-query template").

Input columns: ``id`` (seeds the request; a recipe's ``source: {generate: N}`` makes the rows).
Output columns: ``prompt`` (str: what the model wrote as the user, stripped), ``prefix_source`` (str: where the
prefix came from: ``server``, ``tokenizer_config``, ``preset:<name>`` or ``recipe``),
``synthesize_from_scratch_error`` (str, ``None`` on success).
Prompts: none of ours: the prefix is the model's own chat template up to where the user's text would start.

Where the prefix comes from, first that applies: ``prefix`` given in the recipe (with ``stop``); a ``template``
preset (``qwen``, ``chatml``, ``llama3``, ``deepseek``); a local ``tokenizer_config.json`` (its ``chat_template``);
else the server's own template (``template: auto``): vLLM renders it through ``/tokenize`` with ``messages`` and
``/detokenize``, TGI through ``/chat_tokenize``, a llama.cpp server through ``/props``. The template is rendered
once with a marker as the user's text: everything before the marker is the prefix, and the first token after it
(``<|im_end|>``, ``<|eot_id|>``, or DeepSeek's ``\\n\\nAssistant:``) is where the model's turn ends: the stop.
Each row is one seeded sample through ``/v1/completions`` or TGI ``/generate``, so a rerun asks the same
questions and the request cache answers them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from datasets import Features, Value

from synthq_hf.endpoint import EndpointConfig, EndpointError, RequestFailed, get_client
from synthq_hf.stages._common import failure, row_id
from synthq_hf.stages._step import Step

STAGE = "synthesize_from_scratch"
#: Stands in for the user's text while a template is rendered; no template writes it on its own.
MARKER = "\x00SYNTHQ-USER-TEXT\x00"


@dataclass(frozen=True)
class Prefix:
    text: str
    stop: tuple[str, ...]
    source: str


#: Templates by family, for servers that do not expose theirs (OpenAI-style APIs, llama-cpp-python).
PRESETS = {
    # Qwen2/2.5 (ScaleQuest's QGen models): the default system turn is part of the template.
    "qwen": Prefix(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", ("<|im_end|>",), "qwen"
    ),
    "chatml": Prefix("<|im_start|>user\n", ("<|im_end|>",), "chatml"),  # SmolLM2, the embedded default
    "llama3": Prefix("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n", ("<|eot_id|>",), "llama3"),
    "deepseek": Prefix("<｜begin▁of▁sentence｜>User: ", ("\n\nAssistant:", "<｜end▁of▁sentence｜>"), "deepseek"),
}
FEATURES = Features({"prompt": Value("string"), "prefix_source": Value("string"), f"{STAGE}_error": Value("string")})
EMPTY: dict[str, Any] = {"prompt": None, "prefix_source": None}
_SPECIAL = re.compile(r"\s*(<[|｜][^<>]*?[|｜]>)")
_RESOLVED: dict[tuple, Prefix] = {}


class TemplateError(ValueError):
    """A chat template that cannot give a user prefix (no user turn, unreadable): one line for the run."""


def render_user_prefix(
    chat_template: str, *, bos_token: str = "", eos_token: str = "", system: str | None = None, source: str = ""
) -> Prefix:
    """The prefix and stops of a Hugging Face chat template (Jinja), rendered the way transformers renders it."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"{STAGE}: the chat template refused a lone user turn: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": MARKER}]
    try:
        text = env.from_string(chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token
        )
    except JinjaError as err:
        raise TemplateError(f"{STAGE}: the chat template does not render: {err}") from None
    return split_at_marker(text, eos_token, source)


def split_at_marker(rendered: str, eos_token: str = "", source: str = "") -> Prefix:
    """Prefix = the rendered text before the user's text; stop = the token that closes the user's turn."""
    if MARKER not in rendered:
        raise TemplateError(
            f"{STAGE}: the chat template has no user turn (it rendered {rendered[:80]!r} without the user's text); "
            "set prefix: and stop: in the recipe line"
        )
    prefix, suffix = rendered.split(MARKER, 1)
    special = _SPECIAL.match(suffix)
    stops = [special.group(1)] if special else ([suffix.rstrip()] if suffix.strip() else [])
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    if not stops:
        raise TemplateError(f"{STAGE}: the chat template ends the user's turn with nothing to stop on")
    return Prefix(prefix, tuple(stops), source)


def _token_text(value: Any) -> str:
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def _from_tokenizer_config(path: str, system: str | None) -> Prefix:
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer_config.json"
    if not file.is_file():
        raise TemplateError(f"{STAGE}: tokenizer_config {file} does not exist")
    config = json.loads(file.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
        raise TemplateError(f"{STAGE}: {file} has no chat_template")
    return render_user_prefix(
        template,
        bos_token=_token_text(config.get("bos_token")),
        eos_token=_token_text(config.get("eos_token")),
        system=system,
        source="tokenizer_config",
    )


async def _from_server(endpoint: EndpointConfig, system: str | None) -> Prefix:
    """The server's own template, rendered by the server: what it would send the model for a lone user turn."""
    client = get_client(endpoint)
    info = await client.info()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": MARKER}]
    how = "set template: (qwen, chatml, llama3, deepseek), tokenizer_config: <file>, or prefix: and stop:"
    try:
        if info.dialect == "vllm":
            tokens, _ = await client.post(
                "/tokenize",
                {"model": info.model, "messages": messages, "add_generation_prompt": True},
                stage="chat_template",
            )
            text, _ = await client.post(
                "/detokenize", {"model": info.model, "tokens": tokens["tokens"]}, stage="chat_template"
            )
            return split_at_marker(text["prompt"], source="server")
        if info.dialect == "tgi":
            data, _ = await client.post(
                "/chat_tokenize", {"model": info.model, "messages": messages}, stage="chat_template"
            )
            return split_at_marker(data["templated_text"], source="server")
        if info.dialect == "llamacpp" and info.tokenize_route == "/tokenize":  # llama.cpp's own server
            props = await client.get_json("/props")
            template = props.get("chat_template")
            if template:
                return render_user_prefix(
                    template, bos_token=props.get("bos_token") or "", system=system, source="server"
                )
    except (KeyError, TypeError) as err:
        raise TemplateError(
            f"{STAGE}: {info.base_url} answered its chat template in an unknown shape ({err})"
        ) from None
    except EndpointError:
        pass  # a route this server lacks: say so below
    raise TemplateError(f"{STAGE}: {info.base_url} ({info.dialect}) does not expose its chat template; {how}")


async def resolve_prefix(
    endpoint: EndpointConfig,
    template: str = "auto",
    prefix: str | None = None,
    stop: list[str] | None = None,
    tokenizer_config: str | None = None,
    system: str | None = None,
) -> Prefix:
    """The user prefix for this endpoint, worked out once per process (the server is asked once)."""
    check(template, prefix, stop)
    if prefix is not None:
        return Prefix(prefix, tuple(stop or ()), "recipe")
    if template != "auto":
        found = PRESETS[template]
        return Prefix(found.text, found.stop, f"preset:{template}")
    key = (endpoint, system, tokenizer_config)  # once, not per row: a file read and a render, or a server round
    if key not in _RESOLVED:
        if tokenizer_config is not None:
            _RESOLVED[key] = _from_tokenizer_config(tokenizer_config, system)
        else:
            _RESOLVED[key] = await _from_server(endpoint, system)
    return _RESOLVED[key]


async def synthesize_from_scratch(
    row: dict[str, Any],
    endpoint: EndpointConfig,
    template: str = "auto",
    prefix: str | None = None,
    stop: list[str] | None = None,
    tokenizer_config: str | None = None,
    system: str | None = None,
    single_line: bool = False,
    temperature: float = 1.0,
    top_p: float = 0.99,
    max_tokens: int = 1024,
) -> dict[str, Any]:
    """``Dataset.map`` function over rows that hold only an ``id``: one seeded raw completion each.

    ``single_line`` also stops at the first newline (Magpie's early stopping: one-line requests). A reply cut at
    ``max_tokens`` is a row error: half a question is not a question.
    """
    found = await resolve_prefix(endpoint, template, prefix, stop, tokenizer_config, system)
    stops = [*found.stop, "\n"] if single_line else list(found.stop)
    client = get_client(endpoint)
    rid = row_id(row, "")
    params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stops}
    try:
        reply = await client.complete(found.text, stage=STAGE, row_id=rid, **params)
    except RequestFailed as err:
        return failure(STAGE, EMPTY, f"{STAGE}: {err}")
    except EndpointError as err:
        if "does not serve this route" in str(err):
            info = await client.info()
            raise EndpointError(
                f"{info.base_url} has no raw-completion route: {STAGE} needs /v1/completions or TGI /generate "
                "(chat-only APIs cannot continue a user prefix)"
            ) from None
        raise
    text = reply.text
    for token in found.stop:  # servers that echo the stop string
        text = text.split(token, 1)[0]
    text = text.strip()
    if reply.finish_reason == "length":
        return failure(STAGE, EMPTY, f"{STAGE}: cut at max_tokens={max_tokens} before the user's turn ended")
    if not text:
        return failure(STAGE, EMPTY, f"{STAGE}: the model wrote nothing after the user prefix")
    return {"prompt": text, "prefix_source": found.source, f"{STAGE}_error": None}


def check(template: str = "auto", prefix: str | None = None, stop: list[str] | None = None, **_: Any) -> None:
    """Before the run: a known preset, and a recipe prefix that says where the user's turn ends."""
    if prefix is not None and not stop:
        raise TemplateError(f"{STAGE}: prefix: needs stop: (the text that ends the user's turn)")
    if prefix is None and template != "auto" and template not in PRESETS:
        raise TemplateError(f"{STAGE}: unknown template {template!r}; use auto or one of {', '.join(PRESETS)}")


STEPS = [Step(name=STAGE, kind="row", fn=synthesize_from_scratch, features=FEATURES, role="generator", check=check)]
