"""The terminal view of a running pipeline (``psky demo``, ``psky run``).

It condenses a :func:`psky.ops.status.collect` snapshot (with rates) and the children's log
counts into a dozen lines: per stage the stream depth, entries in per second, and for each
consumer group entries read per second, lag and pending; cursors against the sources'
heads; rows indexed; process health and errors. On a terminal the block is redrawn in place;
otherwise one progress line is printed per call, so logs and CI output stay readable.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from psky.ops.pipeline import Pipeline
from psky.streams import FIREHOSE_BACKFILL, FIREHOSE_LIVE, LABEL_LIVE, REPO_BACKFILL, cursor_key

__all__ = ["LiveView", "ViewState", "current_cursors", "progress_line", "render", "throughput_lines"]

#: streams in data-flow order, with the stage that writes them
_STAGES = ((REPO_BACKFILL, "ingester (listRepos)"), (FIREHOSE_LIVE, "ingester (firehose)"),
           (FIREHOSE_BACKFILL, "backfiller"), (LABEL_LIVE, "ingester (labels)"))
#: per service kind: (metric, what one unit is) shown as rate and total
_THROUGHPUT = (
    ("ingester", (("firehose_ingester_incoming_events_total", "frames"),
                  ("firehose_ingester_stream_events_total", "events queued"),
                  ("ingester_repos_enumerated_total", "repos listed"))),
    ("backfiller", (("backfiller_repos_processed_total", "repos"),
                    ("backfiller_records_extracted_total", "records"))),
    ("indexer", (("stream_indexer_messages_processed_total", "events"),
                 ("label_indexer_messages_processed_total", "labels"),
                 ("stream_indexer_messages_failed_total", "failed"))),
)
#: (label, table) of the row counts shown
_ROWS = (("accounts", "actor"), ("posts", "post"), ("likes", "like"), ("reposts", "repost"),
         ("follows", "follow"), ("labels", "label"), ("records", "record"))


@dataclass(slots=True)
class ViewState:
    """What the orchestrator knows beyond the snapshot."""

    title: str
    phase: str = "starting"
    elapsed_s: float = 0.0
    #: source heads per cursor stream (``firehose_live`` → relay seq, ``label_live`` → labeler seq)
    heads: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: the (stream, host) cursors of this run (others, from earlier runs, are not shown)
    cursors: set[tuple[str, str]] = field(default_factory=set)
    #: the services' metrics per kind (ingester, backfiller, indexer), and their per-second rates
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    rates: dict[str, dict[str, float]] = field(default_factory=dict)

    def update_metrics(self, metrics: dict[str, dict[str, float]], seconds: float) -> None:
        """New totals; rates from the previous ones (counters that went back mean a restart)."""
        if seconds > 0 and self.metrics:
            self.rates = {kind: {name: max(value - self.metrics.get(kind, {}).get(name, value), 0.0) / seconds
                                 for name, value in values.items()}
                          for kind, values in metrics.items()}
        self.metrics = metrics


def current_cursors(snapshot: Mapping[str, Any], wanted: set[tuple[str, str]]) -> list[Mapping[str, Any]]:
    """The snapshot's cursors, only those in *wanted* when it is not empty."""
    found = (snapshot.get("redis") or {}).get("cursors", ())
    keys = {cursor_key(stream, host) for stream, host in wanted}  # keys drop the host's scheme
    return [c for c in found if not keys or cursor_key(c["stream"], c["host"]) in keys]


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _r(value: Any) -> str:
    return "" if value is None else f"{max(value, 0.0):,.1f}"


