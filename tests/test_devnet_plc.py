"""The devnet PLC directory over real loopback HTTP, checked with psky's PLC and DID code."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from psky.atproto import plc
from psky.atproto.crypto import PrivateKey
from psky.atproto.did import parse_did_document
from psky.devnet.faults import Faults
from psky.devnet.plc import (
    DidGone,
    DidNotFound,
    PlcClient,
    PlcClientError,
    PlcDirectory,
    plc_create_did,
    plc_submit,
)

PDS = "http://127.0.0.1:2583"


class Clock:
    """A settable clock so tests can step over the 72 h recovery window."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def directory() -> AsyncIterator[PlcDirectory]:
    async with PlcDirectory() as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(directory: PlcDirectory, http: aiohttp.ClientSession) -> PlcClient:
    return PlcClient(directory.url, http)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, str]:
    async with http.get(url) as resp:
        body = await resp.read()
        return resp.status, orjson.loads(body) if body else None, resp.content_type


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, Any]:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        raw = await resp.read()
        if resp.status == 200:
            return resp.status, raw.decode()
        assert resp.content_type == "application/json"
        return resp.status, orjson.loads(raw)


async def new_account(
    directory: PlcDirectory, *, handle: str = "alice.pds1.test", curve: str = "k256"
) -> tuple[str, PrivateKey, PrivateKey]:
    signing = PrivateKey.generate("k256")
    rotation = PrivateKey.generate(curve)  # type: ignore[arg-type]
    did = await plc_create_did(
        directory.url, signing_key=signing, rotation_key=rotation, handle=handle, pds_endpoint=PDS
    )
    return did, signing, rotation


# --- happy paths ----------------------------------------------------------------------


@pytest.mark.parametrize("curve", ["k256", "p256"])
async def test_create_and_resolve(directory: PlcDirectory, http: aiohttp.ClientSession, curve: str) -> None:
    did, signing, rotation = await new_account(directory, curve=curve)
    assert plc.is_valid_plc_did(did)

    status, doc, ctype = await get(http, f"{directory.url}/{did}")
    assert status == 200 and ctype == "application/did+ld+json"
    parsed = parse_did_document(doc, expected_did=did)
    assert parsed.signing_key == signing.did_key()
    assert parsed.handle == "alice.pds1.test"
    assert parsed.pds_endpoint == PDS
    assert doc == directory.document(did)

    status, data, ctype = await get(http, f"{directory.url}/{did}/data")
    assert status == 200 and ctype == "application/json"
    assert data == {
        "did": did,
        "verificationMethods": {"atproto": signing.did_key()},
        "rotationKeys": [rotation.did_key()],
        "alsoKnownAs": ["at://alice.pds1.test"],
        "services": {"atproto_pds": {"type": "AtprotoPersonalDataServer", "endpoint": PDS}},
    }

    status, ops, _ = await get(http, f"{directory.url}/{did}/log")
    assert status == 200 and len(ops) == 1 and plc.did_for_genesis(ops[0]) == did
    status, last, _ = await get(http, f"{directory.url}/{did}/log/last")
    assert last == ops[0]
    status, audit, _ = await get(http, f"{directory.url}/{did}/log/audit")
    assert [set(e) for e in audit] == [{"did", "operation", "cid", "nullified", "createdAt"}]
    assert audit[0]["cid"] == plc.op_cid(ops[0]) and audit[0]["nullified"] is False
    assert plc.validate_audit_log(audit) == data


async def test_handle_change_and_key_rotation(directory: PlcDirectory, client: PlcClient) -> None:
    did, signing, rotation = await new_account(directory)
    await client.update(did, rotation, handle="bob.pds1.test")
    doc = parse_did_document(await client.document(did), expected_did=did)
    assert doc.handle == "bob.pds1.test" and doc.signing_key == signing.did_key()

    # rotate the signing key and the rotation key at once
    new_signing, new_rotation = PrivateKey.generate("p256"), PrivateKey.generate("p256")
    await client.update(did, rotation, signing_key=new_signing, rotation_keys=[new_rotation.did_key()])
    doc = parse_did_document(await client.document(did), expected_did=did)
    assert doc.signing_key == new_signing.did_key()

    # the old rotation key has lost its power
    with pytest.raises(PlcClientError) as err:
        await client.update(did, rotation, handle="mallory.pds1.test")
    assert err.value.status == 400 and "not signed" in err.value.message
    await client.update(did, new_rotation, pds_endpoint="http://127.0.0.1:9999")
    doc = parse_did_document(await client.document(did), expected_did=did)
    assert doc.pds_endpoint == "http://127.0.0.1:9999" and doc.handle == "bob.pds1.test"

    ops = await client.op_log(did)
    assert len(ops) == 4
    assert [op["prev"] for op in ops[1:]] == [plc.op_cid(op) for op in ops[:-1]]
    data = await client.data(did)
    assert plc.validate_op_log(did, ops) == data
    assert plc.validate_audit_log(await client.audit_log(did)) == data


