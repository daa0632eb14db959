"""Raise at each point where CPython 3.11 may run a signal handler inside the pool's fast paths
(acquire, release, ``lease()``) and a worker pool's submission: nothing is lost, leaked, handed
out twice or left waiting.

The signal sweeps (test_interrupts_inprocess.py) land at random instants; this test lands at
every point in turn. A tracer (``sys.settrace``, with opcode events in safepool's frames) raises
at the k-th point of one operation, for k = 1, 2, ... until an operation runs untouched; the
first instruction of any frame safepool's code calls (a stdlib helper such as
``contextlib.suppress``'s ``__enter__``) is a point too. On
3.11 a signal handler runs only at a frame's first instruction, after a call to a builtin
returns (``CALL``, or a ``PRECALL`` that made the call itself), and at a loop's back edge;
never between two stores, and not when a Python function returns to its caller.
"""

from __future__ import annotations

import contextlib
import dis
import os
import pickle
import signal
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from helpers import SHORT, fds, left_open, wait_until
from interrupts import check_pool
from safepool import LeaseError, SafeConnectionPool

pytestmark = pytest.mark.skipif(
    sys.version_info[:2] != (3, 11), reason="the points are those of CPython 3.11's interpreter"
)

SOURCE = str(Path(sys.modules["safepool"].__file__ or "").parent)
CALL, PRECALL, BACK_EDGE = (dis.opmap.get(n, -1) for n in ("CALL", "PRECALL", "JUMP_BACKWARD"))


class Injected(BaseException):
    pass


class Injector:
    """Raises Injected at the ``k``-th point inside safepool's frames (see the docstring)."""

    def __init__(self, k: int, callees: bool = False) -> None:
        self.k = k
        self.callees = callees  # also the first instruction of a frame safepool's code calls
        self.count = 0
        self.previous: dict[int, int] = {}  # frame id -> the opcode it ran last
        self.returned_to: set[int] = set()  # frames a Python function just returned to
        self.where: tuple[str, int | None] | None = None
        self.pid = os.getpid()  # a forked child inherits the tracer: it raises nothing there

    def global_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if os.getpid() != self.pid:
            return None
        if frame.f_code.co_filename.startswith(SOURCE):
            frame.f_trace_opcodes = True
        elif (
            self.callees
            and self.where is None
            and frame.f_back is not None
            and frame.f_back.f_code.co_filename.startswith(SOURCE)
            and frame.f_code.co_name != "__del__"  # (the interpreter swallows what it raises)
        ):  # a stdlib helper's first instruction (contextlib.suppress's __enter__, say)
            self.count += 1
            if self.count == self.k:
                self.where = (frame.f_code.co_name, frame.f_lineno)
                raise Injected
        return self.trace

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if os.getpid() != self.pid:
            return None
        if event == "return" and frame.f_back is not None:
            self.returned_to.add(id(frame.f_back))
        if event != "opcode" or self.where is not None:
            return self.trace
        op = frame.f_code.co_code[frame.f_lasti]
        previous = self.previous.get(id(frame))
        self.previous[id(frame)] = op
        returned = id(frame) in self.returned_to
        self.returned_to.discard(id(frame))
        called = previous == CALL or (previous == PRECALL and op != CALL)
        if previous is None or previous == BACK_EDGE or (called and not returned):
            self.count += 1
            if self.count == self.k:
                self.where = (frame.f_code.co_name, frame.f_lineno)
                raise Injected
        return self.trace


def inject(k: int, operation: Callable[[], object]) -> tuple[str, int | None] | None:
    """Run ``operation`` with an :class:`Injector` raising at its ``k``-th point; where it
    landed (None: the operation ran untouched, past its last point)."""
    injector = Injector(k, callees=True)
    previous = sys.gettrace()  # (a debugger's or a coverage tool's, given back after)
    sys.settrace(injector.global_trace)
    try:
        operation()
    except Injected:
        pass
    finally:
        sys.settrace(previous)
    return injector.where


class Item:
    def close(self) -> None:
        pass


def sqlite_pool() -> SafeConnectionPool[Any]:
    connect = lambda: sqlite3.connect(":memory:", check_same_thread=False)  # noqa: E731
    return SafeConnectionPool(factory=connect, min_size=2, max_size=2)


