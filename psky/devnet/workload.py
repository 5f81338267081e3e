"""A deterministic, realistic write workload for the devnet, and its ground-truth manifest.

Three layers, so each can be tested on its own:

* **Record generators** — pure functions of a seeded :class:`random.Random` and explicit
  inputs that return lex-JSON records valid against the bundled lexicons: posts with
  mention/link/tag facets (UTF-8 byte offsets), langs, self-labels, tags, replies, quotes and
  every embed kind; likes and reposts (optionally ``via`` a repost), follows, blocks, lists,
  list items, list blocks, feed generators, starter packs, threadgates, postgates, labeler
  services, verifications, profiles, statuses and the declaration records.
* :class:`Planner` — the seeded model of the network's social state. It decides what each
  account does next (Zipf-distributed popularity: a few accounts and their posts draw most
  follows, likes, reposts, replies and quotes) and emits events: account creations, write
  batches (with the blobs they reference and the CIDs the records must get), handle
  changes, account status changes and labels. Time is synthetic (record keys and
  ``createdAt`` come from a clock that starts at ``epoch``), so a seed always yields the
  same events. It does no I/O; :func:`simulate` runs it offline.
* :class:`Workload` — applies the planner's events to a running devnet (PDS writes, blob
  uploads, PLC handle changes, account status, labeler labels) and keeps the
  :class:`~psky.devnet.manifest.Manifest` in step with what the servers acknowledged.

Identity caveat: DIDs hash the PLC genesis operation, which holds freshly generated keys and
the PDS URL (with its port), so two runs of one seed differ in DIDs and in the CIDs of records
that mention them; :meth:`Manifest.normalized` removes exactly that difference.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import struct
import time
import zlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import cbrrr

from psky.atproto import cbor
from psky.atproto.crypto import PrivateKey
from psky.atproto.lexicon import grapheme_len
from psky.atproto.syntax import datetime_to_us, make_tid
from psky.devnet.manifest import Manifest

if TYPE_CHECKING:
    from psky.devnet.labeler import Labeler
    from psky.devnet.pds import Pds

__all__ = [
    "DEFAULT_EPOCH",
    "AccountCreate",
    "Blob",
    "Event",
    "HandleChange",
    "LabelIssue",
    "Planner",
    "StatusChange",
    "Workload",
    "WorkloadError",
    "WriteBatch",
    "blob_ref",
    "record_cid",
    "simulate",
]

log = logging.getLogger("psky.devnet.workload")

#: synthetic time starts here unless told otherwise (seeded history, then live events)
DEFAULT_EPOCH = "2024-11-01T00:00:00.000Z"

Json: TypeAlias = dict[str, Any]
#: one repo write: (action, collection, rkey, record | None)
Write: TypeAlias = tuple[str, str, str, Json | None]


class WorkloadError(RuntimeError):
    """A server acknowledged something other than what the workload wrote."""


# --- small helpers ------------------------------------------------------------------------


_UNIX = datetime(1970, 1, 1, tzinfo=UTC)
_DAG_CBOR_PFX = cbor.CID.CIDV1_DAG_CBOR_SHA256_32_PFX


@lru_cache(maxsize=1024)
def _iso_day(days: int) -> str:
    return f"{_UNIX + timedelta(days=days):%Y-%m-%d}"


def iso_from_us(us: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS.mmmZ`` (the form the reference clients write)."""
    seconds, micro = divmod(us, 1_000_000)
    days, sec = divmod(seconds, 86_400)
    hours, sec = divmod(sec, 3600)
    minutes, sec = divmod(sec, 60)
    return f"{_iso_day(days)}T{hours:02d}:{minutes:02d}:{sec:02d}.{micro // 1000:03d}Z"


def record_cid(value: Mapping[str, Any]) -> str:
    """The CID a PDS gives a lex-JSON record (dag-cbor, sha-256).

    Encodes straight from lex JSON in C (the records are generated valid, so the checks of
    :func:`psky.atproto.cbor.encode_lex` would only cost time; the PDS's answer is compared)."""
    digest = hashlib.sha256(cbrrr.encode_dag_cbor(dict(value), atjson_mode=True)).digest()
    return "b" + base64.b32encode(_DAG_CBOR_PFX + digest).decode().lower().rstrip("=")


def blob_ref(data: bytes, mime: str) -> Json:
    """The lex-JSON blob reference of ``data`` (what ``uploadBlob`` returns)."""
    return {"$type": "blob", "ref": {"$link": cbor.cid_for_raw(data).encode()}, "mimeType": mime, "size": len(data)}


def strong_ref(uri: str, cid: str) -> Json:
    return {"uri": uri, "cid": cid}


def _zipf_weights(n: int, s: float, rng: random.Random) -> list[float]:
    ranks = list(range(1, n + 1))
    rng.shuffle(ranks)
    return [1.0 / r**s for r in ranks]


# --- blobs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blob:
    """Blob bytes with their reference; ``width``/``height`` for images and videos."""

    data: bytes
    mime: str
    width: int = 0
    height: int = 0

    @property
    def ref(self) -> Json:
        return blob_ref(self.data, self.mime)

    @property
    def cid(self) -> str:
        return cbor.cid_for_raw(self.data).encode()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(rng: random.Random, width: int, height: int) -> bytes:
    """A real (decodable) RGB PNG: a colour gradient with noise."""
    r0, g0, b0 = rng.randrange(256), rng.randrange(256), rng.randrange(256)
    noise = rng.randbytes(width * height)
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")
        for x in range(width):
            n = noise[y * width + x] & 0x1F
            row += bytes(((r0 + 4 * x + n) & 255, (g0 + 4 * y + n) & 255, (b0 + 2 * (x + y)) & 255))
        rows.append(bytes(row))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + _png_chunk(b"IEND", b"")


def mp4_bytes(rng: random.Random, size: int) -> bytes:
    """Bytes that start like an MP4 file (``ftyp`` + ``mdat`` boxes); the content is noise."""
    ftyp = b"ftypisom\x00\x00\x02\x00isomiso2avc1mp41"
    payload = rng.randbytes(max(size - len(ftyp) - 16, 16))
    return struct.pack(">I", len(ftyp) + 4) + ftyp + struct.pack(">I", len(payload) + 8) + b"mdat" + payload


def vtt_bytes(lines: Sequence[str]) -> bytes:
    """A WebVTT caption file, two seconds per line."""
    out = ["WEBVTT", ""]
    for i, line in enumerate(lines):
        out += [f"00:00:{2 * i:02d}.000 --> 00:00:{2 * i + 2:02d}.000", line, ""]
    return "\n".join(out).encode()


_ASPECTS = ((4, 3), (3, 4), (16, 9), (9, 16), (1, 1), (3, 2), (2, 3), (21, 9))


class BlobPool:
    """A fixed, seeded set of images, videos and caption files that accounts upload."""

    def __init__(self, seed: int, *, images: int = 48, videos: int = 6, captions: int = 4) -> None:
        rng = random.Random(f"psky-devnet-blobs:{seed}")
        self.images: list[Blob] = []
        for _ in range(images):
            aw, ah = rng.choice(_ASPECTS)
            k = rng.randint(2, 6)
            w, h = aw * k, ah * k
            self.images.append(Blob(png_bytes(rng, w, h), "image/png", w, h))
        self.videos = [
            Blob(mp4_bytes(rng, rng.randint(2_000, 12_000)), "video/mp4", *rng.choice(((1920, 1080), (1080, 1920), (720, 720))))
            for _ in range(videos)
        ]
        self.captions = [
            Blob(vtt_bytes([" ".join(rng.choices(_WORDS, k=5)) for _ in range(rng.randint(1, 4))]), "text/vtt")
            for _ in range(captions)
        ]


# --- text ---------------------------------------------------------------------------------

_WORDS = (
    "the", "a", "and", "to", "of", "in", "is", "it", "that", "for", "on", "with", "this", "was", "at",
    "just", "like", "so", "but", "my", "be", "have", "not", "are", "you", "we", "they", "what", "all",
    "about", "today", "now", "new", "time", "good", "great", "day", "really", "people", "think", "know",
    "see", "love", "work", "year", "back", "one", "more", "some", "out", "get", "make", "going", "still",
    "much", "need", "first", "last", "best", "little", "coffee", "morning", "night", "weekend", "music",
    "book", "movie", "game", "garden", "city", "train", "rain", "snow", "sun", "sky", "cloud", "river",
    "ocean", "mountain", "walk", "run", "code", "bug", "release", "deploy", "server", "database",
    "protocol", "network", "feed", "post", "thread", "reply", "photo", "picture", "video", "art", "design",
    "paint", "draw", "write", "read", "learn", "teach", "build", "ship", "cat", "dog", "bird", "butterfly",
    "tree", "flower", "spring", "summer", "autumn", "winter", "home", "friend", "family", "team",
    "project", "idea", "question", "answer", "problem", "fix", "test", "launch", "update", "news", "story",
    "history", "science", "space", "moon", "star", "planet", "data", "model", "open", "source",
    "community", "weird", "wonderful", "quiet", "busy", "happy", "tired", "excited", "curious", "honestly",
    "literally", "finally", "maybe", "probably", "definitely", "again", "always", "never", "sometimes",
    "here", "there",
)

