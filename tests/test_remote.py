"""``python -m safepool serve``: a pool for other hosts, with safe defaults."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import socket
import threading
import time
from multiprocessing import AuthenticationError, connection
from pathlib import Path
from typing import Any

import pytest

import remote_targets as targets
import safepool
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, run_cli
from safepool import AuthkeyError, LeaseError, PoolManager, connect_pool, register_pool
from safepool._transport import connect
from safepool.remote import is_local, load_authkey, parse_address

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]

HANDSHAKE = 0.5  # the handshake timeout the silent-client test serves with


@pytest.fixture
def authkey() -> bytes:
    return secrets.token_hex(32).encode()  # 32 random bytes, hex: it travels in $SAFEPOOL_AUTHKEY


def serve_tokens(authkey: bytes, *extra: str) -> Any:
    return targets.served(
        "--address",
        "127.0.0.1:0",
        "--factory",
        "manager_targets:tokens",
        "--share",
        "value",
        "--max-size",
        "2",
        "--typeid",
        "tokens",
        *extra,
        env={"SAFEPOOL_AUTHKEY": authkey.decode()},
    )


@pytest.mark.parametrize("start_method", START_METHODS)
def test_clients_that_register_only_the_typeid_share_the_served_pool(
    authkey: bytes, start_method: str
) -> None:
    with serve_tokens(authkey) as (address, _):
        ctx = multiprocessing.get_context(start_method)
        with ctx.Pool(3) as clients:
            results = clients.starmap(
                targets.client_work, [(address, "tokens", authkey, 10)] * 6, chunksize=1
            )
        assert sum(len(seen) for _, seen in results) == 60
        assert {item for _, seen in results for item in seen} <= {"token-1", "token-2"}
        pool = connect_pool(address, "tokens", authkey=authkey)
        stats = pool.stats()
        assert (stats.requests, stats.leased) == (60, 0)
        assert 1 <= stats.created <= 2


def test_a_served_pool_reclaims_the_leases_of_a_killed_remote_client(authkey: bytes) -> None:
    with serve_tokens(authkey) as (address, _):
        ctx = multiprocessing.get_context("spawn")
        target = (address, "tokens", authkey)
        reader, writer = ctx.Pipe()
        holder = ctx.Process(target=targets.hold, args=(target, writer, "plain"))
        holder.start()
        assert reader.poll(LONG)
        reader.recv()
        pool = connect_pool(address, "tokens", authkey=authkey)
        other = pool.acquire(timeout=SHORT)  # the second of two items
        os.kill(holder.pid, signal.SIGKILL)
        start = time.monotonic()
        again = pool.acquire(timeout=LONG)
        assert time.monotonic() - start < 1.0
        pool.release(again)
        pool.release(other)
        holder.join(LONG)
        assert pool.stats().reclaimed == 1


def test_wrong_authkey_is_refused_while_good_clients_keep_working(authkey: bytes) -> None:
    with serve_tokens(authkey) as (address, _):
        good = connect_pool(address, "tokens", authkey=authkey)
        item = good.acquire(timeout=SHORT)
        with pytest.raises(AuthkeyError, match="refused this authkey"):
            connect_pool(address, "tokens", authkey=secrets.token_hex(32).encode())
        good.release(item)
        with good.lease(timeout=SHORT) as again:
            assert again.startswith("token-")


@pytest.mark.parametrize("right", [True, False])
def test_the_client_handshake_interoperates_with_a_stdlib_listener(
    authkey: bytes, right: bool
) -> None:
    """safepool's client sends its answer and its challenge in one write: a stdlib server reads
    them in turn as ever, and a wrong key is refused (never a reset, nor a hang)."""
    listener = connection.Listener(("127.0.0.1", 0), authkey=authkey)
    served: list[Any] = []

    def serve() -> None:
        try:
            with listener.accept() as conn:
                served.append(conn.recv_bytes())
                conn.send_bytes(b"pong")
        except AuthenticationError as exc:
            served.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        if right:
            with connect(listener.address, authkey) as conn:
                conn.send_bytes(b"ping")
                assert conn.recv_bytes() == b"pong"
        else:
            with pytest.raises(AuthenticationError, match="digest sent was rejected"):
                connect(listener.address, authkey[::-1])
    finally:
        thread.join(LONG)
        listener.close()
    assert served == [b"ping"] if right else isinstance(served[0], AuthenticationError)


def test_a_silent_unauthenticated_connection_is_dropped(authkey: bytes) -> None:
    with serve_tokens(authkey, "--handshake-timeout", str(HANDSHAKE)) as (address, proc):
        silent = socket.create_connection(address, timeout=LONG)
        try:
            challenge = silent.recv(4096)  # the server speaks first; we never answer
            assert challenge
            start = time.monotonic()
            assert silent.recv(4096) == b"", "the server should close the connection"
            assert HANDSHAKE * 0.9 <= time.monotonic() - start < HANDSHAKE + SHORT
            # meanwhile, and after, a good client is served
            with connect_pool(address, "tokens", authkey=authkey).lease(timeout=SHORT):
                pass
        finally:
            silent.close()
        proc.terminate()
        proc.wait(LONG)
        assert "did not authenticate within 0.5s" in proc.stderr.read()


def test_a_client_that_stops_mid_message_is_dropped_too(authkey: bytes) -> None:
    with serve_tokens(authkey, "--handshake-timeout", str(HANDSHAKE)) as (address, _):
        slow = socket.create_connection(address, timeout=LONG)
        try:
            slow.recv(4096)
            slow.sendall(b"\x00\x00")  # half of a length header, then nothing
            start = time.monotonic()
            assert slow.recv(4096) == b""
            assert time.monotonic() - start < HANDSHAKE * 3 + SHORT
        finally:
            slow.close()


def test_stdlib_control_a_silent_connection_pins_a_server_thread_forever() -> None:
    """What the handshake timeout prevents: the stdlib server waits on a silent client."""
    from multiprocessing.managers import BaseManager

    class Plain(BaseManager):
        pass

    with Plain(address=("127.0.0.1", 0), authkey=secrets.token_bytes(32)) as m:
        silent = socket.create_connection(m.address, timeout=2 * HANDSHAKE + 1)
        try:
            silent.recv(4096)
            with pytest.raises(TimeoutError):
                silent.recv(4096)  # still open after longer than our handshake timeout
        finally:
            silent.close()


def test_refuses_a_non_loopback_bind_without_an_authkey(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SAFEPOOL_AUTHKEY"}
    env["PYTHONPATH"] = str(targets.TESTS)
    result = run_cli(
        "serve", "--address", "0.0.0.0:0", "--factory", "manager_targets:tokens", env=env
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without an authkey" in result.stderr
    with pytest.raises(ValueError, match="refusing to serve"):
        safepool.serve_pool(("0.0.0.0", 0), targets.ClosingTokens(), authkey=None)


def test_the_authkey_never_comes_from_the_command_line() -> None:
    result = run_cli("serve", "--factory", "x:y", "--authkey", "k" * 32)
    assert result.returncode == 2
    assert "never taken from the command line" in result.stderr


def test_authkey_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(secrets.token_hex(32) + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_authkey(file=key_file)
    key_file.chmod(0o600)
    assert len(load_authkey(file=key_file) or b"") == 64
    key_file.write_text("short")
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        load_authkey(file=key_file)


def test_loopback_without_a_key_serves_with_a_private_generated_key() -> None:
    env = {"SAFEPOOL_AUTHKEY": ""}
    with targets.served("--factory", "manager_targets:tokens", "--share", "value", env=env) as (
        address,
        proc,
    ):
        line = targets.read_line(proc, LONG)
        key_file = Path(line.split("authkey written to ", 1)[1].split(" (")[0])
        assert key_file.stat().st_mode & 0o077 == 0
        with connect_pool(address, authkey_file=key_file).lease(timeout=SHORT) as item:
            assert item == "token-1"
    assert not key_file.exists()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_shut_down_cleanly_closing_items(
    authkey: bytes, tmp_path: Path, how: signal.Signals
) -> None:
    closed = tmp_path / "closed.log"
    with targets.served(
        "--factory",
        "remote_targets:closing_tokens",
        "--share",
        "value",
        "--min-size",
        "2",
        env={"SAFEPOOL_AUTHKEY": authkey.decode(), "SAFEPOOL_TEST_CLOSE_LOG": str(closed)},
    ) as (address, proc):
        with connect_pool(address, authkey=authkey).lease(timeout=SHORT):
            pass
        proc.send_signal(how)
        assert proc.wait(LONG) == 0
        assert "server stopped" in proc.stderr.read()
    assert sorted(closed.read_text().split("\n")[:-1]) == ["closed token-1", "closed token-2"]


def test_private_names_and_getvalue_fail_on_a_served_pool(authkey: bytes) -> None:
    with serve_tokens(authkey) as (address, _):
        pool = connect_pool(address, "tokens", authkey=authkey)
        for name in ("_pool", "_leases", "__dict__", "#GETVALUE"):
            with pytest.raises(AttributeError, match="not one of its exposed methods"):
                pool._callmethod(name)
        with pytest.raises(AttributeError):
            pool._getvalue()
        with pytest.raises(LeaseError):
            pool._callmethod("release", (1, False))


def test_a_lease_can_only_be_released_by_the_process_that_took_it(authkey: bytes) -> None:
    with serve_tokens(authkey) as (address, _):
        pool = connect_pool(address, "tokens", authkey=authkey)
        token, _ = pool._callmethod("acquire", (SHORT,))
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as other:
            outcome = other.apply(release_token, (address, authkey, token))
        assert outcome == "LeaseError: held by another process"
        pool._callmethod("release", (token, False))
        assert pool.stats().leased == 0


def release_token(address: Any, authkey: bytes, token: int) -> str:
    pool = connect_pool(address, "tokens", authkey=authkey)
    try:
        pool._callmethod("release", (token, False))
    except LeaseError as exc:
        return "LeaseError: held by another process" if "another process" in str(exc) else str(exc)
    return "released"


def test_credentials_in_the_factory_never_show(authkey: bytes) -> None:
    secret = "hunter2-secret"
    with targets.served(
        "--factory",
        "remote_targets:secret_factory",
        "--leak-timeout",
        "0.1",
        "--log-level",
        "DEBUG",
        env={"SAFEPOOL_AUTHKEY": authkey.decode()},
    ) as (address, proc):
        pool = connect_pool(address, authkey=authkey)
        item = pool.acquire(timeout=SHORT)
        texts = [repr(pool), str(pool), repr(pool.stats()), repr(pool.describe())]
        texts += [repr(pool.leases())]
        pool.release(item)
        with pytest.raises(TypeError) as bad:
            PoolManager.SafeConnectionPool(PoolManager(), factory=targets.SecretFactory().dsn)
        texts.append(str(bad.value))
        proc.terminate()
        proc.wait(LONG)
        texts.append(proc.stderr.read())
    assert not [t for t in texts if secret in t]


def test_register_pool_client_against_a_unix_socket_server(tmp_path: Path, authkey: bytes) -> None:
    sock = tmp_path / "pool.sock"
    with targets.served(
        "--address",
        f"unix:{sock}",
        "--factory",
        "manager_targets:tokens",
        "--share",
        "value",
        env={"SAFEPOOL_AUTHKEY": authkey.decode()},
    ) as (address, _):
        assert address == str(sock)

        class Client(PoolManager):
            pass

        register_pool(Client, "pool")
        client = Client(address=address, authkey=authkey)
        client.connect()
        with client.pool().lease(timeout=SHORT) as item:
            assert item == "token-1"


@pytest.mark.parametrize(
    ("text", "parsed", "local"),
    [
        ("127.0.0.1:5500", ("127.0.0.1", 5500), True),
        ("localhost:0", ("localhost", 0), True),
        ("[::1]:7", ("::1", 7), True),
        ("0.0.0.0:5500", ("0.0.0.0", 5500), False),
        ("db.example.com:5500", ("db.example.com", 5500), False),
        ("unix:/run/pool.sock", "/run/pool.sock", True),
    ],
)
def test_addresses(text: str, parsed: Any, local: bool) -> None:
    assert parse_address(text) == parsed
    assert is_local(parsed) is local


@pytest.mark.parametrize("text", ["", "5500", "host:", "host:port", "host:70000", "unix:"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"address|port|socket path"):
        parse_address(text)
