"""The multiprocessing internals safepool builds on, in one place.

``multiprocessing.managers`` has no public API for what a manager-hosted pool needs (rebuilding a
proxy, a server's state). These names are the stdlib's own, unchanged across CPython 3.10-3.13
(compared line by line); typeshed does not describe them, so they are re-exported here with
loose types.
"""

from __future__ import annotations

from multiprocessing import managers
from typing import Any

__all__ = ["RebuildProxy", "State", "public_methods"]

RebuildProxy: Any = getattr(managers, "RebuildProxy")  # noqa: B009
public_methods: Any = getattr(managers, "public_methods")  # noqa: B009
State: Any = getattr(managers, "State")  # noqa: B009
