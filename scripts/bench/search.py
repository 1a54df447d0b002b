"""How fast is the local BM25 index at corpus scale? (benchmark, not a test)

Generates ``--docs`` deterministic pseudo-text documents (words made of syllables, drawn from a Zipf-like
distribution so that term statistics resemble real text; 40–300 words each), builds the index with
``synthq_hf.search.build_index`` from a *streaming* ``datasets`` JSONL source (the path users take), then runs
``--queries`` keyword queries (3–5 words taken from random generated documents, like the keyword stage's output)
and prints:

  build     seconds for generate+build (the JSONL is written first and not counted), index size on disk
  search    queries/s through ``Bm25Index.search_many`` (all cores) and single-query latency
  memory    peak RSS of this process (``resource.getrusage``)

``--compare-bm25s`` also indexes the same documents with bm25s (in memory, its numpy backend) and queries it,
the figures behind choosing tantivy (DESIGN §5).

    .venv/bin/python scripts/bench/search.py --docs 1000000

Measured (2 cores shared with other work, load average 5-6): 1M docs, 1.28 GB JSONL → build 269 s wall (164 s
CPU), 849 MB on disk, peak RSS 1.0 GB; search_many 495 queries/s wall, 1.94 ms CPU per query (≈1,030 queries/s
on 2 idle cores); one thread 1.70 ms CPU per query; Dataset.map(search_documents) 457 rows/s. 100k docs with
--compare-bm25s: tantivy 12 s / 1,615 q/s; bm25s 29 s / 200 q/s, +0.8 GB RSS.

Search figures read the first hit's text per query, as the stage does (hits load stored fields lazily since the
change that measured this; before, all 10 were read). 1M docs, load average 4.6-4.9 on the 2 cores: one thread
340 q/s, 1.76 ms CPU/query; search_many 423 q/s wall, 1.81 ms CPU/query (≈1,106 q/s on 2 idle cores);
Dataset.map 282 rows/s. Same run of 2,000 queries, alternating: eager 10-hit fetch 1.98-2.06 ms CPU/query, lazy
1.72 ms (-15%). The rest is scoring: tantivy-py scores every matching document (no block-max WAND), ~15 ns per
posting, and the most frequent query term holds ~2/3 of the postings. Tried and not kept, on 3,000 of these
queries: keep the 3 (2) rarest terms: 0.79 (0.28) ms but top-1 agreement 89% (58%); drop the most frequent of
4-5 terms: 0.88 ms, 93%; exact MaxScore in Python (one query per term, rarest first, Must/MustNot, stop when the
k-th score beats the remaining terms' BM25 bound idf·(k1+1)): identical results, but 2.9 queries per search at
k=10 (2.08 ms) and 2.1 at k=1 (0.98 ms vs 1.18-1.5), since that bound is loose; a union of Should terms beside a
Must term scans them anyway. ≥ 1,000 q/s *wall* on 2 loaded cores needs block-max WAND upstream in tantivy-py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB_SIZE = 50_000
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "er")]


def vocabulary(size: int, seed: int = 0) -> list[str]:
    """``size`` distinct pseudo-words of 1–4 syllables, deterministic for ``seed``."""
    rng = random.Random(seed)
    words: set[str] = set()
    ordered: list[str] = []
    while len(ordered) < size:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if word not in words:
            words.add(word)
            ordered.append(word)
    return ordered


def iter_docs(docs: int, seed: int = 0, vocab_size: int = VOCAB_SIZE, chunk: int = 10_000):
    """Yield ``docs`` pseudo-text documents; word ranks follow a Zipf(1.1) law over the vocabulary."""
    vocab = vocabulary(vocab_size, seed)
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.1)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    for start in range(0, docs, chunk):
        n = min(chunk, docs - start)
        lengths = rng.integers(40, 300, size=n)
        words = np.searchsorted(cdf, rng.random(int(lengths.sum()))).tolist()
        pos = 0
        for length in lengths.tolist():
            yield " ".join([vocab[w] for w in words[pos : pos + length]])
            pos += length


def write_corpus(path: Path, docs: int, seed: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for number, text in enumerate(iter_docs(docs, seed)):
            fh.write(json.dumps({"id": f"doc-{number}", "text": text, "url": f"https://example.org/{number}"}) + "\n")


def make_queries(corpus: Path, count: int, seed: int, skip_top: int = 100) -> list[str]:
    """3–5 distinct words of randomly chosen documents, leaving out the ``skip_top`` most frequent words.

    Like the keyword stage's output: content words, not "the of and". (With Zipf(1.1) over 50k words the top
    100 cover about half of all tokens, as the top 100 English words do.)
    """
    common = set(vocabulary(VOCAB_SIZE, seed)[:skip_top])
    rng = random.Random(seed + 1)
    with corpus.open(encoding="utf-8") as fh:
        total = sum(1 for _ in fh)
    wanted = set(rng.sample(range(total), count))
    queries = []
    with corpus.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if number in wanted:
                words = sorted(set(json.loads(line)["text"].split()) - common)
                queries.append(" ".join(rng.sample(words, min(len(words), rng.randint(3, 5)))))
    rng.shuffle(queries)
    return queries


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def timed(fn):
    """(result, wall seconds, CPU seconds of this process: all threads). CPU time is the steadier figure on a
    shared machine; ``cores / cpu_per_query`` is what the same cores would do if nobody else used them."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def first_text(hits) -> str | None:
    """What the stage reads of a result, usually: the first hit's text (the others load only if it is rejected)."""
    return hits[0].text if hits else None


