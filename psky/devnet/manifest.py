"""Ground truth of a devnet workload: what every account and repository must end up holding.

End-to-end tests compare what psky indexed (or what a firehose replay / a ``getRepo`` sweep
reconstructs) with this manifest. It is updated write by write as the workload applies them,
with the record CIDs the PDS reported, so it is exactly the state the network holds:

* per account: DID, handle, PDS URL, status (``active``, ``deactivated``, ``takendown``,
  ``suspended``, ``deleted``), the final records ``{uri: {"cid": str, "value": lex JSON}}`` and
  the URIs deleted over the account's history (and not re-created since);
* the labels the labeler issued, in order (without ``cts``/``sig``, which depend on wall time).

An update replaces a record, a delete moves its URI to ``deleted``, deleting an account
moves all of its records there. :meth:`Manifest.diff` lists differences in plain words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from psky.atproto.syntax import parse_at_uri

__all__ = ["ACCOUNT_STATUSES", "DIFF_FIELDS", "AccountState", "Manifest", "ManifestError"]

#: account statuses a manifest records (``active`` plus the ``#account`` event statuses psky handles)
ACCOUNT_STATUSES = frozenset({"active", "deactivated", "takendown", "suspended", "deleted"})

#: what :meth:`Manifest.diff` can compare
DIFF_FIELDS = ("accounts", "handle", "pds", "status", "records", "deleted", "labels")

_FORMAT_VERSION = 1

#: a DID inside a string (an AT-URI authority, a facet, a plain field)
_DID_IN_TEXT = re.compile(r"did:[a-z]+:[A-Za-z0-9._:%-]*[A-Za-z0-9._%-]")


class ManifestError(ValueError):
    """An inconsistent manifest operation or a malformed manifest document."""


@dataclass(slots=True)
class AccountState:
    """One account of the manifest."""

    did: str
    handle: str
    pds: str
    status: str = "active"
    #: uri -> {"cid": str, "value": lex JSON}
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def to_obj(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "pds": self.pds,
            "status": self.status,
            "records": {uri: self.records[uri] for uri in sorted(self.records)},
            "deleted": sorted(self.deleted),
        }


def _split(uri: str) -> tuple[str, str, str]:
    """(did, collection, rkey) of a record URI, or ManifestError."""
    try:
        parsed = parse_at_uri(uri)
    except ValueError as e:
        raise ManifestError(f"not a record URI: {uri!r:.200} ({e})") from None
    if not parsed.authority.startswith("did:") or not parsed.collection or not parsed.rkey:
        raise ManifestError(f"not a record URI with a DID authority: {uri!r:.200}")
    return parsed.authority, parsed.collection, parsed.rkey


def record_uri(did: str, collection: str, rkey: str) -> str:
    return f"at://{did}/{collection}/{rkey}"


class Manifest:
    """Accounts (in creation order), their records and deleted URIs, and issued labels."""

    def __init__(self) -> None:
        self.accounts: dict[str, AccountState] = {}
        #: labels in issue order: {"src", "uri", "cid"?, "val", "neg", "exp"?}
        self.labels: list[dict[str, Any]] = []

    # -- updates -----------------------------------------------------------------------

    def add_account(self, did: str, handle: str, pds: str, status: str = "active") -> AccountState:
        """Register a new account (a DID may only be added once)."""
        if did in self.accounts:
            raise ManifestError(f"account {did} already in the manifest")
        if status not in ACCOUNT_STATUSES:
            raise ManifestError(f"unknown account status {status!r}")
        acct = AccountState(did, handle, pds, status)
        self.accounts[did] = acct
        return acct

    def account(self, did: str) -> AccountState:
        try:
            return self.accounts[did]
        except KeyError:
            raise ManifestError(f"account {did} not in the manifest") from None

    def put_record(self, uri: str, cid: str, value: Mapping[str, Any]) -> None:
        """Create or replace a record (a re-created URI leaves ``deleted``)."""
        did, _, _ = _split(uri)
        acct = self.account(did)
        acct.records[uri] = {"cid": cid, "value": value}
        acct.deleted.discard(uri)

    def delete_record(self, uri: str) -> None:
        """Delete an existing record; its URI moves to ``deleted``."""
        did, _, _ = _split(uri)
        acct = self.account(did)
        if acct.records.pop(uri, None) is None:
            raise ManifestError(f"cannot delete {uri}: not in the manifest")
        acct.deleted.add(uri)

    def apply_ops(self, did: str, ops: Iterable[tuple[str, str, str | None, Mapping[str, Any] | None]]) -> None:
        """Apply one commit's ``(action, "collection/rkey", cid, value)`` operations."""
        acct = self.account(did)
        for action, path, cid, value in ops:
            uri = f"at://{did}/{path}"
            if action == "delete":
                if acct.records.pop(uri, None) is None:
                    raise ManifestError(f"cannot delete {uri}: not in the manifest")
                acct.deleted.add(uri)
            elif action in ("create", "update"):
                if cid is None or value is None:
                    raise ManifestError(f"{action} {uri} needs a cid and a value")
                exists = uri in acct.records
                if exists != (action == "update"):
                    raise ManifestError(f"cannot {action} {uri}: record {'exists' if exists else 'is missing'}")
                acct.records[uri] = {"cid": cid, "value": value}
                acct.deleted.discard(uri)
            else:
                raise ManifestError(f"unknown write action {action!r:.40}")

    def set_handle(self, did: str, handle: str) -> None:
        self.account(did).handle = handle

    def set_status(self, did: str, status: str) -> None:
        """Change an account's status; ``deleted`` also deletes every record of the account."""
        if status not in ACCOUNT_STATUSES:
            raise ManifestError(f"unknown account status {status!r}")
        acct = self.account(did)
        acct.status = status
        if status == "deleted":
            acct.deleted.update(acct.records)
            acct.records.clear()

    def add_label(
        self, src: str, uri: str, val: str, *, cid: str | None = None, neg: bool = False, exp: str | None = None
    ) -> None:
        """Record an issued label (or a negation)."""
        label: dict[str, Any] = {"src": src, "uri": uri}
        if cid is not None:
            label["cid"] = cid
        label["val"] = val
        label["neg"] = neg
        if exp is not None:
            label["exp"] = exp
        self.labels.append(label)

    # -- queries -----------------------------------------------------------------------

    def records(self) -> dict[str, dict[str, Any]]:
        """Every live record of every account, by URI."""
        out: dict[str, dict[str, Any]] = {}
        for acct in self.accounts.values():
            out.update(acct.records)
        return out

    def deleted(self) -> set[str]:
        out: set[str] = set()
        for acct in self.accounts.values():
            out |= acct.deleted
        return out

    def iter_records(self, collection: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(uri, {"cid", "value"}) of live records, optionally of one collection."""
        for acct in self.accounts.values():
            for uri, rec in acct.records.items():
                if collection is None or rec["value"].get("$type") == collection:
                    yield uri, rec

    def counts(self) -> dict[str, int]:
        """Live records per collection, plus ``accounts``/``deleted``/``labels`` totals."""
        c: Counter[str] = Counter()
        for acct in self.accounts.values():
            for uri in acct.records:
                c[_split(uri)[1]] += 1
        out = dict(sorted(c.items()))
        out["accounts"] = len(self.accounts)
        out["deleted"] = sum(len(a.deleted) for a in self.accounts.values())
        out["labels"] = len(self.labels)
        return out

    def latest_labels(self) -> dict[tuple[str, str, str | None, str], dict[str, Any]]:
        """The newest label per (src, uri, cid, val) — what a labeler's ``subscribeLabels``
        replay leaves once superseded versions are dropped (negations included)."""
        latest: dict[tuple[str, str, str | None, str], dict[str, Any]] = {}
        for label in self.labels:
            latest[(label["src"], label["uri"], label.get("cid"), label["val"])] = label
        return latest

    def active_labels(self, now: str) -> set[tuple[str, str, str | None, str]]:
        """(src, uri, cid, val) of the labels in force at ISO time *now*: the newest version
        of each, unless it is a negation or has expired."""
        return {
            key
            for key, label in self.latest_labels().items()
            if not label["neg"] and (label.get("exp") is None or label["exp"] > now)
        }

    # -- JSON --------------------------------------------------------------------------

    def to_obj(self) -> dict[str, Any]:
        return {
            "version": _FORMAT_VERSION,
            "accounts": {did: acct.to_obj() for did, acct in self.accounts.items()},
            "labels": list(self.labels),
        }

    def to_json(self, *, indent: bool = False) -> bytes:
        """The manifest as JSON bytes (records and deleted URIs sorted; accounts in creation order)."""
        return orjson.dumps(self.to_obj(), option=orjson.OPT_INDENT_2 if indent else 0)

    @classmethod
    def from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict) or obj.get("version") != _FORMAT_VERSION:
            raise ManifestError(f"not a version {_FORMAT_VERSION} devnet manifest")
        accounts = obj.get("accounts")
        labels = obj.get("labels", [])
        if not isinstance(accounts, dict) or not isinstance(labels, list):
            raise ManifestError("manifest needs an 'accounts' object and a 'labels' array")
        m = cls()
        for did, a in accounts.items():
            if not isinstance(a, dict):
                raise ManifestError(f"account {did}: not an object")
            try:
                acct = m.add_account(did, a["handle"], a["pds"], a.get("status", "active"))
                records = a.get("records", {})
                deleted = a.get("deleted", [])
            except (KeyError, TypeError) as e:
                raise ManifestError(f"account {did}: missing or malformed field {e}") from None
            if not isinstance(records, dict) or not isinstance(deleted, list):
                raise ManifestError(f"account {did}: 'records' must be an object, 'deleted' an array")
            for uri, rec in records.items():
                if not isinstance(rec, dict) or not isinstance(rec.get("cid"), str) or not isinstance(
                    rec.get("value"), dict
                ):
                    raise ManifestError(f"record {uri}: needs a 'cid' string and a 'value' object")
                if _split(uri)[0] != did:
                    raise ManifestError(f"record {uri} listed under another account {did}")
                acct.records[uri] = {"cid": rec["cid"], "value": rec["value"]}
            acct.deleted = {str(u) for u in deleted}
        for label in labels:
            if not isinstance(label, dict) or not all(isinstance(label.get(k), str) for k in ("src", "uri", "val")):
                raise ManifestError(f"malformed label {label!r:.200}")
            m.labels.append(dict(label))
        return m

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        return cls.from_obj(obj)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_json(indent=True))

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        return cls.from_json(Path(path).read_bytes())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return not self.diff(other, limit=1)

    __hash__ = None  # type: ignore[assignment]  # mutable

    # -- comparison --------------------------------------------------------------------

    def diff(self, other: Manifest, *, fields: Collection[str] = DIFF_FIELDS, limit: int | None = None) -> list[str]:
        """Differences from this (expected) manifest to *other* (actual), one line each.

        *fields* selects what is compared (see :data:`DIFF_FIELDS`; a firehose replay knows
        no PDS URLs, a ``getRepo`` sweep only records); without ``accounts`` accounts missing
        on one side are skipped instead of reported. At most *limit* lines are returned.
        """
        unknown = set(fields) - set(DIFF_FIELDS)
        if unknown:
            raise ValueError(f"unknown diff fields: {sorted(unknown)}")
        out: list[str] = []

        def add(line: str) -> bool:
            out.append(line)
            return limit is not None and len(out) >= limit

        for did, mine in self.accounts.items():
            theirs = other.accounts.get(did)
            if theirs is None:
                if "accounts" in fields and add(f"account {did} ({mine.handle}): missing"):
                    return out
                continue
            for name in ("handle", "pds", "status"):
                a, b = getattr(mine, name), getattr(theirs, name)
                if name in fields and a != b and add(f"account {did}: {name} {a!r} != {b!r}"):
                    return out
            if "records" in fields:
                for uri in sorted(mine.records.keys() | theirs.records.keys()):
                    line = _record_diff(uri, mine.records.get(uri), theirs.records.get(uri))
                    if line is not None and add(line):
                        return out
            if "deleted" in fields:
                for uri in sorted(mine.deleted - theirs.deleted):
                    if add(f"{uri}: deleted, but not deleted in the other manifest"):
                        return out
                for uri in sorted(theirs.deleted - mine.deleted):
                    if add(f"{uri}: unexpectedly deleted"):
                        return out
        if "accounts" in fields:
            for did, theirs in other.accounts.items():
                if did not in self.accounts and add(f"account {did} ({theirs.handle}): unexpected"):
                    return out
        if "labels" in fields and self.labels != other.labels:
            for i in range(max(len(self.labels), len(other.labels))):
                a = self.labels[i] if i < len(self.labels) else None
                b = other.labels[i] if i < len(other.labels) else None
                if a != b and add(f"label #{i}: {_short(a)} != {_short(b)}"):
                    return out
        return out

    # -- determinism -------------------------------------------------------------------

    def normalized(self) -> Manifest:
        """A copy with DIDs, CIDs and PDS URLs renamed canonically, by order of first appearance.

        PDS URLs (free ports), DIDs (which hash PLC operations holding the PDS URL) and the
        CIDs of records that mention them differ between two runs of the same workload; the
        structure does not. Two runs of one seed give equal normalized manifests."""
        dids = {did: f"did:plc:{_b32_index(i)}" for i, did in enumerate(self.accounts)}
        for label in self.labels:
            if label["src"] not in dids:
                dids[label["src"]] = f"did:web:labeler{len(dids)}.test"
        cids: dict[str, str] = {}

        def cid(c: str) -> str:
            got = cids.get(c)
            if got is None:
                got = cids[c] = f"cid-{len(cids)}"
            return got

        def rename(s: str) -> str:
            if "did:" not in s:
                return s
            return _DID_IN_TEXT.sub(lambda m: dids.get(m.group(0), m.group(0)), s)

        def walk(v: Any, key: str | None) -> Any:
            if isinstance(v, dict):
                if len(v) == 1 and "$link" in v:
                    return {"$link": cid(v["$link"])}
                return {k: walk(v[k], k) for k in sorted(v)}
            if isinstance(v, list):
                return [walk(x, key) for x in v]
            if isinstance(v, str):
                if key == "cid":
                    return cid(v)
                return rename(v)
            return v

        pdses: dict[str, str] = {}
        for acct in self.accounts.values():
            pdses.setdefault(acct.pds, f"http://pds-{len(pdses)}.invalid")
        m = Manifest()
        for did, acct in self.accounts.items():
            new = m.add_account(dids[did], acct.handle, pdses[acct.pds], acct.status)
            for uri in sorted(acct.records, key=rename):
                rec = acct.records[uri]
                new.records[rename(uri)] = {"cid": cid(rec["cid"]), "value": walk(rec["value"], None)}
            new.deleted = {rename(u) for u in acct.deleted}
        m.labels = [walk(label, None) for label in self.labels]
        return m


def _b32_index(i: int) -> str:
    """A 24-character did:plc identifier that encodes ``i`` (base32 alphabet)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    chars = []
    for _ in range(24):
        chars.append(alphabet[i & 31])
        i >>= 5
    return "".join(reversed(chars))


def _short(v: Any) -> str:
    text = orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
    return text if len(text) <= 300 else text[:297] + "..."


def _value_diff(a: Any, b: Any, path: str) -> str | None:
    """The first differing path between two lex-JSON values."""
    if type(a) is not type(b):
        return f"{path or '/'}: {_short(a)} != {_short(b)}"
    if isinstance(a, dict):
        for k in sorted(a.keys() | b.keys()):
            if k not in b:
                return f"{path}/{k}: missing in the other"
            if k not in a:
                return f"{path}/{k}: unexpected"
            d = _value_diff(a[k], b[k], f"{path}/{k}")
            if d is not None:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path or '/'}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _value_diff(x, y, f"{path}/{i}")
            if d is not None:
                return d
        return None
    return None if a == b else f"{path or '/'}: {_short(a)} != {_short(b)}"


def _record_diff(uri: str, a: dict[str, Any] | None, b: dict[str, Any] | None) -> str | None:
    if a is None:
        return f"{uri}: unexpected record (cid {b['cid'] if b else '?'})"
    if b is None:
        return f"{uri}: missing record"
    if a["cid"] != b["cid"]:
        detail = _value_diff(a["value"], b["value"], "")
        return f"{uri}: cid {a['cid']} != {b['cid']}" + (f" (value {detail})" if detail else "")
    if a["value"] != b["value"]:
        return f"{uri}: value {_value_diff(a['value'], b['value'], '')}"
    return None
