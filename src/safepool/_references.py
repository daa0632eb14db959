"""A proxy's reference to its hosted object, and dropping it once the proxy is collected.

Each :class:`~safepool.PoolProxy` holds one reference to its pool in the server (an incref,
bound to its process's session). When the proxy is collected, the reference must be dropped
(a decref): that is a request to the server, which a finalizer must never make (see
:class:`Reference`). The proxy module queues and sends them through this one.
"""

from __future__ import annotations

import collections
import pickle
import weakref
from typing import Any

from . import _fork
from ._transport import connect

__all__ = ["Reference", "drop_references", "dropped", "references"]


class Reference(weakref.ref):  # type: ignore[type-arg]
    """A proxy's reference to its hosted object, dropped when the proxy is collected.

    Dropping it means a request to the server, and a finalizer must do no such thing: a signal
    arriving during the ~1 ms it takes would be raised inside the finalizer and swallowed
    ("Exception ignored in ...": a Ctrl+C lost). So the weak reference's callback is C code
    (``dropped.append``) that only queues it, and the next call this process makes to a
    server sends the queued decrefs (:func:`drop_references`). A process that makes no more
    calls drops them when it ends, with its session.
    """

    __slots__ = ("address", "authkey", "ident", "session")
    address: Any
    authkey: bytes
    ident: str
    session: str | None


# This process's references to hosted objects: alive until their proxy is collected, then
# queued in dropped (deque and set operations are atomic: no lock).
references: set[Reference] = set()
dropped: collections.deque[Reference] = collections.deque()


def drop_references() -> None:
    """Send the decrefs of the proxies collected since the last call (see :class:`Reference`).

    A decref cut short before its connection is made stays queued, for the next call to send;
    one cut short later may have reached the server, and is not sent twice (a second decref
    could drop another proxy's reference)."""
    while True:
        try:
            reference = dropped.popleft()
        except IndexError:
            return
        try:
            conn = connect(reference.address, reference.authkey)
        except Exception:  # the server is gone, or refuses us: nothing to drop then
            references.discard(reference)
            continue
        except BaseException:
            dropped.appendleft(reference)  # not sent: the next call sends it
            raise
        references.discard(reference)
        message: tuple[Any, ...] = (None, "decref", (reference.ident, reference.session), {})
        try:
            conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        finally:
            conn.close()


class _References:
    def _after_fork_in_child(self) -> None:
        # The parent's references are the parent's to drop: forget them without a callback
        # (a weak reference freed before its referent never calls back).
        dropped.clear()
        references.clear()


_references_fork_fixes = _References()
_fork.register(_references_fork_fixes)