async def test_tombstone(directory: PlcDirectory, http: aiohttp.ClientSession, client: PlcClient) -> None:
    did, _, rotation = await new_account(directory)
    tomb = await client.tombstone(did, rotation)
    for path in ("", "/data"):
        status, body, _ = await get(http, f"{directory.url}/{did}{path}")
        assert status == 410 and body == {"message": f"DID not available: {did}"}
    assert await client.last_op(did) == tomb
    assert len(await client.op_log(did)) == 2
    assert plc.validate_audit_log(await client.audit_log(did)) is None
    # nothing can follow a tombstone
    late = plc.sign_op(
        plc.create_op(signing_key=None, rotation_keys=[], handle=None, pds_endpoint=None), rotation
    )
    late = plc.sign_op({**late, "prev": plc.op_cid(tomb)}, rotation)
    status, body = await post(http, f"{directory.url}/{did}", orjson.dumps(late))
    assert status == 400 and "tombstoned" in body["message"]
    with pytest.raises(PlcClientError) as err:
        await client.update(did, rotation, handle="x.test")
    assert err.value.status == 410
    with pytest.raises(DidGone):
        directory.document(did)


async def test_unknown_did_is_404(directory: PlcDirectory, http: aiohttp.ClientSession) -> None:
    did = "did:plc:" + "a" * 24
    for path in ("", "/data", "/log", "/log/last", "/log/audit"):
        status, body, ctype = await get(http, f"{directory.url}/{did}{path}")
        assert status == 404 and ctype == "application/json"
        assert body == {"message": f"DID not registered: {did}"}
    status, body, _ = await get(http, f"{directory.url}/{did}/nope/nope")
    assert status == 404 and "message" in body
    with pytest.raises(DidNotFound):
        directory.document(did)


# --- refusals -----------------------------------------------------------------------------


def genesis(rotation: PrivateKey, **changes: Any) -> dict[str, Any]:
    op = plc.create_op(
        signing_key=PrivateKey.generate("k256").did_key(),
        rotation_keys=[rotation.did_key()],
        handle="eve.test",
        pds_endpoint=PDS,
    )
    return plc.sign_op({**op, **changes}, rotation)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'"op"', "JSON object"),
        (b"null", "JSON object"),
        (b"{}", "unknown operation type"),
        (b'{"type": "plc_operation"}', "not signed"),
        (b'{"type": "plc_operation", "sig": "x"}', "missing"),
        (b'{"type": "plc_tombstone", "prev": "x", "sig": "y"}', "prev is not a valid CID"),
    ],
)
async def test_malformed_post_bodies(
    directory: PlcDirectory, http: aiohttp.ClientSession, body: bytes, words: str
) -> None:
    status, answer = await post(http, f"{directory.url}/did:plc:{'a' * 24}", body)
    assert status == 400
    assert set(answer) == {"message"} and words in answer["message"]
    assert directory.dids() == []


async def test_refused_ops(directory: PlcDirectory, http: aiohttp.ClientSession) -> None:
    key = PrivateKey.generate("k256")
    op = genesis(key)
    did = plc.did_for_genesis(op)
    url = f"{directory.url}/{did}"
    ed25519 = "did:key:z6MkjwbBXZnFqL8su24wGL2Fdjti6GSLv9SWdYGswfazUPm9"
    cases: list[tuple[str, dict[str, Any], str]] = [
        (url, {k: v for k, v in op.items() if k != "sig"}, "not signed"),
        (url, {**op, "sig": op["sig"] + "=="}, "86 base64url"),
        (url, {**op, "alsoKnownAs": ["at://mallory.test"]}, "not signed"),
        (f"{directory.url}/did:plc:{'b' * 24}", op, "hashes to"),
        (url, {**op, "extra": True}, "unexpected field"),
        (url, genesis(key, rotationKeys=[ed25519]), "rotationKey"),
        (url, genesis(key, prev=plc.op_cid(op)), "prev null"),
    ]
    for target, body, words in cases:
        status, answer = await post(http, target, orjson.dumps(body))
        assert status == 400, words
        assert words in answer["message"]
    # a genesis op signed by a key outside its own rotation keys
    other = PrivateKey.generate("p256")
    forged = plc.sign_op(op, other)
    status, answer = await post(http, f"{directory.url}/{plc.did_for_genesis(forged)}", orjson.dumps(forged))
    assert status == 400 and "not signed" in answer["message"]
    # legacy create ops are history only
    legacy = plc.sign_op(
        {
            "type": "create",
            "signingKey": key.did_key(),
            "recoveryKey": key.did_key(),
            "handle": "a.test",
            "service": PDS,
            "prev": None,
        },
        key,
    )
    status, answer = await post(http, f"{directory.url}/{plc.did_for_genesis(legacy)}", orjson.dumps(legacy))
    assert status == 400 and "legacy" in answer["message"]
    assert directory.dids() == []

    # then the real thing, and updates with broken chaining or signatures
    status, _ = await post(http, url, orjson.dumps(op))
    assert status == 200
    status, answer = await post(http, url, orjson.dumps(op))
    assert status == 400 and "prev" in answer["message"]
    update = plc.update_op(op, handle="new.test")
    for body, words in [
        (plc.sign_op({**update, "prev": None}, key), "must name its prev"),
        (plc.sign_op({**update, "prev": plc.op_cid(update | {"sig": op["sig"]})}, key), "not an operation"),
        (plc.sign_op(update, other), "not signed"),
        ({**plc.sign_op(update, key), "alsoKnownAs": []}, "not signed"),
    ]:
        status, answer = await post(http, url, orjson.dumps(body))
        assert status == 400 and words in answer["message"], words
    assert len(directory.op_log(did)) == 1


