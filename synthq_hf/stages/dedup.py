"""Exact and near-duplicate removal over a whole dataset (a global stage: ``Dataset -> (kept, rejected)``).

Input columns: ``prompt`` (str, configurable); optional ``total_score`` (decides which duplicate stays) and ``id``.
Output: ``kept`` (the input rows that survive, input order, columns unchanged) and ``rejected`` (every other input
row, input order, plus ``rejected_by`` = ``"dedup"``, ``reason`` and ``duplicate_of``, the id of the kept row it
duplicates). ``kept.num_rows + rejected.num_rows == ds.num_rows`` always: nothing is lost, nothing is silent.

How:

* **Exact duplicates**: equal :func:`normalize` text. Normalisation casefolds, applies NFKC (full-width and
  compatibility forms fold onto plain ones), replaces Unicode punctuation with spaces and collapses whitespace:
  LLM-written copies of one prompt differ in quote styles, trailing ``?``/``.``, list markers and line breaks, none
  of which makes a different instruction. Symbols (``+ = < $``) are kept: in maths and code they do. Text that is
  nothing *but* punctuation keeps it (``"???"`` is not a duplicate of ``"!!!"``).
* **Near duplicates**: MinHash over **character 5-grams** of the normalised text, LSH banding, then each candidate
  pair is checked against the full signature (estimated Jaccard >= ``threshold``). Characters, not words, because
  prompts are short: one edited word removes ``ngram`` word shingles, so at 0.85 a 40-word prompt would tolerate no
  edit at all and near-dedup would collapse into exact match; a character shingle spreads the same edit over
  ``len(word) + ngram - 1`` shingles of a few hundred. Characters also work for scripts without spaces (CJK).
  Texts shorter than ``ngram`` characters take part in the exact pass only.
* **Which row stays**: the highest ``total_score`` in the cluster; a missing or ``None`` score counts as the
  lowest (logged); ties go to the first occurrence. Clustering is greedy in that priority order (the best unassigned
  row claims every unassigned row within ``threshold`` of it), so every rejected row is itself within the threshold
  of the row named in ``duplicate_of``, never only linked to it through a chain of neighbours.
* **Empty prompts** (``None``, ``""``, whitespace only) are rejected with reason ``"empty prompt"``: they cannot be
  compared, and passing them on would hide them among real rows; in ``rejected`` they are counted and visible.

Scale: signatures are computed in ``Dataset.map(batched=True)`` (``num_proc`` optional) with numpy-vectorised
shingle hashing, identical to datasketch's ``affine32`` MinHash fed the same shingle hashes (tested), and only
``b`` band hashes plus a 128-bit exact key per row leave the map (~100 bytes/row). Signatures are recomputed for
the rows that share an LSH bucket with another row, the only ones that need verifying. datasketch's own
``MinHashLSH`` index keeps Python objects per row and band (gigabytes at a million rows), so banding is done on
numpy arrays; datasketch still chooses ``b`` and ``r`` and generates the permutations. Known limit: a very large
bucket of rows that collide but are *not* near duplicates (a long shared boilerplate) is verified pairwise.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value

from synthq_hf.stages._common import ColumnError, row_id
from synthq_hf.stages._step import Step

STAGE = "dedup"
log = logging.getLogger(__name__)

#: datasketch's (false positive, false negative) weights for choosing bands and rows. Every candidate pair is
#: verified afterwards, so a false positive costs only a comparison while a false negative loses a duplicate:
#: (0.1, 0.9) gives b=11, r=11 at 0.85/128, i.e. a pair at J=0.85 becomes a candidate with p≈0.87, at J=0.9 p≈0.98.
LSH_WEIGHTS = (0.1, 0.9)
#: Shingles per chunk of the (shingles × num_perm) product: bounds the map's working memory (~8 MB at 128 perms).
_CHUNK_SHINGLES = 16_384
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: the rolling-hash multiplier for shingles and bands

EMPTY, EXACT_ONLY, FULL = 0, 1, 2  # per-row kind: no text / shorter than one shingle / takes part in both passes


class _Punctuation(dict):
    """``str.translate`` table: Unicode punctuation (category P*) → space, filled per code point on first sight.

    Filled lazily because classifying all 1.1M code points up front costs a second and a half per process.
    """

    def __missing__(self, point: int) -> str:
        char = chr(point)
        self[point] = value = " " if unicodedata.category(char).startswith("P") else char
        return value


_PUNCTUATION = _Punctuation()


def normalize(text: str) -> str:
    """NFKC, casefold, Unicode punctuation → space, whitespace collapsed (see the module docstring for why).

    Text that is nothing but punctuation keeps it, so that ``"???"`` and ``"!!!"`` stay different.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    stripped = " ".join(folded.translate(_PUNCTUATION).split())
    return stripped or " ".join(folded.split())


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: what datasketch's ``affine32`` scheme applies to each input hash."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character ``ngram``-gram of each (normalised) text, and the text each belongs to.

    One rolling polynomial hash over the code points of the whole batch; windows that cross a text boundary
    are dropped. Vectorised because per-shingle Python hashing (datasketch's default sha1) costs ~1 µs a shingle.
    """
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    points = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    windows = len(points) - ngram + 1
    if windows <= 0:
        return np.empty(0, np.uint32), np.empty(0, np.int64)
    h = np.zeros(windows, dtype=np.uint64)
    for k in range(ngram):
        h = h * _POLY + points[k : k + windows]
    owner = np.repeat(np.arange(len(texts)), lengths)[:windows]
    ends = np.cumsum(lengths)
    valid = np.arange(windows) + ngram <= ends[owner]
    h = h[valid]
    return (h ^ (h >> np.uint64(32))).astype(np.uint32), owner[valid]


def signatures(texts: list[str], permutations: np.ndarray, ngram: int) -> np.ndarray:
    """MinHash signatures (len(texts) × num_perm, uint32) of normalised texts; all-max for texts with no shingle.

    Equal to ``datasketch.MinHash(scheme="affine32", hashfunc=int)`` updated with :func:`shingle_hashes`.
    """
    a, b = permutations[0][:, None], permutations[1][:, None]
    out = np.full((len(texts), len(a)), np.iinfo(np.uint32).max, dtype=np.uint32)
    hashes, owner = shingle_hashes(texts, ngram)
    hashes = _fmix32(hashes)
    buffer = np.empty((len(a), min(len(hashes), _CHUNK_SHINGLES)), dtype=np.uint32)
    for start in range(0, len(hashes), _CHUNK_SHINGLES):
        h, rows = hashes[start : start + _CHUNK_SHINGLES], owner[start : start + _CHUNK_SHINGLES]
        permuted = buffer[:, : len(h)]  # (num_perm × shingles): reduceat along the last axis is ~40× faster
        np.multiply(a, h, out=permuted)
        np.add(permuted, b, out=permuted)
        firsts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        mins = np.minimum.reduceat(permuted, firsts, axis=1).T
        out[rows[firsts]] = np.minimum(out[rows[firsts]], mins)
    return out


def _band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per LSH band: rows whose band hashes are equal become candidate pairs."""
    out = np.zeros((len(sig), bands), dtype=np.uint64)
    for band in range(bands):
        for col in range(band * rows, (band + 1) * rows):
            out[:, band] = out[:, band] * _POLY + sig[:, col].astype(np.uint64)
    return out


def _sketch_batch(
    batch: dict[str, list], column: str, permutations: np.ndarray, ngram: int, bands: int, rows: int
) -> dict[str, Any]:
    """``map`` function: per row its kind, a 128-bit exact key and the LSH band hashes (no signature kept)."""
    texts = [t if isinstance(t, str) else "" for t in batch[column]]
    norms = [normalize(t) if t.strip() else "" for t in texts]
    kinds = [EMPTY if not n else EXACT_ONLY if len(n) < ngram else FULL for n in norms]
    keys = np.frombuffer(b"".join(hashlib.blake2b(n.encode(), digest_size=16).digest() for n in norms), np.uint64)
    band_hashes = _band_hashes(signatures(norms, permutations, ngram), bands, rows)
    return {"_kind": kinds, "_k0": keys[0::2], "_k1": keys[1::2], "_bands": band_hashes}


def _check_text_column(ds: Dataset, column: str, stage: str) -> None:
    if not isinstance(ds, Dataset):
        raise TypeError(f"{stage} is a global stage: it needs a Dataset, got {type(ds).__name__}")
    if column not in ds.column_names:
        raise ColumnError(f"{stage} needs an input column {column!r}; the dataset has columns {ds.column_names}")
    feature = ds.features[column]
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ColumnError(f"{stage}: column {column!r} must hold strings, got {feature}")


def _priority(ds: Dataset, score_column: str | None) -> np.ndarray:
    """Each row's rank: 0 = the row a cluster keeps first (highest score, then earliest); missing score = lowest."""
    n = ds.num_rows
    if not score_column or score_column not in ds.column_names:
        log.info("dedup: no score column (%r); within a cluster the first occurrence is kept", score_column)
        return np.arange(n)
    scores = ds.select_columns([score_column]).with_format("arrow")[:].column(0)
    try:
        values = pc.fill_null(scores.cast(pa.float64()), -np.inf).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise ColumnError(f"{STAGE}: score column {score_column!r} must be numeric, got {scores.type}") from err
    missing = scores.null_count + int(np.isnan(values).sum())
    if missing:
        log.info("dedup: %d of %d rows have no %s; treated as the lowest score", missing, n, score_column)
    values = np.nan_to_num(values, nan=-np.inf)
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort((np.arange(n), -values))] = np.arange(n)
    return rank


