"""Structured logging: one line per event, logfmt-like text on a terminal and JSON lines
otherwise (containers, files, pipes); ``LOG_FORMAT=text|json`` chooses explicitly.

The level comes from `LOG_LEVEL`, or `RUST_LOG` as the seed's deployments set it
(`info`, `debug`, or a filter such as `rsky_indexer=debug,info`: the bare level wins).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson

LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
          "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}

_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {"message", "asctime"}


class LogConfigError(ValueError):
    pass


def parse_level(value: str, variable: str = "LOG_LEVEL") -> int:
    """`info` → INFO; for RUST_LOG-style filters the last bare level (no `=`) is used."""
    bare = [part.strip().lower() for part in value.split(",") if part.strip() and "=" not in part]
    if not bare:
        # only per-module directives: use the most verbose one
        directives = [p.split("=", 1)[1].strip().lower() for p in value.split(",") if "=" in p]
        bare = [min(directives, key=lambda d: LEVELS.get(d, 100))] if directives else []
    if not bare or bare[-1] not in LEVELS:
        raise LogConfigError(f"{variable}: expected one of error, warn, info, debug, trace; got {value!r}")
    return LEVELS[bare[-1]]


def level_from_env(env: Mapping[str, str] = os.environ) -> int:
    if env.get("LOG_LEVEL"):
        return parse_level(env["LOG_LEVEL"], "LOG_LEVEL")
    if env.get("RUST_LOG"):
        return parse_level(env["RUST_LOG"], "RUST_LOG")
    return logging.INFO


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
                          for k, v in _extras(record).items())
        line = f"{ts} {record.levelname.lower():5} {record.name}: {record.getMessage()}"
        if fields:
            line += "  " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def configure(env: Mapping[str, str] = os.environ, *, level: int | None = None) -> None:
    """Install the root handler once per process (stderr)."""
    fmt = (env.get("LOG_FORMAT") or ("text" if _isatty(sys.stderr) else "json")).lower()
    if fmt not in ("text", "json"):
        raise LogConfigError(f"LOG_FORMAT: expected text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else level_from_env(env))
