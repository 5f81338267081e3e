"""`psky inspect` end to end: the real command in a subprocess, a real PLC server on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import encode_frame
from psky.atproto.repo import RepoWriter, build_repo
from psky.inspect import frame_file_bytes

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"

RECORDS: dict[str, dict[str, Any]] = {
    "app.bsky.actor.profile/self": {"$type": "app.bsky.actor.profile", "displayName": "Alice"},
    "app.bsky.feed.post/3jzfcijpj2z2a": {
        "$type": "app.bsky.feed.post", "text": "hello", "createdAt": "2024-01-01T00:00:00.000Z",
    },
    "app.bsky.feed.post/3jzfcijpj2z2b": {
        "$type": "app.bsky.feed.post", "text": "world", "createdAt": "2024-01-01T00:00:01.000Z",
        "langs": ["en"],
    },
    "app.bsky.graph.follow/3jzfcijpj2z2c": {
        "$type": "app.bsky.graph.follow", "subject": "did:plc:bv6ggog3tya2z3vxsub7hnal",
        "createdAt": "2024-01-01T00:00:02.000Z",
    },
}


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "psky.cli", *args], input=stdin.decode() if stdin else None,
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return PrivateKey.generate("k256")


@pytest.fixture(scope="module")
def car_file(tmp_path_factory: pytest.TempPathFactory, key: PrivateKey) -> Path:
    _cid, car = build_repo(DID, key, RECORDS)
    path = tmp_path_factory.mktemp("car") / "repo.car"
    path.write_bytes(car)
    return path


def _did_doc(did: str, key: PrivateKey, *, relative: bool) -> dict[str, Any]:
    vm_id = "#atproto" if relative else f"{did}#atproto"
    return {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": ["at://alice.test"],
        "verificationMethod": [{
            "id": vm_id, "type": "Multikey", "controller": did,
            "publicKeyMultibase": key.public_key().multibase(),
        }],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer",
                     "serviceEndpoint": "http://127.0.0.1:1"}],
    }


@pytest.fixture()
def plc_server(key: PrivateKey) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    """A PLC directory on loopback serving GET /<did>; tests put documents into `docs`."""
    docs: dict[str, dict[str, Any]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            doc = docs.get(self.path.lstrip("/"))
            body = orjson.dumps(doc if doc else {"message": "DID not registered"})
            self.send_response(200 if doc else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", docs
    finally:
        server.shutdown()
        server.server_close()


def test_inspect_car_with_key(car_file: Path, key: PrivateKey) -> None:
    res = run("inspect", "car", str(car_file), "--key", key.public_key().did_key(), "--json")
    assert res.returncode == 0, res.stderr
    out = orjson.loads(res.stdout)
    assert out["did"] == DID
    assert out["signature"] == "valid"
    assert out["mst"] == "ok"
    assert out["records"] == 4
    assert out["collections"] == {"app.bsky.actor.profile": 1, "app.bsky.feed.post": 2, "app.bsky.graph.follow": 1}


def test_inspect_car_text_output(car_file: Path) -> None:
    res = run("inspect", "car", str(car_file))
    assert res.returncode == 0, res.stderr
    assert DID in res.stdout
    assert "not checked" in res.stdout
    assert re.search(r"^  app\.bsky\.feed\.post +2$", res.stdout, re.M)


def test_inspect_car_wrong_key_fails(car_file: Path) -> None:
    other = PrivateKey.generate("p256").public_key().did_key()
    res = run("inspect", "car", str(car_file), "--key", other, "--json")
    assert res.returncode == 1
    assert orjson.loads(res.stdout)["signature"] == "INVALID"


def test_inspect_car_wrong_did_fails(car_file: Path) -> None:
    res = run("inspect", "car", str(car_file), "--did", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("psky: ")


@pytest.mark.parametrize("relative", [True, False], ids=["relative-id", "absolute-id"])
def test_inspect_car_key_from_plc(
    car_file: Path, key: PrivateKey, plc_server: tuple[str, dict[str, dict[str, Any]]], relative: bool
) -> None:
    url, docs = plc_server
    docs[DID] = _did_doc(DID, key, relative=relative)
    res = run("inspect", "car", str(car_file), "--plc", url, "--json")
    assert res.returncode == 0, res.stderr
    out = orjson.loads(res.stdout)
    assert out["signature"] == "valid"
    assert out["key"] == key.public_key().did_key()


def test_inspect_car_plc_unknown_did(car_file: Path, plc_server: tuple[str, dict[str, dict[str, Any]]]) -> None:
    url, _docs = plc_server
    res = run("inspect", "car", str(car_file), "--plc", url)
    assert res.returncode == 1
    assert "not found" in res.stderr and "Traceback" not in res.stderr


def test_inspect_car_records_as_events(car_file: Path) -> None:
    res = run("inspect", "car", str(car_file), "--records")
    assert res.returncode == 0, res.stderr
    lines = [orjson.loads(line) for line in res.stdout.splitlines()]
    creates = [e for e in lines if e["type"] == "create"]
    assert len(creates) == 4 and lines[-1]["type"] == "repo"
    by_uri = {f"{e['collection']}/{e['rkey']}": e for e in creates}
    assert by_uri.keys() == RECORDS.keys()
    for path, ev in by_uri.items():
        assert ev["record"] == RECORDS[path]
        assert ev["seq"] == -2 and ev["did"] == DID
        assert ev["cid"] == cbor.cid_for_cbor(cbor.encode_lex(RECORDS[path])).encode()


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "car"), (b"not a car at all", "car"), (b"\xa1\x00", "car")],
    ids=["empty", "text", "cbor"],
)
def test_inspect_car_garbage(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "bad.car"
    p.write_bytes(content)
    res = run("inspect", "car", str(p))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert needle in res.stderr.lower()


def test_inspect_car_tampered_block(car_file: Path, tmp_path: Path) -> None:
    data = bytearray(car_file.read_bytes())
    idx = data.find(b"world")
    data[idx] = ord("W")
    p = tmp_path / "tampered.car"
    p.write_bytes(bytes(data))
    res = run("inspect", "car", str(p))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "does not match its cid" in res.stderr.lower()


def test_inspect_missing_file_and_bad_key(tmp_path: Path, car_file: Path) -> None:
    res = run("inspect", "car", str(tmp_path / "nope.car"))
    assert res.returncode == 1 and "cannot read" in res.stderr
    res = run("inspect", "car", str(car_file), "--key", "did:key:zzz")
    assert res.returncode == 2 and "--key" in res.stderr


def _frames(key: PrivateKey) -> list[bytes]:
    writer = RepoWriter(DID, key)
    frames = []
    seq = 0
    for i in range(3):
        result = writer.apply_writes([
            ("create", "app.bsky.feed.post", f"3jzfcijpj2z{i}a",
             {"$type": "app.bsky.feed.post", "text": f"post {i}", "createdAt": "2024-01-01T00:00:00.000Z"}),
        ])
        seq += 1
        frames.append(result.to_frame(seq=seq, time="2024-01-01T00:00:00.000Z"))
    frames.append(encode_frame("#identity", {"seq": seq + 1, "did": DID, "time": "2024-01-01T00:00:00.000Z",
                                             "handle": "alice.test"}))
    frames.append(encode_frame("#chat.unknown", {"seq": seq + 2}))
    return frames


def test_inspect_frames_file(tmp_path: Path, key: PrivateKey) -> None:
    p = tmp_path / "frames.bin"
    p.write_bytes(frame_file_bytes(_frames(key)))
    res = run("inspect", "frames", str(p), "--key", key.public_key().did_key())
    assert res.returncode == 0, res.stderr + res.stdout
    lines = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["commit", "commit", "commit", "identity", "unknown"]
    for line in lines[:3]:
        assert line["signature"] == "valid" and line["proof"] == "valid" and line["problems"] == []
        assert line["events"][0]["type"] == "create"
    # --limit stops early
    res = run("inspect", "frames", str(p), "--limit", "2")
    assert len(res.stdout.splitlines()) == 2


def test_inspect_frames_bad_signature_and_garbage(tmp_path: Path, key: PrivateKey) -> None:
    p = tmp_path / "frames.bin"
    p.write_bytes(frame_file_bytes([*_frames(key)[:1], b"\xa2garbage"]))
    res = run("inspect", "frames", str(p), "--key", PrivateKey.generate("k256").public_key().did_key())
    assert res.returncode == 1
    lines = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert lines[0]["signature"] == "invalid"
    assert lines[1]["type"] == "invalid-frame"


def test_inspect_frames_live_url_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run("inspect", "frames", f"ws://127.0.0.1:{port}", "--limit", "1")
    assert res.returncode == 1
    assert "cannot subscribe" in res.stderr and "Traceback" not in res.stderr


def test_demo_runs() -> None:
    res = run("demo", "--sample")
    assert res.returncode == 0, res.stderr + res.stdout
    assert "signature   valid" in res.stdout


@pytest.fixture()
def relay_server(key: PrivateKey) -> Iterator[tuple[str, list[str]]]:
    """A subscribeRepos websocket server on loopback that sends the test frames."""
    import asyncio

    import websockets

    frames = _frames(key)
    paths: list[str] = []
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        paths.append(ws.request.path)
        for f in frames:
            await ws.send(f)
        await ws.wait_closed()

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = asyncio.Event()
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            state["port"] = server.sockets[0].getsockname()[1]
            ready.set()
            await state["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"ws://127.0.0.1:{state['port']}", paths
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def test_inspect_frames_live(relay_server: tuple[str, list[str]], key: PrivateKey) -> None:
    url, paths = relay_server
    res = run("inspect", "frames", url, "--limit", "4", "--cursor", "7", "--key", key.public_key().did_key())
    assert res.returncode == 0, res.stderr
    lines = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["commit", "commit", "commit", "identity"]
    assert paths == ["/xrpc/com.atproto.sync.subscribeRepos?cursor=7"]


def test_inspect_car_records_skips_unprintable_record(tmp_path: Path, key: PrivateKey) -> None:
    """A record nested deeper than JSON tools accept is reported, not a crash; the rest print."""
    from psky.atproto.car import write_car
    from psky.atproto.commit import sign_commit
    from psky.atproto.mst import MST

    deep: Any = "leaf"
    for _ in range(400):
        deep = [deep]
    good = cbor.encode_lex(RECORDS["app.bsky.feed.post/3jzfcijpj2z2a"])
    bad = cbor.encode({"$type": "app.bsky.feed.post", "text": "x", "nested": deep})
    entries = [("app.bsky.feed.post/3jzfcijpj2z2a", cbor.cid_for_cbor(good)),
               ("app.bsky.feed.post/3jzfcijpj2z2b", cbor.cid_for_cbor(bad))]
    tree = MST.from_entries(entries)
    commit_cid, commit_block = sign_commit(DID, tree.root_cid(), "3jzfcijpj2z2z", key)
    blocks = [(commit_cid, commit_block), *tree.blocks().items(),
              (entries[0][1], good), (entries[1][1], bad)]
    p = tmp_path / "deep.car"
    p.write_bytes(write_car([commit_cid], blocks))
    res = run("inspect", "car", str(p), "--records")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "skipping record app.bsky.feed.post/3jzfcijpj2z2b" in res.stderr
    lines = [orjson.loads(line) for line in res.stdout.splitlines()]
    assert [e["type"] for e in lines] == ["create", "repo"]


def test_inspect_car_from_stdin(car_file: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "psky.cli", "inspect", "car", "-", "--json"],
                         input=car_file.read_bytes(), capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["records"] == 4
