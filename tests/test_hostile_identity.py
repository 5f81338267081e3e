"""Hostile identity data: DID documents, private-address PDS endpoints, forged signatures.

* :func:`parse_did_document` returns a document or raises :class:`InvalidDidDocument` for
  any JSON value; whatever PDS endpoint it yields, the backfiller's address guard either
  refuses it or hands back a host name that the guarded resolver checks when connecting.
  Every private-address spelling tried (IP literals, IPv4-mapped IPv6, zone ids, ``localhost``
  variants, full-width digits and ideographic dots that IDNA maps onto ``127.0.0.1``) is
  fetched for real against a local server by :func:`fetch_repo`: the server sees no request.
* Signatures: any tampered, random, high-S, truncated or non-bytes signature verifies as
  False (commits, labels), never raises; key strings that are not keys raise only
  :class:`InvalidKey`; label frames only :class:`InvalidLabelMessage`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psky.atproto import cbor
from psky.atproto.commit import Commit, sign_commit
from psky.atproto.crypto import K256_N, P256_N, InvalidKey, PrivateKey, parse_did_key, verifier_for
from psky.atproto.did import DidDocument, InvalidDidDocument, parse_did_document
from psky.atproto.label import (
    InvalidLabelMessage,
    Label,
    LabelsMessage,
    decode_labels_frame,
    encode_labels_frame,
    sign_label,
)
from psky.backfiller.fetch import Fatal, Transient, fetch_repo
from psky.backfiller.hosts import AddressGuard, AddressRefused, GuardedResolver

HOSTILE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def hostile(max_examples: int) -> settings:
    """CI size by default; ``PSKY_HOSTILE_SCALE=N`` multiplies every budget for long runs."""
    return settings(HOSTILE, max_examples=max_examples * int(os.environ.get("PSKY_HOSTILE_SCALE", "1")))


DID = "did:plc:hostilehostilehostilehos"
K256 = PrivateKey.from_bytes(b"\x05" * 32, "k256")
P256 = PrivateKey.from_bytes(b"\x06" * 32, "p256")

#: private / loopback / link-local targets, spelled every way a DID document could
PRIVATE_HOSTS = [
    "127.0.0.1", "127.0.0.2", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "[::1]", "[::]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[fe80::1%25eth0]",
    "[fc00::1]", "localhost", "LOCALHOST", "localhost.", "pds.localhost", "１２７.0.0.1", "127。0。0。1",
    "１２７．０．０．１", "①②⑦.0.0.1",
]  # fmt: skip
PUBLIC_HOSTS = ["pds.example.com", "bsky.social", "8.8.8.8", "[2001:4860:4860::8888]", "xn--bcher-kva.example"]


def _doc(endpoint: Any, **extra: Any) -> dict[str, Any]:
    return {
        "id": DID,
        "alsoKnownAs": ["at://alice.test"],
        "verificationMethod": [
            {"id": f"{DID}#atproto", "type": "Multikey", "controller": DID, "publicKeyMultibase": K256.public_key().multibase()}
        ],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": endpoint}],
        **extra,
    }


def _guard_outcome(guard: AddressGuard, endpoint: str) -> str | None:
    """The host the guard lets through, or None if refused; checks the lets-through invariant."""
    try:
        host = guard.check_url(endpoint)
    except AddressRefused:
        return None
    # what aiohttp will connect to: a public IP literal, or a name (checked again at resolution)
    connect = yarl.URL(endpoint).host or ""
    try:
        import ipaddress

        ip = ipaddress.ip_address(connect.split("%", 1)[0])
    except ValueError:
        return host
    assert guard.address_allowed(str(ip)), f"guard let {endpoint!r} through to {ip}"
    return host


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_private_endpoints_parse_but_the_guard_refuses_the_literals(host: str, scheme: str) -> None:
    doc = parse_did_document(_doc(f"{scheme}://{host}:2583/"))
    assert doc.pds_endpoint is not None  # parsing keeps it: refusing is the backfiller's job
    guard = AddressGuard()
    outcome = _guard_outcome(guard, doc.pds_endpoint)
    if outcome is not None:
        # only names get through the URL check; the resolver refuses them when connecting
        assert not outcome[0].isdigit() and ":" not in outcome, outcome
    allowed = AddressGuard(["127.0.0.0/8", "::1", "localhost"])
    if host in ("127.0.0.1", "127.0.0.2", "[::1]", "localhost", "LOCALHOST"):
        assert _guard_outcome(allowed, doc.pds_endpoint) is not None


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_public_endpoints_pass(host: str) -> None:
    doc = parse_did_document(_doc(f"https://{host}"))
    assert doc.pds_endpoint is not None and _guard_outcome(AddressGuard(), doc.pds_endpoint) is not None


_text = st.text(max_size=30) | st.sampled_from(["", "\x00", "#atproto_pds", f"{DID}#atproto_pds", "#", "did:plc:x#atproto"])
_endpoint = (
    st.sampled_from([f"{s}://{h}{p}{path}" for s in ("http", "https", "HTTP", "ftp", "javascript")
                     for h in PRIVATE_HOSTS[:8] + PUBLIC_HOSTS[:2] for p in ("", ":0", ":99999", ":-1", ":80")
                     for path in ("", "/", "/x?y#z", "@evil.com", "\\@evil.com")])
    | st.text(max_size=60)
    | st.sampled_from([None, 5, [], {}, "http://", "http://[::1", "http://a b", "http://" + "a" * 3000])
)  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@hostile(1500)
@given(
    _endpoint,
    st.lists(st.fixed_dictionaries({"id": _text, "type": _text, "serviceEndpoint": _endpoint}), max_size=4)
    | _json,
    st.lists(st.fixed_dictionaries({"id": _text, "type": _text, "publicKeyMultibase": _text, "controller": _text}), max_size=3)
    | _json,
    st.lists(_text, max_size=3) | _json,
)
def test_did_documents_only_invalid_document_error(endpoint: Any, services: Any, methods: Any, aka: Any) -> None:
    for doc in (
        _doc(endpoint),
        _doc(endpoint, service=services, verificationMethod=methods, alsoKnownAs=aka),
        {"id": endpoint, "service": services},
        services,
    ):
        try:
            parsed = parse_did_document(doc, expected_did=DID if isinstance(doc, dict) and doc.get("id") == DID else None)
        except InvalidDidDocument:
            continue
        assert isinstance(parsed, DidDocument)
        for svc in parsed.services.values():
            _guard_outcome(AddressGuard(), svc.endpoint)


# --- for real: fetch_repo against a local server, through the guarded resolver ------------


@pytest.fixture
async def loopback_servers() -> AsyncIterator[tuple[int, int, list[str]]]:
    """Two local "PDSes": 127.0.0.1 redirects to the second, 127.0.0.2; both record hits."""
    hits: list[str] = []
    runners: list[web.AppRunner] = []
    ports: list[int] = []
    for addr in ("127.0.0.2", "127.0.0.1"):

        async def handle(request: web.Request, addr: str = addr) -> web.StreamResponse:
            hits.append(f"{addr}{request.path_qs}")
            if addr == "127.0.0.1":
                raise web.HTTPFound(f"http://１２７.0.0.2:{ports[0]}/xrpc/com.atproto.sync.getRepo")
            return web.Response(body=b"not a car")

        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, addr, 0)
        await site.start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
    try:
        yield ports[0], ports[1], hits
    finally:
        for runner in runners:
            await runner.cleanup()


async def _fetch(guard: AddressGuard, endpoint: str) -> BaseException | None:
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(guard))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            await fetch_repo(session, guard, endpoint, DID, K256.did_key(), max_car_bytes=1 << 20)
        except (Fatal, Transient) as e:
            return e
    return None


async def test_private_endpoints_are_never_contacted(loopback_servers: tuple[int, int, list[str]]) -> None:
    port2, port1, hits = loopback_servers
    guard = AddressGuard()
    for host in PRIVATE_HOSTS:
        for port in (port1, port2):
            outcome = await _fetch(guard, f"http://{host}:{port}")
            assert outcome is not None, host
            assert isinstance(outcome, Transient) or (isinstance(outcome, Fatal) and outcome.kind == "refused"), (host, outcome)
    assert hits == []
    # allow-listing the first "PDS" shows the setup reaches it, and that its redirect to an
    # IDNA spelling of the second one is refused at the hop
    outcome = await _fetch(AddressGuard(["127.0.0.1"]), f"http://127.0.0.1:{port1}")
    assert isinstance(outcome, Fatal) and outcome.kind == "refused", outcome
    assert hits == [f"127.0.0.1/xrpc/com.atproto.sync.getRepo?did={DID}"]


async def test_guarded_resolver_refuses_numeric_spellings_of_loopback() -> None:
    resolver = GuardedResolver(AddressGuard())
    try:
        for name in ("localhost", "127.1", "0x7f.1", "2130706433", "0177.0.0.1", "localhost."):
            with pytest.raises(OSError):
                await asyncio.wait_for(resolver.resolve(name, 80), 10)
    finally:
        await resolver.close()


# --- forged signatures ------------------------------------------------------------------


def _signed_commit(key: PrivateKey) -> Commit:
    _, block = sign_commit(DID, cbor.cid_for_cbor(b"tree"), "3kzzzzzzzzzz2", key)
    return Commit.decode(block)


COMMITS = {"k256": (_signed_commit(K256), K256), "p256": (_signed_commit(P256), P256)}


@hostile(800)
@given(st.sampled_from(["k256", "p256"]), st.integers(0, 63), st.integers(1, 255), st.booleans())
def test_tampered_commit_signatures_fail(curve: str, pos: int, xor: int, other_key: bool) -> None:
    commit, key = COMMITS[curve]
    assert commit.verify(key.did_key())
    sig = bytearray(commit.sig)
    sig[pos] ^= xor
    forged = Commit(commit.did, commit.version, commit.data, commit.rev, commit.prev, bytes(sig))
    assert forged.verify(key.did_key()) is False
    if other_key:
        assert commit.verify((P256 if curve == "k256" else K256).did_key()) is False


@hostile(800)
@given(st.sampled_from(["k256", "p256"]), st.binary(max_size=130) | st.sampled_from([b"", b"\x00" * 64, b"\xff" * 64]))
def test_random_signatures_fail(curve: str, sig: bytes) -> None:
    commit, key = COMMITS[curve]
    forged = Commit(commit.did, commit.version, commit.data, commit.rev, commit.prev, sig)
    assert forged.verify(key.did_key()) is False


@pytest.mark.parametrize("curve,order", [("k256", K256_N), ("p256", P256_N)])
def test_high_s_twin_of_a_valid_signature_fails(curve: str, order: int) -> None:
    commit, key = COMMITS[curve]
    r, s = commit.sig[:32], int.from_bytes(commit.sig[32:], "big")
    twin = r + (order - s).to_bytes(32, "big")  # mathematically valid ECDSA, but high-S
    public = key.public_key()
    assert public.verify(commit.unsigned_bytes(), twin) is False
    assert public.verify(commit.unsigned_bytes(), twin, allow_high_s=True) is True


@pytest.mark.parametrize("sig", [None, 5, 2**70, -1, "x" * 64, ["a"], {"$bytes": "AA"}, object(), bytearray(64), memoryview(b"\x01" * 64)])
@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_signatures_of_the_wrong_type_fail(curve: str, sig: Any) -> None:
    """Found by this suite: a K-256 key handed an integer built bytes(n) of it, allocating n
    bytes, or raised OverflowError."""
    commit, key = COMMITS[curve]
    assert key.public_key().verify(commit.unsigned_bytes(), sig) is False
    assert key.public_key().verify(sig, commit.sig) is False


@hostile(800)
@given(st.text(max_size=120) | st.sampled_from(["did:key:", "did:key:z", "did:key:z" + "1" * 200, "did:key:zQ3sh" + "z" * 50]))
def test_key_strings_only_invalid_key(text: str) -> None:
    for parse in (parse_did_key, verifier_for):
        try:
            parse(text)
        except InvalidKey:
            pass
    try:
        parse_did_key("did:key:" + text)
    except InvalidKey:
        pass


LABEL = sign_label(
    Label(src=DID, uri="at://did:plc:hostilehostilehostilehos/app.bsky.feed.post/3kzzzzzzzzzz2", val="spam", cts="2024-05-01T12:00:00.123Z"),
    K256,
)
LABEL_FRAME = encode_labels_frame(LabelsMessage(12, (LABEL,), ()))


@hostile(800)
@given(st.lists(st.tuples(st.integers(0, len(LABEL_FRAME) - 1), st.integers(0, 255)), min_size=1, max_size=6), st.booleans())
def test_mutated_label_frames(edits: list[tuple[int, int]], strict: bool) -> None:
    buf = bytearray(LABEL_FRAME)
    for pos, val in edits:
        buf[pos] = val
    try:
        msg = decode_labels_frame(bytes(buf), strict=strict)
    except InvalidLabelMessage:
        return
    if isinstance(msg, LabelsMessage):
        for label in msg.labels:
            if label.verify(K256.did_key()):
                # a label that still verifies says what was signed
                assert (label.src, label.uri, label.val, label.neg, label.cts) == (
                    LABEL.src, LABEL.uri, LABEL.val, LABEL.neg, LABEL.cts
                )
            label.verify("did:key:zgarbage")