def vetted_pool() -> SafeConnectionPool[Any]:
    """Every lease vets its item and every release resets it: the slow steps."""
    return SafeConnectionPool(factory=Item, min_size=1, max_size=2, check=bool, reset=bool)


def plain(pool: SafeConnectionPool[Any], held: list[Any]) -> None:
    item = pool.acquire()
    held.append(item)  # what the caller's own try/finally would release again
    if isinstance(item, sqlite3.Connection):
        item.execute("select 1")
    pool.release(item)
    held.clear()


def in_transaction(pool: SafeConnectionPool[Any], held: list[Any]) -> None:
    conn = pool.acquire()
    held.append(conn)
    conn.execute("create table if not exists t (x)")
    conn.execute("insert into t values (1)")  # released inside it: rolled back
    pool.release(conn)
    held.clear()


def leased(pool: SafeConnectionPool[Any], held: list[Any]) -> None:
    with pool.lease():
        pass


def item_pool() -> SafeConnectionPool[Any]:
    return SafeConnectionPool(factory=Item)


def release_again(owner: Any, held: list[Any]) -> None:
    """What the interrupted caller's own try/finally does: release what it still holds (a
    release that already took effect refuses the second one, with LeaseError)."""
    for thing in held:
        with contextlib.suppress(LeaseError):
            owner.release(thing)
    held.clear()


def sweep(pool: SafeConnectionPool[Any], operation: Callable[..., None]) -> int:
    """Interrupt ``operation`` at each point in turn, checking the pool after each; the number
    of points."""
    held: list[Any] = []
    operation(pool, held)  # warm up: the points are those of the steady state
    for k in range(1, 500):
        where = inject(k, lambda: operation(pool, held))
        if where is None:
            return k - 1
        release_again(pool, held)
        check_pool(pool)
    raise AssertionError("more points than expected")


@pytest.mark.filterwarnings("ignore")  # the rollback of a connection released inside it
@pytest.mark.parametrize(
    ("make", "operation"),
    [
        (make, operation)
        for make in (sqlite_pool, vetted_pool, item_pool)
        for operation in (plain, in_transaction, leased)
        if operation is not in_transaction or make is sqlite_pool  # a database's transaction
    ],
)
def test_an_interruption_at_each_point(
    make: Callable[[], SafeConnectionPool[Any]], operation: Callable[..., None]
) -> None:
    pool = make()
    assert sweep(pool, operation) > 5, "the tracer found no points"
    pool.close()


def test_a_worker_pool_submission_interrupted_at_each_point_leaves_the_pool_working() -> None:
    """``map_async`` cut short at each point of its submission, in safepool's frames and at the
    first instruction of what they call: the pool then runs the next job to its end (before, a
    wake-up flag set with no byte written made every later job wait forever)."""
    from safepool import WorkerSetup

    with WorkerSetup().Pool(1) as pool:
        pool.map(abs, range(2))  # warm up: the points are those of the steady state
        for k in range(1, 500):
            where = inject(k, lambda: pool.map_async(abs, range(-4, 0), chunksize=1))
            if where is None:
                break
            job = pool.map_async(abs, range(-3, 0), chunksize=1)
            assert job.get(10) == [3, 2, 1], where
        else:
            raise AssertionError("more points than expected")
        assert k > 5, "the tracer found no points"


def _housekeeper_after_an_interrupted_start(k: int) -> tuple[tuple[str, int | None] | None, bool]:
    """In a forked child (no housekeeper runs yet): cut a pool's registration with the
    housekeeper short at the ``k``-th point, then make a pool that needs maintenance; where the
    injection landed, and whether that pool's idle item was then closed for idling too long."""
    from safepool import _housekeeper

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            first: SafeConnectionPool[Item] = SafeConnectionPool(factory=Item, background=False)
            where = inject(k, lambda: _housekeeper.register(first))
            closed = threading.Event()
            pool: SafeConnectionPool[Item] = SafeConnectionPool(
                factory=Item, close=lambda item: closed.set(), max_idle=0.05
            )
            pool.release(pool.acquire())
            os.write(writer, pickle.dumps((where, closed.wait(SHORT))))
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"point {k}: the child failed"
    where, maintained = pickle.loads(data)
    return where, maintained


