"""Topic balancing and embeddings: real MiniLM vectors, round-robin selection, fallbacks, a TEI stand-in server.

The domain test embeds 80 short prompts written for it (cooking, programming, astronomy, law) with the packaged
all-MiniLM-L6-v2 and checks that the topics found follow the domains. Selection tests compare the kept rows with a
plain-Python round-robin written here from the rule, on the topics ``balance_topics`` assigned. The endpoint tests
run a small HTTP server that speaks TEI's ``/info`` and ``/embed`` (and the OpenAI ``/v1/embeddings``) and embeds
with the same model: a stand-in for the server, not a mock of our code.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from datasets import Dataset, Features, List, Value

from synthq_hf.endpoint import EndpointConfig
from synthq_hf.stages.balance_topics import balance_topics, diversity, topic_sizes
from synthq_hf.stages.embed import FEATURES, embed_dataset, embedding_matrix, load_model

DOMAINS = {
    "cooking": [
        "How long should I knead bread dough by hand?",
        "What is the best way to caramelize onions without burning them?",
        "Give me a recipe for a vegetarian lasagna with spinach and ricotta.",
        "How do I keep a sourdough starter alive in the fridge?",
        "Why does my cake sink in the middle after baking?",
        "What temperature should I roast a whole chicken at?",
        "How can I make a creamy risotto without a lot of butter?",
        "Suggest a marinade for grilled salmon fillets.",
        "What spices go into a classic garam masala blend?",
        "How do I temper chocolate for dipping strawberries?",
        "Explain how to make fresh egg pasta from scratch.",
        "What can I substitute for buttermilk in pancakes?",
        "How do I properly season a cast iron skillet before cooking?",
        "Write a weekly meal plan of cheap dinners for a family of four.",
        "How long do hard boiled eggs need to simmer?",
        "What is the difference between baking soda and baking powder in cookies?",
        "How do I make a thick tomato sauce for pizza?",
        "Give me tips for slicing vegetables quickly with a chef's knife.",
        "How should I braise beef short ribs in red wine?",
        "What is a good dressing for a Greek salad?",
    ],
    "programming": [
        "Write a Python function that reverses a linked list.",
        "How do I fix a segmentation fault in my C program?",
        "Explain the difference between a process and a thread in an operating system.",
        "How can I speed up a slow SQL query with a join on two large tables?",
        "Write a JavaScript function to debounce an event handler.",
        "What does the Rust borrow checker complain about when I mutate a vector in a loop?",
        "How do I write a unit test with pytest fixtures?",
        "Implement binary search in Java and explain its time complexity.",
        "How do I resolve a merge conflict in git?",
        "Explain how a hash map handles collisions.",
        "Write a bash script that renames all .txt files in a directory.",
        "Why does my React component re-render on every state change?",
        "How do I parse a JSON file in Go?",
        "What is a race condition and how do mutexes prevent it?",
        "Refactor this Python class to use dataclasses.",
        "How do I profile memory usage of a Python program?",
        "Explain recursion with a function that computes factorials.",
        "How do I set up a REST API endpoint with Flask?",
        "What is the difference between a compiler and an interpreter?",
        "How can I make my Docker image smaller?",
    ],
    "astronomy": [
        "How do astronomers measure the distance to a faraway galaxy?",
        "What happens when a massive star collapses into a black hole?",
        "Why does Mars look red in the night sky?",
        "Explain how exoplanets are detected with the transit method.",
        "What is the cosmic microwave background radiation?",
        "How long does light from the Sun take to reach Earth?",
        "Why does the Moon always show the same face to Earth?",
        "What are the rings of Saturn made of?",
        "How do neutron stars produce pulsar signals?",
        "What is dark matter and why do astronomers think it exists?",
        "When is the next total solar eclipse visible from Europe?",
        "How does a telescope's aperture affect what planets you can see?",
        "What is the life cycle of a star like our Sun?",
        "Explain redshift and the expansion of the universe.",
        "Which constellations are visible in the winter sky of the northern hemisphere?",
        "How did Jupiter's Great Red Spot form?",
        "What is a supernova and how bright can it get?",
        "How do comets develop their tails near the Sun?",
        "What is the Hubble constant?",
        "Why is Pluto no longer classified as a planet?",
    ],
    "law": [
        "What are the elements of a valid contract under common law?",
        "Can my landlord keep my security deposit for normal wear and tear?",
        "Explain the difference between a misdemeanor and a felony.",
        "How does the statute of limitations apply to a breach of contract claim?",
        "What rights do I have if I am arrested by the police?",
        "How do I file a small claims court case against a contractor?",
        "What is the difference between a will and a living trust?",
        "Is a verbal agreement legally binding?",
        "What does it mean to plead no contest in a criminal case?",
        "How does copyright law protect software code?",
        "Can an employer fire me without cause in an at-will state?",
        "What is the burden of proof in a civil lawsuit?",
        "Explain what a non-compete clause in an employment contract means.",
        "How do I contest a parking ticket in traffic court?",
        "What is the role of a jury in a criminal trial?",
        "How are assets divided in a divorce settlement?",
        "What is defamation and how is libel different from slander?",
        "Do I need a lawyer to draft a power of attorney?",
        "How does a judge decide bail for a defendant?",
        "What are my tenant rights if the landlord refuses to make repairs?",
    ],
}
TYPED = Features({"prompt": Value("string"), "embedding": List(Value("float32")), "total_score": Value("int64")})


@pytest.fixture(scope="module")
def domain_ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The 80 domain prompts with real MiniLM embeddings, a domain label, an id and a score."""
    prompts = [p for texts in DOMAINS.values() for p in texts]
    domains = [d for d, texts in DOMAINS.items() for _ in texts]
    scores = [(i * 3) % 8 for i in range(len(prompts))]
    ds = Dataset.from_dict(
        {"id": list(range(len(prompts))), "prompt": prompts, "domain": domains, "total_score": scores}
    )
    cache = str(tmp_path_factory.mktemp("embed") / "c.sqlite")
    return embed_dataset(ds, batch_size=32, cache_path=cache)


