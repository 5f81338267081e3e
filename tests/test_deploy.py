"""deploy/: the compose file, Prometheus targets and Grafana dashboard against psky's configuration.

Docker is not available here, so the files are read and checked: each service's command
and environment are fed to the service's own configuration reader, consumer names are
unique, Redis is persistent with ``noeviction``, Prometheus scrapes every metrics port and
the dashboard only queries metrics the services export. The compose file is plain block
YAML; :func:`load_yaml` reads exactly that subset and rejects anything else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from psky.backfiller.config import BackfillerConfig
from psky.backfiller.service import BackfillerMetrics
from psky.ingester.config import IngesterConfig
from psky.ingester.metrics import IngesterMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

#: the deployment guide's variables (Configuration section) plus psky's documented additions
DOCUMENTED = {
    "common": {"DATABASE_URL", "DB_POOL_MAX_SIZE", "DB_POOL_MIN_IDLE", "REDIS_URL", "RUST_LOG", "RUST_BACKTRACE",
               "LOG_LEVEL", "LOG_FORMAT", "PLC_URL", "DB_PGBOUNCER"},
    "ingester": {"INGESTER_RELAY_HOSTS", "INGESTER_LABELER_HOSTS", "INGESTER_HIGH_WATER_MARK", "INGESTER_BATCH_SIZE",
                 "INGESTER_BATCH_TIMEOUT_MS", "INGESTER_METRICS_PORT"},
    "indexer": {"INDEXER_CONSUMER", "INDEXER_CONCURRENCY", "INDEXER_BATCH_SIZE", "ENABLE_DID_RESOLUTION",
                "INDEXER_METRICS_PORT", "INDEXER_MIGRATE"},
    "backfiller": {"BACKFILLER_CONSUMER", "BACKFILLER_CONCURRENCY", "BACKFILLER_BATCH_SIZE",
                   "BACKFILLER_HTTP_TIMEOUT_SECS", "BACKFILLER_MAX_RETRIES", "BACKFILLER_RETRY_INITIAL_BACKOFF_MS",
                   "BACKFILLER_RETRY_MAX_BACKOFF_MS", "BACKFILLER_METRICS_PORT"},
    "migrate": set(),
}
METRICS_PORT = {"ingester": "INGESTER_METRICS_PORT", "backfiller": "BACKFILLER_METRICS_PORT",
                "indexer": "INDEXER_METRICS_PORT"}


# --- a loader for plain block YAML ----------------------------------------------------------


class YamlSubsetError(ValueError):
    pass


_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_.-]+):(?: +(?P<rest>.*))?$")


def _strip_comment(line: str) -> str:
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(raw: str, where: int) -> Any:
    if raw in ("{}", "[]"):
        return {} if raw == "{}" else []
    if raw.startswith('"'):
        return json.loads(raw)
    if raw.startswith("'"):
        if not raw.endswith("'") or len(raw) < 2:
            raise YamlSubsetError(f"line {where}: unterminated quote")
        return raw[1:-1].replace("''", "'")
    if raw[0] in "&*!|>{[@`" or " #" in raw:
        raise YamlSubsetError(f"line {where}: unsupported YAML here: {raw!r}")
    return raw  # every plain scalar stays a string: compose values are compared as text


def load_yaml(text: str) -> Any:
    """Block mappings, block sequences (of scalars or mappings) and scalars; nothing else."""
    lines: list[tuple[int, str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"line {number}: tab indentation")
        content = _strip_comment(raw)
        if content.strip():
            lines.append((len(content) - len(content.lstrip()), content.strip(), number))
    pos = 0

    def block(indent: int) -> Any:
        nonlocal pos
        if lines[pos][1].startswith("- ") or lines[pos][1] == "-":
            return sequence(indent)
        return mapping(indent)

    def mapping(indent: int) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent and not lines[pos][1].startswith("-"):
            _ind, content, number = lines[pos]
            m = _KEY.match(content)
            if m is None:
                raise YamlSubsetError(f"line {number}: expected 'key: value', got {content!r}")
            key, rest = m["key"], m["rest"]
            if key in out:
                raise YamlSubsetError(f"line {number}: duplicate key {key!r}")
            pos += 1
            if rest:
                out[key] = _scalar(rest, number)
            elif pos < len(lines) and lines[pos][0] > indent:
                out[key] = block(lines[pos][0])
            else:
                out[key] = None
        if pos < len(lines) and lines[pos][0] > indent:
            raise YamlSubsetError(f"line {lines[pos][2]}: unexpected indentation")
        return out

    def sequence(indent: int) -> list[Any]:
        nonlocal pos
        out: list[Any] = []
        while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
            _ind, content, number = lines[pos]
            item = content[2:].strip()
            if _KEY.match(item):  # "- key: value" opens a mapping indented past the dash
                lines[pos] = (indent + 2, item, number)
                out.append(mapping(indent + 2))
            else:
                out.append(_scalar(item, number))
                pos += 1
        return out

    result = block(lines[0][0]) if lines else None
    if pos != len(lines):
        raise YamlSubsetError(f"line {lines[pos][2]}: unexpected content {lines[pos][1]!r}")
    return result


def test_loader_reads_the_subset_and_rejects_the_rest() -> None:
    doc = load_yaml('a:\n  b: "x: y"  # c\n  l:\n    - 1\n    - k: v\n      m: n\nz: {}\n')
    assert doc == {"a": {"b": "x: y", "l": ["1", {"k": "v", "m": "n"}]}, "z": {}}
    for bad in ("a: &anchor 1\n", "a: [1, 2]\n", "a: |\n  text\n", "a: 1\na: 2\n", "a:\n  b: 1\n   c: 2\n"):
        with pytest.raises(YamlSubsetError):
            load_yaml(bad)


# --- compose --------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def expand(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the default."""
    return _VAR.sub(lambda m: m["default"] or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = load_yaml((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def _psky_services(compose: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose["services"].items()
            if s.get("image", "").startswith("psky") and s.get("command", [None])[0] == kind}


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: expand(v) for k, v in (service.get("environment") or {}).items()}


def test_production_layout(compose: dict[str, Any]) -> None:
    counts = {kind: len(_psky_services(compose, kind)) for kind in ("ingester", "backfiller", "indexer", "migrate")}
    assert counts == {"ingester": 1, "backfiller": 2, "indexer": 6, "migrate": 1}
    assert {"redis", "postgres", "pgbouncer"} <= set(compose["services"])
    names = [s.get("container_name") for s in compose["services"].values() if s.get("container_name")]
    assert len(names) == len(set(names))
    ports = [p.rsplit(":", 1)[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)), "host ports collide"


def test_every_variable_is_documented(compose: dict[str, Any]) -> None:
    for kind, documented in DOCUMENTED.items():
        if kind == "common":
            continue
        for name, service in _psky_services(compose, kind).items():
            unknown = set(_env(service)) - documented - DOCUMENTED["common"]
            assert not unknown, f"{name}: undocumented variables {sorted(unknown)}"
            assert service["command"] == [kind]


def test_variables_are_read_by_psky() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "psky").rglob("*.py"))
    for kind, names in DOCUMENTED.items():
        if kind == "indexer" and "INDEXER_CONSUMER" not in source:
            continue  # the indexer is checked once it exists (test_indexer_configuration)
        for name in names - {"RUST_BACKTRACE"}:  # accepted for the seed's compose files; Python has no use for it
            assert name in source, f"{name} is documented but nothing in psky reads it"


