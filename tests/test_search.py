"""Document search: the BM25 index (build → query, CLI hook, streaming input), the web backend against a local
HTTP server that speaks SearxNG's and Brave's documented JSON and serves real HTML pages, and the stage."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
from aiohttp import web
from app_server import AppServer
from datasets import Dataset, IterableDataset

from synthq_hf.search import (
    FetchError,
    Hit,
    IndexMissing,
    SearchConfigError,
    WebSearch,
    WebSearchConfig,
    add_index_commands,
    build_index,
    load_index,
)
from synthq_hf.stages import output_features
from synthq_hf.stages._common import ColumnError
from synthq_hf.stages.search_documents import FEATURES, is_near_copy, search_documents

datasets.disable_progress_bars()
PAGES = Path(__file__).parent / "fixtures" / "web"

DOCS = [
    {"doc": "bio-1", "body": "Photosynthesis in plant leaves uses chlorophyll to capture sunlight and make sugar."},
    {"doc": "geo-1", "body": "Volcanoes erupt when magma from the mantle rises through cracks in the crust."},
    {"doc": "cook-1", "body": "Bakers feed a sourdough starter with flour and water to keep the wild yeast running."},
    {"doc": "empty", "body": "   "},
    {"doc": "astro-1", "body": "Jupiter is the largest planet of the solar system and has dozens of moons."},
    {"doc": "copy", "body": "glacier melting sea level"},
    {"doc": "geo-2", "body": "Melting glacier ice raises the global sea level; the level rose about 20 cm since 1900."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rows = [{**row, "link": f"https://example.org/{row['doc']}"} for row in DOCS]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


@pytest.fixture
def index_dir(tmp_path: Path, corpus: Path) -> Path:
    out = tmp_path / "index"
    build_index(str(corpus), text_column="body", out=out, id_column="doc", url_column="link", progress=False)
    return out


# -- BM25 index ---------------------------------------------------------------------------------------------------
def test_tied_scores_rank_by_document_id_whatever_the_build_order(tmp_path: Path) -> None:
    """Two builds of one corpus must ground a seed in the same document: equal BM25 scores break by id, not by
    where the build happened to put each document (input order, threads, segments)."""
    twins = [
        {"doc": f"twin-{i:02d}", "body": "Tidal locking keeps one face of the Moon toward Earth."} for i in range(12)
    ]
    other = [{"doc": f"other-{i:03d}", "body": f"Unrelated note {i} about gardening and soil."} for i in range(300)]
    rows = other[:150] + twins + other[150:]
    results = []
    for name, order in (("forward", rows), ("reversed", rows[::-1])):
        source = write_jsonl(tmp_path / f"{name}.jsonl", order)
        build_index(str(source), text_column="body", out=tmp_path / name, id_column="doc", progress=False)
        index = load_index(tmp_path / name)
        results.append([(h.document_id, h.score) for h in index.search_sync("tidal locking moon", k=5)])
    assert results[0] == results[1]
    assert [doc for doc, _ in results[0]] == [f"twin-{i:02d}" for i in range(5)]


def test_build_then_query_returns_the_stored_document(index_dir: Path) -> None:
    index = load_index(index_dir)
    assert index.meta["documents"] == len(DOCS) - 1 and index.meta["skipped_empty"] == 1
    hits = index.search_sync("chlorophyll sunlight", k=3)
    assert hits[0].document_id == "bio-1"
    assert hits[0].text == DOCS[0]["body"]
    assert hits[0].url == "https://example.org/bio-1"
    assert hits[0].score > 0
    # English stemming: "erupting volcano" finds "Volcanoes erupt"; query syntax characters are plain text.
    assert index.search_sync('erupting volcano: (magma) "crust" +AND', k=1)[0].document_id == "geo-1"
    assert index.search_sync("zzzz qqqq", k=5) == []
    assert load_index(index_dir) is index, "an index is opened once per process and path"


def test_hits_read_stored_fields_only_when_asked(index_dir: Path) -> None:
    hits = load_index(index_dir).search_sync("chlorophyll sunlight", k=3)
    assert all(hit._doc is None for hit in hits), "nothing is read from the store until a field is used"
    assert hits[0].to_hit() == Hit("bio-1", DOCS[0]["body"], "https://example.org/bio-1", hits[0].score)
    assert hits[0].title is None and hits[0].error is None


def test_row_number_is_the_id_without_an_id_column(tmp_path: Path, corpus: Path) -> None:
    build_index(str(corpus), text_column="body", out=tmp_path / "ix", progress=False)
    hit = load_index(tmp_path / "ix").search_sync("jupiter moons", k=1)[0]
    assert hit.document_id == "4" and hit.url is None  # row 4 (the empty row 3 keeps its number)


def test_cli_hook_builds_an_index_from_parquet(tmp_path: Path, capsys) -> None:
    Dataset.from_list(DOCS).to_parquet(str(tmp_path / "docs.parquet"))
    parser = argparse.ArgumentParser(prog="synthq")
    add_index_commands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli-index"
    argv = f"index build --dataset {tmp_path / 'docs.parquet'} --text-column body --id-column doc --limit 3"
    args = parser.parse_args([*argv.split(), "--out", str(out)])
    assert args.func(args) == 0
    assert "indexed 3 documents" in capsys.readouterr().out
    index = load_index(out)
    assert len(index) == 3
    assert index.search_sync("sourdough yeast", k=1)[0].document_id == "cook-1"
    assert index.search_sync("jupiter", k=1) == [], "--limit 3 stops before row 4"
    with pytest.raises(FileExistsError):
        args.func(args)


def test_streaming_input_is_indexed_without_knowing_its_length(tmp_path: Path, corpus: Path) -> None:
    def rows() -> Iterator[dict]:
        for number in range(500):
            yield {"text": f"record {number} about topic{number % 7} and item{number}"}

    stream = IterableDataset.from_generator(rows)
    meta = build_index(stream, out=tmp_path / "gen", progress=False)
    assert meta["documents"] == 500
    hit = load_index(tmp_path / "gen").search_sync("item321", k=1)[0]
    assert hit.text == "record 321 about topic6 and item321"

    lazily = datasets.load_dataset("json", data_files=str(corpus), split="train", streaming=True)
    assert build_index(lazily, text_column="body", out=tmp_path / "lazy", progress=False)["documents"] == 6


def test_missing_index_is_one_line_saying_how_to_build_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(IndexMissing) as err:
        load_index(missing)
    message = str(err.value)
    assert "\n" not in message
    assert str(missing) in message and "synthq index build --dataset" in message and "--text-column text" in message
    ds = Dataset.from_dict({"keywords": [["a"]]})
    with pytest.raises(IndexMissing):
        ds.map(search_documents, fn_kwargs={"index": str(missing)})


def test_bad_text_column_is_a_column_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": 3}])
    with pytest.raises(ColumnError, match="must hold strings"):
        build_index(str(path), out=tmp_path / "x", progress=False)
    with pytest.raises(ColumnError, match="no text column 'body'"):
        build_index(str(path), text_column="body", out=tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists(), "a failed build leaves nothing"
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_index(str(tmp_path / "absent.jsonl"), out=tmp_path / "z", progress=False)


# -- the stage over the index ---------------------------------------------------------------------------------------
def test_stage_over_index_keeps_every_row(index_dir: Path) -> None:
    ds = Dataset.from_dict(
        {"keywords": [["chlorophyll", "sunlight"], [], None, ["zzzz"], ["planet", " ", "moons"]], "id": list("abcde")}
    )
    out = ds.map(
        search_documents,
        fn_kwargs={"index": str(index_dir)},
        features=output_features(ds.features, search_documents),
    )
    assert out.num_rows == 5 and out["id"] == list("abcde")
    assert out["document_id"] == ["bio-1", None, None, None, "astro-1"]
    assert out[0]["document"] == DOCS[0]["body"] and out[0]["document_url"] == "https://example.org/bio-1"
    assert out[0]["search_score"] > 0 and out[0]["search_documents_error"] is None
    errors = out["search_documents_error"]
    assert "empty or missing" in errors[1] and "empty or missing" in errors[2]
    assert "no results for 'zzzz'" in errors[3]
    assert out.features["search_score"] == FEATURES["search_score"]

    stream = IterableDataset.from_generator(lambda: iter([{"query": "erupting volcano"}, {"query": ""}]))
    rows = list(stream.map(search_documents, fn_kwargs={"index": str(index_dir)}))
    assert [r["document_id"] for r in rows] == ["geo-1", None] and rows[1]["search_documents_error"]


def test_query_column_works_and_the_near_copy_is_skipped(index_dir: Path) -> None:
    index = load_index(index_dir)
    assert index.search_sync("glacier melting sea level", k=1)[0].document_id == "copy", "the copy ranks first"
    ds = Dataset.from_dict({"query": ["glacier melting sea level"]})
    row = ds.map(search_documents, fn_kwargs={"index": str(index_dir)})[0]
    assert row["document_id"] == "geo-2", row


def test_near_copy_rule() -> None:
    query = "glacier melting sea level"
    assert is_near_copy(query, "Glacier melting, sea level!")
    assert is_near_copy(query, "glacier melting sea level rise")  # the query almost whole in a short doc
    assert not is_near_copy(query, "Why glacier melting raises the sea level: meltwater adds mass to the ocean.")
    assert not is_near_copy(query, "An unrelated paragraph about sourdough bread and wild yeast.")
    assert is_near_copy(query, "  ...  "), "nothing left after folding punctuation counts as empty"


def test_wrong_column_types_are_column_errors(index_dir: Path) -> None:
    with pytest.raises(ColumnError, match="must hold strings"):
        Dataset.from_dict({"query": [1, 2]}).map(search_documents, fn_kwargs={"index": str(index_dir)})
    with pytest.raises(ColumnError, match="lists of strings"):
        Dataset.from_dict({"keywords": ["not a list"]}).map(search_documents, fn_kwargs={"index": str(index_dir)})
    with pytest.raises(ColumnError, match="'keywords' or 'query'"):
        Dataset.from_dict({"prompt": ["x"]}).map(search_documents, fn_kwargs={"index": str(index_dir)})
    with pytest.raises(ValueError, match="exactly one"):
        Dataset.from_dict({"query": ["x"]}).map(search_documents)


# -- web backend against a local server --------------------------------------------------------------------------
BRAVE_KEY = "test-brave-key-5ecret"


class SearchSite(AppServer):
    """A local HTTP server: SearxNG's ``/search?format=json``, Brave's ``/res/v1/web/search``, article pages,
    and pages that fail in the ways real sites do. Runs its own event loop in a thread."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.seen_headers: list[dict[str, str]] = []

    def results(self) -> list[dict[str, str]]:
        return [
            {"url": f"{self.url}/missing.html", "title": "Gone", "snippet": "this page is gone"},
            {"url": f"{self.url}/paper.pdf", "title": "A PDF", "snippet": "a pdf about sourdough"},
            {"url": f"{self.url}/articles/sourdough.html", "title": "Sourdough in winter", "snippet": "feed it warm"},
            {"url": f"{self.url}/articles/tidal.html", "title": "Tidal turbines", "snippet": "predictable power"},
        ]

    async def searxng(self, request: web.Request) -> web.Response:
        self.hits["searxng"] += 1
        if request.query.get("format") != "json":
            return web.Response(status=403, text="format not allowed")
        results = [
            {
                "url": r["url"],
                "title": r["title"],
                "content": r["snippet"],
                "engine": "duckduckgo",
                "engines": ["duckduckgo", "brave"],
                "positions": [rank + 1],
                "score": round(4.0 / (rank + 1), 3),
                "category": "general",
                "parsed_url": ["http", self.url.removeprefix("http://"), "/", "", "", ""],
                "template": "default.html",
                "publishedDate": None,
            }
            for rank, r in enumerate(self.results())
        ]
        body = {
            "query": request.query["q"],
            "number_of_results": 0,
            "results": results,
            "answers": [],
            "corrections": [],
            "infoboxes": [],
            "suggestions": ["sourdough starter temperature"],
            "unresponsive_engines": [],
        }
        return web.json_response(body)

    async def brave(self, request: web.Request) -> web.Response:
        self.hits["brave"] += 1
        self.seen_headers.append(dict(request.headers))
        if request.headers.get("X-Subscription-Token") != BRAVE_KEY:
            return web.json_response(
                {"type": "ErrorResponse", "error": {"status": 401, "code": "UNAUTHORIZED"}}, status=401
            )
        count = int(request.query.get("count", "20"))
        results = [
            {
                "type": "search_result",
                "title": r["title"],
                "url": r["url"],
                "description": r["snippet"],
                "is_source_local": False,
                "language": "en",
                "profile": {"name": "Example", "url": r["url"]},
                "meta_url": {"scheme": "http", "netloc": "127.0.0.1", "path": "› articles"},
            }
            for r in self.results()[::-1][:count]
        ]
        body = {
            "type": "search",
            "query": {"original": request.query["q"], "more_results_available": False},
            "mixed": {
                "type": "mixed",
                "main": [{"type": "web", "index": i, "all": False} for i in range(len(results))],
            },
            "web": {"type": "search", "results": results, "family_friendly": True},
        }
        return web.json_response(body)

    async def article(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.hits[name] += 1
        path = PAGES / name
        if not path.is_file():
            return web.Response(status=404, text="not found")
        return web.Response(body=path.read_bytes(), content_type="text/html", charset="utf-8")

    async def missing(self, request: web.Request) -> web.Response:
        self.hits["missing"] += 1
        return web.Response(status=404, text="<html><body>Not found</body></html>", content_type="text/html")

    async def pdf(self, request: web.Request) -> web.Response:
        self.hits["pdf"] += 1
        return web.Response(body=b"%PDF-1.7 " + b"x" * 1000, content_type="application/pdf")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body><p>" + "word " * 50_000 + "</p></body></html>", content_type="text/html")

    async def big_chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"<p>" + b"word " * 2000 + b"</p>")
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="<html><body><p>late</p></body></html>", content_type="text/html")

    async def plain(self, request: web.Request) -> web.Response:
        return web.Response(text="Plain text notes on tidal power.\n", content_type="text/plain")

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/search", self.searxng)
        app.router.add_get("/res/v1/web/search", self.brave)
        app.router.add_get("/articles/{name}", self.article)
        app.router.add_get("/missing.html", self.missing)
        app.router.add_get("/paper.pdf", self.pdf)
        app.router.add_get("/big.html", self.big)
        app.router.add_get("/big-chunked.html", self.big_chunked)
        app.router.add_get("/slow.html", self.slow)
        app.router.add_get("/notes.txt", self.plain)
        return app


