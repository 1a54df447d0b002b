"""Crash-exact resume: ``synthq run`` SIGKILLed again and again, then run to the end, gives the dataset an
uninterrupted run gives — same rows, same replies on the same rows, none lost, none twice — and re-sends at most
the in-flight window plus about a second of answers per kill (counted at the server).

The kills land at random moments of the row stages, in the global stages (dedup, topic balancing) and while the
card is written: the run says on stderr when it enters those, and the test kills a random fraction of a second
after. The random draws come from one seed, printed on failure, so a failing schedule can be replayed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from stub_server import WORDS, StubServer

CORPUS_ROWS = 240
SEEDS = 6
CAP = 8  # the stub's /info max_concurrent_requests: the client's in-flight window
DELAY_S = 0.04
ROUTES = ("/v1/chat/completions", "/tokenize")


def write_inputs(tmp: Path) -> tuple[Path, Path]:
    seeds, corpus = tmp / "seeds.jsonl", tmp / "corpus.jsonl"
    topics = ["tidal energy", "sourdough", "tax law", "rust lifetimes", "glaciers", "chess openings"]
    seeds.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "prompt": f"Explain {topics[i]} to a new student."}) + "\n" for i in range(SEEDS)
        )
    )
    rng = random.Random(0)  # documents share words with the stub's keyword replies, so searches find them
    docs = [f"Notes {i} on {topics[i % SEEDS]}: {' '.join(rng.choices(WORDS, k=10))}." for i in range(CORPUS_ROWS)]
    corpus.write_text("".join(json.dumps({"id": f"d{i:04d}", "text": doc}) + "\n" for i, doc in enumerate(docs)))
    return seeds, corpus


def write_recipe(tmp: Path, url: str) -> Path:
    seeds, corpus = write_inputs(tmp)
    recipe = {
        "name": "crash",
        "seed": 3,
        "endpoints": {"generator": {"url": url, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 10}},
        "seeds": {"dataset": str(seeds), "text_column": "prompt"},
        "corpus": {"dataset": str(corpus), "text_column": "text", "streaming": True},
        "search": {"backend": "bm25", "index": None},
        "demonstrations": {"extract_keywords": {}, "search_documents": {"k": 3}, "ground": {}},
        "instructions": {
            "generate_instruction": {"k": 2},
            "score_instruction": {},
            "filter": {"threshold": 3},
            "dedup": {},
            "balance_topics": {"target_size": 40, "n_topics": 4, "embed_batch_size": 64},
        },
        "output": {"shard_rows": 50},
    }
    path = tmp / "crash.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class Run:
    """``synthq run`` as a subprocess whose stderr lines are collected as they come (the phase markers)."""

    def __init__(self, recipe: Path, out: Path, cache_dir: Path):
        env = {**os.environ, "SYNTHQ_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "synthq_hf.cli", "run", str(recipe), "--output", str(out)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(10)

    def finish(self) -> None:
        assert self.proc.wait(300) == 0, "\n".join(self.lines[-20:])
        self.reader.join(10)


def sent(stub: StubServer) -> int:
    return sum(1 for route, _ in stub.requests if route in ROUTES)


def settle(stub: StubServer) -> int:
    """Requests the killed client had already written may still sit in socket buffers: count once they land."""
    before = -1
    while before != sent(stub):
        before = sent(stub)
        time.sleep(0.3)
    return before


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run to get there"
        time.sleep(0.02)


def request_digest(payload: dict) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


def dataset_files(out: Path) -> dict[str, str]:
    """Every data shard of the folder (configs and splits) → a digest of its rows (not of parquet's bytes)."""
    found = {}
    for path in sorted(out.glob("*/*.parquet")):
        table = pq.read_table(path)
        found[str(path.relative_to(out))] = hashlib.blake2b(
            json.dumps(table.to_pylist(), sort_keys=True, default=str).encode()
        ).hexdigest()
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkilled_runs_resume_to_the_uninterrupted_dataset(tmp_path: Path) -> None:
    seed = int(os.environ.get("SYNTHQ_KILL_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    with StubServer(dialect="tgi", max_concurrent=CAP) as stub:
        stub.seeded_replies = stub.varied_text = True  # answers differ per request: pairing them is checked
        stub.delay_s = DELAY_S
        recipe = write_recipe(tmp_path, stub.url)

        # The reference: one uninterrupted run, and how fast the stub answers it.
        Run(recipe, tmp_path / "clean", tmp_path / "clean-cache").finish()
        unique = {request_digest(p) for r, p in stub.requests if r in ROUTES}
        clean_sent = sent(stub)
        assert clean_sent == len(unique), "an uninterrupted run sends each request once"
        answers_per_s = clean_sent / (stub.arrivals[clean_sent - 1] - stub.arrivals[0])

        # The same recipe into another folder with its own cache, killed five times, then run to the end.
        out, cache = tmp_path / "killed", tmp_path / "killed-cache"
        kills = [
            ("rows", rng.uniform(0.15, 0.5)),  # share of the requests still unanswered that this run gets to send
            ("rows", rng.uniform(0.15, 0.5)),
            ("global", rng.uniform(0.0, 1.5)),  # seconds after the run enters dedup
            ("balance", rng.uniform(0.0, 3.0)),  # seconds after it enters topic balancing (embedding, BERTopic)
            ("card", rng.uniform(0.0, 0.5)),  # seconds after it starts writing the card
        ]
        resent_allowed = 0.0
        for phase, when in kills:
            base = sent(stub)
            asked = {request_digest(p) for r, p in stub.requests[clean_sent:] if r in ROUTES}
            run = Run(recipe, out, cache)
            if phase == "rows":
                goal = base + when * (len(unique) - len(asked))
                wait_for(lambda goal=goal, run=run: sent(stub) >= goal or run.proc.poll() is not None)
            else:
                marker = {
                    "global": "instructions: dedup",
                    "balance": "instructions: balance_topics",
                    "card": "dataset card",
                }
                wait_for(lambda m=marker[phase], run=run: run.saw(m) or run.proc.poll() is not None)
                time.sleep(when)
            assert run.proc.poll() is None, f"run ended before the {phase} kill (seed {seed}); {run.lines[-3:]}"
            run.kill()
            settle(stub)
            resent_allowed += CAP + answers_per_s * 1.0
        run = Run(recipe, out, cache)
        run.finish()

    killed_requests = [p for r, p in stub.requests[clean_sent:] if r in ROUTES]
    digests = [request_digest(p) for p in killed_requests]
    assert set(digests) == unique, f"the killed run asked other questions (seed {seed})"
    resent = len(digests) - len(unique)
    allowed = f"{CAP} in flight + {answers_per_s:.0f} answers/s × 1 s per kill"
    print(f"seed {seed}: {len(unique)} distinct, {resent} re-sent in {len(kills)} kills ({allowed})")
    assert resent <= resent_allowed, f"re-sent {resent} > {resent_allowed:.0f} allowed (seed {seed})"

    clean_files, killed_files = dataset_files(tmp_path / "clean"), dataset_files(out)
    assert killed_files == clean_files, f"different datasets (seed {seed})"
    configs = {name.split("/")[0] + "/" + name.split("/")[1].split("-")[0] for name in clean_files}
    assert {"instructions/train", "instructions/rejected", "demonstrations/train"} <= configs
    report = json.loads((out / "run.json").read_text())
    clean_report = json.loads((tmp_path / "clean" / "run.json").read_text())
    assert report["counts"] == clean_report["counts"]
    counts = report["counts"]["instructions"]
    assert counts["train"] + counts["rejected"] == CORPUS_ROWS  # every corpus row, once
    ids = [row["id"] for path in sorted(out.glob("instructions/*.parquet")) for row in pq.read_table(path).to_pylist()]
    assert sorted(ids) == [f"d{i:04d}" for i in range(CORPUS_ROWS)]  # none missing, none twice

    def card_metadata(folder: Path) -> str:  # the YAML header: configs and splits (the prose has timings)
        return (folder / "README.md").read_text().split("---")[1]

    assert card_metadata(out) == card_metadata(tmp_path / "clean")


def test_a_folder_left_half_cleared_by_a_kill_still_resumes(tmp_path: Path, monkeypatch) -> None:
    """A kill while a resuming run clears its folder leaves the marker and some old files (the marker is replaced
    first, the rest removed after); a kill while the marker is written leaves only its ``.partial``. Both
    folders still resume instead of being refused as "files that are not a synthq run"."""
    from synthq_hf.recipes import load_recipe
    from synthq_hf.recipes.runner import MARKER, run_recipe

    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "cache"))
    with StubServer(dialect="openai") as stub:
        stub.seeded_replies = stub.varied_text = True
        recipe = load_recipe(str(write_recipe(tmp_path, stub.url)), ["instructions.balance_topics=false"])
        out = run_recipe(recipe, tmp_path / "out")
        before = dataset_files(out)
        for path in out.rglob("*"):
            if path.is_file() and path.name != MARKER and path.suffix != ".parquet":
                path.unlink()  # card, run.json, plots gone; the marker and the shards left
        assert run_recipe(recipe, out) == out
        assert dataset_files(out) == before
        shutil.rmtree(out)  # a first run killed while it wrote its marker: nothing else there yet
        out.mkdir()
        (out / f"{MARKER}.partial").write_text("{}")
        assert run_recipe(recipe, out) == out
        assert dataset_files(out) == before
