"""annotate_preference on tiny local reward models (built here, nothing downloaded): a random Llama classifier
(synthq_hf.tiny_reward) and an ArmoRM-shaped remote-code model (tests/fixtures/armorm_tiny). Pairing rules, right
padding with a pad that is not eot, batched = one at a time, the reward cache, skipped and failed rows,
truncation, out-of-memory halving (a fault the fixture model raises), and one-line errors for bad models."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, IterableDataset, List, Value
from tokenizers import Tokenizer, models
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from synthq_hf.cache import get_cache
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.annotate_preference import (
    FEATURES,
    OBJECTIVES,
    RewardModelError,
    annotate_preference,
    load_reward_model,
    pick_pair,
)
from synthq_hf.tiny_reward import build_tiny_reward_model

FIXTURE = Path(__file__).parent / "fixtures" / "armorm_tiny" / "modeling_armorm_tiny.py"
GATING_PATTERN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

BATCH = {
    "prompt": ["Explain tides to a child.", "Name three uses of borax.", "Why is the sky blue?"],
    "responses": [
        ["The moon pulls the sea.", "Tides are the sea going up and down twice a day, pulled by the moon.", "Water."],
        ["Cleaning, laundry, and killing ants.", "Laundry booster.", "Glass making, slime, and flux for welding."],
        ["Rayleigh scattering of short wavelengths by air molecules.", "Because.", "Blue light scatters more."],
    ],
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_reward_model(tmp_path_factory.mktemp("models") / "tiny"))


def build_armorm(folder: Path, tokenizer_from: str, seed: int = 0, **config: object) -> str:
    """An ArmoRM-shaped folder as the Hub has it: config.json with auto_map, weights, tokenizer, its own code."""
    spec = importlib.util.spec_from_file_location("modeling_armorm_tiny", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=len(OBJECTIVES),
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    cfg.gating_token_pattern = tokenizer(GATING_PATTERN, add_special_tokens=False)["input_ids"]
    cfg.auto_map = {"AutoModelForSequenceClassification": "modeling_armorm_tiny.LlamaForRewardModelWithGating"}
    for name, value in config.items():
        setattr(cfg, name, value)
    torch.manual_seed(seed)
    module.LlamaForRewardModelWithGating(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(FIXTURE, folder / FIXTURE.name)
    return str(folder)


@pytest.fixture(scope="session")
def armorm(tmp_path_factory: pytest.TempPathFactory, tiny: str) -> str:
    return build_armorm(tmp_path_factory.mktemp("models") / "armorm", tiny)


def forward_inputs(model_path: str, **options: object) -> list[torch.Tensor]:
    """Records the ``input_ids`` of every forward pass of the loaded model that returned (a torch hook, not a
    patch: it fires after the model's own forward, and not when that raised)."""
    seen: list[torch.Tensor] = []
    load_reward_model(model_path, **options).model.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].clone()), with_kwargs=True
    )
    return seen


def one_at_a_time(batch: dict[str, list], **kwargs: object) -> dict[str, list]:
    """The stage on each row alone, one sequence per forward pass (no padding at all)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    outs = [annotate_preference({k: [v] for k, v in row.items()}, max_batch_tokens=1, **kwargs) for row in rows]
    return {name: [out[name][0] for out in outs] for name in outs[0]}


def test_pick_pair_best_worst_and_mean_minus_2std() -> None:
    rewards = [10.0] + [9.0] * 18 + [0.0]  # mean 8.6, std 1.985: mean − 2·std = 4.63 is nearer 9 than 0
    assert pick_pair(rewards, "best_worst") == (0, 19)
    assert pick_pair(rewards, "mean_minus_2std") == (0, 1)  # the first of the tied 9s
    assert pick_pair([1.0, 3.0, 3.0, 1.0]) == (1, 0)  # ties: lowest index, for chosen and rejected
    assert pick_pair([0.5, 0.1, 0.9, 0.4], "mean_minus_2std") == (2, 1)  # few rewards: the target is below all
    assert pick_pair([2.0, 2.0, 2.0]) is None
    with pytest.raises(ValueError, match="unknown pairing 'random'"):
        pick_pair([1.0, 2.0], "random")
    assert pick_pair([0.5, 0.9, 0.1], "best") == (1, None)
    assert pick_pair([0.5, 0.9, 0.1], eligible=[0, 2]) == (0, 2)  # only eligible ones may be chosen
    assert pick_pair([0.5, 0.9, 0.1], "best", eligible=[]) is None


def test_best_keeps_the_top_response_that_carries_the_required_answer(tiny: str) -> None:
    """ScaleQuest's reward filtering: the best response with a final answer, as SFT data; no pair needed."""
    batch = {
        "prompt": ["What is 2 + 3?", "What is 7 * 6?", "Name a prime."],
        "responses": [
            ["It is \\boxed{5}.", "Five, I think.", "2 + 3 = \\boxed{5}"],
            ["42", "42", "42"],  # identical, no final answer
            ["Two.", "\\boxed{2}", "\\boxed{2}"],  # identical candidates are fine without a pair
        ],
    }
    plain = annotate_preference(batch, model=tiny, pairing="best", cache=False)
    boxed = annotate_preference(batch, model=tiny, pairing="best", require=r"\\boxed\{", cache=False)
    assert plain["annotate_preference_error"] == [None, None, None]
    for i in range(3):
        rewards = plain["rewards"][i]
        assert plain["best_reward"][i] == max(rewards) and plain["rejected"][i] is None
        assert plain["best_response"][i] == batch["responses"][i][plain["chosen_index"][i]]
    first = boxed["rewards"][0]
    assert boxed["best_reward"][0] == max(first[0], first[2]) and "boxed" in boxed["best_response"][0]
    assert (
        boxed["best_response"][1] is None and "none of the 3 responses matches" in boxed["annotate_preference_error"][1]
    )
    assert "boxed" in boxed["best_response"][2]


