"""Devnet PDS: accounts with real signed repositories, a firehose and the sync XRPC endpoints.

Each :class:`Pds` is one aiohttp server. Accounts get their own signing and rotation keys;
their DIDs are registered at the devnet PLC directory over HTTP. Repositories are
:class:`psky.atproto.repo.RepoWriter` instances, so every commit is a real v3 commit whose
``#commit`` frame carries the sync 1.1 fields (``prevData`` and the inversion proof blocks).

What is sequenced mirrors the reference PDS (bluesky-social/atproto ``packages/pds``):

* account creation: ``#identity`` (with handle), ``#account`` (active), the ``#commit`` of
  the empty initial repo, and ``#sync`` — in that order; initial records then follow as
  ordinary ``#commit`` events (at most 200 writes per commit, like ``applyWrites``);
* writes: one ``#commit`` per :meth:`Pds.apply_writes` batch;
* handle change: a PLC operation, then ``#identity`` with the new handle;
* deactivation / takedown / suspension: ``#account`` with the resulting status (takedown
  wins over suspension, which wins over deactivation); reactivation of a deactivated account:
  ``#account`` (active), ``#identity``, ``#sync``; lifting a takedown: ``#account`` only;
* deletion: ``#account`` (deleted) and every earlier event of the DID is dropped from the
  log, as the reference sequencer does; the repo and blobs are gone (``RepoNotFound``).

Sync endpoints answer like the reference: errors are HTTP 400 with the lexicon error names
(``RepoNotFound``, ``RepoTakendown``, ``RepoSuspended``, ``RepoDeactivated``,
``InvalidRequest``; for a missing blob the reference says ``InvalidRequest`` where the
lexicon declares ``BlobNotFound``, which is used here). ``getRepo`` lists blocks newest
revision first (the reference's storage order; ``car_order="stream"`` gives the spec's
streamable pre-order instead), and with ``since`` only the blocks written after that rev
that are still part of the repo. ``sync.getRecord`` returns the commit and the MST path to
the key, plus the record when it exists (a proof of absence otherwise, as the reference
does). ``listRepos`` pages by (creation time, DID) with the reference's ``<ms>::<did>`` cursor.

Handles need no DNS: ``GET /.well-known/atproto-did`` answers for the handle in the ``Host``
header. Handles are ``<name>.<hostname>``; psky's resolver routes them with the host map
``PSKY_HANDLE_RESOLVER_MAP="*.<hostname>=<url>"`` (:meth:`Pds.handle_resolver_entry`).

Faults (the shared :class:`~psky.devnet.faults.Faults`, consulted per frame and request):
stream knobs via :class:`~psky.devnet.sequencer.Sequencer`; ``bad_signature`` and
``broken_proof`` alter the sequenced ``#commit`` (the stored repo stays valid); HTTP 429/500
and slow responses via the shared middleware; ``car_truncate``, ``car_corrupt``,
``car_oversized_bytes`` and ``car_stream_pad_bytes`` alter the CARs ``getRepo`` serves;
``only_hosts`` confines HTTP and CAR faults to some PDSes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from psky.atproto import cbor
from psky.atproto.car import iter_car_bytes, read_car, write_car
from psky.atproto.cbor import CID
from psky.atproto.commit import sign_commit
from psky.atproto.crypto import PrivateKey
from psky.atproto.firehose import (
    account_body,
    commit_event,
    encode_event,
    encode_frame,
    identity_body,
    sync_body,
)
from psky.atproto.mst import MST
from psky.atproto.repo import CommitResult, RepoError, RepoWriter
from psky.atproto.syntax import is_valid_did, is_valid_handle
from psky.devnet.faults import Faults, http_fault_middleware
from psky.devnet.plc import PlcClient
from psky.devnet.sequencer import Sequencer
from psky.devnet.xrpc import (
    invalid_request,
    json_response,
    method_not_implemented,
    param_did,
    param_int,
    param_nsid,
    param_rkey,
    param_str,
    param_tid,
    xrpc_middleware,
)
from psky.httpserver import start_app

__all__ = ["ACCOUNT_STATUSES", "MAX_WRITES", "Account", "Pds", "PdsError", "Write"]

log = logging.getLogger("psky.devnet.pds")

#: most writes one commit may carry (the reference ``applyWrites`` limit)
MAX_WRITES = 200
#: statuses :meth:`Pds.set_status` accepts for an inactive account
ACCOUNT_STATUSES = ("deactivated", "takendown", "suspended", "deleted")

#: one write: (action, collection, rkey, record or None for deletes)
Write = tuple[str, str, str, Mapping[str, Any] | None]


class PdsError(ValueError):
    """A request the PDS refuses (unknown account, handle taken, bad write, ...)."""


# --- repositories -------------------------------------------------------------------------


class _Repo(RepoWriter):
    """A RepoWriter that remembers the rev at which each live block was written.

    That is what ``getRepo?since`` needs: the reference PDS stores each block with the rev of
    the commit that introduced it and deletes blocks a commit drops, so a diff "since rev X"
    is every live block with a newer rev. Leaves are tracked through the ops' CIDs. For MST
    nodes the commit's tree reports the nodes it dropped, and the new ones are the nodes of
    the commit's CAR slice that the store did not hold yet — so a commit costs in proportion
    to its size, not to the repo's.
    """

    def __init__(self, did: str, key: PrivateKey) -> None:
        self._last_tree: MST | None = None
        super().__init__(did, key)
        self.node_rev: dict[CID, str] = dict.fromkeys(self._nodes, self.rev)
        self.leaf_rev: dict[CID, str] = dict.fromkeys(self._leaves, self.rev)

    def _tree(self) -> MST:
        tree = super()._tree()
        self._last_tree = tree
        return tree

    def commit(self, writes: Iterable[Write]) -> CommitResult:
        self._last_tree = None
        res = self.apply_writes(writes)
        tree, self._last_tree = self._last_tree, None
        rev = res.rev
        nodes, node_rev = self._nodes, self.node_rev
        if tree is not None:
            for c in tree.removed_cids():
                node_rev.pop(c, None)
            for c in read_car(res.blocks, verify=False).blocks:
                if c not in node_rev and c in nodes:
                    node_rev[c] = rev
        else:  # RepoWriter no longer builds commits through _tree(): compare whole stores
            for c in [c for c in node_rev if c not in nodes]:
                del node_rev[c]
            for c in nodes:
                if c not in node_rev:
                    node_rev[c] = rev
        leaves, leaf_rev = self._leaves, self.leaf_rev
        for op in res.ops:
            if op.prev is not None and op.prev not in leaves:
                leaf_rev.pop(op.prev, None)
        for op in res.ops:
            if op.cid is not None and op.cid not in leaf_rev:
                leaf_rev[op.cid] = rev
        return res

    def blocks_by_rev(self, since: str | None = None) -> list[tuple[CID, bytes]]:
        """Live blocks written after ``since`` (all when None), newest rev first, then by CID
        string descending — the reference's ``repo_block`` order."""
        rows: list[tuple[str, str, CID, bytes]] = []
        if since is None or self.rev > since:
            rows.append((self.rev, self.commit_cid.encode(), self.commit_cid, self.commit_block))
        for c, r in self.node_rev.items():
            if since is None or r > since:
                rows.append((r, c.encode(), c, self._nodes[c]))
        for c, r in self.leaf_rev.items():
            if since is None or r > since:
                rows.append((r, c.encode(), c, self._leaves[c]))
        rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
        return [(c, b) for _, _, c, b in rows]

    def path_blocks(self, path: str) -> list[tuple[CID, bytes]]:
        """The MST nodes from the root to ``path`` and the record block when it exists
        (the reference ``cidsForPath``): a proof of the record's value or of its absence."""
        target = path.encode()
        out: list[tuple[CID, bytes]] = []
        cid: CID | None = self.data
        while cid is not None:
            block = self._nodes[cid]
            out.append((cid, block))
            node = cbor.decode(block)
            key = b""
            nxt: CID | None = node.get("l")
            for entry in node["e"]:
                key = key[: entry["p"]] + entry["k"]
                if key == target:
                    leaf = entry["v"]
                    out.append((leaf, self._leaves[leaf]))
                    return out
                if key > target:
                    break
                nxt = entry.get("t")
            cid = nxt
        return out

    def leaf(self, cid: CID) -> bytes | None:
        return self._leaves.get(cid)


