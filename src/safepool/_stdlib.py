"""The multiprocessing internals safepool builds on, in one place.

``multiprocessing.managers`` has no public API for what a manager-hosted pool needs (rebuilding a
proxy, a server's state). These names are the stdlib's own, unchanged across CPython 3.10-3.13
(compared line by line); typeshed does not describe them, so they are re-exported here with
loose types.
"""

from __future__ import annotations

from multiprocessing import managers, util
from typing import Any

__all__ = ["RebuildProxy", "State", "public_methods", "thread_locals"]

RebuildProxy: Any = getattr(managers, "RebuildProxy")  # noqa: B009
public_methods: Any = getattr(managers, "public_methods")  # noqa: B009
State: Any = getattr(managers, "State")  # noqa: B009


def thread_locals(address: Any) -> Any:
    """The thread-local namespace that every proxy to the server at ``address`` shares in this
    process (``BaseProxy._address_to_local``, made as ``BaseProxy.__init__`` makes it): a
    thread's connection to that server lives there, so a proxy made later finds it."""
    base: Any = managers.BaseProxy
    with base._mutex:
        pair = base._address_to_local.get(address)
        if pair is None:
            pair = util.ForkAwareLocal(), getattr(managers, "ProcessLocalSet")()  # noqa: B009
            base._address_to_local[address] = pair
    return pair[0]
