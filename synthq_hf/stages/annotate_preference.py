"""Preference pairs from a reward model: each row's N responses scored in process, and the best one paired with
the worst (or with the one nearest mean − 2·std) as a DPO pair (SynthQuestions release: 100K pairs annotated with
ArmoRM-Llama3-8B; issue 10).

Input columns: ``prompt`` (str), ``responses`` (list of str, from ``generate_responses``); optional
``generate_responses_error`` and ``rejected_by``: a row an earlier stage failed or rejected (or whose
``responses`` are ``None``) gets this stage's columns empty and *no* error of its own, since its reason is the
earlier one. (``responses_identical`` is not read: the texts themselves are compared here.)
Output columns: ``rewards`` (list of float, one preference score per response), ``reward_objectives`` (per
response the 19 ArmoRM objectives in :data:`OBJECTIVES` order; ``None`` for a plain classifier, which has none),
``reward_truncated`` (list of bool: the response was cut to fit the model's context), ``chosen`` and ``rejected``
(TRL's DPO format: ``[user, assistant]`` message lists), ``chosen_index``/``rejected_index`` (which response),
``reward_margin`` (chosen − rejected reward), ``annotate_preference_error`` (str, ``None`` on success: e.g. all
responses the same text, so no pair).
Prompts: none of ours: the reward model reads ``[user, assistant]`` through its tokenizer's chat template (the
Llama-3 template when it has none).

Why in process: ArmoRM is a Llama with a custom gating head (``trust_remote_code``) that no server (vLLM, TGI,
TEI) serves, and scoring is one forward pass, with no decoding to share. Why batched: the forward passes of one
map batch are packed by length under a token budget (sized from free GPU memory), which is where the GPU earns
its keep; a CUDA out-of-memory halves the pass instead of ending the run. Scores are cached per (model identity,
formatted chat, max length) in ``rewards.sqlite`` next to the request cache, so a rerun scores nothing twice and
gives the same pairs exactly. torch and transformers are imported only when a model loads (the ``preferences``
extra): the recipe runner imports every stage module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from datasets import Features, List, Value

from synthq_hf.cache import default_cache_path, get_cache, request_key
from synthq_hf.stages._common import ColumnError, failure, read_text
from synthq_hf.stages._step import Step

STAGE = "annotate_preference"
logger = logging.getLogger(__name__)

#: ArmoRM's 19 reward objectives, in the order of its ``rewards`` output.
OBJECTIVES = (
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
)
#: Llama-3's chat template (ArmoRM's), for a tokenizer that carries none.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
#: ``model=`` name of the tiny random Llama reward model built locally (:mod:`synthq_hf.tiny_reward`).
BUNDLED_TINY = "bundled:tiny-reward"
#: ``best``: no pair, only the top response (SFT data, e.g. ScaleQuest's reward filtering).
PAIRINGS = ("best_worst", "mean_minus_2std", "best")
INSTALL = 'pip install -e ".[preferences]"'
#: Padded tokens per forward pass on CPU: a pass this size keeps the cores busy without swapping a laptop.
CPU_BATCH_TOKENS = 16_384
#: GPU bytes budgeted per padded token, per unit of hidden size: an 8B Llama (hidden 4096) needs ~130 KB a token
#: in a no-grad pass (MLP activations, the 4-D attention mask); 64 doubles that for margin.
GPU_BYTES_PER_TOKEN_PER_HIDDEN = 64
#: Context length when neither the tokenizer nor the config gives a sane one.
DEFAULT_CONTEXT = 4096
#: Stand-ins for the two contents, to split a chat template into its fixed parts (private-use characters).
_PROMPT_MARK, _RESPONSE_MARK = "\ue000prompt\ue000", "\ue000response\ue000"

_MESSAGES = List({"role": Value("string"), "content": Value("string")})
FEATURES = Features(
    {
        "rewards": List(Value("float64")),
        "reward_objectives": List(List(Value("float64"))),
        "reward_truncated": List(Value("bool")),
        "chosen": _MESSAGES,
        "rejected": _MESSAGES,
        "chosen_index": Value("int64"),
        "rejected_index": Value("int64"),
        "reward_margin": Value("float64"),
        "best_response": Value("string"),
        "best_reward": Value("float64"),
        f"{STAGE}_error": Value("string"),
    }
)
EMPTY: dict[str, Any] = dict.fromkeys(name for name in FEATURES if name != f"{STAGE}_error")
#: A row an earlier stage failed or rejected: nothing of ours, and no reason of ours either.
SKIPPED: dict[str, Any] = {**EMPTY, f"{STAGE}_error": None}


class RewardModelError(ValueError):
    """The reward model cannot be used as given (missing folder, not a classifier, needs remote code): one line."""


@dataclass
class RewardModel:
    """A loaded reward model and what scoring needs to know about it; one per (model, options) per process."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    identity: str  # the cache's name for these weights: folder + fingerprint, or Hub name + revision; + dtype
    device: str
    pad_id: int
    context_length: int
    chat_template: str | None  # None: the tokenizer's own
    template_parts: tuple[str, str, str]  # the formatted chat around the prompt and the response
    hidden_size: int
    oom_tokens: int | None = None  # padded tokens of the smallest pass that ran out of memory, halved