# --- accounts -------------------------------------------------------------------------------


@dataclass(eq=False)
class Account:
    """One account hosted by a :class:`Pds`. ``repo`` is None once the account is deleted."""

    did: str
    handle: str
    signing_key: PrivateKey
    rotation_key: PrivateKey
    created_at: str
    created_ms: int
    repo: _Repo | None
    deactivated: bool = False
    takendown: bool = False
    suspended: bool = False
    deleted: bool = False
    blobs: dict[str, tuple[bytes, str, str]] = field(default_factory=dict, repr=False)

    @property
    def active(self) -> bool:
        return not (self.deleted or self.takendown or self.suspended or self.deactivated)

    @property
    def status(self) -> str | None:
        """None when active, else the reason (takedown > suspension > deactivation)."""
        if self.deleted:
            return "deleted"
        if self.takendown:
            return "takendown"
        if self.suspended:
            return "suspended"
        if self.deactivated:
            return "deactivated"
        return None

    @property
    def head(self) -> CID:
        return self._repo().commit_cid

    @property
    def rev(self) -> str:
        return self._repo().rev

    @property
    def signing_did_key(self) -> str:
        return self.signing_key.did_key()

    def _repo(self) -> _Repo:
        if self.repo is None:
            raise PdsError(f"account {self.did} is deleted")
        return self.repo

    def get_record(self, collection: str, rkey: str) -> tuple[CID, dict[str, Any]] | None:
        """(CID, lex-JSON value) of a record, or None."""
        return self._repo().get_record(collection, rkey)

    def records(self) -> Iterator[tuple[str, CID, dict[str, Any]]]:
        """Every (path, CID, value) in key order."""
        repo = self._repo()
        for path, cid in repo.entries():
            block = repo.leaf(cid)
            assert block is not None
            yield path, cid, cbor.decode_lex(block)


