"""Run the ingester, backfillers and indexers as child processes of one command.

``psky demo`` and ``psky run`` start the services exactly as an operator would
(``python -m psky.cli ingester|backfiller|indexer``, configured only through their
environment variables), so what the demo shows is the deployed behaviour, not an in-process
shortcut. Each child writes JSON log lines to its own file; :class:`Pipeline` counts their
errors and warnings for the live view, notices a child that dies, and stops them all with
SIGTERM (they drain), escalating to SIGKILL only after a grace period. Children get their own
session (a terminal's Ctrl-C reaches the parent, which stops them in order) and, on Linux, a
parent-death signal so that a killed parent leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from psky.streams import FIREHOSE_BACKFILL, FIREHOSE_LIVE, LABEL_LIVE, REPO_BACKFILL, dlq_stream_for

__all__ = ["ChildProcess", "Pipeline", "PipelineConfig", "ServiceSpec", "drain_state", "parse_metrics", "pid_alive",
           "service_specs"]

log = logging.getLogger("psky.ops.pipeline")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when its parent dies (no orphans after a SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass(slots=True, kw_only=True)
class PipelineConfig:
    """What the children are pointed at; None leaves the variable to the environment."""

    redis_url: str
    database_url: str
    relay_hosts: Sequence[str] = ()
    labeler_hosts: Sequence[str] = ()
    indexers: int = 2
    backfillers: int = 1
    #: prepended to every stream (and so every cursor and state key): a shared Redis
    prefix: str = ""
    plc_url: str | None = None
    handle_map: str | None = None
    #: BACKFILLER_ALLOW_HOSTS (loopback networks)
    allow_hosts: Sequence[str] = ()
    #: INGESTER_FIREHOSE_START_CURSOR for relays without a stored cursor
    start_cursor: int | None = None
    #: further variables for every child
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ServiceSpec:
    name: str
    command: str
    env: dict[str, str]


def service_specs(base_env: Mapping[str, str], config: PipelineConfig) -> list[ServiceSpec]:
    """One ingester, ``backfillers`` backfillers and ``indexers`` indexers with their environments."""
    common = {k: v for k, v in base_env.items() if k not in ("REDIS_HOST", "DB_POSTGRES_URL")}
    common.update(config.extra_env)
    common.update({"REDIS_URL": config.redis_url, "DATABASE_URL": config.database_url, "LOG_FORMAT": "json"})
    if config.plc_url:
        common["PLC_URL"] = config.plc_url
    if config.handle_map is not None:
        common["PSKY_HANDLE_RESOLVER_MAP"] = config.handle_map
    p = config.prefix

    ingester = dict(common)
    if config.relay_hosts:
        ingester["INGESTER_RELAY_HOSTS"] = ",".join(config.relay_hosts)
        ingester.pop("INGESTER_HOSTS", None)
    if config.labeler_hosts:
        ingester["INGESTER_LABELER_HOSTS"] = ",".join(config.labeler_hosts)
    ingester.setdefault("INGESTER_MODE", "all")
    ingester.setdefault("INGESTER_METRICS_PORT", "0")
    ingester.setdefault("INGESTER_METRICS_HOST", "127.0.0.1")
    if config.start_cursor is not None:
        ingester["INGESTER_FIREHOSE_START_CURSOR"] = str(config.start_cursor)
    if p:
        ingester.update({"INGESTER_FIREHOSE_STREAM": p + FIREHOSE_LIVE, "INGESTER_REPO_STREAM": p + REPO_BACKFILL,
                         "INGESTER_LABEL_STREAM": p + LABEL_LIVE})
    specs = [ServiceSpec("ingester", "ingester", ingester)]

    for i in range(1, config.backfillers + 1):
        env = dict(common)
        env["BACKFILLER_CONSUMER"] = f"psky-backfiller-{i}"
        if config.backfillers > 1 or "BACKFILLER_METRICS_PORT" not in env:
            env["BACKFILLER_METRICS_PORT"] = "0"
        env.setdefault("BACKFILLER_METRICS_HOST", "127.0.0.1")
        if config.allow_hosts:
            env["BACKFILLER_ALLOW_HOSTS"] = ",".join(config.allow_hosts)
        if p:
            env.update({"BACKFILLER_BACKFILL_STREAM": p + REPO_BACKFILL,
                        "BACKFILLER_FIREHOSE_STREAM": p + FIREHOSE_BACKFILL,
                        "BACKFILLER_DLQ_STREAM": p + dlq_stream_for(REPO_BACKFILL)})
        specs.append(ServiceSpec(f"backfiller-{i}", "backfiller", env))

    for i in range(1, config.indexers + 1):
        env = dict(common)
        env["INDEXER_CONSUMER"] = f"psky-indexer-{i}"
        if config.indexers > 1 or "INDEXER_METRICS_PORT" not in env:
            env["INDEXER_METRICS_PORT"] = "0"
        env.setdefault("INDEXER_METRICS_HOST", "127.0.0.1")
        if p:
            env.update({"INDEXER_STREAMS": f"{p}{FIREHOSE_LIVE},{p}{FIREHOSE_BACKFILL}",
                        "INDEXER_LABEL_STREAM": p + LABEL_LIVE, "INDEXER_NOTIFY_STREAMS": p + FIREHOSE_LIVE})
        specs.append(ServiceSpec(f"indexer-{i}", "indexer", env))
    return specs


class ChildProcess:
    """One service process and what its log says about it."""

    def __init__(self, spec: ServiceSpec, log_path: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.errors = 0
        self.warnings = 0
        self.last_problem = ""
        #: where its Prometheus metrics are served (read from its start-up log line)
        self.metrics_port: int | None = None
        self._offset = 0
        self._partial = b""
        self._log_file: IO[bytes] | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115, ASYNC230 - owned until wait(); instant
        self._offset = 0
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "psky.cli", self.spec.command, env=self.spec.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=self._log_file, stderr=self._log_file,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def scan_log(self) -> None:
        """Count the error and warning lines written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(4 * 1024 * 1024)
        except OSError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self.metrics_port is None and b"port" in line:
                self.metrics_port = _metrics_port(line)
            level, message = _level(line)
            if level in ("error", "critical"):
                self.errors += 1
                self.last_problem = message
            elif level == "warning":
                self.warnings += 1
                if not self.errors:
                    self.last_problem = message

    async def scrape(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Its counters and gauges, summed over their labels ({} when unreachable)."""
        if self.metrics_port is None or self.returncode is not None:
            return {}
        try:
            async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                   timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return {}
        return parse_metrics(body)

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_bytes().splitlines()[-n:]
        except OSError:
            return ""
        return "\n".join(line.decode(errors="replace") for line in lines)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int | None:
        """Exit status, killing the child when it has not exited after *timeout_s*."""
        if self.proc is None:
            return None
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs: killing it", self.name, timeout_s)
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.scan_log()
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over labels} (``*_created`` skipped)."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    except ValueError:
        pass
    return out


def _metrics_port(line: bytes) -> int | None:
    try:
        doc: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    port = doc.get("metrics_port", doc.get("port") if "metrics" in str(doc.get("msg", "")) else None)
    return port if isinstance(port, int) and port > 0 else None


def _level(line: bytes) -> tuple[str, str]:
    if not line.startswith(b"{"):
        return ("error", line.decode(errors="replace")[:200]) if line.startswith(b"Traceback") else ("", "")
    try:
        doc: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "", ""
    if not isinstance(doc, dict):
        return "", ""
    return str(doc.get("level", "")), f"{doc.get('logger', '')}: {doc.get('msg', '')}"[:200]


class Pipeline:
    """The children of one ``psky demo``/``psky run``; logs under *log_dir*."""

    def __init__(self, specs: Sequence[ServiceSpec], log_dir: Path) -> None:
        self.children = [ChildProcess(s, log_dir / f"{s.name}.log") for s in specs]
        self.log_dir = log_dir

    async def start(self) -> None:
        try:
            for child in self.children:
                await child.start()
        except BaseException:
            await self.stop(timeout_s=5.0)
            raise
        # which processes belong to this run (for operators, and the tests' orphan check)
        pids = orjson.dumps({c.name: c.pid for c in self.children})
        await asyncio.to_thread((self.log_dir / "pids.json").write_bytes, pids)

    def scan_logs(self) -> None:
        for child in self.children:
            child.scan_log()

    def exited(self) -> list[ChildProcess]:
        """Children that are no longer running."""
        return [c for c in self.children if c.proc is not None and c.returncode is not None]

    async def scrape(self) -> dict[str, dict[str, float]]:
        """Metrics per kind of service (ingester, backfiller, indexer), summed over its processes."""
        out: dict[str, dict[str, float]] = {}
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(c.scrape(session) for c in self.children))
        for child, metrics in zip(self.children, results, strict=True):
            into = out.setdefault(child.spec.command, {})
            for name, value in metrics.items():
                into[name] = into.get(name, 0.0) + value
        return out

    @property
    def errors(self) -> int:
        return sum(c.errors for c in self.children)

    @property
    def warnings(self) -> int:
        return sum(c.warnings for c in self.children)

    async def stop(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every child, wait for each to drain; exit status per child."""
        for child in self.children:
            child.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(c.wait(timeout_s) for c in self.children))
        return {c.name: code for c, code in zip(self.children, codes, strict=True)}


def _drained_group(group: Mapping[str, Any], last_id: str | None) -> bool:
    if group.get("pending"):
        return False
    if group.get("lag") is not None:
        return int(group["lag"]) == 0
    return last_id is None or group.get("last_delivered_id") == last_id


def drain_state(snapshot: Mapping[str, Any], *, groups: Mapping[str, int]) -> tuple[bool, str]:
    """Whether every stream in *groups* (stream → groups expected on it) has all its groups
    present, nothing pending and nothing waiting; else what is still outstanding."""
    redis = snapshot.get("redis") or {}
    if "error" in redis:
        return False, f"Redis: {redis['error']}"
    streams = {s["stream"]: s for s in redis.get("streams", ())}
    for name, expected in groups.items():
        stream = streams.get(name)
        if stream is None or not stream.get("exists"):
            continue  # nothing was ever written to it
        present = stream.get("groups", ())
        if len(present) < expected:
            return False, f"{name}: waiting for its consumer groups"
        for group in present:
            if not _drained_group(group, stream.get("last_id")):
                return False, f"{name}: group {group['name']} has {group.get('lag')} waiting, {group['pending']} pending"
    return True, ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
