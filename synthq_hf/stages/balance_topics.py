"""Topic balancing (a global stage: ``Dataset -> (kept, rejected)``): keep ``target_size`` rows spread evenly
over topics, the best-scored rows of each topic first.

Input columns: ``embedding`` (list of float32, from :mod:`synthq_hf.stages.embed`), ``prompt`` (str, for the
topic labels), ``total_score`` (int or ``None``, from ``score_instruction``; optional). All names configurable.
Output: ``kept`` and ``rejected``, both with ``topic`` (int) and ``topic_label`` (str: the topic's top words);
``rejected`` also has ``rejected_by`` = ``"balance_topics"`` and ``reason``: ``"balance"`` (not selected) or
``"no embedding"`` (a row without a vector has no topic and cannot be balanced; ``topic`` is then ``None``).
Both keep input order. ``kept.num_rows + rejected.num_rows == ds.num_rows`` always.

How (DESIGN §4, REFERENCE "BERTopic at scale"):

* **Topics**: BERTopic fitted on a seeded sample (``sample_size``, default 200k rows) with the precomputed
  embeddings and a light configuration: PCA (``pca_components`` dims) instead of UMAP, MiniBatchKMeans
  (``n_topics`` clusters; full k-means for small samples, see ``LLOYD_BUDGET``) instead of HDBSCAN, no
  probabilities. Measured on 3k MiniLM-embedded texts: UMAP+HDBSCAN
  11-22 s, IncrementalPCA+MiniBatchKMeans 1-4 s. k-means also assigns every row (HDBSCAN leaves outliers, and a
  topic -1 of "everything else" defeats balancing) and lets the caller choose the number of topics. Plain PCA, not
  IncrementalPCA: the sample is in memory anyway and PCA fits it in one pass. 32 components: on 1M synthetic rows in
  200 planted clusters (``scripts/bench/balance.py``) the topics' adjusted Rand index was 0.52 at 8 components,
  0.86 at 32 and 0.88 at 64, at about the same time (k-means is linear in the dimensions; the run is dominated by
  reading vectors). Every row is then assigned with ``BERTopic.transform`` in chunks of ``chunk_size`` rows (a PCA
  matmul and a nearest-centroid search), so memory stays bounded: the sample's vectors plus one chunk's, never a
  Python list of vectors.
* **Labels**: BERTopic's c-TF-IDF over the sample's prompts, English stop words removed; ``topic_label`` is the
  top ``label_words`` words joined by ", ". ``min_df`` stays 1 on purpose: BERTopic fits the vectorizer on one
  joined document *per topic*, so ``min_df=2`` would drop exactly the words unique to one topic. Words frequent in
  every topic are damped with c-TF-IDF's ``reduce_frequent_words``.
* **Selection**: round-robin over topics; within a topic the highest ``score_column`` first (ties: input order).
  Round ``r`` takes the ``r``-th best row of every topic that still has one, and inside the last, partial round
  the higher-scored candidates win. A row with no score counts as the lowest (logged, with the count).
* **Memory**: at 1M rows × 384-d the call peaks at ~3.4 GB RSS, ~1.5 GB of it the memory-mapped vectors it reads
  (``scripts/bench/balance.py``). The output columns are added with ``add_column``, which first flattens an
  indices mapping (a dataset fresh from ``select``/``filter``/``shuffle``): one copy of the input, written to the
  cache folder when the dataset has files there.
* **Too few rows**: the number of topics shrinks to ``max(1, min(n_topics, rows // min_topic_size))`` (logged);
  ``target_size >= rows`` keeps every row that has a vector, still labelled with its topic.

:func:`topic_sizes` and :func:`diversity` give the card its topic-size plot data and a diversity figure.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Value

from synthq_hf.stages._common import ColumnError
from synthq_hf.stages._step import Step
from synthq_hf.stages.embed import arrow_matrix, embed_dataset, embedding_matrix

if TYPE_CHECKING:
    from bertopic import BERTopic

STAGE = "balance_topics"
#: The words of every document in a fit whose prompts leave none (never shown in a label). Two, because BERTopic's
#: c-TF-IDF fails on a one-word vocabulary (a scalar where scipy's ``diags`` wants a sequence).
NO_WORDS = ("nowords", "nolabel")
#: Up to this many (sample rows × topics), cluster with full k-means (Lloyd, 10 initialisations), above it with
#: MiniBatchKMeans. Measured: on the 80 domain prompts of the tests (MiniLM, 4 topics, 20 seeds) MiniBatchKMeans
#: found the domains with an adjusted Rand index of 0.76 on average (worst 0.45), k-means 0.91 (worst 0.80); on a
#: 200k-row sample of 200 synthetic clusters MiniBatchKMeans took 3.2 s (ARI 0.84), k-means 13 s with one
#: initialisation (0.82) and 38 s with three (0.86). 2M is ~20k rows at 100 topics: seconds of Lloyd iterations.
LLOYD_BUDGET = 2_000_000
log = logging.getLogger(__name__)


def fit_topics(
    docs: list[str],
    embeddings: np.ndarray,
    n_topics: int,
    seed: int = 0,
    pca_components: int = 32,
) -> BERTopic:
    """BERTopic with the light configuration (see the module docstring), fitted on ``docs``/``embeddings``.

    Prompts that leave no words (empty, or only stop words) still get topics: the labels then fall back to
    "topic N" (logged) rather than the run failing on scikit-learn's "empty vocabulary".
    """
    try:
        from bertopic import BERTopic
        from bertopic.vectorizers import ClassTfidfTransformer
    except ImportError as err:
        raise ImportError("balance_topics needs `pip install torch==2.13.0 bertopic`") from err
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.feature_extraction.text import CountVectorizer

    if len(docs) * n_topics <= LLOYD_BUDGET:
        cluster = KMeans(n_clusters=n_topics, n_init=10, random_state=seed)
    else:
        cluster = MiniBatchKMeans(n_clusters=n_topics, n_init=3, batch_size=4096, random_state=seed)

    def model(vectorizer: CountVectorizer) -> BERTopic:
        return BERTopic(
            umap_model=PCA(n_components=max(1, min(pca_components, embeddings.shape[1], len(docs))), random_state=seed),
            hdbscan_model=cluster,
            vectorizer_model=vectorizer,
            ctfidf_model=ClassTfidfTransformer(reduce_frequent_words=True),
            calculate_probabilities=False,
            low_memory=True,
            verbose=False,
        )

    try:
        return model(CountVectorizer(stop_words="english")).fit(docs, embeddings=embeddings)
    except (ValueError, TypeError) as err:
        # No words at all ("empty vocabulary"), or exactly one distinct word, on which c-TF-IDF fails (scipy's
        # diags gets a scalar: "object of type 'numpy.float64' has no len()").
        if "empty vocabulary" not in str(err) and "has no len" not in str(err):
            raise
        log.warning("%s: the prompts leave too few words for topic labels; labelling topics 'topic N'", STAGE)
        return model(CountVectorizer()).fit([" ".join(NO_WORDS)] * len(docs), embeddings=embeddings)


def balance_topics(
    ds: Dataset,
    target_size: int,
    n_topics: int = 100,
    sample_size: int = 200_000,
    embedding_column: str = "embedding",
    text_column: str = "prompt",
    score_column: str = "total_score",
    seed: int = 0,
    min_topic_size: int = 10,
    pca_components: int = 32,
    label_words: int = 4,
    chunk_size: int = 65_536,
) -> tuple[Dataset, Dataset]:
    """(kept, rejected): ``target_size`` rows balanced over ``n_topics`` topics; see the module docstring."""
    for column in (embedding_column, text_column):
        if column not in ds.column_names:
            raise ColumnError(f"{STAGE} needs an input column {column!r}; the dataset has {ds.column_names}")
    for column in ("rejected_by", "reason"):
        if column in ds.column_names:
            raise ColumnError(f"{STAGE}: the dataset already has {column!r}; split off the rejected rows first")
    stale = [column for column in ("topic", "topic_label") if column in ds.column_names]
    if stale:
        log.info("%s: replacing the existing columns %s", STAGE, stale)
        ds = ds.remove_columns(stale)

    vectors = ds.select_columns([embedding_column]).with_format("arrow")[:][embedding_column]
    has_vector = pc.is_valid(vectors).to_numpy(zero_copy_only=False)
    del vectors
    valid = np.flatnonzero(has_vector)
    if len(valid) < ds.num_rows:
        log.warning(
            "%s: %d rows have no %s; rejected as 'no embedding'", STAGE, ds.num_rows - len(valid), embedding_column
        )

    topics = np.full(ds.num_rows, -1, dtype=np.int64)
    labels: dict[int, str] = {}
    if len(valid):
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(valid, size=min(sample_size, len(valid)), replace=False))
        k = max(1, min(n_topics, len(sample) // max(1, min_topic_size)))
        if k < n_topics:
            log.warning(
                "%s: %d rows are too few for %d topics of at least %d rows (min_topic_size); using %d topics",
                *(STAGE, len(sample), n_topics, min_topic_size, k),
            )
        sample_vectors = embedding_matrix(ds, embedding_column, sample)
        model = fit_topics(_texts(ds, text_column, sample), sample_vectors, k, seed, pca_components)
        del sample_vectors  # before the chunks of the transform
        labels = {topic: _label(words, label_words, topic) for topic, words in model.get_topics().items()}
        _assign(model, ds, embedding_column, text_column, valid, topics, chunk_size)

    keep = _select(ds, score_column, topics, valid, target_size)
    kept_idx = np.flatnonzero(keep)
    log.info("%s: keeping %d of %d rows over %d topics", STAGE, len(kept_idx), ds.num_rows, len(labels))

    label_names = pa.array([labels.get(t, "") for t in range(max(labels, default=-1) + 1)], pa.string())
    topic_col = pa.array(topics, pa.int64(), mask=~has_vector)
    full = ds.add_column("topic", topic_col, feature=Value("int64"))
    full = full.add_column("topic_label", pc.take(label_names, topic_col), feature=Value("string"))
    full = full.add_column("rejected_by", pa.array(np.where(keep, None, STAGE), pa.string()), feature=Value("string"))
    reason = np.where(keep, None, np.where(has_vector, "balance", "no embedding"))
    full = full.add_column("reason", pa.array(reason, pa.string()), feature=Value("string"))
    kept = full.select(kept_idx).remove_columns(["rejected_by", "reason"])
    rejected = full.select(np.flatnonzero(~keep))
    return kept, rejected


def _label(words: list[tuple[str, float]], count: int, topic: int) -> str:
    """The topic's top ``count`` words joined by ", " ("topic N" when it has none)."""
    return ", ".join(word for word, _ in words[:count] if word and word not in NO_WORDS) or f"topic {topic}"


