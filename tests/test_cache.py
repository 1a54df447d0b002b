"""Request cache behaviour that needs no server: concurrent creation across processes, stable keys, and the
per-worker shards the Ray engine writes."""

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson

from synthq_hf.cache import SHARD_ENV, RequestCache, body_key, merge_shards, request_key, shard_folder


def _open_and_write(job: tuple[str, int]) -> str:
    path, index = job
    try:
        cache = RequestCache(path)
        cache.put(request_key("/r", {"index": index}), b"v")
        cache.close()
        return "ok"
    except sqlite3.Error as error:
        return str(error)


def test_many_processes_create_one_fresh_cache_at_once(tmp_path):
    """num_proc workers open a brand-new file together; SQLite's WAL switch once failed with 'database is locked'."""
    results = []
    with multiprocessing.get_context("fork").Pool(4) as pool:
        for attempt in range(15):
            results += pool.map(_open_and_write, [(str(tmp_path / f"cache-{attempt}.sqlite"), i) for i in range(4)])
    assert results == ["ok"] * len(results)
    assert len(RequestCache(tmp_path / "cache-0.sqlite")) == 4


def test_request_keys_are_stable_across_versions():
    """Cache files outlive upgrades: the key of a request must not change (blake2b-20 of route NUL sorted JSON)."""
    payload = {"seed": 1, "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert request_key("/v1/chat/completions", payload).hex() == "201ca0f0e76ef15c8abe0006ef67dc16331d5380"
    body = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    assert body_key("/v1/chat/completions", body) == request_key("/v1/chat/completions", payload)


# -- shards: the cache as the Ray engine's workers use it across hosts ---------------------------------------------
WRITER = """
import os, sys, time
from synthq_hf.cache import get_cache, request_key
cache = get_cache(sys.argv[1])
for i in range(int(sys.argv[2])):
    cache.put(request_key("/r", {"i": i}), b"answer %d" % i)
cache.flush()
print(cache.file, flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), 9)  # killed like a worker: no close, no atexit
time.sleep(60)  # alive: its shard must be left alone
"""


def _writer(path, rows: int, how: str) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, SHARD_ENV: "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(rows), how], stdout=subprocess.PIPE, env=env)
    return proc, Path(proc.stdout.readline().decode().strip())


def test_a_killed_workers_shard_is_read_by_key_and_then_merged(tmp_path):
    main = tmp_path / "requests.sqlite"
    RequestCache(main).close()
    dead, dead_shard = _writer(main, 30, "die")
    dead.wait(timeout=30)
    alive, alive_shard = _writer(main, 5, "live")
    try:
        assert dead_shard.parent == alive_shard.parent == shard_folder(main) and dead_shard != alive_shard
        reader = RequestCache(main)  # any reader, sharded or not, finds answers in the shards
        assert reader.get(request_key("/r", {"i": 29})) == b"answer 29"
        assert reader.get(request_key("/r", {"i": 30})) is None
        reader.close()
        assert merge_shards(main) == 30  # the dead worker's answers; the live one's shard is left where it is
        assert not dead_shard.exists() and alive_shard.exists()
        assert len(RequestCache(main)) == 30
        # A worker started now reads the merged main file without locks (immutable) and the live shard.
        env = {**os.environ, SHARD_ENV: "1"}
        probe = "import sys; from synthq_hf.cache import get_cache, request_key as k; c = get_cache(sys.argv[1]); "
        probe += "print(c.get(k('/r', {'i': 12})), c.get(k('/r', {'i': 40})), c.file.parent.name)"
        out = subprocess.run([sys.executable, "-c", probe, str(main)], env=env, capture_output=True, text=True)
        assert out.stdout.split() == ["b'answer", "12'", "None", "requests.sqlite.shards"], out.stderr
    finally:
        alive.kill()
        alive.wait()
    assert merge_shards(main) == 0  # keys the main file already has are not counted twice
    assert not alive_shard.exists() and list(shard_folder(main).iterdir()) == []  # no journal, lock or .alive left


def test_a_shard_left_mid_commit_is_rolled_back_before_it_is_merged(tmp_path):
    """A worker killed inside a commit leaves a hot journal; merging must not take its half-written rows."""
    main = tmp_path / "requests.sqlite"
    RequestCache(main).close()
    folder = shard_folder(main)
    folder.mkdir()
    shard = folder / "host-1-dead.sqlite"
    conn = sqlite3.connect(shard, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("CREATE TABLE replies (key BLOB PRIMARY KEY, value BLOB NOT NULL)")
    conn.execute("INSERT INTO replies VALUES (x'01', x'aa')")
    conn.execute("PRAGMA cache_size=1")  # spill pages mid-transaction, so the journal is hot on disk
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO replies VALUES (?, ?)", [(bytes([2, i]), b"x" * 2000) for i in range(200)])
    journal = shard.with_name(shard.name + "-journal")
    assert journal.exists()
    shutil.copy(shard, tmp_path / "db")  # the files as a SIGKILL would leave them
    shutil.copy(journal, tmp_path / "journal")
    conn.close()
    shutil.copy(tmp_path / "db", shard)
    shutil.copy(tmp_path / "journal", journal)
    assert merge_shards(main) == 1
    assert RequestCache(main).get(bytes([1])) == b"\xaa"
