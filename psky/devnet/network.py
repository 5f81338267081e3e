"""A whole devnet in one event loop: PLC directory, PDSes, relay and labeler.

``async with Devnet(n_pds=2) as net:`` starts every server on 127.0.0.1 (free ports unless
``base_port`` is given), the relay subscribed to every PDS from cursor 0, all sharing one
:class:`~psky.devnet.faults.Faults` object so a test can flip a knob at run time.
:meth:`Devnet.endpoints` is what ``psky devnet up`` prints; :meth:`Devnet.workload` gives a
:class:`~psky.devnet.workload.Workload` bound to the network. Several devnets may run in one
process (nothing is global).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Any, Self

from psky.devnet.faults import Faults
from psky.devnet.labeler import Labeler
from psky.devnet.pds import Pds
from psky.devnet.plc import PlcDirectory
from psky.devnet.relay import Relay
from psky.devnet.workload import DEFAULT_EPOCH, Workload

__all__ = ["Devnet"]

log = logging.getLogger("psky.devnet.network")


class Devnet:
    """PLC + ``n_pds`` PDSes (hostnames ``pds1.test``, ``pds2.test``, ...) + relay + labeler.

    ``base_port`` (0 = free ports) fixes the ports: PLC ``base``, relay ``base+1``, labeler
    ``base+2``, PDS *i* ``base+3+i``. ``seed`` is the default workload seed. ``retain`` bounds
    the firehose backlog of the PDSes and the relay (None = everything).
    """

    def __init__(
        self,
        n_pds: int = 1,
        seed: int = 0,
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        base_port: int = 0,
        labeler: bool = True,
        retain: int | None = None,
    ) -> None:
        if n_pds < 1:
            raise ValueError("a devnet needs at least one PDS")
        self.n_pds = n_pds
        self.seed = seed
        self.faults = faults if faults is not None else Faults()
        self.host = host
        self.base_port = base_port
        self.retain = retain
        self.plc = PlcDirectory(faults=self.faults)
        self.pdses: list[Pds] = []
        self.relay: Relay | None = None
        self.labeler: Labeler | None = None
        self._with_labeler = labeler
        self._started = False

    def _port(self, offset: int) -> int:
        return self.base_port + offset if self.base_port else 0

    async def start(self) -> Self:
        """Start every server (on failure, whatever started is stopped again)."""
        if self._started:
            raise RuntimeError("devnet already started")
        self._started = True
        try:
            await self.plc.start(self.host, self._port(0))
            for i in range(self.n_pds):
                pds = Pds(self.plc.url, hostname=f"pds{i + 1}.test", faults=self.faults, retain=self.retain)
                self.pdses.append(pds)
                await pds.start(self.host, self._port(3 + i))
            self.relay = Relay([p.url for p in self.pdses], faults=self.faults, plc_url=self.plc.url,
                               retain=self.retain)
            await self.relay.start(self.host, self._port(1))
            if self._with_labeler:
                self.labeler = Labeler(self.plc.url, faults=self.faults)
                await self.labeler.start(self.host, self._port(2))
        except BaseException:
            await self.stop()
            raise
        log.info("devnet up: %s", self.endpoints())
        return self

    async def stop(self) -> None:
        """Stop every server (clients first: labeler, relay, PDSes, then the PLC)."""
        servers: list[Any] = [self.labeler, self.relay, *reversed(self.pdses), self.plc]
        for server in servers:
            if server is None:
                continue
            try:
                await server.stop()
            except Exception:  # keep stopping the others; a half-stopped devnet leaks ports
                log.exception("stopping %s failed", type(server).__name__)
        self._started = False

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- what clients need -------------------------------------------------------------

    def _relay(self) -> Relay:
        if self.relay is None:
            raise RuntimeError("devnet is not started")
        return self.relay

    def handle_resolver_map(self) -> str:
        """``PSKY_HANDLE_RESOLVER_MAP`` value: ``*.pds1.test=http://127.0.0.1:PORT,...``."""
        return ",".join(p.handle_resolver_entry() for p in self.pdses)

    def endpoints(self) -> dict[str, Any]:
        """URLs of every server, the labeler DID and the handle resolver map (JSON-ready)."""
        relay = self._relay()
        out: dict[str, Any] = {
            "plc": self.plc.url,
            "pds": [p.url for p in self.pdses],
            "pds_hostnames": {p.hostname: p.url for p in self.pdses},
            "relay": relay.url,
            "relay_firehose": relay.url.replace("http://", "ws://", 1) + "/xrpc/com.atproto.sync.subscribeRepos",
            "handle_resolver_map": self.handle_resolver_map(),
        }
        if self.labeler is not None:
            out["labeler"] = self.labeler.url
            out["labeler_did"] = self.labeler.did
            out["labeler_firehose"] = (
                self.labeler.url.replace("http://", "ws://", 1) + "/xrpc/com.atproto.label.subscribeLabels"
            )
        return out

    def workload(self, seed: int | None = None, *, epoch: str = DEFAULT_EPOCH) -> Workload:
        """A workload on this network (``seed`` defaults to the devnet's)."""
        return Workload(self, self.seed if seed is None else seed, epoch=epoch)

    async def settle(self, timeout_s: float = 30.0) -> int:
        """Wait until the relay has processed every event the PDSes sequenced so far;
        returns the relay's seq."""
        relay = self._relay()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for pds in self.pdses:
            if pds.seq:
                await relay.wait_for_host(pds.url, pds.seq, timeout_s=max(deadline - loop.time(), 0.01))
        return relay.seq

    async def wait(self) -> None:
        """Run until cancelled (``psky devnet up``)."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