def test_a_housekeeper_start_interrupted_at_each_point_is_started_again() -> None:
    """The maintenance thread's start cut short at each point (before, the unstarted thread
    stayed recorded as the housekeeper: no pool was maintained again in that process)."""
    for k in range(1, 200):
        where, maintained = _housekeeper_after_an_interrupted_start(k)
        if where is None:
            break
        assert maintained, f"point {k} ({where}): no idle item was ever closed again"
    else:
        raise AssertionError("more points than expected")
    assert maintained, "untouched, the housekeeper closed nothing"
    assert k > 5, "the tracer found no points"


def test_a_worker_pool_start_interrupted_at_each_point_leaves_nothing_behind() -> None:
    """``WorkerSetup().Pool(1)`` cut short at each point of its start: no worker process, no
    manager thread and no descriptor is left (before, a worker started but not yet recorded,
    the wake-up pipe, or a pool made but not yet given a finalizer outlived the call)."""
    import multiprocessing

    from safepool import WorkerSetup

    setup = WorkerSetup()
    with setup.Pool(1) as pool:  # warm up: the points are those of the steady state
        pool.map(abs, range(2))
    before, mask = fds(), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    for k in range(1, 500):
        name = f"points-{os.getpid()}-{k}"
        made: list[Any] = []
        where = inject(k, lambda made=made, name=name: made.append(setup.Pool(1, name=name)))
        for pool in made:  # (it raised where something swallowed it)
            pool.terminate()
            pool.join()
        if where is None:
            break

        def gone(name: str = name) -> bool:
            return not any(name in p.name for p in multiprocessing.active_children()) and not any(
                name in t.name for t in threading.enumerate()
            )

        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask, f"point {k}: signals blocked"
        wait_until(gone, SHORT, f"point {k} ({where}): its worker and thread end")
        assert left_open(before) == {}, f"point {k} ({where})"
    else:
        raise AssertionError("more points than expected")
    assert k > 20, "the tracer found no points"


def _budget_plain(budget: Any, held: list[Any]) -> None:
    permit = budget.acquire(timeout=SHORT)
    held.append(permit)  # what the caller's own try/finally would release again
    budget.release(permit)
    held.clear()


def _budget_leased(budget: Any, held: list[Any]) -> None:
    with budget.lease(timeout=SHORT):
        pass


def sweep_budget(
    budget: Any, operation: Callable[..., None], settle: Callable[[str], None], *, timeout: float
) -> None:
    """Cut ``operation`` short at each point in turn. After each, the caller releases what it
    still holds, ``settle(point)`` checks that no permit is held, and the whole limit (2) can
    be acquired within ``timeout``."""
    held: list[Any] = []
    operation(budget, held)  # warm up: the points are those of the steady state
    for k in range(1, 500):
        where = inject(k, lambda: operation(budget, held))
        if where is None:
            assert k > 5, "the tracer found no points"
            return
        release_again(budget, held)
        settle(f"point {k} ({where})")
        permits = [budget.acquire(timeout=timeout) for _ in range(2)]
        for permit in permits:
            budget.release(permit)
    raise AssertionError("more points than expected")


@pytest.mark.parametrize("operation", [_budget_plain, _budget_leased])
def test_a_host_budget_interrupted_at_each_point_keeps_no_permit(
    operation: Callable[..., None],
) -> None:
    """``HostBudget`` acquire + release, and ``lease()``, cut short at each point: once the
    caller has released what it holds (and the next lease has settled a collected one), no
    permit is held and the whole limit can be acquired at once."""
    from safepool import HostBudget

    budget = HostBudget(f"points-{uuid.uuid4().hex[:12]}", 2)

    def settle(point_at: str) -> None:
        with budget.lease(timeout=SHORT):  # settles a lease collected while holding
            pass
        assert budget.stats().in_use == 0, point_at

    try:
        sweep_budget(budget, operation, settle, timeout=0)
    finally:
        budget.unlink()
        budget.close()


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "round-trip"])
@pytest.mark.parametrize("operation", [plain, leased])
def test_a_pool_proxy_interrupted_at_each_point(
    operation: Callable[..., None], fast_path: bool
) -> None:
    """A by-value proxy of a ``PoolManager`` pool (the same-host fast path through shared
    memory, and the round-trip path), cut short at each point of the client's code: nothing is
    lost, leaked or handed out twice."""
    import manager_targets
    from safepool import PoolManager

    with PoolManager() as manager:
        pool = manager.SafeConnectionPool(
            factory=manager_targets.tokens, max_size=2, share="value", fast_path=fast_path
        )
        assert (pool._fast_leaser() is not None) is fast_path
        assert sweep(pool, operation) > 5, "the tracer found no points"


