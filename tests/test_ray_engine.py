"""The ``ray`` engine writes what the ``datasets`` engine writes: the graph recipe of test_graph (demonstrations,
instructions, preferences with the tiny reward model) run both ways against the stub, on one local Ray cluster
for the session; with two replicas; and with a worker, then the driver, SIGKILLed mid-run: nothing lost, nothing
twice, and only what was in flight (and about a second of answers) asked again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import datasets
import pytest
from datasets import load_dataset
from stub_server import WORDS, StubServer
from test_crash_resume import dataset_files, request_digest, settle, wait_for
from test_graph import PREFERENCES, graph

from synthq_hf.recipes.recipe import build_recipe
from synthq_hf.recipes.runner import run_recipe

ray = pytest.importorskip("ray", reason='the ray engine needs the ray extra: pip install -e ".[ray]"')
datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local cluster for the session (~5-15 s to start): two CPUs, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_an_unreachable_address_is_one_line_naming_it():
    """(First in the file: ``connect`` keeps a cluster this process already joined.)"""
    from synthq_hf.ray_engine import RayEngineError, connect

    assert not ray.is_initialized()
    with pytest.raises(RayEngineError, match=r"at ray://127\.0\.0\.1:9: ") as info:
        connect("ray://127.0.0.1:9")
    assert "\n" not in str(info.value)


def run(engine: str, stub_url: str, tmp_path: Path, monkeypatch) -> Path:
    """The graph recipe with ``engine``, into a folder of its own with its own request and reward caches."""
    root = tmp_path / engine
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(root / "synthq-cache"))  # reward cache, tiny model, index
    data = graph(stub_url, root, {"generate_instruction": {"k": 2}}, preferences=PREFERENCES)
    return run_recipe(build_recipe(data), engine=engine)


@pytest.mark.slow
def test_the_ray_engine_writes_what_the_datasets_engine_writes(ray_cluster, make_stub, tmp_path, monkeypatch):
    stub = make_stub("openai")
    stub.seeded_replies = stub.varied_text = True  # each request's reply follows from its seed: no queue order
    outs = {"datasets": run("datasets", stub.url, tmp_path, monkeypatch)}
    first = len(stub.requests)
    outs["ray"] = run("ray", stub.url, tmp_path, monkeypatch)
    sent = [json.dumps(payload, sort_keys=True) for _, payload in stub.requests]
    ours, theirs = (json.loads((outs[e] / "run.json").read_text()) for e in ("datasets", "ray"))
    assert ours["counts"] == theirs["counts"]
    assert ours["counts"]["preferences"]["train"] > 0
    assert [(s["name"], s["in"], s["out"]) for s in ours["stages"]] == [
        (s["name"], s["in"], s["out"]) for s in theirs["stages"]
    ]
    for config, splits in ours["counts"].items():
        for split in (split for split, count in splits.items() if count):  # an empty split writes no shard
            rows = {e: load_dataset(str(outs[e]), config, split=split).to_list() for e in outs}
            assert rows["ray"] == rows["datasets"], f"{config}/{split} differs"
    assert set(sent[first:]) == set(sent[:first])  # the same distinct requests (each run has its own cache)
    requests = [{stage: u["requests"] for stage, u in report["usage"].items()} for report in (ours, theirs)]
    assert requests[0] == requests[1]  # the actors' counts reach run.json


# -- replicas and kills: a two-stage recipe over 600 prompts, long enough to kill mid-run --------------------------
CAP = 4  # the stub's /info max_concurrent_requests: one client's in-flight window
DELAY_S = 0.05
ROWS = 600
CHAT = "/v1/chat/completions"


def prompts(url: str, root: Path, replicas: list[str] | None = None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    source = root / "prompts.jsonl"
    lines = [{"id": f"p{i:04d}", "prompt": f"Write note {i} on {WORDS[i % len(WORDS)]}."} for i in range(ROWS)]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    generator = {"url": url, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 10}
    return {
        "name": "killed",
        "seed": 5,
        "cache_path": str(root / "cache.sqlite"),
        "endpoints": {"generator": generator | ({"replicas": replicas} if replicas else {})},
        "datasets": {
            "instructions": {
                "source": {"dataset": str(source), "text_column": "prompt"},
                "stages": {"score_instruction": {}, "generate_responses": {"n": 1, "max_tokens": 64}},
            }
        },
        "output": {"dir": str(root / "out")},
    }


def chats(stub) -> list[str]:
    return [request_digest(payload) for route, payload in stub.requests if route == CHAT]


def slow_stub(make_stub):
    stub = make_stub("tgi", max_concurrent=CAP)  # a TGI says its cap in /info: each client keeps CAP in flight
    stub.seeded_replies = stub.varied_text = True
    stub.delay_s = DELAY_S
    return stub


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, set[str]]:
    """The uninterrupted run with the datasets engine, once for the tests below: its folder and its distinct
    requests (the replies follow from each request's seed, so they do not depend on which stub answers)."""
    root = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as patch, StubServer("tgi", max_concurrent=CAP) as stub:
        patch.setenv("SYNTHQ_CACHE_DIR", str(root / "synthq-cache"))
        stub.seeded_replies = stub.varied_text = True
        out = run_recipe(build_recipe(prompts(stub.url, root)))
        sent = chats(stub)
    assert len(sent) == len(set(sent)) == 2 * ROWS
    return out, set(sent)


def rate(stub) -> float:
    """Chat requests a second the stub has received so far."""
    times = [t for (route, _), t in zip(stub.requests, stub.arrivals, strict=True) if route == CHAT]
    return len(times) / (times[-1] - times[0])


def same_dataset(out: Path, clean: Path) -> None:
    assert dataset_files(out) == dataset_files(clean)
    report, clean_report = (json.loads((f / "run.json").read_text()) for f in (out, clean))
    assert report["counts"] == clean_report["counts"]
    assert sum(report["counts"]["instructions"].values()) == ROWS


@pytest.mark.slow
def test_two_replicas_share_the_rows_and_write_what_one_server_does(
    ray_cluster, clean, make_stub, tmp_path, monkeypatch
):
    (clean, unique), stub, other = clean, slow_stub(make_stub), slow_stub(make_stub)
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "ray" / "synthq-cache"))
    monkeypatch.setenv("SYNTHQ_RAY_WINDOW_ROWS", "192")  # four windows, two at a time: their rows stay in order
    data = prompts("http://127.0.0.1:9", tmp_path / "ray", replicas=[stub.url, other.url])  # url: never used
    out = run_recipe(build_recipe(data), engine="ray")
    same_dataset(out, clean)
    first, second = chats(stub), chats(other)
    assert first and second, f"one replica got nothing: {len(first)} and {len(second)} requests"
    assert sorted(first + second) == sorted(unique)  # every request once, across the two


