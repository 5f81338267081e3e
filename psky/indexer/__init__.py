"""``psky indexer``: stream events from Redis consumer groups into the AppView schema in
PostgreSQL — set-wise batches, exact aggregates, rev-guarded records, notifications, handles,
account status and labels (see :mod:`psky.indexer.batch` and :mod:`psky.indexer.service`)."""

from psky.indexer.config import IndexerConfig
from psky.indexer.metrics import IndexerMetrics
from psky.indexer.service import Indexer, run_indexer

__all__ = ["Indexer", "IndexerConfig", "IndexerMetrics", "run_indexer"]
