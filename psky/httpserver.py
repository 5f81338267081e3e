"""Starting an aiohttp application on a host and port: the one way every psky server does it."""

from __future__ import annotations

from aiohttp import web


async def start_app(app: web.Application, host: str = "127.0.0.1", port: int = 0,
                    *, shutdown_timeout: float = 60.0) -> tuple[web.AppRunner, str]:
    """Serve *app* on *host*:*port* (0 = a free port); return the runner and the base URL.

    The URL names the address actually bound (for a wildcard host, the bound address)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = bound_host if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}"
