"""Our Ray engine against Ray Data's own ``ray.data.llm`` HTTP processor, on the same two stub replicas
(benchmark, not a test).

Two stub LLM servers run in processes of their own. Each answers ``/v1/chat/completions`` like a batching server
that is not saturated: up to ``--slots`` requests at once, each after ``--latency-s``; more wait for a slot. So a
client is measured by how well it keeps both replicas fed: the ceiling is ``2 × slots / latency`` rows/s, printed
as ``ideal``.

Side by side, in one process, on one local Ray cluster, the same rows (one chat request each, the same payload):

  synthq ray     ``synthq run`` of a one-stage recipe (``generate_responses``, n=1) with ``--engine ray`` and
                 ``endpoints.generator.replicas`` naming both stubs, request cache on (a fresh folder each run):
                 source read, rows written as parquet shards, the card, all of it inside the timing
  ray.data.llm   ``build_processor(HttpRequestProcessorConfig(url=…, concurrency=…))``, one processor per replica
                 (it takes one URL) over half the rows each, the two unioned and consumed

Each is run ``--repeat`` times, alternating, and the best of each is kept; the last line is the ratio (target ≥
1.0). Run on a quiet machine: both engines share its cores with the stubs.

    .venv/bin/python scripts/bench/ray_engine.py --rows 4000 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

MODEL = "stub-model"
REPLY = "A short canned answer from the stub replica, the same for every request."


def _serve(conn, slots: int, latency_s: float) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        async with state["gate"]:
            await asyncio.sleep(latency_s)
        counted[0] += 1
        stamps.append(time.time())
        return web.json_response(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 14, "total_tokens": 34},
            }
        )

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def count(_: web.Request) -> web.Response:  # answers so far, and when the first and last went out
        return web.json_response([counted[0], stamps[0] if stamps else 0, stamps[-1] if stamps else 0])

    async def reset(_: web.Request) -> web.Response:
        stamps.clear()
        return web.json_response(True)

    async def main() -> None:
        state["gate"] = asyncio.Semaphore(slots)  # made on the running loop
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", chat), web.get("/v1/models", models)])
        app.add_routes([web.get("/_count", count), web.post("/_reset", reset)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    counted, state, stamps = [0], {}, []
    asyncio.run(main())


def start_stub(slots: int, latency_s: float) -> tuple[str, multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, slots, latency_s), daemon=True)
    proc.start()
    if not parent.poll(60):
        raise RuntimeError("stub server did not start")
    return f"http://127.0.0.1:{parent.recv()}", proc


def _stub_call(url: str, route: str, method: str = "GET") -> object:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"{url}{route}", method=method, data=None)) as reply:
        return json.loads(reply.read())


def serving_rate(replicas: list[str], rows: int) -> float:
    """Rows a second between the first and the last answer the replicas gave (the start-up left out)."""
    spans = [_stub_call(url, "/_count") for url in replicas]
    first, last = min(s[1] for s in spans if s[1]), max(s[2] for s in spans)
    for url in replicas:
        _stub_call(url, "/_reset", "POST")
    return rows / (last - first)


def prompts(n: int) -> list[str]:
    subjects = ("a Python function", "a SQL query", "a short poem", "a tax plan", "a unit test", "a cover letter")
    return [f"Write {subjects[i % len(subjects)]} (case {i})." for i in range(n)]


def run_synthq(replicas: list[str], texts: list[str], folder: Path) -> tuple[float, float]:
    from synthq_hf.recipes.recipe import build_recipe
    from synthq_hf.recipes.runner import run_recipe

    folder.mkdir(parents=True)
    source = folder / "prompts.jsonl"
    source.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    os.environ["SYNTHQ_CACHE_DIR"] = str(folder / "synthq-cache")
    recipe = {
        "name": "bench",
        "seed": 1,
        "cache_path": str(folder / "cache.sqlite"),
        "endpoints": {"generator": {"url": replicas[0], "replicas": replicas, "timeout_s": 60}},
        "datasets": {
            "answers": {
                "source": {"dataset": str(source), "text_column": "prompt"},
                "stages": {"generate_responses": {"n": 1, "max_tokens": 64}},
            }
        },
        "output": {"dir": str(folder / "out")},
    }
    start = time.perf_counter()
    out = run_recipe(build_recipe(recipe), engine="ray")
    elapsed = time.perf_counter() - start
    counts = json.loads((out / "run.json").read_text())["counts"]["answers"]
    assert counts == {"train": len(texts), "rejected": 0}, counts
    return len(texts) / elapsed, serving_rate(replicas, len(texts))


def run_ray_llm(replicas: list[str], texts: list[str], concurrency: int) -> tuple[float, float]:
    import ray.data
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from synthq_hf.ray_engine import ROW_STAGE_CPUS

    def processor(url: str):
        config = HttpRequestProcessorConfig(
            url=f"{url}/v1/chat/completions",
            concurrency=concurrency,
            batch_size=64,
            # The CPU share our row-stage actors reserve, so a small cluster fits as many of theirs.
            http_request_stage={"num_cpus": ROW_STAGE_CPUS},
        )
        return build_processor(
            config,
            preprocess=lambda row: {
                "payload": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": row["prompt"]}],
                    "max_tokens": 64,
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "seed": row["seed"],
                }
            },
            postprocess=lambda row: {"response": row["http_response"]["choices"][0]["message"]["content"]},
        )

    rows = [{"prompt": t, "seed": i} for i, t in enumerate(texts)]
    start = time.perf_counter()
    halves = [ray.data.from_items(rows[i :: len(replicas)]) for i in range(len(replicas))]
    parts = [processor(url)(half) for url, half in zip(replicas, halves, strict=True)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    got = sum(len(batch["response"]) for batch in ds.iter_batches(batch_size=None))
    elapsed = time.perf_counter() - start
    assert got == len(texts), got
    return len(texts) / elapsed, serving_rate(replicas, len(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--slots", type=int, default=32, help="requests each stub replica serves at once")
    parser.add_argument("--latency-s", type=float, default=0.2, help="seconds each request takes on a replica")
    parser.add_argument(
        "--their-concurrency",
        type=int,
        default=2,
        help="ray.data.llm actors per replica (ours: 1 to 2 per replica). Its HTTP stage sends a batch's requests "
        "one after another, so its rate grows with this; ours is bounded by the replicas' slots",
    )
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()

    import ray

    stubs = [start_stub(args.slots, args.latency_s) for _ in range(2)]
    replicas = [url for url, _ in stubs]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    texts = prompts(args.rows)
    ideal = len(replicas) * args.slots / args.latency_s
    print(f"{args.rows} rows, 2 replicas × {args.slots} slots × {args.latency_s}s: ideal {ideal:.0f} rows/s")
    print(f"ray.data.llm: {args.their_concurrency} actors a replica. wall: whole run; serving: first to last answer")
    best = {"synthq ray": (0.0, 0.0), "ray.data.llm": (0.0, 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(args.repeat):
            got = {
                "synthq ray": run_synthq(replicas, texts, Path(tmp) / f"run-{attempt}"),
                "ray.data.llm": run_ray_llm(replicas, texts, args.their_concurrency),
            }
            print(f"  try {attempt + 1}: " + "   ".join(f"{k} {w:.1f} / {s:.1f} rows/s" for k, (w, s) in got.items()))
            best = {k: (max(best[k][0], got[k][0]), max(best[k][1], got[k][1])) for k in best}
    for name, (wall, serving) in best.items():
        print(f"{name:14s} wall {wall:8.1f} rows/s   serving {serving:8.1f} rows/s ({serving / ideal:.0%} of ideal)")
    ours, theirs = best["synthq ray"], best["ray.data.llm"]
    ratios = f"wall {ours[0] / theirs[0]:.2f}, serving {ours[1] / theirs[1]:.2f}"
    print(f"ratio synthq ray / ray.data.llm: {ratios} (target ≥ 1.0)")
    ray.shutdown()
    for _, proc in stubs:
        proc.kill()


if __name__ == "__main__":
    main()
