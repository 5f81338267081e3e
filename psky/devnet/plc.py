"""A did:plc directory for the devnet, plus the client the PDS and labeler use to talk to it.

:class:`PlcDirectory` keeps every DID's audit log in memory and serves the routes of the
reference directory (did-method-plc ``packages/server``)::

    GET  /{did}             DID document (application/did+ld+json); 404 unknown, 410 tombstoned
    GET  /{did}/data        current PLC data {did, verificationMethods, rotationKeys, alsoKnownAs, services}
    GET  /{did}/log         current history (signed ops, oldest first)
    GET  /{did}/log/last    last op of the current history (the tombstone, once tombstoned)
    GET  /{did}/log/audit   every op incl. nullified ones: {did, operation, cid, nullified, createdAt}
    POST /{did}             submit a signed op; 200 "OK", or 400 {"message": ...}
    GET  /export?after=N&count=M   JSON lines, sequenced_op form (legacy form without numeric after)
    GET  /_health

Submitted ops are validated like the reference does it (shape and limits, genesis hash,
``prev`` chaining, rotation-key signature, 72 h recovery forks by a more powerful key);
errors are ``{"message": ...}`` JSON. The shared :class:`~psky.devnet.faults.Faults`
knob ``private_address_dids`` rewrites the PDS endpoint of served documents (and ``/data``)
to a private/link-local address; logs stay untouched since they are signed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from psky.atproto import plc
from psky.atproto.crypto import PrivateKey
from psky.atproto.did import ATPROTO_PDS
from psky.devnet.faults import Faults, http_fault_middleware
from psky.httpserver import start_app

__all__ = [
    "DidGone",
    "DidNotFound",
    "PlcClient",
    "PlcClientError",
    "PlcDirectory",
    "plc_create_did",
    "plc_submit",
]

log = logging.getLogger("psky.devnet.plc")

#: generous bound on a POST body; real ops are below 4000 bytes of DAG-CBOR
MAX_BODY_BYTES = 64 * 1024
EXPORT_MAX_COUNT = 1000
DID_DOC_TYPE = "application/did+ld+json"


class DidNotFound(LookupError):
    """The directory has never seen this DID."""


class DidGone(LookupError):
    """The DID's current history ends with a tombstone."""


@dataclass(frozen=True, slots=True)
class _Sequenced:
    seq: int
    entry: plc.LogEntry


def _json(obj: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=content_type)


def _message(status: int, message: str) -> web.Response:
    return _json({"message": message}, status)


