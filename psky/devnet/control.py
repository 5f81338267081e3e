"""`psky devnet up|seed|manifest`: run a devnet in the foreground and drive it from outside.

`up` starts the network, seeds it, prints the endpoints as one JSON line on stdout, runs live
writes at the requested rate and stays up until SIGINT/SIGTERM. The network lives in that one
process, so it also serves a small control API on loopback (its URL is in the endpoints as
`control`, and in `<data dir>/devnet.json`):

    GET  /manifest                  the ground-truth manifest (JSON)
    POST /seed   {"accounts", "records"}   seed more accounts (answers when done)
    POST /faults "knob=value,..."          replace the fault knobs (`Faults.parse` syntax)
    GET  /endpoints                 the endpoints JSON

`seed` and `manifest` are thin clients of that API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from psky.devnet.faults import Faults
from psky.devnet.network import Devnet
from psky.devnet.workload import Workload
from psky.errors import UserError
from psky.httpserver import start_app

log = logging.getLogger("psky.devnet.control")


def state_file() -> Path:
    base = Path(os.environ.get("PSKY_DATA_DIR") or Path.cwd() / ".psky-data")
    return base / "devnet.json"


class Controller:
    """The control API of a running devnet (one per `psky devnet up`)."""

    def __init__(self, net: Devnet, workload: Workload) -> None:
        self.net = net
        self.workload = workload
        self.lock = asyncio.Lock()  # the workload is not re-entrant
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/manifest", self._manifest)
        app.router.add_get("/endpoints", self._endpoints)
        app.router.add_post("/seed", self._seed)
        app.router.add_post("/faults", self._faults)
        self._runner, self.url = await start_app(app, "127.0.0.1", port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _manifest(self, request: web.Request) -> web.Response:
        async with self.lock:
            body = self.workload.manifest.to_json()
        return web.Response(body=body, content_type="application/json")

    async def _endpoints(self, request: web.Request) -> web.Response:
        return web.json_response(self.endpoints(), dumps=lambda o: orjson.dumps(o).decode())

    def endpoints(self) -> dict[str, Any]:
        return {**self.net.endpoints(), "control": self.url}

    async def _seed(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read() or b"{}")
            accounts, records = int(body.get("accounts", 10)), int(body.get("records", 20))
            if not (0 < accounts <= 100_000 and 0 <= records <= 100_000):
                raise ValueError("accounts must be 1..100000 and records 0..100000")
        except (orjson.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            return web.json_response({"error": "InvalidRequest", "message": str(e)}, status=400)
        async with self.lock:
            await self.workload.seed(accounts=accounts, records_per_account=records)
        relay_seq = await self.net.settle(timeout_s=600)
        return web.json_response({"accounts": len(self.workload.manifest.accounts), "relay_seq": relay_seq})

    async def _faults(self, request: web.Request) -> web.Response:
        try:
            new = Faults.parse((await request.read()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            return web.json_response({"error": "InvalidRequest", "message": str(e)}, status=400)
        for f in fields(Faults):  # the servers hold this object: update it in place
            setattr(self.net.faults, f.name, getattr(new, f.name))
        self.net.faults.reset_counters()
        return web.json_response({"faults": str(self.net.faults)})


async def run_up(*, n_pds: int, accounts: int, records: int, live_rate: float, seed: int,
                 faults: str, base_port: int, control_port: int, manifest: str | None) -> int:
    try:
        fault_knobs = Faults.parse(faults) if faults else Faults()
    except ValueError as e:
        raise UserError(f"--faults: {e}", 2) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        net = await Devnet(n_pds=n_pds, seed=seed, faults=fault_knobs, base_port=base_port).start()
    except OSError as e:
        raise UserError(f"cannot start the devnet: {e}") from None
    workload = net.workload(seed)
    control = Controller(net, workload)
    live_task: asyncio.Task[None] | None = None
    try:
        await control.start(control_port)
        if accounts:
            log.info("seeding %d accounts x %d records", accounts, records)
            await workload.seed(accounts=accounts, records_per_account=records)
            await net.settle(timeout_s=600)
        endpoints = control.endpoints()
        path = state_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(endpoints))
        sys.stdout.write(orjson.dumps(endpoints).decode() + "\n")
        sys.stdout.flush()
        if live_rate > 0:
            live_task = asyncio.create_task(_live(workload, control, live_rate))
        await stop.wait()
    finally:
        if live_task is not None:
            live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live_task
        if manifest:
            await asyncio.to_thread(Path(manifest).write_bytes, workload.manifest.to_json(indent=True))
        await control.stop()
        await net.stop()
        with contextlib.suppress(FileNotFoundError):
            state_file().unlink()
    return 0


async def _live(workload: Workload, control: Controller, rate: float) -> None:
    while True:  # in slices, so that /manifest and /seed can take the lock in between
        async with control.lock:
            await workload.live(rate=rate, duration=1.0)


def _control_url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    try:
        return str(orjson.loads(state_file().read_bytes())["control"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"no running devnet found ({state_file()}); start `psky devnet up` or give --control",
                        1) from None


async def run_seed(*, control: str | None, accounts: int, records: int) -> int:
    url = _control_url(control)
    try:
        async with aiohttp.ClientSession() as http, http.post(
                f"{url}/seed", data=orjson.dumps({"accounts": accounts, "records": records})) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise UserError(f"seed failed: HTTP {resp.status} {body.decode(errors='replace')[:200]}")
    except aiohttp.ClientError as e:
        raise UserError(f"cannot reach the devnet at {url}: {e}") from None
    sys.stdout.write(body.decode() + "\n")
    return 0


async def run_manifest(*, control: str | None, output: str | None) -> int:
    url = _control_url(control)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/manifest") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise UserError(f"manifest failed: HTTP {resp.status}")
    except aiohttp.ClientError as e:
        raise UserError(f"cannot reach the devnet at {url}: {e}") from None
    if output:
        await asyncio.to_thread(Path(output).write_bytes, body)
    else:
        sys.stdout.buffer.write(body + b"\n")
    return 0
