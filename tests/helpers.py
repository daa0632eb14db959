"""Shared test helpers: timeouts, thread runners, fork runners, service probes.

Importable by name from test modules and from child processes (spawn/forkserver put the tests
directory on sys.path), so process targets live in modules like this one, not in closures.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import random
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Timeouts. SHORT: something that should happen at once (a wake-up, a release). LONG: work that
# involves starting processes or many iterations. Tests never *wait* for these to elapse; they
# only bound how long a broken build can hang.
SHORT = 5.0
LONG = 60.0

START_METHODS = ("fork", "spawn", "forkserver")

PG_DSN = os.environ.get("SAFEPOOL_TEST_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
REDIS_URL = os.environ.get("SAFEPOOL_TEST_REDIS", "redis://127.0.0.1:6379/0")

FORK_WARNING = "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"

# Fault-injection sweeps and stress runs are seeded and sized here, so every failure can be
# replayed: SAFEPOOL_SEED=<seed> reruns the same interruption points; SAFEPOOL_LONG=1 (or
# pytest --long) runs the long sweeps meant for local runs.
SEED = int(os.environ.get("SAFEPOOL_SEED", "20261129"))
FULL_SWEEP_VERSION = (3, 11)  # CI runs the full sweep on this version, a sample on the others


def long_run() -> bool:
    return os.environ.get("SAFEPOOL_LONG") == "1"


def sweep_size(default: int, *, other_versions: int | None = None, long: int | None = None) -> int:
    """How many points (or iterations) a sweep runs: ``default`` on Python 3.11, which CI runs
    in full; ``other_versions`` (default: a quarter) on the others; ``long`` (default: 5x) with
    ``pytest --long`` or ``SAFEPOOL_LONG=1``."""
    if long_run():
        return long if long is not None else 5 * default
    if sys.version_info[:2] == FULL_SWEEP_VERSION:
        return default
    return other_versions if other_versions is not None else max(1, default // 4)


def seeded(name: str) -> random.Random:
    """A random generator for one sweep: the run's seed mixed with the sweep's name, so each
    sweep's points are reproducible on their own (name the seed in failure messages)."""
    return random.Random(f"{SEED}:{name}")


def run_threads(count: int, target: Callable[[int], Any], *, timeout: float = LONG) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads released together by a Barrier.

    Returns the results in order; re-raises the first exception a thread raised.
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = target(i)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), name=f"t{i}") for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if errors:
        raise errors[0]
    if alive:
        raise TimeoutError(f"threads still running after {timeout}s: {alive}")
    return results


class ThreadResult:
    """A background thread whose return value or exception is re-raised on join()."""

    def __init__(self, target: Callable[[], Any], name: str = "bg") -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self._result = target()
        except BaseException as exc:
            self._error = exc

    def join(self, timeout: float = SHORT) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"thread {self._thread.name} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def wait_until(predicate: Callable[[], bool], timeout: float = SHORT, what: str = "") -> None:
    """Poll an observable condition (not a blind sleep) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate}")
        time.sleep(0.001)


def readable(fd: Any, timeout: float) -> bool:
    """Whether ``fd`` (a descriptor or an object with ``fileno()``) becomes readable within
    ``timeout`` seconds. poll(), not select(): a worker running many tests may hold
    descriptors numbered past select()'s limit of 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def run_in_fork(fn: Callable[[], Any], timeout: float = LONG) -> Any:
    """Run ``fn`` in a child made by a raw ``os.fork()``; return its result or re-raise its error.

    The child always ends with ``os._exit``. A child that does not finish within ``timeout`` is
    killed and the call fails: a hang in the child is a test failure, never a hung test run.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        code = 0
        try:
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:  # report everything, including SystemExit
            code = 1
            payload = pickle.dumps(
                ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            )
        try:
            with os.fdopen(wfd, "wb") as w:
                w.write(payload)
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(rfd, "rb") as r:
            while True:
                remaining = deadline - time.monotonic()
                if not readable(r, remaining):
                    raise TimeoutError(f"forked child {pid} did not finish within {timeout}s")
                chunk = os.read(r.fileno(), 65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        raise AssertionError(f"forked child failed: {value}")
    return value


def run_in_process(
    method: str, target: Callable[..., None], *args: Any, what: str, timeout: float = 4 * LONG
) -> Any:
    """Run ``target(*args, out)`` in a ``multiprocessing`` process of start method ``method``;
    the target sends ``("ok", value)`` or ``("error", text)`` on the pipe ``out``. Returns the
    value, or fails naming ``what``. A process that does not report within ``timeout`` is killed:
    a hang is a test failure, never a hung run."""
    ctx = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=target, args=(*args, writer))
    child.start()
    writer.close()
    try:
        assert reader.poll(timeout), f"{what} did not finish within {timeout}s"
        kind, value = reader.recv()
    finally:
        reader.close()
        child.join(SHORT)
        if child.is_alive():
            child.kill()
            child.join(SHORT)
    assert kind == "ok", f"{what} failed: {value}"
    return value


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m safepool ARGS`` to completion (bounded by LONG); capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "safepool", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=LONG,
        check=False,
    )


def sqlite_factory(path: Path) -> Callable[[], sqlite3.Connection]:
    """A factory of sqlite3 connections to one database file (usable from any thread)."""
    return SqliteFactory(str(path))


class SqliteFactory:
    """Picklable sqlite3 connection factory (for spawn children and manager servers)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Schema and WAL mode once, up front: switching the journal mode while other
        # connections write fails with "database is locked".
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, who TEXT)")
        conn.commit()
        conn.close()

    def __call__(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=LONG, check_same_thread=False)


class FakeClock:
    """A manual monotonic clock for max_lifetime / max_idle / leak tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def collect_earlier_garbage() -> None:
    """Collect garbage that earlier tests in this worker left behind, before a test counts its
    own descriptors or threads. A socket such garbage holds is closed here with a
    ResourceWarning that belongs to the test that dropped it, not to this one, so unraisable
    warnings raised during this collection are ignored (a test's own leaks are still caught by
    its own checks, and by pytest when they happen during that test)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def running(pid: int) -> bool:
    """Whether process ``pid`` runs: alive and not a zombie (an orphan's parent here may never
    reap it; a process reaped between opening and reading its stat file has ended too)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


CLOSED = "(closed meanwhile)"


def fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def left_open(before: set[int]) -> dict[int, str]:
    """Descriptors opened since ``before`` that stay open (with what they are). This worker runs
    other tests too: their leftover threads may open and close descriptors at any moment (and
    close ones that were open before), so a descriptor counts only if it is still the same
    thing a moment later."""
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not fds() - before, SHORT)
    first = {fd: _target(fd) for fd in fds() - before}
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not fds() & first.keys(), 0.2)
    return {fd: what for fd, what in first.items() if _target(fd) == what != CLOSED}


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return CLOSED


def start_lingering_child(how: str) -> int:
    """In a process about to be killed: start a child that outlives it (sleeping ``LONG``),
    by ``os.fork`` or a start method; its pid (the test kills it)."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # fork with threads (3.12+)
    if how == "os.fork":
        child = os.fork()
        if child == 0:
            time.sleep(LONG)
            os._exit(0)
        return child
    proc = multiprocessing.get_context(how).Process(target=time.sleep, args=(LONG,))
    proc.start()
    return proc.pid or 0
