"""Leases of a proxy collected while they still held an item: given back by a thread of their own.

A ``with proxy.lease():`` whose ``__exit__`` was cut short before it began its release (a signal
handler raising at the method's first instruction) leaves the lease object holding its claim.
When the object is collected, its weak reference's callback -- C code, :data:`settler`'s queue's
``put`` -- queues the reference, and one daemon thread per process (started by the first
``lease()``) gives the claim back at once. No Python code runs in the finalizer (a signal landing
there would be swallowed), and the release runs in a thread no signal handler interrupts. Before,
the claim waited for the process's next call on that proxy: a thread already waiting for the
item (the only one) waited its whole timeout.

After a fork the child starts its own thread on its first ``lease()``; leases the parent held are
the parent's (never released by the child).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from . import _fork
from ._signals import start_without_signals

__all__ = ["settler"]

logger = logging.getLogger(__name__)


class Settler:
    """The queue of orphaned lease references and the thread that settles them."""

    def __init__(self) -> None:
        # _lock guards running (whether this process's thread was started). sink is the queue's
        # put: the weak references' callback, C code, safe to call from a finalizer.
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sink = self._queue.put
        self.running = False

    def start(self) -> None:
        """Start this process's settling thread if it is not running (idempotent)."""
        with self._lock:
            if self.running:
                return
            thread = threading.Thread(target=self._run, name="safepool-settler", daemon=True)
            start_without_signals(thread)
            self.running = True

    def _run(self) -> None:
        get = self._queue.get
        while True:
            ref = get()
            owner = ref.owner
            try:
                owner._settle_orphan(ref)
            except Exception as exc:  # the server is gone, say: its session ends the lease
                logger.warning(
                    "safepool: could not give back a lease collected while held (%s): %s",
                    owner,
                    exc,
                )

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork. The queue stays (proxies hold its put as their
        # sink), emptied: the parent's leases queued in it are the parent's to give back.
        self._lock = threading.Lock()
        self.running = False
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


settler = Settler()
_fork.register(settler)
