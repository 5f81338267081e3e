"""The ingester's Prometheus metrics (names of the TypeScript and rsky ingesters, plus psky's).

TypeScript names: ``firehose_ingester_incoming_events_total`` (frames read from a relay),
``firehose_ingester_stream_events_total`` (entries queued for ``firehose_live``),
``labeler_ingester_incoming_events_total`` / ``labeler_ingester_stream_events_total``.
rsky's: ``ingester_firehose_filtered_operations_total`` (ops outside the collection filter).
psky's own: ``ingester_firehose_frames_total{type}``, ``ingester_bad_frames_total{reason}``,
``ingester_verification_failures_total{reason}`` (firehose; ``labeler_ingester_…`` for labels),
``ingester_firehose_key_prefetches_total`` (DID documents fetched ahead of processing),
``ingester_dropped_commits_total``, ``ingester_resync_requests_total{reason}``,
``ingester_outdated_cursor_total``, ``ingester_error_frames_total{error}``,
``ingester_reconnects_total{reason}``, ``ingester_firehose_lag_seconds``,
``ingester_firehose_cursor``, ``ingester_repos_enumerated_total``,
``ingester_repos_enumeration_errors_total``, ``ingester_repos_cursor_given_up_total``, ``ingester_stream_length{stream}``,
``ingester_backpressure{stream}`` (1 while waiting at the high-water mark) and
``ingester_backpressure_seconds_total{stream}``,
``ingester_stream_write_retries_total{stream}`` (Redis down or full). Per-source metrics carry a ``host`` label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from psky.metrics import HotCounter, HotGauge

__all__ = ["IngesterMetrics"]


class IngesterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # updated per frame: plain numbers read at collection time (psky.metrics.HotCounter)
        self.incoming = HotCounter("firehose_ingester_incoming_events", "Frames read from a relay", ["host"], r)
        self.stream_events = HotCounter(
            "firehose_ingester_stream_events", "Events queued for the firehose stream", ["host", "type"], r
        )
        self.filtered = HotCounter(
            "ingester_firehose_filtered_operations", "Operations outside the collection filter", ["host"], r
        )
        self.frames = HotCounter("ingester_firehose_frames", "Frames by type", ["host", "type"], r)
        self.bad_frames = Counter("ingester_bad_frames", "Frames that failed to decode", ["host", "reason"], registry=r)
        self.verify_failures = Counter(
            "ingester_verification_failures", "Failed commit checks by reason", ["host", "reason"], registry=r
        )
        self.key_prefetches = Counter(
            "ingester_firehose_key_prefetches", "Signing key fetches started ahead of processing", ["host"], registry=r
        )
        self.dropped = Counter("ingester_dropped_commits", "Commits dropped (strict verification)", ["host"], registry=r)
        self.resyncs = Counter("ingester_resync_requests", "Repos queued for resync", ["host", "reason"], registry=r)
        self.outdated = Counter("ingester_outdated_cursor", "#info OutdatedCursor received", ["host"], registry=r)
        self.error_frames = Counter("ingester_error_frames", "Error frames received", ["host", "error"], registry=r)
        self.reconnects = Counter("ingester_reconnects", "Stream reconnects", ["host", "reason"], registry=r)
        self.duplicates = Counter(
            "ingester_firehose_skipped_seq", "Frames at or below the last seq (replayed/out of order)", ["host"],
            registry=r,
        )
        self.lag = Gauge("ingester_firehose_lag_seconds", "Seconds behind the relay's event time", ["host"], registry=r)
        self.cursor = HotGauge("ingester_firehose_cursor", "Last seq processed", ["host"], r)
        self.repos = Counter("ingester_repos_enumerated", "listRepos entries queued", ["host"], registry=r)
        self.repos_errors = Counter("ingester_repos_enumeration_errors", "listRepos failures", ["host"], registry=r)
        self.repos_given_up = Counter(
            "ingester_repos_cursor_given_up", "listRepos cursors given up after every retry", ["host"], registry=r
        )
        self.label_incoming = Counter(
            "labeler_ingester_incoming_events", "Frames read from a labeler", ["host"], registry=r
        )
        self.label_stream_events = Counter(
            "labeler_ingester_stream_events", "Labels queued for the label stream", ["host"], registry=r
        )
        self.label_verify_failures = Counter(
            "labeler_ingester_verification_failures", "Labels failing verification", ["host", "reason"], registry=r
        )
        self.label_bad_frames = Counter(
            "labeler_ingester_bad_frames", "Labeler frames that failed to decode", ["host"], registry=r
        )
        self.stream_length = Gauge("ingester_stream_length", "Last XLEN seen", ["stream"], registry=r)
        self.backpressure = Gauge("ingester_backpressure", "1 while at the high-water mark", ["stream"], registry=r)
        self.write_retries = Counter(
            "ingester_stream_write_retries", "Batch writes retried after a Redis error", ["stream"], registry=r
        )
        self.backpressure_seconds = Counter(
            "ingester_backpressure_seconds", "Time spent waiting at the high-water mark", ["stream"], registry=r
        )

    def value(self, name: str, **labels: str) -> float:
        """Current value of one sample (0 when absent): what tests and status tools read."""
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def total(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include *labels*."""
        out = 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out += s.value
        return out
