# --- stub server fixtures ---
# Self-contained block: local stub LLM servers (tests/stub_server.py) and fast endpoint configs pointing at them.
# Other fixtures (e.g. a real llama.cpp server) go below the end marker.
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from stub_server import StubServer

from synthq_hf.endpoint import EndpointConfig


@pytest.fixture
def make_stub() -> Iterator[Callable[..., StubServer]]:
    """Factory: ``make_stub("tgi", max_concurrent=7)`` starts a stub server, stopped when the test ends."""
    servers: list[StubServer] = []

    def make(dialect: str = "openai", **kwargs) -> StubServer:
        server = StubServer(dialect=dialect, **kwargs).start()
        assert server.url, "stub server did not start"
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def stub(make_stub: Callable[..., StubServer]) -> StubServer:
    """A generic OpenAI-compatible stub server."""
    return make_stub("openai")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., EndpointConfig]:
    """Factory for an :class:`EndpointConfig` tuned for tests: fast backoff, short timeout, per-test cache file."""

    def make(url: str, **overrides) -> EndpointConfig:
        fields = {
            "backoff_s": 0.01,
            "max_backoff_s": 0.05,
            "timeout_s": 5.0,
            "cache_path": str(tmp_path / "c.sqlite"),
        }
        fields.update(overrides)
        return EndpointConfig(url=url, **fields)

    return make


# --- end stub server fixtures ---


# --- real llama.cpp server fixtures ---
import os  # noqa: E402

from synthq_hf.local_server import LocalServer  # noqa: E402


@pytest.fixture(scope="session")
def local_server_url() -> Iterator[str]:
    """One embedded llama-cpp-python server (bundled SmolLM2-135M) for the whole session."""
    server = LocalServer().start()
    previous = os.environ.get("SYNTHQ_LOCAL_URL")
    os.environ["SYNTHQ_LOCAL_URL"] = server.url  # url="local" and num_proc workers reuse this server
    try:
        yield server.url
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("SYNTHQ_LOCAL_URL", None)
        else:
            os.environ["SYNTHQ_LOCAL_URL"] = previous


@pytest.fixture
def local_endpoint(local_server_url: str, tmp_path: Path) -> EndpointConfig:
    """A config for the session's real server with a per-test request cache."""
    return EndpointConfig(url=local_server_url, timeout_s=300.0, cache_path=str(tmp_path / "c.sqlite"))
