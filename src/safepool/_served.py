"""The server's side of one client thread's connection, and what is in flight on it.

Each connection a client thread opens for method calls is served by one server thread, which
keeps a :class:`ServerChannel` for it (see :mod:`safepool._protocol` for the exchanges):

* ``session``: the client process's session id (None for a stdlib client);
* ``unacked``: what the last reply granted (a lease, or a pool created for the client's
  session), until the client sends its next request (which shows the reply was taken). An
  :data:`~safepool._protocol.ABORT`, or a reply that cannot be sent, gives it back
  (``take_back()``);
* a wait in progress: while a call waits for an item, the connection is watched (one watcher
  thread per server, :class:`Watcher`). If the client goes away -- its connection ends, it sends
  ABORT, or its session ends -- the wait is cancelled at once: a dead waiter never keeps its
  place in the queue, nor counts in ``waiting`` or ``max_waiting``.

A client never sends anything while its call is in flight, so a connection that becomes
readable during a wait means the client has gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
from collections.abc import Callable
from typing import Any

from . import _fork

__all__ = ["ClientGone", "ServerChannel", "Watcher", "current_channel", "serve_channel"]

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """Why a wait was cancelled: the client that made the call is gone."""


class ServerChannel:
    """What the server knows of one client thread's connection (one server thread each)."""

    __slots__ = ("_cancel", "_gone", "_lock", "fd", "session", "unacked")

    # _lock guards _cancel and _gone. unacked is touched only by the serving thread.
    def __init__(self, fd: int, session: str | None) -> None:
        self.fd = fd
        self.session = session
        self.unacked: Any = None  # what the last reply granted: anything with take_back()
        self._lock = threading.Lock()
        self._cancel: Callable[[BaseException], None] | None = None
        self._gone = False

    # -- the pool's WaitHook ----------------------------------------------------------------

    def waiting(self, cancel: Callable[[BaseException], None]) -> None:
        with self._lock:
            gone = self._gone
            if not gone:
                self._cancel = cancel
        if gone:
            cancel(ClientGone("the client went away before its call could wait"))
        else:
            watcher.watch(self.fd, self.client_gone)

    def done_waiting(self) -> None:
        watcher.unwatch(self.fd)
        with self._lock:
            self._cancel = None

    # -- ends ---------------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client has gone (its connection ended or aborted, or its session ended):
        cancel the wait in progress, if any, and any later one."""
        with self._lock:
            self._gone = True
            cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel(ClientGone("the client went away while waiting"))

    def take_back_unacked(self) -> None:
        """The client did not take the last reply: the lease it granted goes back."""
        record, self.unacked = self.unacked, None
        if record is not None:
            record.take_back()


# The channel of the client connection this server thread serves (set when it is accepted).
_served = threading.local()


def serve_channel(channel: ServerChannel | None) -> None:
    _served.channel = channel


def current_channel() -> ServerChannel | None:
    return getattr(_served, "channel", None)


class Watcher:
    """One thread per server process that notices clients going away while their calls wait.

    ``watch(fd, callback)`` runs ``callback()`` once, in the watcher thread, when ``fd`` becomes
    readable; ``unwatch(fd)`` cancels that. The thread starts on first use.
    """

    # _lock guards _callbacks, _selector and _thread.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._start()
            assert self._selector is not None
            self._callbacks[fd] = callback
            self._selector.register(fd, selectors.EVENT_READ)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")  # a select()- or poll()-based selector must look again

    def unwatch(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None and self._selector is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(fd)

    def _start(self) -> None:
        """Under _lock: make the selector and start the thread."""
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name="safepool-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        while True:
            for key, _ in selector.select():
                if key.fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 512)
                    continue
                with self._lock:
                    callback = self._callbacks.pop(key.fd, None)
                    if callback is not None:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            selector.unregister(key.fd)
                if callback is not None:
                    try:
                        callback()
                    except Exception:  # pragma: no cover - a bug; never stop watching
                        logger.exception("safepool server: cancelling a wait failed")

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; this process watches nothing yet.
        self._lock = threading.Lock()
        self._callbacks = {}
        self._selector = None
        self._thread = None


watcher = Watcher()
_fork.register(watcher)