@pytest.fixture
def site() -> Iterator[SearchSite]:
    with SearchSite() as server:
        yield server


def searxng(site: SearchSite, tmp_path: Path, **overrides) -> WebSearchConfig:
    fields = {"provider": "searxng", "base_url": site.url, "cache_path": str(tmp_path / "web.sqlite"), "timeout_s": 2}
    return WebSearchConfig(**{**fields, **overrides})


def test_searxng_stage_extracts_the_article_not_the_boilerplate(site: SearchSite, tmp_path: Path) -> None:
    ds = Dataset.from_dict({"keywords": [["sourdough", "starter", "winter"]]})
    row = ds.map(search_documents, fn_kwargs={"web": searxng(site, tmp_path)})[0]
    assert row["search_documents_error"] is None, row["search_documents_error"]
    assert row["document_url"] == f"{site.url}/articles/sourdough.html"
    assert row["search_score"] == 1.333  # SearxNG's own score of the third result
    text = row["document"]
    assert "wild yeast and lactic acid bacteria" in text and "called hooch" in text
    for boilerplate in ("cookie", "Shop our flour", "Subscribe to our newsletter", "All rights reserved", "Advertis"):
        assert boilerplate.lower() not in text.lower(), boilerplate
    assert row["document_id"].startswith("web:")


