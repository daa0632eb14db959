"""``PoolServer``: a pool server embedded in a program, started and stopped from any thread."""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import manager_targets
import remote_targets
import safepool._server
from helpers import (
    FORK_WARNING,
    LONG,
    SHORT,
    START_METHODS,
    collect_earlier_garbage,
    fds,
    left_open,
    seeded,
    sweep_size,
    wait_until,
)
from interrupts import Interrupter, pick, spin
from safepool import ManagerUnavailable, PoolClosed, PoolServer, connect_pool, serve_pool
from safepool._protocol import request

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(120)]

# Process-wide threads that outlive one server by design (started on first use, one each).
PROCESS_THREADS = ("safepool-watcher", "safepool-settler")  # one per process, each


def threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name not in PROCESS_THREADS}


def lease_in_child(address: str, authkey: bytes, count: int) -> list[str]:
    pool = connect_pool(address, authkey=authkey)
    seen = []
    for _ in range(count):
        with pool.lease(timeout=LONG) as item:
            seen.append(str(item))
    return seen


def first_connect_in_child(address: str, authkey: bytes) -> tuple[str, str, int, int]:
    """A new client process's first connect_pool() + lease: (error type, message, threads
    before, threads after). The process's one lease settler thread (see safepool._settler) is
    not counted: it is started once per process, not per connection."""

    def count() -> int:
        settlers = [t for t in threading.enumerate() if t.name == "safepool-settler"]
        assert len(settlers) <= 1, settlers
        return threading.active_count() - len(settlers)

    before = count()
    try:
        with connect_pool(address, authkey=authkey).lease(timeout=SHORT):
            pass
        outcome = ("", "")
    except Exception as exc:
        outcome = (type(exc).__name__, str(exc))
    return (*outcome, before, count())


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_new_clients_first_connect_fails_clearly_and_leaves_no_thread(
    start_method: str,
) -> None:
    """A new client process's first call opens its session and its thread's channel: a wrong
    key, or a server that is gone, is reported clearly, and no thread is left behind."""
    ctx = multiprocessing.get_context(start_method)
    with ctx.Pool(1, maxtasksperchild=1) as clients:  # each call in a new process
        with PoolServer(factory=manager_targets.tokens, share="value") as server:
            address = server.address
            ok = clients.apply(first_connect_in_child, (address, server.authkey))
            wrong = clients.apply(first_connect_in_child, (address, b"not the key"))
        gone = clients.apply(first_connect_in_child, (address, server.authkey))
    assert ok[:2] == ("", ""), ok
    assert wrong[0] == "AuthkeyError" and "refused this authkey" in wrong[1], wrong
    assert gone[0] == "ManagerUnavailable" and "unreachable" in gone[1], gone
    for result in (ok, wrong, gone):
        assert result[3] == result[2], result  # no thread left behind


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_started_and_stopped_from_other_threads_leaks_nothing(
    tmp_path: Path, start_method: str, kind: str
) -> None:
    sock_path = tmp_path / "pool.sock"
    address = "127.0.0.1:0" if kind == "tcp" else f"unix:{sock_path}"
    ctx = multiprocessing.get_context(start_method)
    with ctx.Pool(1) as clients:  # started first: its own threads are not the server's
        clients.apply(os.getpid)
        collect_earlier_garbage()  # it must not close its descriptors during this test
        threads_before, fds_before = threads(), fds()
        server = PoolServer(address, manager_targets.tokens, share="value", max_size=2)
        starter = threading.Thread(target=server.start)
        starter.start()
        starter.join(SHORT)
        assert server.running
        assert (kind == "unix") == sock_path.exists()
        results = clients.starmap(lease_in_child, [(server.address, server.authkey, 20)] * 3)
        assert sum(len(r) for r in results) == 60
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(LONG)
        assert not stopper.is_alive()
        assert not server.running
        assert not sock_path.exists()
        wait_until(lambda: threads() == threads_before, SHORT, "the server's threads end")
        gc.collect()
        assert left_open(fds_before) == {}
    assert "stopped" in repr(server)


