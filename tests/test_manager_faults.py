"""One regression test per defect of the "interrupt anywhere" issue, with stdlib controls.

Wrong results after an interrupted call, dead waiters, a live server reported as dead, pools
leaked by dead clients, and the contract defects (release(None), min_size counted as leases,
AuthkeyError not an AuthenticationError, the clock not validated).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import connection
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any

import pytest

import interrupt_targets as targets
import remote_targets
from helpers import (
    FORK_WARNING,
    LONG,
    SEED,
    SHORT,
    START_METHODS,
    readable,
    run_in_process,
    running,
    sweep_size,
    wait_until,
)
from interrupts import Interrupted, Interrupter, check_pool
from safepool import (
    AuthkeyError,
    LeaseError,
    PoolManager,
    SafeConnectionPool,
    SafePoolError,
    TaskAborted,
    TooManyWaiting,
    WorkerLost,
    WorkerSetup,
    connect_pool,
    register_pool,
)
from safepool._protocol import request

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)


@pytest.fixture
def manager() -> Iterator[PoolManager]:
    with PoolManager() as started:
        yield started


@pytest.fixture
def interrupter() -> Iterator[Interrupter]:
    with Interrupter() as it:
        yield it


class Thing:
    """A plain shared object, for the stdlib controls."""

    def pause(self, seconds: float) -> str:
        time.sleep(seconds)
        return "paused"

    def echo(self, value: object) -> object:
        return value


class StdlibManager(BaseManager):
    pass


StdlibManager.register("Thing", Thing)


# -- 1. wrong results ---------------------------------------------------------------------------


def test_control_an_interrupted_stdlib_proxy_call_returns_stale_replies(
    interrupter: Interrupter,
) -> None:
    with StdlibManager() as stdlib:
        thing = stdlib.Thing()  # type: ignore[attr-defined]
        interrupter.arm(0.05)
        with pytest.raises(Interrupted):
            thing.pause(0.3)
        assert thing.echo("B") == "paused"  # the interrupted call's reply
        assert thing.echo("C") == "B"


def test_interrupted_calls_never_return_another_calls_result(
    manager: PoolManager, interrupter: Interrupter, fast_path: bool
) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1)
    values = manager.SafeConnectionPool(
        factory=targets.Tokens(), max_size=1, share="value", fast_path=fast_path
    )
    interrupter.arm(0.05)
    with pytest.raises(Interrupted):
        pool.call(targets.pause, 0.3)
    assert pool.call(targets.echo, "B") == "B"
    assert pool.call(targets.echo, "C") == "C"
    held = values.acquire()  # by value: a str, not a stale reply
    assert isinstance(held, str)
    interrupter.arm(0.05)
    with pytest.raises(Interrupted):
        values.acquire(timeout=LONG)  # waits: the only item is held
    values.release(held)  # receives its own reply, and gives the item back
    check_pool(values)
    check_pool(pool)


def test_a_lease_granted_to_an_interrupted_acquire_goes_back_at_once(
    manager: PoolManager, interrupter: Interrupter, fast_path: bool
) -> None:
    pool = manager.SafeConnectionPool(
        factory=targets.Tokens(), max_size=1, share="value", fast_path=fast_path
    )
    held = pool.acquire()
    interrupter.arm(0.05)
    with pytest.raises(Interrupted):
        pool.acquire(timeout=LONG)
    # The wait is cancelled with the call: the server's watcher sees the abort (asynchronously)
    wait_until(lambda: pool.stats().waiting == 0, 1.0, "the interrupted wait is cancelled")
    pool.release(held)
    again = pool.acquire(timeout=1)  # the full capacity: nothing stuck with the interrupted call
    pool.release(again)
    assert pool.stats().leased == 0


def test_a_call_cut_short_before_its_request_left_keeps_the_lease_held_before(
    manager: PoolManager,
) -> None:
    """An ABORT names the request whose reply the client did not keep: a call interrupted at
    its very start (nothing sent yet) must not give back what the previous reply granted.
    Found by the sweep on 3.10: ``with pool.lease() as conn: conn.call(...)`` interrupted as
    ``call`` began lost the lease the ``with`` held."""
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1)
    with pool.lease() as conn:
        channel = pool._channel()
        channel.abort(channel.sent + 1)  # as exchange() does, cut short before it sent
        assert conn.call(targets.echo, "still mine") == "still mine"  # on a new channel
        assert pool.stats().leased == 1
    check_pool(pool)
    # The ABORT of the request that leased: its lease goes back (the caller never had it).
    values = manager.SafeConnectionPool(
        factory=targets.Tokens(), max_size=1, share="value", fast_path=False
    )
    held = values.acquire()
    channel = values._channel()
    channel.abort(channel.sent)
    wait_until(lambda: values.stats().leased == 0, 1.0, "the aborted lease back in the pool")
    values._forget(held, values._token_of(held))  # type: ignore[arg-type]
    assert values.acquire(timeout=1) == held


def test_a_lease_collected_while_held_goes_back_at_once(
    manager: PoolManager, fast_path: bool
) -> None:
    """A ``with pool.lease():`` whose ``__exit__`` never ran (a signal handler raising at its
    first instruction, before any ``try``) is given back when the lease is collected, by the
    process's settler thread: a thread already waiting for the only item gets it at once, not
    after its timeout, and not only at this process's next call on the proxy."""
    pool = manager.SafeConnectionPool(
        factory=targets.Tokens(), max_size=1, share="value", fast_path=fast_path
    )
    lease = pool.lease(timeout=1)
    held = lease.__enter__()  # and __exit__ never runs
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=LONG)))
    waiter.start()
    wait_until(lambda: pool.stats().waiting == 1 or fast_path, 1.0, "the waiter queued")
    started = time.monotonic()
    del lease  # collected still holding its claim: the settler releases it
    waiter.join(LONG)
    assert got == [held] and time.monotonic() - started < 1.0
    pool.release(got[0])
    check_pool(pool)


