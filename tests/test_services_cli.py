"""Services started from the command line: configuration errors, start, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp


def test_backfiller_requires_a_consumer_name(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BACKFILLER_")}
    res = subprocess.run([sys.executable, "-m", "psky.cli", "backfiller"], capture_output=True, text=True,
                         env={**env, "REDIS_URL": redis_url}, timeout=120)
    assert res.returncode == 2
    assert "BACKFILLER_CONSUMER" in res.stderr and "Traceback" not in res.stderr


async def test_backfiller_serves_health_and_stops_on_sigterm(redis_url: str, redis_prefix: str) -> None:
    env = {**os.environ, "LOG_FORMAT": "text", "REDIS_URL": redis_url, "BACKFILLER_CONSUMER": "cli-test",
           "BACKFILLER_BACKFILL_STREAM": f"{redis_prefix}repo_backfill",
           "BACKFILLER_FIREHOSE_STREAM": f"{redis_prefix}firehose_backfill",
           "BACKFILLER_DLQ_STREAM": f"{redis_prefix}repo_backfill_dlq",
           "BACKFILLER_METRICS_PORT": "0", "BACKFILLER_METRICS_HOST": "127.0.0.1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "psky.cli", "backfiller", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "the backfiller exited early: " + "".join(seen)
            seen.append(line)
            if "backfiller started" in line:
                port = int(line.split("metrics_port=")[1].split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert "backfiller_repos_processed_total" in await resp.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"backfiller stopped" in err


def test_ingester_rejects_a_bad_mode(redis_url: str) -> None:
    res = subprocess.run([sys.executable, "-m", "psky.cli", "ingester"], capture_output=True, text=True,
                         env={**os.environ, "REDIS_URL": redis_url, "INGESTER_MODE": "everything"}, timeout=120)
    assert res.returncode == 2
    assert "INGESTER_MODE" in res.stderr and "Traceback" not in res.stderr


async def test_ingester_stops_on_sigterm_while_its_relay_is_down(redis_url: str, redis_prefix: str) -> None:
    env = {**os.environ, "LOG_FORMAT": "text", "REDIS_URL": redis_url, "INGESTER_MODE": "firehose",
           "INGESTER_RELAY_HOSTS": "http://127.0.0.1:9", "INGESTER_METRICS_PORT": "-1",
           "INGESTER_FIREHOSE_STREAM": f"{redis_prefix}firehose_live"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "psky.cli", "ingester", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(3)  # connecting, failing, backing off
    assert proc.returncode is None, "the ingester exited although it should keep retrying"
    proc.send_signal(signal.SIGTERM)
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
