"""Process targets and pool hooks for the operator-tools and metrics tests (importable by name
from spawn/forkserver children and from manager servers)."""

from __future__ import annotations

import os
import socket
from typing import Any

import safepool
from helpers import LONG


class Item:
    """A hosted item that writes what happens to it (made, reset, closed) to a log file."""

    def __init__(self, number: int, log: str) -> None:
        self.number = number
        self.log = log
        self.uses = 0
        self._write(f"made {number}")

    def _write(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def close(self) -> None:
        self._write(f"closed {self.number}")


class LoggedItems:
    """Factory of :class:`Item`, numbered from 1, logging to ``log``."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.n = 0

    def __call__(self) -> Item:
        self.n += 1
        return Item(self.n, self.log)


def reset_item(item: Item) -> bool:
    item._write(f"reset {item.number}")
    return True


def use(item: Any) -> Any:
    """Count one use of a hosted Item and return its number (any other item: its str)."""
    if not isinstance(item, Item):
        return str(item)
    item.uses += 1
    return item.number


def read_fifo(item: Item, path: str) -> str:
    """Block in the server until the test writes to (and closes) the FIFO at ``path``."""
    with open(path) as f:
        return f.read()


def log_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def number_of(value: Any) -> Any:
    """What a test reads from a held item: a hosted item's number, a by-value item itself."""
    if isinstance(value, safepool.HostedItem):
        return value.call(use)
    return str(value)


def stopped_holder(address: Any, typeid: str, authkey: bytes, conn: Any) -> None:
    """Lease one item and report it; wait (the test stops us, revokes, continues us); then try
    to use and release it, and report what each raised; then lease again."""
    pool = safepool.connect_pool(address, typeid, authkey=authkey)
    item = pool.acquire(timeout=LONG)
    conn.send(("held", os.getpid(), socket.gethostname(), number_of(item)))
    conn.recv()
    results: list[tuple[Any, ...]] = []
    steps = [("release", lambda: pool.release(item))]
    if isinstance(item, safepool.HostedItem):
        steps.insert(0, ("use", lambda: item.call(use)))
    for name, step in steps:
        try:
            step()
            results.append((name, "ok"))
        except safepool.LeaseRevoked as exc:
            results.append((name, "revoked", exc.pool, exc.lease_id, exc.action, str(exc)))
        except Exception as exc:
            results.append((name, "other", type(exc).__name__, str(exc)))
    with pool.lease(timeout=LONG) as again:
        results.append(("again", number_of(again)))
    conn.send(results)
    conn.recv()


class ItemsManager(safepool.PoolManager):
    pass


def exclusive_use(item: Item) -> int:
    """Use a hosted Item for a moment; raise if another call is using it at the same time
    (two holders of one item)."""
    if getattr(item, "busy", False):
        raise RuntimeError(f"two calls at once on item {item.number}")
    item.busy = True  # type: ignore[attr-defined]
    try:
        for _ in range(3000):  # long enough for another server thread to run meanwhile
            pass
    finally:
        item.busy = False  # type: ignore[attr-defined]
    item.uses += 1
    return item.number
