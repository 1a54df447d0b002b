"""Token budgets with a real tokenizer: a BPE vocabulary trained here on the bundled corpus, saved as tokenizer.json."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from synthq_hf import tokens

CORPUS = Path(tokens.__file__).parent / "data" / "corpus.jsonl"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_count_matches_the_tokenizer(tokenizer_file) -> None:
    text = "Feed the starter flour and water every day; a ripe starter doubles in four to eight hours."
    expected = len(Tokenizer.from_file(tokenizer_file).encode(text, add_special_tokens=False).ids)
    assert asyncio.run(tokens.count_tokens(text, tokenizer=tokenizer_file)) == expected
    assert expected < len(text)  # a trained vocabulary, not one token per character


@pytest.mark.parametrize("limit", [1, 17, 250])
def test_truncation_cuts_on_a_token_boundary_at_the_limit(tokenizer_file, limit) -> None:
    text = CORPUS.read_text(encoding="utf-8")[:20_000]
    cut, count, was_cut = asyncio.run(tokens.truncate_tokens(text, limit, tokenizer=tokenizer_file))
    encoded = Tokenizer.from_file(tokenizer_file).encode(cut, add_special_tokens=False).ids
    assert was_cut and text.startswith(cut)
    assert count == limit and len(encoded) == limit
    full = Tokenizer.from_file(tokenizer_file).encode(text, add_special_tokens=False).ids
    assert encoded == full[:limit]


def test_short_text_is_returned_whole(tokenizer_file) -> None:
    cut, count, was_cut = asyncio.run(tokens.truncate_tokens("two words", 50, tokenizer=tokenizer_file))
    expected = len(Tokenizer.from_file(tokenizer_file).encode("two words", add_special_tokens=False).ids)
    assert (cut, count, was_cut) == ("two words", expected, False)


def test_without_any_tokenizer_the_estimate_is_used() -> None:
    cut, count, was_cut = asyncio.run(tokens.truncate_tokens("a" * 1000, 10))
    assert (len(cut), count, was_cut) == (10 * tokens.CHARS_PER_TOKEN, 10, True)
