"""Fork handling, in one place.

Anything that must not be shared between a parent and a child after ``fork()`` registers here:
``register(obj)`` adds ``obj`` to a :class:`weakref.WeakSet`, and a single
``os.register_at_fork(after_in_child=...)`` hook calls ``obj._after_fork_in_child()`` on each,
in the child, before any other code runs there. The hook runs for ``os.fork()`` and for every
multiprocessing start method that forks (``fork``; ``forkserver`` forks from a clean server, and
``spawn`` starts a fresh interpreter, so there is nothing to reset in those).

Objects inherited from the parent (sockets, connections, sessions) must never be used *or closed*
in the child: closing a connection from the child can send a terminate message on the socket the
parent still uses. :func:`abandon` keeps such objects referenced for the life of the child, so no
garbage-collector finaliser closes them either, not even at interpreter shutdown (a raw
``os.fork()`` child that exits normally clears module globals, and with them plain references).

The hook only swaps in fresh state; it never takes a lock that another (vanished) thread may have
held at the time of the fork, so a fork in the middle of a pool operation cannot deadlock the
child.

``generation()`` counts the forks this process descends from, for cheap "am I still the same
process?" checks without a system call.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Protocol

try:
    import ctypes

    _incref: Any = ctypes.pythonapi.Py_IncRef
    _py_object: Any = ctypes.py_object
except (ImportError, AttributeError):  # pragma: no cover - no ctypes on this platform
    _incref = _py_object = None

__all__ = ["abandon", "generation", "register"]

logger = logging.getLogger(__name__)


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_registry: weakref.WeakSet[Any] = weakref.WeakSet()
# Objects inherited across fork(), kept alive (never closed) for the life of this process.
_abandoned: list[object] = []
_generation = 0


def register(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while ``obj`` is alive."""
    _registry.add(obj)


def abandon(obj: object) -> None:
    """Keep ``obj`` referenced for the life of this process so that nothing ever closes it."""
    _abandoned.append(obj)
    if _incref is not None:
        # Interpreter shutdown clears module globals, _abandoned included; one reference that
        # nothing ever releases keeps the object (and its finaliser) out of reach even then.
        _incref(_py_object(obj))


def generation() -> int:
    """How many forks separate this process from the one that imported safepool first."""
    return _generation


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1
    for obj in list(_registry):
        try:
            obj._after_fork_in_child()
        except Exception:  # pragma: no cover - a broken object must not break the child
            logger.exception("safepool: resetting %r after fork failed", obj)


os.register_at_fork(after_in_child=_after_fork_in_child)
