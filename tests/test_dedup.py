"""dedup and decontaminate: which rows stay, which go, and that every input row ends up in exactly one of the two."""

from __future__ import annotations

import json
import logging
import random

import datasets
import numpy as np
import pytest
from datasets import Dataset
from datasketch import MinHash

from synthq_hf.stages._common import ColumnError, row_id
from synthq_hf.stages.decontaminate import decontaminate
from synthq_hf.stages.dedup import dedup, normalize, shingle_hashes, signatures

datasets.disable_progress_bars()

LONG = (
    "Design a week-long field study for measuring nitrate runoff from three adjacent farms after heavy rain, "
    "including sampling schedule, sensor placement, a budget under five thousand euros and a plan for the "
    "statistical comparison of upstream and downstream readings."
)


def edit(text: str, changes: dict[str, str]) -> str:
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    return text


def distinct_prompts(count: int, seed: int = 0) -> list[str]:
    """Prompts of random words: pairwise far apart (character 5-gram Jaccard near 0)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    vocab = [f"{rng.choice(syllables)}{rng.choice(syllables)}{i}" for i in range(400)]
    return [" ".join(rng.choices(vocab, k=30)) for _ in range(count)]


def col(ds: Dataset, name: str) -> list:
    return list(ds[name])


def assert_partition(ds: Dataset, kept: Dataset, rejected: Dataset, column: str = "prompt") -> None:
    """Every input row is in kept or rejected, once; both keep input order."""
    assert kept.num_rows + rejected.num_rows == ds.num_rows
    assert sorted(col(kept, "n") + col(rejected, "n")) == list(range(ds.num_rows))
    assert col(kept, "n") == sorted(col(kept, "n"))
    assert col(rejected, "n") == sorted(col(rejected, "n"))
    assert kept.column_names == ds.column_names


def test_exact_duplicates_differing_in_case_whitespace_and_punctuation() -> None:
    prompts = [
        "Explain how a heat pump works in winter.",
        "explain how a HEAT pump works in winter",
        "  Explain how a heat pump\nworks   in winter?  ",
        "“Explain how a heat pump works in winter.”",
        "Explain how a heat pump works in summer.",
    ]
    ds = Dataset.from_dict({"n": list(range(5)), "prompt": prompts})
    kept, rejected = dedup(ds)
    assert_partition(ds, kept, rejected)
    assert col(kept, "n") == [0, 4]
    first = row_id({}, prompts[0])
    assert col(rejected, "duplicate_of") == [first] * 3
    assert col(rejected, "reason") == [f"exact duplicate of {first}"] * 3
    assert col(rejected, "rejected_by") == ["dedup"] * 3


def test_near_duplicates_cluster_and_the_highest_score_stays() -> None:
    variants = [
        edit(LONG, {"three adjacent": "four adjacent"}),
        edit(LONG, {"five thousand euros": "six thousand euros"}),
        LONG,
        edit(LONG, {"sensor placement": "probe placement"}),
    ]
    others = distinct_prompts(6)
    prompts = variants[:2] + others[:3] + variants[2:] + others[3:]
    scores = [2, 3, 5, 1, 4, 6, 4, 0, 7, 2]  # LONG (index 5) has the highest score of its cluster
    ds = Dataset.from_dict({"n": list(range(10)), "prompt": prompts, "total_score": scores, "id": list("abcdefghij")})
    kept, rejected = dedup(ds)
    assert_partition(ds, kept, rejected)
    assert col(kept, "n") == [2, 3, 4, 5, 7, 8, 9]
    assert col(rejected, "n") == [0, 1, 6]
    assert col(rejected, "duplicate_of") == ["f", "f", "f"]
    for reason in col(rejected, "reason"):
        assert reason.startswith("near duplicate (jaccard≈0.9") and reason.endswith(" of f"), reason


def test_lsh_candidates_below_the_threshold_are_verified_out() -> None:
    """Pairs one word apart (J≈0.9) at threshold 0.95: many collide in a band, only verified ones may go."""
    base = distinct_prompts(40, seed=5)
    prompts = base + [edit(p, {p.split()[10]: "qqqqqq"}) for p in base]
    ds = Dataset.from_dict({"n": list(range(80)), "prompt": prompts})
    kept, rejected = dedup(ds, threshold=0.95)
    assert_partition(ds, kept, rejected)
    assert kept.num_rows >= 70  # most pairs are below 0.95 and must both stay
    for reason in col(rejected, "reason"):
        assert float(reason.split("≈")[1].split(")")[0]) >= 0.95, reason


def test_distinct_prompts_are_all_kept() -> None:
    prompts = distinct_prompts(300, seed=1)
    ds = Dataset.from_dict({"n": list(range(300)), "prompt": prompts})
    kept, rejected = dedup(ds)
    assert kept.num_rows == 300
    assert rejected.num_rows == 0
    assert rejected.column_names == ["n", "prompt", "rejected_by", "reason", "duplicate_of"]


def test_ties_keep_the_first_occurrence_and_none_scores_count_as_lowest(caplog) -> None:
    prompts = ["Summarise the causes of the 1929 crash."] * 5 + ["List three uses of graphene."] * 3
    scores = [None, 4, 6, 6, None, None, None, None]
    ds = Dataset.from_dict({"n": list(range(8)), "prompt": prompts, "total_score": scores, "id": list("abcdefgh")})
    with caplog.at_level(logging.INFO, logger="synthq_hf.stages.dedup"):
        kept, rejected = dedup(ds)
    assert_partition(ds, kept, rejected)
    assert col(kept, "n") == [2, 5]  # first of the two 6s; all-None cluster keeps its first row
    assert col(rejected, "duplicate_of") == ["c", "c", "c", "c", "f", "f"]
    assert "5 of 8 rows have no total_score; treated as the lowest score" in caplog.text


def test_without_a_score_column_the_first_occurrence_stays() -> None:
    ds = Dataset.from_dict({"n": [0, 1, 2], "prompt": ["Same prompt here", "other one entirely", "same prompt HERE"]})
    kept, rejected = dedup(ds)
    assert col(kept, "n") == [0, 1]
    assert col(rejected, "duplicate_of") == [row_id({}, "Same prompt here")]


def test_duplicate_of_always_names_a_kept_row() -> None:
    """An exact duplicate whose first copy is itself a near duplicate points at the row that was kept."""
    near = edit(LONG, {"three": "four", "heavy": "strong"})
    prompts = [near, LONG, near.upper(), *distinct_prompts(3, seed=2)]
    ds = Dataset.from_dict({"n": list(range(6)), "prompt": prompts, "total_score": [3, 5, 1, 0, 0, 0]})
    kept, rejected = dedup(ds)
    assert_partition(ds, kept, rejected)
    kept_ids = {row_id({}, p) for p in col(kept, "prompt")}
    assert col(rejected, "n") == [0, 2]
    assert set(col(rejected, "duplicate_of")) == {row_id({}, LONG)} <= kept_ids
    assert col(rejected, "reason")[0].startswith("near duplicate")
    assert col(rejected, "reason")[1].startswith(f"exact duplicate of {row_id({}, near)}, itself a near duplicate")


def test_empty_prompts_are_rejected_with_a_reason_not_merged() -> None:
    ds = Dataset.from_dict(
        {"n": [0, 1, 2, 3, 4, 5], "prompt": [None, "", "   ", "A real prompt about tides.", "???", "!!!"]}
    )
    kept, rejected = dedup(ds)
    assert_partition(ds, kept, rejected)
    assert col(kept, "n") == [3, 4, 5]  # punctuation-only text keeps its punctuation: not duplicates of each other
    assert col(rejected, "reason") == ["empty prompt"] * 3
    assert col(rejected, "duplicate_of") == [None] * 3


def test_selected_and_shuffled_input_is_partitioned_by_its_own_order() -> None:
    base = distinct_prompts(20, seed=3)
    ds = Dataset.from_dict({"n": list(range(40)), "prompt": base + [p.upper() for p in base]})
    view = ds.shuffle(seed=0).select(range(30))
    kept, rejected = dedup(view)
    assert kept.num_rows + rejected.num_rows == 30
    assert sorted(col(kept, "n") + col(rejected, "n")) == sorted(col(view, "n"))
    positions = {n: i for i, n in enumerate(col(view, "n"))}
    assert [positions[n] for n in col(kept, "n")] == sorted(positions[n] for n in col(kept, "n"))
    assert len({n % 20 for n in col(kept, "n")}) == kept.num_rows  # one row per prompt


def test_missing_column_names_it_and_the_columns_present() -> None:
    ds = Dataset.from_dict({"instruction": ["x"], "total_score": [1]})
    with pytest.raises(ColumnError, match=r"'prompt'.*\['instruction', 'total_score'\]"):
        dedup(ds)
    with pytest.raises(ColumnError, match=r"'prompt'.*\['instruction', 'total_score'\]"):
        decontaminate(ds, [Dataset.from_dict({"prompt": ["x"]})])
    with pytest.raises(ColumnError, match="must hold strings"):
        dedup(Dataset.from_dict({"prompt": [1, 2]}))
    with pytest.raises(ColumnError, match="score column 'total_score' must be numeric"):
        dedup(Dataset.from_dict({"prompt": ["a b c d e f"], "total_score": ["high"]}))


def test_vectorised_signatures_equal_datasketch_minhash() -> None:
    texts = [normalize(t) for t in (LONG, "Ｆｕｌｌ-width Ünïcödé — text", "abc", "")]
    permutations = MinHash(num_perm=64, seed=7, scheme="affine32").permutations
    ours = signatures(texts, permutations, ngram=5)
    hashes, owner = shingle_hashes(texts, ngram=5)
    assert np.bincount(owner, minlength=4).tolist() == [len(t) - 4 if len(t) >= 5 else 0 for t in texts]
    for i in range(len(texts)):
        reference = MinHash(num_perm=64, seed=7, scheme="affine32", hashfunc=int)
        reference.update_batch(hashes[owner == i].tolist())
        assert ours[i].tolist() == reference.hashvalues.tolist()


def test_num_proc_gives_the_same_split() -> None:
    base = distinct_prompts(40, seed=4)
    prompts = base + [edit(p, {p.split()[3]: "zzz"}) for p in base[:10]]
    ds = Dataset.from_dict({"n": list(range(50)), "prompt": prompts})
    one = dedup(ds)
    two = dedup(ds, num_proc=2, batch_size=7)
    assert col(one[0], "n") == col(two[0], "n")
    assert col(one[1], "reason") == col(two[1], "reason")


# -- decontaminate ---------------------------------------------------------------------------------------------
EVAL_LONG = "A train leaves the station at 3 pm travelling at 60 miles per hour toward a city 180 miles away"


def train_set() -> Dataset:
    prompts = [
        f"Please solve: {EVAL_LONG.upper()}; when does it arrive?",  # contains a 13-gram of the long eval prompt
        "A train leaves the station at noon and nobody knows where it is going, write a story",  # < 13 shared
        "What is the capital of France?",  # equals a short eval prompt after normalisation
        "Name the capital of France and explain its history in detail please",  # contains it: not contamination
        None,
    ]
    return Dataset.from_dict({"n": list(range(len(prompts))), "prompt": prompts})


def test_decontaminate_against_a_local_jsonl_file(tmp_path) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in (EVAL_LONG, "what is the capital of FRANCE")))
    ds = train_set()
    kept, rejected = decontaminate(ds, [str(path)])
    assert_partition(ds, kept, rejected)
    assert col(rejected, "n") == [0, 2]
    assert col(rejected, "rejected_by") == ["decontaminate"] * 2
    assert col(rejected, "reason")[0].startswith(f"shares a 13-gram with eval set {path}: 'a train leaves the station")
    assert col(rejected, "reason")[1] == (
        f"whole-text match with a short prompt of eval set {path}: 'what is the capital of france'"
    )


def test_decontaminate_against_a_dataset_and_a_hub_layout_folder(tmp_path) -> None:
    folder = tmp_path / "my-eval"
    (folder / "data").mkdir(parents=True)
    Dataset.from_dict({"problem": ["What is the capital of France?"]}).to_parquet(str(folder / "data" / "test.parquet"))
    in_memory = Dataset.from_dict({"prompt": [EVAL_LONG, None, ""]})
    ds = train_set()
    _, rejected = decontaminate(ds, [in_memory, str(folder)])
    assert col(rejected, "n") == [0, 2]
    assert "eval set eval_sets[0]" in col(rejected, "reason")[0]
    assert f"eval set {folder}[test]" in col(rejected, "reason")[1]
    _, rejected = decontaminate(ds, [f"{folder}::test"], eval_column="problem")
    assert col(rejected, "n") == [2]


def test_decontaminate_with_a_shorter_ngram_and_an_unknown_eval_column() -> None:
    ds = train_set()
    _, rejected = decontaminate(ds, [Dataset.from_dict({"prompt": ["the station at noon and nobody"]})], ngram=4)
    assert col(rejected, "n") == [1]
    with pytest.raises(ColumnError, match=r"none of the columns.*\['answer'\]"):
        decontaminate(ds, [Dataset.from_dict({"answer": ["42"]})])


def test_one_or_no_row_left_for_near_dedup_is_fine() -> None:
    """Exact duplicates of one short text leave nothing to band: no crash, one kept."""
    ds = Dataset.from_dict({"id": ["a", "b", "c"], "prompt": ["ok", "OK", "ok!"], "total_score": [1, 2, 3]})
    kept, rejected = dedup(ds)
    assert kept["id"] == ["c"] and sorted(rejected["duplicate_of"]) == ["c", "c"]
    kept, rejected = dedup(Dataset.from_dict({"id": ["a"], "prompt": ["a single long enough prompt text"]}))
    assert kept.num_rows == 1 and rejected.num_rows == 0
