"""One address grammar for every entry point: the CLI, serve_pool, connect_pool, PoolServer and
PoolManager(address=...). ``HOST:PORT`` is TCP, ``[::1]:PORT`` IPv6, ``unix:/path`` a Unix
socket; anything else is a ValueError, raised before anything listens or connects."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

import manager_targets
from helpers import SHORT, run_cli
from safepool import PoolManager, PoolServer, connect_pool, serve_pool
from safepool.remote import parse_address

GOOD = [
    ("127.0.0.1:5500", ("127.0.0.1", 5500)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:7", ("::1", 7)),
    ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    ("db.example.com:65535", ("db.example.com", 65535)),
    ("unix:/run/pool.sock", "/run/pool.sock"),
    ("unix:relative.sock", "relative.sock"),
    ("/run/pool.sock", "/run/pool.sock"),  # the stdlib's spelling, as manager.address returns
]

BAD = [
    ("", "address must be HOST:PORT"),
    ("5500", "address must be HOST:PORT"),
    ("pool.sock", "address must be HOST:PORT"),
    (":5500", "address must be HOST:PORT"),
    ("host:", "must be a number"),
    ("host:port", "must be a number"),
    ("host:70000", "must be 0-65535"),
    ("host:-1", "must be 0-65535"),
    ("::1:5500", "needs brackets"),
    ("[::1:5500", "needs brackets|written \\[ADDRESS\\]:PORT"),
    ("[]:5500", "written \\[ADDRESS\\]:PORT"),
    ("unix:", "needs a socket path"),
]


@pytest.mark.parametrize(("text", "parsed"), GOOD)
def test_the_grammar(text: str, parsed: Any) -> None:
    assert parse_address(text) == parsed
    assert PoolManager(address=text).address == parsed


@pytest.mark.parametrize(("text", "match"), BAD)
def test_every_entry_point_refuses_a_bad_address_the_same_way(text: str, match: str) -> None:
    key = os.urandom(32)
    before = set(os.listdir("."))
    for entry in (
        lambda: parse_address(text),
        lambda: PoolManager(address=text, authkey=key),
        lambda: connect_pool(text, authkey=key),
        lambda: serve_pool(text, manager_targets.tokens, authkey=key),
        lambda: PoolServer(text, manager_targets.tokens, authkey=key),
    ):
        with pytest.raises(ValueError, match=match):
            entry()
    assert set(os.listdir(".")) == before  # no socket file made of the bad address
    result = run_cli("serve", "--factory", "manager_targets:tokens", "--address", text,
                     env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--address" in result.stderr


@pytest.mark.parametrize(
    "address", [("127.0.0.1", "80"), ("127.0.0.1",), ("", 80), (1, 2), 5500, b"x:1"]
)
def test_non_string_addresses_that_are_not_host_port_tuples_are_refused(address: Any) -> None:
    with pytest.raises(ValueError, match="address must be"):
        PoolManager(address=address)


def test_host_port_text_is_tcp_and_makes_no_file(tmp_path: Path, monkeypatch: Any) -> None:
    """serve_pool("127.0.0.1:5599") used to create a Unix socket *file* of that name."""
    monkeypatch.chdir(tmp_path)
    with PoolServer("127.0.0.1:0", manager_targets.tokens, share="value") as server:
        host, port = server.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        with socket.create_connection((host, int(port)), timeout=SHORT):
            pass
        for spelling in (server.address, (host, int(port))):
            with connect_pool(spelling, authkey=server.authkey).lease(timeout=SHORT) as item:
                assert item.startswith("token-")
    assert os.listdir(tmp_path) == []


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_end_to_end() -> None:
    with PoolServer("[::1]:0", manager_targets.tokens, share="value") as server:
        assert server.address.startswith("[::1]:")
        client = connect_pool(server.address, authkey=server.authkey)
        with client.lease(timeout=SHORT) as item:
            assert item.startswith("token-")


def test_unix_spellings_reach_the_same_server(tmp_path: Path) -> None:
    path = tmp_path / "pool.sock"
    with PoolServer(f"unix:{path}", manager_targets.tokens, share="value") as server:
        assert server.address == f"unix:{path}"
        for spelling in (f"unix:{path}", str(path), path):
            with connect_pool(spelling, authkey=server.authkey).lease(timeout=SHORT):
                pass
    assert not path.exists()