def test_scores_pairs_and_columns_on_the_tiny_llama(tiny: str) -> None:
    out = annotate_preference(BATCH, model=tiny, cache=False)
    assert set(out) == set(FEATURES)
    for i, prompt in enumerate(BATCH["prompt"]):
        rewards, responses = out["rewards"][i], BATCH["responses"][i]
        assert len(rewards) == 3 and len(set(rewards)) == 3
        assert out["chosen_index"][i] == int(np.argmax(rewards)) and out["rejected_index"][i] == int(np.argmin(rewards))
        assert out["chosen"][i] == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": responses[out["chosen_index"][i]]},
        ]
        assert out["rejected"][i][1]["content"] == responses[out["rejected_index"][i]]
        assert out["reward_margin"][i] == pytest.approx(max(rewards) - min(rewards))
        assert out["reward_objectives"][i] is None  # a plain classifier has no objectives
        assert out["reward_truncated"][i] == [False] * 3
        assert out["annotate_preference_error"][i] is None
    other = annotate_preference(BATCH, model=tiny, cache=False, pairing="mean_minus_2std")
    assert other["rewards"] == out["rewards"]


def test_right_padding_with_a_pad_that_is_not_eot(tiny: str) -> None:
    rm = load_reward_model(tiny)
    eot = rm.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert rm.pad_id != eot and rm.pad_id != rm.tokenizer.eos_token_id
    assert rm.model.config.pad_token_id == rm.pad_id
    seen = forward_inputs(tiny)
    annotate_preference(BATCH, model=tiny, cache=False)
    ids = torch.cat([pass_ids for pass_ids in seen if pass_ids.shape[0] > 1])
    assert (ids[:, 0] == rm.tokenizer.bos_token_id).all()  # content first: padding on the right
    for row in ids:
        real = int((row != rm.pad_id).sum())
        assert (row[real:] == rm.pad_id).all() and row[real - 1] == eot  # pads only after the closing eot
    assert (ids == rm.pad_id).any()


def test_batched_equals_one_at_a_time(tiny: str, armorm: str) -> None:
    for model, options in ((tiny, {}), (armorm, {"trust_remote_code": True})):
        seen = forward_inputs(model, **options)
        batched = annotate_preference(BATCH, model=model, cache=False, **options)
        assert max(ids.shape[0] for ids in seen) == 9  # the 9 sequences in one padded pass
        single = one_at_a_time(BATCH, model=model, cache=False, **options)
        np.testing.assert_allclose(batched["rewards"], single["rewards"], rtol=1e-5, atol=1e-5)
        assert batched["chosen_index"] == single["chosen_index"]
        assert batched["rejected_index"] == single["rejected_index"]