HOSTED_OPERATIONS = [
    "acquire+release",
    "lease",
    "stats",
    "leases",
    "describe",
    "call",
    "lease+call",
]


@pytest.mark.parametrize("name", HOSTED_OPERATIONS)
def test_a_hosted_pool_proxy_call_interrupted_at_each_point(name: str) -> None:
    """Each operation of a hosted pool's proxy (items stay in the server) cut short at each
    point of the client's code: later calls, on any proxy, return their own results, and the
    pool is whole again."""
    import interrupt_targets as targets
    from safepool import PoolManager

    with PoolManager() as manager:
        pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=2)
        ops = targets.operations(pool, hosted=True)
        held: list[Any] = ops.pop("_held")  # type: ignore[assignment]
        operation = ops[name]
        operation()  # warm up: the points are those of the steady state
        for k in range(1, 1000):
            where = inject(k, operation)
            if where is None:
                break
            targets._release_all(pool, held)
            targets.check_own_results(pool, True, k)
            targets.wait_consistent(pool)
            check_pool(pool)
        else:
            raise AssertionError("more points than expected")
        assert k > 5, "the tracer found no points"


def test_a_helper_thread_start_interrupted_at_each_point_restores_the_signal_mask() -> None:
    """``start_daemon`` (how safepool starts its threads, with signals blocked meanwhile) cut
    short at each point: the caller's signal mask is as before (once, the restore itself went
    through a Python-level wrapper, where an interruption skipped it and left every signal
    blocked in the caller, and in every process it started from then on)."""
    from safepool._signals import start_daemon

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    done = threading.Event()
    started: list[threading.Thread] = []
    try:
        for k in range(1, 200):
            where = inject(k, lambda: started.append(start_daemon(done.wait, name="points")))
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask, f"point {k}: {where}"
            if where is None:
                break
        else:
            raise AssertionError("more points than expected")
        assert k > 3, "the tracer found no points"
    finally:
        done.set()
        for thread in started:
            thread.join(SHORT)


def test_a_connection_to_the_server_interrupted_at_each_point_leaves_no_socket() -> None:
    """``open_connection`` (a proxy's new channel) cut short at each point: the socket is closed
    at once, never left to the collector (which closed it with a ResourceWarning: under
    ``filterwarnings = error`` that failed whichever test was running then)."""
    import gc
    import socket
    import warnings

    from safepool._transport import open_connection

    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()[:2]
        server.settimeout(0)
        before = fds()
        for k in range(1, 200):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                where = inject(k, lambda: open_connection(address).close())
                gc.collect()
            assert not [w for w in caught if w.category is ResourceWarning], f"point {k}: {where}"
            with contextlib.suppress(BlockingIOError):
                while True:  # the server side of each connection made
                    server.accept()[0].close()
            if where is None:
                break
        else:
            raise AssertionError("more points than expected")
        assert k > 3, "the tracer found no points"
        assert left_open(before) == {}


@pytest.mark.redis
def test_a_redis_budget_interrupted_at_each_point_loses_no_connection_and_no_permit(
    redis_url: str,
) -> None:
    """``RedisBudget`` acquire + release cut short at each point: no connection is ever left
    to the garbage collector (each goes back to the budget's idle list: redis-py's pool never
    has to make another), and once the heartbeat has given back what a cut-short call may
    hold, the whole limit can be acquired at once."""
    from safepool import RedisBudget

    budget = RedisBudget(redis_url, f"points-{uuid.uuid4().hex[:12]}", 2, ttl=1.5)

    def settle(point_at: str) -> None:  # what a cut-short call holds comes back within ttl
        wait_until(lambda: budget.stats().in_use == 0, SHORT, point_at)

    try:
        sweep_budget(budget, _budget_plain, settle, timeout=SHORT)
        made = budget._client().connection_pool._created_connections
        assert made <= 2, f"{made} connections made: some were lost to the collector"
    finally:
        budget.unlink()
        budget.close()