def test_results_and_pages_come_from_the_cache_the_second_time(site: SearchSite, tmp_path: Path) -> None:
    cfg = searxng(site, tmp_path)
    ds = Dataset.from_dict({"query": ["tidal turbines"]})
    first = ds.map(search_documents, fn_kwargs={"web": cfg}, load_from_cache_file=False)[0]
    before = dict(site.hits)
    second = ds.map(search_documents, fn_kwargs={"web": cfg}, load_from_cache_file=False)[0]
    assert second == first
    assert site.hits["searxng"] == before["searxng"] == 1
    assert site.hits["missing"] == 1 and site.hits["pdf"] == 1, "permanent page failures are cached too"
    assert site.hits["sourdough.html"] == 1


def test_brave_format_and_key_header(site: SearchSite, tmp_path: Path, monkeypatch) -> None:
    cfg = WebSearchConfig(
        provider="brave", base_url=f"{site.url}/res/v1/web/search", cache_path=str(tmp_path / "b.sqlite")
    )
    monkeypatch.delenv("BRAVE_API_KEY", raising=False)
    ds = Dataset.from_dict({"keywords": [["tidal", "turbine"]]})
    with pytest.raises(SearchConfigError, match="BRAVE_API_KEY is not set"):
        ds.map(search_documents, fn_kwargs={"web": cfg})
    monkeypatch.setenv("BRAVE_API_KEY", BRAVE_KEY)
    row = ds.map(search_documents, fn_kwargs={"web": cfg}, load_from_cache_file=False)[0]
    assert row["search_documents_error"] is None, row
    assert row["document_url"] == f"{site.url}/articles/tidal.html", "Brave's first result (the list is reversed)"
    assert "eight hundred times denser than air" in row["document"]
    assert "Sign in" not in row["document"] and "Share this article" not in row["document"]
    assert row["search_score"] == 1.0, "Brave gives no score: rank 1 → 1.0"
    assert site.seen_headers[-1]["X-Subscription-Token"] == BRAVE_KEY
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("b.sqlite*"))  # the map's end flushed the cache
    assert b"eight hundred times" in stored and BRAVE_KEY.encode() not in stored

    monkeypatch.setenv("BRAVE_API_KEY", "wrong")
    with pytest.raises(SearchConfigError) as err:
        Dataset.from_dict({"query": ["new query"]}).map(search_documents, fn_kwargs={"web": cfg})
    assert "HTTP 401" in str(err.value) and "wrong" not in str(err.value)