async def test_oversized_body(directory: PlcDirectory, http: aiohttp.ClientSession) -> None:
    status, answer = await post(
        http, f"{directory.url}/did:plc:{'a' * 24}", b'{"x": "' + b"a" * 100_000 + b'"}'
    )
    assert status == 413 and "message" in answer
    key = PrivateKey.generate("k256")
    big = genesis(key, services={f"s{i}": {"type": "t" * 200, "endpoint": "e" * 500} for i in range(10)})
    status, answer = await post(http, f"{directory.url}/{plc.did_for_genesis(big)}", orjson.dumps(big))
    assert status == 400 and "too large" in answer["message"]


# --- recovery -----------------------------------------------------------------------------


async def test_recovery_fork_over_http(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with PlcDirectory(clock=clock) as directory:
        client = PlcClient(directory.url, http)
        recovery, rotation = PrivateKey.generate("k256"), PrivateKey.generate("p256")
        did = await client.create_did(
            signing_key=PrivateKey.generate("k256"),
            rotation_key=rotation,
            rotation_keys=[recovery.did_key(), rotation.did_key()],
            handle="victim.test",
            pds_endpoint=PDS,
        )
        fork_point = await client.last_op(did)
        clock.now += timedelta(hours=1)
        await client.update(did, rotation, handle="hijacked.test")
        clock.now += timedelta(hours=1)
        recovered = plc.sign_op(plc.update_op(fork_point, handle="victim2.test"), recovery)
        # the weaker key cannot do it
        weak = plc.sign_op(plc.update_op(fork_point, handle="x.test"), rotation)
        with pytest.raises(PlcClientError, match="history fork"):
            await plc_submit(client, did, weak)
        await plc_submit(directory.url, did, recovered, session=http)
        audit = await client.audit_log(did)
        assert [e["nullified"] for e in audit] == [False, True, False]
        data = plc.validate_audit_log(audit)
        assert data is not None and data["alsoKnownAs"] == ["at://victim2.test"]
        assert await client.op_log(did) == [fork_point, recovered]

        # a second hijack, recovered too late
        await client.update(did, rotation, handle="hijacked-again.test")
        clock.now += timedelta(hours=73)
        late = plc.sign_op(plc.update_op(recovered, handle="too-late.test"), recovery)
        with pytest.raises(PlcClientError, match="72 h"):
            await client.submit(did, late)


async def test_timestamps_strictly_increase(directory: PlcDirectory, client: PlcClient) -> None:
    frozen = Clock()
    directory.clock = frozen
    did, _, rotation = await new_account(directory)
    for i in range(3):
        await client.update(did, rotation, handle=f"h{i}.test")
    audit = await client.audit_log(did)
    stamps = [plc.parse_created_at(e["createdAt"]) for e in audit]
    assert stamps == sorted(set(stamps)) and len(stamps) == 4
    assert plc.validate_audit_log(audit) is not None


# --- faults, export, in-process helpers ---------------------------------------------------------


async def test_private_address_fault(http: aiohttp.ClientSession) -> None:
    faults = Faults()
    async with PlcDirectory(faults=faults) as directory:
        did, _, _ = await new_account(directory)
        other, _, _ = await new_account(directory, handle="other.test")
        faults.private_address_dids = frozenset({did})
        _, doc, _ = await get(http, f"{directory.url}/{did}")
        assert parse_did_document(doc, expected_did=did).pds_endpoint == "http://169.254.169.254"
        _, data, _ = await get(http, f"{directory.url}/{did}/data")
        assert data["services"]["atproto_pds"]["endpoint"] == "http://169.254.169.254"
        _, doc, _ = await get(http, f"{directory.url}/{other}")
        assert parse_did_document(doc).pds_endpoint == PDS
        # the signed log is never rewritten
        _, last, _ = await get(http, f"{directory.url}/{did}/log/last")
        assert last["services"]["atproto_pds"]["endpoint"] == PDS

        faults.private_address_dids = True
        faults.private_address_endpoint = "http://10.0.0.1"
        _, doc, _ = await get(http, f"{directory.url}/{other}")
        assert parse_did_document(doc).pds_endpoint == "http://10.0.0.1"
        faults.private_address_dids = False
        _, doc, _ = await get(http, f"{directory.url}/{other}")
        assert parse_did_document(doc).pds_endpoint == PDS


async def test_http_faults_are_opt_in(http: aiohttp.ClientSession) -> None:
    faults = Faults(http_500_every=2)
    async with PlcDirectory(faults=faults) as plain, PlcDirectory(faults=faults, http_faults=True) as faulty:
        did = plain.register(genesis(PrivateKey.generate("k256")))
        assert [(await get(http, f"{plain.url}/{did}"))[0] for _ in range(4)] == [200] * 4
        did = faulty.register(genesis(PrivateKey.generate("k256")))
        statuses = [(await get(http, f"{faulty.url}/{did}"))[0] for _ in range(4)]
        assert statuses == [200, 500, 200, 500]


async def test_in_process_register_and_export(directory: PlcDirectory, http: aiohttp.ClientSession) -> None:
    key = PrivateKey.generate("k256")
    op = genesis(key)
    did = directory.register(op)
    assert did == plc.did_for_genesis(op)
    assert parse_did_document(directory.document(did), expected_did=did).handle == "eve.test"
    with pytest.raises(plc.GenesisHashMismatch):
        directory.submit("did:plc:" + "c" * 24, genesis(key))
    second = await new_account(directory)
    assert directory.dids() == [did, second[0]]

    async with http.get(f"{directory.url}/export", params={"after": "0"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/jsonlines"
        rows = [orjson.loads(line) for line in (await resp.read()).split(b"\n")]
    assert [r["seq"] for r in rows] == [1, 2]
    assert rows[0]["type"] == "sequenced_op" and rows[0]["did"] == did and rows[0]["operation"] == op
    async with http.get(f"{directory.url}/export", params={"after": "1", "count": "5"}) as resp:
        assert [orjson.loads(line)["did"] for line in (await resp.read()).split(b"\n")] == [second[0]]
    async with http.get(f"{directory.url}/export") as resp:
        legacy = [orjson.loads(line) for line in (await resp.read()).split(b"\n")]
    assert [r["nullified"] for r in legacy] == [False, False] and "seq" not in legacy[0]
    async with http.get(f"{directory.url}/export", params={"count": "0"}) as resp:
        assert resp.status == 400
    status, health, _ = await get(http, f"{directory.url}/_health")
    assert status == 200 and "version" in health


async def test_concurrent_creates_and_independent_directories(http: aiohttp.ClientSession) -> None:
    async with PlcDirectory() as one, PlcDirectory() as two:
        assert one.url != two.url
        dids = await asyncio.gather(*(new_account(one, handle=f"u{i}.test") for i in range(20)))
        assert len({d for d, _, _ in dids}) == 20
        assert sorted(one.dids()) == sorted(d for d, _, _ in dids)
        assert two.dids() == []
        status, _, _ = await get(http, f"{two.url}/{dids[0][0]}")
        assert status == 404


async def test_racing_updates_keep_one_history(directory: PlcDirectory, client: PlcClient) -> None:
    did, _, rotation = await new_account(directory)
    last = await client.last_op(did)
    ops = [plc.sign_op(plc.update_op(last, handle=f"r{i}.test"), rotation) for i in range(10)]
    results = await asyncio.gather(*(client.submit(did, op) for op in ops), return_exceptions=True)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, PlcClientError) and r.status == 400 for r in results if r is not None)
    assert plc.validate_op_log(did, await client.op_log(did)) is not None


async def test_start_stop_lifecycle() -> None:
    directory = PlcDirectory()
    with pytest.raises(RuntimeError):
        _ = directory.url
    await directory.start()
    try:
        with pytest.raises(RuntimeError):
            await directory.start()
        url = directory.url
        assert url.startswith("http://127.0.0.1:")
    finally:
        await directory.stop()
    await directory.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(http, f"{url}/_health")
