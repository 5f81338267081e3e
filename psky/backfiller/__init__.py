"""``psky backfiller``: whole repositories from ``repo_backfill`` into ``firehose_backfill``,
fetched from each account's PDS, fully verified, retried with backoff, dead-lettered, and
polite to every PDS (see :mod:`psky.backfiller.service`)."""

from psky.backfiller.config import BackfillerConfig
from psky.backfiller.service import Backfiller, BackfillerMetrics, run_backfiller

__all__ = ["Backfiller", "BackfillerConfig", "BackfillerMetrics", "run_backfiller"]
