"""What one collection contributes to the AppView schema.

A plugin turns a record into one row of its table and says which secondary key makes two
records duplicates, which aggregate counters a row feeds and which notifications it causes.
The batch executor (:mod:`psky.indexer.batch`) does all the I/O, set-wise, for every plugin
alike; a plugin only adds hooks where its collection touches other tables (posts, gates).
The semantics follow the TypeScript AppView's ``RecordProcessor`` plugins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from psky.atproto.syntax import is_valid_datetime

if TYPE_CHECKING:
    from psky.indexer.batch import WaveContext

__all__ = [
    "AggKey",
    "Notif",
    "Plugin",
    "RecordOp",
    "SkipRecord",
    "normalize_datetime",
    "ref_uri",
]

EPOCH = "1970-01-01T00:00:00.000Z"
_CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


class SkipRecord(Exception):
    """A record this collection refuses (e.g. a list item in someone else's list): skipped
    and counted under ``reason``, never retried."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class RecordOp:
    """One create, update or delete that passed the rev guard in the current wave."""

    kind: str  # create | update | delete | promote
    uri: str
    did: str
    collection: str
    rkey: str
    cid: str
    record: dict[str, Any] | None
    rev: str
    indexed_at: str
    notify: bool
    order: int = 0
    #: the table row built by the plugin (None: nothing to index in the table)
    row: tuple[Any, ...] | None = None
    #: a promoted duplicate: the URI of the deleted original it replaces
    replaces: str | None = None
    #: an update or delete found (and removed) a row of the previous version
    had_row: bool = False


class Notif(NamedTuple):
    did: str
    record_uri: str
    record_cid: str
    author: str
    reason: str
    reason_subject: str | None
    sort_at: str


class AggKey(NamedTuple):
    """One counter a row feeds: ``table`` (post_agg/profile_agg), its key, the column."""

    table: str
    key: str
    column: str


def normalize_datetime(value: Any) -> str:
    """The TypeScript ``normalizeDatetimeAlways``: a valid datetime as ISO 8601 UTC with
    milliseconds; anything unparseable becomes the Unix epoch."""
    from psky.indexer._time import to_iso_utc

    if type(value) is not str:
        return EPOCH
    if _CANONICAL.fullmatch(value) and is_valid_datetime(value):
        return value
    out = to_iso_utc(value)
    return out if out is not None and is_valid_datetime(out) else EPOCH


def ref_uri(value: Any) -> str | None:
    """``uri`` of a strong ref (``{uri, cid}``), None when absent or malformed."""
    if isinstance(value, dict):
        uri = value.get("uri")
        if type(uri) is str:
            return uri
    return None


def ref_cid(value: Any) -> str | None:
    if isinstance(value, dict):
        cid = value.get("cid")
        if type(cid) is str:
            return cid
    return None


def blob_cid(value: Any) -> str | None:
    """The CID of a blob in lex JSON form (``ref.$link``), or of a legacy ``{cid}`` blob."""
    if isinstance(value, dict):
        ref = value.get("ref")
        if isinstance(ref, dict):
            link = ref.get("$link")
            if type(link) is str:
                return link
        cid = value.get("cid")
        if type(cid) is str:
            return cid
    return None


def did_of(uri: str) -> str:
    """The authority of an ``at://`` URI (the DID for the URIs psky writes)."""
    rest = uri[5:] if uri.startswith("at://") else uri
    return rest.split("/", 1)[0]


def collection_of(uri: str) -> str:
    parts = (uri[5:] if uri.startswith("at://") else uri).split("/")
    return parts[1] if len(parts) > 1 else ""


class Plugin:
    """Base: a collection with a table of ``(column, pg type)`` and ``row()`` values."""

    collection: ClassVar[str]
    #: the table, or None for collections indexed in ``record`` only (declarations, status)
    table: ClassVar[str | None] = None
    columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: columns of the secondary unique key that makes two records duplicates
    unique: ClassVar[tuple[str, ...]] = ()
    #: only rkey ``self`` is indexed (profile, labeler, declarations)
    self_only: ClassVar[bool] = False
    #: an update re-creates the record's notifications (posts); others keep the old ones
    renotify_on_update: ClassVar[bool] = False

    def row(self, op: RecordOp) -> tuple[Any, ...] | None:
        """Column values for the table, in ``columns`` order; None: nothing to index."""
        raise NotImplementedError

    def dup_key(self, did: str, record: Mapping[str, Any]) -> tuple[str, ...] | None:
        """Values of ``unique`` for a record (before it is a row), None when not applicable."""
        return None

    def row_key(self, row: Mapping[str, Any]) -> tuple[str, ...] | None:
        if not self.unique:
            return None
        return tuple(str(row[c]) for c in self.unique)

    def agg_keys(self, row: Mapping[str, Any]) -> Sequence[AggKey]:
        return ()

    def notifs_for_insert(self, row: Mapping[str, Any], ctx: WaveContext) -> list[Notif]:
        return []

    def notifs_for_delete(
        self, row: Mapping[str, Any], replaced: bool, op: RecordOp
    ) -> tuple[list[Notif], bool]:
        """Notifications to add, and whether the record's own notifications are deleted."""
        return [], False

    # hooks (set-wise, inside the wave's transaction)

    async def prepare(self, ops: list[RecordOp], ctx: WaveContext) -> None:
        """Read what ``row()`` needs from the database before the rows are built."""

    async def after_insert(
        self, rows: list[Mapping[str, Any]], ops: list[RecordOp], ctx: WaveContext
    ) -> None:
        """Side tables: ``rows`` were newly inserted, ``ops`` are every attempt (rows built)."""

    async def after_delete(self, rows: list[Mapping[str, Any]], uris: list[str], ctx: WaveContext) -> None:
        """Side tables: ``rows`` were deleted from the table for the records ``uris``."""

    def read_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        """Keys (URIs mostly) whose state this create reads: an event that writes one of them
        earlier in the same batch forces a new wave (see :mod:`psky.indexer.batch`)."""
        return ()

    def write_keys(self, did: str, rkey: str, record: Mapping[str, Any] | None) -> tuple[str, ...]:
        """Keys besides the record's own URI that this create/update/delete changes."""
        return ()