def test_the_stdlib_proxy_mutex_is_entered_by_c_code() -> None:
    """``BaseProxy.__init__`` takes ``BaseProxy._mutex`` with ``with``; the stdlib's
    ForkAwareThreadLock enters through a Python method, after whose lock call a signal handler
    may run: the mutex would stay held and every later proxy in the process hang. safepool
    gives that object C-level __enter__/__exit__ (its own lock's), keeping object and lock."""
    import inspect
    from multiprocessing import util
    from multiprocessing.managers import BaseProxy

    mutex: Any = BaseProxy._mutex  # type: ignore[attr-defined]
    assert isinstance(mutex, util.ForkAwareThreadLock)
    for name in ("__enter__", "__exit__"):
        assert inspect.isbuiltin(getattr(type(mutex), name)), name
    with mutex:
        assert mutex._lock.locked()
    assert not mutex._lock.locked()


# Per-worker state for the executor test (set by the initializer, in each worker).
_worker_pool: Any = None


def _init_worker(pool: Any) -> None:
    global _worker_pool
    _worker_pool = pool


def _long_call(seconds: float) -> str:
    return _worker_pool.call(targets.pause, seconds)  # type: ignore[no-any-return]


def _echo_call(value: int) -> tuple[int, object]:
    return os.getpid(), _worker_pool.call(targets.echo, value)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("executor", ["safepool", "stdlib"])
