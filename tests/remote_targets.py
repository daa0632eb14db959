"""Process targets and helpers for the lease-reclaim and remote-server tests."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safepool
from helpers import LONG

TESTS = Path(__file__).resolve().parent


class ClosingTokens:
    """By-value tokens whose close() is recorded in the file named by $SAFEPOOL_TEST_CLOSE_LOG."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> Token:
        self.n += 1
        return Token(f"token-{self.n}")


class Token(str):
    def close(self) -> None:
        log = os.environ.get("SAFEPOOL_TEST_CLOSE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"closed {self}\n")


class SecretFactory:
    """A factory holding a credential: it must never show in reprs, logs or errors."""

    def __init__(self) -> None:
        self.dsn = "postgresql://app:hunter2-secret@db.internal/app"

    def __call__(self) -> str:
        return "item"

    def __repr__(self) -> str:
        return f"SecretFactory({self.dsn!r})"


def pool_for(target: Any) -> Any:
    """A pool proxy, or (address, typeid, authkey) of a served pool to connect to."""
    if isinstance(target, tuple):
        address, typeid, authkey = target
        return safepool.connect_pool(address, typeid, authkey=authkey)
    return target


def hold(target: Any, conn: Any, mode: str) -> None:
    """Lease one item, report it, then wait to be killed (or told to release).

    mode "plain": acquire() and hold. "signal": a SIGTERM handler raises an Exception
    subclass (seed 003), and the item is held with acquire() (no cleanup runs). "with": the same
    handler, but the item is held in `with pool.lease()`. "fork": fork a child that stays alive
    (holding every inherited descriptor), then hold.
    """
    pool = pool_for(target)
    if mode in ("signal", "with"):

        def raise_error(signum: int, frame: Any) -> None:
            raise RuntimeError("terminated by signal")

        signal.signal(signal.SIGTERM, raise_error)
    if mode == "with":
        with pool.lease(timeout=LONG) as item:
            conn.send(("held", str(item), os.getpid()))
            conn.recv()
        return
    item = pool.acquire(timeout=LONG)
    child = None
    if mode == "fork":
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # the grandchild: lives until the pipe closes, holding inherited fds
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        os.close(read_end)
    conn.send(("held", str(item), child))
    conn.recv()  # blocks until the test kills us (or sends "release")
    pool.release(item)


def thread_holds(target: Any, conn: Any) -> None:
    """A thread leases an item and ends; the process keeps the lease, then reports."""
    pool = pool_for(target)
    pool.release(pool.acquire(timeout=LONG))  # the process's own: a connection, or the table
    got: list[Any] = []
    fds_before = len(os.listdir("/proc/self/fd"))
    worker = threading.Thread(target=lambda: got.append(pool.acquire(timeout=LONG)))
    worker.start()
    worker.join(LONG)
    # The thread's connection to the server is gone with the thread.
    import gc

    gc.collect()
    fds_after = len(os.listdir("/proc/self/fd"))
    conn.send(("held", str(got[0]), fds_before, fds_after))
    conn.recv()  # the test checks the lease is still ours
    pool.release(got[0])
    conn.send(("released",))


def client_work(address: Any, typeid: str, authkey: bytes, count: int) -> tuple[int, list[str]]:
    """A client of a served pool that registers only the typeid."""

    class Client(safepool.PoolManager):
        pass

    safepool.register_pool(Client, typeid)
    manager = Client(address=address, authkey=authkey)
    manager.connect()
    pool = getattr(manager, typeid)()
    seen = []
    for _ in range(count):
        with pool.lease(timeout=LONG) as item:
            seen.append(str(item))
    return os.getpid(), seen


@contextlib.contextmanager
def served(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[Any, Any]]:
    """Run ``python -m safepool serve ARGS`` and yield (address, process) once it listens."""
    environ = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "safepool", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environ,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    proc.lines = lines  # type: ignore[attr-defined]
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    failed = True  # until the block ends cleanly; if it does not, the server's stderr is printed
    try:
        line = read_line(proc, LONG)
        if not line.startswith("safepool: serving pool"):
            raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()!r}")
        text = line.rsplit(" at ", 1)[1].strip()
        address: Any = text[len("unix:") :] if text.startswith("unix:") else text
        if not text.startswith("unix:"):
            host, port = text.rsplit(":", 1)
            address = (host, int(port))
        yield address, proc
        failed = False
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(LONG)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(LONG)
        if failed:  # (pytest shows it under the failure as captured stderr)
            print(f"server exit status {proc.returncode}; its stderr:", file=sys.stderr)
            print(proc.stderr.read(), file=sys.stderr)
        proc.stdout.close()
        proc.stderr.close()


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def read_line(proc: Any, timeout: float) -> str:
    """The server's next line of output (read by a thread, so nothing buffered is missed)."""
    try:
        return proc.lines.get(timeout=timeout)  # type: ignore[no-any-return]
    except queue.Empty:
        raise TimeoutError("no output from the server") from None


# Module-level factories, for `python -m safepool serve --factory remote_targets:...`.
closing_tokens = ClosingTokens()
secret_factory = SecretFactory()


_worker_pool: Any = None


def init_holder_pool(pool: Any) -> None:
    global _worker_pool
    _worker_pool = pool


def lease_and_block(with_block: bool) -> None:
    """A Pool task that takes a lease and never finishes (until its worker is terminated)."""
    if with_block:
        with _worker_pool.lease(timeout=LONG):
            threading.Event().wait()
    else:
        _worker_pool.acquire(timeout=LONG)
        threading.Event().wait()