def test_stop_is_idempotent_from_racing_threads_and_a_server_starts_once() -> None:
    server = PoolServer(factory=manager_targets.tokens, typeid="tokens")
    with server:
        pool = connect_pool(server.address, "tokens", authkey=server.authkey)
        with pool.lease(timeout=SHORT):
            pass
        stoppers = [threading.Thread(target=server.stop) for _ in range(4)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(LONG)
        assert not any(t.is_alive() for t in stoppers)
    server.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        server.start()
    with pytest.raises((ManagerUnavailable, PoolClosed)):
        pool.acquire(timeout=SHORT)


def test_a_client_waiting_for_an_item_is_released_by_stop() -> None:
    server = PoolServer(factory=manager_targets.tokens, max_size=1).start()
    pool = connect_pool(server.address, authkey=server.authkey)
    held = pool.acquire(timeout=SHORT)
    errors: list[BaseException] = []

    def wait_for_item() -> None:
        try:
            pool.acquire(timeout=LONG)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_item)
    waiter.start()
    wait_until(lambda: pool.stats().waiting == 1, SHORT, "the waiter queues")
    server.stop()
    waiter.join(SHORT)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], (ManagerUnavailable, PoolClosed)), errors
    del held


def test_a_new_server_in_the_same_process_serves_a_new_pool() -> None:
    for _ in range(2):  # the second must not get the first's closed pool of the same name
        with PoolServer(factory=manager_targets.tokens, typeid="again", share="value") as server:
            pool = connect_pool(server.address, "again", authkey=server.authkey)
            with pool.lease(timeout=SHORT) as item:
                assert item.startswith("token-")
            assert pool.stats().requests == 1


def test_the_handshake_cap_closes_new_connections_at_once() -> None:
    with PoolServer(factory=manager_targets.tokens, max_unauthenticated=2) as server:
        pool = connect_pool(server.address, authkey=server.authkey)
        with pool.lease(timeout=SHORT):
            pass  # connected before the cap fills
        host, port = server.address.rsplit(":", 1)
        silent = [socket.create_connection((host, int(port)), timeout=SHORT) for _ in range(2)]
        for sock in silent:
            assert sock.recv(4096)  # the challenge: these are in their handshake
        third = socket.create_connection((host, int(port)), timeout=SHORT)
        assert third.recv(4096) == b""  # closed at once, no challenge
        with pool.lease(timeout=SHORT):
            pass  # the connected client is served meanwhile
        for sock in [*silent, third]:
            sock.close()
        wait_until(lambda: _connects(server), SHORT, "room again once the silent ones left")


def _connects(server: PoolServer) -> bool:
    try:
        with connect_pool(server.address, authkey=server.authkey).lease(timeout=SHORT):
            return True
    except ManagerUnavailable:
        return False


def test_tcp_nodelay_on_both_ends() -> None:
    with PoolServer(factory=manager_targets.tokens) as server:
        pool = connect_pool(server.address, authkey=server.authkey)
        with pool.lease(timeout=SHORT):
            pass
        client_fd = pool._tls.channel._fd
        open_fds = list(server._server._connections._threads)
        assert _nodelay(client_fd)
        assert open_fds and all(_nodelay(fd) for fd in open_fds)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_new_client_connects_twice_its_session_and_its_thread(tmp_path: Path, kind: str) -> None:
    """connect_pool() and a first lease: the process's session, and the thread's channel, on
    which the proxy is made and then leased from. A second proxy on the same thread is made on
    that channel too: no new connection."""
    address = "127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'pool.sock'}"
    with PoolServer(address, factory=manager_targets.tokens, share="value") as server:
        connections = server._server._connections
        before = connections.admitted
        pool = connect_pool(server.address, authkey=server.authkey)
        with pool.lease(timeout=SHORT) as item:
            assert item.startswith("token-")
        assert connections.admitted - before == 2
        again = connect_pool(server.address, authkey=server.authkey)
        assert again.stats().requests == 1  # the served pool, through the same channel
        assert connections.admitted - before == 2


def test_a_server_that_carries_no_requests_on_channels_gets_a_connection_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As an earlier server (its reply to accept_connection names no server-level requests):
    the client creates on a connection of its own, and everything works."""
    monkeypatch.setattr(safepool._server, "CHANNEL_REQUESTS", frozenset())
    with PoolServer(factory=manager_targets.tokens, share="value") as server:
        connections = server._server._connections
        before = connections.admitted
        pool = connect_pool(server.address, authkey=server.authkey)
        with pool.lease(timeout=SHORT) as item:
            assert item.startswith("token-")
        assert connections.admitted - before == 3  # session, creation, channel
        assert pool.stats().requests == 1


def test_a_server_that_creates_on_channels_but_without_the_probe_still_gets_one_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As an earlier server that carries create_for on a channel but not create_probed: the
    client's speculative create_probed gets an error, it creates with create_for on the same
    channel, and its first lease asks for the fast path itself."""
    monkeypatch.setattr(safepool._server, "CHANNEL_REQUESTS", frozenset({"create_for"}))
    with PoolServer(factory=manager_targets.tokens, share="value") as server:
        connections = server._server._connections
        before = connections.admitted
        pool = connect_pool(server.address, authkey=server.authkey)
        assert pool._tls.channel.requests == {"create_for"}
        with pool.lease(timeout=SHORT) as item:
            assert item.startswith("token-")
        assert pool._fast_leaser() is not None
        assert connections.admitted - before == 2  # session, channel


