"""safepool: pools, clients and locks that stay correct when work fans out over processes."""

from __future__ import annotations

import logging

from ._version import __version__
from .errors import (
    FactoryError,
    LeaseError,
    ManagerUnavailable,
    PoolClosed,
    PoolTimeout,
    SafePoolError,
    TooManyWaiting,
)
from .pool import SafeConnectionPool
from .stats import PoolStats

__all__ = [
    "FactoryError",
    "LeaseError",
    "ManagerUnavailable",
    "PoolClosed",
    "PoolStats",
    "PoolTimeout",
    "SafeConnectionPool",
    "SafePoolError",
    "TooManyWaiting",
    "__version__",
]

logging.getLogger("safepool").addHandler(logging.NullHandler())
