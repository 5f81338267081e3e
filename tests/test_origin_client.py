"""psky.origin_client.OriginClient against raw loopback servers that write exact bytes, its use
by IdentityResolver for did:plc documents (an aiohttp.web PLC-like peer), and the K-256 /
Multikey fast paths of psky.atproto.crypto that the same change brought in."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web

from psky.atproto import crypto
from psky.atproto.crypto import K256_N, K256PublicKey, P256PublicKey, PrivateKey, b58encode, parse_multikey
from psky.identity import IdentityResolver, ResolutionError
from psky.origin_client import BodyTooLarge, OriginClient, OriginProtocolError
from tests.paths import INTEROP

# --- a raw HTTP peer ------------------------------------------------------------------


@dataclass
class Reply:
    """What the peer writes for one request: *data* in one write, or piece by piece."""

    data: bytes | list[bytes]
    close: bool = False  # close the connection right after writing
    stall: bool = False  # after writing, say nothing more until the client goes away
    half_close: bool = False  # after writing, end the sending side but keep reading requests


def http(status: str = "200 OK", body: bytes = b"", *headers: str, length: bool = True,
         version: str = "HTTP/1.1") -> bytes:
    head = [f"{version} {status}", *headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class RawServer:
    """asyncio.start_server on 127.0.0.1: each request takes the next :class:`Reply` (shared by
    all connections, in arrival order); with none left the connection is closed unanswered."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests: list[bytes] = []  # raw heads, as received
        self.client_closed: dict[int, asyncio.Event] = {}  # connection number → EOF seen
        self.server_closed: dict[int, asyncio.Event] = {}  # connection number → we closed it
        self._writers: list[asyncio.StreamWriter] = []
        self._clients: list[OriginClient] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1") -> RawServer:
        self._server = await asyncio.start_server(self._on_connection, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def client(self, path: str = "", **kwargs: Any) -> OriginClient:
        client = OriginClient(self.url(path), **kwargs)
        self._clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def eof(self, number: int) -> None:
        """Wait until the client closed connection *number* (1-based)."""
        await asyncio.wait_for(self.client_closed[number].wait(), 5)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.client_closed[number] = asyncio.Event()
        self.server_closed[number] = asyncio.Event()
        self._writers.append(writer)
        try:
            await self._serve(number, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.server_closed[number].set()

    async def _serve(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                self.client_closed[number].set()
                return
            self.requests.append(head)
            if not self.replies:
                return
            reply = self.replies.pop(0)
            pieces = reply.data if isinstance(reply.data, list) else [reply.data]
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(0.002)  # separate segments: the client must reassemble
                writer.write(piece)
                await writer.drain()
            if reply.stall:
                while await reader.read(65536):
                    pass
                self.client_closed[number].set()
                return
            if reply.close:
                return
            if reply.half_close:
                writer.write_eof()


ServerFactory = Callable[..., Awaitable[RawServer]]
T = TypeVar("T")


async def within(awaitable: Awaitable[T]) -> T:
    """*awaitable*, or TimeoutError after 5 s: a client that waits for bytes that never come
    (a regression in its framing) fails the test instead of hanging the run."""
    async with asyncio.timeout(5):
        return await awaitable


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    servers: list[RawServer] = []

    async def start(*replies: Reply | bytes, host: str = "127.0.0.1") -> RawServer:
        server = RawServer([r if isinstance(r, Reply) else Reply(r) for r in replies])
        servers.append(await server.start(host))
        return server

    yield start
    for server in servers:
        await server.stop()


def ok(body: bytes = b'{"ok":true}', *headers: str) -> bytes:
    return http("200 OK", body, *headers)


# --- 1. request shape -------------------------------------------------------------------


async def test_content_length_reply_and_exact_request(serve: ServerFactory) -> None:
    server = await serve(ok(b'{"id":"x"}'))
    client = server.client("/plc/")  # a trailing slash on the prefix is not doubled
    assert await within(client.get("/did:plc:abc")) == (200, b'{"id":"x"}')
    assert server.requests == [
        b"GET /plc/did:plc:abc HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Accept: application/json\r\nUser-Agent: psky\r\n\r\n"
    ]


async def test_no_prefix_custom_accept_and_user_agent(serve: ServerFactory) -> None:
    server = await serve(http("201 Created", b"hi"))
    client = server.client(user_agent="psky-test/9")
    assert await within(client.get("/a/b-c_d.e~f", accept="text/plain")) == (201, b"hi")
    assert server.requests == [
        b"GET /a/b-c_d.e~f HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{server.port}\r\n".encode()
        + b"Accept: text/plain\r\nUser-Agent: psky-test/9\r\n\r\n"
    ]


async def test_ipv6_host_header_is_bracketed(serve: ServerFactory) -> None:
    try:
        server = await serve(ok(b"v6"), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    client = OriginClient(f"http://[::1]:{server.port}")
    try:
        assert await within(client.get("/x")) == (200, b"v6")
    finally:
        await client.close()
    assert server.requests[0].split(b"\r\n")[1] == f"Host: [::1]:{server.port}".encode()


@pytest.mark.parametrize(("url", "host_header", "port", "tls", "prefix"), [
    ("http://example.com", "example.com", 80, False, ""),
    ("https://plc.directory", "plc.directory", 443, True, ""),
    ("https://plc.directory:443/", "plc.directory", 443, True, ""),
    ("http://example.com:443", "example.com:443", 443, False, ""),
    ("https://example.com:80/a/b/", "example.com:80", 80, True, "/a/b"),
    ("http://[::1]:8080/plc", "[::1]:8080", 8080, False, "/plc"),
    ("HTTP://Example.COM", "example.com", 80, False, ""),
])
def test_constructor_parses_origin(url: str, host_header: str, port: int, tls: bool, prefix: str) -> None:
    client = OriginClient(url)
    assert (client._host_header, client.port, client.tls, client.prefix) == (host_header, port, tls, prefix)
    assert client.opened == 0


# --- 2. keep-alive ----------------------------------------------------------------------


async def test_sequential_gets_share_one_connection(serve: ServerFactory) -> None:
    server = await serve(*(ok(f"body {i}".encode()) for i in range(6)))
    client = server.client()
    for i in range(6):
        assert await within(client.get(f"/doc/{i}")) == (200, f"body {i}".encode())
    assert client.opened == 1
    assert server.connections == 1
    assert [r.split(b" ")[1] for r in server.requests] == [f"/doc/{i}".encode() for i in range(6)]


@pytest.mark.parametrize("value", ["close", "Close", "keep-alive, CLOSE"])
async def test_connection_close_reply_is_not_reused(serve: ServerFactory, value: str) -> None:
    # the peer leaves the connection open: not reusing it is the client's own decision
    server = await serve(ok(b"one", f"Connection: {value}"), ok(b"two"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"one")
    await server.eof(1)
    assert await within(client.get("/2")) == (200, b"two")
    assert (client.opened, server.connections) == (2, 2)


@pytest.mark.parametrize("extra", [(), ("Connection: keep-alive",)])
async def test_http10_reply_is_not_reused(serve: ServerFactory, extra: tuple[str, ...]) -> None:
    server = await serve(http("200 OK", b"old", *extra, version="HTTP/1.0"), ok(b"new"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"old")
    await server.eof(1)
    assert await within(client.get("/2")) == (200, b"new")
    assert (client.opened, server.connections) == (2, 2)


async def test_keep_alive_header_on_http11_is_reused(serve: ServerFactory) -> None:
    server = await serve(ok(b"a", "Connection: keep-alive"), ok(b"b"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"a")
    assert await within(client.get("/2")) == (200, b"b")
    assert (client.opened, server.connections) == (1, 1)


async def test_max_idle_bounds_the_kept_connections(serve: ServerFactory) -> None:
    server = await serve(*(ok(b"x") for _ in range(4)))
    client = server.client(max_idle=1)
    assert list(await within(asyncio.gather(client.get("/a"), client.get("/b")))) == [(200, b"x"), (200, b"x")]
    assert client.opened == 2
    # one of the two went over the limit and was closed, the other one is reused
    await asyncio.wait_for(asyncio.wait(
        [asyncio.ensure_future(e.wait()) for e in server.client_closed.values()],
        return_when=asyncio.FIRST_COMPLETED), 5)
    assert sum(e.is_set() for e in server.client_closed.values()) == 1
    assert await within(client.get("/c")) == (200, b"x")
    assert await within(client.get("/d")) == (200, b"x")
    assert (client.opened, server.connections) == (2, 2)


# --- 3. chunked -------------------------------------------------------------------------

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_chunked_body_with_extensions_and_trailers(serve: ServerFactory) -> None:
    alphabet = b"abcdefghijklmnopqrstuvwxyz"
    server = await serve(
        Reply([CHUNKED_HEAD, b"5;name=value\r\nhello\r\n", b"1A\r\n" + alphabet + b"\r\n",
               b"3 ; x=\"y\"\r\n", b"!!!", b"\r\n", b"0;last\r\nX-Trailer: a\r\nX-Other: b\r\n\r\n"]),
        http("200 OK", b"", "transfer-encoding: Chunked", length=False) + b"2\r\nok\r\n0\r\n\r\n",
        ok(b"after"),
    )
    client = server.client()
    assert await within(client.get("/c")) == (200, b"hello" + alphabet + b"!!!")
    assert await within(client.get("/d")) == (200, b"ok")
    # the trailers were consumed exactly: the same connection carries the next reply
    assert await within(client.get("/e")) == (200, b"after")
    assert (client.opened, server.connections) == (1, 1)


async def test_chunked_overrides_content_length(serve: ServerFactory) -> None:
    server = await serve(http("200 OK", b"", "Transfer-Encoding: chunked", "Content-Length: 3", length=False)
                         + b"6\r\nchunks\r\n0\r\n\r\n")
    client = server.client()
    assert await within(client.get("/c")) == (200, b"chunks")


@pytest.mark.parametrize("chunks", [
    b"zz\r\nab\r\n0\r\n\r\n",
    b"\r\n",
    b";ext\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"1000000000000000\r\n",  # 16 hex digits
    b"5\r\nhelloXX0\r\n\r\n",  # chunk data not followed by CRLF
])
async def test_malformed_chunked_body(serve: ServerFactory, chunks: bytes) -> None:
    server = await serve(CHUNKED_HEAD + chunks, ok(b"next"))
    client = server.client()
    with pytest.raises(OriginProtocolError):
        await within(client.get("/c"))
    await server.eof(1)  # the broken connection is dropped
    assert await within(client.get("/d")) == (200, b"next")
    assert client.opened == 2


def _chunked(body: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size))
    return CHUNKED_HEAD + out + b"0\r\n\r\n"


@pytest.mark.parametrize("shape", ["content-length", "chunked", "to-eof"])
@pytest.mark.parametrize(("size", "fits"), [(100, True), (101, False)])
async def test_body_limit(serve: ServerFactory, shape: str, size: int, fits: bool) -> None:
    body = bytes(random.Random(size).randrange(256) for _ in range(size))
    if shape == "content-length":
        reply = Reply(ok(body))
    elif shape == "chunked":
        reply = Reply(_chunked(body, 30))
    else:
        reply = Reply(http("200 OK", body, length=False), close=True)
    server = await serve(reply, ok(b"next"))
    client = server.client()
    if fits:
        assert await within(client.get("/b", max_body=100)) == (200, body)
    else:
        with pytest.raises(BodyTooLarge):
            await within(client.get("/b", max_body=100))
    assert await within(client.get("/n")) == (200, b"next")
    assert client.opened == (1 if fits and shape != "to-eof" else 2)


async def test_content_length_over_limit_is_refused_before_reading(serve: ServerFactory) -> None:
    # announces 10 MB and sends none of it: the limit applies to the header alone
    server = await serve(Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n", stall=True))
    client = server.client()
    with pytest.raises(BodyTooLarge):
        await within(client.get("/big"))
    await server.eof(1)


# --- 4. no length -----------------------------------------------------------------------


async def test_body_to_eof(serve: ServerFactory) -> None:
    body = bytes(range(256)) * 800  # 200 KB, over several reads
    # the peer only half-closes: it would still read a request, so reuse would show
    server = await serve(Reply([http("200 OK", b"", length=False), body[:70000], body[70000:]], half_close=True),
                         ok(b"next"))
    client = server.client()
    assert await within(client.get("/eof")) == (200, body)
    await server.eof(1)  # the client closed it: a body that ran to the end ends the connection
    assert await within(client.get("/n")) == (200, b"next")
    assert (client.opened, server.connections) == (2, 2)
    assert len(server.requests) == 2


async def test_empty_body_to_eof(serve: ServerFactory) -> None:
    server = await serve(Reply(http("200 OK", b"", length=False), close=True))
    client = server.client()
    assert await within(client.get("/eof")) == (200, b"")


# --- 5. stale keep-alive ----------------------------------------------------------------


async def test_stale_keep_alive_connection_is_retried_fresh(serve: ServerFactory) -> None:
    server = await serve(Reply(ok(b"first"), close=True), ok(b"second"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"first")
    await asyncio.wait_for(server.server_closed[1].wait(), 5)
    await asyncio.sleep(0.01)
    assert await within(client.get("/2")) == (200, b"second")
    assert (client.opened, server.connections) == (2, 2)


async def test_several_stale_idle_connections_still_succeed(serve: ServerFactory) -> None:
    server = await serve(*(Reply(ok(b"x"), close=True) for _ in range(3)), ok(b"fresh"))
    client = server.client()
    assert await within(asyncio.gather(*(client.get(f"/{i}") for i in range(3)))) == [(200, b"x")] * 3
    for number in (1, 2, 3):
        await asyncio.wait_for(server.server_closed[number].wait(), 5)
    await asyncio.sleep(0.01)
    assert await within(client.get("/after")) == (200, b"fresh")
    assert server.connections == 4


async def test_idle_connection_holding_unsolicited_bytes_is_not_trusted(serve: ServerFactory) -> None:
    timeout = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    server = await serve(Reply([ok(b"first"), timeout], close=True), ok(b"second"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"first")
    await asyncio.wait_for(server.server_closed[1].wait(), 5)
    await asyncio.sleep(0.01)
    assert await within(client.get("/2")) == (200, b"second")


async def test_stray_bytes_after_a_body_are_not_taken_for_the_next_reply(serve: ServerFactory) -> None:
    server = await serve(Reply([ok(b"first") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"]),
                         ok(b"second"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"first")
    await asyncio.sleep(0.01)
    assert await within(client.get("/2")) == (200, b"second")
    assert (client.opened, server.connections) == (2, 2)


async def test_chunked_with_content_length_is_read_but_not_reused(serve: ServerFactory) -> None:
    both = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n")
    server = await serve(both, ok(b"next"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"abc")
    assert await within(client.get("/2")) == (200, b"next")
    assert (client.opened, server.connections) == (2, 2)


async def test_tab_in_a_header_name_is_a_protocol_error(serve: ServerFactory) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\nX\tBad: 1\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(OriginProtocolError):
        await within(server.client().get("/x"))


async def test_a_connection_in_use_during_close_is_not_kept(serve: ServerFactory) -> None:
    server = await serve(Reply([http("200 OK", b"late", "Content-Length: 4", length=False)[:-4], b"late"]))
    client = server.client()
    request = asyncio.create_task(client.get("/x"))
    for _ in range(5000):  # until the server has the request (the reply's second half waits)
        if server.requests:
            break
        await asyncio.sleep(0.001)
    await client.close()
    assert await within(request) == (200, b"late")
    assert client._idle == []
    await server.eof(1)


async def test_fresh_connection_closed_without_reply_raises(serve: ServerFactory) -> None:
    server = await serve()  # no replies: every connection is closed unanswered
    client = server.client()
    with pytest.raises((OSError, asyncio.IncompleteReadError)):
        await within(client.get("/x"))
    assert (client.opened, server.connections) == (1, 1)


async def test_stale_then_fresh_failure_raises_after_one_retry(serve: ServerFactory) -> None:
    server = await serve(Reply(ok(b"first"), close=True))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"first")
    await asyncio.wait_for(server.server_closed[1].wait(), 5)
    await asyncio.sleep(0.01)
    with pytest.raises((OSError, asyncio.IncompleteReadError)):
        await within(client.get("/2"))
    assert (client.opened, server.connections) == (2, 2)


async def test_reply_cut_short_on_fresh_connection_raises(serve: ServerFactory) -> None:
    server = await serve(Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nonly this", close=True))
    client = server.client()
    with pytest.raises(asyncio.IncompleteReadError):
        await within(client.get("/x"))


async def test_connection_refused_raises_oserror() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = OriginClient(f"http://127.0.0.1:{port}")
    with pytest.raises(OSError):
        await within(client.get("/x"))
    assert client.opened == 0


# --- 6. declines ------------------------------------------------------------------------

DECLINED = {
    "301": http("301 Moved Permanently", b"", "Location: /elsewhere"),
    "302": http("302 Found", b"moved", "Location: http://127.0.0.1:1/x"),
    "304": http("304 Not Modified", b"", length=False),
    "307": http("307 Temporary Redirect", b"", "Location: /x"),
    "100-continue": b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"late"),
    "103": b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + ok(b"late"),
    "101": http("101 Switching Protocols", b"", "Upgrade: websocket", "Connection: Upgrade", length=False),
    "gzip": http("200 OK", gzip.compress(b'{"a":1}'), "Content-Encoding: gzip"),
    "br": http("200 OK", b"\x0b\x02\x80{}\x03", "Content-Encoding: br"),
    "identity, gzip": http("200 OK", b"zz", "Content-Encoding: identity", "Content-Encoding: gzip"),
    "te gzip, chunked": http("200 OK", b"", "Transfer-Encoding: gzip, chunked", length=False)
    + b"2\r\nzz\r\n0\r\n\r\n",
    "te identity": http("200 OK", b"abc", "Transfer-Encoding: identity", length=False),
    "te compress": http("200 OK", b"", "Transfer-Encoding: compress", length=False),
}


@pytest.mark.parametrize("name", list(DECLINED))
async def test_declined_reply_returns_none_and_drops_the_connection(serve: ServerFactory, name: str) -> None:
    server = await serve(DECLINED[name], ok(b"next"))
    client = server.client()
    assert await within(client.get("/x")) is None
    await server.eof(1)
    assert await within(client.get("/y")) == (200, b"next")
    assert (client.opened, server.connections) == (2, 2)


@pytest.mark.parametrize("encoding", ["identity", "IDENTITY", ""])
async def test_identity_content_encoding_is_accepted(serve: ServerFactory, encoding: str) -> None:
    server = await serve(ok(b"plain", f"Content-Encoding: {encoding}"), ok(b"next"))
    client = server.client()
    assert await within(client.get("/x")) == (200, b"plain")
    assert await within(client.get("/y")) == (200, b"next")
    assert client.opened == 1


# --- 7. malformed heads -----------------------------------------------------------------


@pytest.mark.parametrize("status_line", [
    b"HTTP/2 200 OK", b"HTTP/1.2 200 OK", b"http/1.1 200 OK", b"ICY 200 OK", b"HTTP/1.1 20 OK",
    b"HTTP/1.1 2000 OK", b"HTTP/1.1 2x0 OK", b"HTTP/1.1 200OK", b"HTTP/1.1", b"HTTP/1.1 ", b"",
    b"HTTP/1.1  200 OK", b"garbage",
])
async def test_bad_status_line(serve: ServerFactory, status_line: bytes) -> None:
    server = await serve(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="status line"):
        await within(client.get("/x"))


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200", b"HTTP/1.0 200 ", b"HTTP/1.1 299 Whatever Reason"])
async def test_status_line_without_or_with_odd_reason(serve: ServerFactory, status_line: bytes) -> None:
    server = await serve(status_line + b"\r\nContent-Length: 2\r\n\r\nok")
    client = server.client()
    assert await within(client.get("/x")) == (int(status_line[9:12]), b"ok")


@pytest.mark.parametrize("header", [
    b"NoColonHere", b" Leading-Space: x", b"\tFolded: x", b"Bad Name: x", b": empty-name", b"Name : x",
])
async def test_bad_header_line(serve: ServerFactory, header: bytes) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\n" + header + b"\r\nContent-Length: 0\r\n\r\n")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="header line"):
        await within(client.get("/x"))


async def test_conflicting_content_length(serve: ServerFactory) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\nabcd")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="Content-Length"):
        await within(client.get("/x"))


async def test_repeated_equal_content_length_is_fine(serve: ServerFactory) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nCONTENT-LENGTH:3\r\n\r\nabc", ok(b"next"))
    client = server.client()
    assert await within(client.get("/x")) == (200, b"abc")
    assert await within(client.get("/y")) == (200, b"next")
    assert client.opened == 1


@pytest.mark.parametrize("value", [b"abc", b"-1", b"+3", b"3 3", b"0x10", b"1" * 19, b""])
async def test_bad_content_length_value(serve: ServerFactory, value: bytes) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nabc")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="Content-Length"):
        await within(client.get("/x"))


@pytest.mark.parametrize("size", [70_000, 200_000])
async def test_headers_over_64_kib(serve: ServerFactory, size: int) -> None:
    server = await serve(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 0\r\n\r\n")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="64 KiB"):
        await within(client.get("/x"))


async def test_headers_just_under_64_kib(serve: ServerFactory) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: "
    filler = b"a" * (60_000 - len(head))
    server = await serve(head + filler + b"\r\n\r\nok")
    client = server.client()
    assert await within(client.get("/x")) == (200, b"ok")


async def test_chunk_size_line_over_64_kib(serve: ServerFactory) -> None:
    server = await serve(CHUNKED_HEAD + b"5;" + b"e" * 70_000 + b"\r\nhello\r\n0\r\n\r\n")
    client = server.client()
    with pytest.raises(OriginProtocolError, match="64 KiB"):
        await within(client.get("/x"))


# --- 8. 204 and error statuses ------------------------------------------------------------


async def test_204_has_no_body_and_keeps_the_connection(serve: ServerFactory) -> None:
    server = await serve(http("204 No Content", b"", length=False), ok(b"next"))
    client = server.client()
    assert await within(client.get("/x")) == (204, b"")
    assert await within(client.get("/y")) == (200, b"next")
    assert (client.opened, server.connections) == (1, 1)


@pytest.mark.parametrize("reply", [
    http("404 Not Found", b'{"message":"DID not registered"}'),
    http("404 Not Found", b"", "Transfer-Encoding: chunked", length=False)
    + b"20\r\n" + b'{"message":"DID not registered"}' + b"\r\n0\r\n\r\n",
])
async def test_404_body_is_read_and_the_connection_reused(serve: ServerFactory, reply: bytes) -> None:
    server = await serve(reply, ok(b"next"))
    client = server.client()
    assert await within(client.get("/x")) == (404, b'{"message":"DID not registered"}')
    assert await within(client.get("/y")) == (200, b"next")
    assert (client.opened, server.connections) == (1, 1)


async def test_500_status_is_returned(serve: ServerFactory) -> None:
    server = await serve(http("500 Internal Server Error", b"oops"), http("410 Gone", b""))
    client = server.client()
    assert await within(client.get("/x")) == (500, b"oops")
    assert await within(client.get("/y")) == (410, b"")
    assert client.opened == 1


# --- 9. validation ----------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/a b", "/a\r\nX-Injected: 1", "/a\n", "/a\r", "/\u00e9", "/\u2028", "did:plc:abc", "", "a/b",
    "/a\tb", "/\x7f", "/\x00",
])
async def test_bad_path_is_refused_before_sending(serve: ServerFactory, path: str) -> None:
    server = await serve(ok())
    client = server.client()
    with pytest.raises(ValueError, match="path"):
        await within(client.get(path))
    await asyncio.sleep(0.01)
    assert (client.opened, server.connections, server.requests) == (0, 0, [])


@pytest.mark.parametrize("url", [
    "ftp://example.com", "ws://example.com", "example.com", "//example.com", "http://", "http:///plc",
    "http://user:pw@example.com", "http://user@example.com", "http://:pw@example.com",
    "http://example.com/?q=1", "http://example.com/plc?x", "http://example.com/#frag",
])
def test_constructor_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        OriginClient(url)


# --- 10. cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize("partial", [
    b"",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nhalf",
    CHUNKED_HEAD + b"5\r\nhello\r\n",
])
async def test_cancelled_get_discards_the_connection(serve: ServerFactory, partial: bytes) -> None:
    server = await serve(ok(b"first"), Reply(partial, stall=True), ok(b"third"))
    client = server.client()
    assert await within(client.get("/1")) == (200, b"first")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await client.get("/2")  # on the kept-alive connection, which then stalls
    await server.eof(1)  # closed by the client, not put back
    assert await within(client.get("/3")) == (200, b"third")
    assert (client.opened, server.connections) == (2, 2)


async def test_close_closes_idle_connections(serve: ServerFactory) -> None:
    server = await serve(ok(b"a"), ok(b"b"))
    client = server.client()
    assert list(await within(asyncio.gather(client.get("/1"), client.get("/2")))) == [(200, b"a"), (200, b"b")]
    held = list(client._idle)  # kept referenced: closing must not be left to garbage collection
    assert len(held) == 2
    await client.close()
    assert all(writer.is_closing() for _reader, writer in held)
    await server.eof(1)
    await server.eof(2)


# --- 11. IdentityResolver -------------------------------------------------------------

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
KEY = PrivateKey.generate("k256")


def plc_did(rng: random.Random) -> str:
    return "did:plc:" + "".join(rng.choice(_B32) for _ in range(24))


def did_doc(did: str, handle: str) -> dict[str, Any]:
    return {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [
            {"id": f"{did}#atproto", "type": "Multikey", "controller": did,
             "publicKeyMultibase": KEY.public_key().multibase()}
        ],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                     "serviceEndpoint": "https://pds.example.com"}],
    }


@dataclass
class Seen:
    path: str
    user_agent: str
    transport: object


@dataclass
class PlcPeer:
    """An aiohttp.web PLC directory: ``/<did>`` (and ``/moved/<did>``) serve ``docs[did]``."""

    docs: dict[str, bytes] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    redirect: bool = False  # /<did> → 302 to /moved/<did>
    status: int | None = None  # answer every request with this status (and ``body``)
    body: bytes = b""
    chunked: bool = False
    gzip: bool = False
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.path, request.headers.get("User-Agent", ""), request.transport))
        did = request.path.rsplit("/", 1)[-1]
        if self.status is not None:
            resp = web.Response(status=self.status, body=self.body, content_type="application/json")
        elif self.redirect and not request.path.startswith("/moved/"):
            resp = web.Response(status=302, headers={"Location": f"/moved/{did}"})
        elif did not in self.docs:
            resp = web.Response(status=404, body=b'{"message":"DID not registered"}',
                                content_type="application/json")
        elif self.gzip:
            resp = web.Response(body=gzip.compress(self.docs[did]), content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        else:
            resp = web.Response(body=self.docs[did], content_type="application/json")
        if self.chunked:
            resp.enable_chunked_encoding()
        return resp

    def add(self, did: str, handle: str) -> None:
        self.docs[did] = orjson.dumps(did_doc(did, handle))

    def connections(self) -> int:
        return len({id(s.transport) for s in self.seen})  # the list keeps them alive: ids differ

    def agents(self) -> set[str]:
        return {s.user_agent for s in self.seen}


@pytest.fixture
async def plc() -> AsyncIterator[PlcPeer]:
    peer = PlcPeer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", peer.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    peer.url = f"http://{host}:{port}"
    try:
        yield peer
    finally:
        await runner.cleanup()


async def test_resolver_reuses_one_connection_for_many_dids(plc: PlcPeer) -> None:
    rng = random.Random(1)
    dids = [plc_did(rng) for _ in range(25)]
    for i, did in enumerate(dids):
        plc.add(did, f"user{i}.test")
    async with IdentityResolver(plc.url) as res:
        assert res._plc is not None
        for i, did in enumerate(dids):
            doc = await res.resolve(did)
            assert (doc.id, doc.handle, doc.signing_key) == (did, f"user{i}.test", KEY.did_key())
        assert res._plc.opened == 1
        assert res._session is None  # aiohttp never needed
    assert [s.path for s in plc.seen] == [f"/{did}" for did in dids]
    assert plc.agents() == {"psky"}
    assert plc.connections() == 1


async def test_resolver_with_path_prefix(plc: PlcPeer) -> None:
    did = plc_did(random.Random(2))
    plc.add(did, "prefixed.test")
    async with IdentityResolver(plc.url + "/plc/") as res:
        assert (await res.resolve(did)).handle == "prefixed.test"
    assert [(s.path, s.user_agent) for s in plc.seen] == [(f"/plc/{did}", "psky")]


async def test_resolver_follows_a_redirect_through_aiohttp(plc: PlcPeer) -> None:
    did = plc_did(random.Random(3))
    plc.add(did, "moved.test")
    plc.redirect = True
    async with IdentityResolver(plc.url) as res:
        assert (await res.resolve(did)).handle == "moved.test"
    paths = [(s.path, s.user_agent == "psky") for s in plc.seen]
    assert paths == [(f"/{did}", True), (f"/{did}", False), (f"/moved/{did}", False)]
    assert all("aiohttp" in s.user_agent for s in plc.seen[1:])


async def test_resolver_gzip_reply_falls_back_to_aiohttp(plc: PlcPeer) -> None:
    did = plc_did(random.Random(4))
    plc.add(did, "zipped.test")
    plc.gzip = True
    async with IdentityResolver(plc.url) as res:
        assert (await res.resolve(did)).handle == "zipped.test"
    assert [s.user_agent == "psky" for s in plc.seen] == [True, False]


@pytest.mark.parametrize("chunked", [False, True])
async def test_resolver_chunked_document(plc: PlcPeer, chunked: bool) -> None:
    did = plc_did(random.Random(5))
    plc.add(did, "chunky.test")
    plc.chunked = chunked
    async with IdentityResolver(plc.url) as res:
        assert (await res.resolve(did)).handle == "chunky.test"
    assert plc.agents() == {"psky"}


@pytest.mark.parametrize(("status", "message"), [(404, "not found"), (410, "not found"), (500, "HTTP 500"),
                                                  (429, "HTTP 429"), (201, "HTTP 201")])
async def test_resolver_error_statuses(plc: PlcPeer, status: int, message: str) -> None:
    did = plc_did(random.Random(6))
    plc.add(did, "x.test")
    plc.status, plc.body = status, b'{"message":"no"}'
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match=message):
            await res.resolve(did)
        assert res.cached(did) is None
    assert plc.agents() == {"psky"}  # answered by the lean client: no second request
    assert len(plc.seen) == 1


async def test_resolver_unknown_did_not_found(plc: PlcPeer) -> None:
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match="not found"):
            await res.resolve(plc_did(random.Random(7)))


@pytest.mark.parametrize("chunked", [False, True])
async def test_resolver_document_over_1_mb(plc: PlcPeer, chunked: bool) -> None:
    did = plc_did(random.Random(8))
    doc = did_doc(did, "big.test")
    doc["padding"] = "x" * 1_000_000
    plc.docs[did] = orjson.dumps(doc)
    plc.chunked = chunked
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match="over 1 MB"):
            await res.resolve(did)
    assert plc.agents() == {"psky"}


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", b'"a string"'])
async def test_resolver_invalid_document(plc: PlcPeer, body: bytes) -> None:
    did = plc_did(random.Random(9))
    plc.docs[did] = body
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match="invalid DID document"):
            await res.resolve(did)


async def test_resolver_document_for_another_did(plc: PlcPeer) -> None:
    rng = random.Random(10)
    did, other = plc_did(rng), plc_did(rng)
    plc.docs[did] = orjson.dumps(did_doc(other, "other.test"))
    async with IdentityResolver(plc.url) as res:
        with pytest.raises(ResolutionError, match="invalid DID document"):
            await res.resolve(did)


async def test_resolver_with_external_session_never_uses_origin_client(plc: PlcPeer) -> None:
    rng = random.Random(11)
    dids = [plc_did(rng) for _ in range(3)]
    for did in dids:
        plc.add(did, "ext.test")
    async with aiohttp.ClientSession() as session:
        async with IdentityResolver(plc.url, session=session) as res:
            assert res._plc is None
            for did in dids:
                assert (await res.resolve(did)).id == did
        assert not session.closed  # the caller's session is the caller's to close
    assert len(plc.seen) == 3
    assert all("aiohttp" in s.user_agent for s in plc.seen)


@pytest.mark.parametrize("did", [
    "did:plc:" + "A" * 24,
    "did:plc:" + "a" * 23,
    "did:plc:" + "a" * 25,
    "did:plc:" + "1" * 24,
    "did:plc:" + "a" * 23 + "8",
])
async def test_resolver_irregular_plc_did_skips_origin_client(plc: PlcPeer, did: str) -> None:
    async with IdentityResolver(plc.url) as res:
        assert res._plc is not None
        with pytest.raises(ResolutionError):
            await res.resolve(did)
        assert res._plc.opened == 0
    assert len(plc.seen) == 1
    assert "aiohttp" in plc.seen[0].user_agent


async def test_resolver_origin_client_errors_become_resolution_errors(serve: ServerFactory) -> None:
    server = await serve(b"HTTP/9 200 OK\r\n\r\n", Reply(b"HTTP/1.1 200 OK\r\n", stall=True))
    did = plc_did(random.Random(12))
    async with IdentityResolver(server.url(), timeout_s=0.1) as res:
        with pytest.raises(ResolutionError, match="cannot fetch"):
            await res.resolve(did)  # protocol error
        with pytest.raises(ResolutionError, match="cannot fetch"):
            await res.resolve(did)  # stalls past the timeout
    assert [r.split(b"\r\n")[-3] for r in server.requests] == [b"User-Agent: psky"] * 2


async def test_resolver_close_closes_idle_connections(serve: ServerFactory) -> None:
    did = plc_did(random.Random(13))
    server = await serve(ok(orjson.dumps(did_doc(did, "bye.test"))))
    res = IdentityResolver(server.url())
    assert (await res.resolve(did)).handle == "bye.test"
    assert not server.client_closed[1].is_set()
    await res.close()
    await server.eof(1)


# --- 12. crypto fast paths ------------------------------------------------------------


@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_parse_multikey_did_key_is_the_input(curve: crypto.Curve) -> None:
    for _ in range(20):
        pub = PrivateKey.generate(curve).public_key()
        m = pub.multibase()
        parsed = parse_multikey(m)
        assert parsed.did_key() == "did:key:" + m
        assert parsed.did_key() == "did:key:z" + b58encode(type(pub).multicodec + pub.compressed)
        assert parsed == pub
        # a key built from the point alone computes the same string
        rebuilt = (K256PublicKey if curve == "k256" else P256PublicKey)(pub.compressed)
        assert rebuilt.did_key() == parsed.did_key()
        assert rebuilt.multibase() == m


@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_multikey_verification_method_shares_the_verifier_cache(curve: crypto.Curve) -> None:
    pub = PrivateKey.generate(curve).public_key()
    m = pub.multibase()
    first = crypto.parse_verification_method("Multikey", m)
    assert first is crypto.verifier_for("did:key:" + m)
    assert first is crypto.parse_verification_method("Multikey", m)
    assert first == pub and first.did_key() == pub.did_key()


def test_multikey_verification_method_refuses_non_strings() -> None:
    with pytest.raises(crypto.InvalidKey):
        crypto.parse_verification_method("Multikey", 5)  # type: ignore[arg-type]


def _sig_parts(sig: bytes) -> tuple[int, int]:
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")


def _sig(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _k256_cases() -> list[tuple[str, K256PublicKey, Any, Any, bool, bool]]:
    """(name, key, data, sig, allow_high_s, expected verdict)."""
    rng = random.Random(99)
    cases: list[tuple[str, K256PublicKey, Any, Any, bool, bool]] = []
    for n in range(6):
        priv = PrivateKey.generate("k256")
        pub = priv.public_key()
        assert isinstance(pub, K256PublicKey)
        data = rng.randbytes(rng.randrange(0, 300)) if n else b""
        sig = priv.sign(data)
        r, s = _sig_parts(sig)
        high = _sig(r, K256_N - s)
        other = PrivateKey.generate("k256").public_key()
        assert isinstance(other, K256PublicKey)
        cases += [
            ("valid", pub, data, sig, False, True),
            ("valid allow-high", pub, data, sig, True, True),
            ("other key", other, data, sig, False, False),
            ("high-S", pub, data, high, False, False),
            ("high-S allowed", pub, data, high, True, True),
            ("r=0", pub, data, _sig(0, s), False, False),
            ("s=0", pub, data, _sig(r, 0), False, False),
            ("s=0 allow-high", pub, data, _sig(r, 0), True, False),
            ("r=N", pub, data, _sig(K256_N, s), False, False),
            ("s=N", pub, data, _sig(r, K256_N), True, False),
            ("r=N+r", pub, data, _sig(K256_N + r, s) if K256_N + r < 2**256 else _sig(2**256 - 1, s), False, False),
            ("s=max", pub, data, _sig(r, 2**256 - 1), True, False),
            ("short", pub, data, sig[:63], False, False),
            ("long", pub, data, sig + b"\0", False, False),
            ("empty sig", pub, data, b"", False, False),
            ("bytearray sig", pub, data, bytearray(sig), False, True),
            ("memoryview sig", pub, data, memoryview(sig), False, True),
            ("bytearray data", pub, bytearray(data), sig, False, True),
            ("memoryview data", pub, memoryview(data), memoryview(sig), False, True),
            ("data + byte", pub, data + b"\0", sig, False, False),
            # never raises for what is not a byte string: False on both paths
            ("str sig", pub, data, sig.hex()[:64], False, False),
            ("int sig", pub, data, 64, False, False),
            ("None sig", pub, data, None, False, False),
            ("list sig", pub, data, list(sig), False, False),
            ("str data", pub, data.decode("latin-1"), sig, False, False),
            ("None data", pub, None, sig, False, False),
        ]
        for bit in (0, 7, 255, 256, 300, 511):
            flipped = bytearray(sig)
            flipped[bit // 8] ^= 1 << (bit % 8)
            cases.append((f"sig bit {bit}", pub, data, bytes(flipped), False, False))
        if data:
            flipped_data = bytearray(data)
            flipped_data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            cases.append(("data bit", pub, bytes(flipped_data), sig, False, False))
    return cases


K256_CASES = _k256_cases()
native = pytest.mark.skipif(not crypto.NATIVE_K256, reason="psky's C extension K-256 path is not built")


@native
@pytest.mark.parametrize("case", K256_CASES, ids=[c[0] for c in K256_CASES])
def test_k256_native_and_cffi_agree(case: tuple[str, K256PublicKey, Any, Any, bool, bool],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _name, key, data, sig, allow_high_s, expected = case
    verdicts = []
    for flag in (True, False):
        monkeypatch.setattr(crypto, "NATIVE_K256", flag)
        verdicts.append(key.verify(data, sig, allow_high_s=allow_high_s))
    assert verdicts == [expected, expected]


def _interop_k256() -> list[dict[str, Any]]:
    fixtures: list[dict[str, Any]] = json.loads((INTEROP / "crypto" / "signature-fixtures.json").read_text())
    return [f for f in fixtures if f["algorithm"] == "ES256K"]


@native
@pytest.mark.parametrize("fx", _interop_k256(), ids=lambda f: str(f["comment"]))
def test_k256_native_and_cffi_agree_on_interop_vectors(fx: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def b64(text: str) -> bytes:
        return base64.b64decode(text + "=" * (-len(text) % 4))

    key = crypto.parse_did_key(fx["publicKeyDid"])
    msg, sig = b64(fx["messageBase64"]), b64(fx["signatureBase64"])
    for flag in (True, False):
        monkeypatch.setattr(crypto, "NATIVE_K256", flag)
        assert key.verify(msg, sig) is fx["validSignature"]


@native
def test_native_k256_verify_direct() -> None:
    from psky.atproto import _native

    priv = PrivateKey.generate("k256")
    pub = priv.public_key()
    assert isinstance(pub, K256PublicKey)
    sig = priv.sign(b"payload")
    assert _native.k256_verify(pub._raw, b"payload", sig, False) is True
    assert _native.k256_verify(pub._raw, b"payload!", sig, False) is False
    for bad in (b"", pub._raw[:63], pub._raw + b"\0", pub.compressed, pub.uncompressed):
        with pytest.raises(ValueError):
            _native.k256_verify(bad, b"payload", sig, False)


async def test_aiohttp_path_reads_a_document_that_arrives_in_pieces(serve: ServerFactory) -> None:
    """The general (aiohttp) path reads the whole body, not only the first segment that came:
    a document written in several pieces with pauses between them still parses."""
    did = plc_did(random.Random(5))
    body = orjson.dumps(did_doc(did, "pieces.test"))
    head = http("200 OK", b"", "Content-Type: application/json", length=False)[:-2]
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    pieces = [head, *(body[i:i + 40] for i in range(0, len(body), 40))]
    server = await serve(Reply(pieces))
    async with aiohttp.ClientSession() as session:  # a caller's session: the aiohttp path
        resolver = IdentityResolver(server.url(), session=session)
        assert resolver._plc is None
        doc = await within(resolver.resolve(did))
    assert doc.id == did and doc.handle == "pieces.test"


# --- TLS (the PLC directory is https) ----------------------------------------------------


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for localhost (only) and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_https_origin_keeps_one_verified_tls_connection(tmp_path: Any) -> None:
    """Over TLS the client checks the server's certificate and name, and keeps the connection:
    several GETs, one handshake. An untrusted certificate fails (an OSError: the resolver
    reports "cannot fetch"), and so does a certificate for another name."""
    import ssl

    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server = RawServer([Reply(ok(b"one")), Reply(ok(b"two")), Reply(ok(b"three"))])
    server._server = await asyncio.start_server(server._on_connection, "127.0.0.1", 0, ssl=server_ctx)
    server.port = server._server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context(cafile=cert)
    try:
        client = OriginClient(f"https://localhost:{server.port}", ssl_context=trusting)
        try:
            assert await within(client.get("/1")) == (200, b"one")
            assert await within(client.get("/2")) == (200, b"two")
            assert (client.opened, server.connections) == (1, 1)
            assert server.requests[0].split(b"\r\n")[1] == f"Host: localhost:{server.port}".encode()
        finally:
            await client.close()
        untrusted = OriginClient(f"https://localhost:{server.port}")  # the system's roots only
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await within(untrusted.get("/3"))
        finally:
            await untrusted.close()
        other_name = OriginClient(f"https://127.0.0.1:{server.port}", ssl_context=trusting)
        try:
            with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):  # not its name
                await within(other_name.get("/3"))
        finally:
            await other_name.close()
        resolver = IdentityResolver(f"https://localhost:{server.port}")
        try:
            with pytest.raises(ResolutionError, match="cannot fetch"):
                await within(resolver.resolve("did:plc:" + "a" * 24))
        finally:
            await resolver.close()
    finally:
        await server.stop()


async def test_a_burst_of_requests_shares_at_most_max_connections(serve: ServerFactory) -> None:
    """A burst (a backfiller resolving many repos at once) waits for free connections instead
    of opening a socket per request, and then reuses them."""
    server = await serve(*(Reply([ok(b"%d" % i)[:-1], ok(b"%d" % i)[-1:]]) for i in range(60)))
    client = server.client(max_connections=4)
    answers = await within(asyncio.gather(*(client.get(f"/{i}") for i in range(60))))
    assert all(status == 200 for status, _ in answers) and len(answers) == 60
    assert client.opened == server.connections == 4
    with pytest.raises(ValueError, match="max_connections"):
        OriginClient(server.url(), max_connections=0)
