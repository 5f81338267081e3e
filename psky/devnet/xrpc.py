"""XRPC plumbing shared by the devnet servers: error responses, parameter parsing, JSON.

Errors follow the reference ``xrpc-server``: an HTTP status (400 for request problems,
including ``RepoNotFound``-style errors, 404 only for unknown routes, 501 for unknown
methods, 500 for server faults) and a JSON body ``{"error": <Name>, "message": <text>}``.
Handlers raise :class:`XrpcError`; :func:`xrpc_middleware` turns it (and any unexpected
exception) into that response, so a bug in a handler never kills a server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from psky.atproto.syntax import is_valid_did, is_valid_nsid, is_valid_record_key, is_valid_tid

__all__ = [
    "XrpcError",
    "invalid_request",
    "json_response",
    "method_not_implemented",
    "param_did",
    "param_int",
    "param_nsid",
    "param_rkey",
    "param_str",
    "param_tid",
    "xrpc_error",
    "xrpc_middleware",
]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class XrpcError(Exception):
    """An XRPC error answer: ``status`` with body ``{"error": error, "message": message}``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


def xrpc_error(
    status: int, error: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error response the reference XRPC servers send."""
    return web.Response(
        status=status,
        body=orjson.dumps({"error": error, "message": message}),
        content_type="application/json",
        headers=headers,
    )


def json_response(obj: Any, *, status: int = 200) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def invalid_request(message: str, error: str = "InvalidRequest") -> XrpcError:
    """HTTP 400 with the given error name (reference ``InvalidRequestError``)."""
    return XrpcError(400, error, message)


def xrpc_middleware(logger: logging.Logger) -> Middleware:
    """Convert :class:`XrpcError` and unexpected exceptions into XRPC JSON error responses."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except XrpcError as e:
            return xrpc_error(e.status, e.error, e.message)
        except web.HTTPException:
            raise
        except Exception:
            logger.exception("internal error serving %s", request.path)
            return xrpc_error(500, "InternalServerError", "Internal Server Error")

    return middleware


async def method_not_implemented(request: web.Request) -> web.Response:
    """Catch-all for ``/xrpc/<nsid>`` routes a server does not serve."""
    return xrpc_error(501, "MethodNotImplemented", "Method Not Implemented")


# --- parameters ---------------------------------------------------------------------------


def param_str(request: web.Request, name: str, *, required: bool = True) -> str | None:
    """A query parameter (first occurrence); InvalidRequest when required and absent/empty."""
    value = request.query.get(name)
    if value is None or value == "":
        if required:
            raise invalid_request(f'Params must have the property "{name}"')
        return None
    return value


def param_did(request: web.Request, name: str = "did") -> str:
    """A required DID parameter, syntax-checked."""
    value = param_str(request, name)
    assert value is not None
    if not is_valid_did(value):
        raise invalid_request(f"{name} must be a valid did")
    return value


def param_nsid(request: web.Request, name: str) -> str:
    value = param_str(request, name)
    assert value is not None
    if not is_valid_nsid(value):
        raise invalid_request(f"{name} must be a valid nsid")
    return value


def param_rkey(request: web.Request, name: str = "rkey") -> str:
    value = param_str(request, name)
    assert value is not None
    if not is_valid_record_key(value):
        raise invalid_request(f"{name} must be a valid record-key")
    return value


def param_tid(request: web.Request, name: str) -> str | None:
    value = param_str(request, name, required=False)
    if value is not None and not is_valid_tid(value):
        raise invalid_request(f"{name} must be a valid tid")
    return value


def param_int(
    request: web.Request,
    name: str,
    *,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    """An optional integer parameter within bounds (InvalidRequest otherwise)."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise invalid_request(f"{name} must be an integer") from None
    if minimum is not None and value < minimum:
        raise invalid_request(f"{name} can not be less than {minimum}")
    if maximum is not None and value > maximum:
        raise invalid_request(f"{name} can not be greater than {maximum}")
    return value
