"""Devnet labeler: signed labels over ``com.atproto.label.subscribeLabels`` and ``queryLabels``.

Modelled on the reference labeler (ozone):

* its own did:plc, registered at the devnet PLC directory on :meth:`Labeler.start` with a
  ``#atproto_label`` verification method (the label signing key) and an ``atproto_labeler``
  service (type ``AtprotoLabeler``) pointing at the labeler — the genesis op ozone's dev-env
  registers (no handle, no PDS unless given);
* labels are version 1, ``cts`` = now, signed over their DAG-CBOR without ``sig``
  (:func:`psky.atproto.label.sign_label`); ``neg`` is omitted unless true;
* every label gets its own seq and travels alone in a ``#labels`` message
  ``{seq, labels: [label]}``. As in ozone's label table, a label is keyed by
  ``(src, uri, cid, val)``: issuing the same key again (a negation, a new expiry) gives it a
  new seq and the earlier event is dropped from the log, so a replay from an old cursor yields
  the current state of each label, while a live subscriber that keeps up sees every
  version (``compact=False`` keeps every version in the log instead);
* ``subscribeLabels`` has the repo stream's cursor semantics (replay then live,
  ``FutureCursor`` error frame, ``#info OutdatedCursor`` past the retained window), served by
  the shared :class:`~psky.devnet.sequencer.Sequencer`;
* ``queryLabels`` answers ozone's way: ``uriPatterns`` exact or prefix (``*`` only at the
  end; ``*`` alone matches all), optional ``sources``, ``limit`` 1–250 (default 50), the
  cursor is the last label's seq; expired and negated labels are returned as they are.

Faults: ``bad_signature`` signs labels with a throwaway key; the stream knobs act on
``subscribeLabels``; the HTTP knobs on every request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from psky.atproto.crypto import PrivateKey
from psky.atproto.did import ATPROTO_LABEL_KEY, ATPROTO_LABELER, LABELER_TYPE
from psky.atproto.firehose import now_iso
from psky.atproto.label import Label, LabelsMessage, encode_labels_frame, sign_label
from psky.devnet.faults import Faults, http_fault_middleware
from psky.devnet.plc import PlcClient
from psky.devnet.sequencer import Sequencer
from psky.devnet.xrpc import invalid_request, json_response, param_int, xrpc_middleware
from psky.httpserver import start_app

__all__ = ["Labeler", "format_datetime"]

log = logging.getLogger("psky.devnet.labeler")

SUBSCRIBE_LABELS = "/xrpc/com.atproto.label.subscribeLabels"
QUERY_LABELS = "/xrpc/com.atproto.label.queryLabels"

_LabelKey = tuple[str, str, str, str]


def format_datetime(when: datetime) -> str:
    """A datetime as atproto writes them (UTC, milliseconds, ``Z``); naive means UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Labeler:
    """A labeling service with its own DID and signing key (see the module docstring).

    *key* is the label signing key (new k256 key by default) and *rotation_key* the PLC
    rotation key (new k256 key by default); *handle* adds an ``at://`` alias to the DID.
    """

    def __init__(
        self,
        plc_url: str,
        *,
        key: PrivateKey | None = None,
        rotation_key: PrivateKey | None = None,
        handle: str | None = None,
        faults: Faults | None = None,
        retain: int | None = None,
        max_buffer: int = 10_000,
        compact: bool = True,
    ) -> None:
        self.plc_url = plc_url.rstrip("/")
        self.key = key or PrivateKey.generate("k256")
        self.rotation_key = rotation_key or PrivateKey.generate("k256")
        self.handle = handle
        self.faults = faults
        self.compact = compact
        self.sequencer = Sequencer(retain=retain, max_buffer=max_buffer, logger=log)
        #: current label per (src, uri, cid, val), in seq order (ozone's label table)
        self._current: dict[_LabelKey, tuple[int, Label]] = {}
        self._did: str | None = None
        self._registered_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    # -- identity

    @property
    def did(self) -> str:
        """The labeler's DID (registered by :meth:`start`)."""
        if self._did is None:
            raise RuntimeError("the labeler has no DID before start()")
        return self._did

    @property
    def did_key(self) -> str:
        """The did:key of the current label signing key (``#atproto_label``)."""
        return self.key.did_key()

    def _services(self) -> dict[str, dict[str, str]]:
        return {ATPROTO_LABELER: {"type": LABELER_TYPE, "endpoint": self.url}}

    async def _register(self) -> None:
        assert self._session is not None
        plc = PlcClient(self.plc_url, self._session)
        if self._did is None:
            self._did = await plc.create_did(
                signing_key=None,
                rotation_key=self.rotation_key,
                handle=self.handle,
                pds_endpoint=None,
                verification_methods={ATPROTO_LABEL_KEY: self.did_key},
                services=self._services(),
            )
            log.info("labeler DID %s registered at %s", self._did, self.plc_url)
        elif self._registered_url != self.url:
            await plc.update(self._did, self.rotation_key, services=self._services())
        self._registered_url = self.url

    async def rotate_key(self, new_key: PrivateKey | None = None) -> str:
        """Switch to a new label signing key and publish it in the DID document; returns its did:key.

        Labels issued before keep their old signatures (consumers must re-resolve the DID).
        """
        if self._session is None:
            raise RuntimeError("the labeler is not started")
        key = new_key or PrivateKey.generate("k256")
        plc = PlcClient(self.plc_url, self._session)
        await plc.update(self.did, self.rotation_key, verification_methods={ATPROTO_LABEL_KEY: key.did_key()})
        self.key = key
        return self.did_key

    # -- lifecycle

    def make_app(self) -> web.Application:
        middlewares = [xrpc_middleware(log)]
        if self.faults is not None:
            middlewares.append(http_fault_middleware(self.faults, f"labeler:{id(self)}"))
        app = web.Application(middlewares=middlewares)
        app.router.add_get(SUBSCRIBE_LABELS, self._subscribe_labels)
        app.router.add_get(QUERY_LABELS, self._query_labels)
        app.router.add_get("/xrpc/_health", self._health)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Labeler:
        """Listen on *host*:*port* (0 = a free port) and register the DID at the PLC."""
        if self._runner is not None:
            raise RuntimeError("labeler already started")
        self._runner, self.url = await start_app(self.make_app(), host, port)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            await self._register()
        except BaseException:
            await self.stop()
            raise
        log.info("labeler %s listening on %s", self._did, self.url)
        return self

    async def stop(self) -> None:
        """End every subscription (1001) and close the server."""
        await self.sequencer.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Labeler:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- labelling

    async def label(
        self,
        uri: str,
        val: str,
        *,
        cid: str | None = None,
        neg: bool = False,
        exp: str | datetime | None = None,
        cts: str | datetime | None = None,
    ) -> Label:
        """Issue (or with ``neg=True`` retract) a label on *uri* (an at:// URI or a DID).

        The label is signed, sequenced and pushed to subscribers; InvalidLabel (ValueError)
        if a field is malformed.
        """
        unsigned = Label(
            src=self.did,
            uri=uri,
            cid=cid,
            val=val,
            neg=neg,
            cts=_datetime(cts) if cts is not None else now_iso(),
            exp=_datetime(exp) if exp is not None else None,
        )
        signer = self.key
        if self.faults is not None and self.faults.chance("bad_signature"):
            signer = PrivateKey.generate(self.key.curve)
            log.info("fault: signing label %s on %s with a wrong key", val, uri)
        signed = sign_label(unsigned, signer)
        key = (signed.src, signed.uri, signed.cid or "", signed.val)
        seq = self.sequencer.append(
            lambda seq, _time: encode_labels_frame(LabelsMessage(seq, (signed,))),
            did="\x00".join(key),
        )
        previous = self._current.pop(key, None)
        self._current[key] = (seq, signed)
        if previous is not None and self.compact:
            self.sequencer.purge("\x00".join(key), keep=seq)
        return signed

    async def negate(self, uri: str, val: str, *, cid: str | None = None) -> Label:
        """Retract a label: the same ``(uri, cid, val)`` with ``neg: true``."""
        return await self.label(uri, val, cid=cid, neg=True)

    @property
    def seq(self) -> int:
        """Seq of the newest label (0 before the first)."""
        return self.sequencer.seq

    def labels(self) -> list[tuple[int, Label]]:
        """The current labels (the latest version per ``(src, uri, cid, val)``) with their seqs."""
        return list(self._current.values())

    # -- XRPC handlers

    async def _health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def _subscribe_labels(self, request: web.Request) -> web.StreamResponse:
        return await self.sequencer.serve(request, faults=self.faults, fault_key=f"labeler:{id(self)}")

    async def _query_labels(self, request: web.Request) -> web.Response:
        patterns = _list_param(request, "uriPatterns")
        if not patterns:
            raise invalid_request('Params must have the property "uriPatterns"')
        sources = set(_list_param(request, "sources"))
        limit = param_int(request, "limit", default=50, minimum=1, maximum=250)
        assert limit is not None
        raw_cursor = request.query.get("cursor")
        after = 0
        if raw_cursor:
            try:
                after = int(raw_cursor, 10)
            except ValueError:
                raise invalid_request("invalid cursor") from None
        match = _matcher(patterns)
        out: list[dict[str, Any]] = []
        last: int | None = None
        for seq, label in self._current.values():
            if seq <= after or (sources and label.src not in sources) or not match(label.uri):
                continue
            out.append(label.to_lex())
            last = seq
            if len(out) >= limit:
                break
        body: dict[str, Any] = {"labels": out}
        if last is not None:
            body["cursor"] = str(last)
        return json_response(body)


def _datetime(value: str | datetime) -> str:
    return format_datetime(value) if isinstance(value, datetime) else value


def _list_param(request: web.Request, name: str) -> list[str]:
    """An array query parameter: repeated ``name=`` (also ``name[]=``), empty values skipped."""
    values = request.query.getall(name, []) + request.query.getall(name + "[]", [])
    return [v for v in values if v]


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Predicate for ``uriPatterns``: exact URIs, or prefixes ending in ``*``."""
    if "*" in patterns:
        return lambda uri: True
    exact: set[str] = set()
    prefixes: list[str] = []
    for pattern in patterns:
        star = pattern.find("*")
        if star == -1:
            exact.add(pattern)
        elif star != len(pattern) - 1:
            raise invalid_request(f"invalid pattern: {pattern}")
        else:
            prefixes.append(pattern[:-1])
    prefix_tuple = tuple(prefixes)

    def match(uri: str) -> bool:
        return uri in exact or (bool(prefix_tuple) and uri.startswith(prefix_tuple))

    return match
