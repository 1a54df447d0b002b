"""Durable per-request cache: the reason a killed run can restart without paying twice.

Every successful HTTP reply is stored under a hash of (route, canonical payload). The payload always carries the
resolved model name and the per-request seed, so a hit is exactly "this model already answered this request".

Why this shape:
- SQLite in WAL mode: one file, many readers, safe across processes (``num_proc > 1``), no server to run.
- Writes are queued in memory and committed by a background thread every ``flush_interval_s`` (default 0.5 s) in
  one transaction, so the event loop never waits on fsync; a SIGKILL loses at most about the last second.
- Reads consult the unflushed queue first, then SQLite; a point read with a prepared statement costs microseconds.
- One cache object per (process, path): a forked ``num_proc`` worker opens its own connections and thread.

Across machines (the Ray engine) one SQLite file is not safe: WAL needs memory shared by every process that opens
the file, so it must not be opened from two hosts, and a rollback journal over a network filesystem is only as safe
as its locks. So there a worker writes a **shard** of its own, ``<file>.shards/<host>-<pid>-<rand>.sqlite``, in
rollback-journal mode, with one writer for its whole life; it reads the main file opened ``immutable`` (no locks,
no shared memory: the driver checkpoints it before the workers start and nobody writes it while they run) and the
other shards read-only. Every reader, sharded or not, looks up a key in the shards too, so the merge is by key on
read; :func:`merge_shards` folds the shards of workers that are gone into the main file, which is how a killed
worker's answers reach the next run. A shard's writer holds a lock on ``<shard>.alive`` while it lives: the lock
goes with the process, however it dies, and a shard whose lock can be taken belongs to nobody.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import socket
import sqlite3
import threading
import time
from pathlib import Path

import orjson
from filelock import FileLock, Timeout

#: A rowid table (the key's index is separate and small): replies are kilobytes, and a WITHOUT ROWID table keeps
#: whole rows in its interior pages, so at ~1.5 KB a row its fan-out is ~2 and every insert or lookup walks ~15
#: levels (measured: 70 µs an insert, 25 µs a miss, against 16 µs and 5 µs here). Files made with the old
#: schema still work: the statements are the same.
_SCHEMA = "CREATE TABLE IF NOT EXISTS replies (key BLOB PRIMARY KEY, value BLOB NOT NULL)"
#: Rows per INSERT. ``executemany`` steps once per row and lets go of the GIL around each step, and every such
#: hand-off makes the event loop wait to take it back; one statement of 100 rows (200 parameters: within even
#: old SQLite's 999) hands off once per 100 rows. Measured: ~15-20% more rows/s through map with the cache on.
_ROWS_PER_INSERT = 100
#: Set in a process's environment (the Ray engine sets it for its actors): its caches write to shards.
SHARD_ENV = "SYNTHQ_CACHE_SHARD"
#: How often (at most) a reader looks for shards that appeared since it last looked, on a miss.
_RESCAN_S = 2.0


def default_cache_path() -> Path:
    """``$SYNTHQ_CACHE_DIR/requests.sqlite``, else ``~/.cache/synthq/requests.sqlite`` (HF-style cache home)."""
    base = os.environ.get("SYNTHQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "synthq"
    )
    return Path(base) / "requests.sqlite"


def request_key(route: str, payload: dict) -> bytes:
    """Hash of the route and the canonical (sorted-key) JSON payload. Never includes URLs or credentials."""
    return body_key(route, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))


def body_key(route: str, body: bytes) -> bytes:
    """:func:`request_key` of a payload already serialised canonically (``orjson.OPT_SORT_KEYS``).

    The client serialises each request once and uses the same bytes as the HTTP body and for the key: the two
    serialisations and the route+body copy cost as much as the hash itself (~10 µs a request here).
    """
    digest = hashlib.blake2b(route.encode(), digest_size=20)
    digest.update(b"\0")
    digest.update(body)
    return digest.digest()


def shard_folder(path: str | os.PathLike) -> Path:
    """Where the workers of a cluster write their shards of the cache at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


