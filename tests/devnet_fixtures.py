"""pytest fixtures that run a devnet (PLC, PDSes, relay, labeler) on free loopback ports.

Load them in a test module with ``pytest_plugins = ("tests.devnet_fixtures",)``:

* ``devnet`` — a fresh, empty two-PDS devnet per test;
* ``module_devnet`` — one empty two-PDS devnet shared by a module's tests;
* ``seeded_devnet`` — one two-PDS devnet per module with a small seeded history, an account
  in each inactive status, a handle change and some live events, settled at the relay
  (:class:`SeededDevnet`: ``net``, ``workload``, ``manifest``);
* ``make_devnet`` — a factory for other shapes: ``async with make_devnet(n_pds=3) as net``.

Every devnet is stopped when its fixture ends (also when the test fails).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from psky.devnet.manifest import Manifest
from psky.devnet.network import Devnet
from psky.devnet.workload import Workload

#: the shape of the ``seeded_devnet`` fixture
SEED = 7
SEED_ACCOUNTS = 40
SEED_RECORDS = 25
SEED_LIVE_EVENTS = 400
SEED_LABELS = 40


@dataclass
class SeededDevnet:
    net: Devnet
    workload: Workload

    @property
    def manifest(self) -> Manifest:
        return self.workload.manifest


@pytest.fixture
async def devnet() -> AsyncIterator[Devnet]:
    async with Devnet(n_pds=2) as net:
        yield net


@pytest.fixture(scope="module")
async def module_devnet() -> AsyncIterator[Devnet]:
    async with Devnet(n_pds=2) as net:
        yield net


@pytest.fixture(scope="module")
async def seeded_devnet() -> AsyncIterator[SeededDevnet]:
    async with Devnet(n_pds=2, seed=SEED) as net:
        workload = net.workload()
        await workload.seed(accounts=SEED_ACCOUNTS, records_per_account=SEED_RECORDS, labels=SEED_LABELS)
        for status in ("deactivated", "takendown", "suspended", "deleted", "deactivated"):
            await workload.set_status(status)
        await workload.change_handle()
        await workload.live(rate=None, events=SEED_LIVE_EVENTS)
        await net.settle()
        yield SeededDevnet(net, workload)


@pytest.fixture
def make_devnet() -> Callable[..., AbstractAsyncContextManager[Devnet]]:
    """``async with make_devnet(**Devnet kwargs) as net`` — started, and stopped on exit."""

    @asynccontextmanager
    async def factory(**kwargs: Any) -> AsyncIterator[Devnet]:
        async with Devnet(**kwargs) as net:
            yield net

    return factory