def test_a_rerun_is_answered_by_the_cache(tiny: str, tmp_path: Path) -> None:
    path = str(tmp_path / "rewards.sqlite")
    seen = forward_inputs(tiny)
    first = annotate_preference(BATCH, model=tiny, cache_path=path)
    assert len(seen) == 1 and len(get_cache(path)) == 9
    second = annotate_preference(BATCH, model=tiny, cache_path=path)
    assert len(seen) == 1  # no forward pass: every score came from the cache
    assert second == first
    annotate_preference(BATCH, model=tiny, cache_path=path, max_length=40)
    assert len(seen) == 2  # another max_length is another key


def test_rows_without_a_pair_get_a_reason(tiny: str) -> None:
    batch = {"prompt": ["Say hi.", "Say bye.", "Count."], "responses": [["Hi."] * 5, ["Bye."], ["1", "2", "1"]]}
    out = annotate_preference(batch, model=tiny, cache=False)
    assert out["annotate_preference_error"][:2] == [
        "annotate_preference: all 5 responses are the same text: no pair",
        "annotate_preference: 1 response(s): a pair needs two",
    ]
    assert out["rewards"][0] is None and out["chosen"][1] is None
    assert out["annotate_preference_error"][2] is None
    assert out["rewards"][2][0] == out["rewards"][2][2]  # the same text, the same score
    assert out["rejected"][2][1]["content"] != out["chosen"][2][1]["content"]


def test_rows_failed_or_rejected_earlier_are_left_empty_without_a_reason(tiny: str) -> None:
    batch = {
        "prompt": ["a", "b", "c", "d"],
        "responses": [None, ["x", "y"], ["x", "y"], ["x", "y"]],
        "generate_responses_error": ["generate_responses: sample 1 of 2: HTTP 500", None, None, None],
        "rejected_by": [None, "score_instruction", None, None],
    }
    out = annotate_preference(batch, model=tiny, cache=False)
    for i in (0, 1):
        assert all(out[name][i] is None for name in FEATURES)
    assert out["rewards"][2] is not None and out["annotate_preference_error"][2] is None
    seen = forward_inputs(tiny)
    annotate_preference({k: v[:2] for k, v in batch.items()}, model=tiny, cache=False)
    assert seen == []  # nothing to score: not even a pass


def test_over_long_input_is_cut_and_flagged(armorm: str) -> None:
    # ArmoRM's gating fails ("Token pattern not found") if the cut took the assistant header with it.
    long_response = "The tide rises and falls. " * 100
    batch = {
        "prompt": ["Explain tides.", "Explain tides. " * 200],
        "responses": [["Short answer.", long_response], ["Short answer.", long_response]],
    }
    out = annotate_preference(batch, model=armorm, trust_remote_code=True, cache=False, max_length=120)
    assert out["annotate_preference_error"] == [None, None]
    assert out["reward_truncated"] == [[False, True], [True, True]]  # a huge prompt is cut too
    seen = forward_inputs(armorm, trust_remote_code=True)
    default = annotate_preference(batch, model=armorm, trust_remote_code=True, cache=False)  # context: 512
    assert default["reward_truncated"] == [[False, True], [True, True]]
    assert max(ids.shape[1] for ids in seen) == 512


def test_through_dataset_and_iterable_dataset_map(tiny: str) -> None:
    ds = Dataset.from_dict(BATCH)
    features = Features({**ds.features, **FEATURES})
    kwargs = {"batched": True, "batch_size": 2, "fn_kwargs": {"model": tiny, "cache": False}, "features": features}
    mapped = ds.map(annotate_preference, **kwargs)
    streamed = list(IterableDataset.from_generator(lambda: iter(ds)).map(annotate_preference, **kwargs))
    direct = annotate_preference(BATCH, model=tiny, cache=False)
    for rows in (list(mapped), streamed):
        np.testing.assert_allclose([row["rewards"] for row in rows], direct["rewards"], rtol=1e-5)
        assert [row["chosen"] for row in rows] == direct["chosen"]
        assert [row["annotate_preference_error"] for row in rows] == [None] * 3


def test_armorm_shaped_model_gives_its_19_objectives(armorm: str) -> None:
    out = annotate_preference(BATCH, model=armorm, trust_remote_code=True, cache=False)
    for objectives, rewards in zip(out["reward_objectives"], out["rewards"], strict=True):
        assert len(objectives) == 3 and all(len(row) == len(OBJECTIVES) == 19 for row in objectives)
        assert len(set(rewards)) == 3


def test_remote_code_needs_the_flag(armorm: str) -> None:
    with pytest.raises(RewardModelError) as err:
        annotate_preference(BATCH, model=armorm, cache=False)
    message = str(err.value)
    assert "\n" not in message and armorm in message and "trust_remote_code: true" in message