def synthetic(n: int, topics: int = 3, dim: int = 16, seed: int = 0, scores: list | None = None) -> Dataset:
    """``n`` rows in ``topics`` tight, well separated clusters (row i in cluster i % topics); fast, no model."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:topics] * 5
    vectors = centres[np.arange(n) % topics] + rng.normal(scale=0.1, size=(n, dim)).astype(np.float32)
    prompts = [f"cluster{i % topics} word{i % topics} item" for i in range(n)]
    data = {
        "prompt": prompts,
        "embedding": list(vectors),
        "total_score": scores or [int(s) for s in rng.integers(0, 8, n)],
    }
    return Dataset.from_dict(data, features=TYPED).add_column("id", list(range(n)))


def round_robin(topics: list[int], scores: list[float | None], target: int) -> set[int]:
    """The rule, written plainly: per topic best score first (no score = lowest, ties by order); round by round,
    each round's candidates best score first (ties by topic), until ``target`` rows are taken."""
    queues: dict[int, list[int]] = {}
    for i in sorted(range(len(topics)), key=lambda i: (-(scores[i] if scores[i] is not None else -math.inf), i)):
        queues.setdefault(topics[i], []).append(i)
    taken: list[int] = []
    for r in range(max(len(q) for q in queues.values())):
        candidates = [(t, q[r]) for t, q in queues.items() if r < len(q)]
        lowest = -math.inf
        candidates.sort(key=lambda c: (-(scores[c[1]] if scores[c[1]] is not None else lowest), c[0]))
        taken.extend(i for _, i in candidates)
    return set(taken[:target])


def test_embeddings_are_unit_float32_and_errors_are_rows(domain_ds: Dataset, tmp_path) -> None:
    assert domain_ds.features["embedding"] == FEATURES["embedding"]
    matrix = embedding_matrix(domain_ds)
    assert matrix.shape == (80, 384) and matrix.dtype == np.float32
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-4)
    out = embed_dataset(Dataset.from_dict({"prompt": ["hello there", "", None]}), cache_path=str(tmp_path / "c.sqlite"))
    assert [e is None for e in out["embedding"][:]] == [False, True, True]
    assert out["embed_error"][0] is None and out["embed_error"][1] == out["embed_error"][2] == "embed: empty prompt"


