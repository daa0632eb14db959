"""Logging in a manager server process: records reach someone by default.

safepool's loggers (``logging.getLogger("safepool")`` and its children) have only a
``NullHandler``, as a library's should. A :class:`~safepool.PoolManager` server runs in a process
of its own, though, where nobody configures logging: its warnings (a lease held past
``leak_timeout``, a holder that died, a revoked lease, a failing hook) would vanish. So a server
started with ``PoolManager(log_level=...)`` (default ``"WARNING"``) sets the ``safepool`` logger to
that level and, unless logging there is configured already (a handler on the root logger or on
``safepool``, e.g. inherited through fork), writes its records to the server's stderr.
``log_level=None`` leaves logging alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._starter import end_with_parent

__all__ = ["HANDLER_NAME", "ServerLogging", "check_log_level", "configure_server_logging"]

HANDLER_NAME = "safepool-server-stderr"
FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def check_log_level(level: Any) -> int | None:
    """``None``, a level number, or a level name (``"warning"``, ``"DEBUG"``) -> its number."""
    if level is None:
        return None
    if isinstance(level, bool) or not isinstance(level, (int, str)):
        raise TypeError(f"log_level must be a level name, a number or None, got {level!r}")
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())  # the number, for a known name
        if not level or not isinstance(number, int):
            raise ValueError(
                f"log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (or a number, "
                f"or None to leave logging alone), got {level!r}"
            )
        return number
    if level < 0:
        raise ValueError(f"log_level must be >= 0, got {level}")
    return level


def _configured(logger: logging.Logger) -> bool:
    """Whether records of ``logger`` already reach a handler other than a NullHandler."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def configure_server_logging(level: int) -> None:
    """In a server process: the ``safepool`` logger at ``level``, to stderr unless logging is
    configured already. Idempotent."""
    logger = logging.getLogger("safepool")
    logger.setLevel(level)
    if _configured(logger):
        return
    handler = logging.StreamHandler()  # sys.stderr
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)


class ServerLogging:
    """The initializer a PoolManager gives its server process: set up logging, then run the
    user's own initializer (picklable, for spawn and forkserver)."""

    def __init__(
        self, level: int | None, initializer: Callable[..., object] | None, initargs: Any
    ) -> None:
        self.level = level
        self.initializer = initializer
        self.initargs = tuple(initargs)

    def __call__(self) -> None:
        end_with_parent()  # a PoolManager's server: it ends when its starter dies
        if self.level is not None:
            configure_server_logging(self.level)
        if self.initializer is not None:
            self.initializer(*self.initargs)
