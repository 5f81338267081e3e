"""Environment configuration: typed getters that accept the seed's names and their aliases.

Every service reads its settings once at start through these functions, so a wrong value is a
clear start-up error naming the variable (`ConfigError`), never a crash later. Names follow the
Rust services' deployment guide first (`REDIS_URL`, `DATABASE_URL`, `INGESTER_RELAY_HOSTS`, …)
and accept the TypeScript services' names as aliases (`REDIS_HOST`, `DB_POSTGRES_URL`,
`INGESTER_HOSTS`, …). An empty value counts as unset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from psky.services import ConfigError

__all__ = ["ConfigError", "env_bool", "env_float", "env_int", "env_list", "env_str", "lookup"]

Env = Mapping[str, str]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def lookup(names: str | Sequence[str], env: Env | None = None) -> tuple[str, str] | None:
    """The first of `names` that is set (non-empty), as (name, value)."""
    env = os.environ if env is None else env
    for name in [names] if isinstance(names, str) else names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _first_name(names: str | Sequence[str]) -> str:
    return names if isinstance(names, str) else names[0]


def env_str(names: str | Sequence[str], default: str | None = None, env: Env | None = None,
            *, required: bool = False, choices: Sequence[str] | None = None) -> str | None:
    found = lookup(names, env)
    if found is None:
        if required:
            raise ConfigError(f"{_first_name(names)}: required but not set")
        return default
    name, value = found
    if choices is not None and value.lower() not in choices:
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}; got {value!r:.100}")
    return value.lower() if choices is not None else value


def env_int(names: str | Sequence[str], default: int, env: Env | None = None,
            *, minimum: int | None = None, maximum: int | None = None) -> int:
    found = lookup(names, env)
    if found is None:
        return default
    name, value = found
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r:.100}") from None
    if not _INT64_MIN <= number <= _INT64_MAX:  # Redis, PostgreSQL and timers take 64 bits at most
        raise ConfigError(f"{name}: integer out of range, got {value!r:.100}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}: must be at most {maximum}, got {number}")
    return number


def env_float(names: str | Sequence[str], default: float, env: Env | None = None,
              *, minimum: float | None = None) -> float:
    found = lookup(names, env)
    if found is None:
        return default
    name, value = found
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {value!r:.100}") from None
    if not math.isfinite(number):  # "nan", "inf", "1e999": no timeout or rate means that
        raise ConfigError(f"{name}: must be a finite number, got {value!r:.100}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}: must be a number of at least {minimum}, got {value!r:.100}")
    return number


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(names: str | Sequence[str], default: bool, env: Env | None = None) -> bool:
    found = lookup(names, env)
    if found is None:
        return default
    name, value = found
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r:.100}")


def env_list(names: str | Sequence[str], default: Sequence[str] = (), env: Env | None = None) -> list[str]:
    """Comma-separated list, items stripped, empty items dropped."""
    found = lookup(names, env)
    if found is None:
        return list(default)
    return [item.strip() for item in found[1].split(",") if item.strip()]