def _streams(snapshot: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    redis = snapshot.get("redis") or {}
    return {s["stream"]: s for s in redis.get("streams", ())}


def _rows(snapshot: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    pg = snapshot.get("postgres") or {}
    return {t["table"]: t for t in pg.get("tables", ())}


def _cursor_texts(snapshot: Mapping[str, Any], state: ViewState) -> list[str]:
    heads = state.heads
    parts = []
    for c in current_cursors(snapshot, state.cursors):
        stream, host = c["stream"], c["host"].split("://")[-1]
        if stream == REPO_BACKFILL:
            parts.append(f"listRepos {host}: " + {"done": "done", "none": "starting"}.get(c["state"], "listing"))
        elif c.get("seq") is not None:
            head = heads.get(stream)
            behind = f" ({max(head - c['seq'], 0):,} behind head)" if head is not None else ""
            parts.append(f"{stream} {host}: seq {c['seq']:,}{behind}")
    return parts


def throughput_lines(state: ViewState) -> list[str]:
    """Per stage: events per second and totals, from the services' own counters."""
    lines = []
    for kind, figures in _THROUGHPUT:
        totals = state.metrics.get(kind)
        if not totals:
            continue
        rates = state.rates.get(kind, {})
        parts = []
        for metric, unit in figures:
            if metric not in totals:
                continue
            rate = rates.get(metric)
            parts.append(f"{_r(rate) or '-'} {unit}/s ({totals[metric]:,.0f})")
        name = f"{kind}s" if kind != "ingester" else kind
        lines.append(f"  {name + ':':<12} " + " · ".join(parts))
    return lines


def render(snapshot: Mapping[str, Any], pipeline: Pipeline | None, state: ViewState) -> list[str]:
    """The full view as lines."""
    lines = [f"{state.title} · {state.elapsed_s:5.0f}s · {state.phase}"]
    lines.extend(f"  {note}" for note in state.notes)
    lines.extend(throughput_lines(state))
    redis = snapshot.get("redis") or {}
    if "error" in redis:
        lines.append(f"  Redis unavailable: {redis['error']}")
    else:
        lines.append(f"  {'STAGE':<21} {'STREAM':<18} {'LENGTH':>8} {'IN/s':>8}  "
                     f"{'GROUP':<20} {'READ/s':>8} {'LAG':>7} {'PENDING':>7}")
        streams = _streams(snapshot)
        for name, stage in _STAGES:
            s = streams.get(name) or {}
            groups = s.get("groups") or [{}]
            for i, g in enumerate(groups):
                head = (f"  {stage:<21} {name:<18} {_n(s.get('length', 0)):>8} {_r(s.get('rate_in')):>8}"
                        if i == 0 else " " * 60)
                lines.append(f"{head}  {g.get('name', '(no group yet)'):<20} {_r(g.get('rate_read')):>8} "
                             f"{_n(g.get('lag')):>7} {_n(g.get('pending')):>7}".rstrip())
        dlq = [f"{s['stream']} {s['length']:,}" for s in streams.values()
               if s["stream"].endswith("_dlq") and s.get("exists") and s.get("length")]
        lines.append("  dead letters: " + (", ".join(dlq) if dlq else "none"))
        for cursor in _cursor_texts(snapshot, state):
            lines.append(f"  cursor {cursor}")
    pg = snapshot.get("postgres")
    if pg is not None:
        if "error" in pg:
            lines.append(f"  PostgreSQL unavailable: {pg['error']}")
        else:
            rows = _rows(snapshot)
            parts = []
            for label, table in _ROWS:
                t = rows.get(table)
                if t is None:
                    continue
                rate = f" (+{t['rate']:,.0f}/s)" if t.get("rate") else ""
                parts.append(f"{label} {_n(t['rows'])}{rate}")
            lines.append("  indexed: " + " · ".join(parts))
    if pipeline is not None:
        procs = " ".join(f"{c.name}:{'up' if c.returncode is None else f'exited {c.returncode}'}"
                         for c in pipeline.children)
        lines.append(f"  processes: {procs} · errors {pipeline.errors} · warnings {pipeline.warnings}")
        last = next((c for c in pipeline.children if c.last_problem), None)
        if last is not None:
            lines.append(f"  last problem ({last.name}): {last.last_problem}")
    for warning in snapshot.get("warnings", ())[:2]:
        lines.append(f"  WARNING: {warning[:160]}")
    return lines


def progress_line(snapshot: Mapping[str, Any], pipeline: Pipeline | None, state: ViewState) -> str:
    """The view as one line (no terminal)."""
    parts = [f"[{state.elapsed_s:5.0f}s] {state.phase}"]
    streams = _streams(snapshot)
    for name, _stage in _STAGES:
        s = streams.get(name)
        if not s or not s.get("exists"):
            continue
        lag = sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in s.get("groups", ()))
        parts.append(f"{name} +{_r(s.get('rate_in')) or '0'}/s waiting {lag:,}")
    for kind, metric, unit in (("ingester", "firehose_ingester_incoming_events_total", "frames"),
                               ("backfiller", "backfiller_records_extracted_total", "records"),
                               ("indexer", "stream_indexer_messages_processed_total", "events")):
        rate = state.rates.get(kind, {}).get(metric)
        if rate is not None:
            parts.append(f"{kind} {rate:,.0f} {unit}/s")
    rows = _rows(snapshot)
    counts = [f"{label} {_n(rows[t]['rows'])}" for label, t in _ROWS[:3] if t in rows]
    if counts:
        parts.append("indexed " + " ".join(counts))
    if pipeline is not None:
        parts.append(f"errors {pipeline.errors}")
    parts.extend(note for note in state.notes if note.startswith("waiting"))
    return " · ".join(parts)


class LiveView:
    """Redraws the block in place on a terminal; prints one line otherwise."""

    def __init__(self, out: TextIO, *, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._drawn = 0

    def show(self, snapshot: Mapping[str, Any], pipeline: Pipeline | None, state: ViewState) -> None:
        if self.tty:
            self.draw(render(snapshot, pipeline, state))
        else:
            self.out.write(progress_line(snapshot, pipeline, state) + "\n")
            self.out.flush()

    def draw(self, lines: Sequence[str]) -> None:
        # a wrapped line would throw off the cursor-up count of the next redraw
        width = max(20, shutil.get_terminal_size((120, 40)).columns - 1)
        buf = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        buf += "".join(line[:width] + "\x1b[K\n" for line in lines)
        self.out.write(buf)
        self.out.flush()
        self._drawn = len(lines)

    def release(self) -> None:
        """Keep the last drawing on screen; later output goes below it."""
        self._drawn = 0
