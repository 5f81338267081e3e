"""A lean keep-alive HTTP/1.1 GET client for one origin: the PLC directory.

The ingester fetches a DID document for every new account and after every ``#identity``
event, and aiohttp spends ~150 µs of CPU on each small GET (request and response objects,
connector bookkeeping, cookie jar, tracing hooks). This client keeps a few connections to one
origin open and does only what a JSON GET needs: one request line and three headers out; a
status line, headers and a body with ``Content-Length``, chunked or read to the end back.

It is a fast path, not a general client: an answer it does not handle (a redirect, an
informational or upgrade reply, a compressed or otherwise encoded body) comes back as None
and the caller asks its general client instead. Malformed replies raise
:class:`OriginProtocolError`; connection failures raise ``OSError`` (or
``asyncio.IncompleteReadError``); a body over the limit raises :class:`BodyTooLarge`.
A kept-alive connection is reused only while the server has sent nothing unasked (an idle
close, a ``408`` on timeout, stray bytes after a body: it is dropped instead); one that the
server closed meanwhile fails at once and the request goes on to the next idle connection,
then to a fresh one.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

__all__ = ["BodyTooLarge", "OriginClient", "OriginProtocolError"]

_MAX_HEAD = 64 * 1024  # status line and headers
_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class OriginProtocolError(Exception):
    """The server's reply is not well-formed HTTP/1.x."""


class BodyTooLarge(Exception):
    """The reply's body is over the caller's limit."""


def _quiet(conn: _Connection) -> bool:
    """Whether a connection between requests is still open with nothing received: bytes the
    server sent unasked (a 408 on idle close, extra bytes after a body) would be taken for
    the next request's reply, and an ended stream cannot carry one."""
    reader, writer = conn
    # StreamReader has no public "bytes buffered" query; _buffer is its buffer since 3.4
    return not writer.is_closing() and not reader.at_eof() and not getattr(reader, "_buffer", b"")


class OriginClient:
    """GETs to one ``http(s)://host[:port][/prefix]`` origin over kept-alive connections."""

    def __init__(self, base_url: str, *, max_connections: int = 32, max_idle: int = 32, user_agent: str = "psky",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """At most *max_connections* requests run at once (the others wait their turn: a burst
        of resolutions must not open a socket each), and *max_idle* connections are kept
        between them. *ssl_context*: for ``https``, the context to verify the server with
        (default: the system's trusted certificates, hostname checked)."""
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"origin must be http(s)://host[:port]: {base_url!r:.200}")
        if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
            raise ValueError(f"origin must not carry credentials, a query or a fragment: {base_url!r:.200}")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default_port else f"{host}:{self.port}"
        self._user_agent = user_agent
        self.max_idle = max_idle
        self.max_connections = max_connections
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = ssl_context
        self._closed = False
        #: connections opened so far (tests and benchmarks read it: reuse shows as few opens)
        self.opened = 0

    async def get(self, path: str, *, accept: str = "application/json",
                  max_body: int = 1_000_000) -> tuple[int, bytes] | None:
        """``(status, body)`` of ``GET prefix + path``; None when the reply needs a general client.

        *path* must start with ``/`` and hold only URL-safe characters (the caller's DID,
        checked): nothing here escapes it.
        """
        if not path.startswith("/") or not path.isascii() or not path.isprintable() or " " in path:
            raise ValueError(f"path must be a printable ASCII path without spaces: {path!r:.200}")
        request = (f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                   f"Accept: {accept}\r\nUser-Agent: {self._user_agent}\r\n\r\n").encode("ascii")
        async with self._slots:
            return await self._get(request, max_body)

    async def _get(self, request: bytes, max_body: int) -> tuple[int, bytes] | None:
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._open()
            try:
                status, body, keep = await self._exchange(conn, request, max_body)
            except (OSError, asyncio.IncompleteReadError) as e:
                self._discard(conn)
                # a kept-alive connection the server closed meanwhile: try again on a fresh one
                if reused and (isinstance(e, (ConnectionError, asyncio.IncompleteReadError))):
                    continue
                raise
            except BaseException:
                self._discard(conn)
                raise
            if keep and not self._closed and len(self._idle) < self.max_idle and _quiet(conn):
                self._idle.append(conn)
            else:
                self._discard(conn)
            return None if status is None else (status, body)

    async def close(self) -> None:
        """Close the idle connections; one still in use is closed when its request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def _take_idle(self) -> _Connection | None:
        """An idle connection the server has not touched since its last reply, or None."""
        while self._idle:
            conn = self._idle.pop()
            if _quiet(conn):
                return conn
            self._discard(conn)
        return None

    async def _open(self) -> _Connection:
        self._closed = False  # used again after close(): it keeps connections again
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        conn = await asyncio.open_connection(
            self.host, self.port, ssl=self._ssl if self.tls else None, limit=_MAX_HEAD,
            server_hostname=self.host if self.tls else None,
        )
        self.opened += 1
        return conn

    @staticmethod
    def _discard(conn: _Connection) -> None:
        conn[1].close()

    async def _exchange(self, conn: _Connection, request: bytes, max_body: int,
                        ) -> tuple[int | None, bytes, bool]:
        """One request and its reply: (status or None when unhandled, body, keep the connection)."""
        reader, writer = conn
        writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise OriginProtocolError("reply headers over 64 KiB") from None
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit() \
                or rest[3:4] not in (b"", b" "):
            raise OriginProtocolError(f"bad status line {lines[0][:100]!r}")
        status = int(code)
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
                raise OriginProtocolError(f"bad header line {line[:100]!r}")
            name, value = name.lower(), value.strip(b" \t")
            if name in headers:
                if name == b"content-length" and headers[name] != value:
                    raise OriginProtocolError("conflicting Content-Length headers")
                if name in (b"transfer-encoding", b"content-encoding"):
                    value = headers[name] + b", " + value
            headers[name] = value
        keep = version == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"").lower()
        encoding = headers.get(b"content-encoding", b"identity").lower()
        if status < 200 or 300 <= status < 400 or encoding not in (b"identity", b""):
            return None, b"", False  # informational, redirect, encoded: the general client's job
        transfer = headers.get(b"transfer-encoding")
        if status == 204:
            return status, b"", keep
        if transfer is not None:
            if transfer.lower() != b"chunked":
                return None, b"", False
            # with a Content-Length as well the framing is suspect (RFC 9112 6.1): not reused
            keep = keep and b"content-length" not in headers
            return status, await self._chunked(reader, max_body), keep
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                raise OriginProtocolError(f"bad Content-Length {length[:40]!r}")
            n = int(length)
            if n > max_body:
                raise BodyTooLarge(f"Content-Length {n} is over {max_body} bytes")
            return status, await reader.readexactly(n), keep
        body = await reader.read(max_body + 1)  # no length: the body runs to the end
        while len(body) <= max_body:
            more = await reader.read(max_body + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > max_body:
            raise BodyTooLarge(f"body over {max_body} bytes")
        return status, body, False

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            try:
                size_line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise OriginProtocolError("chunk size line over 64 KiB") from None
            size_text = size_line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise OriginProtocolError(f"bad chunk size {size_line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > max_body:
                raise BodyTooLarge(f"chunked body over {max_body} bytes")
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise OriginProtocolError("chunk not followed by CRLF")
        while True:  # trailers, up to the empty line
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise OriginProtocolError("trailer line over 64 KiB") from None
            if line == b"\r\n":
                return b"".join(parts)