def _texts(ds: Dataset, column: str, indices: np.ndarray) -> list[str]:
    """The ``column`` strings of rows ``indices`` (``None`` as ``""``), for BERTopic's documents."""
    values = ds.select_columns([column]).select(indices).with_format("arrow")[:][column]
    return [text or "" for text in values.to_pylist()]


def _assign(
    model: BERTopic,
    ds: Dataset,
    embedding_column: str,
    text_column: str,
    valid: np.ndarray,
    topics: np.ndarray,
    chunk_size: int,
) -> None:
    """Write every valid row's topic into ``topics``: ``model.transform`` chunk by chunk."""
    columns = ds.select_columns([embedding_column, text_column])
    for start in range(0, len(valid), chunk_size):
        rows = valid[start : start + chunk_size]
        if rows[-1] - rows[0] + 1 == len(rows):  # a contiguous range: a zero-copy slice, no gather
            chunk = columns.with_format("arrow")[int(rows[0]) : int(rows[-1]) + 1]
        else:
            chunk = columns.select(rows).with_format("arrow")[:]
        texts = [text or "" for text in chunk[text_column].to_pylist()]
        predicted, _ = model.transform(texts, embeddings=arrow_matrix(chunk[embedding_column], embedding_column))
        topics[rows] = predicted


