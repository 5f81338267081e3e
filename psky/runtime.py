"""Process-wide settings for psky's long-running services: the garbage collector.

A verifying ingester allocates a few dozen container objects per frame (frames, tuples of
events, stream entries) and keeps hundreds of thousands alive (DID documents, parsed keys, repo
states). With CPython's defaults (a young collection every 700 allocations, older generations
every 10 of those) the collector rescans that long-lived heap again and again: measured in the
ingester benchmark, 8-10% of a verified frame's CPU. The services therefore collect the young
generation every ``PSKY_GC_GEN0`` allocations (default 50,000; the hot path makes no reference
cycles, so garbage still goes at once by reference counting) and move what exists at start-up
(modules, classes, configuration) out of the collector's sight with :func:`gc.freeze`.
``PSKY_GC_GEN0=0`` keeps CPython's defaults.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping

from psky.config import env_int

__all__ = ["tune_gc"]

log = logging.getLogger(__name__)

DEFAULT_GEN0 = 50_000


def tune_gc(env: Mapping[str, str]) -> int:
    """Apply ``PSKY_GC_GEN0`` (see the module docstring); returns the young-generation
    threshold now in force. Call once, after imports, before the service starts; a bad value
    raises :class:`psky.config.ConfigError`."""
    gen0 = env_int("PSKY_GC_GEN0", DEFAULT_GEN0, env, minimum=0, maximum=10_000_000)
    if gen0 == 0:
        return gc.get_threshold()[0]
    gc.collect()
    gc.freeze()
    gc.set_threshold(gen0, 50, 100)
    log.debug("garbage collector tuned", extra={"gen0": gen0, "frozen": gc.get_freeze_count()})
    return gen0
