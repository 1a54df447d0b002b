"""Request cache behaviour that needs no server: concurrent creation across processes, stable keys."""

import multiprocessing
import sqlite3

import orjson

from synthq_hf.cache import RequestCache, body_key, request_key


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