#: (BCP 47 tag, phrases, weight); phrases carry multi-byte UTF-8 on purpose
_LANGS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("en", (), 0.58),
    ("ja", ("今日はいい天気ですね", "ありがとうございます", "新しいプロジェクト", "コーヒーを飲みたい", "おはよう", "猫がかわいい"), 0.12),
    ("pt-BR", ("bom dia", "obrigado pela dica", "não sei ainda", "que legal", "até amanhã", "coração"), 0.09),
    ("de", ("Guten Morgen", "schöne Grüße aus München", "die Straße ist nass", "Tschüß", "Übermorgen"), 0.05),
    ("es", ("¿qué tal?", "muy bien", "mañana por la mañana", "¡qué bonito!", "niño"), 0.06),
    ("fr", ("café crème", "à bientôt", "très bien", "déjà vu", "été"), 0.04),
    ("ko", ("안녕하세요", "감사합니다", "좋은 하루", "커피"), 0.03),
    ("uk", ("добрий ранок", "дякую", "слава"), 0.01),
    ("hi", ("नमस्ते", "धन्यवाद"), 0.01),
    ("ar", ("مرحبا", "شكرا جزيلا"), 0.01),
)
_LANG_WEIGHTS = [w for _, _, w in _LANGS]
_EMOJI = ("😀", "😂", "❤️", "👍🏽", "🎉", "👩‍💻", "🇧🇷", "🇯🇵", "🦋", "✨", "🔥", "🙏", "🏳️‍🌈", "👨‍👩‍👧")
_TAGS = ("art", "photography", "bluesky", "atproto", "python", "music", "cats", "dogsofbluesky", "news",
         "gaming", "books", "science", "space", "coffee", "MondayMotivation", "日本", "café", "TIL")
_DOMAINS = ("example.com", "news.example.org", "blog.example.net", "www.example.co.uk", "video.example",
            "docs.example.dev", "shop.example.com", "en.wikipedia.org")
_SELF_LABELS = ("porn", "sexual", "nudity", "graphic-media")
_FIRST = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
          "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "yuki", "zoe", "ana",
          "joao", "maria", "kenji", "sofia", "lucas", "emma", "noah", "mia", "leo", "ines", "omar", "priya")
_LAST = ("smith", "jones", "garcia", "silva", "tanaka", "muller", "dubois", "kim", "rossi", "novak",
         "santos", "ito", "khan", "lopez", "berg", "costa", "park", "weber", "moreau", "sato")
_LABEL_VALS = ("spam", "rude", "misleading", "porn", "sexual", "nudity", "graphic-media", "!warn", "!hide",
               "intolerant", "impersonation", "cute-cat")


@lru_cache(maxsize=8192)
def _glen(token: str) -> int:
    return grapheme_len(token)


def _link_display(uri: str) -> str:
    """How the reference client shortens a link in post text."""
    bare = uri.split("://", 1)[1]
    return bare if len(bare) <= 30 else bare[:27] + "..."


def gen_link(rng: random.Random) -> str:
    domain = rng.choice(_DOMAINS)
    path = "/".join(rng.choices(_WORDS, k=rng.randint(0, 3)))
    uri = f"https://{domain}/{path}"
    if rng.random() < 0.3:
        uri += f"?id={rng.randrange(10**6)}"
    return uri


def gen_lang(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tag, phrases, _ = rng.choices(_LANGS, weights=_LANG_WEIGHTS)[0]
    return tag, phrases


def rich_text(
    rng: random.Random,
    *,
    phrases: Sequence[str] = (),
    mentions: Sequence[tuple[str, str]] = (),
    links: Sequence[str] = (),
    tags: Sequence[str] = (),
    words: int = 12,
    emoji: int = 0,
    max_graphemes: int = 300,
    max_bytes: int = 3000,
) -> tuple[str, list[Json]]:
    """Text with facets: ``@handle`` mentions (``(handle, did)``), links shown shortened
    and ``#tags``, mixed into words/phrases; facet offsets are UTF-8 byte offsets."""
    tokens: list[tuple[str, Json | None]] = []
    for _ in range(words):
        if phrases and rng.random() < 0.5:
            tokens.append((rng.choice(phrases), None))
        else:
            tokens.append((rng.choice(_WORDS), None))
    for _ in range(emoji):
        tokens.insert(rng.randint(0, len(tokens)), (rng.choice(_EMOJI), None))
    specials: list[tuple[str, Json]] = []
    for handle, did in mentions:
        specials.append((f"@{handle}", {"$type": "app.bsky.richtext.facet#mention", "did": did}))
    for uri in links:
        specials.append((_link_display(uri), {"$type": "app.bsky.richtext.facet#link", "uri": uri}))
    for tag in tags:
        specials.append((f"#{tag}", {"$type": "app.bsky.richtext.facet#tag", "tag": tag}))
    for tok in specials:
        tokens.insert(rng.randint(0, len(tokens)), tok)
    seps = ["\n\n" if rng.random() < 0.05 else " " for _ in tokens]
    sizes = [_glen(t) + len(sep) for (t, _), sep in zip(tokens, seps, strict=True)]
    total = sum(sizes)
    while tokens and total > max_graphemes:  # estimate first, so the exact check rarely loops
        idx = next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i][1] is None), len(tokens) - 1)
        total -= sizes.pop(idx)
        del tokens[idx]
        del seps[idx]
    while True:
        text, facets = _assemble(tokens, seps)
        # the estimate is exact for these tokens; the full count is only worth it near the limit
        fits = total < max_graphemes - 16 or grapheme_len(text) <= max_graphemes
        if fits and len(text.encode()) <= max_bytes:
            return text, facets
        # over a limit: drop the last plain token (or, failing that, the last token)
        idx = next((i for i in range(len(tokens) - 1, -1, -1) if tokens[i][1] is None), len(tokens) - 1)
        del tokens[idx]
        del seps[idx]
        total -= sizes.pop(idx)


def _assemble(tokens: Sequence[tuple[str, Json | None]], seps: Sequence[str]) -> tuple[str, list[Json]]:
    parts: list[str] = []
    facets: list[Json] = []
    pos = 0
    for i, (text, feature) in enumerate(tokens):
        if i:
            parts.append(seps[i])
            pos += len(seps[i])
        n = len(text.encode())
        if feature is not None:
            facets.append({"index": {"byteStart": pos, "byteEnd": pos + n}, "features": [feature]})
        parts.append(text)
        pos += n
    return "".join(parts), facets


