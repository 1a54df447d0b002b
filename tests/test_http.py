"""The lean HTTP/1.1 client (``synthq_hf.http``) against a raw socket server that answers with scripted bytes.

The server is a test double for an HTTP server's framing, not for our code: each test scripts the exact bytes a
real server may send (Content-Length, chunked, gzip, close-delimited, a keep-alive connection closed while idle,
garbage) and the server records what crossed the wire, so the tests check what the client really sent and read.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import threading
from collections.abc import Callable

import pytest

from synthq_hf.http import CannotConnect, Pool, ProtocolError

OK_JSON = b'{"ok": true}'


def reply(body: bytes = OK_JSON, *headers: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + b"".join(h + b"\r\n" for h in headers)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class RawServer:
    """A thread with a listening socket. ``script(request_index, request_bytes)`` returns the bytes to answer
    and whether to close the connection afterwards (``None`` bytes: answer nothing, keep the socket open)."""

    def __init__(self, script: Callable[[int, bytes], tuple[bytes | None, bool]], tls: ssl.SSLContext | None = None):
        self.script = script
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
        buf = b""
        with conn:
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[: end + 4]
                    size = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            size = int(line.split(b":", 1)[1])
                    if len(buf) >= end + 4 + size:
                        request, buf = buf[: end + 4 + size], buf[end + 4 + size :]
                        self.requests.append(request)
                        data, close = self.script(len(self.requests) - 1, request)
                        if data is None:
                            self._held.append(conn)
                            self._stop.wait()
                            return
                        conn.sendall(data)
                        if close:
                            return
                        continue
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


@pytest.fixture
def serve():
    servers: list[RawServer] = []

    def make(script, tls=None) -> RawServer:
        server = RawServer(script, tls)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def requests(pool: Pool, n: int, method: str = "POST", path: str = "/v1/chat/completions", body=b"{}"):
    try:
        return [await pool.request(method, path, body) for _ in range(n)]
    finally:
        pool.close()


def test_content_length_replies_reuse_one_connection(serve):
    server = serve(lambda i, req: (reply(b'{"n": %d}' % i), False))
    out = run(requests(Pool(server.url), 3))
    assert [r.status for r in out] == [200, 200, 200]
    assert [r.body for r in out] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert out[0].header("Content-Type") == "application/json"
    assert server.connections == 1


def test_request_line_headers_prefix_and_body_on_the_wire(serve):
    server = serve(lambda i, req: (reply(), False))
    pool = Pool(server.url + "/proxy/llm/", headers={"Authorization": "Bearer sk-test"})

    async def go():
        try:
            await pool.request("POST", "/v1/chat/completions", b'{"a": 1}')
            await pool.request("GET", "/info")
        finally:
            pool.close()

    run(go())
    post, get = server.requests
    assert post.startswith(b"POST /proxy/llm/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:%d\r\n" % server.port in post
    assert b"\r\nAuthorization: Bearer sk-test\r\n" in post
    assert b"\r\nContent-Type: application/json\r\n" in post
    assert post.endswith(b'Content-Length: 8\r\n\r\n{"a": 1}')
    assert get.startswith(b"GET /proxy/llm/info HTTP/1.1\r\n")
    assert b"Content-Length" not in get and b"Content-Type" not in get


def test_chunked_reply_is_reassembled(serve):
    chunked = b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"ok"\r\n7\r\n: true}\r\n0\r\n\r\n'
    server = serve(lambda i, req: (chunked, False))
    out = run(requests(Pool(server.url), 2))
    assert [r.body for r in out] == [OK_JSON, OK_JSON]
    assert server.connections == 1


def test_informational_reply_is_skipped(serve):
    server = serve(lambda i, req: (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + reply(), False))
    out = run(requests(Pool(server.url), 2))
    assert [(r.status, r.body) for r in out] == [(200, OK_JSON), (200, OK_JSON)]


def test_gzip_reply_sent_anyway_is_decoded(serve):
    server = serve(lambda i, req: (reply(gzip.compress(OK_JSON), b"Content-Encoding: gzip"), False))
    (out,) = run(requests(Pool(server.url), 1))
    assert out.body == OK_JSON
    assert b"\r\nAccept-Encoding: identity\r\n" in server.requests[0]


def test_unknown_content_encoding_is_a_protocol_error(serve):
    server = serve(lambda i, req: (reply(b"\x00\x01", b"Content-Encoding: br"), False))
    with pytest.raises(ProtocolError, match="Content-Encoding 'br'"):
        run(requests(Pool(server.url), 1))


def test_reply_ending_at_eof_is_read_whole(serve):
    """An HTTP/1.0-style reply: no length, no chunks; the body is everything until the server closes."""
    server = serve(lambda i, req: (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + OK_JSON, True))
    out = run(requests(Pool(server.url), 2))
    assert [r.body for r in out] == [OK_JSON, OK_JSON]
    assert server.connections == 2  # not kept alive: each request on a new connection


def test_keep_alive_connection_closed_while_idle_is_retried_on_a_new_one(serve):
    """The server answers, keeps the socket for a moment, then closes it (an idle keep-alive timeout). The next
    request must not fail for that: it goes out again on a fresh connection (and reaches the server once)."""
    server = serve(lambda i, req: (reply(), True))  # closes after every reply, without saying so

    async def go():
        pool = Pool(server.url)
        try:
            first = await pool.request("POST", "/x", b"{}")
            await asyncio.sleep(0.2)  # the close reaches the client while the connection is idle
            second = await pool.request("POST", "/x", b"{}")
            return first, second
        finally:
            pool.close()

    first, second = run(go())
    assert first.status == second.status == 200
    assert len(server.requests) == 2
    assert server.connections == 2


def test_reused_connection_closed_as_the_request_goes_out_is_retried_once(serve):
    """The race the idle check cannot see: the server drops a kept-alive connection just as the next request is
    written (nothing of a reply came back). That request is sent once more, on a new connection."""
    server = serve(lambda i, req: (b"", True) if i == 1 else (reply(b'{"n": %d}' % i), False))
    out = run(requests(Pool(server.url), 2))
    assert [r.body for r in out] == [b'{"n": 0}', b'{"n": 2}']
    assert len(server.requests) == 3
    assert server.connections == 2


def test_the_resend_goes_to_a_new_connection_not_another_kept_alive_one(serve):
    """Kept-alive connections die together (a server restart): the one re-send must not gamble on a second one."""
    server = serve(lambda i, req: (b"", True) if i == 2 else (reply(b'{"n": %d}' % i), False))

    async def go():
        pool = Pool(server.url)
        try:
            await asyncio.gather(pool.request("POST", "/x", b"{}"), pool.request("POST", "/x", b"{}"))
            return await pool.request("POST", "/x", b"{}")
        finally:
            pool.close()

    assert run(go()).body == b'{"n": 3}'
    assert len(server.requests) == 4
    assert server.connections == 3  # two kept alive, then one new for the re-send


def test_reset_before_any_reply_on_a_new_connection_is_an_error(serve):
    server = serve(lambda i, req: (b"", True))  # read the request, close without a byte
    with pytest.raises(ConnectionError):
        run(requests(Pool(server.url), 1))
    assert len(server.requests) == 1  # no silent second try: retrying is the caller's decision


def test_malformed_reply_is_a_protocol_error(serve):
    server = serve(lambda i, req: (b"SPDY/9 banana\r\n\r\n", False))
    with pytest.raises(ProtocolError, match="malformed HTTP reply"):
        run(requests(Pool(server.url), 1))


def test_reply_over_the_size_cap_is_refused(serve):
    server = serve(lambda i, req: (reply(b"x" * 5000), False))
    with pytest.raises(ProtocolError, match="larger than 1000 bytes"):
        run(requests(Pool(server.url, max_reply_bytes=1000), 1))


def test_no_reply_times_out_and_the_connection_is_dropped(serve):
    server = serve(lambda i, req: (None, False) if i == 0 else (reply(), False))

    async def go():
        pool = Pool(server.url, timeout_s=0.3)
        try:
            with pytest.raises(TimeoutError):
                await pool.request("POST", "/x", b"{}")
            return await pool.request("POST", "/x", b"{}")  # a late reply to the first must not be read here
        finally:
            pool.close()

    assert run(go()).status == 200
    assert server.connections == 2


def test_status_codes_are_returned_not_raised(serve):
    server = serve(lambda i, req: (reply(b'{"error": "busy"}', b"Retry-After: 2", status=b"429 Too Many"), False))
    (out,) = run(requests(Pool(server.url), 1))
    assert out.status == 429
    assert out.header("retry-after") == "2"
    assert out.body == b'{"error": "busy"}'


def test_refused_connection_names_host_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CannotConnect, match=f"cannot connect to 127.0.0.1:{port}"):
        run(requests(Pool(f"http://127.0.0.1:{port}"), 1))


def test_not_an_http_url():
    with pytest.raises(ValueError, match="not an http"):
        Pool("ftp://example.org")


def test_https_with_a_trusted_certificate(serve, tmp_path, monkeypatch):
    """TLS end to end: a CA made for the test, trusted through SSL_CERT_FILE like any system CA bundle."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    server = serve(lambda i, req: (reply(), False), tls=server_ctx)
    out = run(requests(Pool(server.url), 2))
    assert [r.body for r in out] == [OK_JSON, OK_JSON]
    assert server.connections == 1


def test_https_with_an_untrusted_certificate_fails(serve, tmp_path, monkeypatch):
    trustme = pytest.importorskip("trustme")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_ctx)
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    server = serve(lambda i, req: (reply(), False), tls=server_ctx)
    with pytest.raises(ssl.SSLError):
        run(requests(Pool(server.url), 1))
