"""Datetime normalization as the TypeScript AppView does it (``normalizeDatetimeAlways``)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_TZ = re.compile(r".*(([+-]\d\d:?\d\d)|[a-zA-Z])$")


def _iso(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def to_iso_utc(value: str) -> str | None:
    """``value`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (JavaScript's ``toISOString``), assuming UTC
    when no timezone is given; None when it does not parse."""
    if len(value) > 64:
        return None
    text = value.strip()
    if not _TZ.match(text):
        text += "Z"
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return _iso(dt)
    except (OverflowError, ValueError):
        return None
