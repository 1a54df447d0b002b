"""annotate_preference on CPU with the tiny reward model: pairs/s batched (the stage as written) vs one by one.

``--rows`` rows of ``--responses`` responses each, of varied length (5 to ~300 words cut from the bundled corpus,
seeded), cache off. Batched: the stage over map batches of 64 rows, its forward passes packed by length under
the default CPU token budget. One by one: the same stage on one row at a time with ``max_batch_tokens=1``, so each
forward pass holds a single sequence. Both runs score the same texts; the rewards are checked to agree.
The tiny model is random and small (hidden 64), so this measures the stage's packing and overhead, not what an
8B model would do on a GPU.

    .venv/bin/python scripts/bench/preference.py --rows 200
"""

from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources

import numpy as np

from synthq_hf.stages.annotate_preference import BUNDLED_TINY, annotate_preference, load_reward_model


def make_batch(rows: int, responses: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)
    data = resources.files("synthq_hf") / "data"
    words = " ".join(json.loads(line)["text"] for line in (data / "corpus.jsonl").read_text().splitlines()).split()
    prompts = [json.loads(line)["prompt"] for line in (data / "sample_instructions.jsonl").read_text().splitlines()]

    def response() -> str:
        n = int(rng.lognormvariate(3.5, 1.0)) % 300 + 5
        start = rng.randrange(len(words) - n)
        return " ".join(words[start : start + n])

    return {
        "prompt": [f"{rng.choice(prompts)} (#{i})" for i in range(rows)],
        "responses": [[response() for _ in range(responses)] for _ in range(rows)],
    }


def run(batch: dict[str, list], rows_per_call: int, **kwargs: object) -> tuple[float, list]:
    start = time.perf_counter()
    rewards: list = []
    n = len(batch["prompt"])
    for first in range(0, n, rows_per_call):
        part = {name: values[first : first + rows_per_call] for name, values in batch.items()}
        rewards += annotate_preference(part, model=BUNDLED_TINY, cache=False, **kwargs)["rewards"]
    return n / (time.perf_counter() - start), rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--responses", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    batch = make_batch(args.rows, args.responses, args.seed)
    rm = load_reward_model(BUNDLED_TINY)
    tokens = [len(rm.tokenizer(r, verbose=False)["input_ids"]) for rs in batch["responses"] for r in rs]
    median, longest = int(np.median(tokens)), max(tokens)
    print(f"{args.rows} rows x {args.responses} responses; response tokens: median {median}, max {longest}")
    run(make_batch(4, args.responses, args.seed + 1), 64)  # warm-up: first-call costs out of both figures
    batched, batched_rewards = run(batch, 64)
    single, single_rewards = run(batch, 1, max_batch_tokens=1)
    np.testing.assert_allclose(batched_rewards, single_rewards, rtol=1e-4, atol=1e-4)
    print(f"batched (64 rows a call, packed passes): {batched:8.1f} pairs/s")
    print(f"one by one (1 row, 1 sequence a pass):   {single:8.1f} pairs/s")
    print(f"ratio batched / one by one: {batched / single:.1f}x")


if __name__ == "__main__":
    main()
