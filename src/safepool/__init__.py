"""safepool: pools, clients and locks that stay correct when work fans out over processes."""

from __future__ import annotations

import logging

from . import dbapi
from ._version import __version__
from .cache import ProcessLocal, per_process
from .errors import (
    AuthkeyError,
    FactoryError,
    HostedItemError,
    LeaseError,
    ManagerUnavailable,
    PoolClosed,
    PoolTimeout,
    SafePoolError,
    TooManyWaiting,
)
from .manager import PoolManager, register_pool
from .pool import SafeConnectionPool
from .proxy import HostedItem, PoolProxy
from .remote import connect_pool, serve_pool
from .stats import LeaseInfo, PoolStats

__all__ = [
    "AuthkeyError",
    "FactoryError",
    "HostedItem",
    "HostedItemError",
    "LeaseError",
    "LeaseInfo",
    "ManagerUnavailable",
    "PoolClosed",
    "PoolManager",
    "PoolProxy",
    "PoolStats",
    "PoolTimeout",
    "ProcessLocal",
    "SafeConnectionPool",
    "SafePoolError",
    "TooManyWaiting",
    "__version__",
    "connect_pool",
    "dbapi",
    "per_process",
    "register_pool",
    "serve_pool",
]

logging.getLogger("safepool").addHandler(logging.NullHandler())