def test_sigterm_in_a_workers_proxy_call_leaves_later_tasks_their_own_results(
    method: str, executor: str, manager: PoolManager
) -> None:
    """SIGTERM raises WorkerTerminated inside a task's pool.call(). safepool's executor then
    replaces the worker (WorkerLost); a stdlib ProcessPoolExecutor set up with pool_kwargs()
    keeps it (the stdlib catches the exception as the task's result): either way, every later
    task gets its own result, and nothing stays leased."""
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1)
    setup = WorkerSetup(context=method)
    if executor == "safepool":
        workers: Any = setup.executor(1, initializer=_init_worker, initargs=(pool,))
    else:
        kwargs = setup.pool_kwargs(initializer=_init_worker, initargs=(pool,))
        workers = ProcessPoolExecutor(1, mp_context=setup.context, **kwargs)
    with workers:
        pid, _ = workers.submit(_echo_call, -1).result(LONG)
        slow = workers.submit(_long_call, 2.0)
        wait_until(lambda: pool.stats().leased == 1, timeout=LONG, what="the call running")
        os.kill(pid, signal.SIGTERM)
        with pytest.raises((TaskAborted, WorkerLost)):
            slow.result(LONG)
        results = [workers.submit(_echo_call, i).result(LONG) for i in range(5)]
    assert [value for _, value in results] == list(range(5))
    if executor == "stdlib":
        assert {worker for worker, _ in results} == {pid}  # the same worker, interrupted before
    check_pool(pool)


# -- 3. dead waiters -------------------------------------------------------------------------


def _fork_waiter(pool: Any, timeout: float) -> tuple[int, int]:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.write(wfd, b"r")
            pool.acquire(timeout=timeout)
        finally:
            os._exit(1)
    os.close(wfd)
    return pid, rfd


def test_clients_killed_while_waiting_leave_the_queue_at_once(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1, max_waiting=50)
    held = pool.acquire()
    waiters = [_fork_waiter(pool, math.inf if i % 2 else LONG) for i in range(50)]
    for _, ready in waiters:
        assert readable(ready, LONG)
        os.close(ready)
    wait_until(lambda: pool.stats().waiting == 50, timeout=LONG, what="50 clients waiting")
    with pytest.raises(TooManyWaiting):
        pool.acquire(timeout=1)
    for pid, _ in waiters:
        os.kill(pid, signal.SIGKILL)
    for pid, _ in waiters:
        os.waitpid(pid, 0)
    wait_until(lambda: pool.stats().waiting == 0, timeout=1.0, what="dead waiters gone")
    late = _fork_waiter(pool, LONG)  # a live client is admitted again
    assert readable(late[1], LONG)
    os.close(late[1])
    wait_until(lambda: pool.stats().waiting == 1, what="the live client waiting")
    pool.release(held)
    assert os.waitpid(late[0], 0)[1] != 0  # it got the item and ended holding it
    wait_until(lambda: pool.stats().leased == 0, what="its lease reclaimed")
    assert pool.stats().reclaimed == 1  # that lease; dead waiters are never "reclaimed"


# -- 4. a live server is never reported as dead ------------------------------------------------