def self_labels(values: Sequence[str]) -> Json:
    return {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": v} for v in values]}


# --- record generators ------------------------------------------------------------------


def post_record(
    rng: random.Random,
    created_at: str,
    *,
    mentionable: Sequence[tuple[str, str]] = (),
    reply: tuple[Json, Json] | None = None,
    embed: Json | None = None,
    allow_empty: bool = False,
) -> Json:
    """An ``app.bsky.feed.post``; ``reply`` is (root, parent) strong refs."""
    lang, phrases = gen_lang(rng)
    n_mentions = min(len(mentionable), rng.choices((0, 1, 2, 3), weights=(80, 14, 4, 2))[0])
    mentions = rng.sample(list(mentionable), n_mentions) if n_mentions else []
    links = [gen_link(rng)] if rng.random() < 0.12 else []
    tags = rng.sample(_TAGS, rng.choices((0, 1, 2, 3), weights=(82, 12, 4, 2))[0])
    emoji = rng.choices((0, 1, 2, 4), weights=(70, 20, 8, 2))[0]
    words = 0 if allow_empty and rng.random() < 0.3 else rng.choice((2, 4, 6, 8, 12, 16, 24, 40, 60))
    text, facets = rich_text(rng, phrases=phrases, mentions=mentions, links=links, tags=tags, words=words, emoji=emoji)
    rec: Json = {"$type": "app.bsky.feed.post", "text": text, "createdAt": created_at}
    if facets:
        rec["facets"] = facets
    r = rng.random()
    if r < 0.85:
        rec["langs"] = [lang]
    elif r < 0.92:
        rec["langs"] = [lang, "en"] if lang != "en" else ["en", "ja"]
    if reply is not None:
        rec["reply"] = {"root": reply[0], "parent": reply[1]}
    if embed is not None:
        rec["embed"] = embed
    if rng.random() < 0.02:
        rec["labels"] = self_labels(rng.sample(_SELF_LABELS, rng.randint(1, 2)))
    if rng.random() < 0.03:
        rec["tags"] = rng.sample(_TAGS, rng.randint(1, 4))
    return rec


def _aspect(blob: Blob) -> Json:
    return {"width": blob.width, "height": blob.height}


def _alt(rng: random.Random) -> str:
    return "" if rng.random() < 0.3 else " ".join(rng.choices(_WORDS, k=rng.randint(2, 12)))


def images_embed(rng: random.Random, images: Sequence[Blob]) -> Json:
    out = []
    for img in images:
        item: Json = {"image": img.ref, "alt": _alt(rng)}
        if rng.random() < 0.9:
            item["aspectRatio"] = _aspect(img)
        out.append(item)
    return {"$type": "app.bsky.embed.images", "images": out}


def gallery_embed(rng: random.Random, images: Sequence[Blob]) -> Json:
    items = [
        {"$type": "app.bsky.embed.gallery#image", "image": img.ref, "alt": _alt(rng), "aspectRatio": _aspect(img)}
        for img in images
    ]
    return {"$type": "app.bsky.embed.gallery", "items": items}


def video_embed(rng: random.Random, video: Blob, captions: Sequence[tuple[str, Blob]] = ()) -> Json:
    emb: Json = {"$type": "app.bsky.embed.video", "video": video.ref, "aspectRatio": _aspect(video)}
    if rng.random() < 0.6:
        emb["alt"] = _alt(rng)
    if captions:
        emb["captions"] = [{"lang": lang, "file": blob.ref} for lang, blob in captions]
    if rng.random() < 0.15:
        emb["presentation"] = "gif"
    return emb


def external_embed(rng: random.Random, thumb: Blob | None = None, uri: str | None = None) -> Json:
    ext: Json = {
        "uri": uri or gen_link(rng),
        "title": " ".join(rng.choices(_WORDS, k=rng.randint(2, 9))).capitalize(),
        "description": " ".join(rng.choices(_WORDS, k=rng.randint(0, 25))),
    }
    if thumb is not None:
        ext["thumb"] = thumb.ref
    return {"$type": "app.bsky.embed.external", "external": ext}


def record_embed(ref: Json) -> Json:
    return {"$type": "app.bsky.embed.record", "record": ref}


def record_with_media_embed(ref: Json, media: Json) -> Json:
    return {"$type": "app.bsky.embed.recordWithMedia", "record": record_embed(ref), "media": media}


def like_record(subject: Json, created_at: str, via: Json | None = None) -> Json:
    rec: Json = {"$type": "app.bsky.feed.like", "subject": subject, "createdAt": created_at}
    if via is not None:
        rec["via"] = via
    return rec


def repost_record(subject: Json, created_at: str, via: Json | None = None) -> Json:
    rec: Json = {"$type": "app.bsky.feed.repost", "subject": subject, "createdAt": created_at}
    if via is not None:
        rec["via"] = via
    return rec


def follow_record(subject: str, created_at: str, via: Json | None = None) -> Json:
    rec: Json = {"$type": "app.bsky.graph.follow", "subject": subject, "createdAt": created_at}
    if via is not None:
        rec["via"] = via
    return rec


def block_record(subject: str, created_at: str) -> Json:
    return {"$type": "app.bsky.graph.block", "subject": subject, "createdAt": created_at}


_LIST_PURPOSES = {
    "curate": "app.bsky.graph.defs#curatelist",
    "mod": "app.bsky.graph.defs#modlist",
    "reference": "app.bsky.graph.defs#referencelist",
}


def list_record(
    rng: random.Random, purpose: str, created_at: str, *, avatar: Blob | None = None,
    mentionable: Sequence[tuple[str, str]] = (),
) -> Json:
    """An ``app.bsky.graph.list``; ``purpose`` is curate, mod or reference."""
    name = " ".join(rng.choices(_WORDS, k=rng.randint(1, 4))).title()[:64]
    rec: Json = {"$type": "app.bsky.graph.list", "purpose": _LIST_PURPOSES[purpose], "name": name, "createdAt": created_at}
    if rng.random() < 0.7:
        text, facets = rich_text(rng, words=rng.randint(3, 20), mentions=mentionable[:1], max_graphemes=300)
        rec["description"] = text
        if facets:
            rec["descriptionFacets"] = facets
    if avatar is not None:
        rec["avatar"] = avatar.ref
    if purpose == "mod" and rng.random() < 0.1:
        rec["labels"] = self_labels(["!no-unauthenticated"])
    return rec


def listitem_record(subject: str, list_uri: str, created_at: str) -> Json:
    return {"$type": "app.bsky.graph.listitem", "subject": subject, "list": list_uri, "createdAt": created_at}


def listblock_record(list_uri: str, created_at: str) -> Json:
    return {"$type": "app.bsky.graph.listblock", "subject": list_uri, "createdAt": created_at}


def feed_generator_record(
    rng: random.Random, service_did: str, display_name: str, created_at: str, *, avatar: Blob | None = None,
    mentionable: Sequence[tuple[str, str]] = (),
) -> Json:
    rec: Json = {
        "$type": "app.bsky.feed.generator",
        "did": service_did,
        "displayName": display_name[:24],
        "createdAt": created_at,
    }
    if rng.random() < 0.8:
        text, facets = rich_text(rng, words=rng.randint(4, 30), mentions=mentionable[:1],
                                 tags=rng.sample(_TAGS, rng.randint(0, 2)), max_graphemes=300)
        rec["description"] = text
        if facets:
            rec["descriptionFacets"] = facets
    if avatar is not None:
        rec["avatar"] = avatar.ref
    if rng.random() < 0.3:
        rec["acceptsInteractions"] = rng.random() < 0.7
    if rng.random() < 0.2:
        rec["contentMode"] = rng.choice(
            ("app.bsky.feed.defs#contentModeUnspecified", "app.bsky.feed.defs#contentModeVideo"))
    if rng.random() < 0.03:
        rec["labels"] = self_labels(["nudity"])
    return rec


def starterpack_record(rng: random.Random, list_uri: str, feeds: Sequence[str], created_at: str) -> Json:
    rec: Json = {
        "$type": "app.bsky.graph.starterpack",
        "name": (" ".join(rng.choices(_WORDS, k=rng.randint(1, 5))).title() + " starter pack")[:50],
        "list": list_uri,
        "createdAt": created_at,
    }
    if rng.random() < 0.7:
        text, facets = rich_text(rng, words=rng.randint(4, 25), tags=rng.sample(_TAGS, rng.randint(0, 1)))
        rec["description"] = text
        if facets:
            rec["descriptionFacets"] = facets
    if feeds:
        rec["feeds"] = [{"uri": uri} for uri in feeds[:3]]
    return rec


def threadgate_record(
    rng: random.Random, post_uri: str, created_at: str, *, lists: Sequence[str] = (), hidden: Sequence[str] = ()
) -> Json:
    """``allow`` is omitted (anyone), empty (nobody) or 1-3 rules; ``hidden`` replies are listed."""
    rec: Json = {"$type": "app.bsky.feed.threadgate", "post": post_uri, "createdAt": created_at}
    r = rng.random()
    if r < 0.1:
        rec["allow"] = []
    elif r < 0.85:
        kinds = ["mention", "follower", "following"] + (["list"] if lists else [])
        rules: list[Json] = []
        for kind in rng.sample(kinds, rng.randint(1, min(3, len(kinds)))):
            if kind == "list":
                rules.append({"$type": "app.bsky.feed.threadgate#listRule", "list": rng.choice(list(lists))})
            else:
                rules.append({"$type": f"app.bsky.feed.threadgate#{kind}Rule"})
        rec["allow"] = rules
    if hidden:
        rec["hiddenReplies"] = list(hidden)[:300]
    return rec


def postgate_record(rng: random.Random, post_uri: str, created_at: str, *, detached: Sequence[str] = ()) -> Json:
    rec: Json = {"$type": "app.bsky.feed.postgate", "post": post_uri, "createdAt": created_at}
    if detached:
        rec["detachedEmbeddingUris"] = list(detached)[:50]
    if not detached or rng.random() < 0.5:
        rec["embeddingRules"] = [{"$type": "app.bsky.feed.postgate#disableRule"}]
    return rec


def labeler_service_record(rng: random.Random, created_at: str) -> Json:
    custom = rng.sample(("cute-cat", "low-effort", "ai-generated", "spoiler", "satire"), rng.randint(1, 3))
    values = rng.sample(("spam", "rude", "misleading", "porn", "nudity", "!warn"), rng.randint(0, 3)) + custom
    defs = []
    for ident in custom:
        d: Json = {
            "identifier": ident,
            "severity": rng.choice(("inform", "alert", "none")),
            "blurs": rng.choice(("content", "media", "none")),
            "locales": [{"lang": "en", "name": ident.replace("-", " ").title(),
                         "description": " ".join(rng.choices(_WORDS, k=10))}],
        }
        if rng.random() < 0.5:
            d["defaultSetting"] = rng.choice(("ignore", "warn", "hide"))
        if rng.random() < 0.3:
            d["adultOnly"] = rng.random() < 0.5
        if rng.random() < 0.3:
            d["locales"].append({"lang": "pt-BR", "name": ident, "description": "descrição do rótulo"})
        defs.append(d)
    rec: Json = {
        "$type": "app.bsky.labeler.service",
        "policies": {"labelValues": values, "labelValueDefinitions": defs},
        "createdAt": created_at,
    }
    if rng.random() < 0.6:
        rec["reasonTypes"] = rng.sample(
            ("com.atproto.moderation.defs#reasonSpam", "com.atproto.moderation.defs#reasonViolation",
             "com.atproto.moderation.defs#reasonMisleading", "com.atproto.moderation.defs#reasonRude",
             "com.atproto.moderation.defs#reasonOther"), rng.randint(1, 3))
    if rng.random() < 0.6:
        rec["subjectTypes"] = rng.sample(("account", "record"), rng.randint(1, 2))
    if rng.random() < 0.4:
        rec["subjectCollections"] = ["app.bsky.feed.post"] + (["app.bsky.actor.profile"] if rng.random() < 0.5 else [])
    return rec


def verification_record(subject: str, handle: str, display_name: str, created_at: str) -> Json:
    return {"$type": "app.bsky.graph.verification", "subject": subject, "handle": handle,
            "displayName": display_name, "createdAt": created_at}


def chat_declaration_record(rng: random.Random) -> Json:
    rec: Json = {"$type": "chat.bsky.actor.declaration",
                 "allowIncoming": rng.choices(("all", "following", "none"), weights=(3, 6, 1))[0]}
    if rng.random() < 0.3:
        rec["allowGroupInvites"] = rng.choice(("all", "following", "none"))
    return rec


def notification_declaration_record(rng: random.Random) -> Json:
    return {"$type": "app.bsky.notification.declaration",
            "allowSubscriptions": rng.choices(("followers", "mutuals", "none"), weights=(6, 3, 1))[0]}


def content_visibility_record(rng: random.Random) -> Json:
    return {"$type": "app.bsky.actor.contentVisibilityDeclaration",
            "hideFromAlgorithmicRecommendations": rng.random() < 0.5}


def status_record(rng: random.Random, created_at: str, *, thumb: Blob | None = None) -> Json:
    rec: Json = {"$type": "app.bsky.actor.status", "status": "app.bsky.actor.status#live", "createdAt": created_at}
    if rng.random() < 0.8:
        rec["embed"] = external_embed(rng, thumb, uri=f"https://video.example/live/{rng.randrange(10**6)}")
    if rng.random() < 0.7:
        rec["durationMinutes"] = rng.choice((15, 30, 60, 120, 240))
    return rec


def profile_record(
    rng: random.Random,
    display_name: str,
    created_at: str,
    *,
    avatar: Blob | None = None,
    banner: Blob | None = None,
    pinned: Json | None = None,
    joined_via: Json | None = None,
) -> Json:
    _, phrases = gen_lang(rng)
    rec: Json = {"$type": "app.bsky.actor.profile", "createdAt": created_at}
    if display_name:
        rec["displayName"] = display_name
    if rng.random() < 0.85:
        text, _ = rich_text(rng, phrases=phrases, words=rng.randint(2, 30), emoji=rng.randint(0, 2),
                            max_graphemes=256)
        rec["description"] = text
    if avatar is not None:
        rec["avatar"] = avatar.ref
    if banner is not None:
        rec["banner"] = banner.ref
    if pinned is not None:
        rec["pinnedPost"] = pinned
    if joined_via is not None:
        rec["joinedViaStarterPack"] = joined_via
    if rng.random() < 0.15:
        rec["pronouns"] = rng.choice(("she/her", "he/him", "they/them", "ela/dela", "any"))
    if rng.random() < 0.15:
        rec["website"] = f"https://{rng.choice(_DOMAINS)}/~{rng.choice(_FIRST)}"
    if rng.random() < 0.01:
        rec["labels"] = self_labels(["!no-unauthenticated"])
    return rec


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountCreate:
    """Create account ``index`` on PDS ``pds`` (an index into the network's PDS list)."""

    index: int
    handle: str
    pds: int
    curve: str = "k256"


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """One ``applyWrites`` commit of account ``index``: upload ``blobs`` first; each create or
    update must get the CID in ``cids`` (None for deletes)."""

    index: int
    writes: tuple[Write, ...]
    cids: tuple[str | None, ...]
    blobs: tuple[Blob, ...] = ()


@dataclass(frozen=True, slots=True)
class HandleChange:
    index: int
    handle: str


@dataclass(frozen=True, slots=True)
class StatusChange:
    """New account status: ``active`` (reactivated) or a deactivation/takedown/suspension/deletion."""

    index: int
    status: str


@dataclass(frozen=True, slots=True)
class LabelIssue:
    """A label (or negation) for the labeler to sign; ``uri`` is a record URI or a DID."""

    uri: str
    val: str
    cid: str | None = None
    neg: bool = False
    exp: str | None = None


Event: TypeAlias = AccountCreate | WriteBatch | HandleChange | StatusChange | LabelIssue


# --- the planner ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Actor:
    index: int
    handle: str
    pds: int
    clock_id: int
    display_name: str
    verifier: bool = False
    did: str = ""
    status: str = "pending"
    posts: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    likes: list[str] = field(default_factory=list)
    reposts: list[str] = field(default_factory=list)
    follows: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, str] = field(default_factory=dict)
    lists: list[str] = field(default_factory=list)
    listitems: list[str] = field(default_factory=list)
    listblocks: list[str] = field(default_factory=list)
    feedgens: list[str] = field(default_factory=list)
    starterpacks: list[str] = field(default_factory=list)
    threadgates: dict[str, str] = field(default_factory=dict)
    postgates: dict[str, str] = field(default_factory=dict)
    verifications: list[str] = field(default_factory=list)
    uploaded: set[str] = field(default_factory=set)
    feed_slugs: set[str] = field(default_factory=set)


