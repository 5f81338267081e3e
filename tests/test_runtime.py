"""psky.runtime: the garbage-collector settings every service applies at start."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from psky.config import ConfigError
from psky.runtime import DEFAULT_GEN0, tune_gc

_PROBE = (
    "import gc, os; from psky.runtime import tune_gc; "
    "before = gc.get_threshold(); got = tune_gc(os.environ); "
    "print(before[0], got, gc.get_threshold()[0], gc.get_freeze_count())"
)


def _probe(**env: str) -> list[int]:
    """tune_gc in a fresh interpreter (gc.freeze is process-wide: not in the test runner)."""
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, check=True,
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_default_raises_the_young_threshold_and_freezes_the_start_up_heap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PSKY_GC_GEN0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True, capture_output=True,
                         text=True).stdout
    before, got, now, frozen = (int(x) for x in out.split())
    assert before == 700 and got == now == DEFAULT_GEN0
    assert frozen > 1000  # modules, classes, functions imported so far


def test_explicit_threshold_and_zero_keeps_cpython_defaults() -> None:
    assert _probe(PSKY_GC_GEN0="20_000")[1:3] == [20_000, 20_000]
    before, got, now, frozen = _probe(PSKY_GC_GEN0="0")
    assert before == got == now == 700 and frozen == 0


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "99999999999"])
def test_a_bad_value_is_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="PSKY_GC_GEN0"):
        tune_gc({"PSKY_GC_GEN0": value})


def test_a_service_with_a_bad_value_stops_at_start_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "psky.cli", "ingester"], capture_output=True, text=True,
                          env={**os.environ, "PSKY_GC_GEN0": "lots", "INGESTER_METRICS_PORT": "-1"}, timeout=60)
    assert proc.returncode == 2
    assert "PSKY_GC_GEN0" in proc.stderr and "Traceback" not in proc.stderr