def test_topics_follow_domains(domain_ds: Dataset) -> None:
    kept, rejected = balance_topics(domain_ds, target_size=40, n_topics=4, min_topic_size=5)
    rows = {row["id"]: row for part in (kept, rejected) for row in part}
    majority = {}
    for domain in DOMAINS:
        topics = Counter(row["topic"] for row in rows.values() if row["domain"] == domain)
        topic, count = topics.most_common(1)[0]
        assert count >= 12, (domain, topics)  # at least 60% of a domain's 20 prompts in one topic
        majority[domain] = topic
    assert len(set(majority.values())) == 4, majority
    labels = {row["topic"]: row["topic_label"] for row in rows.values()}
    assert all(labels.values()) and len(set(labels.values())) == 4


def test_selection_is_round_robin_best_first_and_nothing_is_lost(domain_ds: Dataset) -> None:
    kept, rejected = balance_topics(domain_ds, target_size=30, n_topics=4, min_topic_size=5)
    assert kept.num_rows == 30 and kept.num_rows + rejected.num_rows == domain_ds.num_rows
    assert sorted(kept["id"][:] + rejected["id"][:]) == list(range(80))
    assert set(rejected["rejected_by"][:]) == {"balance_topics"} and set(rejected["reason"][:]) == {"balance"}
    assert "rejected_by" not in kept.column_names and kept["id"][:] == sorted(kept["id"][:])  # input order
    rows = sorted([*kept, *rejected], key=lambda row: row["id"])
    expected = round_robin([r["topic"] for r in rows], [r["total_score"] for r in rows], 30)
    assert set(kept["id"][:]) == expected
    per_topic = Counter(kept["topic"][:])
    sizes = Counter(r["topic"] for r in rows)
    most = max(per_topic.values())
    assert all(per_topic[t] >= min(sizes[t], most - 1) for t in sizes), (per_topic, sizes)  # even across topics


def test_exact_round_robin_on_uneven_topics() -> None:
    # Clusters of 10, 6 and 2 rows (rows 0-9 → 0, 10-15 → 1, 16-17 → 2 by construction below).
    sizes = [10, 6, 2]
    owner = np.repeat(np.arange(3), sizes)
    rng = np.random.default_rng(1)
    vectors = np.eye(8, dtype=np.float32)[owner] * 5 + rng.normal(scale=0.1, size=(18, 8)).astype(np.float32)
    scores = [7, 1, 5, 5, 2, 0, 6, 3, 4, 1, 2, 7, 3, 6, 0, 4, 1, 2]
    data = {"prompt": [f"alpha{o} beta{o}" for o in owner], "embedding": list(vectors), "total_score": scores}
    ds = Dataset.from_dict(data, features=TYPED).add_column("id", list(range(18)))
    kept, rejected = balance_topics(ds, target_size=9, n_topics=3, min_topic_size=2)
    topic_of = {row["id"]: row["topic"] for part in (kept, rejected) for row in part}
    assert len({topic_of[i] for i in range(10)}) == 1 and len(set(topic_of.values())) == 3
    # Rounds: 3 + 3 rows, then topics 0 and 1 (topic 2 is spent), then the better 4th-best of topics 0/1.
    # Topic 0 best: 0(7), 6(6), 2(5), 3(5), ...; topic 1: 11(7), 13(6), 15(4), 12(3), ...; topic 2: 17(2), 16(1).
    assert set(kept["id"][:]) == {0, 6, 2, 11, 13, 15, 17, 16, 3}
    assert set(kept["id"][:]) == round_robin([topic_of[i] for i in range(18)], scores, 9)


def test_missing_scores_count_as_lowest_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    scores = [None if i % 5 == 0 else 1 for i in range(30)]  # 2 of the 10 rows of every cluster have no score
    ds = synthetic(30, topics=3, scores=scores)
    with caplog.at_level(logging.WARNING, logger="synthq_hf.stages.balance_topics"):
        kept, rejected = balance_topics(ds, target_size=15, n_topics=3, min_topic_size=5)
    assert "6 of 30 rows have no total_score" in caplog.text
    assert kept["total_score"][:] == [1] * 15  # 5 a cluster, from its 8 scored rows: every unscored row is rejected
    assert rejected["total_score"][:].count(None) == 6