def _select(ds: Dataset, score_column: str, topics: np.ndarray, valid: np.ndarray, target_size: int) -> np.ndarray:
    """Boolean mask of the kept rows: round-robin over topics, best score first (see the module docstring)."""
    keep = np.zeros(ds.num_rows, dtype=bool)
    if target_size >= len(valid):
        keep[valid] = True
        return keep
    if target_size <= 0:
        return keep
    if score_column in ds.column_names:
        column = ds.select_columns([score_column]).with_format("arrow")[:][score_column]
        try:
            scores = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)[valid]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ColumnError(f"{STAGE}: column {score_column!r} must hold numbers ({err})") from err
        missing = int(np.isnan(scores).sum())
        if missing:
            log.warning(
                "%s: %d of %d rows have no %s; they count as the lowest", STAGE, missing, len(valid), score_column
            )
        scores = np.where(np.isnan(scores), -math.inf, scores)
    else:
        log.warning(
            "%s: no %s column; every row counts as the lowest (input order within a topic)", STAGE, score_column
        )
        scores = np.zeros(len(valid))
    topic = topics[valid]
    by_topic = np.lexsort((valid, -scores, topic))  # topic, then best score, then input order
    sorted_topic = topic[by_topic]
    starts = np.flatnonzero(np.r_[True, sorted_topic[1:] != sorted_topic[:-1]])
    rank = np.arange(len(valid)) - np.repeat(starts, np.diff(np.r_[starts, len(valid)]))
    rounds = np.lexsort((valid[by_topic], sorted_topic, -scores[by_topic], rank))  # round, best score, topic, order
    keep[valid[by_topic[rounds[:target_size]]]] = True
    return keep