def _connect(path: Path, journal: str = "WAL") -> sqlite3.Connection:
    """Open ``path`` in ``journal`` mode (WAL unless a shard) with the table in place.

    Switching a file to WAL and creating the table take locks for which SQLite does not always call the busy
    handler: two ``num_proc`` workers opening a fresh file at the same moment got "database is locked" at once
    (seen in CI). An inter-process file lock around the set-up serialises just those few statements.
    """
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    with FileLock(f"{path}.lock", timeout=60):
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute(f"PRAGMA journal_mode={journal}")
        conn.execute("PRAGMA synchronous=NORMAL")
        # 64 MB of page cache (SQLite's default is 2 MB): the key index of a million-reply cache is ~40 MB, and
        # with it out of cache every insert of a random key read its pages again. Measured with
        # scripts/bench/stream_1m.py: 1M streamed rows 4,613 → 5,533 rows/s, 100k rows 4,372 → ~5,900.
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute(_SCHEMA)
    return conn


def _open_read_only(path: Path, immutable: bool = False) -> sqlite3.Connection | None:
    """A read-only connection, or ``None`` where the file cannot be read (gone, not a database yet)."""
    uri = f"{path.resolve().as_uri()}?{'immutable=1' if immutable else 'mode=ro'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10, check_same_thread=False)
        conn.execute("SELECT 1 FROM replies LIMIT 1")
    except sqlite3.Error:
        return None
    return conn


