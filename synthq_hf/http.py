"""A lean HTTP/1.1 keep-alive client for talking to LLM servers: an asyncio protocol and the llhttp parser.

Why not aiohttp on this path: measured against a zero-latency stub on this machine, an aiohttp request costs
~140 µs of CPU and one through this client ~25 µs (``scripts/bench/client_ceiling.py`` prints both). At the
thousands of requests a second a fast server answers, that difference is whether the client or the server is
the bottleneck. An LLM endpoint needs little of HTTP: JSON POST and GET, keep-alive, TLS, replies framed by
``Content-Length``, chunks or EOF, a few headers (``Retry-After``), a timeout. So this client does exactly that
and nothing else: no redirects, cookies, proxies or compression (it asks for ``identity``; a gzip/deflate reply
sent anyway is decoded). Parsing is httptools (llhttp, the parser of Node.js and uvicorn); nothing here parses
HTTP by hand. aiohttp stays where the open web is fetched (``search/web.py``).

One request per connection at a time (no pipelining); idle connections are reused, last in first out. A reused
connection that the server had closed while idle (keep-alive timeouts) fails before any reply byte arrives: that
request is sent once more on a fresh connection. Everything else (status codes, retries, backoff) is the
caller's business; transport failures raise :class:`OSError` subclasses (``ConnectionError``, ``ssl.SSLError``)
or :class:`TimeoutError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import zlib
from collections import deque
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools

#: Replies larger than this are refused (a misbehaving server must not exhaust memory); LLM replies are KBs.
MAX_REPLY_BYTES = 256 * 2**20


class ProtocolError(ConnectionError):
    """The server's reply is not HTTP/1.x we can read (malformed, too large, unknown content encoding)."""


class CannotConnect(ConnectionError):
    """No connection could be opened (refused, unknown host, unreachable network)."""


