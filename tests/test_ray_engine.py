"""The ``ray`` engine writes what the ``datasets`` engine writes: the graph recipe of test_graph (demonstrations,
instructions, preferences with the tiny reward model) run both ways against the stub, on one local Ray cluster
for the session."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import load_dataset
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