def test_ingester_and_backfillers_accept_their_environment(compose: dict[str, Any]) -> None:
    [ingester] = _psky_services(compose, "ingester").values()
    config = IngesterConfig.from_env(_env(ingester))
    assert config.relay_hosts == ["https://relay1.us-east.bsky.network", "https://relay1.us-west.bsky.network"]
    assert config.firehose_high_water_mark == 100_000_000 and config.batch_size == 500
    assert config.batch_timeout_ms == 100 and config.metrics_port == 9090 and config.mode == "all"
    consumers = []
    for service in _psky_services(compose, "backfiller").values():
        bf = BackfillerConfig.from_env(_env(service))
        assert (bf.concurrency, bf.batch_size, bf.http_timeout_s, bf.max_retries) == (20, 500, 60.0, 3)
        assert (bf.retry_initial_backoff_ms, bf.retry_max_backoff_ms, bf.metrics_port) == (1000, 30_000, 9090)
        assert bf.redis_url == "redis://redis:6379"
        consumers.append(bf.consumer)
    assert len(set(consumers)) == 2


def test_indexers(compose: dict[str, Any]) -> None:
    indexers = _psky_services(compose, "indexer")
    consumers = [_env(s)["INDEXER_CONSUMER"] for s in indexers.values()]
    assert len(set(consumers)) == 6, "INDEXER_CONSUMER must be unique per instance"
    pgbouncer = _env(compose["services"]["pgbouncer"])
    assert pgbouncer["POOL_MODE"] == "transaction"
    total = 0
    for name, service in indexers.items():
        env = _env(service)
        assert "@pgbouncer:" in env["DATABASE_URL"], f"{name} must connect through PgBouncer"
        assert env["INDEXER_BATCH_SIZE"] == "500" and env["ENABLE_DID_RESOLUTION"] == "true"
        assert env["DB_PGBOUNCER"] == "true", "transaction pooling needs psky's PgBouncer mode"
        assert int(env["DB_POOL_MIN_IDLE"]) <= int(env["DB_POOL_MAX_SIZE"]) == 2 * int(env["INDEXER_CONCURRENCY"])
        total += int(env["DB_POOL_MAX_SIZE"])
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert total <= int(pgbouncer["MAX_CLIENT_CONN"]), "indexer pools exceed PgBouncer's MAX_CLIENT_CONN"


