"""How close does a synthq stage inside ``Dataset.map`` get to a bare aiohttp loop? (benchmark, not a test)

A zero-latency stub LLM server runs in its own process (a raw ``asyncio.Protocol`` HTTP/1.1 keep-alive server
with one canned chat reply whose content is a valid ``InstructionScore``), so the client is the only bottleneck.
Then, in one process run, side by side:

  raw            a bare aiohttp loop at the same concurrency sending exactly the JSON score_instruction sends
                 (the issue's reference: what a lean hand-rolled aiohttp client would reach)
  raw http       the same loop over ``synthq_hf.http.Pool``, the transport the stages use: the stage's own
                 overhead is the distance from this line
  per-row        ``ds.map(score_instruction, fn_kwargs=...)``, request cache on (a fresh cache file: every row is a
                 request) and off
  batched        ``ds.map(score_instruction, batched=True, batch_size=--batch-size, fn_kwargs=...)``, cache on/off
  bare map       an async per-row ``Dataset.map`` over plain aiohttp, no synthq code (what datasets itself costs)

THE TARGET (the spine issue: ≥ 0.7 of raw aiohttp, 0.8 stretch) is the batched form with the cache on, under
datasets' default settings: per-row async ``map`` in datasets 5.2 calls ``asyncio.wait`` over every pending task
for each row it adds (O(pending) per row), which alone keeps a per-row map over aiohttp far below raw (see
"bare map"). The stages beat raw aiohttp because their transport is leaner (``synthq_hf/http.py``: ~25 µs of CPU
a request against aiohttp's ~140) and because the endpoint keeps the garbage collector off the pre-existing heap
while requests run (``endpoint.hold_heap``: without it, full collections walking datasets' ~120k objects cost
~85 µs a row).

Each is run ``--repeat`` times and the best is kept; CPU µs/row (this process, cache writer thread included) is
printed too, as it is far steadier than wall time on a shared machine. The map runs are repeated under each
``--map-parallel`` value of ``datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL`` (default: datasets'
own 1000; ``2x`` is twice the concurrency, which helps the per-row form).

    .venv/bin/python scripts/bench/client_ceiling.py --rows 10000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import tempfile
import time

import orjson

CHAT_ROUTE = b"POST /v1/chat/completions "
MODEL = "stub-model"


# -- the stub server (own process) ----------------------------------------------------------------------------
def _response(status: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (status, len(body))
    return head + body


def _canned_chat() -> bytes:
    from synthq_hf.stages.score_instruction import CRITERIA, InstructionScore

    sentence = "The instruction names a concrete task with clear constraints and a deliverable."
    content = InstructionScore.model_validate(
        {name: {"analysis": sentence, "score": i % 2} for i, name in enumerate(CRITERIA)}
    ).model_dump_json()
    reply = {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 380, "completion_tokens": 190, "total_tokens": 570},
    }
    return _response(b"200 OK", orjson.dumps(reply))


def _serve(conn) -> None:
    chat = _canned_chat()
    models = _response(b"200 OK", orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
    not_found = _response(b"404 Not Found", b'{"error":"not found"}')
    count = [0]

    class Stub(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""

        def data_received(self, data):
            buf = self.buf + data if self.buf else data
            out = []
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end]
                i = head.find(b"Content-Length:")
                if i < 0:
                    i = head.lower().find(b"content-length:")
                size = int(head[i + 15 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
                if len(buf) < end + 4 + size:
                    break
                buf = buf[end + 4 + size :]
                if head.startswith(CHAT_ROUTE):
                    count[0] += 1
                    out.append(chat)
                elif head.startswith(b"GET /v1/models "):
                    out.append(models)
                elif head.startswith(b"GET /_count "):
                    out.append(_response(b"200 OK", b"%d" % count[0]))
                else:
                    out.append(not_found)
            self.buf = buf
            if out:
                self.transport.write(b"".join(out))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    try:
        import uvloop  # optional: a faster loop keeps the stub further from being the bottleneck

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


def start_stub() -> tuple[str, multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child,), daemon=True)
    proc.start()
    if not parent.poll(60):
        raise RuntimeError("stub server did not start")
    return f"http://127.0.0.1:{parent.recv()}", proc


# -- workload -------------------------------------------------------------------------------------------------
SUBJECTS = ("a Python function", "a SQL query", "a short poem", "a tax plan", "a unit test", "a cover letter")
GOALS = ("that merges two sorted lists", "about autumn in Kyoto", "for a family of four", "under 200 words")


def make_prompts(n: int) -> list[str]:
    return [f"Write {SUBJECTS[i % len(SUBJECTS)]} {GOALS[i % len(GOALS)]} (case {i})." for i in range(n)]


def score_payloads(prompts: list[str]) -> list[bytes]:
    """The exact bodies score_instruction sends (model, messages, temperature, max_tokens, seed, response_format)."""
    from synthq_hf import prompts as templates
    from synthq_hf.endpoint import derive_seed
    from synthq_hf.stages._common import row_id
    from synthq_hf.stages.score_instruction import STAGE, InstructionScore
    from synthq_hf.structured import response_format

    fmt = response_format(InstructionScore, "openai")
    bodies = []
    for text in prompts:
        payload = {
            "model": MODEL,
            "messages": templates.render(STAGE, instruction=text),
            "temperature": 0.0,
            "max_tokens": 700,
            "seed": derive_seed(0, STAGE, row_id({"prompt": text}, text)),
            "response_format": fmt,
        }
        bodies.append(orjson.dumps(payload))
    return bodies


# -- the measurements -----------------------------------------------------------------------------------------
def _connector(concurrency: int):
    import aiohttp

    return aiohttp.TCPConnector(limit=concurrency, enable_cleanup_closed=False)


async def _raw(url: str, bodies: list[bytes], concurrency: int) -> None:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    rows = iter(bodies)
    async with aiohttp.ClientSession(connector=_connector(concurrency), headers=headers) as session:

        async def worker() -> None:
            for body in rows:
                async with session.post(url, data=body) as resp:
                    data = orjson.loads(await resp.read())
                    assert data["choices"][0]["message"]["content"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _raw_pool(base: str, bodies: list[bytes], concurrency: int) -> None:
    from synthq_hf.http import Pool

    rows = iter(bodies)
    pool = Pool(base)

    async def worker() -> None:
        for body in rows:
            resp = await pool.request("POST", "/v1/chat/completions", body)
            data = orjson.loads(resp.body)
            assert data["choices"][0]["message"]["content"]

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        pool.close()


def timed(rows: int, work) -> tuple[float, float]:
    """(rows per wall second, CPU µs per row of this process: steadier than wall time on a busy machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return rows / wall, cpu / rows * 1e6


def run_raw(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    return timed(len(bodies), lambda: asyncio.run(_raw(url + "/v1/chat/completions", bodies, concurrency)))


def run_raw_pool(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    return timed(len(bodies), lambda: asyncio.run(_raw_pool(url, bodies, concurrency)))


def run_stage(url: str, prompts: list[str], concurrency: int, cache: bool, batch_size: int = 0) -> tuple[float, float]:
    """``Dataset.map(score_instruction)``: per row, or ``batched=True`` with ``batch_size`` rows when it is > 0."""
    from datasets import Dataset

    from synthq_hf.endpoint import EndpointConfig
    from synthq_hf.stages import output_features, score_instruction

    ds = Dataset.from_dict({"prompt": prompts})
    batching = {"batched": True, "batch_size": batch_size} if batch_size else {}
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = EndpointConfig(
            url=url, max_concurrency=concurrency, dialect="openai", cache=cache, cache_path=f"{tmp}/requests.sqlite"
        )
        out = None

        def work() -> None:
            nonlocal out
            # typed output columns, as the CLI passes them (the batched form needs them: see stages/_batch.py)
            features = output_features(ds.features, score_instruction)
            out = ds.map(score_instruction, fn_kwargs={"endpoint": endpoint}, features=features, **batching)

        result = timed(len(prompts), work)
        errors = [e for e in out["score_instruction_error"] if e is not None]
        if errors:
            raise SystemExit(f"{len(errors)} rows failed, e.g. {errors[0]}")
        if cache:
            from synthq_hf.cache import get_cache

            get_cache(endpoint.cache_path).close()
    return result


def run_bare_map(url: str, prompts: list[str], bodies: list[bytes], concurrency: int) -> tuple[float, float]:
    """An async Dataset.map over plain aiohttp (session and semaphore made lazily in datasets' own loop)."""
    import aiohttp
    from datasets import Dataset

    state: dict = {}
    chat_url = url + "/v1/chat/completions"

    async def call(row: dict, idx: int) -> dict:
        assert row["prompt"]  # read the input like any real map function (datasets formats it lazily)
        if "session" not in state:
            state["loop"] = asyncio.get_running_loop()
            state["sem"] = asyncio.Semaphore(concurrency)
            state["session"] = aiohttp.ClientSession(
                connector=_connector(concurrency), headers={"Content-Type": "application/json"}
            )
        async with state["sem"], state["session"].post(chat_url, data=bodies[idx]) as resp:
            data = orjson.loads(await resp.read())
        return {"content": data["choices"][0]["message"]["content"]}

    ds = Dataset.from_dict({"prompt": prompts})
    result = timed(len(prompts), lambda: ds.map(call, with_indices=True, new_fingerprint=f"bare-{time.time_ns()}"))
    state["loop"].run_until_complete(state["session"].close())
    return result


async def _count(url: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url + "/_count") as resp:
        return int(await resp.text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows (requests) per measurement")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (raw and max_concurrency)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    parser.add_argument("--batch-size", type=int, default=256, help="batch_size of the batched form")
    parser.add_argument(
        "--map-parallel",
        default="default",
        help="comma list of datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL values to run the map "
        "measurements under: a number, 'default' (datasets' own, 1000) or '2x' (twice --concurrency)",
    )
    parser.add_argument(
        "--only",
        default=",".join(RUNS),
        help=f"comma list of measurements, from: {', '.join(RUNS)}",
    )
    args = parser.parse_args()
    only = args.only.split(",")

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    default_parallel = datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL
    settings = []
    for item in args.map_parallel.split(","):
        settings.append({"default": default_parallel, "2x": 2 * args.concurrency}.get(item) or int(item))

    url, proc = start_stub()
    try:
        prompts = make_prompts(args.rows)
        bodies = score_payloads(prompts)
        c, bs = args.concurrency, args.batch_size
        work = {
            "raw": lambda: run_raw(url, bodies, c),
            "raw-http": lambda: run_raw_pool(url, bodies, c),
            "row+cache": lambda: run_stage(url, prompts, c, cache=True),
            "row": lambda: run_stage(url, prompts, c, cache=False),
            "batched+cache": lambda: run_stage(url, prompts, c, cache=True, batch_size=bs),
            "batched": lambda: run_stage(url, prompts, c, cache=False, batch_size=bs),
            "bare": lambda: run_bare_map(url, prompts, bodies, c),
        }
        plan = [(name, None) for name in ("raw", "raw-http") if name in only]
        plan += [(name, n) for n in settings for name in RUNS if name in only and not name.startswith("raw")]
        best: dict[tuple, tuple[float, float]] = {}
        for rep in range(args.repeat):
            for name, parallel in plan:
                if parallel is not None:
                    # datasets keeps up to this many map coroutines alive and calls asyncio.wait over all of them
                    # for every row it adds; the endpoint's limiter only lets max_concurrency of them send, so
                    # anything far above that is per-row overhead. Set here, by the caller, never by a stage.
                    datasets.config.MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = parallel
                rate, cpu_us = work[name]()
                old = best.get((name, parallel), (0.0, float("inf")))
                best[(name, parallel)] = (max(old[0], rate), min(old[1], cpu_us))
                print(f"  run {rep + 1}: {_line(name, parallel, rate, cpu_us)}", flush=True)
        served = asyncio.run(_count(url))
    finally:
        proc.kill()
    print(
        f"\nrows={args.rows} concurrency={args.concurrency} batch_size={args.batch_size} repeat={args.repeat} "
        f"cpus={os.cpu_count()} stub served {served:,} chat requests; best of {args.repeat} each"
    )
    raw = best.get(("raw", None), (0.0, 0.0))[0]
    if raw:
        print(_line("raw", None, *best[("raw", None)]))
    if ("raw-http", None) in best:
        rate, cpu_us = best[("raw-http", None)]
        print(_line("raw-http", None, rate, cpu_us) + (f"  {rate / raw:.2f} of raw" if raw else ""))
    for parallel in settings:
        print(f"[MAX_NUM_RUNNING_ASYNC_MAP_FUNCTIONS_IN_PARALLEL = {parallel}]")
        for name in RUNS:
            if (name, parallel) in best:
                rate, cpu_us = best[(name, parallel)]
                ratio = f"  {rate / raw:.2f} of raw" if raw else ""
                target = "  <- the target (>= 0.7)" if name == "batched+cache" and parallel == default_parallel else ""
                print(f"  {_line(name, None, rate, cpu_us)}{ratio}{target}")


#: What each measurement is (see the module docstring), in print order.
RUNS = {
    "raw": "raw aiohttp",
    "raw-http": "raw synthq http",
    "row+cache": "per-row, cache on",
    "row": "per-row, cache off",
    "batched+cache": "batched, cache on",
    "batched": "batched, cache off",
    "bare": "bare async map",
}


def _line(name: str, parallel: int | None, rate: float, cpu_us: float) -> str:
    label = RUNS[name] + (f" [{parallel}]" if parallel is not None else "")
    unit = "req/s" if name.startswith("raw") else "rows/s"
    return f"{label:<26} {rate:8,.0f} {unit:<6} {cpu_us:5.0f} µs CPU/row"


if __name__ == "__main__":
    main()