class Response:
    """Status, lowercase header names → values (latin-1, as HTTP defines them), and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.lower().encode("latin-1"))
        return None if value is None else value.decode("latin-1")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; the parser calls the ``on_*`` methods as a reply arrives."""

    def __init__(self, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.max_reply_bytes = max_reply_bytes
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.deadline = 0.0  # loop time by which the request in flight must be answered (see Pool._expire)
        self.replied = False  # some byte of a reply came in since the last request was sent
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._framed = True  # the reply says where it ends (Content-Length or chunked), rather than at EOF
        self._headers_done = False

    # -- asyncio protocol -------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.replied = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(ProtocolError("the server switched protocols"))
        except httptools.HttpParserError as err:
            cause = err.__context__  # an exception raised in an on_* callback (the size cap) comes wrapped
            self.fail(cause if isinstance(cause, ProtocolError) else ProtocolError(f"malformed HTTP reply: {err}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and not self._framed and exc is None:
            self.on_message_complete()  # an HTTP/1.0-style reply: its body ends where the connection does
            return
        self.fail(exc if exc is not None else ConnectionResetError("the server closed the connection"))

    # -- parser callbacks -------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._headers = {}
        self._chunks = []
        self._size = 0
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._headers_done = True
        headers = self._headers
        self._framed = b"content-length" in headers or b"transfer-encoding" in headers

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_reply_bytes:
            raise ProtocolError(f"reply larger than {self.max_reply_bytes} bytes")
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._headers_done = False
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        headers = self._headers
        status = self.parser.get_status_code()
        if status < 200:  # an informational reply (100 Continue, 103 Early Hints): the real one follows
            self.waiter = waiter
            return
        try:
            encoding = headers.get(b"content-encoding")
            if encoding is not None and encoding.lower() != b"identity":
                body = _decode(body, encoding.lower())
        except ProtocolError as err:
            waiter.set_exception(err)
            self.close()
            return
        if not self.parser.should_keep_alive():
            self.close()
        waiter.set_result(Response(status, headers, body))

    # -- use ----------------------------------------------------------------------------------------------------
    async def exchange(self, data: bytes) -> Response:
        """Send one request and wait for its reply; any failure or cancellation closes the connection."""
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        self.replied = False
        self.transport.write(data)
        try:
            return await waiter
        except BaseException:
            self.waiter = None
            self.close()
            raise

    def fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decode(body: bytes, encoding: bytes) -> bytes:
    if encoding in (b"gzip", b"x-gzip", b"deflate"):
        try:
            # wbits 47: zlib or gzip header, detected; a raw deflate stream is the fallback some servers send
            return zlib.decompress(body, 47) if encoding != b"deflate" else _inflate(body)
        except zlib.error as err:
            raise ProtocolError(f"cannot decode a {encoding.decode()} reply: {err}") from None
    raise ProtocolError(f"unsupported Content-Encoding {encoding.decode('latin-1')!r}")


def _inflate(body: bytes) -> bytes:
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, -15)


class Pool:
    """Keep-alive connections to one server (``base_url``: scheme, host, port and an optional path prefix).

    ``headers`` go with every request (the caller's ``Authorization`` among them: they are never logged here).
    Make and use it inside one event loop; :meth:`close` closes every idle connection and any in use as it
    comes back.
    """

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        timeout_s: float = 300.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self._ssl else 80)
        lines = {
            "Host": host if default_port else f"{host}:{self.port}",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": "synthq-hf",
            **(headers or {}),
        }
        self._head = "".join(f"{name}: {value}\r\n" for name, value in lines.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()
        self._tick = 1.0
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout_s: float | None = None
    ) -> Response:
        """``method`` ``path`` (below the base URL's prefix), a JSON ``body``; the whole reply within the timeout."""
        target = (self.prefix + path).encode("latin-1")
        if body is None:
            data = b"%s %s HTTP/1.1\r\n%s\r\n" % (method.encode(), target, self._head)
        else:
            data = b"%s %s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                method.encode(),
                target,
                self._head,
                len(body),
                body,
            )
        timeout = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fresh = False
        while True:
            conn = None if fresh else self._idle_connection()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(deadline - loop.time())
            conn.deadline = deadline
            busy = self._busy
            busy.add(conn)
            if timeout < self._tick * 4:
                self._tick = max(timeout / 4, 0.005)
            if self._timer is None:
                self._timer = loop.call_later(self._tick, self._expire, loop)
            try:
                response = await conn.exchange(data)
            except ConnectionError:
                if reused and not conn.replied:
                    fresh = True  # closed by the server while idle: send it once more, on a new connection
                    continue
                raise
            finally:
                busy.discard(conn)
            if conn.closed or self.closed:
                conn.close()
            else:
                self._idle.append(conn)
            return response

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests past their deadline; re-armed every tick while any are in flight.

        Why not ``asyncio.timeout`` per request: it schedules and cancels a timer each time (~5 µs, measured),
        where one ticking check for all requests costs nothing per request. A request times out between its
        deadline and one tick later (a quarter of the shortest timeout, at most a second).
        """
        self._timer = None
        now = loop.time()
        for conn in [conn for conn in self._busy if conn.deadline <= now]:
            conn.fail(TimeoutError("timed out"))
        if self._busy and not self.closed:
            self._timer = loop.call_later(self._tick, self._expire, loop)

    def _idle_connection(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self, timeout_s: float) -> _Connection:
        """A new connection: addresses raced happy-eyeballs style (aiohappyeyeballs, as aiohttp does), then TLS.

        Not ``create_connection(happy_eyeballs_delay=...)``: Python 3.11 races even a single address through
        tasks that are still being cancelled when a ``datasets.map`` loop stops, and those keep the loop alive.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                sock = await aiohappyeyeballs.start_connection(
                    await self._addresses(loop), happy_eyeballs_delay=0.25, interleave=1
                )
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_reply_bytes),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except (ssl.SSLError, TimeoutError):
            raise
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise CannotConnect(f"cannot connect to {self.host}:{self.port}: {reason}") from None
        return conn

    async def _addresses(self, loop: asyncio.AbstractEventLoop) -> list[tuple]:
        """An IP literal as it is (no resolver thread); a name through the loop's resolver."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self.host, self.port))]

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._idle:
            self._idle.pop().close()


__all__ = ["MAX_REPLY_BYTES", "CannotConnect", "Pool", "ProtocolError", "Response"]