def test_indexer_configuration(compose: dict[str, Any]) -> None:
    config_module = pytest.importorskip("psky.indexer.config")
    reader = getattr(config_module, "IndexerConfig", None)
    if reader is None:
        pytest.skip("psky.indexer.config has no IndexerConfig yet")
    consumers = set()
    for service in _psky_services(compose, "indexer").values():
        env = _env(service)
        config = reader.from_env(env)
        consumers.add(config.consumer)
        assert (config.concurrency, config.batch_size, config.metrics_port) == (8, 500, 9090)
        assert config.pgbouncer and config.did_resolution and not config.migrate
        assert config.database_url.startswith("postgresql://bsky:")
    assert len(consumers) == 6


def test_redis_is_persistent_and_never_evicts(compose: dict[str, Any]) -> None:
    args = [expand(a) for a in compose["services"]["redis"]["command"]]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]


def test_prometheus_scrapes_every_metrics_port(compose: dict[str, Any]) -> None:
    prometheus = load_yaml((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{_env(service)[METRICS_PORT[kind]]}"
                for kind in METRICS_PORT for name, service in _psky_services(compose, kind).items()}
    assert targets == expected
    for kind, variable in METRICS_PORT.items():
        for name, service in _psky_services(compose, kind).items():
            port = _env(service)[variable]
            assert any(p.endswith(f":{port}") for p in service["ports"]), f"{name}: metrics port not published"
            assert f":{port}/health" in service["healthcheck"]["test"][-1]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def _registries() -> list[Any]:
    registries = [IngesterMetrics().registry, BackfillerMetrics().registry]
    try:
        from psky.indexer.metrics import IndexerMetrics
    except ImportError:  # the indexer's panels are checked once it exists
        return registries
    return [*registries, IndexerMetrics().registry]


def _exported() -> set[str]:
    names: set[str] = set()
    for registry in _registries():
        for metric in registry.collect():
            # labelled metrics have no samples before first use: derive the sample names
            if metric.type == "counter":
                names.add(metric.name + "_total")
            elif metric.type == "histogram":
                names.update(metric.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(metric.name)
    return names


def test_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "psky-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    prefixes = ["firehose_ingester", "labeler_ingester", "ingester", "backfiller"]
    if len(_registries()) == 3:
        prefixes += ["stream_indexer", "label_indexer", "psky_indexer"]
    used = set(re.findall(rf"\b((?:{'|'.join(prefixes)})_[a-z_]+)\b", " ".join(exprs)))
    assert used and used <= _exported(), sorted(used - _exported())
    # the guide's backfiller metrics each have a panel
    for name in ("repos_processed", "repos_failed", "repos_dead_lettered", "records_extracted", "retries_attempted",
                 "repos_waiting", "repos_running", "output_stream_length", "car_fetch_errors", "car_parse_errors",
                 "verification_errors"):
        assert any(f"backfiller_{name}" in e for e in exprs), name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    datasource = load_yaml((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {
        datasource["datasources"][0]["uid"]}


def test_dockerfile_runs_psky() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["psky"]' in dockerfile
    assert "--constraint requirements.lock" in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {"*", "!psky/", "!pyproject.toml", "!requirements.lock"} <= set(ignore)