@pytest.mark.parametrize("share", ["hosted", "value"])
def test_the_pool_is_created_with_its_fast_path_in_the_same_reply(share: str) -> None:
    """The creation's reply carries what fast_path() returns: the first lease asks nothing
    more (a by-value pool's table, which this same-host client then leases from; a hosted
    pool's None, so round trips)."""
    with PoolServer(factory=manager_targets.tokens, share=share) as server:
        pool = connect_pool(server.address, authkey=server.authkey)
        offer = pool._fast_offer
        assert offer is None if share == "hosted" else offer["name"] == "pool"
        with pool.lease(timeout=SHORT) as item:
            assert isinstance(item, str) == (share == "value")
        assert (pool._fast_leaser() is not None) == (share == "value")


def test_a_new_client_needs_one_handshake_at_a_time() -> None:
    """A new client's connections are in their handshake one after the other: a server that
    lets only one be at once serves it."""
    with PoolServer(factory=manager_targets.tokens, max_unauthenticated=1) as server:
        for _ in range(3):
            pool = connect_pool(server.address, authkey=server.authkey)
            with pool.lease(timeout=SHORT):
                pass


def test_a_finished_connections_thread_serves_the_next_new_connection() -> None:
    """A serving thread whose connection ended waits for the next new one (no thread start in
    that connection's handshake); stopping the server ends the waiting threads too."""
    with PoolServer(factory=manager_targets.tokens) as server:
        connections = server._server._connections
        address = server._server.address
        request(address, server.authkey, "dummy")
        wait_until(lambda: len(connections._idle) == 1, SHORT, "the thread waits")
        waiting = connections._idle[0].thread
        before = connections.admitted
        request(address, server.authkey, "dummy")
        assert connections.admitted == before + 1
        wait_until(lambda: len(connections._idle) == 1, SHORT, "the thread waits again")
        assert connections._idle[0].thread is waiting
        assert waiting.name == "safepool handshake"
    assert not waiting.is_alive()


def test_only_pool_creation_rides_an_open_channel_and_the_channel_goes_on() -> None:
    """A server-level request other than create_for, sent on a thread's channel, is refused
    with a clear error; the channel's next call returns its own result."""
    with PoolServer(factory=manager_targets.tokens, share="value") as server:
        pool = connect_pool(server.address, authkey=server.authkey)
        channel = pool._channel()
        for name in ("shutdown", "open_session", "accept_connection", "pools", "create"):
            with pytest.raises(AttributeError, match=f"'{name}' is not a request this server"):
                channel.call(pickle.dumps((None, name, (), {})))
        assert server.running
        with pool.lease(timeout=SHORT) as item:
            assert item.startswith("token-")
        assert pool.stats().requests == 1


def _nodelay(fd: int) -> bool:
    sock = socket.socket(fileno=os.dup(fd))
    with sock:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_unauthenticated": 0}, ValueError, "max_unauthenticated must be an int >= 1"),
        ({"max_unauthenticated": 1.5}, ValueError, "max_unauthenticated"),
        ({"handshake_timeout": 0}, ValueError, "handshake_timeout must be a number of seconds"),
        ({"handshake_timeout": -1}, ValueError, "handshake_timeout"),
        ({"handshake_timeout": float("inf")}, ValueError, "handshake_timeout"),
        ({"address": "0.0.0.0:0"}, ValueError, "without an authkey"),
        ({"address": "5599"}, ValueError, "address must be HOST:PORT"),
        ({"authkey": "text"}, TypeError, "authkey must be bytes"),
        ({"manager": object}, TypeError, "manager must be a PoolManager subclass"),
        ({"factory": None, "max_size": 3}, TypeError, "pool options need a factory"),
        ({"min_size": 5, "max_size": 2}, ValueError, "min_size"),
    ],
)
def test_bad_arguments_are_refused_before_anything_listens(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    arguments: dict[str, Any] = {"factory": manager_targets.tokens, **kwargs}
    before = fds()
    with pytest.raises(error, match=match):
        PoolServer(**arguments)
    assert left_open(before) == {}  # nothing opened (other tests' threads may close theirs)


def test_serve_pool_runs_in_a_thread_without_signal_handlers() -> None:
    authkey = secrets.token_bytes(32)
    ready: list[Any] = []
    bound = threading.Event()

    def on_ready(address: Any) -> None:
        ready.append(address)
        bound.set()

    thread = threading.Thread(
        target=serve_pool,
        args=("127.0.0.1:0", manager_targets.tokens),
        kwargs={"authkey": authkey, "on_ready": on_ready},
    )
    thread.start()
    assert bound.wait(SHORT)
    with connect_pool(ready[0], authkey=authkey).lease(timeout=SHORT):
        pass
    request(ready[0], authkey, "shutdown")
    thread.join(SHORT)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="only in the main thread"):
        run_in_thread(
            lambda: serve_pool(
                "127.0.0.1:0", manager_targets.tokens, authkey=authkey, handle_signals=True
            )
        )


