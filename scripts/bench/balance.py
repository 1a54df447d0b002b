"""balance_topics at scale, and the cost of embedding prompts with the packaged MiniLM on CPU (benchmark).

Part 1, topics: ``--rows`` synthetic instructions with precomputed, clustered embeddings: ``--clusters`` Gaussian
clusters in ``--dim`` dimensions (unit centres plus noise of the same norm, so a row's cosine to its own centre is
~0.7 and to other rows of its cluster ~0.5, roughly what MiniLM gives prompts on one topic), unit-normalised,
float32. Each row's prompt draws words from its cluster's own vocabulary and a shared one, so topic labels can be
checked. Scores are random 0-7 with 5 % ``None``. The dataset is written to disk and memory-mapped back (as
``load_from_disk`` gives it), the peak-RSS mark is reset, then ``balance_topics`` runs once. Printed: wall time,
peak RSS during the call (and RSS before it), the adjusted Rand index of the topics against the planted clusters,
kept rows per topic (min/max), the diversity of kept vs all rows.

Part 2, embedding: ``--embed-rows`` prompts (default 100k; the same generator, 15-40 words) through
``embed_dataset`` with the packaged all-MiniLM-L6-v2 on CPU, cache off. With fewer than 100k rows the 100k time
is printed as an extrapolation, labelled so.

    nice -n 10 .venv/bin/python scripts/bench/balance.py --rows 1000000 --embed-rows 10000
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
from datasets import Dataset, load_from_disk
from datasets.table import InMemoryTable

from synthq_hf.stages.balance_topics import balance_topics, diversity, topic_sizes
from synthq_hf.stages.embed import embed_dataset, load_model


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    """Peak RSS (VmHWM) since the last :func:`reset_peak`; ``getrusage``'s ``ru_maxrss`` is the same mark."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def reset_peak() -> None:
    """Reset VmHWM (Linux >= 4.0) so the peak is balance_topics', not the data generation's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_prompts(labels: np.ndarray, clusters: int, seed: int) -> list[str]:
    """Prompts of 15-40 words: half from the row's cluster vocabulary (8 words), half from a shared one."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ter", "su", "ran", "vo", "del", "pi", "nor", "ex", "ul"])
    topic_words = np.array(["".join(rng.choice(syllables, 3)) for _ in range(clusters * 8)], dtype=object).reshape(
        clusters, 8
    )
    shared = np.array(["explain", "how", "write", "function", "compare", "list", "steps", "example", "why", "best"])
    lengths = rng.integers(15, 41, len(labels))
    total = int(lengths.sum())
    owner = np.repeat(labels, lengths)
    own = topic_words[owner, rng.integers(0, 8, total)]
    words = np.where(rng.random(total) < 0.5, own, shared.astype(object)[rng.integers(0, len(shared), total)])
    ends = np.cumsum(lengths)
    return [" ".join(words[end - length : end]) for end, length in zip(ends, lengths, strict=True)]


def make_dataset(rows: int, clusters: int, dim: int, seed: int) -> tuple[Dataset, np.ndarray]:
    """The synthetic dataset (in memory, embeddings wrapped from numpy without a copy) and the planted clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.dirichlet(np.full(clusters, 2.0))  # uneven topics, as in real data
    labels = rng.choice(clusters, size=rows, p=sizes)
    vectors = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65_536):
        part = labels[start : start + 65_536]
        chunk = centres[part] + rng.normal(scale=1 / np.sqrt(dim), size=(len(part), dim)).astype(np.float32)
        vectors[start : start + len(part)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * dim)  # int32: fine up to 5.5M rows at 384-d
    embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))
    scores = rng.integers(0, 8, rows)
    table = pa.table(
        {
            "id": pa.array(np.arange(rows)),
            "prompt": pa.array(make_prompts(labels, clusters, seed)),
            "embedding": embedding,
            "total_score": pa.array(scores, mask=rng.random(rows) < 0.05),
        }
    )
    return Dataset(InMemoryTable(table)), labels


def bench_topics(args: argparse.Namespace) -> None:
    from sklearn.metrics import adjusted_rand_score

    start = time.perf_counter()
    ds, planted = make_dataset(args.rows, args.clusters, args.dim, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        ds.save_to_disk(folder)
        del ds
        ds = load_from_disk(folder)
        made = time.perf_counter() - start
        print(f"data: {args.rows:,} rows x {args.dim}-d, {args.clusters} clusters, made in {made:.0f} s")
        import bertopic  # noqa: F401  (import cost, ~10 s here, kept out of the timing)

        reset_peak()
        before = rss_mb()
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine)")
        start = time.perf_counter()
        kept, rejected = balance_topics(
            ds,
            args.target,
            n_topics=args.n_topics,
            sample_size=args.sample_size,
            seed=args.seed,
            pca_components=args.pca_components,
        )
        elapsed = time.perf_counter() - start
        peak = peak_mb()
        print(f"balance_topics: {elapsed:.1f} s ({args.rows / elapsed:,.0f} rows/s)")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the same mark, reset with VmHWM
        print(f"peak RSS during the call {peak:,.0f} MB (getrusage {maxrss:,.0f} MB); before it {before:,.0f} MB")
        print(f"kept {kept.num_rows:,}, rejected {rejected.num_rows:,}")

        topics = np.full(args.rows, -1)
        for part in (kept, rejected):
            table = part.select_columns(["id", "topic"]).with_format("arrow")[:]
            topics[table["id"].to_numpy()] = table["topic"].to_numpy()
        print(f"adjusted Rand index, topics vs planted clusters: {adjusted_rand_score(planted, topics):.3f}")
        sizes = topic_sizes(kept, rejected)
        per_topic = [entry["kept"] for entry in sizes]
        print(
            f"topics {len(sizes)}; kept per topic min {min(per_topic)} max {max(per_topic)}; "
            f"all per topic min {min(e['all'] for e in sizes)} max {max(e['all'] for e in sizes)}"
        )
        print("largest topics:", "; ".join(f"{e['topic']}: {e['label']} ({e['kept']}/{e['all']})" for e in sizes[:3]))
        print("diversity kept:", diversity(kept, seed=args.seed), "all:", diversity(ds, seed=args.seed))
        del kept, rejected, ds


def bench_embed(args: argparse.Namespace) -> None:
    rows = args.embed_rows
    prompts = make_prompts(np.random.default_rng(args.seed).integers(0, 50, rows), 50, args.seed)
    ds = Dataset.from_dict({"prompt": prompts})
    start = time.perf_counter()
    load_model(None)
    print(f"embed: model load {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    out = embed_dataset(ds, batch_size=256, cache=False)
    elapsed = time.perf_counter() - start
    assert out.num_rows == rows and out["embed_error"].count(None) == rows
    print(f"embed: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
    print(f"embed: {rows:,} prompts in {elapsed:.1f} s ({rows / elapsed:,.0f} rows/s, packaged MiniLM, CPU)")
    if rows < 100_000:
        print(f"embed: 100,000 prompts EXTRAPOLATED from {rows:,}: {elapsed * 100_000 / rows:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--target", type=int, default=100_000)
    parser.add_argument("--n-topics", type=int, default=200)
    parser.add_argument("--sample-size", type=int, default=200_000)
    parser.add_argument("--pca-components", type=int, default=32)
    parser.add_argument("--embed-rows", type=int, default=100_000, help="0 skips the embedding part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rows:
        bench_topics(args)
    if args.embed_rows:
        bench_embed(args)


if __name__ == "__main__":
    main()
