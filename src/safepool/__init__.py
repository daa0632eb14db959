"""safepool: pools, clients and locks that stay correct when work fans out over processes."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from . import dbapi
from ._version import __version__
from .budget import Budget, BudgetStats, Permit, PermitHolder
from .cache import ProcessLocal, per_process
from .errors import (
    AuthkeyError,
    BudgetTimeout,
    BudgetUnavailable,
    FactoryError,
    HardTimeLimitExceeded,
    HostedItemError,
    LeaseError,
    LeaseRevoked,
    ManagerUnavailable,
    PoolClosed,
    PoolTimeout,
    SafePoolError,
    SoftTimeLimitExceeded,
    TaskAborted,
    TooManyWaiting,
    WorkerLost,
    WorkerResourceError,
)
from .hostbudget import HostBudget
from .manager import PoolAccessor, PoolManager, register_pool
from .pool import SafeConnectionPool
from .poolserver import PoolServer
from .proxy import HostedItem, PoolProxy
from .remote import connect_pool, serve_pool
from .stats import LeaseInfo, PoolReport, PoolStats
from .workerpool import WorkerExecutor, WorkerPool
from .workers import WorkerSetup, WorkerTerminated, safe_task, worker_resource

if TYPE_CHECKING:  # pragma: no cover - imported on first use (see __getattr__)
    from .pgbudget import PostgresBudget
    from .redisbudget import RedisBudget

__all__ = [
    "AuthkeyError",
    "Budget",
    "BudgetStats",
    "BudgetTimeout",
    "BudgetUnavailable",
    "FactoryError",
    "HardTimeLimitExceeded",
    "HostBudget",
    "HostedItem",
    "HostedItemError",
    "LeaseError",
    "LeaseInfo",
    "LeaseRevoked",
    "ManagerUnavailable",
    "Permit",
    "PermitHolder",
    "PoolAccessor",
    "PoolClosed",
    "PoolManager",
    "PoolProxy",
    "PoolReport",
    "PoolServer",
    "PoolStats",
    "PoolTimeout",
    "PostgresBudget",
    "ProcessLocal",
    "RedisBudget",
    "SafeConnectionPool",
    "SafePoolError",
    "SoftTimeLimitExceeded",
    "TaskAborted",
    "TooManyWaiting",
    "WorkerExecutor",
    "WorkerLost",
    "WorkerPool",
    "WorkerResourceError",
    "WorkerSetup",
    "WorkerTerminated",
    "__version__",
    "connect_pool",
    "dbapi",
    "per_process",
    "register_pool",
    "safe_task",
    "serve_pool",
    "worker_resource",
]

logging.getLogger("safepool").addHandler(logging.NullHandler())

# Engines whose drivers are optional extras: `import safepool` imports neither psycopg nor redis;
# the driver is imported when a budget is made (ImportError naming the extra if missing).
_LAZY = {"PostgresBudget": "pgbudget", "RedisBudget": "redisbudget"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safepool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