def _lookup(conn: sqlite3.Connection, key: bytes) -> bytes | None:
    """A key's value in another process's file; a file it cannot read right now is a miss, never an error: a
    miss only costs a request sent again. The row's own key is checked too: an ``immutable`` reader takes no
    locks, and a page rewritten under it must not hand back another request's answer."""
    try:
        row = conn.execute("SELECT key, value FROM replies WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    return row[1] if row and row[0] == key else None


class RequestCache:
    """Reply store keyed by :func:`request_key`; use :func:`get_cache` rather than building one directly."""

    def __init__(self, path: str | os.PathLike, flush_interval_s: float = 0.5, shard: bool = False):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval_s = flush_interval_s
        self.file = self.path  # the file this process writes
        self._main: sqlite3.Connection | None = None  # a sharded process reads the main file through this
        self._alive: FileLock | None = None
        if shard:
            folder = shard_folder(self.path)
            folder.mkdir(exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
            self._alive = FileLock(folder / f"{name}.alive")
            self._alive.acquire(timeout=0)
            self.file = folder / f"{name}.sqlite"
            if self.path.exists():
                self._main = _open_read_only(self.path, immutable=True)
        journal = "DELETE" if shard else "WAL"
        self._reader = _connect(self.file, journal)
        self._writer = _connect(self.file, journal)
        self._others: dict[Path, sqlite3.Connection | None] = {}  # other shards, read-only
        self._scanned = -_RESCAN_S
        self._pending: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.hits = 0
        self.misses = 0
        self._thread = threading.Thread(target=self._flush_loop, name="synthq-cache-writer", daemon=True)
        self._thread.start()

    def get(self, key: bytes) -> bytes | None:
        value = self._pending.get(key)
        if value is None:
            row = self._reader.execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
            value = row[0] if row else None
        if value is None and self._main is not None:
            value = _lookup(self._main, key)
        if value is None:
            value = self._in_shards(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def _in_shards(self, key: bytes) -> bytes | None:
        """The key in another worker's shard: answers a killed worker committed reach the worker that redoes
        its rows. The folder is listed again at most every ``_RESCAN_S`` seconds."""
        now = time.monotonic()
        if now - self._scanned >= _RESCAN_S:
            self._scanned = now
            folder = shard_folder(self.path)
            found = set(folder.glob("*.sqlite")) if folder.is_dir() else set()
            for gone in set(self._others) - found:
                conn = self._others.pop(gone)
                if conn is not None:
                    conn.close()
            for path in found - set(self._others) - {self.file}:
                self._others[path] = _open_read_only(path)
        for path, conn in list(self._others.items()):
            if conn is None:  # it was not a database yet when we looked (its writer had just made it)
                conn = self._others[path] = _open_read_only(path)
            value = _lookup(conn, key) if conn is not None else None
            if value is not None:
                return value
        return None

    def put(self, key: bytes, value: bytes) -> None:
        with self._lock:
            self._pending[key] = value

    def flush(self) -> None:
        """Commit everything queued so far; called by the writer thread, on idle and at exit."""
        with self._flush_lock:
            with self._lock:
                if not self._pending:
                    return
                batch = list(self._pending.items())
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(batch), _ROWS_PER_INSERT):
                    rows = batch[start : start + _ROWS_PER_INSERT]
                    values = ", ".join(["(?, ?)"] * len(rows))
                    params = [field for row in rows for field in row]
                    self._writer.execute(f"INSERT OR REPLACE INTO replies (key, value) VALUES {values}", params)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            with self._lock:
                for key, value in batch:
                    if self._pending.get(key) is value:
                        del self._pending[key]

    def _flush_loop(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            try:
                self.flush()
            except sqlite3.Error:  # a busy/locked database: keep the queue and try again next tick
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()
        for conn in [self._reader, self._writer, self._main, *self._others.values()]:
            if conn is not None:
                conn.close()
        if self._alive is not None:
            self._alive.release()

    def __len__(self) -> int:
        self.flush()
        return self._reader.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


_CACHES: dict[tuple[int, str], RequestCache] = {}
_CACHES_LOCK = threading.Lock()


def get_cache(path: str | os.PathLike | None = None) -> RequestCache:
    """The process-wide cache for ``path`` (default :func:`default_cache_path`); a shard of it where
    :data:`SHARD_ENV` is set."""
    resolved = str(Path(path or default_cache_path()).expanduser().resolve())
    key = (os.getpid(), resolved)
    cache = _CACHES.get(key)
    if cache is None:
        with _CACHES_LOCK:
            cache = _CACHES.get(key)
            if cache is None:
                cache = _CACHES[key] = RequestCache(resolved, shard=bool(os.environ.get(SHARD_ENV)))
    return cache


def flush_all() -> None:
    """Commit every cache this process has open (a worker does it before it hands rows on)."""
    for (pid, _), cache in list(_CACHES.items()):
        if pid == os.getpid():
            cache.flush()


def merge_shards(path: str | os.PathLike) -> int:
    """Fold into the main file at ``path`` the shards whose writers are gone, delete them, and checkpoint the main
    file so workers opening it ``immutable`` see it whole; returns the answers merged. Shards of live writers are
    left where they are: readers find them anyway."""
    path = Path(path).expanduser()
    folder = shard_folder(path)
    merged = 0
    if folder.is_dir():
        for shard in sorted(folder.glob("*.sqlite")):
            alive = FileLock(shard.with_suffix(".alive"))
            try:
                alive.acquire(timeout=0)
            except Timeout:
                continue
            try:
                conn = _connect(path)
                try:
                    _connect(shard, "DELETE").close()  # a writer killed mid-commit left a journal: roll it back
                    conn.execute("ATTACH DATABASE ? AS shard", (str(shard),))
                    conn.execute("BEGIN IMMEDIATE")
                    merged += conn.execute(
                        "INSERT OR IGNORE INTO replies (key, value) SELECT key, value FROM shard.replies"
                    ).rowcount
                    conn.execute("COMMIT")
                    conn.execute("DETACH DATABASE shard")
                finally:
                    conn.close()
                for leftover in (shard, *(shard.with_name(shard.name + end) for end in ("-journal", ".lock"))):
                    leftover.unlink(missing_ok=True)
                shard.with_suffix(".alive").unlink(missing_ok=True)
            finally:
                alive.release()
    if path.exists():
        get_cache(path).flush()
        conn = _connect(path)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    return merged


@atexit.register
def _close_all() -> None:
    for (pid, _), cache in list(_CACHES.items()):
        if pid == os.getpid():
            try:
                cache.close()
            except sqlite3.Error:
                pass