def _exact_keepers(keys: np.ndarray, rank: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row in ``rows``, the row (same index space) that its exact-duplicate group keeps."""
    order = rows[np.lexsort((rank[rows], keys[rows, 1], keys[rows, 0]))]
    k = keys[order]
    starts = np.r_[True, (k[1:] != k[:-1]).any(axis=1)]
    keeper = np.full(len(keys), -1, dtype=np.int64)
    keeper[order] = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    return keeper


def _buckets(band_hashes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per band: (group id per row or -1 when alone, group start offsets, members sorted by group)."""
    out = []
    for band in range(band_hashes.shape[1]):
        values = band_hashes[:, band]
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        new = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
        group = np.cumsum(new) - 1
        sizes = np.bincount(group)
        shared = sizes[group] > 1
        members = order[shared]
        relabel = np.full(len(sizes), -1, dtype=np.int64)
        relabel[sizes > 1] = np.arange(int((sizes > 1).sum()))
        group_of = np.full(len(values), -1, dtype=np.int64)
        group_of[order] = relabel[group]
        starts = np.r_[0, np.cumsum(sizes[sizes > 1])]
        out.append((group_of, starts, members))
    return out


def _near_keepers(
    ds: Dataset,
    column: str,
    rows: np.ndarray,
    band_hashes: np.ndarray,
    rank: np.ndarray,
    permutations: np.ndarray,
    ngram: int,
    threshold: float,
) -> tuple[dict[int, tuple[int, float]], int]:
    """Greedy clustering of ``rows`` (dataset indices): {rejected row: (kept row, estimated Jaccard)}, candidates."""
    if len(rows) < 2:  # nothing to pair (e.g. exact dedup left one row with shingles)
        return {}, 0
    buckets = _buckets(band_hashes)
    candidate = np.zeros(len(rows), dtype=bool)
    for group_of, _, _ in buckets:
        candidate |= group_of >= 0
    local = np.flatnonzero(candidate)
    if not len(local):
        return {}, 0
    position = np.full(len(rows), -1, dtype=np.int64)  # row → its line in ``sig``: signatures of candidates only
    position[local] = np.arange(len(local))
    texts = ds.select_columns([column]).select(rows[local]).iter(batch_size=1000)
    sig = np.concatenate([signatures([normalize(t) for t in b[column]], permutations, ngram) for b in texts])
    assigned = np.zeros(len(rows), dtype=bool)
    found: dict[int, tuple[int, float]] = {}
    for i in local[np.argsort(rank[rows[local]], kind="stable")]:
        if assigned[i]:
            continue
        assigned[i] = True
        pools = [members[starts[g] : starts[g + 1]] for group_of, starts, members in buckets if (g := group_of[i]) >= 0]
        near = np.unique(np.concatenate(pools))
        near = near[~assigned[near]]
        if not len(near):
            continue
        similarity = (sig[position[near]] == sig[position[i]]).mean(axis=1)
        hit = similarity >= threshold
        assigned[near[hit]] = True
        for j, s in zip(near[hit], similarity[hit], strict=True):
            found[int(rows[j])] = (int(rows[i]), float(s))
    return found, len(local)


def _ids(ds: Dataset, column: str, indices: list[int]) -> dict[int, str]:
    """Row ids as :func:`row_id` gives them (the ``id`` column, else a hash of the text) for ``indices``."""
    cols = [column, "id"] if "id" in ds.column_names else [column]
    part = ds.select_columns(cols).select(indices)
    return {i: row_id(row, row[column]) for i, row in zip(indices, part, strict=True)}


def dedup(
    ds: Dataset,
    column: str = "prompt",
    threshold: float = 0.85,
    num_perm: int = 128,
    ngram: int = 5,
    score_column: str | None = "total_score",
    seed: int = 1,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into (kept, rejected): exact and near duplicates of ``column``; see the module docstring.

    ``threshold`` is the estimated Jaccard similarity of character ``ngram``-gram sets at or above which two rows
    are near duplicates; ``num_perm`` and ``seed`` define the MinHash; ``num_proc``/``batch_size`` go to the map
    that sketches the rows.
    """
    _check_text_column(ds, column, STAGE)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"{STAGE}: threshold must be in (0, 1], got {threshold}")
    from datasketch import MinHash, MinHashLSH  # imported here: it pulls in scipy (seconds), needed only to run

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    n_bands, n_rows = lsh.b, lsh.r
    features = Features(
        {
            "_kind": Value("int8"),
            "_k0": Value("uint64"),
            "_k1": Value("uint64"),
            "_bands": List(Value("uint64"), length=n_bands),
        }
    )
    sketch = ds.select_columns([column]).map(
        _sketch_batch,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=[column],
        features=features,
        fn_kwargs={"column": column, "permutations": permutations, "ngram": ngram, "bands": n_bands, "rows": n_rows},
        desc="dedup: sketching",
    )
    table = sketch.with_format("arrow")[:]
    kind = table.column("_kind").to_numpy()
    keys = np.stack([table.column("_k0").to_numpy(), table.column("_k1").to_numpy()], axis=1)
    rank = _priority(ds, score_column)

    texted = np.flatnonzero(kind != EMPTY)
    exact = _exact_keepers(keys, rank, texted)
    survivors = texted[exact[texted] == texted]
    near_rows = survivors[kind[survivors] == FULL]
    band_hashes = table.column("_bands").combine_chunks().flatten().to_numpy().reshape(-1, n_bands)[near_rows]
    del table
    near, n_candidates = _near_keepers(ds, column, near_rows, band_hashes, rank, permutations, ngram, threshold)

    # duplicate_of must name a kept row: an exact duplicate whose keeper was itself near-rejected points further on.
    exact_dups = texted[exact[texted] != texted]
    near_dups = np.fromiter(near, dtype=np.int64, count=len(near))
    rejected_idx = np.sort(np.concatenate([np.flatnonzero(kind == EMPTY), exact_dups, near_dups]))
    targets = set(np.unique(exact[exact_dups]).tolist()) | {k for k, _ in near.values()}
    targets |= {near[t][0] for t in targets if t in near}
    ids = _ids(ds, column, sorted(targets))
    reasons: list[str] = []
    duplicate_of: list[str | None] = []
    for i in rejected_idx.tolist():
        if kind[i] == EMPTY:
            reasons.append("empty prompt")
            duplicate_of.append(None)
        elif i in near:
            keeper, similarity = near[i]
            reasons.append(f"near duplicate (jaccard≈{similarity:.2f}) of {ids[keeper]}")
            duplicate_of.append(ids[keeper])
        elif (first := int(exact[i])) in near:
            keeper, similarity = near[first]
            reasons.append(
                f"exact duplicate of {ids[first]}, itself a near duplicate (jaccard≈{similarity:.2f}) of {ids[keeper]}"
            )
            duplicate_of.append(ids[keeper])
        else:
            reasons.append(f"exact duplicate of {ids[first]}")
            duplicate_of.append(ids[first])

    kept_mask = np.ones(ds.num_rows, dtype=bool)
    kept_mask[rejected_idx] = False
    kept = ds.select(np.flatnonzero(kept_mask))
    rejected = ds.select(rejected_idx)
    rejected = rejected.remove_columns([c for c in ("rejected_by", "reason", "duplicate_of") if c in ds.column_names])
    rejected = rejected.add_column("rejected_by", [STAGE] * len(rejected_idx))
    rejected = rejected.add_column("reason", reasons)
    rejected = rejected.add_column("duplicate_of", duplicate_of)
    n_exact = len(texted) - len(survivors)
    log.info(
        "dedup: %d rows → kept %d; rejected %d exact duplicates, %d near duplicates (%d LSH candidates verified), "
        "%d empty prompts",
        ds.num_rows,
        kept.num_rows,
        n_exact,
        len(near),
        n_candidates,
        int((kind == EMPTY).sum()),
    )
    return kept, rejected


#: The column rows it rejects get (the id of the row they repeat): in the config's one schema from the start.
STEPS = [Step(name=STAGE, kind="global", fn=dedup, features=Features({"duplicate_of": Value("string")}))]