def _now() -> tuple[str, int]:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", int(now.timestamp() * 1000)


# --- the server -----------------------------------------------------------------------------


class Pds:
    """A devnet PDS (see the module docstring).

    ``retain`` bounds the firehose backlog (None = every event), ``max_buffer`` is how far a
    live subscriber may lag before ``ConsumerTooSlow``; ``car_order`` picks the block order of
    full ``getRepo`` exports (``"rev"`` = reference PDS, ``"stream"`` = spec pre-order).
    """

    def __init__(
        self,
        plc_url: str,
        *,
        hostname: str = "pds.test",
        faults: Faults | None = None,
        retain: int | None = None,
        max_buffer: int = 10_000,
        car_order: Literal["rev", "stream"] = "rev",
    ) -> None:
        hostname = hostname.lower()
        if not is_valid_handle(f"x.{hostname}"):
            raise ValueError(f"PDS hostname {hostname!r} cannot carry handles")
        if car_order not in ("rev", "stream"):
            raise ValueError("car_order must be 'rev' or 'stream'")
        self.plc_url = plc_url.rstrip("/")
        self.hostname = hostname
        self.faults = faults if faults is not None else Faults()
        self.car_order = car_order
        self.sequencer = Sequencer(retain=retain, max_buffer=max_buffer, logger=log)
        self._accounts: dict[str, Account] = {}
        self._by_handle: dict[str, str] = {}
        self._reserved: set[str] = set()
        self._listing: list[Account] | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._plc: PlcClient | None = None
        self._url: str | None = None
        self._fault_key = f"pds:{hostname}:{id(self):x}"
        self._wrong_keys: dict[str, PrivateKey] = {}

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); valid after :meth:`start`."""
        if self._url is None:
            raise RuntimeError("Pds is not started")
        return self._url

    @property
    def seq(self) -> int:
        """Last sequenced event."""
        return self.sequencer.seq

    def handle_resolver_entry(self) -> str:
        """This PDS's entry for ``PSKY_HANDLE_RESOLVER_MAP`` (``*.<hostname>=<url>``)."""
        return f"*.{self.hostname}={self.url}"

    def make_app(self) -> web.Application:
        middlewares: list[Middleware] = [
            xrpc_middleware(log),
            http_fault_middleware(self.faults, self._fault_key, self.hostname),
        ]
        app = web.Application(middlewares=middlewares)
        r = app.router
        r.add_get("/.well-known/atproto-did", self._well_known)
        r.add_get("/xrpc/_health", self._health)
        r.add_get("/xrpc/com.atproto.sync.subscribeRepos", self._subscribe_repos)
        r.add_get("/xrpc/com.atproto.sync.listRepos", self._list_repos)
        r.add_get("/xrpc/com.atproto.sync.getRepo", self._get_repo)
        r.add_get("/xrpc/com.atproto.sync.getRecord", self._sync_get_record)
        r.add_get("/xrpc/com.atproto.sync.getLatestCommit", self._get_latest_commit)
        r.add_get("/xrpc/com.atproto.sync.getRepoStatus", self._get_repo_status)
        r.add_get("/xrpc/com.atproto.sync.getBlob", self._get_blob)
        r.add_get("/xrpc/com.atproto.sync.listBlobs", self._list_blobs)
        r.add_get("/xrpc/com.atproto.repo.getRecord", self._repo_get_record)
        r.add_get("/xrpc/com.atproto.repo.listRecords", self._repo_list_records)
        r.add_get("/xrpc/com.atproto.repo.describeRepo", self._describe_repo)
        r.add_get("/xrpc/com.atproto.server.describeServer", self._describe_server)
        r.add_route("*", "/xrpc/{method}", method_not_implemented)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Self:
        """Listen on ``host:port`` (0 = a free port)."""
        if self._runner is not None:
            raise RuntimeError("Pds already started")
        self._runner, self._url = await start_app(self.make_app(), host, port, shutdown_timeout=5.0)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._plc = PlcClient(self.plc_url, self._session)
        log.info("PDS %s listening on %s", self.hostname, self._url)
        return self

    async def stop(self) -> None:
        await self.sequencer.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
            self._plc = None
        log.info("PDS %s stopped", self.hostname)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _plc_client(self) -> PlcClient:
        if self._plc is None:
            raise RuntimeError("Pds is not started (accounts need the PLC client and the PDS URL)")
        return self._plc

    # --- accounts ---------------------------------------------------------------------------

    def account(self, did: str) -> Account:
        """The account (raises :class:`PdsError` for an unknown or deleted DID)."""
        acct = self._accounts.get(did)
        if acct is None:
            raise PdsError(f"no account {did} on {self.hostname}")
        return acct

    def accounts(self) -> list[Account]:
        """Every hosted (not deleted) account, in creation order."""
        return list(self._accounts.values())

    def did_for_handle(self, handle: str) -> str | None:
        return self._by_handle.get(handle.lower())

    def normalize_handle(self, handle: str) -> str:
        """A bare name gets ``.<hostname>`` appended; the result must be a valid handle."""
        handle = handle.strip().lower()
        if "." not in handle:
            handle = f"{handle}.{self.hostname}"
        if not is_valid_handle(handle):
            raise PdsError(f"invalid handle {handle!r:.100}")
        return handle

    def _claim_handle(self, handle: str, did: str | None = None) -> None:
        owner = self._by_handle.get(handle)
        if (owner is not None and owner != did) or handle in self._reserved:
            raise PdsError(f"Handle already taken: {handle}")

    async def create_account(
        self,
        handle: str,
        *,
        key_curve: Literal["k256", "p256"] = "k256",
        records: Mapping[str, Mapping[str, Any]] | None = None,
        signing_key: PrivateKey | None = None,
        rotation_key: PrivateKey | None = None,
    ) -> Account:
        """Create an account: register its DID at the PLC, create the empty repo, sequence
        ``#identity``, ``#account``, ``#commit``, ``#sync``, then write ``records``
        (``{"collection/rkey": record}``) in commits of at most :data:`MAX_WRITES`.

        Keys default to fresh ones on ``key_curve``; pass them for reproducible DIDs.
        """
        plc = self._plc_client()
        handle = self.normalize_handle(handle)
        self._claim_handle(handle)
        writes: list[Write] = []
        for path, record in (records or {}).items():
            collection, sep, rkey = path.partition("/")
            if not sep:
                raise PdsError(f"record path {path!r:.100} is not <collection>/<rkey>")
            writes.append(("create", collection, rkey, record))
        skey = signing_key or PrivateKey.generate(key_curve)
        rkey_ = rotation_key or PrivateKey.generate(key_curve)
        self._reserved.add(handle)
        try:
            did = await plc.create_did(
                signing_key=skey, rotation_key=rkey_, handle=handle, pds_endpoint=self.url
            )
        finally:
            self._reserved.discard(handle)
        if did in self._accounts:
            raise PdsError(f"{did} already has an account here")
        self._claim_handle(handle)
        created_at, created_ms = _now()
        repo = _Repo(did, skey)
        acct = Account(did, handle, skey, rkey_, created_at, created_ms, repo)
        self._accounts[did] = acct
        self._by_handle[handle] = did
        self._listing = None
        self._sequence_identity(did, handle)
        self._sequence_account(acct)
        self._sequence_commit(acct, repo.initial)
        self._sequence_sync(acct)
        for i in range(0, len(writes), MAX_WRITES):
            await self.apply_writes(did, writes[i : i + MAX_WRITES])
        return acct

    async def apply_writes(self, did: str, writes: Sequence[Write]) -> CommitResult:
        """Apply ``(action, collection, rkey, record | None)`` writes as one commit and
        sequence its ``#commit``. The account must be active; at most :data:`MAX_WRITES`."""
        acct = self.account(did)
        if not acct.active:
            raise PdsError(f"account {did} is not active ({acct.status})")
        if len(writes) > MAX_WRITES:
            raise PdsError(f"too many writes in one commit ({len(writes)} > {MAX_WRITES})")
        if not writes:
            raise PdsError("a commit needs at least one write")
        try:
            res = acct._repo().commit(writes)
        except RepoError as e:
            raise PdsError(str(e)) from None
        self._sequence_commit(acct, res)
        return res

    async def update_handle(self, did: str, handle: str) -> None:
        """Change the handle: PLC operation (signed by the rotation key), then ``#identity``."""
        acct = self.account(did)
        handle = self.normalize_handle(handle)
        self._claim_handle(handle, did)
        self._reserved.add(handle)
        try:
            await self._plc_client().update(did, acct.rotation_key, handle=handle)
        finally:
            self._reserved.discard(handle)
        self._claim_handle(handle, did)
        if self._by_handle.get(acct.handle) == did:
            del self._by_handle[acct.handle]
        acct.handle = handle
        self._by_handle[handle] = did
        self._sequence_identity(did, handle)

    async def set_status(self, did: str, active: bool, status: str | None = None) -> None:
        """Change an account's hosting status and sequence what the reference PDS sequences.

        ``active=True`` (status None) lifts deactivation, takedown and suspension; an inactive
        ``status`` is one of :data:`ACCOUNT_STATUSES` (``deleted`` removes the account).
        """
        acct = self.account(did)
        if active:
            if status is not None:
                raise PdsError("an active account has no status")
            was_deactivated = acct.deactivated
            acct.deactivated = acct.takendown = acct.suspended = False
            self._sequence_account(acct)
            if was_deactivated:
                self._sequence_identity(did, acct.handle)
                self._sequence_sync(acct)
            return
        if status not in ACCOUNT_STATUSES:
            raise PdsError(f"unknown account status {status!r:.40} (one of {', '.join(ACCOUNT_STATUSES)})")
        if status == "deleted":
            acct.deleted = True
            seq = self._sequence_account(acct)
            self.sequencer.purge(did, keep=seq)
            acct.repo = None
            acct.blobs.clear()
            del self._accounts[did]
            if self._by_handle.get(acct.handle) == did:
                del self._by_handle[acct.handle]
            self._listing = None
            return
        if status == "deactivated":
            acct.deactivated = True
        elif status == "takendown":
            acct.takendown = True
        else:
            acct.suspended = True
        self._sequence_account(acct)

    def emit_sync(self, did: str) -> int:
        """Sequence a ``#sync`` for the account's current commit; returns its seq."""
        return self._sequence_sync(self.account(did))

    def emit_identity(self, did: str) -> int:
        """Sequence an ``#identity`` (with the current handle); returns its seq."""
        acct = self.account(did)
        return self._sequence_identity(did, acct.handle)

    def put_blob(self, did: str, data: bytes, mime: str = "application/octet-stream") -> dict[str, Any]:
        """Store a blob for the account; returns the blob ref to embed in records (lex JSON)."""
        acct = self.account(did)
        cid = cbor.cid_for_raw(bytes(data))
        key = cid.encode()
        acct.blobs[key] = (bytes(data), mime, acct.rev)
        return {"$type": "blob", "ref": {"$link": key}, "mimeType": mime, "size": len(data)}

    # --- sequencing -------------------------------------------------------------------------

    def _sequence_identity(self, did: str, handle: str | None) -> int:
        return self.sequencer.append(
            lambda seq, t: encode_frame("#identity", identity_body(seq=seq, did=did, time=t, handle=handle)),
            did=did,
        )

    def _sequence_account(self, acct: Account) -> int:
        active, status, did = acct.active, acct.status, acct.did
        return self.sequencer.append(
            lambda seq, t: encode_frame(
                "#account", account_body(seq=seq, did=did, time=t, active=active, status=status)
            ),
            did=did,
        )

    def _sequence_sync(self, acct: Account) -> int:
        repo = acct._repo()
        did, blocks, rev = acct.did, repo.commit_car(), repo.rev
        return self.sequencer.append(
            lambda seq, t: encode_frame("#sync", sync_body(seq=seq, did=did, blocks=blocks, rev=rev, time=t)),
            did=did,
        )

    def _sequence_commit(self, acct: Account, res: CommitResult) -> int:
        faults = self.faults
        forge = faults.chance("bad_signature")
        broken = faults.chance("broken_proof")
        if not forge and not broken:
            return self.sequencer.append(lambda seq, t: res.to_frame(seq=seq, time=t), did=acct.did)
        ev = commit_event(res, seq=0, time="")
        if forge:
            wrong = self._wrong_key(acct)
            cid, block = sign_commit(res.did, res.data, res.rev, wrong)
            car = read_car(res.blocks, verify=False)
            others = [(c, b) for c, b in car.blocks.items() if c != res.commit_cid]
            ev = replace(ev, commit=cid, blocks=write_car([cid], [(cid, block), *others]))
            log.info("fault: commit %s of %s signed with a wrong key", res.rev, res.did)
        if broken:
            ev = replace(ev, prev_data=cbor.cid_for_cbor(cbor.encode({"broken-proof": res.rev})))
            log.info("fault: commit %s of %s carries a wrong prevData", res.rev, res.did)
        final = ev
        return self.sequencer.append(
            lambda seq, t: encode_event(replace(final, seq=seq, time=t)), did=acct.did
        )

    def _wrong_key(self, acct: Account) -> PrivateKey:
        curve = acct.signing_key.curve
        key = self._wrong_keys.get(curve)
        if key is None:
            key = self._wrong_keys[curve] = PrivateKey.generate(curve)
        return key

    # --- XRPC helpers -----------------------------------------------------------------------

    def _available(self, did: str) -> Account:
        """The account behind a sync request, or the reference's availability error."""
        acct = self._accounts.get(did)
        if acct is None or acct.repo is None:
            raise invalid_request(f"Could not find repo for DID: {did}", "RepoNotFound")
        if acct.takendown:
            raise invalid_request(f"Repo has been takendown: {did}", "RepoTakendown")
        if acct.suspended:
            raise invalid_request(f"Repo has been suspended: {did}", "RepoSuspended")
        if acct.deactivated:
            raise invalid_request(f"Repo has been deactivated: {did}", "RepoDeactivated")
        return acct

    def _resolve_repo_param(self, request: web.Request) -> Account:
        """``repo`` (DID or handle) of the com.atproto.repo.* queries."""
        ident = param_str(request, "repo")
        assert ident is not None
        did = ident if ident.startswith("did:") else self._by_handle.get(ident.lower())
        if did is None or not is_valid_did(did):
            raise invalid_request(f"Could not find repo: {ident}")
        acct = self._accounts.get(did)
        if acct is None or acct.repo is None:
            raise invalid_request(f"Could not find repo: {ident}")
        return acct

    def _car_faults(self, car: bytes) -> bytes:
        f = self.faults
        if not f.applies_to(self.hostname):
            return car
        if f.car_oversized_bytes > 0:
            pad = bytes(f.car_oversized_bytes)
            _, section = iter_car_bytes([], [(cbor.cid_for_raw(pad), pad)])
            car = car + section
        if f.car_corrupt and len(car) > 0:
            # the last byte of a CAR is the last byte of its last block: flipping it keeps
            # the framing intact and breaks that block's hash
            car = car[:-1] + bytes([car[-1] ^ 0xFF])
        if f.car_truncate and len(car) > 1:
            car = car[: len(car) // 2]
        return car

    # --- XRPC handlers ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return json_response({"version": "psky-devnet"})

    async def _describe_server(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "did": f"did:web:{self.hostname}",
                "availableUserDomains": [f".{self.hostname}"],
                "inviteCodeRequired": False,
                "links": {},
                "contact": {},
            }
        )

    async def _well_known(self, request: web.Request) -> web.Response:
        host = (request.host or "").lower()
        if host.startswith("["):
            host = ""
        host = host.rsplit(":", 1)[0] if ":" in host else host
        did = self._by_handle.get(host)
        acct = self._accounts.get(did) if did is not None else None
        if acct is None or not acct.active:
            return web.Response(status=404, text="User not found", content_type="text/plain")
        return web.Response(text=acct.did, content_type="text/plain")

    async def _subscribe_repos(self, request: web.Request) -> web.StreamResponse:
        return await self.sequencer.serve(request, faults=self.faults, fault_key=self._fault_key)

    def _sorted_accounts(self) -> list[Account]:
        if self._listing is None:
            self._listing = sorted(self._accounts.values(), key=lambda a: (a.created_ms, a.did))
        return self._listing

    async def _list_repos(self, request: web.Request) -> web.Response:
        limit = param_int(request, "limit", default=500, minimum=1, maximum=1000)
        assert limit is not None
        cursor = param_str(request, "cursor", required=False)
        after: tuple[int, str] | None = None
        if cursor is not None:
            ms, sep, cdid = cursor.partition("::")
            try:
                after = (int(ms, 10), cdid)
            except ValueError:
                raise invalid_request("Malformed cursor") from None
            if not sep:
                raise invalid_request("Malformed cursor")
        listing = self._sorted_accounts()
        page: list[Account] = []
        for acct in listing:
            if after is not None and (acct.created_ms, acct.did) <= after:
                continue
            page.append(acct)
            if len(page) >= limit:
                break
        repos = []
        for acct in page:
            item: dict[str, Any] = {
                "did": acct.did,
                "head": acct.head.encode(),
                "rev": acct.rev,
                "active": acct.active,
            }
            if acct.status is not None:
                item["status"] = acct.status
            repos.append(item)
        body: dict[str, Any] = {"repos": repos}
        if page:
            body["cursor"] = f"{page[-1].created_ms}::{page[-1].did}"
        return json_response(body)

    async def _get_repo(self, request: web.Request) -> web.StreamResponse:
        did = param_did(request)
        since = param_tid(request, "since")
        repo = self._available(did)._repo()
        if since is None and self.car_order == "stream":
            car = repo.export_car()
        else:
            car = write_car([repo.commit_cid], repo.blocks_by_rev(since))
        car = self._car_faults(car)
        pad = self.faults.car_stream_pad_bytes
        if pad > 0 and self.faults.applies_to(self.hostname):
            return await self._stream_padded_car(request, car, pad)
        return web.Response(body=car, content_type="application/vnd.ipld.car")

    async def _stream_padded_car(self, request: web.Request, car: bytes, pad: int) -> web.StreamResponse:
        """``car_stream_pad_bytes``: the CAR chunked (no Content-Length), then distinct 16 KiB
        raw blocks made one at a time, so the server never holds the padding."""
        resp = web.StreamResponse(headers={"content-type": "application/vnd.ipld.car"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(car)
            sent, n = 0, 0
            while sent < pad:
                block = n.to_bytes(8, "big") + bytes(16 * 1024 - 8)
                _, section = iter_car_bytes([], [(cbor.cid_for_raw(block), block)])
                await resp.write(section)
                sent += len(section)
                n += 1
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client hung up (a backfiller refusing the size does)
        return resp

    async def _sync_get_record(self, request: web.Request) -> web.Response:
        did = param_did(request)
        collection = param_nsid(request, "collection")
        rkey = param_rkey(request)
        repo = self._available(did)._repo()
        blocks = [(repo.commit_cid, repo.commit_block), *repo.path_blocks(f"{collection}/{rkey}")]
        return web.Response(
            body=write_car([repo.commit_cid], blocks), content_type="application/vnd.ipld.car"
        )

    async def _get_latest_commit(self, request: web.Request) -> web.Response:
        acct = self._available(param_did(request))
        return json_response({"cid": acct.head.encode(), "rev": acct.rev})

    async def _get_repo_status(self, request: web.Request) -> web.Response:
        did = param_did(request)
        acct = self._accounts.get(did)
        if acct is None or acct.repo is None:
            raise invalid_request(f"Could not find repo for DID: {did}", "RepoNotFound")
        body: dict[str, Any] = {"did": did, "active": acct.active}
        if acct.status is not None:
            body["status"] = acct.status
        if acct.active:
            body["rev"] = acct.rev
        return json_response(body)

    async def _get_blob(self, request: web.Request) -> web.Response:
        did = param_did(request)
        raw_cid = param_str(request, "cid")
        assert raw_cid is not None
        try:
            key = cbor.parse_cid(raw_cid).encode()
        except ValueError:
            raise invalid_request("cid must be a valid cid") from None
        acct = self._available(did)
        blob = acct.blobs.get(key)
        if blob is None:
            raise invalid_request("Blob not found", "BlobNotFound")
        data, mime, _ = blob
        return web.Response(
            body=data,
            content_type=mime,
            headers={
                "x-content-type-options": "nosniff",
                "content-disposition": f'attachment; filename="{key}"',
                "content-security-policy": "default-src 'none'; sandbox",
            },
        )

    async def _list_blobs(self, request: web.Request) -> web.Response:
        did = param_did(request)
        since = param_tid(request, "since")
        limit = param_int(request, "limit", default=500, minimum=1, maximum=1000)
        assert limit is not None
        cursor = param_str(request, "cursor", required=False)
        acct = self._available(did)
        cids = sorted(k for k, (_, _, rev) in acct.blobs.items() if since is None or rev > since)
        if cursor is not None:
            cids = [c for c in cids if c > cursor]
        page = cids[:limit]
        body: dict[str, Any] = {"cids": page}
        if page:
            body["cursor"] = page[-1]
        return json_response(body)

    async def _repo_get_record(self, request: web.Request) -> web.Response:
        acct = self._resolve_repo_param(request)
        collection = param_nsid(request, "collection")
        rkey = param_rkey(request)
        want = param_str(request, "cid", required=False)
        uri = f"at://{acct.did}/{collection}/{rkey}"
        found = acct.get_record(collection, rkey)
        if found is None or (want is not None and found[0].encode() != want):
            raise invalid_request(f"Could not locate record: {uri}", "RecordNotFound")
        return json_response({"uri": uri, "cid": found[0].encode(), "value": found[1]})

    async def _repo_list_records(self, request: web.Request) -> web.Response:
        acct = self._resolve_repo_param(request)
        collection = param_nsid(request, "collection")
        limit = param_int(request, "limit", default=50, minimum=1, maximum=100)
        assert limit is not None
        cursor = param_str(request, "cursor", required=False)
        reverse = request.query.get("reverse", "false").lower() == "true"
        repo = acct._repo()
        prefix = collection + "/"
        keys = [(path[len(prefix) :], cid) for path, cid in repo.entries() if path.startswith(prefix)]
        if not reverse:
            keys.reverse()  # newest (highest rkey) first, like the reference
        if cursor is not None:
            keys = [kc for kc in keys if (kc[0] > cursor if reverse else kc[0] < cursor)]
        page = keys[:limit]
        records = []
        for rkey, cid in page:
            block = repo.leaf(cid)
            assert block is not None
            records.append(
                {
                    "uri": f"at://{acct.did}/{collection}/{rkey}",
                    "cid": cid.encode(),
                    "value": cbor.decode_lex(block),
                }
            )
        body: dict[str, Any] = {"records": records}
        if len(page) == limit and page:
            body["cursor"] = page[-1][0]
        return json_response(body)

    async def _describe_repo(self, request: web.Request) -> web.Response:
        acct = self._resolve_repo_param(request)
        doc = await self._plc_client().document(acct.did)
        collections = sorted({path.partition("/")[0] for path, _ in acct._repo().entries()})
        return json_response(
            {
                "handle": acct.handle,
                "did": acct.did,
                "didDoc": doc,
                "collections": collections,
                "handleIsCorrect": True,
            }
        )
