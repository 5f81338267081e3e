"""`psky devnet up|seed|manifest` as an operator runs them: real processes, real loopback servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson


def _psky(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "psky.cli", *args], capture_output=True, env=env, timeout=300)


def test_devnet_up_seed_manifest(tmp_path: Path) -> None:
    env = {**os.environ, "PSKY_DATA_DIR": str(tmp_path / "data")}
    manifest_path = tmp_path / "manifest.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "psky.cli", "devnet", "up", "--pds", "2", "--accounts", "4", "--records", "6",
         "--live", "20", "--manifest", str(manifest_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert up.stdout is not None
        endpoints = orjson.loads(up.stdout.readline())
        assert len(endpoints["pds"]) == 2 and endpoints["relay"].startswith("http://127.0.0.1:")
        assert endpoints["relay_firehose"].endswith("/xrpc/com.atproto.sync.subscribeRepos")
        assert "*.pds1.test=" in endpoints["handle_resolver_map"]
        assert (tmp_path / "data" / "devnet.json").exists()

        res = _psky("devnet", "seed", "--accounts", "2", "--records", "3", env=env)  # control URL from devnet.json
        assert res.returncode == 0, res.stderr
        assert orjson.loads(res.stdout)["accounts"] >= 6

        res = _psky("devnet", "manifest", "--control", endpoints["control"], env=env)
        assert res.returncode == 0, res.stderr
        manifest = orjson.loads(res.stdout)
        assert len(manifest["accounts"]) >= 6
    finally:
        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=120)
    assert up.returncode == 0, err.decode()
    saved = orjson.loads(manifest_path.read_bytes())
    assert len(saved["accounts"]) >= 6
    assert not (tmp_path / "data" / "devnet.json").exists()


def test_devnet_clients_without_a_devnet(tmp_path: Path) -> None:
    env = {**os.environ, "PSKY_DATA_DIR": str(tmp_path)}
    res = _psky("devnet", "manifest", env=env)
    assert res.returncode == 1 and b"no running devnet" in res.stderr and b"Traceback" not in res.stderr
    res = _psky("devnet", "up", "--faults", "no_such_knob=1", env=env)
    assert res.returncode == 2 and b"--faults" in res.stderr
