"""Operator tools against real servers: ``inspect`` (stats and lease tables), and ``revoke``
taking a lease back from a SIGSTOPped holder process, which then gets LeaseRevoked."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ops_targets
import remote_targets
import safepool
from helpers import (
    FORK_WARNING,
    LONG,
    SHORT,
    START_METHODS,
    ThreadResult,
    run_cli,
    seeded,
    sweep_size,
    wait_until,
)
from safepool import LeaseError, LeaseRevoked, PoolManager, register_pool
from safepool.admin import inspect_server, revoke_lease

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]


@pytest.fixture
def authkey() -> bytes:
    return secrets.token_hex(32).encode()


def shown(address: Any) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"


@contextlib.contextmanager
def items_server(log: Path, authkey: bytes, **options: Any) -> Iterator[Any]:
    """A PoolManager server process hosting the named pool "items" (Items logging to ``log``,
    with a reset hook), for clients that connect by address."""
    manager_cls = type("ItemsManager", (PoolManager,), {})
    options = {"max_size": 1, "reset": ops_targets.reset_item, **options}
    register_pool(manager_cls, "items", ops_targets.LoggedItems(str(log)), **options)
    manager = manager_cls(address=("127.0.0.1", 0), authkey=authkey)
    manager.start()
    try:
        yield manager
    finally:
        manager.shutdown()


@contextlib.contextmanager
def holder_process(start_method: str, address: Any, typeid: str, authkey: bytes) -> Iterator[Any]:
    """A client process that leases one item and holds it (see ops_targets.stopped_holder)."""
    ctx = multiprocessing.get_context(start_method)
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=ops_targets.stopped_holder, args=(address, typeid, authkey, theirs))
    proc.start()
    try:
        assert ours.poll(LONG), "the holder did not lease"
        proc.conn = ours  # type: ignore[attr-defined]
        proc.held = ours.recv()  # type: ignore[attr-defined]
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        with contextlib.suppress(OSError):
            ours.send("end")
        proc.join(LONG)
        if proc.is_alive():
            proc.kill()
            proc.join(LONG)


def cli(*args: str, authkey: bytes) -> Any:
    return run_cli(*args, env={**os.environ, "SAFEPOOL_AUTHKEY": authkey.decode()})


def inspect_json(address: Any, authkey: bytes) -> dict[str, Any]:
    done = cli("inspect", shown(address), "--json", authkey=authkey)
    assert done.returncode == 0, done.stderr
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def the_pool(report: dict[str, Any], name: str) -> dict[str, Any]:
    (pool,) = [p for p in report["pools"] if p["name"] == name]
    return pool


def resume_and_collect(holder: Any) -> None:
    os.kill(holder.pid, signal.SIGCONT)
    holder.conn.send("go")


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("action", ["close", "reset"])
def test_revoke_takes_a_lease_back_from_a_sigstopped_holder(
    tmp_path: Path, authkey: bytes, start_method: str, action: str
) -> None:
    log = tmp_path / "items.log"
    with items_server(log, authkey, leak_timeout=0.05) as manager:
        address = manager.address
        with holder_process(start_method, address, "items", authkey) as holder:
            _, pid, host, number = holder.held
            assert (pid, host, number) == (holder.pid, socket.gethostname(), 1)
            os.kill(holder.pid, signal.SIGSTOP)

            # inspect: the lease table names the stopped holder, and flags the leak.
            def leak_flagged() -> bool:
                leases = the_pool(inspect_json(address, authkey), "items")["leases"]
                return len(leases) == 1 and leases[0]["leaked"]

            wait_until(leak_flagged, LONG, "the lease is flagged as a leak")
            report = inspect_json(address, authkey)
            pool = the_pool(report, "items")
            (lease,) = pool["leases"]
            assert lease["pid"] == holder.pid and lease["host"] == socket.gethostname()
            assert lease["process"] == holder.name and lease["held_for"] >= 0.05
            assert pool["stats"]["leased"] == 1 and pool["stats"]["revoked"] == 0

            done = cli("revoke", shown(address), "items", str(lease["lease_id"]),
                       "--action", action, authkey=authkey)  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"revoked lease {lease['lease_id']}" in done.stdout

            # The item is usable by others at once, while the holder is still stopped.
            ours = manager_proxy(address, authkey)
            item = ours.acquire(timeout=SHORT)
            expected = 2 if action == "close" else 1  # closed: a new item; reset: the same one
            assert item.call(ops_targets.use) == expected
            lines = ops_targets.log_lines(str(log))
            assert ("closed 1" in lines) == (action == "close")
            assert ("reset 1" in lines) == (action == "reset")

            resume_and_collect(holder)
            # The holder's use and release raise LeaseRevoked (it never touches our item),
            # then it waits for the pool's one item, which we hold.
            wait_until(lambda: ours.stats().waiting == 1, LONG, "the holder waits for an item")
            assert item.call(ops_targets.use) == expected
            ours.release(item)
            assert holder.conn.poll(LONG)
            use, release, again = holder.conn.recv()
            for step, name in ((use, "use"), (release, "release")):
                assert step[:5] == (name, "revoked", "items", lease["lease_id"], action), step
                assert "revoked by an operator" in step[5]
            assert again == ("again", expected)
            holder.conn.send("end")
            holder.join(LONG)
            assert holder.exitcode == 0

        stats = the_pool(inspect_json(address, authkey), "items")["stats"]
        assert stats["revoked"] == 1 and stats["leased"] == 0
        assert stats["created"] == (2 if action == "close" else 1)
        assert stats["size"] == stats["idle"] == 1


def manager_proxy(address: Any, authkey: bytes) -> Any:
    return safepool.connect_pool(address, "items", authkey=authkey)


def test_inspect_and_revoke_a_served_pool_through_the_cli(tmp_path: Path, authkey: bytes) -> None:
    """`python -m safepool serve` in a subprocess; the holder is a spawn child, stopped."""
    close_log = tmp_path / "closed.log"
    env = {"SAFEPOOL_AUTHKEY": authkey.decode(), "SAFEPOOL_TEST_CLOSE_LOG": str(close_log)}
    with remote_targets.served(
        "--address", "127.0.0.1:0", "--factory", "remote_targets:closing_tokens",
        "--max-size", "2", "--typeid", "tokens", "--leak-timeout", "30", env=env,
    ) as (address, _), holder_process("spawn", address, "tokens", authkey) as holder:  # fmt: skip
        os.kill(holder.pid, signal.SIGSTOP)
        text = cli("inspect", shown(address), authkey=authkey)
        assert text.returncode == 0, text.stderr
        assert "pool 'tokens'" in text.stdout and "LEASE  PID" in text.stdout
        row = text.stdout.splitlines()[-1]
        assert str(holder.pid) in row and "SpawnProcess" in row and "LEAK" not in row
        report = inspect_json(address, authkey)
        assert report["address"] == shown(address)
        (lease,) = the_pool(report, "tokens")["leases"]
        assert lease["leaked"] is False and lease["lease_id"] == 1

        # Bad input: clear errors, nothing changed.
        cases = [
            (("revoke", shown(address), "tokens", "7", "--action", "close"), 1, "no lease 7"),
            (("revoke", shown(address), "nope", "1", "--action", "close"), 1, "'tokens'"),
            (("revoke", shown(address), "tokens", "x1", "--action", "close"), 2, "lease id"),
            (("revoke", shown(address), "tokens", "1", "--action", "drop"), 2, "invalid choice"),
            (("revoke", shown(address), "tokens", "1"), 2, "--action"),
            (("inspect", "127.0.0.1:99999"), 2, "0-65535"),
        ]
        for args, code, message in cases:
            done = cli(*args, authkey=authkey)
            assert done.returncode == code and message in done.stderr, (args, done.stderr)
        unset = run_cli("inspect", shown(address), "--authkey-env", "SAFEPOOL_TEST_UNSET_KEY")
        assert unset.returncode == 2 and "$SAFEPOOL_TEST_UNSET_KEY is not set" in unset.stderr
        wrong = run_cli("inspect", shown(address),
                        env={**os.environ, "SAFEPOOL_AUTHKEY": "w" * 32})  # fmt: skip
        assert wrong.returncode == 1 and "refused this authkey" in wrong.stderr
        assert the_pool(inspect_json(address, authkey), "tokens")["stats"]["leased"] == 1

        done = cli("revoke", shown(address), "tokens", "1", "--action", "close", authkey=authkey)
        assert done.returncode == 0, done.stderr
        assert "closed token-1" in ops_targets.log_lines(str(close_log))
        resume_and_collect(holder)
        assert holder.conn.poll(LONG)
        use, release, again = holder.conn.recv()
        assert use[:2] == ("use", "revoked") and release[:2] == ("release", "revoked")
        assert again == ("again", "token-2")
        stats = the_pool(inspect_json(address, authkey), "tokens")["stats"]
        assert stats["revoked"] == 1 and stats["closed"] == 1 and stats["created"] == 2


def test_a_by_value_lease_is_revoked_too(authkey: bytes) -> None:
    manager_cls = type("TokensManager", (PoolManager,), {})
    register_pool(manager_cls, "tokens", remote_targets.closing_tokens, share="value",
                  fast_path=False, max_size=1)  # fmt: skip
    with manager_cls(address=("127.0.0.1", 0), authkey=authkey) as manager:
        pool = manager.tokens()
        token = pool.acquire()
        (report,) = inspect_server(manager.address, authkey=authkey)
        (lease,) = report.leases
        assert report.share == "value" and lease.pid == os.getpid()
        info = revoke_lease(manager.address, "tokens", lease.lease_id, action="reset",
                            authkey=authkey)  # fmt: skip
        assert info.lease_id == lease.lease_id
        with pytest.raises(LeaseRevoked) as raised:
            pool.release(token)
        assert raised.value.action == "reset" and isinstance(raised.value, ValueError)
        with pytest.raises(LeaseError, match="not leased"):  # told once: the copy is forgotten
            pool.release(token)
        assert pool.acquire(timeout=SHORT) == token  # the same token, back in the pool
        assert pool.stats().revoked == 1


def test_revoke_refuses_a_lease_whose_call_is_running(tmp_path: Path, authkey: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with items_server(tmp_path / "log", authkey) as manager:
        pool = manager_proxy(manager.address, authkey)
        item = pool.acquire()
        call = ThreadResult(lambda: item.call(ops_targets.read_fifo, str(fifo)))
        with open(fifo, "w") as writer:  # opens once the call is running in the server
            (lease,) = pool.leases()
            with pytest.raises(LeaseError, match="running a call"):
                pool.revoke(lease.lease_id, action="close")
            writer.write("done")
        assert call.join() == "done"
        assert pool.stats().revoked == 0 and pool.leases()[0].lease_id == lease.lease_id
        pool.revoke(lease.lease_id, action="close")
        with pytest.raises(LeaseRevoked):
            item.call(ops_targets.use)


def test_bad_revoke_arguments_are_refused_before_anything_is_sent(
    tmp_path: Path, authkey: bytes
) -> None:
    with items_server(tmp_path / "log", authkey) as manager:
        pool = manager_proxy(manager.address, authkey)
        item = pool.acquire()
        for lease_id in (0, -1, True, "1", 1.0):
            with pytest.raises(TypeError, match="lease_id"):
                pool.revoke(lease_id)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="'close'"):
            pool.revoke(1, action="drop")
        with pytest.raises(ValueError, match="'close'"):
            revoke_lease(manager.address, "items", 1, action="kill", authkey=authkey)
        with pytest.raises(LookupError, match="no pool named 'other'"):
            revoke_lease(manager.address, "other", 1, action="close", authkey=authkey)
        with pytest.raises(ValueError, match="no authkey"):
            inspect_server(manager.address, authkey_env="SAFEPOOL_TEST_UNSET_KEY")
        assert pool.stats().leased == 1 and pool.stats().revoked == 0
        pool.release(item)


def race_once(pool: Any, address: Any, authkey: bytes, action: str, spins: tuple[int, int]) -> Any:
    """One lease, released by its holder while an operator revokes it, started together."""
    item = pool.acquire(timeout=SHORT)
    (lease,) = pool.leases()
    barrier = threading.Barrier(2)

    def release() -> str:
        barrier.wait(SHORT)
        for _ in range(spins[0]):
            pass
        try:
            pool.release(item)
        except LeaseRevoked:
            return "revoked"
        return "released"

    def revoke() -> str:
        barrier.wait(SHORT)
        for _ in range(spins[1]):
            pass
        try:
            revoke_lease(address, "items", lease.lease_id, action=action, authkey=authkey)
        except LeaseError as exc:
            return "too late" if "no lease" in str(exc) else repr(exc)
        return "revoked it"

    releaser, revoker = ThreadResult(release), ThreadResult(revoke)
    return releaser.join(), revoker.join()


def test_revoke_racing_a_release_ends_the_lease_exactly_once(
    tmp_path: Path, authkey: bytes
) -> None:
    """A sweep: the holder releases while the operator revokes, started together. Exactly one
    wins; the loser is told (LeaseRevoked, or no such lease); the item is never leased twice."""
    rng = seeded("revoke-vs-release")
    log = tmp_path / "log"
    with items_server(log, authkey, max_size=2) as manager:
        pool = manager_proxy(manager.address, authkey)
        revoked = 0
        for point in range(sweep_size(40)):
            action = rng.choice(["close", "reset"])
            spins = (rng.randrange(2000), rng.randrange(2000))
            outcome = race_once(pool, manager.address, authkey, action, spins)
            assert outcome in {("released", "too late"), ("revoked", "revoked it")}, (
                f"seed point {point}: {outcome}"
            )
            revoked += outcome[1] == "revoked it"
            stats = pool.stats()
            assert stats.leased == 0 and stats.revoked == revoked, f"seed point {point}"
            assert stats.size == stats.idle <= 2
            # Full capacity is usable, and two leases never share an item.
            a, b = pool.acquire(timeout=SHORT), pool.acquire(timeout=SHORT)
            assert a.call(ops_targets.use) != b.call(ops_targets.use)
            pool.release(a)
            pool.release(b)


def leaky_pool(manager: Any, log: Path) -> Any:
    factory = ops_targets.LoggedItems(str(log))
    return manager.SafeConnectionPool(factory=factory, max_size=1, leak_timeout=0.05, name="leaky")


# A forked server inherits this process's logging configuration, and rightly sends its records
# there: here pytest's handlers on the root logger, so the fork case runs without them. Not
# forkserver: its servers inherit the stderr of the fork server process (made by an earlier
# test, and captured there), not this test's.
@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_a_manager_server_logs_leaks_to_its_stderr_by_default(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    start_method: str,
) -> None:
    err: list[str] = []

    def logged(text: str) -> bool:
        err.append(capfd.readouterr().err)
        return text in "".join(err)

    manager = PoolManager(ctx=multiprocessing.get_context(start_method))
    with monkeypatch.context() as patch:
        patch.setattr(logging.getLogger(), "handlers", [])
        manager.start()
    with manager:
        pool = leaky_pool(manager, tmp_path / "log")
        item = pool.acquire()
        wait_until(lambda: logged("leak_timeout=0.05"), LONG, "the leak warning on stderr")
        assert pool.stats().leaks == 1
        (lease,) = pool.leases()
        pool.revoke(lease.lease_id, action="close")
        wait_until(lambda: logged("revoked by an operator"), LONG, "the revoke on stderr")
        with pytest.raises(LeaseRevoked):
            pool.release(item)
    text = "".join(err)
    line = next(line for line in text.splitlines() if "leak_timeout=0.05" in line)
    assert "WARNING safepool.pool[" in line and "pool 'leaky'" in line
    assert f"pid {os.getpid()}" in line  # the holder, named by its session


def test_log_level_none_leaves_the_server_silent(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with PoolManager(ctx=multiprocessing.get_context("spawn"), log_level=None) as manager:
        pool = leaky_pool(manager, tmp_path / "log")
        pool.acquire()
        wait_until(lambda: pool.stats().leaks == 1, LONG, "the leak is counted")
        (lease,) = pool.leases()
        pool.revoke(lease.lease_id, action="close")
    assert "safepool" not in capfd.readouterr().err  # the server process has ended: all written


@pytest.mark.parametrize(
    ("level", "error"),
    [("LOUD", ValueError), ("", ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError)],
)
def test_bad_log_levels_are_refused_at_construction(level: Any, error: type) -> None:
    with pytest.raises(error, match="log_level"):
        PoolManager(log_level=level)


def test_log_level_names_and_numbers_are_accepted() -> None:
    for level, number in (("debug", 10), ("WARNING", 30), (40, 40), (None, None)):
        assert PoolManager(log_level=level)._log_level == number


def test_a_fast_path_lease_has_no_id_and_is_not_revocable(authkey: bytes) -> None:
    """A same-host client's lease in a fast-path table is taken without the server: inspect
    lists it with no id (end its process to get it back)."""
    manager_cls = type("FastManager", (PoolManager,), {})
    register_pool(manager_cls, "fast", remote_targets.closing_tokens, share="value", max_size=1)
    with manager_cls(address=("127.0.0.1", 0), authkey=authkey) as manager:
        pool = manager.fast()
        if not pool.describe()["fast_path"]:
            pytest.skip(f"no fast path here: {pool.describe()['fast_path_reason']}")
        token = pool.acquire()
        (report,) = inspect_server(manager.address, authkey=authkey)
        (lease,) = report.leases
        assert lease.lease_id is None and lease.pid == os.getpid()
        with pytest.raises(LeaseError, match="no lease 1 is held"):
            pool.revoke(1, action="close")
        pool.release(token)
        # A lease taken through the server (as a remote client takes it) has an id, and goes.
        remote = manager.fast()
        remote._fast = False  # this proxy takes the round-trip path, like another host's
        held = remote.acquire(timeout=SHORT)
        (report,) = inspect_server(manager.address, authkey=authkey)
        (lease,) = report.leases
        assert lease.lease_id == 1 and report.fast_path
        pool.revoke(1, action="reset")
        with pytest.raises(LeaseRevoked):
            remote.release(held)
        assert pool.acquire(timeout=SHORT) == held  # back in the table, usable at once
        assert pool.stats().revoked == 1


def revoke_during_calls(pool: Any, address: Any, authkey: bytes, calls_first: int) -> int:
    """A holder thread calls its item in a loop; after ``calls_first`` calls the operator
    revokes (action reset: the same item goes back), then uses the item itself. Returns the
    revokes refused because a call was running."""
    item = pool.acquire(timeout=SHORT)
    (lease,) = pool.leases()
    started = threading.Event()

    def hold() -> int:
        done = 0
        while True:
            try:
                item.call(ops_targets.exclusive_use)
            except LeaseRevoked:
                return done
            done += 1
            if done == calls_first:
                started.set()

    holder = ThreadResult(hold)
    assert started.wait(LONG)
    busy = 0
    while True:
        try:
            revoke_lease(address, "items", lease.lease_id, action="reset", authkey=authkey)
            break
        except LeaseError as exc:
            if "running a call" not in str(exc):
                raise
            busy += 1
    with pool.lease(timeout=SHORT) as mine:  # the same item, while the holder keeps trying
        for _ in range(5):
            assert mine.call(ops_targets.exclusive_use) == 1
    holder.join()
    return busy


def test_revoke_racing_calls_on_the_item_never_shares_it(tmp_path: Path, authkey: bytes) -> None:
    """A sweep: the holder keeps calling its item while the operator revokes. A revoke never
    lands while a call runs (it is refused, or waits for a call that raced it), and after it
    the holder's calls fail: no two calls ever run on the item at once."""
    rng = seeded("revoke-vs-calls")
    with items_server(tmp_path / "log", authkey) as manager:
        pool = manager_proxy(manager.address, authkey)
        points = sweep_size(12)
        for point in range(points):
            revoke_during_calls(pool, manager.address, authkey, rng.randrange(1, 20))
            stats = pool.stats()
            assert stats.revoked == point + 1 and stats.leased == 0, f"seed point {point}"
            assert stats.created == 1 and stats.size == 1  # one item throughout, never lost