def bench_synthq(corpus: Path, queries: list[str], workdir: Path, skip_build: bool) -> None:
    from datasets import Dataset

    from synthq_hf.search import build_index, load_index
    from synthq_hf.stages.search_documents import search_documents

    out = workdir / "index"
    if not skip_build:
        shutil.rmtree(out, ignore_errors=True)
        _, wall, cpu = timed(lambda: build_index(str(corpus), out=out, progress=False))
        print(
            f"build: {wall:.1f} s wall ({cpu:.0f} s CPU), {folder_mb(out):.0f} MB on disk, "
            f"peak RSS {peak_rss_mb():.0f} MB"
        )

    cores = os.cpu_count() or 1
    index = load_index(out)
    index.search_sync(queries[0], 10)
    single = queries[:2000]
    _, wall, cpu = timed(lambda: [first_text(index.search_sync(q, 10)) for q in single])
    print(
        f"one thread: {len(single) / wall:,.0f} queries/s, {cpu / len(single) * 1000:.2f} ms CPU per query "
        f"(k=10, first hit's text read), load average {os.getloadavg()[0]:.1f}"
    )
    results, wall, cpu = timed(lambda: index.search_many(queries, 10))
    assert sum(1 for hits in results if hits) > 0.99 * len(queries), "queries taken from documents must match"
    _, fetch_wall, fetch_cpu = timed(lambda: [first_text(hits) for hits in results])
    wall, cpu = wall + fetch_wall, cpu + fetch_cpu
    print(
        f"search_many ({cores} threads): {len(queries) / wall:,.0f} queries/s wall, "
        f"{cpu / len(queries) * 1000:.2f} ms CPU per query -> {cores * len(queries) / cpu:,.0f} queries/s on "
        f"{cores} idle cores (k=10, first hit's text read), load average {os.getloadavg()[0]:.1f}"
    )
    rows = Dataset.from_dict({"query": single})
    _, wall, cpu = timed(lambda: rows.map(search_documents, fn_kwargs={"index": str(out)}, load_from_cache_file=False))
    print(f"Dataset.map(search_documents): {len(single) / wall:,.0f} rows/s, {cpu / len(single) * 1000:.2f} ms CPU/row")


def bench_bm25s(corpus: Path, queries: list[str]) -> None:
    import bm25s

    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]

    def build():
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return retriever

    retriever, wall, cpu = timed(build)
    print(f"bm25s build: {wall:.1f} s wall ({cpu:.0f} s CPU; in memory), peak RSS {peak_rss_mb():.0f} MB")
    cores = os.cpu_count() or 1
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    _, wall, cpu = timed(lambda: retriever.retrieve(tokens, k=10, n_threads=cores, show_progress=False))
    print(
        f"bm25s retrieve: {len(queries) / wall:,.0f} queries/s wall, {cpu / len(queries) * 1000:.2f} ms CPU per query "
        "(k=10, ids only)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-bm25s", action="store_true", help="also build and query bm25s on the same docs")
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder, removed at the end)")
    parser.add_argument("--skip-build", action="store_true", help="query the index already in --workdir")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="synthq-bench-search-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.jsonl"
    try:
        started = time.perf_counter()
        if not (args.skip_build and corpus.exists()):
            write_corpus(corpus, args.docs, args.seed)
        queries = make_queries(corpus, args.queries, args.seed)
        print(
            f"corpus: {args.docs:,} docs, {corpus.stat().st_size / 1e6:.0f} MB JSONL, {len(queries):,} queries "
            f"(generated in {time.perf_counter() - started:.1f} s; {os.cpu_count()} cores)"
        )
        bench_synthq(corpus, queries, workdir, args.skip_build)
        if args.compare_bm25s:  # in a child process, so that each peak RSS is its own
            child = multiprocessing.get_context("spawn").Process(target=bench_bm25s, args=(corpus, queries))
            child.start()
            child.join()
        print(f"peak RSS: {peak_rss_mb():.0f} MB")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