def _now_ms() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class PlcDirectory:
    """In-memory PLC directory server; several may run in one process."""

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        clock: Callable[[], datetime] | None = None,
        http_faults: bool = False,
    ) -> None:
        """*clock* (UTC datetimes) lets tests move time, e.g. past the recovery window;
        *http_faults* opts this server into the shared HTTP 429/500/slow knobs (off by
        default so PDS-directed faults do not break account creation)."""
        self.faults = faults if faults is not None else Faults()
        self.clock = clock or _now_ms
        self._http_faults = http_faults
        self._logs: dict[str, list[plc.LogEntry]] = {}
        self._sequenced: list[_Sequenced] = []
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        #: delay every ``GET /{did}`` answer by this many milliseconds (a distant directory:
        #: benchmarks and tests of resolution overlap; settable while running)
        self.document_delay_ms: float = 0.0
        #: ``GET /{did}`` requests answered, and the most that were ever in progress at once
        #: (how far callers overlap their resolutions); :meth:`reset_document_counters` zeroes them
        self.document_requests = 0
        self.max_documents_in_flight = 0
        self._documents_in_flight = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); only valid after :meth:`start`."""
        if self._url is None:
            raise RuntimeError("PlcDirectory is not started")
        return self._url

    def make_app(self) -> web.Application:
        """The aiohttp application (routes and error middleware)."""
        middlewares: list[Middleware] = [self._error_middleware]
        if self._http_faults:
            middlewares.append(http_fault_middleware(self.faults, "plc"))
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/_health", self._handle_health)
        app.router.add_get("/export", self._handle_export)
        app.router.add_get("/{did}", self._handle_document)
        app.router.add_post("/{did}", self._handle_post)
        app.router.add_get("/{did}/data", self._handle_data)
        app.router.add_get("/{did}/log", self._handle_log)
        app.router.add_get("/{did}/log/last", self._handle_last)
        app.router.add_get("/{did}/log/audit", self._handle_audit)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on *host*:*port* (0 = a free port)."""
        if self._runner is not None:
            raise RuntimeError("PlcDirectory already started")
        self._runner, self._url = await start_app(self.make_app(), host, port)
        log.info("PLC directory listening on %s", self._url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("PLC directory on %s stopped", self._url)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ in-process API

    def submit(self, did: str, signed_op: Mapping[str, Any]) -> plc.LogEntry:
        """Validate and apply *signed_op* to *did*, exactly as ``POST /{did}`` does.

        Raises a :class:`~psky.atproto.plc.PlcError` subclass when the op is refused.
        """
        op: Any = dict(signed_op) if isinstance(signed_op, Mapping) else signed_op
        plc.check_incoming_op(op)
        entries = self._logs.get(did, [])
        active = [e for e in entries if not e.nullified]
        created_at = self.clock().astimezone(UTC)
        created_at = created_at.replace(microsecond=created_at.microsecond // 1000 * 1000)
        if entries and created_at <= entries[-1].created_at:
            # the audit log needs strictly increasing timestamps, even within one millisecond
            created_at = entries[-1].created_at + timedelta(milliseconds=1)
        outcome = plc.assure_valid_next_op(did, active, op, created_at)
        for entry in entries:
            if entry.cid in outcome.nullified:
                entry.nullified = True
        entry = plc.LogEntry(did, op, plc.op_cid(op), False, created_at)
        self._logs.setdefault(did, []).append(entry)
        self._sequenced.append(_Sequenced(len(self._sequenced) + 1, entry))
        log.debug("accepted %s op %s for %s", op["type"], entry.cid, did)
        return entry

    def register(self, signed_op: Mapping[str, Any]) -> str:
        """Register a signed genesis op in-process; returns the DID it creates."""
        did = plc.did_for_genesis(signed_op)
        self.submit(did, signed_op)
        return did

    def reset_document_counters(self) -> None:
        """Start counting ``GET /{did}`` requests (and their overlap) afresh."""
        self.document_requests = 0
        self.max_documents_in_flight = self._documents_in_flight

    def dids(self) -> list[str]:
        """Every DID ever registered, in registration order."""
        return list(self._logs)

    def _active(self, did: str) -> list[plc.LogEntry]:
        entries = self._logs.get(did)
        if not entries:
            raise DidNotFound(f"DID not registered: {did}")
        return [e for e in entries if not e.nullified]

    def last_op(self, did: str) -> dict[str, Any]:
        """Last op of the current history (a tombstone once tombstoned)."""
        return self._active(did)[-1].operation

    def op_log(self, did: str) -> list[dict[str, Any]]:
        """The current history: signed ops, oldest first."""
        return [e.operation for e in self._active(did)]

    def audit_log(self, did: str) -> list[dict[str, Any]]:
        """Every op ever accepted for *did*, nullified ones included, as served by ``/log/audit``."""
        entries = self._logs.get(did)
        if not entries:
            raise DidNotFound(f"DID not registered: {did}")
        return [e.to_json() for e in entries]

    def data(self, did: str) -> dict[str, Any]:
        """Current PLC data as served by ``/{did}/data`` (faults applied)."""
        data = plc.op_data(did, self.last_op(did))
        if data is None:
            raise DidGone(f"DID not available: {did}")
        if self.faults.uses_private_address(did) and ATPROTO_PDS in data["services"]:
            services = dict(data["services"])
            services[ATPROTO_PDS] = {
                **services[ATPROTO_PDS],
                "endpoint": self.faults.private_address_endpoint,
            }
            data = {**data, "services": services}
        return data

    def document(self, did: str) -> dict[str, Any]:
        """The DID document served by ``GET /{did}`` (faults applied)."""
        return plc.format_document(did, self.data(did))

    def export(self, after: int = 0, count: int = EXPORT_MAX_COUNT) -> list[dict[str, Any]]:
        """``/export`` rows (sequenced_op form) with seq > *after*."""
        rows = self._sequenced[after : after + count] if after >= 0 else []
        return [
            {
                "type": "sequenced_op",
                "seq": row.seq,
                "did": row.entry.did,
                "operation": row.entry.operation,
                "cid": row.entry.cid,
                "createdAt": plc.format_created_at(row.entry.created_at),
            }
            for row in rows
        ]

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _error_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except DidNotFound as e:
            return _message(404, str(e))
        except DidGone as e:
            return _message(410, str(e))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _message(e.status, e.reason)
        except Exception:
            log.exception("PLC directory: error handling %s %s", request.method, request.path)
            return _message(500, "Internal Server Error")

    async def _handle_health(self, request: web.Request) -> web.Response:
        return _json({"version": "psky-devnet"})

    async def _handle_document(self, request: web.Request) -> web.Response:
        self.document_requests += 1
        self._documents_in_flight += 1
        self.max_documents_in_flight = max(self.max_documents_in_flight, self._documents_in_flight)
        try:
            if self.document_delay_ms > 0:
                await asyncio.sleep(self.document_delay_ms / 1000)
            return _json(self.document(request.match_info["did"]), content_type=DID_DOC_TYPE)
        finally:
            self._documents_in_flight -= 1

    async def _handle_data(self, request: web.Request) -> web.Response:
        return _json(self.data(request.match_info["did"]))

    async def _handle_log(self, request: web.Request) -> web.Response:
        return _json(self.op_log(request.match_info["did"]))

    async def _handle_last(self, request: web.Request) -> web.Response:
        return _json(self.last_op(request.match_info["did"]))

    async def _handle_audit(self, request: web.Request) -> web.Response:
        return _json(self.audit_log(request.match_info["did"]))

    async def _handle_post(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        body = await request.read()
        try:
            op = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return _message(400, f"request body is not valid JSON: {e}")
        try:
            self.submit(did, op)
        except plc.PlcError as e:
            log.info("refused op for %s: %s", did, e)
            return _message(400, str(e))
        return web.Response(text="OK")

    async def _handle_export(self, request: web.Request) -> web.Response:
        count_text = request.query.get("count", str(EXPORT_MAX_COUNT))
        after_text = request.query.get("after")
        if not count_text.isdigit() or int(count_text) < 1:
            return _message(400, "Invalid count parameter")
        count = min(int(count_text), EXPORT_MAX_COUNT)
        if after_text is not None and after_text.isdigit():
            rows: list[dict[str, Any]] = self.export(int(after_text), count)
        else:
            since = None
            if after_text is not None:
                try:
                    since = plc.parse_created_at(after_text)
                except plc.PlcError:
                    return _message(400, "Invalid after parameter")
            entries = sorted(
                (row.entry for row in self._sequenced if since is None or row.entry.created_at > since),
                key=lambda e: e.created_at,
            )
            rows = [e.to_json() for e in entries[:count]]
        body = b"\n".join(orjson.dumps(row) for row in rows)
        return web.Response(body=body, content_type="application/jsonlines")


# --- client ------------------------------------------------------------------------------


class PlcClientError(plc.PlcError):
    """The directory answered an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"PLC directory answered {status}: {message}")
        self.status = status
        self.message = message


class PlcClient:
    """Async client for a PLC directory (the devnet one or any other)."""

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._own_session = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise PlcClientError(resp.status, _error_message(body))
            return orjson.loads(body)

    async def submit(self, did: str, signed_op: Mapping[str, Any]) -> None:
        """POST a signed op for *did*; :class:`PlcClientError` if refused."""
        async with self.session.post(
            f"{self.url}/{did}",
            data=orjson.dumps(dict(signed_op)),
            headers={"Content-Type": "application/json"},
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise PlcClientError(resp.status, _error_message(body))

    async def document(self, did: str) -> dict[str, Any]:
        return dict(await self._get(f"/{did}"))

    async def data(self, did: str) -> dict[str, Any]:
        return dict(await self._get(f"/{did}/data"))

    async def last_op(self, did: str) -> dict[str, Any]:
        return dict(await self._get(f"/{did}/log/last"))

    async def op_log(self, did: str) -> list[dict[str, Any]]:
        return list(await self._get(f"/{did}/log"))

    async def audit_log(self, did: str) -> list[dict[str, Any]]:
        return list(await self._get(f"/{did}/log/audit"))

    async def create_did(
        self,
        *,
        signing_key: PrivateKey | str | None,
        rotation_key: PrivateKey,
        handle: str | None,
        pds_endpoint: str | None,
        rotation_keys: Sequence[str] | None = None,
        verification_methods: Mapping[str, str] | None = None,
        services: Mapping[str, Mapping[str, str]] | None = None,
    ) -> str:
        """Build, sign (with *rotation_key*) and register a genesis op; returns the new DID.

        *rotation_keys* defaults to just *rotation_key*'s did:key.
        """
        op = plc.create_op(
            signing_key=_did_key(signing_key),
            rotation_keys=list(rotation_keys) if rotation_keys is not None else [rotation_key.did_key()],
            handle=handle,
            pds_endpoint=pds_endpoint,
            verification_methods=verification_methods,
            services=services,
        )
        signed = plc.sign_op(op, rotation_key)
        did = plc.did_for_genesis(signed)
        await self.submit(did, signed)
        return did

    async def update(
        self,
        did: str,
        rotation_key: PrivateKey,
        *,
        handle: str | None = None,
        pds_endpoint: str | None = None,
        signing_key: PrivateKey | str | None = None,
        rotation_keys: Sequence[str] | None = None,
        verification_methods: Mapping[str, str] | None = None,
        services: Mapping[str, Mapping[str, str]] | None = None,
    ) -> dict[str, Any]:
        """Fetch the last op, change the given fields, sign with *rotation_key*, submit; returns the op."""
        last = await self.last_op(did)
        if last.get("type") == "plc_tombstone":
            raise PlcClientError(410, f"DID not available: {did}")
        op = plc.update_op(
            last,
            handle=handle,
            pds_endpoint=pds_endpoint,
            signing_key=_did_key(signing_key),
            rotation_keys=rotation_keys,
            verification_methods=verification_methods,
            services=services,
        )
        signed = plc.sign_op(op, rotation_key)
        await self.submit(did, signed)
        return signed

    async def tombstone(self, did: str, rotation_key: PrivateKey) -> dict[str, Any]:
        """Deactivate *did* for good; returns the tombstone op."""
        last = await self.last_op(did)
        op = plc.tombstone_op(plc.op_cid(last), rotation_key)
        await self.submit(did, op)
        return op


def _did_key(key: PrivateKey | str | None) -> str | None:
    if key is None or isinstance(key, str):
        return key
    return key.did_key()


def _error_message(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return str(parsed["message"])
    return body[:200].decode("utf-8", "replace")


async def plc_submit(
    plc_or_url: str | PlcClient,
    did: str,
    signed_op: Mapping[str, Any],
    *,
    session: aiohttp.ClientSession | None = None,
) -> None:
    """POST *signed_op* for *did* to a directory given by URL (optionally over *session*) or client."""
    if isinstance(plc_or_url, PlcClient):
        await plc_or_url.submit(did, signed_op)
        return
    async with PlcClient(plc_or_url, session) as client:
        await client.submit(did, signed_op)


async def plc_create_did(
    plc_url: str,
    *,
    signing_key: PrivateKey | str,
    rotation_key: PrivateKey,
    handle: str,
    pds_endpoint: str,
    session: aiohttp.ClientSession | None = None,
) -> str:
    """Register an atproto account DID (signing key, handle, PDS) signed by *rotation_key*; returns the DID."""
    async with PlcClient(plc_url, session) as client:
        return await client.create_did(
            signing_key=signing_key, rotation_key=rotation_key, handle=handle, pds_endpoint=pds_endpoint
        )
