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


def _guard_proxy_mutex() -> None:
    """Make ``with BaseProxy._mutex:`` (in ``BaseProxy.__init__``, which every proxy runs) free
    of the gap described in :func:`thread_locals`: the mutex's class becomes a subclass whose
    ``__enter__``/``__exit__`` are its C lock's own, so ``with`` calls C code directly, as for a
    plain lock. The object, its lock and its after-fork reset stay the same."""
    mutex: Any = getattr(managers.BaseProxy, "_mutex")  # noqa: B009
    if type(mutex) is not util.ForkAwareThreadLock:
        return  # done already, or not the stdlib's (left alone)
    lock: Any = getattr(mutex, "_lock")  # noqa: B009
    namespace = {
        "__slots__": (),
        "__enter__": staticmethod(lock.__enter__),
        "__exit__": staticmethod(lock.__exit__),
    }
    mutex.__class__ = type("ForkAwareThreadLock", (util.ForkAwareThreadLock,), namespace)


_guard_proxy_mutex()


def thread_locals(address: Any) -> Any:
    """The thread-local namespace that every proxy to the server at ``address`` shares in this
    process (``BaseProxy._address_to_local``, made as ``BaseProxy.__init__`` makes it): a
    thread's connection to that server lives there, so a proxy made later finds it."""
    base: Any = managers.BaseProxy
    pair = base._address_to_local.get(address)  # (one dict lookup: atomic)
    if pair is None:
        # The stdlib's mutex is a ForkAwareThreadLock, whose __enter__ is Python code: a signal
        # handler raising as it returns (after the lock was taken) would leave the lock held for
        # good, and every later proxy of this process would hang. Its C lock has no such gap.
        with base._mutex._lock:
            pair = base._address_to_local.get(address)
            if pair is None:
                pair = util.ForkAwareLocal(), getattr(managers, "ProcessLocalSet")()  # noqa: B009
                base._address_to_local[address] = pair
    return pair[0]
