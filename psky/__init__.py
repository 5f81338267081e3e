"""psky: the Bluesky AppView ingest pipeline (ingester, backfiller, indexers) in Python."""

__version__ = "0.1.0"