def test_a_tokenizer_padding_with_eot_gets_another_pad(tiny: str, tmp_path: Path) -> None:
    tokenizer_dir = tmp_path / "eot-pad"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.pad_token = "<|eot_id|>"  # what many Llama-3 tokenizers ship
    tokenizer.save_pretrained(tokenizer_dir)
    model = build_armorm(tmp_path / "armorm-eot-pad", str(tokenizer_dir))
    rm = load_reward_model(model, trust_remote_code=True)
    assert rm.pad_id == rm.tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>")
    batched = annotate_preference(BATCH, model=model, trust_remote_code=True, cache=False)
    single = one_at_a_time(BATCH, model=model, trust_remote_code=True, cache=False)
    np.testing.assert_allclose(batched["rewards"], single["rewards"], rtol=1e-5, atol=1e-5)


def test_no_pad_but_eot_and_no_spare_token_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "no-pad"
    vocab = {"<|eot_id|>": 0, "a": 1, "b": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")))
    tokenizer.eos_token = tokenizer.pad_token = "<|eot_id|>"
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    with pytest.raises(RewardModelError, match="no pad token distinct from eos") as err:
        annotate_preference(BATCH, model=str(folder), cache=False)
    assert "\n" not in str(err.value)


def test_out_of_memory_halves_the_pass(tiny: str, armorm: str, tmp_path: Path) -> None:
    # The same weights (same seed) as ``armorm``, but a pass of more than 200 padded tokens "runs out of memory".
    model = build_armorm(tmp_path / "armorm-oom", tiny, oom_above_tokens=200)
    seen = forward_inputs(model, trust_remote_code=True)
    out = annotate_preference(BATCH, model=model, trust_remote_code=True, cache=False)
    assert max(ids.numel() for ids in seen) <= 200 and len(seen) > 1
    single = one_at_a_time(BATCH, model=armorm, trust_remote_code=True, cache=False)
    np.testing.assert_allclose(out["rewards"], single["rewards"], rtol=1e-5, atol=1e-5)
    batch = {"prompt": ["Explain tides.", "Say hi."], "responses": [["Short.", "Long. " * 300], ["Hi.", "Hello."]]}
    out = annotate_preference(batch, model=model, trust_remote_code=True, cache=False)
    error = out["annotate_preference_error"][0]
    assert error.startswith("annotate_preference: response 2 of 2: ") and "GPU memory even alone" in error
    assert out["rewards"][0] is None and out["annotate_preference_error"][1] is None  # the run goes on


def test_bad_model_folders_are_one_line_naming_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    causal = tmp_path / "causal"  # a generator, not a reward model
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(causal)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (missing, "does not exist"),
        (causal, "holds LlamaForCausalLM (a causal language model), not a sequence classifier"),
        (empty, "has no config.json"),
    ]
    for folder, what in cases:
        with pytest.raises(RewardModelError) as err:
            annotate_preference(BATCH, model=str(folder), cache=False)
        message = str(err.value)
        assert "\n" not in message and str(folder) in message and what in message


def test_missing_columns_and_unknown_pairing(tiny: str) -> None:
    with pytest.raises(ColumnError, match="'responses'"):
        annotate_preference({"prompt": ["a"]}, model=tiny)
    with pytest.raises(ColumnError, match="'prompt'"):
        annotate_preference({"responses": [["a", "b"]]}, model=tiny)
    with pytest.raises(ValueError, match="unknown pairing"):
        annotate_preference(BATCH, model=tiny, pairing="worst")


def test_tiny_model_is_deterministic_and_bundled(tiny: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    again = build_tiny_reward_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (Path(tiny) / name).read_bytes()
    assert not (tmp_path / "again.partial").exists()
    other = build_tiny_reward_model(tmp_path / "seed-1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "cache"))
    out = annotate_preference(BATCH, model="bundled:tiny-reward", cache=False)
    assert (tmp_path / "cache" / "reward-models" / "tiny-llama-reward" / "config.json").is_file()
    reference = annotate_preference(BATCH, model=tiny, cache=False)
    assert out["rewards"] == reference["rewards"]  # the same seed, the same model
    assert json.loads((again / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]


def test_features_cover_the_columns() -> None:
    assert FEATURES["reward_objectives"] == List(List(Value("float64")))
    assert FEATURES["chosen"] == List({"role": Value("string"), "content": Value("string")})