_MODELS: dict[tuple[str, bool, str | None, str | None], RewardModel] = {}


def default_rewards_path() -> Path:
    """``rewards.sqlite`` beside the request cache: scores are replies of a kind too, and go with them."""
    return default_cache_path().parent / "rewards.sqlite"


def load_reward_model(
    model: str, trust_remote_code: bool = False, revision: str | None = None, device: str | None = None
) -> RewardModel:
    """The reward model, loaded once per process (an 8B model takes a minute to load and 16 GB to hold)."""
    key = (model, trust_remote_code, revision, device)
    if key not in _MODELS:
        _MODELS[key] = _load(model, trust_remote_code, revision, device)
    return _MODELS[key]


def _load(model: str, trust_remote_code: bool, revision: str | None, device: str | None) -> RewardModel:
    try:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"{STAGE} runs the reward model in process: `{INSTALL}` (torch, transformers)") from err
    folder = _local_folder(model)
    source = str(folder) if folder else model
    if folder:
        _check_folder(folder, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    options = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        pad_id = _pad_id(tokenizer, model)  # before the weights: an 8B model takes a minute to load
        net = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, **options)
    except RewardModelError:
        raise
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise RewardModelError(
                f"{STAGE}: model {model!r} runs its own code: set `trust_remote_code: true` in the recipe line"
            ) from err
        raise RewardModelError(f"{STAGE}: cannot load reward model {model!r}: {_first_line(err)}") from err
    net.to(device).eval()
    # LlamaForSequenceClassification reads the last token as the rightmost non-pad one, ArmoRM as the one before
    # the first pad: both need the pad id we pad with, and one that no real token shares.
    net.config.get_text_config().pad_token_id = pad_id
    net.config.use_cache = False  # a single pass: a KV cache would only hold memory
    chat_template = None if tokenizer.chat_template else LLAMA3_CHAT_TEMPLATE
    identity = f"{folder}:{_fingerprint(folder)}" if folder else f"{model}@{revision or 'main'}"
    return RewardModel(
        model=net,
        tokenizer=tokenizer,
        identity=f"{identity}:{str(dtype).removeprefix('torch.')}",  # bf16 and fp32 scores differ
        device=device,
        pad_id=pad_id,
        context_length=_context_length(tokenizer, net.config),
        chat_template=chat_template,
        template_parts=_template_parts(tokenizer, chat_template),
        hidden_size=int(getattr(net.config.get_text_config(), "hidden_size", 4096)),
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _local_folder(model: str) -> Path | None:
    """The folder ``model`` names (``bundled:tiny-reward`` built on first use), or ``None`` for a Hub name."""
    if model == BUNDLED_TINY:
        from synthq_hf.tiny_reward import tiny_reward_path

        return tiny_reward_path()
    path = Path(model).expanduser()
    if path.exists():
        return path.resolve()
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise RewardModelError(f"{STAGE}: reward model folder {path} does not exist")
    return None  # "org/name": the Hub


def _check_folder(folder: Path, trust_remote_code: bool) -> None:
    """Refuse, in one line, a folder that is no sequence classifier, before transformers loads it.

    Checked here because transformers would not refuse: with ``trust_remote_code`` off, a folder whose config is
    a plain ``llama`` with ArmoRM's code in ``auto_map`` loads as a stock ``LlamaForSequenceClassification`` with
    a random head, and a causal LM gets a random classification head too: both give rewards that mean nothing.
    """
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise RewardModelError(f"{STAGE}: reward model folder {folder} has no config.json: not a transformers model")
    config = json.loads(config_file.read_text())
    code = (config.get("auto_map") or {}).get("AutoModelForSequenceClassification")
    architectures = config.get("architectures") or []
    if code is None and not any(name.endswith("ForSequenceClassification") for name in architectures):
        kind = " (a causal language model)" if any(n.endswith("ForCausalLM") for n in architectures) else ""
        what = ", ".join(architectures) + kind if architectures else "a config with no architectures"
        raise RewardModelError(f"{STAGE}: reward model folder {folder} holds {what}, not a sequence classifier")
    if code is not None and not trust_remote_code:
        raise RewardModelError(
            f"{STAGE}: reward model folder {folder} runs its own code ({code}): "
            "set `trust_remote_code: true` in the recipe line"
        )


def _fingerprint(folder: Path) -> str:
    """Hash of config.json and of every file's name, size and mtime: new weights in the same folder re-score."""
    digest = hashlib.blake2b((folder / "config.json").read_bytes(), digest_size=12)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _pad_id(tokenizer: Any, model: str) -> int:
    """A pad id that is neither eos nor ``<|eot_id|>``.

    ArmoRM finds each sequence's last token as the one before the first pad, so padding with ``<|eot_id|>`` (the
    pad many Llama-3 tokenizers set) would score every response at the end of the *prompt*. An existing unused
    token is taken rather than a new one, since a new token would need the embedding matrix resized.
    """
    vocab = tokenizer.get_vocab()
    ends = {tokenizer.eos_token_id, vocab.get("<|eot_id|>")} - {None}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ends:
        return int(tokenizer.pad_token_id)
    reserved = sorted(
        (name for name in vocab if name.startswith("<|reserved_special_token_")), key=lambda n: (len(n), n)
    )
    for name in ["<|finetune_right_pad_id|>", *reserved]:
        if name in vocab and vocab[name] not in ends:
            return int(vocab[name])
    raise RewardModelError(
        f"{STAGE}: reward model {model!r}: its tokenizer has no pad token distinct from eos and no unused special "
        "token to pad with; set a distinct pad_token in its tokenizer_config.json"
    )


def _context_length(tokenizer: Any, config: Any) -> int:
    """The model's context: the smaller of the tokenizer's and the config's limits that are real numbers
    (an unset ``model_max_length`` is a huge sentinel)."""
    limits = (tokenizer.model_max_length, getattr(config.get_text_config(), "max_position_embeddings", None))
    sane = [n for n in limits if isinstance(n, int) and 0 < n <= 10_000_000]
    return min(sane) if sane else DEFAULT_CONTEXT


def _render(tokenizer: Any, chat_template: str | None, prompt: str, response: str) -> str:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)


