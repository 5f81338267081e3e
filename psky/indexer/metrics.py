"""Indexer metrics: the TypeScript names (``stream_indexer_*``, ``label_indexer_*``, labelled
by stream, group, consumer) plus psky's per-collection, skipped-by-reason, batch and lag."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["IndexerMetrics"]

_LABELS = ["stream", "group", "consumer"]
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)


class IndexerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.processed = Counter(
            "stream_indexer_messages_processed", "total processed stream messages", _LABELS, registry=r
        )
        self.failed = Counter(
            "stream_indexer_messages_failed", "total failed stream messages", _LABELS, registry=r
        )
        self.waiting = Gauge(
            "stream_indexer_messages_waiting_count", "count of waiting stream messages", _LABELS, registry=r
        )
        self.running = Gauge(
            "stream_indexer_messages_running_count", "count of running stream messages", _LABELS, registry=r
        )
        self.timing = Histogram(
            "stream_indexer_message_processing_time",
            "time to process each message (ms; a batch's time shared by its messages)",
            [*_LABELS, "type"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.label_processed = Counter(
            "label_indexer_messages_processed", "total processed label stream messages", _LABELS, registry=r
        )
        self.label_failed = Counter(
            "label_indexer_messages_failed", "total failed label stream messages", _LABELS, registry=r
        )
        self.label_waiting = Gauge(
            "label_indexer_messages_waiting_count",
            "count of waiting label stream messages",
            _LABELS,
            registry=r,
        )
        self.label_running = Gauge(
            "label_indexer_messages_running_count",
            "count of running label stream messages",
            _LABELS,
            registry=r,
        )
        self.label_timing = Histogram(
            "label_indexer_message_processing_time", "time to process each label message (ms)", _LABELS,
            buckets=_MS_BUCKETS, registry=r,
        )  # fmt: skip
        self.records = Counter(
            "psky_indexer_records", "Record operations applied, by collection and action",
            ["collection", "action"], registry=r,
        )  # fmt: skip
        self.skipped = Counter(
            "psky_indexer_skipped", "Events not indexed, by reason", ["reason"], registry=r
        )
        self.stale = Counter("psky_indexer_stale_writes", "Writes refused by the rev guard", registry=r)
        self.notifications = Counter("psky_indexer_notifications", "Notifications written", registry=r)
        self.labels = Counter("psky_indexer_labels", "Labels applied", ["neg"], registry=r)
        self.batch_size = Histogram(
            "psky_indexer_batch_size", "Messages per indexed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000), registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "psky_indexer_batch_seconds", "Time to index one batch (one transaction)", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.waves = Counter("psky_indexer_waves", "Set-wise waves executed", registry=r)
        self.retries = Counter(
            "psky_indexer_batch_retries", "Batches retried, by reason", ["reason"], registry=r
        )
        self.dead_lettered = Counter(
            "psky_indexer_dead_lettered",
            "Messages moved to their <stream>_dlq after too many deliveries (stream: all)",
            ["stream"],
            registry=r,
        )
        self.malformed = Counter(
            "psky_indexer_malformed_messages", "Unparseable stream entries", ["code"], registry=r
        )
        self.lag = Gauge(
            "psky_indexer_lag_seconds",
            "Now minus the event time of the last indexed event",
            ["stream"],
            registry=r,
        )
        self.handles = Counter(
            "psky_indexer_handle_resolutions", "Handle resolutions, by outcome", ["outcome"], registry=r
        )