def stage_actors() -> list[int]:
    """Pids of the processes running our stage actors (Ray titles them ``ray::MapWorker(MapBatches(...))``)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
        except OSError:
            continue
        if b"MapBatches(_StageActor)" in command:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_killed_worker_loses_no_row_and_doubles_none(ray_cluster, clean, make_stub, tmp_path, monkeypatch):
    (clean, unique), stub = clean, slow_stub(make_stub)
    monkeypatch.setenv("SYNTHQ_CACHE_DIR", str(tmp_path / "ray" / "synthq-cache"))
    recipe, result = build_recipe(prompts(stub.url, tmp_path / "ray")), {}

    def run_it() -> None:
        try:
            result["out"] = run_recipe(recipe, engine="ray")
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=run_it)
    thread.start()
    wait_for(lambda: len(chats(stub)) >= 0.4 * len(unique) or not thread.is_alive())
    victims = stage_actors()
    assert thread.is_alive() and victims, "the run ended before the kill"
    os.kill(victims[0], signal.SIGKILL)
    killed_at, answers_per_s = len(chats(stub)), rate(stub)
    thread.join(300)
    assert "error" not in result, result.get("error")
    same_dataset(result["out"], clean)
    sent = chats(stub)
    assert set(sent) == unique
    resent = sum(count - 1 for count in Counter(sent).values())
    allowed = CAP + answers_per_s * 1.0  # the dead actor's in-flight window, the last second of answers
    print(f"killed pid {victims[0]} after {killed_at} of {len(unique)} requests; {resent} re-sent (≤ {allowed:.0f})")
    assert resent <= allowed


@pytest.mark.slow
def test_a_killed_driver_resumes_asking_only_what_was_in_flight(ray_cluster, clean, make_stub, tmp_path, monkeypatch):
    """``synthq run --engine ray --address`` joins this session's cluster as a driver of its own; it is SIGKILLed
    (its actors go with it) after about half the requests, then run again to the end."""
    (clean, unique), stub = clean, slow_stub(make_stub)
    root = tmp_path / "ray"
    recipe = root / "recipe.json"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps(prompts(stub.url, root)))
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "SYNTHQ_CACHE_DIR": str(root / "synthq-cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "synthq_hf.cli", "run", str(recipe), "--engine", "ray", "--address", address]

    log = root / "stderr.txt"

    def start() -> subprocess.Popen:  # stderr to a file: Ray Data's progress lines would fill a pipe and stall it
        with log.open("w") as err:
            return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)

    first = start()
    wait_for(lambda: len(chats(stub)) >= 0.5 * len(unique) or first.poll() is not None)
    assert first.poll() is None, f"the run ended before the kill: {log.read_text()[-2000:]}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    answers_per_s = rate(stub)
    time.sleep(2)  # the cluster reaps the dead driver's actors
    settle(stub)
    asked_before = len(set(chats(stub)))
    second = start()
    assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    same_dataset(root / "out", clean)
    sent = chats(stub)
    assert set(sent) == unique
    resent = sum(count - 1 for count in Counter(sent).values())
    actors = 4  # two stage lines, at most two actors each
    allowed = actors * CAP + answers_per_s * 1.0
    print(f"driver killed after {asked_before} of {len(unique)} requests; {resent} re-sent (≤ {allowed:.0f})")
    assert resent <= allowed


def test_a_window_gives_each_row_once_and_never_drops_one_quietly():
    """What the driver does with the blocks Ray hands back: a block done twice (a retried task whose first try
    had answered) counts once; a row missing is an error naming how many, not a shorter dataset."""
    from synthq_hf.ray_engine import ROW, _in_order

    block = [{ROW: p, "x": p * 10} for p in (4, 5)]
    rows = [{ROW: 3, "x": 30}, *block, *[dict(r) for r in block]]
    assert list(_in_order(rows, 3, 3)) == [{"x": 30}, {"x": 40}, {"x": 50}]
    with pytest.raises(RuntimeError, match="lost 1 rows"):
        list(_in_order([{ROW: 3, "x": 30}, {ROW: 5, "x": 50}], 3, 3))
