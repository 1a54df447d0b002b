"""Start and stop the opt-in vLLM server (CPU build, bundled SmolLM2-135M) set up by ``vllm_setup.sh``.

    .venv/bin/python scripts/bench/vllm_server.py          # prints the URL, serves until Ctrl-C

Used by ``saturation.py`` and by ``tests/test_vllm.py`` (both also take the URL of a server already running). It
runs as its own process group on a free 127.0.0.1 port, so stopping it stops vLLM's engine and worker processes
too; on Linux the group's leader also dies with its parent.

Settings, and why (measured here, 2 cores shared with other work):
  ``--enforce-eager``              41-70 s to start instead of 83-121 s compiled; fine for a 135M model
  ``--dtype float32``              this CPU (AMD EPYC, AVX2) has no AVX512-BF16, so bf16 takes a slow path: 12-15
                                   against 27 completion tok/s at concurrency 16 on a busy machine (the folder's
                                   weights are bf16; vLLM upcasts them at load)
  ``VLLM_CPU_OMP_THREADS_BIND``    ``0-1`` unless set: the model's OpenMP threads on both cores (vLLM's ``auto``
                                   reserves one core for its scheduler process). On a machine busy with other
                                   work, ``0`` (one thread) did better: at load ~4, 72 against 27 completion tok/s
                                   at concurrency 16 (likely: a preempted thread stalls every OpenMP barrier)
  ``VLLM_CPU_KVCACHE_SPACE=1``     1 GiB of KV cache (~45k tokens of this model, far above 16 requests in flight);
                                   without it vLLM reserves ``--gpu-memory-utilization`` (0.92) of the NUMA node's
                                   memory and refuses to start when other processes hold some of it
  ``HF_HUB_OFFLINE=1``             the model is a local folder; nothing may reach for the Hub
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SYNTHQ_VLLM_VENV", Path.home() / ".cache/synthq/vllm-venv"))
MODEL = Path(os.environ.get("SYNTHQ_VLLM_MODEL", Path.home() / ".cache/synthq/smollm2-135m-instruct"))
SERVED_NAME = "smollm2-135m-instruct"


def installed() -> bool:
    """Whether ``vllm_setup.sh`` has finished here (venv and converted model)."""
    return (VENV / ".synthq-ready").is_file() and (MODEL / "config.json").is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _lead_group_and_die_with_parent() -> None:
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class VllmServer:
    """``with VllmServer() as server: ...server.url...``; ``start_s`` is how long it took to answer /health."""

    def __init__(
        self, port: int | None = None, threads_bind: str | None = None, kv_cache_gib: int = 1, dtype: str = "float32"
    ):
        if not installed():
            raise RuntimeError(f"vLLM is not set up ({VENV}, {MODEL}): run bash scripts/bench/vllm_setup.sh")
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads_bind = threads_bind or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1")
        self.kv_cache_gib = kv_cache_gib
        self.dtype = dtype
        self.process: subprocess.Popen | None = None
        self.start_s = 0.0
        self.log = tempfile.NamedTemporaryFile(prefix="synthq-vllm-", suffix=".log", delete=False)

    def start(self, timeout_s: float = 300.0) -> VllmServer:
        cmd = [
            str(VENV / "bin/python"), str(HERE / "vllm_launch.py"), "serve", str(MODEL),
            "--served-model-name", SERVED_NAME,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enforce-eager", "--dtype", self.dtype,
        ]  # fmt: skip
        env = {
            **os.environ,
            "VLLM_CPU_OMP_THREADS_BIND": self.threads_bind,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1",
        }
        began = time.monotonic()
        self.process = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_lead_group_and_die_with_parent,
        )  # fmt: skip
        while time.monotonic() - began < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited (code {self.process.returncode}); log: {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        self.start_s = time.monotonic() - began
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {timeout_s:.0f} s; log: {self.log.name}")

    def stop(self) -> None:
        """SIGTERM the server's process group (API server, engine core, worker); SIGKILL what is left after 20 s."""
        proc, self.process = self.process, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any child that outlived the leader
        except ProcessLookupError:
            pass
        proc.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else None
    with VllmServer(port) as server:
        print(f"{server.url}  (up in {server.start_s:.0f} s; log {server.log.name}; Ctrl-C stops it)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
