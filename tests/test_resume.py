"""Kill a run with SIGKILL mid-way, start it again: only unanswered requests are re-sent, output is identical."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from datasets import load_dataset
from stub_server import StubServer

ROWS = 300


def score_cmd(url: str, source: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "synthq_hf.cli", "score", str(source), "--endpoint", url,
            "--output", str(out), "--cache-path", str(cache), "--overwrite"]  # fmt: skip


def durable_answers(cache: Path) -> int:
    if not cache.exists():
        return 0
    with sqlite3.connect(cache) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def rows_of(out: Path) -> list[dict]:
    return load_dataset(str(out), "instructions", split="train").to_list()


def test_killed_run_resumes_without_resending_answers(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Instruction number {i}"}) + "\n" for i in range(ROWS)))
    with StubServer(dialect="tgi", max_concurrent=4) as stub:  # TGI: /info caps the client at 4 in flight
        stub.seeded_replies = True
        stub.delay_s = 0.03  # slow enough to kill it mid-way, fast enough for a unit test
        cache = tmp_path / "cache.sqlite"
        out = tmp_path / "out"
        proc = subprocess.Popen(score_cmd(stub.url, source, out, cache), stderr=subprocess.DEVNULL)
        durable = 0
        deadline = time.monotonic() + 120
        while durable < ROWS // 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            durable = durable_answers(cache)
        assert proc.poll() is None, "the run finished before it could be killed; raise ROWS"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Requests the killed client had already written may still sit in the socket buffers: let the stub read
        # them before counting, or they would be counted as re-sent by the second run.
        sent_before = -1
        while sent_before != stub.count("/v1/chat/completions"):
            sent_before = stub.count("/v1/chat/completions")
            time.sleep(0.3)
        durable = durable_answers(cache)  # what survived the kill
        assert 0 < durable < ROWS

        subprocess.run(score_cmd(stub.url, source, out, cache), check=True, stderr=subprocess.DEVNULL)
        resent = stub.count("/v1/chat/completions") - sent_before
        assert resent <= ROWS - durable  # nothing that was durably answered is asked again
        assert resent >= ROWS - sent_before  # everything never asked is asked now

        fresh = tmp_path / "fresh"
        subprocess.run(
            score_cmd(stub.url, source, fresh, tmp_path / "fresh.sqlite"), check=True, stderr=subprocess.DEVNULL
        )
    shards = sorted(p.name for p in (out / "instructions").iterdir())
    assert shards == sorted(p.name for p in (fresh / "instructions").iterdir())  # same bytes, same digest
    resumed_rows, fresh_rows = rows_of(out), rows_of(fresh)
    assert resumed_rows == fresh_rows
    assert len({r["total_score"] for r in fresh_rows}) > 1  # the stub's seeded replies really differ per row