def run_in_thread(fn: Any) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(SHORT)
    if errors:
        raise errors[0]


def test_a_manager_without_a_factory_serves_pools_clients_create(tmp_path: Path) -> None:
    from safepool import PoolManager

    with PoolServer(f"unix:{tmp_path / 'm.sock'}") as server:
        client = PoolManager(address=server.address, authkey=server.authkey)
        client.connect()
        pool = client.SafeConnectionPool(
            factory=remote_targets.closing_tokens, max_size=1, share="value"
        )
        with pool.lease(timeout=SHORT) as item:
            assert item == "token-1"


def _child_holds_on(conn: Any, listener_fd: int, port: int) -> None:
    """A child forked from the serving process: reports whether it still has the listening
    socket, then lives on until told to end."""
    try:
        with socket.socket(fileno=os.dup(listener_fd)) as sock:
            still_open = sock.getsockname()[1] == port
    except OSError:
        still_open = False
    conn.send(still_open)
    conn.poll(LONG)  # until the test ends it


def test_a_forked_child_does_not_keep_the_server_reachable() -> None:
    """A program that embeds a server and then forks workers: the workers must not hold the
    listening socket or the client connections, or a stopped server would still accept
    connects (that never get an answer) and its clients would not see it end."""
    ctx = multiprocessing.get_context("fork")
    server = PoolServer(factory=manager_targets.tokens).start()
    pool = connect_pool(server.address, authkey=server.authkey)
    with pool.lease(timeout=SHORT):
        pass
    host, port = server.address.rsplit(":", 1)
    here, there = ctx.Pipe()
    listener = server._server.listener.fileno()
    child = ctx.Process(target=_child_holds_on, args=(there, listener, int(port)))
    child.daemon = True
    child.start()
    try:
        assert here.recv() is False
        server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=SHORT).close()
        with pytest.raises(ManagerUnavailable):
            pool.acquire(timeout=SHORT)  # the connection ended, though the child lives
    finally:
        here.send("end")
        child.join(LONG)


def _hold_a_lease(address: str, authkey: bytes, conn: Any) -> None:
    pool = connect_pool(address, authkey=authkey)
    pool.acquire(timeout=LONG)
    conn.send("held")
    conn.poll(LONG)  # until the test ends it (the server's stop ends its connections first)


def test_a_stop_interrupted_anywhere_is_finished_by_the_next(tmp_path: Path) -> None:
    """Seeded sweep: an exception raised from a signal handler lands at a random point of
    stop() (with a client holding a lease); the next stop() finishes the job: nothing listens,
    the socket file is gone, no server thread and no descriptor is left."""
    rng = seeded("server-stop")
    ctx = multiprocessing.get_context("fork")
    points = sweep_size(12)
    with Interrupter() as interrupter:
        for point in range(points):
            path = tmp_path / f"s{point}.sock"
            threads_before, fds_before = threads(), fds()
            server = PoolServer(f"unix:{path}", manager_targets.tokens, max_size=1).start()
            here, there = ctx.Pipe()
            holder = ctx.Process(target=_hold_a_lease, args=(server.address, server.authkey, there))
            holder.daemon = True  # never outlives a failed test
            holder.start()
            assert here.recv() == "held"
            exc = pick(rng)
            try:
                interrupter.arm(rng.uniform(0, 0.004), exc)
                server.stop()
                spin(0.05)  # it lands here if stop() was quicker (or it was re-armed)
            except exc:
                pass
            interrupter.disarm()
            server.stop()
            assert not path.exists(), f"point {point}"
            with pytest.raises(FileNotFoundError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            here.send("end")
            holder.join(LONG)
            holder.close()
            there.close()
            here.close()
            landed = interrupter.landed
            try:
                wait_until(lambda before=threads_before: threads() == before, SHORT, "threads end")
            except TimeoutError:
                left = sorted(t.name for t in threads() - threads_before)
                where = f"point {point} (landed at {landed})"
                raise AssertionError(f"{where}: {left} still run") from None
            assert left_open(fds_before) == {}, f"point {point}"
    assert interrupter.fired >= points // 2