class _Batch:
    __slots__ = ("actor", "blobs", "busy", "cids", "writes")

    def __init__(self, actor: _Actor) -> None:
        self.actor = actor
        self.writes: list[Write] = []
        self.cids: list[str | None] = []
        self.blobs: list[Blob] = []
        self.busy: set[str] = set()


#: relative frequency of each kind of write an active account makes
_WRITE_KINDS: tuple[tuple[str, float], ...] = (
    ("post", 17.0), ("reply", 10.0), ("quote", 1.8), ("like", 38.0), ("repost", 8.0), ("follow", 13.0),
    ("unlike", 1.0), ("unrepost", 0.4), ("unfollow", 0.9), ("delete_post", 0.7), ("block", 0.9),
    ("unblock", 0.25), ("list", 0.35), ("listitem", 1.8), ("delete_listitem", 0.3), ("listblock", 0.2),
    ("feedgen", 0.25), ("update_feedgen", 0.1), ("starterpack", 0.15), ("update_list", 0.1),
    ("threadgate", 0.7), ("update_threadgate", 0.4), ("postgate", 0.45), ("profile_update", 0.7),
    ("verification", 0.2), ("status", 0.15), ("delete_status", 0.05), ("declaration", 0.2),
)
_WRITE_NAMES = [k for k, _ in _WRITE_KINDS]
_WRITE_CUM: list[float] = []
for _k, _w in _WRITE_KINDS:
    _WRITE_CUM.append((_WRITE_CUM[-1] if _WRITE_CUM else 0.0) + _w)