def test_too_few_rows_falls_back_to_fewer_topics(caplog: pytest.LogCaptureFixture) -> None:
    ds = synthetic(12, topics=2)
    with caplog.at_level(logging.WARNING, logger="synthq_hf.stages.balance_topics"):
        kept, rejected = balance_topics(ds, target_size=4, n_topics=50, min_topic_size=5)
    assert "too few for 50 topics" in caplog.text and "using 2 topics" in caplog.text
    assert kept.num_rows == 4 and rejected.num_rows == 8 and len(set(kept["topic"][:])) == 2
    kept, rejected = balance_topics(synthetic(1), target_size=4, n_topics=50)  # one row: one topic, kept
    assert kept.num_rows == 1 and kept["topic"][:] == [0] and rejected.num_rows == 0


def test_target_above_rows_keeps_all_labelled_and_rows_without_vector_are_rejected() -> None:
    ds = synthetic(40, topics=4)
    embeddings = ds["embedding"][:]
    embeddings[5] = None
    ds = ds.remove_columns("embedding").add_column("embedding", embeddings, feature=TYPED["embedding"])
    kept, rejected = balance_topics(ds, target_size=100, n_topics=4, min_topic_size=5)
    assert kept.num_rows == 39 and all(label for label in kept["topic_label"][:])
    assert len(set(kept["topic"][:])) == 4
    assert rejected["id"][:] == [5] and rejected["reason"][:] == ["no embedding"] and rejected["topic"][:] == [None]
    sizes = topic_sizes(kept, rejected)
    assert sum(entry["all"] for entry in sizes) == 39 and all(entry["kept"] == entry["all"] for entry in sizes)


