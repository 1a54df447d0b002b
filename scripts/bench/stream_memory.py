"""Does memory stay flat with corpus size when a recipe streams? (benchmark, not a test)

The same recipe runs over a streamed JSONL corpus of N documents for each N given (each run in a fresh process,
its peak RSS read from ``ru_maxrss`` of that child), against the zero-latency stub server of
``client_ceiling.py`` (its own process; every chat request gets one canned reply, so generation rows fail schema
validation and go to ``rejected`` with their error — the rows still flow through every stage and writer). Flat
memory means peak RSS barely moves while N grows tenfold.

    .venv/bin/python scripts/bench/stream_memory.py --docs 2000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from client_ceiling import start_stub

RUN = """
import json, sys
from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe
run_recipe(build_recipe(json.loads(sys.argv[1])), overwrite=True)
"""


def recipe(url: str, corpus: Path, out: Path, cache: Path) -> dict:
    return {
        "name": "stream-memory",
        "cache_path": str(cache),
        "endpoints": {"generator": {"url": url, "max_concurrency": 64}},
        "seeds": {"dataset": "bundled:seeds", "text_column": "prompt", "limit": 2},
        "corpus": {"dataset": str(corpus), "text_column": "text", "streaming": True},
        "demonstrations": {},
        "instructions": {
            "generate_instruction": {"k": 0, "attempts": 1},
            "score_instruction": {"attempts": 1},
            "filter": {"threshold": 3},
        },
        "output": {"dir": str(out), "shard_rows": 5000},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    url, stub = start_stub()
    work = Path(tempfile.mkdtemp(prefix="synthq-stream-"))
    results = []
    try:
        for n in args.docs:
            corpus = work / f"corpus-{n}.jsonl"
            with corpus.open("w") as fh:
                for i in range(n):
                    text = f"Document {i}. " + " ".join(f"word{(i * 7 + j) % 997}" for j in range(150))
                    fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            data = recipe(url, corpus, work / f"out-{n}", work / f"cache-{n}.sqlite")
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            started = time.monotonic()
            env = {**os.environ, "SYNTHQ_CACHE_DIR": str(work / "synthq-cache")}
            command = [sys.executable, "-c", RUN, json.dumps(data)]
            subprocess.run(command, check=True, env=env, stderr=subprocess.DEVNULL)
            seconds = time.monotonic() - started
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            # ru_maxrss of children is the largest child so far: runs go smallest first, so it is this run's peak
            # whenever memory grows; equal figures mean this run stayed at or below the previous peak.
            results.append((n, max(peak, before) / 1024, seconds))
            print(f"{n:>8,} docs: peak RSS {max(peak, before) / 1024:,.0f} MB, {n / seconds:,.0f} rows/s", flush=True)
    finally:
        stub.terminate()
    if len(results) > 1:
        (n0, rss0, _), (n1, rss1, _) = results[0], results[-1]
        print(f"corpus ×{n1 / n0:.0f} → peak RSS ×{rss1 / rss0:.2f}")


if __name__ == "__main__":
    main()
