"""Validation of configuration arguments, with messages that name the argument and the value."""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

__all__ = [
    "AUTO",
    "DB_MAX_IDLE",
    "DB_MAX_LIFETIME",
    "DEFAULT_TIMEOUT",
    "check_callable",
    "check_clock",
    "check_count",
    "check_duration",
    "check_name",
    "check_pool_options",
    "redact",
]

DEFAULT_TIMEOUT = 30.0
# The default of reset, max_lifetime and max_idle: decided by the items (see SafeConnectionPool).
AUTO: Literal["auto"] = "auto"
DB_MAX_LIFETIME = 3600.0  # seconds: max_lifetime="auto" for connections to a database server
DB_MAX_IDLE = 600.0  # seconds: max_idle="auto" for connections to a database server

# user:secret@ in URLs, and password=/secret=/token=... in key-value strings (DSNs, options).
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.I)
_KEY_VALUE_SECRETS = re.compile(
    r"(?P<head>\b(?:password|passwd|pwd|secret|token|api_?key|authkey)\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&)]+)",
    re.I,
)


def redact(text: str) -> str:
    """``text`` with credentials in URLs and ``password=...``-style pairs replaced by ``***``."""
    text = _URL_CREDENTIALS.sub(r"\g<head>***@", text)
    return _KEY_VALUE_SECRETS.sub(r"\g<head>***", text)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def check_count(name: str, value: Any, *, minimum: int) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_duration(name: str, value: Any, *, allow_zero: bool, allow_inf: bool) -> None:
    """``value`` must be a real number of seconds: not NaN, not negative."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {_describe(value)}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got NaN")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_callable(name: str, value: Any) -> None:
    if not callable(value):
        # The type only: the value itself may be a connection string with a password in it.
        raise TypeError(f"{name} must be callable, got a {type(value).__name__} object")


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"name must be a non-empty str, got {_describe(value)}")
    return value


def check_clock(clock: Any) -> None:
    """``clock`` must be callable and return a real, finite number of seconds (it is called
    once, here, so a clock that returns something else fails now rather than inside a lease)."""
    check_callable("clock", clock)
    try:
        now = clock()
    except Exception as exc:
        raise ValueError(f"clock() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise TypeError(
            f"clock() must return a finite number of seconds (like time.monotonic()), "
            f"got {_describe(now)}"
        )


def check_pool_options(
    *,
    factory: Any,
    max_size: Any = 10,
    min_size: Any = 0,
    timeout: Any = DEFAULT_TIMEOUT,
    max_waiting: Any = 0,
    check: Any = None,
    reset: Any = AUTO,
    configure: Any = None,
    close: Any = None,
    max_lifetime: Any = AUTO,
    max_idle: Any = AUTO,
    leak_timeout: Any = None,
    name: Any = None,
    background: Any = True,
    clock: Any = time.monotonic,
    budget: Any = None,
) -> None:
    """Validate :class:`~safepool.SafeConnectionPool` options without making a pool (or any item).

    Raises ``TypeError``/``ValueError`` naming the argument and the value. The manager calls this
    in the client, before options travel to a server, so errors arrive early and with their type.
    """
    check_callable("factory", factory)
    check_count("max_size", max_size, minimum=1)
    check_count("min_size", min_size, minimum=0)
    if min_size > max_size:
        raise ValueError(
            f"min_size ({min_size}) must not exceed max_size ({max_size}); "
            "raise max_size or lower min_size"
        )
    check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
    check_count("max_waiting", max_waiting, minimum=0)
    if isinstance(reset, str) and reset != AUTO:
        raise ValueError(
            f"reset must be a callable, None (never reset) or 'auto' (the default: roll back "
            f"DB-API connections released inside a transaction), got {reset!r}"
        )
    for arg_name, hook in (("check", check), ("reset", reset), ("configure", configure),
                           ("close", close)):  # fmt: skip
        if hook is not None and not (arg_name == "reset" and hook == AUTO):
            check_callable(arg_name, hook)
    for arg_name, value, default in (
        ("max_lifetime", max_lifetime, DB_MAX_LIFETIME),
        ("max_idle", max_idle, DB_MAX_IDLE),
    ):
        if isinstance(value, str) and value != AUTO:
            raise ValueError(
                f"{arg_name} must be a number of seconds, None (never) or 'auto' (the default: "
                f"{default:g}s for connections to a database server, never for other items), "
                f"got {value!r}"
            )
    for arg_name, value in (
        ("max_lifetime", max_lifetime),
        ("max_idle", max_idle),
        ("leak_timeout", leak_timeout),
    ):
        if value is not None and not (arg_name != "leak_timeout" and value == AUTO):
            check_duration(arg_name, value, allow_zero=False, allow_inf=True)
    if name is not None:
        check_name(name)
    if not isinstance(background, bool):
        raise TypeError(f"background must be a bool, got {type(background).__name__}")
    check_clock(clock)
    if budget is not None and not all(
        callable(getattr(budget, method, None)) for method in ("acquire", "release")
    ):
        raise TypeError(
            f"budget must be a budget (safepool.HostBudget, PostgresBudget, RedisBudget, or "
            f"anything with acquire(timeout) and release(permit)), got a {type(budget).__name__}"
        )
