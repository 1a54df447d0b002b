"""Bad input through the command line, as a user meets it: each case is refused in one line naming the culprit
(exit code 2, no traceback), or handled with every input row in the output (issue 9).

Each case runs ``synthq run`` / ``synthq score`` as a subprocess against a stub LLM server in this process, with
a few rows written to ``tmp_path``. "Handled" means: every input row is in ``train`` or ``rejected`` (``score``:
in ``train``, failures with ``score_instruction_error``), every rejected row says why, every row has an ``id``.
The rules themselves are in README.md, "Input rules".
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from app_server import AppServer
from datasets import load_dataset

KEYWORDS = json.dumps({"intention": "group rows", "keywords": ["pandas groupby", "average"]})
SEEDS = 2
HUGE = " ".join(f"word{i % 5000}" for i in range(120_000))  # about 1 MB, none of it the seeds' keywords


def doc(i: int) -> str:
    return f"pandas groupby note {i} on the average of topic {i}"


def text_id(text: str) -> str:
    """The documented id of a row without one: blake2b of its text, 12 bytes, hex."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class HtmlServer(AppServer):
    """A web server where an LLM server was expected: every route answers 200 with an HTML page."""

    def _app(self) -> web.Application:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<html><body><h1>Welcome to nginx!</h1></body></html>", content_type="text/html")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", page)
        return app


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSONL; a ``bytes`` row is written as is (broken lines, other encodings)."""
    with path.open("wb") as fh:
        for row in rows:
            fh.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
    return path


def synthq(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SYNTHQ_CACHE_DIR": str(tmp_path / "synthq-cache"),  # the corpus index and request cache of this case
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        # The hash seed under which a corpus without ids ended, before the fix, in "Exception ignored ...
        # ValueError: Invalid file descriptor: -1" (the garbage collector's order at exit follows it).
        "PYTHONHASHSEED": "2",
    }
    cmd = [sys.executable, "-m", "synthq_hf.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def assert_refused(result: subprocess.CompletedProcess, *culprits: str) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for culprit in culprits:
        assert culprit in lines[0], lines[0]


def assert_clean(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


def recipe(tmp_path: Path, url: str, corpus: Path, **changes) -> Path:
    data = {
        "name": "bad-input",
        "cache_path": str(tmp_path / "requests.sqlite"),
        "endpoints": {"generator": {"url": url, "backoff_s": 0.01, "timeout_s": 10, "max_retries": 1}},
        "seeds": {"dataset": "bundled:seeds", "text_column": "prompt", "limit": SEEDS},
        "corpus": {"dataset": str(corpus), "text_column": "text", "streaming": True},
        "search": {"backend": "bm25", "index": None},
        "demonstrations": {"extract_keywords": {}, "search_documents": {}, "ground": {}},
        "instructions": {"generate_instruction": {"k": 1}, "score_instruction": {}, "filter": {"threshold": 3}},
        "output": {"dir": str(tmp_path / "out")},
        **changes,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")  # pipeline order matters
    return path


@pytest.fixture
def run_stub(make_stub):
    """A stub whose first replies are the seeds' keywords, so search grounds them in the corpus's documents."""
    stub = make_stub("openai")
    stub.queue(*[KEYWORDS] * SEEDS)
    return stub


GOOD = [{"id": f"d{i}", "text": doc(i)} for i in range(3)]

# --- synthq run: refused ------------------------------------------------------------------------------------------

REFUSED_CORPUS = {
    "broken JSONL line": ([*GOOD, b'{"id": "d9", "text": "unfinished\n'], ["corpus.jsonl line 4 is not valid JSON"]),
    "line not an object": ([*GOOD, b"[1, 2]\n"], ["corpus.jsonl line 4 is not a JSON object"]),
    "missing column": ([{"id": "d0", "body": doc(0)}], ["corpus.jsonl has no column 'text'", "body"]),
    "non-UTF-8 bytes": ([GOOD[0], b'{"id": "d1", "text": "caf\xe9"}\n'], ["corpus.jsonl line 2 is not UTF-8"]),
    "text not a string": ([*GOOD, {"id": "d3", "text": 42}], ["corpus.jsonl line 4: column 'text'", "got int"]),
    "empty file": ([], ["corpus.jsonl is empty"]),
}


@pytest.mark.parametrize("case", list(REFUSED_CORPUS))
def test_run_refuses_a_bad_corpus_in_one_line(case, run_stub, tmp_path) -> None:
    rows, culprits = REFUSED_CORPUS[case]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    assert_refused(synthq(tmp_path, "run", str(recipe(tmp_path, run_stub.url, corpus))), *culprits)


def test_run_refuses_an_empty_file_of_another_format(run_stub, tmp_path) -> None:
    corpus = tmp_path / "corpus.json"  # not JSONL: datasets ended in StopIteration here too
    corpus.write_bytes(b"")
    assert_refused(synthq(tmp_path, "run", str(recipe(tmp_path, run_stub.url, corpus))), "corpus.json is empty")


def test_run_refuses_a_bad_seeds_file_in_one_line(run_stub, tmp_path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"prompt": "fine"}, b'{"prompt": 7}\n'])
    path = recipe(tmp_path, run_stub.url, corpus)
    assert_refused(
        synthq(tmp_path, "run", str(path), "--set", f"seeds.dataset={seeds}"), "seeds.jsonl line 2: column 'prompt'"
    )


def test_run_refuses_a_missing_seeds_file(run_stub, tmp_path) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    path = recipe(tmp_path, run_stub.url, corpus)
    missing = tmp_path / "no-such-seeds.jsonl"
    assert_refused(synthq(tmp_path, "run", str(path), "--set", f"seeds.dataset={missing}"), str(missing))


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("corpus.limitt=3", "unknown key corpus.limitt; valid keys: dataset, text_column"),
        ("endpoints.generator.timeout=3", "unknown key endpoints.generator.timeout"),
        ("instructions.scroe_instruction={}", "unknown stage instructions.scroe_instruction"),
        ("instructions.score_instruction.thresh=3", "unknown parameter instructions.score_instruction.thresh"),
        ("corpus.limit", "--set expects KEY=VALUE (e.g. endpoints.generator.url=http://tgi:8080), got 'corpus.limit'"),
    ],
    ids=["recipe key typo", "endpoint key typo", "stage name typo", "unknown stage parameter", "--set no value"],
)
def test_run_refuses_recipe_typos(override, culprit, run_stub, tmp_path) -> None:
    path = recipe(tmp_path, run_stub.url, write_jsonl(tmp_path / "corpus.jsonl", GOOD))
    assert_refused(synthq(tmp_path, "run", str(path), "--set", override), culprit)
    assert run_stub.seen == []  # refused before any request


def test_run_refuses_a_recipe_that_is_not_yaml(tmp_path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\nendpoints:\n  generator: {url: local\nseeds: {}\n", encoding="utf-8")
    assert_refused(synthq(tmp_path, "run", str(path)), f"{path} line", "is not valid YAML")


def test_run_refuses_an_unreachable_endpoint(tmp_path) -> None:
    url = closed_port_url()
    path = recipe(tmp_path, url, write_jsonl(tmp_path / "corpus.jsonl", GOOD))
    assert_refused(synthq(tmp_path, "run", str(path)), f"cannot reach {url}")


def test_run_refuses_an_endpoint_answering_html(tmp_path) -> None:
    with HtmlServer() as html:
        path = recipe(tmp_path, html.url, write_jsonl(tmp_path / "corpus.jsonl", GOOD))
        assert_refused(synthq(tmp_path, "run", str(path)), f"{html.url} speaks none of the known LLM server routes")


def test_run_refuses_an_output_folder_holding_other_files(run_stub, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    path = recipe(tmp_path, run_stub.url, write_jsonl(tmp_path / "corpus.jsonl", GOOD))
    assert_refused(synthq(tmp_path, "run", str(path)), f"{out} holds files that are not a synthq run", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing of the user's touched


# --- synthq run: handled ------------------------------------------------------------------------------------------

HANDLED_CORPUS = {
    "null ids": [{"id": None, "text": doc(0)}, {"id": "", "text": doc(1)}, {"id": "d2", "text": doc(2)}],
    "duplicate ids": [{"id": "d0", "text": doc(0)}, {"id": "d0", "text": doc(1)}, {"id": "d0", "text": doc(0)}],
    "no id column": [{"text": doc(i)} for i in range(4)],
    "empty and whitespace text": [*GOOD, {"id": "e1", "text": ""}, {"id": "e2", "text": " \n\t "}],
    "null and absent text": [*GOOD, {"id": "e1", "text": None}, {"id": "e2"}],
    "a 1 MB text": [*GOOD, {"id": "big", "text": HUGE}],
}


def expected_id(row: dict) -> str:
    return row["id"] if row.get("id") else text_id(row.get("text") or "")


@pytest.mark.parametrize("case", list(HANDLED_CORPUS))
def test_run_handles_odd_rows_and_loses_none(case, run_stub, tmp_path) -> None:
    rows = HANDLED_CORPUS[case]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", rows)
    result = synthq(tmp_path, "run", str(recipe(tmp_path, run_stub.url, corpus)))
    assert_clean(result)
    out = tmp_path / "out"
    splits = load_dataset(str(out), "instructions")
    written = [row for split in splits.values() for row in split]
    assert Counter((r["id"], r["document"]) for r in written) == Counter(
        (expected_id(r), r.get("text")) for r in rows
    )  # every row once, with its own id or the hash of its text
    for row in splits["rejected"] if "rejected" in splits else []:
        assert row["rejected_by"] and row["reason"], row
    for row in written:
        if not (row["document"] or "").strip():
            assert row["rejected_by"] == "generate_instruction", row
            assert "empty or missing document" in row["reason"]
    derived = sum(1 for r in rows if not r.get("id"))
    report = json.loads((out / "run.json").read_text())
    assert report["derived_ids"].get("instructions", 0) == derived
    card = (out / "README.md").read_text()
    assert (f"{derived} rows without an id got the hash of their text" in card) == bool(derived)
    if case == "a 1 MB text":  # the document is cut by tokens before it is sent: no megabyte request
        assert max(len(json.dumps(p)) for _, p in run_stub.requests) < 100_000


# --- synthq score -------------------------------------------------------------------------------------------------

PROMPTS = [{"id": f"p{i}", "prompt": f"Explain step {i} of a pandas groupby with an example."} for i in range(3)]

REFUSED_SCORE = {
    "broken JSONL line": ([*PROMPTS, b"{not json}\n"], ["in.jsonl line 4 is not valid JSON"]),
    "missing column": ([{"id": "p0", "question": "why?"}], ["in.jsonl has no column 'prompt'", "question"]),
    "non-UTF-8 bytes": ([b'{"prompt": "\xff\xfe"}\n'], ["in.jsonl line 1 is not UTF-8 (byte 0xff"]),
    "text not a string": ([*PROMPTS, {"prompt": ["a", "list"]}], ["in.jsonl line 4: column 'prompt'", "got list"]),
    "empty file": ([], ["in.jsonl is empty"]),
}


def score(tmp_path: Path, source: Path | str, url: str, *extra: str) -> subprocess.CompletedProcess:
    cache = str(tmp_path / "requests.sqlite")
    return synthq(tmp_path, "score", str(source), "--endpoint", url, "--output", str(tmp_path / "out"),
                  "--cache-path", cache, *extra)  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_SCORE))
def test_score_refuses_a_bad_file_in_one_line(case, stub, tmp_path) -> None:
    rows, culprits = REFUSED_SCORE[case]
    assert_refused(score(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), stub.url), *culprits)
    assert stub.seen == []


def test_score_refuses_a_missing_file(stub, tmp_path) -> None:
    assert_refused(score(tmp_path, tmp_path / "nope.jsonl", stub.url), f"no such file {tmp_path / 'nope.jsonl'}")


def test_score_refuses_an_unreachable_endpoint(tmp_path) -> None:
    url = closed_port_url()
    assert_refused(score(tmp_path, write_jsonl(tmp_path / "in.jsonl", PROMPTS), url), f"cannot reach {url}")


def test_score_refuses_an_endpoint_answering_html(tmp_path) -> None:
    with HtmlServer() as html:
        result = score(tmp_path, write_jsonl(tmp_path / "in.jsonl", PROMPTS), html.url)
        assert_refused(result, f"{html.url} speaks none of the known LLM server routes")


def test_score_refuses_an_output_folder_holding_other_files(stub, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine", encoding="utf-8")
    result = score(tmp_path, write_jsonl(tmp_path / "in.jsonl", PROMPTS), stub.url)
    assert_refused(result, f"{tmp_path / 'out'} holds files that are not a synthq run", "--overwrite")


HANDLED_SCORE = {
    "null ids": [{"id": None, "prompt": "a?"}, {"id": "", "prompt": "b?"}, {"id": "p2", "prompt": "c?"}],
    "duplicate ids": [{"id": "p0", "prompt": "a?"}, {"id": "p0", "prompt": "b?"}, {"id": "p0", "prompt": "a?"}],
    "no id column": [{"prompt": "a?"}, {"prompt": "b?"}],
    "empty and whitespace text": [*PROMPTS, {"id": "e1", "prompt": ""}, {"id": "e2", "prompt": "  \n "}],
    "null and absent text": [*PROMPTS, {"id": "e1", "prompt": None}, {"id": "e2"}],
    "a 1 MB text": [*PROMPTS, {"id": "big", "prompt": HUGE}],
}


@pytest.mark.parametrize("case", list(HANDLED_SCORE))
def test_score_handles_odd_rows_and_loses_none(case, stub, tmp_path) -> None:
    rows = HANDLED_SCORE[case]
    result = score(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), stub.url)
    assert_clean(result)
    splits = load_dataset(str(tmp_path / "out"), "instructions")  # a row that failed is in rejected
    scored = [row for split in splits.values() for row in split]
    assert Counter((r["id"], r["prompt"]) for r in scored) == Counter(
        (r["id"] if r.get("id") else text_id(r.get("prompt") or ""), r.get("prompt")) for r in rows
    )
    for row in scored:
        if (row["prompt"] or "").strip():
            assert row["score_instruction_error"] is None and row["total_score"] is not None, row
        else:
            assert row["score_instruction_error"] == "score_instruction: empty or missing prompt", row
            assert row["rejected_by"] == "score_instruction", row
    report = json.loads((tmp_path / "out" / "run.json").read_text())
    assert report["derived_ids"].get("instructions", 0) == sum(1 for r in rows if not r.get("id"))
    assert "No score threshold was applied" in (tmp_path / "out" / "README.md").read_text()  # score filters nothing
    if case == "duplicate ids":  # same id and same text: the same request (payload and seed), the same answer
        twins = [r for r in scored if r["prompt"] == "a?"]
        assert len(twins) == 2 and twins[0]["scores"] == twins[1]["scores"]
        sent = [p for route, p in stub.requests if route == "/v1/chat/completions" and "a?" in json.dumps(p)]
        assert len(sent) in (1, 2) and all(p == sent[0] for p in sent)  # two when both were in flight at once


# --- synthq run: a reward model that cannot be used is refused before any request --------------------------------


def preference_recipe(tmp_path: Path, url: str, corpus: Path, **annotate) -> Path:
    data = yaml.safe_load(recipe(tmp_path, url, corpus).read_text(encoding="utf-8"))
    seeds, corpus_spec = data.pop("seeds"), data.pop("corpus")
    data["datasets"] = {
        "demonstrations": {"source": {**seeds, "as": "prompt"}, "stages": data.pop("demonstrations")},
        "instructions": {"source": {**corpus_spec, "as": "document"}, "stages": data.pop("instructions")},
        "preferences": {
            "source": {"from": "instructions"},
            "stages": {"generate_responses": {"n": 2}, "annotate_preference": annotate},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def model_folder(tmp_path: Path, name: str, config: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "case", ["missing folder", "a causal LM", "remote code not allowed", "unknown pairing", "not a model"]
)
def test_run_refuses_a_reward_model_it_cannot_use(case, run_stub, tmp_path) -> None:
    remote = {"architectures": ["ArmoTiny"], "auto_map": {"AutoModelForSequenceClassification": "m.ArmoTiny"}}
    model, extra, culprits = {
        "missing folder": (str(tmp_path / "no-such-model"), {}, [f"{tmp_path / 'no-such-model'} does not exist"]),
        "a causal LM": (
            str(model_folder(tmp_path, "causal", {"architectures": ["LlamaForCausalLM"]})),
            {},
            ["holds LlamaForCausalLM (a causal language model), not a sequence classifier"],
        ),
        "remote code not allowed": (
            str(model_folder(tmp_path, "remote", remote)),
            {},
            ["set `trust_remote_code: true`"],
        ),
        "unknown pairing": ("bundled:tiny-reward", {"pairing": "median"}, ["unknown pairing 'median'"]),
        "not a model": (str(tmp_path), {}, [f"{tmp_path} has no config.json"]),
    }[case]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", GOOD)
    path = preference_recipe(tmp_path, run_stub.url, corpus, model=model, **extra)
    assert_refused(synthq(tmp_path, "run", str(path)), "annotate_preference", *culprits)
    assert run_stub.seen == []  # refused before the first request, not after every response was generated


def test_the_ray_engine_without_ray_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    """Ray is installed here, so a module that fails to import stands in for it being absent (a ``ray`` on
    PYTHONPATH ahead of site-packages): the refusal comes before the recipe's inputs are read or a model built."""
    shim = tmp_path / "no-ray"
    shim.mkdir()
    (shim / "ray.py").write_text('raise ModuleNotFoundError("No module named \'ray\'", name="ray")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    result = synthq(tmp_path, "run", "demo", "--engine", "ray", "--output", str(tmp_path / "out"))
    assert_refused(result, 'pip install -e ".[ray]"')
    assert not (tmp_path / "out").exists() and not (tmp_path / "synthq-cache").exists()