def test_page_failures(site: SearchSite, tmp_path: Path) -> None:
    async def fetch(path: str, **overrides) -> str:
        client = WebSearch(searxng(site, tmp_path, cache=False, **overrides))
        try:
            return await client.fetch_text(site.url + path)
        finally:
            await client.close()

    def failure(path: str, **overrides) -> FetchError:
        with pytest.raises(FetchError) as err:
            asyncio.run(fetch(path, **overrides))
        return err.value

    assert "eight hundred times denser" in asyncio.run(fetch("/articles/tidal.html"))
    assert asyncio.run(fetch("/notes.txt")) == "Plain text notes on tidal power."
    err = failure("/missing.html")
    assert "HTTP 404" in str(err) and err.permanent
    err = failure("/paper.pdf")
    assert "application/pdf is not HTML or text" in str(err) and err.permanent
    err = failure("/big.html", max_page_bytes=100_000)
    assert "cap" in str(err) and err.permanent
    err = failure("/big-chunked.html", max_page_bytes=100_000)  # no Content-Length: the body read stops at the cap
    assert "over the 100000 byte cap" in str(err)
    err = failure("/slow.html", timeout_s=0.3)
    assert "within 0.3 s" in str(err) and not err.permanent
    assert site.url not in str(err), "errors name the host only"


def test_no_usable_page_is_a_row_error_naming_the_reasons(tmp_path: Path) -> None:
    class Broken(SearchSite):
        def results(self) -> list[dict[str, str]]:
            return super().results()[:2]  # only the 404 and the PDF

    with Broken() as broken:
        cfg = searxng(broken, tmp_path)
        row = Dataset.from_dict({"query": ["sourdough"]}).map(search_documents, fn_kwargs={"web": cfg})[0]
    assert row["document"] is None
    error = row["search_documents_error"]
    assert "all 2 results" in error and "HTTP 404" in error and "application/pdf" in error


def test_searxng_without_json_format_is_a_config_error(tmp_path: Path) -> None:
    class NoJson(SearchSite):
        async def searxng(self, request: web.Request) -> web.Response:
            return web.Response(status=403, text="Forbidden")

    with NoJson() as server:
        cfg = searxng(server, tmp_path)
        with pytest.raises(SearchConfigError, match="enable the json format"):
            Dataset.from_dict({"query": ["x"]}).map(search_documents, fn_kwargs={"web": cfg})
