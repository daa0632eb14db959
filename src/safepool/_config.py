"""Validation of configuration arguments, with messages that name the argument and the value."""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["check_callable", "check_count", "check_duration", "check_name", "redact"]

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
