"""A tiny reward model built here from nothing, for the demo, the tests and the benchmark of ``annotate_preference``.

A random ``LlamaForSequenceClassification`` (one label, hidden 64, 2 layers, 4 heads, 512 positions) with a real
byte-level BPE tokenizer trained in about a second on the bundled corpus, carrying Llama-3's special tokens, a pad
token distinct from ``<|eot_id|>`` and Llama-3's chat template: the same shape of input as ArmoRM, in ~1 MB.
**Its rewards are meaningless**: the weights are untrained, so the pairs it makes show the machinery only (the
same caveat as the bundled SmolLM2 generator, only stronger). Nothing is downloaded; the folder is deterministic
from the seed (the tokenizer's training is deterministic, the weights come from ``torch.manual_seed(seed)``).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from filelock import FileLock

from synthq_hf.cache import default_cache_path

#: Llama-3's names for them: ArmoRM-style code finds the assistant turn by this token pattern.
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
PAD_TOKEN = "<|finetune_right_pad_id|>"
VOCAB_SIZE = 2048
CONTEXT = 512


def tiny_reward_path() -> Path:
    """The shared copy in the synthq cache folder, built on first use."""
    return build_tiny_reward_model(default_cache_path().parent / "reward-models" / "tiny-llama-reward")


def build_tiny_reward_model(folder: Path, seed: int = 0) -> Path:
    """Build the model folder once: written to ``<folder>.partial`` and renamed, so a killed build leaves no
    half folder that a later run would take for a model; a file lock keeps two processes from building at once."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if folder.is_dir():
            return folder
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        tokenizer = build_tokenizer()
        model = _random_model(tokenizer, seed)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


def _corpus() -> list[str]:
    """Every string of the bundled JSONL files, in a fixed order (the tokenizer's training data)."""
    texts = []
    for name in ("corpus.jsonl", "sample_instructions.jsonl", "seeds.jsonl"):
        for line in (resources.files("synthq_hf") / "data" / name).read_text().splitlines():
            if line.strip():
                texts.extend(value for value in json.loads(line).values() if isinstance(value, str))
    return texts


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast (imported late: torch/transformers are an extra)
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens trained on the bundled corpus, with Llama-3's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from synthq_hf.stages.annotate_preference import LLAMA3_CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*SPECIAL_TOKENS, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=PAD_TOKEN,
        model_max_length=CONTEXT,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def _random_model(tokenizer, seed: int):  # -> transformers.LlamaForSequenceClassification
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        num_labels=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # spread the random scores, so that pairs are not decided by float noise
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)
