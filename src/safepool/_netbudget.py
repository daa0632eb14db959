"""What the cross-host budget engines (``PostgresBudget``, ``RedisBudget``) share.

Private: the lazy import of an optional driver, timeout handling, running ``on_lost`` callbacks
outside every lock, and the per-object counters that ``stats()`` reports where the engine keeps
no counter of its own.
"""

from __future__ import annotations

import importlib
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import ModuleType

from ._config import check_callable, check_duration
from .budget import Permit
from .errors import BudgetTimeout

__all__ = [
    "HOST",
    "Counters",
    "check_on_lost",
    "deadline_of",
    "fire_lost",
    "import_driver",
    "timeout_error",
]

logger = logging.getLogger("safepool.budget")

#: this host's name, as holders() reports it
HOST = socket.gethostname()

OnLost = Callable[[Permit], object]


def import_driver(module: str, extra: str, engine: str) -> ModuleType:
    """Import an optional driver, or raise ImportError naming the extra that installs it.

    A module already imported is taken from ``sys.modules``: ``importlib.import_module`` takes
    an import lock each time on Python 3.10, and that lock's weak-reference callback is a place
    where a signal handler's exception (Ctrl+C) would be lost."""
    found = sys.modules.get(module)
    if found is not None and not getattr(found.__spec__, "_initializing", False):
        return found
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{engine} needs the {module!r} package, which is not installed: "
            f"pip install 'safepool[{extra}]'"
        ) from exc


def check_on_lost(on_lost: object) -> OnLost | None:
    if on_lost is not None:
        check_callable("on_lost", on_lost)
    return on_lost  # type: ignore[return-value]


def deadline_of(timeout: float | None) -> float:
    """The monotonic deadline of a wait of ``timeout`` seconds (None: no limit)."""
    if timeout is None:
        return math.inf
    check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
    return time.monotonic() + timeout


def timeout_error(name: str, limit: int, timeout: float | None) -> BudgetTimeout:
    return BudgetTimeout(
        f"budget {name!r}: no permit came free within {timeout}s (all {limit} are held); "
        "pass a longer timeout, or raise the budget's limit"
    )


def fire_lost(
    name: str,
    lost: Iterable[tuple[Permit, list[OnLost]]],
    on_lost: OnLost | None,
) -> None:
    """Run the lost listeners of each permit, then the budget's ``on_lost``; log, never raise.

    Called with no engine lock held (the callbacks may call back into the budget).
    """
    for permit, listeners in lost:
        logger.warning(
            "budget %r: permit %s of pid %s was lost: %s",
            name,
            permit.token,
            permit.pid,
            permit.lost_reason,
        )
        callbacks = [*listeners, on_lost] if on_lost is not None else listeners
        for callback in callbacks:
            try:
                callback(permit)
            except Exception:
                logger.exception("budget %r: an on_lost callback raised", name)


class Counters:
    """Per-object counters (this process, since the budget object was made or inherited)."""

    __slots__ = ("_lock", "acquired", "reclaimed", "timeouts", "waiting")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards every field; taken alone (no lock inside it)
        self.acquired = 0
        self.timeouts = 0
        self.reclaimed = 0
        self.waiting = 0

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + n)