def _format(rm: RewardModel, prompt: str, response: str) -> str:
    return _render(rm.tokenizer, rm.chat_template, prompt, response)


def _template_parts(tokenizer: Any, chat_template: str | None) -> tuple[str, str, str]:
    """The formatted chat before the prompt, between prompt and response, and after the response."""
    text = _render(tokenizer, chat_template, _PROMPT_MARK, _RESPONSE_MARK)
    before, rest = text.split(_PROMPT_MARK, 1)
    between, after = rest.split(_RESPONSE_MARK, 1)
    return before, between, after


def _truncate(rm: RewardModel, text: str, limit: int) -> list[int] | None:
    """Token ids of ``text`` cut to ``limit``: the response's tail goes first; the template (with ArmoRM's
    assistant header) stays whole; the prompt is cut only so that the response keeps at least half of what is
    left. ``None`` when it cannot be done (the template alone is too long, or it rewrote the contents)."""
    before, between, after = rm.template_parts
    if not (text.startswith(before) and text.endswith(after)) or len(text) < len(before) + len(after):
        return None
    body = text[len(before) : len(text) - len(after)]
    if between not in body:
        return None
    prompt, response = body.rsplit(between, 1)
    parts = [before, prompt, between, response, after]
    pieces = rm.tokenizer(parts, add_special_tokens=False, verbose=False)["input_ids"]
    budget = limit - len(pieces[0]) - len(pieces[2]) - len(pieces[4])
    if budget < 2:
        return None
    keep_response = min(len(pieces[3]), max(budget - len(pieces[1]), budget // 2))
    keep_prompt = min(len(pieces[1]), budget - keep_response)
    return pieces[0] + pieces[1][:keep_prompt] + pieces[2] + pieces[3][:keep_response] + pieces[4]


def _passes(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Sequence indices grouped into forward passes, longest first, each under ``budget`` padded tokens (a pass
    holds one sequence at least). Sorting by length keeps padding, hence wasted compute, small."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    passes: list[list[int]] = []
    for i in order:
        if passes and (len(passes[-1]) + 1) * lengths[passes[-1][0]] <= budget:
            passes[-1].append(i)
        else:
            passes.append([i])
    return passes


def _default_budget(rm: RewardModel) -> int:
    if not rm.device.startswith("cuda"):
        return CPU_BATCH_TOKENS
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(rm.device))
    return max(rm.context_length, int(free * 0.5) // (rm.hidden_size * GPU_BYTES_PER_TOKEN_PER_HIDDEN))


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err)
    )


def _forward(rm: RewardModel, seqs: list[list[int]]) -> list[dict[str, Any]]:
    """One right-padded forward pass: per sequence its score and (ArmoRM) objectives."""
    import torch

    ids = torch.full((len(seqs), max(map(len, seqs))), rm.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.inference_mode():
        out = rm.model(input_ids=ids.to(rm.device), attention_mask=mask.to(rm.device))
    score = getattr(out, "score", None)  # ArmoRM: the gated preference score; a plain classifier: its logit
    if score is None:
        score = out.logits
        if score.shape[-1] != 1:
            raise RewardModelError(f"{STAGE}: the model has {score.shape[-1]} labels: a reward model has one score")
    objectives = getattr(out, "rewards", None)
    scores = score[:, 0].float().cpu().tolist()
    rows = objectives.float().cpu().tolist() if objectives is not None else [None] * len(seqs)
    return [{"score": s, "objectives": o} for s, o in zip(scores, rows, strict=True)]


def _score(rm: RewardModel, seqs: list[list[int]], budget: int) -> list[dict[str, Any] | None]:
    """Scores of ``seqs`` in passes under ``budget`` tokens; a pass out of GPU memory is halved and tried again,
    and later passes stay under half its size. ``None``: the sequence ran out of memory alone."""
    results: list[dict[str, Any] | None] = [None] * len(seqs)
    todo = deque(_passes([len(seq) for seq in seqs], budget))
    while todo:
        group = todo.popleft()
        tokens = len(group) * len(seqs[group[0]])
        if len(group) > 1 and rm.oom_tokens is not None and tokens > rm.oom_tokens:
            todo.extendleft([group[len(group) // 2 :], group[: len(group) // 2]])
            continue
        try:
            outputs = _forward(rm, [seqs[i] for i in group])
        except (RuntimeError, MemoryError) as err:
            if not _is_oom(err):
                raise
            _free_cuda_cache()
            if rm.oom_tokens is None:
                logger.warning(
                    "%s: out of GPU memory on %d sequences (%d tokens): halving passes", STAGE, len(group), tokens
                )
            rm.oom_tokens = min(tokens // 2, rm.oom_tokens or tokens)
            if len(group) > 1:
                todo.extendleft([group[len(group) // 2 :], group[: len(group) // 2]])
            continue
        for i, output in zip(group, outputs, strict=True):
            results[i] = output
    return results


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pick_pair(
    rewards: Sequence[float], pairing: str = "best_worst", eligible: Sequence[int] | None = None
) -> tuple[int, int | None] | None:
    """``(chosen, rejected)`` response indices, or ``None`` when every reward is the same (no pair).

    Chosen is the highest reward. Rejected, among the lower ones: the lowest (``best_worst``), or the one
    nearest mean − 2·std of the row's rewards (population std; ``mean_minus_2std``, reported to make better
    pairs than the worst for large N, since the very worst is often an outlier). Ties go to the lowest index, so
    the pair is deterministic; identical texts score identically, so rejected never repeats chosen's text.
    ``eligible``: the responses that may be chosen (e.g. those with a final answer); ``best`` gives
    ``(chosen, None)``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"{STAGE}: unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
    candidates = range(len(rewards)) if eligible is None else eligible
    if not candidates:
        return None
    chosen = max(candidates, key=lambda i: (rewards[i], -i))
    if pairing == "best":
        return chosen, None
    lower = [i for i, reward in enumerate(rewards) if reward < rewards[chosen]]
    if not lower:
        return None
    if pairing == "best_worst":
        target = min(rewards)
    else:
        target = statistics.fmean(rewards) - 2 * statistics.pstdev(rewards)
    rejected = min(lower, key=lambda i: (abs(rewards[i] - target), i))
    return chosen, rejected


def _value(batch: dict[str, list], column: str, i: int) -> Any:
    values = batch.get(column)
    return None if values is None else values[i]


def _row_input(batch: dict[str, list], i: int, pairing: str) -> tuple[str, list[str]] | dict[str, Any]:
    """The row's prompt and responses, or its finished output (skipped, or its own error)."""
    responses = batch["responses"][i]
    if _value(batch, "rejected_by", i) is not None or _value(batch, "generate_responses_error", i) is not None:
        return SKIPPED
    if responses is None:
        return SKIPPED
    if not isinstance(responses, list) or not all(isinstance(r, str) or r is None for r in responses):
        raise ColumnError(f"{STAGE}: column 'responses' must hold lists of strings, got {type(responses).__name__}")
    prompt = read_text({"prompt": batch["prompt"][i]}, "prompt", STAGE)
    if prompt is None:
        return failure(STAGE, EMPTY, f"{STAGE}: empty or missing prompt")
    if None in responses:
        return failure(STAGE, EMPTY, f"{STAGE}: response {responses.index(None) + 1} of {len(responses)} is missing")
    if pairing == "best":
        return (prompt, responses) if responses else failure(STAGE, EMPTY, f"{STAGE}: no responses")
    if len(responses) < 2:
        return failure(STAGE, EMPTY, f"{STAGE}: {len(responses)} response(s): a pair needs two")
    if len(set(responses)) < 2:
        return failure(STAGE, EMPTY, f"{STAGE}: all {len(responses)} responses are the same text: no pair")
    return prompt, responses


def _row_output(
    prompt: str,
    responses: list[str],
    results: list[dict[str, Any] | None],
    problems: list[str | None],
    pairing: str,
    require: re.Pattern[str] | None = None,
    min_reward: float | None = None,
) -> dict[str, Any]:
    n = len(responses)
    for j, problem in enumerate(problems):
        if problem is not None:
            return failure(STAGE, EMPTY, f"{STAGE}: response {j + 1} of {n}: {problem}")
    done = [result for result in results if result is not None]
    rewards = [result["score"] for result in done]
    eligible = None if require is None else [j for j, text in enumerate(responses) if require.search(text)]
    if eligible == []:
        return failure(STAGE, EMPTY, f"{STAGE}: none of the {n} responses matches {require.pattern!r}")
    pair = pick_pair(rewards, pairing, eligible)
    if pair is None:
        return failure(STAGE, EMPTY, f"{STAGE}: all {n} responses have the same reward: no pair")
    chosen, rejected = pair
    objectives = [result["objectives"] for result in done]
    if min_reward is not None and rewards[chosen] < min_reward:
        return failure(STAGE, EMPTY, f"{STAGE}: best reward {rewards[chosen]:.3f} < min_reward {min_reward}")
    best = {"best_response": responses[chosen], "best_reward": rewards[chosen]}
    if rejected is None:
        return {
            **EMPTY,
            "rewards": rewards,
            "reward_objectives": None if None in objectives else objectives,
            "reward_truncated": [result["truncated"] for result in done],
            "chosen_index": chosen,
            **best,
            f"{STAGE}_error": None,
        }
    return {
        **best,
        "rewards": rewards,
        "reward_objectives": None if None in objectives else objectives,
        "reward_truncated": [result["truncated"] for result in done],
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": responses[chosen]}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": responses[rejected]}],
        "chosen_index": chosen,
        "rejected_index": rejected,
        "reward_margin": rewards[chosen] - rewards[rejected],
        f"{STAGE}_error": None,
    }


def annotate_preference(
    batch: dict[str, list],
    model: str,
    pairing: str = "best_worst",
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_length: int | None = None,
    max_batch_tokens: int | None = None,
    device: str | None = None,
    cache: bool = True,
    cache_path: str | None = None,
    require: str | None = None,
    min_reward: float | None = None,
) -> dict[str, list]:
    """``Dataset.map(batched=True)`` function: ``ds.map(annotate_preference, batched=True, batch_size=64,
    fn_kwargs={"model": "RLHFlow/ArmoRM-Llama3-8B-v0.1", "trust_remote_code": True})``.

    ``model``: a local folder, a Hub name, or ``bundled:tiny-reward``. ``max_length``: tokens per formatted chat
    (default: the model's context); longer responses are cut and flagged. ``max_batch_tokens``: padded tokens per
    forward pass (default: from free GPU memory; :data:`CPU_BATCH_TOKENS` on CPU). ``require``: a regular
    expression the chosen (or best) response must match, e.g. one finding a ``boxed{…}`` final answer; rows with no such
    response are rejected with the reason. ``min_reward``: rows whose best reward is lower are rejected too
    (Magpie's reward filter; the scale is the reward model's own). ``pairing="best"`` keeps only
    ``best_response``/``best_reward``.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"{STAGE}: unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
    for column in ("prompt", "responses"):
        if column not in batch:
            raise ColumnError(f"{STAGE} needs an input column {column!r}; the dataset has columns {sorted(batch)}")
    rows = [_row_input(batch, i, pairing) for i in range(len(batch["prompt"]))]
    pattern = re.compile(require) if require is not None else None
    todo = [row for row in rows if isinstance(row, tuple)]
    if not todo:
        return _columns([row for row in rows if isinstance(row, dict)])
    rm = load_reward_model(model, trust_remote_code, revision, device)
    limit = max_length or rm.context_length
    store = get_cache(cache_path or default_rewards_path()) if cache else None

    texts: dict[bytes, str] = {}  # cache key → formatted chat, each distinct chat once
    keys_of_rows = []
    for prompt, responses in todo:
        keys = []
        for response in responses:
            text = _format(rm, prompt, response)
            key = request_key(STAGE, {"model": rm.identity, "text": text, "max_length": limit})
            texts[key] = text
            keys.append(key)
        keys_of_rows.append(keys)
    known: dict[bytes, dict[str, Any]] = {}
    if store is not None:
        for key in texts:
            value = store.get(key)
            if value is not None:
                known[key] = orjson.loads(value)
    missing = [key for key in texts if key not in known]
    problems = _score_missing(rm, missing, [texts[key] for key in missing], limit, max_batch_tokens, known, store)

    outputs = iter(
        _row_output(
            prompt,
            responses,
            [known.get(key) for key in keys],
            [problems.get(key) for key in keys],
            pairing,
            pattern,
            min_reward,
        )
        for (prompt, responses), keys in zip(todo, keys_of_rows, strict=True)
    )
    return _columns([row if isinstance(row, dict) else next(outputs) for row in rows])


def _score_missing(
    rm: RewardModel,
    keys: list[bytes],
    texts: list[str],
    limit: int,
    max_batch_tokens: int | None,
    known: dict[bytes, dict[str, Any]],
    store: Any,
) -> dict[bytes, str]:
    """Score ``texts`` into ``known`` (and the cache); returns why, for those that could not be scored."""
    problems: dict[bytes, str] = {}
    if not keys:
        return problems
    encoded = rm.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    seqs, flags, seq_keys = [], [], []
    for key, text, ids in zip(keys, texts, encoded, strict=True):
        cut = _truncate(rm, text, limit) if len(ids) > limit else ids
        if cut is None:
            problems[key] = f"{len(ids):,} tokens cannot be cut to {limit:,} (the chat template alone is too long)"
            continue
        seqs.append(cut)
        flags.append(len(cut) < len(ids))
        seq_keys.append(key)
    results = _score(rm, seqs, max_batch_tokens or _default_budget(rm))
    for key, seq, truncated, result in zip(seq_keys, seqs, flags, results, strict=True):
        if result is None:
            problems[key] = f"{len(seq):,} tokens do not fit in GPU memory even alone"
            continue
        known[key] = {**result, "truncated": truncated}
        if store is not None:
            store.put(key, orjson.dumps(known[key]))
    return problems


def _columns(outputs: list[dict[str, Any]]) -> dict[str, list]:
    return {name: [output[name] for output in outputs] for name in FEATURES}


def describe(model: str, pairing: str = "best_worst", revision: str | None = None, **_: Any) -> dict[str, Any]:
    """What the card says about this line: which reward model (as the recipe names it), how pairs were picked, and
    the names of ArmoRM's objectives (the card shows their means only where the model gave them)."""
    return {
        "reward_model": f"{model}@{revision}" if revision else model,
        "pairing": pairing,
        "reward_objectives": list(OBJECTIVES),
    }


def check(
    model: str, pairing: str = "best_worst", trust_remote_code: bool = False, require: str | None = None, **_: Any
) -> None:
    """Before the run: the pairing, the extra, and a local model folder (that it exists, is a sequence classifier,
    and may run its code), so a typo is one line now rather than after every response was generated."""
    if pairing not in PAIRINGS:
        raise RewardModelError(f"{STAGE}: unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
    if require is not None:
        try:
            re.compile(require)
        except re.error as err:
            raise RewardModelError(f"{STAGE}: require {require!r} is not a regular expression: {err}") from None
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        raise RewardModelError(f"{STAGE} runs the reward model in process and needs torch and transformers: {INSTALL}")
    folder = _local_folder(model)
    if folder is not None:
        _check_folder(folder, trust_remote_code)


STEPS = [
    Step(
        name=STAGE,
        kind="batch",
        fn=annotate_preference,
        features=FEATURES,
        batch_size=64,
        describe=describe,
        check=check,
    )
]
