"""A million streamed rows through a stage: flat memory, steady speed (benchmark, not a test).

A JSONL corpus of N instructions is streamed (``load_dataset("json", streaming=True)``) through
``IterableDataset.map(score_instruction)`` — per row, with the durable request cache on, as ``synthq run`` does —
against the zero-latency stub of ``client_ceiling.py`` (its own process; a canned valid score), and every row is
written to parquet shards by ``output.ShardWriter`` as it arrives, the runner's write path. Each N runs in a fresh
process that reports its own peak RSS (``ru_maxrss``) and its rows/s (from the 1,000th row out to the last, so
start-up does not count). The small run goes twice before and once after the large one (a 10k-row run lasts ~2 s
and varies by ±15 % on a shared machine, whose load also drifts over minutes; their mean is the reference).
Printed: every run and the ratios. Targets (issue 9): peak RSS < 1 GiB at 1M rows, and rows/s within 10 % of the
10k-row run.

    .venv/bin/python scripts/bench/stream_1m.py --rows 10000 10000 1000000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from client_ceiling import GOALS, SUBJECTS, start_stub

#: Rows before the clock starts: the first ones pay for the endpoint's detection and datasets' first batches.
WARM_UP = 1000


def child(url: str, corpus: str, work: str) -> None:
    """One measured run (in its own process): stream, score, write; print JSON figures."""
    import resource

    import datasets
    from datasets import load_dataset

    from synthq_hf.endpoint import EndpointConfig
    from synthq_hf.output import ShardWriter
    from synthq_hf.stages import output_features, score_instruction

    datasets.disable_progress_bars()
    stream = load_dataset("json", data_files=corpus, split="train", streaming=True)
    stream = stream._resolve_features()
    features = output_features(stream.features, score_instruction)
    endpoint = EndpointConfig(url=url, max_concurrency=64, dialect="openai", cache_path=f"{work}/requests.sqlite")
    datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = 128  # what the runner sets for c=64
    mapped = stream.map(score_instruction, fn_kwargs={"endpoint": endpoint}, features=features)
    writer = ShardWriter(Path(work) / "out", "instructions", "train", features, shard_rows=50_000)
    rows = errors = 0
    first = None
    for row in mapped:
        errors += row["score_instruction_error"] is not None
        writer.add(row)
        rows += 1
        if rows == WARM_UP:
            first = time.monotonic()
    writer.close()
    seconds = time.monotonic() - first
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = (rows - WARM_UP) / seconds
    print(json.dumps({"rows": rows, "errors": errors, "seconds": seconds, "rows_s": rate, "peak_mb": peak_mb}))


def write_corpus(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            prompt = f"Write {SUBJECTS[i % len(SUBJECTS)]} {GOALS[i % len(GOALS)]} (case {i})."
            fh.write(json.dumps({"id": f"r{i}", "prompt": prompt}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 10_000, 1_000_000, 10_000])
    parser.add_argument("--child", nargs=3, metavar=("URL", "CORPUS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    url, stub = start_stub()
    results = []
    try:
        for n in args.rows:
            with tempfile.TemporaryDirectory(prefix="synthq-1m-") as work:
                corpus = Path(work) / "corpus.jsonl"
                write_corpus(corpus, n)
                command = [sys.executable, __file__, "--child", url, str(corpus), work]
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
            if figures["rows"] != n or figures["errors"]:
                raise SystemExit(f"{n} rows: {figures}")
            results.append(figures)
            print(
                f"{n:>9,} rows: {figures['rows_s']:7,.0f} rows/s, peak RSS {figures['peak_mb']:,.0f} MB "
                f"({figures['seconds']:.0f} s)",
                flush=True,
            )
    finally:
        stub.terminate()
    if len(results) > 1:
        large = max(results, key=lambda r: r["rows"])
        small = [r for r in results if r["rows"] < large["rows"]]
        rate = sum(r["rows_s"] for r in small) / len(small)
        peak = max(r["peak_mb"] for r in small)
        print(
            f"rows/s {large['rows']:,} ÷ {small[0]['rows']:,} (mean of {len(small)}): {large['rows_s'] / rate:.2f} "
            f"(target within 0.90-1.10); peak RSS {large['peak_mb']:,.0f} MB (target < 1,024 MB), "
            f"×{large['peak_mb'] / peak:.2f} of the small run's"
        )


if __name__ == "__main__":
    main()