class Planner:
    """The seeded social model: decides every event of a workload (no I/O).

    Use: ``new_account()`` → create it → ``bind(index, did)``; then ``initial_batch``,
    ``write_batch``/``seed_batches``, ``live_event``. Every event is applied to the planner's
    own state when it is emitted, so the caller must apply events in order and bind DIDs before
    asking for the next event.
    """

    def __init__(self, seed: int, hostnames: Sequence[str], *, epoch: str = DEFAULT_EPOCH, zipf_s: float = 1.1) -> None:
        if not hostnames:
            raise ValueError("the planner needs at least one PDS hostname")
        self.seed = seed
        self.rng = random.Random(seed)
        self.hostnames = list(hostnames)
        self.zipf_s = zipf_s
        self.now_us = datetime_to_us(epoch)
        self.blobs = BlobPool(seed)
        self.actors: list[_Actor] = []
        self._pop_cum: list[float] = []
        self._act_cum: list[float] = []
        self._handles: set[str] = set()
        #: every live record the planner wrote: uri -> (cid, value)
        self.records: dict[str, tuple[str, Json]] = {}
        self._root_of: dict[str, Json] = {}  # post uri -> strong ref of its thread root
        self._replies: dict[str, list[str]] = {}  # root uri -> reply uris
        self._quotes: dict[str, list[str]] = {}  # post uri -> uris of posts quoting it
        self._reposts: list[str] = []
        self._feedgens: list[str] = []
        self._modlists: list[str] = []
        self._starterpacks: list[str] = []
        self._labels: list[LabelIssue] = []
        self.counts: Counter[str] = Counter()

    # -- time ----------------------------------------------------------------------------

    def _tick(self, mean_us: float = 2_000_000.0) -> None:
        self.now_us += 1 + int(self.rng.expovariate(1.0 / mean_us))

    def _now(self) -> str:
        return iso_from_us(self.now_us)

    def _tid(self, actor: _Actor) -> str:
        self.now_us += 1 + self.rng.randrange(1000)
        return make_tid(self.now_us, actor.clock_id)

    # -- accounts ------------------------------------------------------------------------

    def _new_handle(self, pds: int) -> str:
        host = self.hostnames[pds]
        while True:
            name = self.rng.choice(_FIRST) + self.rng.choice(("", "-", "")) + self.rng.choice(_LAST)
            if self.rng.random() < 0.6:
                name += str(self.rng.randrange(1000))
            handle = f"{name}.{host}"
            if handle not in self._handles:
                self._handles.add(handle)
                return handle

    def new_account(self, pds: int | None = None) -> AccountCreate:
        """Plan a new account (spread over the PDSes); call :meth:`bind` once it exists."""
        index = len(self.actors)
        if pds is None:
            pds = index % len(self.hostnames) if self.rng.random() < 0.8 else self.rng.randrange(len(self.hostnames))
        handle = self._new_handle(pds)
        first = handle.split(".", 1)[0].rstrip("0123456789").replace("-", " ")
        display = first.title() if self.rng.random() < 0.9 else ""
        if display and self.rng.random() < 0.1:
            display += " " + self.rng.choice(_EMOJI)
        actor = _Actor(index, handle, pds, self.rng.randrange(1024), display)
        self.actors.append(actor)
        weight = 1.0 / self.rng.randint(1, max(index, 1)) ** self.zipf_s
        self._pop_cum.append((self._pop_cum[-1] if self._pop_cum else 0.0) + weight)
        activity = self.rng.lognormvariate(0.0, 0.9)
        self._act_cum.append((self._act_cum[-1] if self._act_cum else 0.0) + activity)
        curve = "p256" if self.rng.random() < 0.05 else "k256"
        return AccountCreate(index, handle, pds, curve)

    def bind(self, index: int, did: str) -> None:
        """Record the DID the PDS gave account ``index``; it becomes active."""
        actor = self.actors[index]
        actor.did = did
        actor.status = "active"

    def rebalance_popularity(self) -> None:
        """Re-draw Zipf popularity over all accounts (after a bulk creation)."""
        weights = _zipf_weights(len(self.actors), self.zipf_s, self.rng)
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        self._pop_cum = cum
        verifiers = sorted(range(len(weights)), key=lambda i: -weights[i])[: max(1, len(weights) // 200)]
        for i in verifiers:
            self.actors[i].verifier = True

    def _pick(self, cum: list[float]) -> _Actor:
        return self.actors[min(bisect_right(cum, self.rng.random() * cum[-1]), len(cum) - 1)]

    def _popular_actor(self, *, exclude: _Actor | None = None) -> _Actor | None:
        for _ in range(12):
            a = self._pick(self._pop_cum)
            if a is not exclude and a.status != "pending" and a.status != "deleted":
                return a
        return None

    def _active_writer(self) -> _Actor | None:
        for _ in range(20):
            a = self._pick(self._act_cum)
            if a.status == "active":
                return a
        active = [a for a in self.actors if a.status == "active"]
        return self.rng.choice(active) if active else None

    def _mentionable(self, exclude: _Actor) -> list[tuple[str, str]]:
        out = []
        for _ in range(3):
            a = self._popular_actor(exclude=exclude)
            if a is not None and (a.handle, a.did) not in out:
                out.append((a.handle, a.did))
        return out

    def _ref(self, uri: str) -> Json:
        return strong_ref(uri, self.records[uri][0])

    def _popular_post(self, *, exclude: _Actor | None = None, busy: set[str] | None = None) -> str | None:
        for _ in range(12):
            a = self._popular_actor(exclude=exclude)
            if a is None or not a.posts:
                continue
            n = len(a.posts)
            k = min(int(self.rng.paretovariate(1.2)) - 1, n - 1)
            uri = a.posts[n - 1 - k]
            if busy is None or uri not in busy:
                return uri
        return None

    # -- writes --------------------------------------------------------------------------

    def _blob(self, b: _Batch, blob: Blob) -> Blob:
        if blob.cid not in b.actor.uploaded:
            b.actor.uploaded.add(blob.cid)
            b.blobs.append(blob)
        return blob

    def _image(self, b: _Batch) -> Blob:
        return self._blob(b, self.rng.choice(self.blobs.images))

    def _put(self, b: _Batch, collection: str, value: Json, rkey: str | None = None) -> str:
        a = b.actor
        rkey = rkey or self._tid(a)
        uri = f"at://{a.did}/{collection}/{rkey}"
        cid = record_cid(value)
        action = "update" if uri in self.records else "create"
        self.records[uri] = (cid, value)
        b.writes.append((action, collection, rkey, value))
        b.cids.append(cid)
        b.busy.add(uri)
        self.counts[f"{action}:{collection}"] += 1
        return uri

    def _delete(self, b: _Batch, uri: str) -> None:
        _, _, rest = uri.partition("://")
        _, collection, rkey = rest.split("/", 2)
        del self.records[uri]
        b.writes.append(("delete", collection, rkey, None))
        b.cids.append(None)
        b.busy.add(uri)
        self.counts[f"delete:{collection}"] += 1

    def _pick_own(self, items: Sequence[str], b: _Batch) -> str | None:
        for _ in range(4):
            if not items:
                return None
            uri = self.rng.choice(items)
            if uri not in b.busy:
                return uri
        return None

    def _singleton(self, b: _Batch, collection: str, value: Json) -> bool:
        uri = f"at://{b.actor.did}/{collection}/self"
        if uri in b.busy:
            return False
        self._put(b, collection, value, "self")
        return True

    def _profile(self, b: _Batch, *, first: bool) -> bool:
        a = b.actor
        uri = f"at://{a.did}/app.bsky.actor.profile/self"
        old = self.records.get(uri)
        avatar = self._image(b) if self.rng.random() < 0.8 else None
        banner = self._image(b) if self.rng.random() < 0.4 else None
        pinned = None
        if not first and a.roots and self.rng.random() < 0.5:
            pinned = self._ref(self.rng.choice(a.roots))
        joined = None
        if first and self._starterpacks and self.rng.random() < 0.1:
            pack = self.rng.choice(self._starterpacks)
            # a starter pack can be deleted meanwhile (with its account): a strong ref needs a live CID
            joined = self._ref(pack) if pack in self.records else None
        elif old is not None and "joinedViaStarterPack" in old[1]:
            joined = old[1]["joinedViaStarterPack"]
        created = old[1].get("createdAt", self._now()) if old is not None else self._now()
        rec = profile_record(self.rng, a.display_name, created, avatar=avatar, banner=banner, pinned=pinned,
                             joined_via=joined)
        return self._singleton(b, "app.bsky.actor.profile", rec)

    def _post(self, b: _Batch, kind: str) -> bool:
        a = b.actor
        reply = None
        embed: Json | None = None
        if kind == "reply":
            parent = self._reply_parent(a, b)
            if parent is None:
                kind = "post"
            else:
                reply = (self._root_of[parent], self._ref(parent))
        if kind == "quote":
            target = self._popular_post(busy=b.busy)
            if target is None:
                kind = "post"
            else:
                ref = self._ref(target)
                embed = record_with_media_embed(ref, self._media(b)) if self.rng.random() < 0.3 else record_embed(ref)
        elif self.rng.random() < (0.35 if reply is None else 0.12):
            embed = self._media(b) if self.rng.random() < 0.95 else self._record_card_embed()
        rec = post_record(self.rng, self._now(), mentionable=self._mentionable(a), reply=reply, embed=embed,
                          allow_empty=embed is not None)
        uri = self._put(b, "app.bsky.feed.post", rec)
        a.posts.append(uri)
        if reply is None:
            a.roots.append(uri)
            self._root_of[uri] = self._ref(uri)
        else:
            self._root_of[uri] = reply[0]
            self._replies.setdefault(reply[0]["uri"], []).append(uri)
        if kind == "quote" and embed is not None:
            quoted = embed["record"]["record"]["uri"] if embed["$type"].endswith("recordWithMedia") else embed["record"]["uri"]
            self._quotes.setdefault(quoted, []).append(uri)
        return True

    def _reply_parent(self, a: _Actor, b: _Batch) -> str | None:
        r = self.rng.random()
        if r < 0.1 and a.posts:  # continue one's own thread
            return self._pick_own(a.posts[-5:], b)
        if r < 0.55:  # go deeper into an existing conversation
            root = self._popular_post(busy=b.busy)
            if root is not None:
                thread = self._replies.get(self._root_of[root]["uri"])
                live = [u for u in thread[-20:] if u in self.records and u not in b.busy] if thread else []
                if live:
                    return self.rng.choice(live)
                return root
        return self._popular_post(exclude=a, busy=b.busy)

    def _media(self, b: _Batch) -> Json:
        r = self.rng.random()
        if r < 0.6:
            imgs = [self._image(b) for _ in range(self.rng.choices((1, 2, 3, 4), weights=(60, 20, 10, 10))[0])]
            return images_embed(self.rng, imgs)
        if r < 0.82:
            thumb = self._image(b) if self.rng.random() < 0.6 else None
            return external_embed(self.rng, thumb)
        if r < 0.97:
            video = self._blob(b, self.rng.choice(self.blobs.videos))
            caps = []
            if self.rng.random() < 0.3:
                caps = [(lang, self._blob(b, self.rng.choice(self.blobs.captions)))
                        for lang in self.rng.sample(("en", "ja", "pt-BR"), self.rng.randint(1, 2))]
            return video_embed(self.rng, video, caps)
        imgs = [self._image(b) for _ in range(self.rng.randint(2, 8))]
        return gallery_embed(self.rng, imgs)

    def _record_card_embed(self) -> Json | None:
        pools = [p for p in (self._feedgens, self._starterpacks, self._modlists) if p]
        if not pools:
            return None
        uri = self.rng.choice(self.rng.choice(pools))
        return record_embed(self._ref(uri)) if uri in self.records else None

    def _write(self, b: _Batch, kind: str) -> bool:
        """One write of ``kind`` (possibly several records); False when it does not apply now."""
        a = b.actor
        rng = self.rng
        uri: str | None
        if kind in ("post", "reply", "quote"):
            return self._post(b, kind)
        if kind == "like" or kind == "repost":
            via = None
            target: str | None = None
            if self._reposts and rng.random() < 0.15:  # saw it reposted by someone
                rp = self._reposts[-1 - min(int(rng.paretovariate(1.0)) - 1, len(self._reposts) - 1)]
                if rp in self.records and rp not in b.busy:
                    subject = self.records[rp][1]["subject"]
                    if subject["uri"] in self.records:
                        target, via = subject["uri"], self._ref(rp)
            if target is None:
                target = self._popular_post(busy=b.busy)
            if target is None:
                return False
            subj = self._ref(target)
            if kind == "like":
                a.likes.append(self._put(b, "app.bsky.feed.like", like_record(subj, self._now(), via)))
            else:
                uri = self._put(b, "app.bsky.feed.repost", repost_record(subj, self._now(), via))
                a.reposts.append(uri)
                self._reposts.append(uri)
            return True
        if kind == "follow":
            t = self._popular_actor(exclude=a)
            if t is None or t.did in a.follows:
                return False
            via = None
            if self._starterpacks and rng.random() < 0.05:
                sp = rng.choice(self._starterpacks)
                via = self._ref(sp) if sp in self.records else None
            a.follows[t.did] = self._put(b, "app.bsky.graph.follow", follow_record(t.did, self._now(), via))
            return True
        if kind in ("unlike", "unrepost", "delete_post"):
            items = {"unlike": a.likes, "unrepost": a.reposts, "delete_post": a.posts}[kind]
            uri = self._pick_own(items, b)
            if uri is None:
                return False
            items.remove(uri)
            if kind == "delete_post" and uri in a.roots:
                a.roots.remove(uri)
            self._delete(b, uri)
            return True
        if kind == "unfollow" or kind == "unblock":
            rels = a.follows if kind == "unfollow" else a.blocks
            if not rels:
                return False
            subject = rng.choice(list(rels))  # insertion order: DIDs differ between runs
            if rels[subject] in b.busy:
                return False
            self._delete(b, rels.pop(subject))
            return True
        if kind == "block":
            t = self._popular_actor(exclude=a) if rng.random() < 0.3 else rng.choice(self.actors)
            if t is None or t is a or not t.did or t.did in a.blocks:
                return False
            a.blocks[t.did] = self._put(b, "app.bsky.graph.block", block_record(t.did, self._now()))
            return True
        if kind == "list":
            purpose = rng.choice(("curate", "curate", "mod"))
            avatar = self._image(b) if rng.random() < 0.3 else None
            uri = self._put(b, "app.bsky.graph.list",
                            list_record(rng, purpose, self._now(), avatar=avatar, mentionable=self._mentionable(a)))
            a.lists.append(uri)
            if purpose == "mod":
                self._modlists.append(uri)
            return True
        if kind == "listitem":
            lst = self._pick_own(a.lists, b)
            t = self._popular_actor()
            if lst is None or t is None:
                return False
            a.listitems.append(self._put(b, "app.bsky.graph.listitem", listitem_record(t.did, lst, self._now())))
            return True
        if kind == "delete_listitem":
            uri = self._pick_own(a.listitems, b)
            if uri is None:
                return False
            a.listitems.remove(uri)
            self._delete(b, uri)
            return True
        if kind == "listblock":
            theirs = [u for u in self._modlists[-50:] if u in self.records and f"at://{a.did}/" not in u]
            if not theirs:
                return False
            a.listblocks.append(self._put(b, "app.bsky.graph.listblock", listblock_record(rng.choice(theirs), self._now())))
            return True
        if kind == "feedgen":
            base = rng.choice(_WORDS) + ("-" + rng.choice(_WORDS) if rng.random() < 0.5 else "")
            slug, n = base, 2
            while slug in a.feed_slugs:
                slug, n = f"{base}-{n}", n + 1
            a.feed_slugs.add(slug)
            avatar = self._image(b) if rng.random() < 0.5 else None
            service = f"did:web:feeds{rng.randrange(5)}.example.com"
            rec = feed_generator_record(rng, service, slug.replace("-", " ").title(), self._now(), avatar=avatar,
                                        mentionable=self._mentionable(a))
            uri = self._put(b, "app.bsky.feed.generator", rec, slug)
            a.feedgens.append(uri)
            self._feedgens.append(uri)
            return True
        if kind in ("update_feedgen", "update_list"):
            uri = self._pick_own(a.feedgens if kind == "update_feedgen" else a.lists, b)
            if uri is None:
                return False
            old = dict(self.records[uri][1])
            if kind == "update_feedgen":
                old["description"] = " ".join(rng.choices(_WORDS, k=rng.randint(3, 20)))
                old.pop("descriptionFacets", None)
                collection = "app.bsky.feed.generator"
            else:
                old["name"] = " ".join(rng.choices(_WORDS, k=rng.randint(1, 4))).title()[:64]
                collection = "app.bsky.graph.list"
            self._put(b, collection, old, uri.rsplit("/", 1)[1])
            return True
        if kind == "starterpack":
            list_uri = self._put(b, "app.bsky.graph.list", list_record(rng, "reference", self._now()))
            picked = (self._popular_actor(exclude=a) for _ in range(rng.randint(3, 8)))
            for did in dict.fromkeys(t.did for t in picked if t is not None):
                a.listitems.append(self._put(b, "app.bsky.graph.listitem", listitem_record(did, list_uri, self._now())))
            feeds = rng.sample(self._feedgens[-20:], min(len(self._feedgens[-20:]), rng.randint(0, 3)))
            uri = self._put(b, "app.bsky.graph.starterpack", starterpack_record(rng, list_uri, feeds, self._now()))
            a.starterpacks.append(uri)
            self._starterpacks.append(uri)
            return True
        if kind in ("threadgate", "update_threadgate"):
            if kind == "threadgate":
                candidates = [u for u in a.roots[-20:] if u not in a.threadgates]
                post = self._pick_own(candidates, b)
            else:
                post = self._pick_own(list(a.threadgates), b)
            if post is None:
                return False
            replies = [u for u in self._replies.get(post, []) if f"at://{a.did}/" not in u]
            hidden = rng.sample(replies, min(len(replies), rng.randint(0, 3))) if replies else []
            if kind == "update_threadgate":
                old = self.records[a.threadgates[post]][1]
                hidden = list(dict.fromkeys(old.get("hiddenReplies", []) + hidden))
            curate = [u for u in a.lists if self.records[u][1]["purpose"].endswith("curatelist")]
            rec = threadgate_record(rng, post, self._now(), lists=curate, hidden=hidden)
            rkey = post.rsplit("/", 1)[1]
            tg = f"at://{a.did}/app.bsky.feed.threadgate/{rkey}"
            if tg in b.busy:
                return False
            a.threadgates[post] = self._put(b, "app.bsky.feed.threadgate", rec, rkey)
            return True
        if kind == "postgate":
            candidates = [u for u in a.posts[-20:] if u not in a.postgates]
            post = self._pick_own(candidates, b)
            if post is None:
                return False
            quotes = [u for u in self._quotes.get(post, []) if u in self.records]
            detached = rng.sample(quotes, min(len(quotes), rng.randint(1, 3))) if quotes else []
            rec = postgate_record(rng, post, self._now(), detached=detached)
            a.postgates[post] = self._put(b, "app.bsky.feed.postgate", rec, post.rsplit("/", 1)[1])
            return True
        if kind == "profile_update":
            return self._profile(b, first=False)
        if kind == "verification":
            if not a.verifier:
                return False
            t = self._popular_actor(exclude=a)
            if t is None:
                return False
            prof = self.records.get(f"at://{t.did}/app.bsky.actor.profile/self")
            name = str(prof[1].get("displayName", "")) if prof else ""
            rec = verification_record(t.did, t.handle, name or t.handle.split(".")[0], self._now())
            a.verifications.append(self._put(b, "app.bsky.graph.verification", rec))
            return True
        if kind == "status":
            thumb = self._image(b) if rng.random() < 0.5 else None
            return self._singleton(b, "app.bsky.actor.status", status_record(rng, self._now(), thumb=thumb))
        if kind == "delete_status":
            uri = f"at://{a.did}/app.bsky.actor.status/self"
            if uri not in self.records or uri in b.busy:
                return False
            self._delete(b, uri)
            return True
        if kind == "declaration":
            choice = rng.random()
            if choice < 0.5:
                return self._singleton(b, "chat.bsky.actor.declaration", chat_declaration_record(rng))
            if choice < 0.85:
                return self._singleton(b, "app.bsky.notification.declaration", notification_declaration_record(rng))
            return self._singleton(b, "app.bsky.actor.contentVisibilityDeclaration", content_visibility_record(rng))
        raise ValueError(f"unknown write kind {kind!r}")

    def _finish(self, b: _Batch) -> WriteBatch:
        return WriteBatch(b.actor.index, tuple(b.writes), tuple(b.cids), tuple(b.blobs))

    def initial_batch(self, index: int) -> WriteBatch:
        """What a new account writes first: profile and the declaration records."""
        a = self.actors[index]
        b = _Batch(a)
        self._tick()
        self._profile(b, first=True)
        if self.rng.random() < 0.6:
            self._singleton(b, "chat.bsky.actor.declaration", chat_declaration_record(self.rng))
        if self.rng.random() < 0.3:
            self._singleton(b, "app.bsky.notification.declaration", notification_declaration_record(self.rng))
        if self.rng.random() < 0.05:
            self._singleton(b, "app.bsky.actor.contentVisibilityDeclaration", content_visibility_record(self.rng))
        if self.rng.random() < 0.02:
            self._singleton(b, "app.bsky.labeler.service", labeler_service_record(self.rng, self._now()))
        return self._finish(b)

    def write_batch(self, index: int, size: int, *, mean_gap_us: float = 2_000_000.0) -> WriteBatch:
        """About ``size`` random writes by account ``index`` in one commit (at least one)."""
        a = self.actors[index]
        if a.status != "active":
            raise ValueError(f"account {index} is {a.status}; it cannot write")
        b = _Batch(a)
        attempts = 0
        while len(b.writes) < size and attempts < size * 4:
            attempts += 1
            self._tick(mean_gap_us)
            kind = _WRITE_NAMES[bisect_right(_WRITE_CUM, self.rng.random() * _WRITE_CUM[-1])]
            if a.verifier and self.rng.random() < 0.03:
                kind = "verification"
            if not self._write(b, kind):
                for fallback in ("like", "follow", "post"):
                    if self._write(b, fallback):
                        break
        if not b.writes:
            self._write(b, "post")
        return self._finish(b)

    def seed_batches(self, records_per_account: int, *, history_days: float = 60.0) -> Iterator[WriteBatch]:
        """The history of every bound account: about ``records_per_account`` writes each
        (activity varies by account), in rounds of one commit per account, spread over
        ``history_days`` of synthetic time from the current clock on."""
        actors = [a for a in self.actors if a.status == "active"]
        if not actors:
            return
        weights = [self.rng.lognormvariate(0.0, 0.8) for _ in actors]
        mean = sum(weights) / len(weights)
        quota = {a.index: max(2, round(records_per_account * w / mean)) for a, w in zip(actors, weights, strict=True)}
        total = sum(quota.values())
        gap = history_days * 86_400e6 / max(total, 1)
        for a in actors:
            batch = self.initial_batch(a.index)
            quota[a.index] -= len(batch.writes)
            yield batch
        while True:
            pending = [a for a in actors if quota[a.index] > 0 and a.status == "active"]
            if not pending:
                break
            self.rng.shuffle(pending)
            for a in pending:
                size = min(quota[a.index], self.rng.choices((1, 2, 3, 5, 8, 13, 25), weights=(30, 20, 15, 12, 10, 8, 5))[0])
                batch = self.write_batch(a.index, size, mean_gap_us=gap)
                quota[a.index] -= len(batch.writes)
                yield batch

    # -- identity and moderation events ----------------------------------------------------

    def handle_change(self, index: int | None = None) -> HandleChange | None:
        a = self.actors[index] if index is not None else self._active_writer()
        if a is None or a.status != "active":
            return None
        self._handles.discard(a.handle)
        a.handle = self._new_handle(a.pds)
        return HandleChange(a.index, a.handle)

    TRANSITIONS: dict[str, tuple[str, ...]] = {
        "deactivated": ("active",),
        "takendown": ("active", "deactivated"),
        "suspended": ("active",),
        "deleted": ("active", "deactivated"),
        "active": ("deactivated", "takendown", "suspended"),
    }

    def status_change(self, status: str, index: int | None = None) -> StatusChange | None:
        """Move an account (``index``, or a random eligible one) to ``status``."""
        sources = self.TRANSITIONS[status]
        if index is not None:
            a: _Actor | None = self.actors[index]
        else:
            eligible = [x for x in self.actors if x.status in sources]
            a = self.rng.choice(eligible) if eligible else None
        if a is None or a.status not in sources:
            return None
        a.status = status
        if status == "deleted":
            for uri in [u for u in self.records if u.startswith(f"at://{a.did}/")]:
                del self.records[uri]
            # new profiles and follows join via these: keep only starter packs that still exist
            gone = set(a.starterpacks)
            self._starterpacks = [u for u in self._starterpacks if u not in gone]
            for lst in (a.posts, a.roots, a.likes, a.reposts, a.lists, a.listitems, a.listblocks, a.feedgens,
                        a.starterpacks, a.verifications):
                lst.clear()
            a.follows.clear()
            a.blocks.clear()
            a.threadgates.clear()
            a.postgates.clear()
        return StatusChange(a.index, status)

    def label(self) -> LabelIssue | None:
        """A label on a popular post, account or profile; sometimes a negation or with expiry."""
        rng = self.rng
        if self._labels and rng.random() < 0.15:
            old = rng.choice(self._labels)
            if not old.neg:
                issue = LabelIssue(old.uri, old.val, old.cid, True)
                self._labels.append(issue)
                return issue
        r = rng.random()
        cid = None
        if r < 0.6:
            uri = self._popular_post()
            if uri is None:
                return None
            cid = self.records[uri][0]
        else:
            a = self._popular_actor()
            if a is None:
                return None
            uri = a.did
            prof = f"at://{a.did}/app.bsky.actor.profile/self"
            if r > 0.85 and prof in self.records:
                uri, cid = prof, self.records[prof][0]
        exp = None
        e = rng.random()
        if e < 0.05:
            exp = iso_from_us(self.now_us + rng.randint(1, 30) * 86_400_000_000)  # soon after synthetic now
        elif e < 0.1:
            exp = "2099-01-01T00:00:00.000Z"
        issue = LabelIssue(uri, rng.choice(_LABEL_VALS), cid, False, exp)
        self._labels.append(issue)
        return issue

    def live_event(self) -> Event:
        """The next live event: mostly small write batches, rarely identity/moderation changes."""
        rng = self.rng
        self._tick()
        while True:
            r = rng.random()
            ev: Event | None
            if r < 0.004:
                ev = self.new_account()
            elif r < 0.008:
                ev = self.handle_change()
            elif r < 0.010:
                ev = self.status_change("deactivated")
            elif r < 0.012:
                ev = self.status_change("active")
            elif r < 0.013:
                ev = self.status_change("takendown")
            elif r < 0.0135:
                ev = self.status_change("suspended")
            elif r < 0.0143:
                ev = self.status_change("deleted")
            elif r < 0.05:
                ev = self.label()
            else:
                a = self._active_writer()
                if a is None:
                    ev = self.new_account()
                else:
                    size = 1 if rng.random() < 0.8 else rng.randint(2, 6)
                    ev = self.write_batch(a.index, size)
            if ev is not None:
                return ev


# --- offline simulation -------------------------------------------------------------------


def fake_did(index: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    chars = []
    for _ in range(24):
        chars.append(alphabet[index & 31])
        index >>= 5
    return "did:plc:" + "".join(reversed(chars))


def simulate(
    seed: int, *, accounts: int = 20, records_per_account: int = 20, live_events: int = 0,
    hostnames: Sequence[str] = ("pds1.test",), events: list[Event] | None = None,
) -> Manifest:
    """Run a workload without a network (fake DIDs, CIDs computed locally) and return its
    manifest; ``events`` collects every event. For tests and planner benchmarks."""
    planner = Planner(seed, hostnames)
    manifest = Manifest()
    sink = events if events is not None else []
    labeler = "did:web:labeler.test"

    def create(ev: AccountCreate) -> None:
        did = fake_did(ev.index)
        planner.bind(ev.index, did)
        manifest.add_account(did, ev.handle, f"http://{hostnames[ev.pds]}")

    def apply(ev: Event) -> None:
        sink.append(ev)
        if isinstance(ev, AccountCreate):
            create(ev)
            apply(planner.initial_batch(ev.index))
        elif isinstance(ev, WriteBatch):
            did = planner.actors[ev.index].did
            manifest.apply_ops(did, [(w[0], f"{w[1]}/{w[2]}", c, w[3]) for w, c in zip(ev.writes, ev.cids, strict=True)])
        elif isinstance(ev, HandleChange):
            manifest.set_handle(planner.actors[ev.index].did, ev.handle)
        elif isinstance(ev, StatusChange):
            manifest.set_status(planner.actors[ev.index].did, ev.status)
        else:
            manifest.add_label(labeler, ev.uri, ev.val, cid=ev.cid, neg=ev.neg, exp=ev.exp)

    for _ in range(accounts):
        ev = planner.new_account()
        sink.append(ev)
        create(ev)
    planner.rebalance_popularity()
    for batch in planner.seed_batches(records_per_account):
        apply(batch)
    for _ in range(live_events):
        apply(planner.live_event())
    return manifest


# --- the workload on a live network -------------------------------------------------------


class NetworkLike(Protocol):
    """What :class:`Workload` needs from a network (a :class:`psky.devnet.network.Devnet`)."""

    @property
    def pdses(self) -> Sequence[Pds]: ...

    @property
    def labeler(self) -> Labeler | None: ...


def derived_key(seed: int, index: int, role: str, curve: Literal["k256", "p256"]) -> PrivateKey:
    """A private key derived from the workload seed, so accounts get the same keys every run
    (their DIDs then only differ when the PDS URLs differ)."""
    for n in range(64):
        secret = hashlib.sha256(f"psky-devnet:{seed}:{index}:{role}:{n}".encode()).digest()
        try:
            return PrivateKey.from_bytes(secret, curve)
        except ValueError:  # scalar out of range: astronomically rare, try the next one
            continue
    raise WorkloadError("could not derive a key")  # pragma: no cover


class Workload:
    """Drives a running devnet with the :class:`Planner`'s events and keeps ``manifest``
    equal to what the servers acknowledged. Events are applied one at a time, in order;
    every CID and blob ref a server returns is checked against the planner's."""

    def __init__(self, network: NetworkLike, seed: int = 0, *, epoch: str = DEFAULT_EPOCH) -> None:
        self.network = network
        self.seed_value = seed
        hostnames = [p.hostname for p in network.pdses]
        self.planner = Planner(seed, hostnames, epoch=epoch)
        self.manifest = Manifest()
        self.events = 0
        self.stats: Counter[str] = Counter()
        self._dids: dict[int, str] = {}

    # -- applying events -----------------------------------------------------------------

    def _pds(self, index: int) -> Pds:
        return self.network.pdses[self.planner.actors[index].pds]

    def did(self, index: int) -> str:
        """DID of the planner's account ``index``."""
        return self._dids[index]

    async def _create(self, ev: AccountCreate, *, register: bool = True) -> str:
        pds = self.network.pdses[ev.pds]
        curve: Literal["k256", "p256"] = "p256" if ev.curve == "p256" else "k256"
        account = await pds.create_account(
            ev.handle,
            key_curve=curve,
            signing_key=derived_key(self.seed_value, ev.index, "signing", curve),
            rotation_key=derived_key(self.seed_value, ev.index, "rotation", curve),
        )
        if account.handle != ev.handle:
            raise WorkloadError(f"{pds.url} created {account.handle} for {ev.handle}")
        self._dids[ev.index] = account.did
        self.stats["accounts"] += 1
        if register:
            self._register(ev)
        return account.did

    def _register(self, ev: AccountCreate) -> None:
        """Bind the new account in the planner and add it to the manifest (in planner order)."""
        did = self._dids[ev.index]
        self.planner.bind(ev.index, did)
        self.manifest.add_account(did, ev.handle, self.network.pdses[ev.pds].url)

    async def apply(self, ev: Event) -> None:
        """Apply one event to the network and the manifest."""
        self.events += 1
        if isinstance(ev, AccountCreate):
            await self._create(ev)
            await self.apply(self.planner.initial_batch(ev.index))
        elif isinstance(ev, WriteBatch):
            await self._write(ev)
        elif isinstance(ev, HandleChange):
            did = self._dids[ev.index]
            await self._pds(ev.index).update_handle(did, ev.handle)
            self.manifest.set_handle(did, ev.handle)
            self.stats["handle_changes"] += 1
        elif isinstance(ev, StatusChange):
            did = self._dids[ev.index]
            active = ev.status == "active"
            await self._pds(ev.index).set_status(did, active, None if active else ev.status)
            self.manifest.set_status(did, ev.status)
            self.stats[f"status:{ev.status}"] += 1
        else:
            await self._label(ev)

    async def _write(self, ev: WriteBatch) -> None:
        did = self._dids[ev.index]
        pds = self._pds(ev.index)
        for blob in ev.blobs:
            ref = pds.put_blob(did, blob.data, blob.mime)
            if ref != blob.ref:
                raise WorkloadError(f"{pds.url} stored a blob of {did} as {ref!r}, expected {blob.ref!r}")
            self.stats["blobs"] += 1
        result = await pds.apply_writes(did, ev.writes)
        if len(result.ops) != len(ev.writes):
            raise WorkloadError(f"{pds.url} applied {len(result.ops)} ops for {len(ev.writes)} writes of {did}")
        applied = []
        for op, (action, collection, rkey, value), cid in zip(result.ops, ev.writes, ev.cids, strict=True):
            path = f"{collection}/{rkey}"
            got = op.cid.encode() if op.cid is not None else None
            if op.action != action or op.path != path or got != cid:
                raise WorkloadError(f"{pds.url} acknowledged {op.action} {op.path} {got} for {action} {path} {cid}")
            applied.append((action, path, cid, value))
        self.manifest.apply_ops(did, applied)
        self.stats["commits"] += 1
        self.stats["writes"] += len(applied)

    def _index(self, did: str) -> int:
        for index, known in self._dids.items():
            if known == did:
                return index
        raise KeyError(f"{did} is not an account of this workload")

    async def set_status(self, status: str, did: str | None = None) -> str | None:
        """Move account ``did`` (default: a random eligible one) to ``status`` (``active``,
        ``deactivated``, ``takendown``, ``suspended``, ``deleted``); returns its DID, or None
        when no account can make that transition."""
        if status not in self.planner.TRANSITIONS:
            raise ValueError(f"unknown account status {status!r}")
        ev = self.planner.status_change(status, None if did is None else self._index(did))
        if ev is None:
            return None
        await self.apply(ev)
        return self._dids[ev.index]

    async def change_handle(self, did: str | None = None) -> str | None:
        """Give account ``did`` (default: a random active one) a new handle; returns it."""
        ev = self.planner.handle_change(None if did is None else self._index(did))
        if ev is None:
            return None
        await self.apply(ev)
        return ev.handle

    async def _label(self, ev: LabelIssue) -> None:
        labeler = self.network.labeler
        if labeler is None:
            return
        label = await labeler.label(ev.uri, ev.val, cid=ev.cid, neg=ev.neg, exp=ev.exp)
        self.manifest.add_label(label.src, ev.uri, ev.val, cid=ev.cid, neg=ev.neg, exp=ev.exp)
        self.stats["labels"] += 1

    # -- modes ---------------------------------------------------------------------------

    async def seed(
        self,
        accounts: int = 100,
        records_per_account: int = 50,
        *,
        churn: float = 0.03,
        labels: int | None = None,
        concurrency: int = 32,
        history_days: float = 60.0,
    ) -> Manifest:
        """Create ``accounts`` accounts spread over the PDSes, then their history (about
        ``records_per_account`` writes each, in commits of 1-25 writes); then handle changes
        and status changes for about ``churn`` of the accounts, and ``labels`` labels
        (default: one per five accounts). Returns the manifest."""
        started = time.perf_counter()
        creates = [self.planner.new_account() for _ in range(accounts)]
        sem = asyncio.Semaphore(max(1, concurrency))

        async def create(ev: AccountCreate) -> None:
            async with sem:
                await self._create(ev, register=False)

        await asyncio.gather(*(create(ev) for ev in creates))
        for create_ev in creates:  # in planner order, whatever order the PLC answered in
            self._register(create_ev)
        self.events += len(creates)
        self.planner.rebalance_popularity()
        for i, batch in enumerate(self.planner.seed_batches(records_per_account, history_days=history_days)):
            await self.apply(batch)
            if i % 16 == 0:  # let the relay and other subscribers keep up with the PDS firehoses
                await asyncio.sleep(0)
        rng = self.planner.rng
        for _ in range(round(accounts * churn)):
            status = rng.choices(("handle", "deactivated", "takendown", "suspended", "deleted"),
                                 weights=(40, 25, 15, 10, 10))[0]
            change: Event | None = (
                self.planner.handle_change() if status == "handle" else self.planner.status_change(status)
            )
            if change is not None:
                await self.apply(change)
        for _ in range(accounts // 5 if labels is None else labels):
            issue = self.planner.label()
            if issue is not None:
                await self.apply(issue)
        log.info("seeded %d accounts, %d writes in %d commits, %d blobs in %.1fs", accounts, self.stats["writes"],
                 self.stats["commits"], self.stats["blobs"], time.perf_counter() - started)
        return self.manifest

    async def live(self, rate: float | None = 50.0, duration: float | None = None, events: int | None = None) -> int:
        """Apply live events at ``rate`` events/s (None: as fast as possible) until
        ``duration`` seconds passed or ``events`` events were applied; returns the count."""
        if duration is None and events is None:
            raise ValueError("live() needs duration= or events=")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while (events is None or n < events) and (duration is None or loop.time() - start < duration):
            await self.apply(self.planner.live_event())
            n += 1
            if rate is not None:
                delay = start + n / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue
            if n % 64 == 0:
                await asyncio.sleep(0)
        return n
