"""Process targets for the fast-path tests (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import safepool
from helpers import LONG


class Tokens:
    def __init__(self, prefix: str = "item", size: int = 0) -> None:
        self.prefix = prefix
        self.size = size
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        return f"{self.prefix}-{self.made}" + "x" * self.size


def ledger_worker(pool: Any, ledger: str, seconds: float, seed: int, out: Any) -> None:
    """8 threads leasing at random; each holding is proven by creating a file named after the
    item with O_EXCL (a second holder of the same item would fail to create it)."""
    rng = random.Random(seed)
    errors: list[str] = []
    counts = [0]
    fast = pool._fast_leaser() is not None

    def work() -> None:
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                with pool.lease(timeout=LONG) as item:
                    mark = Path(ledger) / item
                    fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    time.sleep(rng.uniform(0, 0.002))
                    os.close(fd)
                    os.unlink(mark)
                    counts[0] += 1
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    out.send((os.getpid(), fast, counts[0], errors))


def remote_client(address: str, authkey_hex: str, count: int) -> None:
    """A client that cannot see the server's /dev/shm (run in its own mount namespace):
    it must use round trips, and share the pool correctly with same-host clients."""

    class Client(safepool.PoolManager):
        pass

    safepool.register_pool(Client, "tokens")
    host, port = address.rsplit(":", 1)
    client = Client(address=(host, int(port)), authkey=bytes.fromhex(authkey_hex))
    client.connect()
    pool = client.tokens()  # type: ignore[attr-defined]
    seen = set()
    for _ in range(count):
        with pool.lease(timeout=LONG) as item:
            seen.add(item)
    fast = pool._fast_leaser() is not None
    print(f"fast={fast} leases={count} items={sorted(seen)}", flush=True)


if __name__ == "__main__":
    remote_client(sys.argv[1], sys.argv[2], int(sys.argv[3]))


def churn_until_killed(pool: Any, ready_fd: int, wait_first: bool) -> None:
    """A raw fork() child: report that the table is in use, then lease and release on it until
    SIGKILLed (``wait_first``: first wait in the table's queue for an item the parent holds)."""
    try:
        assert pool._fast_leaser() is not None, "not on the fast path"
        os.write(ready_fd, b"r")
        if wait_first:
            pool.acquire(timeout=float("inf"))
        while True:
            item = pool.acquire(timeout=LONG)
            pool.release(item)
            with pool.lease(timeout=LONG):
                pass
    finally:
        os._exit(1)


def close_pool(pool: Any) -> None:
    """Close a shared pool from another process."""
    pool.close()
