"""Does ``Dataset.map(score_instruction)`` keep a real batching server as busy as a bare loop does? (benchmark)

A server that batches (vLLM) does more work per second the more requests it holds, so a client that holds fewer
than it may, or paces them, loses throughput; a server that serves one request at a time (llama-cpp-python) hides
that. So against one vLLM server (CPU build, the bundled SmolLM2-135M: ``vllm_setup.sh``), in one run, side by
side, at the same concurrency:

  raw   a bare aiohttp loop, ``--concurrency`` workers, sending exactly the requests score_instruction sends:
        the bodies are captured from the stage itself (same messages, response_format, max_tokens, temperature,
        seeds), so both sides ask the server for the same work
  map   ``Dataset.map(score_instruction, fn_kwargs={"endpoint": EndpointConfig(url, max_concurrency=...,
        cache=False), "attempts": 1})``: the request cache off, so every row is a request, and one attempt
        per row, so the stage sends the raw loop's requests and no more (its retries of cut-off replies are
        stage semantics; at the end of a run they go out alone and measure the model, not the client)

Each prints completion tokens/s, summed from the server's ``usage`` (the server's own work rate), the mean number
of requests in flight and the lowest concurrency limit (for the map: the endpoint's AdaptiveLimiter), sampled
every 20 ms: they show where a shortfall comes from. Runs go raw, map, map, raw (``--repeat`` rounds) so that
drift on a shared machine hits both; the best of each is compared. THE TARGET: map ÷ raw ≥ 0.95.

    .venv/bin/python scripts/bench/saturation.py                 # starts the server (vllm_setup.sh first)
    .venv/bin/python scripts/bench/saturation.py --url http://127.0.0.1:8000 --rows 64 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_ceiling import make_prompts

from synthq_hf import endpoint as endpoint_module
from synthq_hf.endpoint import EndpointClient, EndpointConfig, RequestFailed

ROUTE = "/v1/chat/completions"


def capture_bodies(config: EndpointConfig, prompts: list[str], attempts: int) -> list[bytes]:
    """The request bodies ``score_instruction`` sends for these rows, taken from the stage itself.

    The client's ``post`` is replaced for the duration by one that records the payload serialised exactly as
    ``post`` serialises it, and fails the request; the stage then records an error row and sends nothing. Server
    detection runs for real, so the model name and the dialect's ``response_format`` are the server's.
    """
    from datasets import Dataset

    from synthq_hf.stages import score_instruction

    bodies: list[bytes] = []

    async def record(self, route: str, payload: dict, *, stage: str, cache_key: dict | None = None):
        assert route == ROUTE, route
        bodies.append(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        raise RequestFailed("captured, not sent")

    with mock.patch.object(EndpointClient, "post", record):
        kwargs = {"endpoint": config, "attempts": attempts}
        Dataset.from_dict({"prompt": prompts}).map(score_instruction, fn_kwargs=kwargs)
    return bodies


class Sampler:
    """Requests in flight and the concurrency limit, sampled every 20 ms from a thread while a run lasts."""

    def __init__(self, read):
        self.read, self.samples, self._stop = read, [], threading.Event()

    def __enter__(self) -> Sampler:
        def sample() -> None:
            while not self._stop.wait(0.02):
                value = self.read()
                if value is not None:
                    self.samples.append(value)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        inflight = sum(s[0] for s in self.samples) / len(self.samples)
        return f"{inflight:4.1f} in flight, limit min {min(s[1] for s in self.samples):4.1f}"


async def _raw(url: str, bodies: list[bytes], concurrency: int, inflight: list[int]) -> int:
    """``concurrency`` workers over one aiohttp session; returns the completion tokens the server reported."""
    import aiohttp

    rows = iter(bodies)
    tokens = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

        async def worker() -> None:
            nonlocal tokens
            for body in rows:
                inflight[0] += 1
                try:
                    async with session.post(url + ROUTE, data=body) as resp:
                        data = orjson.loads(await resp.read())
                finally:
                    inflight[0] -= 1
                if resp.status != 200:
                    raise SystemExit(f"raw: HTTP {resp.status}: {data}")
                tokens += data["usage"]["completion_tokens"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens


def run_raw(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, Sampler, float]:
    """(completion tokens/s, what was in flight, wall seconds)."""
    inflight = [0]
    with Sampler(lambda: (inflight[0], concurrency)) as sampled:
        start = time.perf_counter()
        tokens = asyncio.run(_raw(url, bodies, concurrency, inflight))
        wall = time.perf_counter() - start
    return tokens / wall, sampled, wall


def _limiter_state() -> tuple[int, float] | None:
    """(in flight, limit) of the map's endpoint limiter. ``get_client`` drops the clients of loops that stopped
    running when a new loop asks, so during a map the only clients left are the map's own.
    """
    for _loop, clients, _last in list(endpoint_module._CLIENTS.values()):
        for client in list(clients.values()):
            if client.limiter is not None:
                return client.limiter.inflight, client.limiter.limit
    return None


def run_map(
    config: EndpointConfig, prompts: list[str], attempts: int, batch_size: int
) -> tuple[float, Sampler, float, str]:
    """(completion tokens/s, what was in flight, wall seconds, what the stage's usage says)."""
    from datasets import Dataset

    from synthq_hf.stages import output_features, score_instruction

    ds = Dataset.from_dict({"prompt": prompts})
    batching = {"batched": True, "batch_size": batch_size} if batch_size else {}
    features = output_features(ds.features, score_instruction)
    config.usage.pop("score_instruction", None)
    with Sampler(_limiter_state) as sampled:
        start = time.perf_counter()
        kwargs = {"endpoint": config, "attempts": attempts}
        out = ds.map(score_instruction, fn_kwargs=kwargs, features=features, **batching)
        wall = time.perf_counter() - start
    usage = config.usage["score_instruction"]
    failed = sum(e is not None for e in out["score_instruction_error"])
    note = f"{usage.requests} requests, {failed} rows failed"
    return usage.completion_tokens / wall, sampled, wall, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a vLLM server already running (default: start one, see vllm_server.py)")
    parser.add_argument("--rows", type=int, default=32, help="rows (requests) per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="raw workers and the map's max_concurrency")
    parser.add_argument("--repeat", type=int, default=1, help="(raw, map, map, raw) rounds; the best is compared")
    parser.add_argument("--batch-size", type=int, default=0, help="> 0: the batched form of the map")
    parser.add_argument(
        "--attempts",
        type=int,
        default=1,
        help="score_instruction's attempts per row (default 1: one request per row, as in the raw loop; more lets "
        "the stage retry cut-off or invalid replies, work the raw loop does not do)",
    )
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    server = None
    url = args.url
    if url is None:
        from vllm_server import VllmServer

        server = VllmServer().start()
        url = server.url
        print(f"vLLM up in {server.start_s:.0f} s at {url} (log {server.log.name})", flush=True)
    try:
        config = EndpointConfig(url=url, max_concurrency=args.concurrency, cache=False, timeout_s=600)
        prompts = make_prompts(args.rows)
        bodies = capture_bodies(config, prompts, args.attempts)
        assert len(bodies) == len(prompts), (len(bodies), len(prompts))
        # Warm-up, not timed: the first request with a schema compiles its grammar and fills the prefix cache
        # with the shared system prompt.
        asyncio.run(_raw(url, bodies[:2], 2, [0]))
        rates: dict[str, list[float]] = {"raw": [], "map": []}
        for rep in range(args.repeat):
            for name in ("raw", "map", "map", "raw"):
                load = os.getloadavg()[0]
                if name == "raw":
                    rate, sampled, wall = run_raw(url, bodies, args.concurrency)
                    note = f"{len(bodies)} requests"
                else:
                    rate, sampled, wall, note = run_map(config, prompts, args.attempts, args.batch_size)
                rates[name].append(rate)
                print(
                    f"  round {rep + 1} {name:<3} {rate:6.1f} completion tok/s  {wall:5.1f} s  "
                    f"{sampled.summary()}  load {load:.1f}  ({note})",
                    flush=True,
                )
    finally:
        if server is not None:
            server.stop()
    form = f"batched, batch_size={args.batch_size}" if args.batch_size else "per row"
    best = {name: max(values) for name, values in rates.items()}
    mean = {name: sum(values) / len(values) for name, values in rates.items()}
    print(
        f"\nrows={args.rows} concurrency={args.concurrency} map={form} attempts={args.attempts} "
        f"cpus={os.cpu_count()}; completion tok/s, best (mean) of {len(rates['raw'])} each:\n"
        f"  raw aiohttp loop            {best['raw']:6.1f} ({mean['raw']:.1f})\n"
        f"  Dataset.map(score_instr.)   {best['map']:6.1f} ({mean['map']:.1f})\n"
        f"  map / raw                   {best['map'] / best['raw']:6.2f} ({mean['map'] / mean['raw']:.2f})"
        "   <- the target: >= 0.95"
    )


if __name__ == "__main__":
    main()