def test_diversity_closed_forms() -> None:
    same = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (50, 1))
    assert diversity(same)["mean_cosine_distance"] == pytest.approx(0, abs=1e-9)
    assert diversity(same)["vendi_score"] == pytest.approx(1)
    basis = np.eye(16, dtype=np.float32)
    result = diversity(basis)
    assert result["mean_cosine_distance"] == pytest.approx(1) and result["vendi_score"] == pytest.approx(16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairwise = unit @ unit.T
    brute = 1 - pairwise[~np.eye(30, dtype=bool)].mean()
    assert diversity(x)["mean_cosine_distance"] == pytest.approx(brute)


def test_balanced_selection_is_more_diverse_than_the_biggest_topic(domain_ds: Dataset) -> None:
    kept, _ = balance_topics(domain_ds, target_size=20, n_topics=4, min_topic_size=5)
    cooking = domain_ds.filter(lambda d: d == "cooking", input_columns="domain")
    assert diversity(kept)["vendi_score"] > diversity(cooking)["vendi_score"]


# --- a TEI stand-in: /info, /embed (max_client_batch_size enforced), and OpenAI /v1/models + /v1/embeddings ---


class EmbeddingServer:
    """Speaks TEI's routes (``dialect="tei"``) or the OpenAI ones (``"openai"``), embedding with the real model."""

    def __init__(self, dialect: str, max_client_batch_size: int = 32):
        self.dialect, self.max_batch = dialect, max_client_batch_size
        self.requests: list[tuple[str, dict | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                server.requests.append((f"GET {self.path}", None))
                if server.dialect == "tei" and self.path == "/info":
                    self.reply(200, server.info())
                elif server.dialect == "openai" and self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": "minilm", "object": "model"}]})
                else:
                    self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((f"POST {self.path}", body))
                if server.dialect == "tei" and self.path == "/embed":
                    inputs = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
                    if len(inputs) > server.max_batch:  # TEI's answer to an oversized batch
                        message = f"batch size {len(inputs)} > maximum allowed batch size {server.max_batch}"
                        self.reply(413, {"error": message, "error_type": "Validation"})
                        return
                    self.reply(200, server.encode(inputs, body.get("normalize", True)))
                elif server.dialect == "openai" and self.path == "/v1/embeddings":
                    vectors = server.encode(body["input"], True)
                    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
                    self.reply(200, {"object": "list", "model": body["model"], "data": data[::-1]})  # any order
                else:
                    self.reply(404, {"error": "not found"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def info(self) -> dict:
        return {
            "model_id": "sentence-transformers/all-MiniLM-L6-v2",
            "model_sha": None,
            "model_dtype": "float32",
            "model_type": {"embedding": {"pooling": "mean"}},
            "max_concurrent_requests": 512,
            "max_input_length": 256,
            "max_batch_tokens": 16384,
            "max_batch_requests": None,
            "max_client_batch_size": self.max_batch,
            "auto_truncate": False,
            "tokenization_workers": 2,
            "version": "1.6.0",
        }

    def encode(self, texts: list[str], normalize: bool) -> list[list[float]]:
        with self.lock:  # one forward pass at a time: the tokenizer is not re-entrant across threads
            return load_model(None).encode(texts, normalize_embeddings=normalize).tolist()

    def posts(self) -> list[dict]:
        return [body for route, body in self.requests if route.startswith("POST")]


@pytest.fixture
def tei() -> Iterator[EmbeddingServer]:
    server = EmbeddingServer("tei", max_client_batch_size=8)
    yield server
    server.httpd.shutdown()


@pytest.fixture
def openai_server() -> Iterator[EmbeddingServer]:
    server = EmbeddingServer("openai")
    yield server
    server.httpd.shutdown()


def test_tei_endpoint_matches_local_model_and_cache_stops_second_request(
    tei: EmbeddingServer, domain_ds: Dataset, make_config
) -> None:
    ds = domain_ds.select(range(0, 80, 4)).select_columns(["prompt"])  # 20 prompts, 5 per domain
    config: EndpointConfig = make_config(tei.url)
    out = embed_dataset(ds, batch_size=20, endpoint=config, request_batch_size=8)
    assert out["embed_error"][:] == [None] * 20
    assert sorted(len(body["inputs"]) for body in tei.posts()) == [4, 8, 8]  # under TEI's max_client_batch_size
    local = embedding_matrix(domain_ds.select(range(0, 80, 4)))
    assert np.allclose(embedding_matrix(out), local, atol=1e-4)
    embed_dataset(ds, batch_size=20, endpoint=config, request_batch_size=8)  # every text is cached now
    assert len(tei.posts()) == 3
    more = Dataset.from_dict({"prompt": [ds[0]["prompt"], "A brand new question about tax law?"]})
    embed_dataset(more, endpoint=config, request_batch_size=8)  # only the new text goes out
    assert tei.posts()[-1]["inputs"] == ["A brand new question about tax law?"] and len(tei.posts()) == 4


def test_tei_rejection_is_a_row_error(tei: EmbeddingServer, make_config) -> None:
    ds = Dataset.from_dict({"prompt": [f"question number {i}" for i in range(10)]})
    out = embed_dataset(ds, endpoint=make_config(tei.url, max_retries=0), request_batch_size=10)  # > TEI's 8
    assert out["embedding"][:] == [None] * 10
    assert all("413" in error for error in out["embed_error"][:])


def test_openai_embeddings_route(openai_server: EmbeddingServer, make_config) -> None:
    ds = Dataset.from_dict({"prompt": ["How do I bake bread?", "What is a black hole?", "Write a Python loop."]})
    out = embed_dataset(ds, endpoint=make_config(openai_server.url))
    assert [body["model"] for body in openai_server.posts()] == ["minilm"]
    local = load_model(None).encode(ds["prompt"][:], normalize_embeddings=True)
    assert np.allclose(embedding_matrix(out), local, atol=1e-4)  # back in input order although served reversed


def test_prompts_sharing_one_word_still_get_topics() -> None:
    """One distinct word in the whole vocabulary broke BERTopic's c-TF-IDF (a scalar where scipy wants a list)."""
    rng = np.random.default_rng(0)
    ds = Dataset.from_dict(
        {
            "prompt": ["ok"] * 6,
            "total_score": [1, 2, 3, 4, 5, 6],
            "embedding": [list(v / np.linalg.norm(v)) for v in rng.normal(size=(6, 8)).astype("float32")],
        }
    )
    kept, rejected = balance_topics(ds, target_size=2, n_topics=2)
    assert kept.num_rows == 2 and rejected.num_rows == 4
