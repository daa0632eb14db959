"""safepool: pools, clients and locks that stay correct when work fans out over processes."""

from __future__ import annotations

import logging

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
from .manager import PoolManager, register_pool
from .pool import SafeConnectionPool
from .proxy import HostedItem, PoolProxy
from .remote import connect_pool, serve_pool
from .stats import LeaseInfo, PoolStats
from .workerpool import WorkerExecutor, WorkerPool
from .workers import WorkerSetup, WorkerTerminated, safe_task, worker_resource

__all__ = [
    "AuthkeyError",
    "Budget",
    "BudgetStats",
    "BudgetTimeout",
    "BudgetUnavailable",
    "FactoryError",
    "HardTimeLimitExceeded",
    "HostedItem",
    "HostedItemError",
    "LeaseError",
    "LeaseInfo",
    "ManagerUnavailable",
    "Permit",
    "PermitHolder",
    "PoolClosed",
    "PoolManager",
    "PoolProxy",
    "PoolStats",
    "PoolTimeout",
    "ProcessLocal",
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
