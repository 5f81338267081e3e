"""``psky ingester``: relay firehoses, listRepos enumeration and labeler streams into Redis.

Entry points: :class:`IngesterConfig` (``IngesterConfig.from_env(env)``) and
:func:`run_ingester` (``await run_ingester(config, stop=event)``). See
:mod:`psky.ingester.metrics` for the metric names.
"""

from psky.ingester.config import IngesterConfig
from psky.ingester.service import run_ingester

__all__ = ["IngesterConfig", "run_ingester"]