def topic_sizes(kept: Dataset, rejected: Dataset) -> list[dict[str, Any]]:
    """Plot data for the card: one row per topic, ``topic``, ``label``, ``kept`` and ``all`` row counts.

    Read back from the output columns, so it describes exactly what was written; rows without a topic are left
    out. Sorted by ``all``, largest first.
    """
    sizes: dict[int, dict[str, Any]] = {}
    for name, part in (("kept", kept), ("rejected", rejected)):
        table = part.select_columns(["topic", "topic_label"]).with_format("arrow")[:]
        counts = (
            table.filter(pc.is_valid(table["topic"])).group_by(["topic", "topic_label"]).aggregate([([], "count_all")])
        )
        for topic, label, count in zip(
            *(counts[c].to_pylist() for c in ("topic", "topic_label", "count_all")), strict=True
        ):
            entry = sizes.setdefault(topic, {"topic": topic, "label": label, "kept": 0, "all": 0})
            entry["all"] += count
            if name == "kept":
                entry["kept"] += count
    return sorted(sizes.values(), key=lambda entry: (-entry["all"], entry["topic"]))


def diversity(
    embeddings: np.ndarray | Dataset, sample: int = 10_000, seed: int = 0, column: str = "embedding"
) -> dict[str, float]:
    """A diversity figure for the card: mean pairwise cosine distance and the Vendi score of a sample of vectors.

    ``embeddings``: a ``(rows, dim)`` array, or a dataset whose ``column`` holds vectors (rows without one are
    skipped). Both figures come in closed form from the unit vectors ``X`` (n rows), never an n×n matrix:

    * mean pairwise cosine distance = 1 - (‖Σx‖² - n) / (n(n-1)), the mean over distinct pairs (0: identical
      prompts; ~1: unrelated ones);
    * Vendi score (Friedman & Dieng, 2023) with the cosine kernel = exp(entropy of the eigenvalues of XᵀX/n), which
      are those of K/n: the "effective number of distinct prompts", at most ``dim``.
    """
    rng = np.random.default_rng(seed)
    if isinstance(embeddings, Dataset):
        vectors = embeddings.select_columns([column]).with_format("arrow")[:][column]
        rows = np.flatnonzero(pc.is_valid(vectors).to_numpy(zero_copy_only=False))
        del vectors
        if len(rows) > sample:
            rows = np.sort(rng.choice(rows, size=sample, replace=False))
        matrix = embedding_matrix(embeddings, column, rows) if len(rows) else np.zeros((0, 0), np.float32)
    else:
        matrix = np.asarray(embeddings)
        if len(matrix) > sample:
            matrix = matrix[np.sort(rng.choice(len(matrix), size=sample, replace=False))]
    x = matrix.astype(np.float64)
    norms = np.linalg.norm(x, axis=1) if x.size else np.zeros(0)
    x = x[norms > 0] / norms[norms > 0, None]
    n = len(x)
    if n < 2:
        return {"rows": float(n), "mean_cosine_distance": 0.0, "vendi_score": float(n)}
    total = x.sum(axis=0)
    mean_similarity = (float(total @ total) - n) / (n * (n - 1))
    eigenvalues = np.clip(np.linalg.eigvalsh(x.T @ x / n), 0, None)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    vendi = float(np.exp(-(eigenvalues * np.log(eigenvalues)).sum()))
    return {"rows": float(n), "mean_cosine_distance": 1.0 - mean_similarity, "vendi_score": vendi}


def embed_and_balance(
    ds: Dataset,
    target_size: int,
    n_topics: int = 100,
    sample_size: int = 200_000,
    seed: int = 0,
    model: str | None = None,
    embed_batch_size: int = 256,
    num_proc: int | None = None,
) -> tuple[Dataset, Dataset, dict[str, float]]:
    """The recipe's ``balance_topics`` line: embed the prompts (packaged MiniLM unless ``model`` names another
    sentence-transformers folder), then select ``target_size`` rows round-robin over BERTopic topics.

    The embeddings are not written to the output (1.5 KB a row); what comes back besides the two splits is the
    diversity of the kept rows against all rows, for the run report and card. Needs the ``topics`` extra.
    """
    if "embedding" not in ds.column_names:
        ds = embed_dataset(ds, batch_size=embed_batch_size, num_proc=num_proc, model=model)
    kept, rejected = balance_topics(ds, target_size, n_topics=n_topics, sample_size=sample_size, seed=seed)
    stats = {
        f"{metric} ({name})": value
        for name, part in (("kept", kept), ("before balancing", ds))
        for metric, value in diversity(part, seed=seed).items()
    }
    return kept, rejected, stats


#: Columns every row of the config carries once this stage is in the recipe (rows it keeps get them filled).
FEATURES = Features({"topic": Value("int64"), "topic_label": Value("string")})
STEPS = [Step(name=STAGE, kind="global", fn=embed_and_balance, features=FEATURES)]

__all__ = ["balance_topics", "diversity", "embed_and_balance", "fit_topics", "topic_sizes"]