def test_inspect_a_server_on_a_unix_socket(tmp_path: Path, authkey: bytes) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(authkey)
    key_file.chmod(0o600)
    address = str(tmp_path / "pool.sock")
    with PoolManager(address=address, authkey=authkey) as manager:
        pool = manager.SafeConnectionPool(factory=object, max_size=3, name="unix-pool")
        with pool.lease():
            done = run_cli("inspect", f"unix:{address}", "--json", "--authkey-file", str(key_file))
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["address"] == f"unix:{address}"
        stats = the_pool(report, "unix-pool")["stats"]
        assert (stats["leased"], stats["max_size"]) == (1, 3)
        both = run_cli("inspect", f"unix:{address}", "--authkey-file", str(key_file),
                       "--authkey-env", "X")  # fmt: skip
        assert both.returncode == 2 and "not allowed with" in both.stderr


def test_revoke_racing_the_holders_death_returns_the_item_once(
    tmp_path: Path, authkey: bytes
) -> None:
    """A sweep: the holder is SIGKILLed while the operator revokes its lease. Either the
    server reclaims it (the revoke finds no lease) or the revoke takes it (the reclaim finds
    none): reclaimed + revoked == 1, and the item is back once."""
    rng = seeded("revoke-vs-death")
    with items_server(tmp_path / "log", authkey, max_size=2) as manager:
        pool = manager_proxy(manager.address, authkey)
        for point in range(sweep_size(6)):
            with holder_process("fork", manager.address, "items", authkey) as holder:
                (lease,) = pool.leases()
                barrier = threading.Barrier(2)

                def kill(pid: int = holder.pid, barrier: Any = barrier) -> None:
                    barrier.wait(SHORT)
                    os.kill(pid, signal.SIGKILL)

                killer = ThreadResult(kill)
                barrier.wait(SHORT)
                for _ in range(rng.randrange(3000)):
                    pass
                try:
                    pool.revoke(lease.lease_id, action=rng.choice(["close", "reset"]))
                except LeaseError as exc:
                    assert "no lease" in str(exc), f"seed point {point}: {exc}"  # noqa: PT017
                killer.join()
                holder.join(LONG)
            wait_until(lambda: pool.stats().leased == 0, LONG, f"seed point {point}")
            stats = pool.stats()
            assert stats.reclaimed + stats.revoked == point + 1, f"seed point {point}: {stats}"
            assert stats.size == stats.idle <= 2
            a, b = pool.acquire(timeout=SHORT), pool.acquire(timeout=SHORT)
            assert a.call(ops_targets.use) != b.call(ops_targets.use)
            pool.release(a)
            pool.release(b)
