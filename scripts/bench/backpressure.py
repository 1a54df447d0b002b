"""Does the limiter settle against a server that refuses (429) above its capacity and has no ``/info``?
(benchmark, not a test)

A rate-limited OpenAI-compatible API tells the client nothing up front: it answers 429 "Model is overloaded" when
more than ``--capacity`` requests are in flight. The stub (its own process, aiohttp) plays that server with a fixed
latency per answered request and logs (time, status) for every request. Side by side in one run:

  adaptive   ``Dataset.map(score_instruction)`` with no ``max_concurrency`` (the client starts at 64 and must find
             the capacity from the 429s alone)
  capped     the same map with ``max_concurrency=--capacity``: a client told the right number (0 refused)
  tgi        the same map against the same server speaking TGI's ``/info`` (``max_concurrent_requests``):
             the client caps itself from the start

Printed for each: rows/s, requests the server saw, the share refused over the whole run and over the *settled*
part (requests sent after the first ``--settle`` seconds), and adaptive rows/s ÷ capped rows/s.
Targets (issue 9): settled refusals < 5 %, throughput ≥ 0.9 of capped.

    .venv/bin/python scripts/bench/backpressure.py --rows 3000 --capacity 8 --latency 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time

import orjson

MODEL = "stub-model"


def _serve(conn, capacity: int, latency_s: float, tgi: bool) -> None:
    from aiohttp import web

    from synthq_hf.stages.score_instruction import CRITERIA, InstructionScore

    content = InstructionScore.model_validate(
        {name: {"analysis": "Clear task, concrete constraints.", "score": i % 2} for i, name in enumerate(CRITERIA)}
    ).model_dump_json()
    reply = orjson.dumps({
        "id": "chatcmpl-stub", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 380, "completion_tokens": 190, "total_tokens": 570},
    })  # fmt: skip
    log: list[tuple[float, int]] = []
    inflight = [0]

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        inflight[0] += 1
        try:
            if inflight[0] > capacity:
                log.append((time.monotonic(), 429))
                return web.json_response({"error": "Model is overloaded"}, status=429)
            log.append((time.monotonic(), 200))
            await asyncio.sleep(latency_s)
            return web.Response(body=reply, content_type="application/json")
        finally:
            inflight[0] -= 1

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": MODEL, "max_concurrent_requests": capacity})

    async def stats(request: web.Request) -> web.Response:
        body = orjson.dumps(log)
        log.clear()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_log", stats)
    if tgi:
        app.router.add_get("/info", info)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def start_stub(capacity: int, latency_s: float, tgi: bool) -> tuple[str, multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, capacity, latency_s, tgi), daemon=True)
    proc.start()
    if not parent.poll(60):
        raise RuntimeError("stub server did not start")
    return f"http://127.0.0.1:{parent.recv()}", proc


def server_log(url: str) -> list[tuple[float, int]]:
    from urllib.request import urlopen

    with urlopen(url + "/_log", timeout=30) as resp:
        return [tuple(x) for x in orjson.loads(resp.read())]


def run_map(url: str, prompts: list[str], max_concurrency: int | None) -> tuple[float, float]:
    """Rows/s of ``Dataset.map(score_instruction)`` and the monotonic time it started (server clock is the same)."""
    from datasets import Dataset

    from synthq_hf.endpoint import EndpointConfig
    from synthq_hf.stages import output_features, score_instruction

    ds = Dataset.from_dict({"prompt": prompts})
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = EndpointConfig(
            url=url, max_concurrency=max_concurrency, cache=False, cache_path=f"{tmp}/c.sqlite", max_retries=20
        )
        started = time.monotonic()
        out = ds.map(
            score_instruction,
            fn_kwargs={"endpoint": endpoint},
            features=output_features(ds.features, score_instruction),
        )
        elapsed = time.monotonic() - started
    errors = [e for e in out["score_instruction_error"] if e]
    if errors:
        raise SystemExit(f"{len(errors)} rows failed, e.g. {errors[0]}")
    return len(prompts) / elapsed, started


def refused(log: list[tuple[float, int]], after: float) -> tuple[int, int, int, int]:
    """(requests, refused, requests after ``after``, refused after ``after``)."""
    late = [status for t, status in log if t >= after]
    return len(log), sum(s == 429 for _, s in log), len(late), sum(s == 429 for s in late)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--capacity", type=int, default=8, help="the server refuses above this many in flight")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answered request")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after which the run counts as settled")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    prompts = [f"Write a short plan for task number {i}, with three steps and a deadline." for i in range(args.rows)]
    results: dict[str, tuple[float, tuple[int, int, int, int]]] = {}
    for name, tgi, cap in (("capped", False, args.capacity), ("adaptive", False, None), ("tgi", True, None)):
        url, proc = start_stub(args.capacity, args.latency, tgi)
        try:
            rate, started = run_map(url, prompts, cap)
            counts = refused(server_log(url), started + args.settle)
        finally:
            proc.kill()
        results[name] = (rate, counts)
        total, bad, late, late_bad = counts
        print(
            f"{name:<9} {rate:7.1f} rows/s  {total:6d} requests, {bad:5d} refused ({bad / total:6.1%}); "
            f"after {args.settle:.0f} s: {late:6d} requests, {late_bad:4d} refused ({late_bad / max(late, 1):6.1%})",
            flush=True,
        )
    ideal = args.capacity / args.latency
    print(
        f"\nrows={args.rows} capacity={args.capacity} latency={args.latency}s (ideal {ideal:.0f} rows/s)\n"
        f"adaptive / capped throughput: {results['adaptive'][0] / results['capped'][0]:.2f}  (target >= 0.90)\n"
        f"adaptive settled refusals:   {results['adaptive'][1][3] / max(results['adaptive'][1][2], 1):.1%}"
        "  (target < 5 %)"
    )


if __name__ == "__main__":
    main()
