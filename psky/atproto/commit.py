"""Repository commit objects (repository spec, v3; v2 accepted for reading).

A commit is ``{did, version, data, rev, prev, sig}``. The signature covers the DAG-CBOR
encoding of the same map without ``sig``, built the way the reference implementations
build it: the known fields only, ``prev`` always present (``null`` unless set; the spec
requires the field), ``rev`` only when present (v2 commits may lack it).

Decoding keeps what the block actually holds — a missing ``prev`` and unknown extra fields —
so :meth:`Commit.encode` reproduces the block (and its CID) exactly; neither is part of the
signed bytes, so a commit signed without ``prev: null`` fails verification as it does in the
Go and Rust implementations (the TypeScript one refuses to parse it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psky.atproto import cbor
from psky.atproto.cbor import CID
from psky.atproto.crypto import PrivateKey, PublicKey, verifier_for
from psky.atproto.syntax import is_valid_did, is_valid_tid

__all__ = ["Commit", "CommitError", "sign_commit"]

_KNOWN = frozenset(("did", "version", "data", "rev", "prev", "sig"))
_BLESSED_PFX = CID.CIDV1_DAG_CBOR_SHA256_32_PFX
_ABSENT: Any = object()


class CommitError(ValueError):
    """A block that is not a well-formed repository commit."""


def _blessed_link(value: Any, name: str) -> CID:
    if not isinstance(value, CID):
        raise CommitError(f"commit field {name!r} must be a CID link")
    raw = value.cid_bytes
    if len(raw) != 36 or raw[:4] != _BLESSED_PFX:
        raise CommitError(f"commit field {name!r} must be a CIDv1 dag-cbor sha-256 link")
    return value


@dataclass(slots=True)
class Commit:
    """A decoded (or freshly built) signed commit.

    ``rev`` is ``None`` only for v2 commits written before revisions existed; ``extra``
    holds unknown fields exactly as decoded; ``prev_present`` is False for a block that
    omits the ``prev`` field (re-encoding keeps it omitted).
    """

    did: str
    version: int
    data: CID
    rev: str | None
    prev: CID | None
    sig: bytes
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    prev_present: bool = field(default=True, compare=False, repr=False)

    @classmethod
    def decode(cls, block: bytes | memoryview) -> Commit:
        """Strictly decode a commit block (field presence and types, DID and TID syntax)."""
        try:
            obj = cbor.decode(block)
        except cbor.DecodeError as e:
            raise CommitError(f"commit block: {e}") from None
        if not isinstance(obj, dict):
            raise CommitError("commit block is not a map")
        return cls.from_object(obj)

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Commit:
        """Build from an already decoded commit map (IPLD form)."""
        if len(obj) == 6:
            # fast path: the usual v3 shape, checked in one expression
            did = obj.get("did")
            data = obj.get("data")
            prev = obj.get("prev", _ABSENT)
            rev = obj.get("rev")
            sig = obj.get("sig")
            if (
                obj.get("version") == 3
                and type(did) is str
                and type(rev) is str
                and type(sig) is bytes
                and type(data) is CID
                and data.cid_bytes[:4] == _BLESSED_PFX
                and len(data.cid_bytes) == 36
                and (
                    prev is None
                    or (
                        type(prev) is CID and prev.cid_bytes[:4] == _BLESSED_PFX and len(prev.cid_bytes) == 36
                    )
                )
                and type(obj["version"]) is int
                and is_valid_did(did)
                and is_valid_tid(rev)
            ):
                return cls(did, 3, data, rev, prev, sig, {})
        return cls._from_object_checked(obj)

    @classmethod
    def _from_object_checked(cls, obj: dict[str, Any]) -> Commit:
        version = obj.get("version")
        if type(version) is not int or version not in (2, 3):
            raise CommitError(f"unsupported commit version {version!r:.40}")
        did = obj.get("did")
        if not isinstance(did, str) or not is_valid_did(did):
            raise CommitError(f"commit did is not a valid DID: {did!r:.100}")
        data = _blessed_link(obj.get("data"), "data")
        prev_present = "prev" in obj
        prev_raw = obj.get("prev")
        prev = None if prev_raw is None else _blessed_link(prev_raw, "prev")
        rev = obj.get("rev")
        if rev is None and "rev" in obj:
            raise CommitError("commit rev must be a string, not null")
        if rev is None:
            if version == 3:
                raise CommitError("v3 commit has no 'rev'")
        elif not isinstance(rev, str) or not is_valid_tid(rev):
            raise CommitError(f"commit rev is not a valid TID: {rev!r:.60}")
        sig = obj.get("sig")
        if not isinstance(sig, bytes):
            raise CommitError("commit 'sig' must be bytes")
        n_known = 4 + (rev is not None) + prev_present
        extra = {k: v for k, v in obj.items() if k not in _KNOWN} if len(obj) > n_known else {}
        return cls(did, version, data, rev, prev, sig, extra, prev_present)

    def unsigned_object(self) -> dict[str, Any]:
        """The signed-over map: the known fields except ``sig`` (``prev`` always included)."""
        obj: dict[str, Any] = {"did": self.did, "version": self.version, "data": self.data, "prev": self.prev}
        if self.rev is not None:
            obj["rev"] = self.rev
        return obj

    def unsigned_bytes(self) -> bytes:
        """Canonical DAG-CBOR of :meth:`unsigned_object`: the exact bytes the signer signed."""
        return cbor.encode(self.unsigned_object())

    def to_object(self) -> dict[str, Any]:
        """The full commit map as decoded (unknown fields included), for re-encoding."""
        obj = self.unsigned_object()
        if not self.prev_present and self.prev is None:
            del obj["prev"]
        obj["sig"] = self.sig
        if self.extra:
            obj.update(self.extra)
        return obj

    def encode(self) -> bytes:
        """Canonical block bytes; for a decoded canonical block these are the same bytes."""
        return cbor.encode(self.to_object())

    def cid(self) -> CID:
        return cbor.cid_for_cbor(self.encode())

    def verify(self, signing_key: str | PublicKey) -> bool:
        """Check ``sig`` against a ``did:key`` (or multibase) string or a parsed public key.

        A malformed key string raises ``ValueError`` (it comes from a DID document, not the
        commit); a wrong or malformed signature returns ``False``.
        """
        key = verifier_for(signing_key) if isinstance(signing_key, str) else signing_key
        return key.verify(self.unsigned_bytes(), self.sig)


def sign_commit(did: str, data: CID, rev: str, key: PrivateKey, prev: CID | None = None) -> tuple[CID, bytes]:
    """Build and sign a v3 commit (``prev`` present, ``null`` unless given); return (cid, block)."""
    if not is_valid_did(did):
        raise CommitError(f"not a valid DID: {did!r:.100}")
    if not is_valid_tid(rev):
        raise CommitError(f"rev is not a valid TID: {rev!r:.60}")
    unsigned: dict[str, Any] = {"did": did, "version": 3, "data": data, "rev": rev, "prev": prev}
    sig = key.sign(cbor.encode(unsigned))
    unsigned["sig"] = sig
    block = cbor.encode(unsigned)
    return cbor.cid_for_cbor(block), block