def test_a_factory_the_server_cannot_unpickle_is_named(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with PoolManager(ctx=ctx) as manager:
        # A module only this process can import (the server started before it existed).
        (tmp_path / "client_only.py").write_text("def connect():\n    return object()\n")
        sys.path.insert(0, str(tmp_path))
        try:
            import client_only

            with pytest.raises(TypeError, match=r"pool option 'factory'.*client_only"):
                manager.SafeConnectionPool(factory=client_only.connect)
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("client_only", None)
        pool = manager.SafeConnectionPool(factory=targets.Conn)  # the server is alive
        assert pool.call(targets.echo, 1) == 1


def exit_in_server(conn: object) -> None:
    sys.exit(3)


def keyboard_interrupt_in_server(conn: object) -> None:
    raise KeyboardInterrupt


class ExitingReset:
    """A reset hook that raises SystemExit once (in the server), then succeeds."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, conn: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise SystemExit("reset exits")


@pytest.mark.parametrize("func", [exit_in_server, keyboard_interrupt_in_server])
def test_a_hosted_function_raising_a_base_exception_is_an_error_not_a_dead_server(
    manager: PoolManager, func: Any
) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1)
    with pytest.raises(TaskAborted) as info:
        pool.call(func)
    assert info.value.exc_type in ("SystemExit", "KeyboardInterrupt")
    assert "keeps serving" in str(info.value)
    with pool.lease() as conn, pytest.raises(TaskAborted):
        conn.call(func)
    assert pool.call(targets.echo, "alive") == "alive"
    check_pool(pool)


def test_a_hook_raising_system_exit_in_the_server_loses_no_capacity(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Conn, max_size=1, reset=ExitingReset())
    item = pool.acquire()
    with pytest.raises(TaskAborted, match="SystemExit"):
        pool.release(item)
    check_pool(pool)


def test_client_mistakes_get_errors_and_leave_no_traceback_in_the_server() -> None:
    authkey = secrets.token_hex(32).encode()
    with remote_targets.served(
        "--factory", "remote_targets:closing_tokens", env={"SAFEPOOL_AUTHKEY": authkey.decode()}
    ) as (address, proc):
        bad = [
            ("accept_connection", (123,), {}),
            ("accept_connection", ("name", 456), {}),
            ("open_session", ("not a pid", "h", "p"), {}),
            ("create", ("no such type",), {}),
            ("incref", ("no such object",), {}),
            ("create_for", (None, "pool", "x", {}), {}),
            ("debug_info", (), {}),
        ]
        for name, args, kwds in bad:
            with pytest.raises((TypeError, LookupError, AttributeError, SafePoolError)):
                request(address, authkey, name, args, kwds)  # an error reply: not EOFError
        conn = connection.Client(address, authkey=authkey)
        conn.send_bytes(b"\x80\x05not a pickle")
        kind, error = pickle.loads(conn.recv_bytes())
        conn.close()
        assert kind == "#ERROR" and "could not unpickle" in str(error)
        pool = connect_pool(address, authkey=authkey)
        assert pool.describe()["name"] == "pool"  # still serving
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=LONG)
    assert "Traceback" not in stderr, stderr


# -- 5. pools of dead clients are disposed of ----------------------------------------------------


def _objects(address: Any, authkey: bytes) -> int:
    return request(address, authkey, "number_of_objects")  # type: ignore[no-any-return]


def create_and_exit(address: Any, authkey: bytes) -> None:
    client = PoolManager(address=address, authkey=authkey)
    client.connect()
    pool = client.SafeConnectionPool(factory=targets.Conn, max_size=2)
    with pool.lease():
        os._exit(0)  # no decref, no goodbye: as if killed


def create_stdlib_and_exit(address: Any, authkey: bytes) -> None:
    client = StdlibManager(address=address, authkey=authkey)
    client.connect()
    thing = client.Thing()  # type: ignore[attr-defined]
    assert thing.echo(1) == 1
    os._exit(0)  # no decref: as if killed


@pytest.mark.parametrize("method", START_METHODS)
def test_a_pool_created_by_a_client_that_dies_is_disposed_of(
    method: str, manager: PoolManager
) -> None:
    ctx = multiprocessing.get_context(method)
    address, authkey = manager.address, bytes(manager._authkey)
    before = _objects(address, authkey)
    child = ctx.Process(target=create_and_exit, args=(address, authkey))
    child.start()
    child.join(LONG)
    wait_until(lambda: _objects(address, authkey) == before, what="the dead client's pool gone")


def test_control_a_stdlib_object_of_a_dead_client_is_never_disposed() -> None:
    with StdlibManager() as stdlib:
        address, authkey = stdlib.address, bytes(stdlib._authkey)  # type: ignore[attr-defined]
        before = _objects(address, authkey)
        child = multiprocessing.get_context("fork").Process(
            target=create_stdlib_and_exit, args=(address, authkey)
        )
        child.start()
        child.join(LONG)
        assert child.exitcode == 0
        time.sleep(0.2)  # a negative check: give a (wrong) disposal a moment to happen
        assert _objects(address, authkey) == before + 1  # kept until the manager shuts down


class NamedManager(PoolManager):
    pass


register_pool(NamedManager, "named", targets.Conn, max_size=1)


def use_named_and_die(address: Any, authkey: bytes) -> None:
    client = NamedManager(address=address, authkey=authkey)
    client.connect()
    client.named().call(targets.echo, 1)  # type: ignore[attr-defined]
    os._exit(0)


def test_a_named_pool_lives_as_long_as_the_server() -> None:
    with NamedManager() as server:
        address, authkey = server.address, bytes(server._authkey)  # type: ignore[attr-defined]
        child = multiprocessing.get_context("fork").Process(
            target=use_named_and_die, args=(address, authkey)
        )
        child.start()
        child.join(LONG)
        pool = server.named()  # type: ignore[attr-defined]
        assert pool.stats().created == 1  # the same pool: its item was made once, and kept
        assert pool.call(targets.echo, 2) == 2


# -- 6. contract defects ---------------------------------------------------------------------


def test_release_of_none_is_a_lease_error(manager: PoolManager, fast_path: bool) -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    with pytest.raises(LeaseError, match="not leased"):
        pool.release(None)  # type: ignore[arg-type]
    proxy = manager.SafeConnectionPool(factory=targets.Tokens(), share="value", fast_path=fast_path)
    with pytest.raises(LeaseError):
        proxy.release(None)


def test_items_made_for_min_size_are_not_counted_as_leases() -> None:
    pool = SafeConnectionPool(factory=object, min_size=3, max_size=3)
    stats = pool.stats()
    assert (stats.created, stats.idle, stats.requests, stats.lease_time) == (3, 3, 0, 0.0)


def test_a_refused_authkey_is_a_multiprocessing_authentication_error(manager: PoolManager) -> None:
    wrong = PoolManager(address=manager.address, authkey=b"not the key")
    with pytest.raises(multiprocessing.AuthenticationError) as info:
        wrong.connect()
    assert isinstance(info.value, AuthkeyError)


@pytest.mark.parametrize(
    ("clock", "error", "match"),
    [
        ("not callable", TypeError, "clock must be callable"),
        (lambda: "now", TypeError, "finite number of seconds"),
        (lambda: math.nan, TypeError, "finite number of seconds"),
        (lambda: True, TypeError, "finite number of seconds"),
        (lambda: 1 / 0, ValueError, "clock\\(\\) raised ZeroDivisionError"),
    ],
)
def test_the_clock_is_validated(clock: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        SafeConnectionPool(factory=object, clock=clock)


def test_a_pool_refuses_to_be_pickled_and_says_what_to_do_instead() -> None:
    pool = SafeConnectionPool(factory=object, name="db")
    with pytest.raises(TypeError, match="PoolManager"):
        pickle.dumps(pool)


@pytest.mark.parametrize("method", START_METHODS)
def test_a_managers_server_ends_when_the_process_that_started_it_dies(method: str) -> None:
    """SIGKILL the process that started a PoolManager: its server shuts down within 5 s. (The
    control: a plain BaseManager's server lives on, serving nothing, until killed.)"""
    ctx = multiprocessing.get_context(method)
    here, there = ctx.Pipe()
    starter = ctx.Process(target=targets.start_managers, args=(there,))  # (not daemonic:
    starter.start()  # a daemonic process may not start any)
    try:
        assert here.poll(LONG), "the managers did not start"
        ours, theirs = here.recv()
    except BaseException:
        starter.kill()
        raise
    try:
        os.kill(starter.pid, signal.SIGKILL)  # type: ignore[arg-type]
        # (not join(): under fork the servers hold the starter's sentinel open)
        wait_until(lambda: starter.exitcode is not None, SHORT, "the starter dies")
        wait_until(lambda: not running(ours), SHORT, "the PoolManager's server ends")
        assert running(theirs), "the control's server ended too"
    finally:
        for pid in (ours, theirs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_manager_start_cut_short_leaves_no_server() -> None:
    """Seeded sweep: ``PoolManager.start()`` cut short anywhere (an exception from a signal
    handler, while it starts the server or waits for its address): no server process is left
    running (before, one was, and the interpreter then waited for it forever at exit). In a
    process of its own: an interruption inside the stdlib's fork hooks can leave ``logging``'s
    module lock held for good (CPython's at-fork handler that releases it is Python code),
    which would deadlock the next test in this one."""
    points = sweep_size(16, other_versions=6)
    value = run_in_process(
        "spawn", targets.manager_start_sweep, points, str(SEED), what="the sweeping process"
    )
    assert value >= 1, "no interruption ever landed"
