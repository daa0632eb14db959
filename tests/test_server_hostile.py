"""A pool server under hostile connections: silent, trickling, garbage and oversized-prefix ones,
1,000 at once, and a server out of file descriptors. Real server processes, real sockets; a
legitimate client's lease latency is measured throughout and its slowdown bounded (generously:
the tight ratio is a benchmark, benchmarks/pool_server.py)."""

from __future__ import annotations

import contextlib
import pickle
import secrets
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import server_targets as targets
from helpers import LONG, SHORT, wait_until
from safepool import connect_pool

pytestmark = pytest.mark.timeout(180)

HANDSHAKE = 1.0  # the servers' handshake timeout here, in seconds


@pytest.fixture
def authkey() -> bytes:
    return secrets.token_hex(32).encode()


def serve(
    tmp_path: Path, authkey: bytes, *extra: str, nofile: int = 4096
) -> contextlib.AbstractContextManager[tuple[Any, subprocess.Popen[str]]]:
    return targets.server_process(
        tmp_path / "server.log",
        "--factory",
        "manager_targets:tokens",
        "--max-size",
        "2",
        "--handshake-timeout",
        str(HANDSHAKE),
        "--log-level",
        "WARNING",
        *extra,
        nofile=nofile,
        authkey=authkey,
    )


def test_a_thousand_hostile_connections_leave_a_legitimate_client_served(
    tmp_path: Path, authkey: bytes
) -> None:
    targets.raise_nofile(4096)
    with serve(tmp_path, authkey, "--log-level", "INFO") as (address, proc):
        pool = connect_pool(address, authkey=authkey)
        idle = targets.lease_latencies(pool, 200)
        with targets.Hostile(address, 1000) as hostile:
            during = targets.lease_latencies(pool, 300)
            # The cap (64 by default) held: most were closed at once, the rest by the deadline.
            wait_until(lambda: hostile.open_count() == 0, LONG, "every hostile connection closed")
            during += targets.lease_latencies(pool, 100)
        # a new client connects once the flood is over
        fresh = connect_pool(address, authkey=authkey)
        with fresh.lease(timeout=SHORT):
            pass
        assert proc.poll() is None
    assert targets.p99(during) < 1.0, (targets.p99(idle), targets.p99(during))
    kept = [hostile.closed_after[i] for i in hostile.closed_after if hostile.kinds[i] != "garbage"]
    assert max(kept) < HANDSHAKE + 3.0  # nothing outlived the deadline by more than slack
    log = (tmp_path / "server.log").read_text()
    assert "max_unauthenticated=64" in log
    assert log.count("\n") < 50, "a flood of hostile connections must not flood the log"


def test_trickling_connections_are_closed_at_the_absolute_deadline(
    tmp_path: Path, authkey: bytes
) -> None:
    with (
        serve(tmp_path, authkey) as (address, _),
        targets.Hostile(address, 20, kinds=("trickle",)) as hostile,
    ):
        wait_until(lambda: len(hostile.closed_after) == 20, LONG, "trickles closed")
    times = sorted(hostile.closed_after.values())
    # one byte every 0.2 s would last 13 s; the deadline is 1 s from accept, for all of it
    assert times[0] >= HANDSHAKE * 0.9, times
    assert times[-1] < HANDSHAKE + 1.0, times


def test_garbage_and_oversized_prefixes_are_closed_at_once(tmp_path: Path, authkey: bytes) -> None:
    with (
        serve(tmp_path, authkey) as (address, _),
        targets.Hostile(address, 40, kinds=("garbage", "huge")) as hostile,
    ):
        wait_until(lambda: len(hostile.closed_after) == 40, LONG, "all closed")
    assert max(hostile.closed_after.values()) < HANDSHAKE, hostile.closed_after


def test_nothing_is_unpickled_before_authentication(tmp_path: Path, authkey: bytes) -> None:
    """A pickle that would create a file, sent instead of the challenge's answer, and as a
    request without authenticating: the server never loads it."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, ...]:
            return (Path.touch, (marker,))

    payload = pickle.dumps(Exploit())
    with serve(tmp_path, authkey) as (address, proc):
        for read_challenge in (True, False):  # as the answer; before the challenge is read
            sock = socket.create_connection(address, timeout=SHORT)
            with sock:
                if read_challenge:
                    sock.recv(4096)
                sock.sendall(struct.pack("!i", len(payload)) + payload)
                while sock.recv(4096):
                    pass
        with connect_pool(address, authkey=authkey).lease(timeout=SHORT):
            pass
        assert proc.poll() is None
    assert not marker.exists()


def test_out_of_file_descriptors_the_accepter_backs_off_and_clients_keep_working(
    tmp_path: Path, authkey: bytes
) -> None:
    """RLIMIT_NOFILE lowered in the server: silent connections exhaust its descriptors (the cap
    is set above the limit, so only the limit stops them). The accepter must back off, not spin
    (the stdlib's loop burnt 100% of a core), and the connected client keeps leasing."""
    targets.raise_nofile(4096)
    with serve(tmp_path, authkey, "--max-unauthenticated", "1000", nofile=64) as (
        address,
        proc,
    ):
        pool = connect_pool(address, authkey=authkey)
        targets.lease_latencies(pool, 20)
        with targets.Hostile(address, 300, kinds=("silent",)):
            wait_until(
                lambda: "cannot accept connections" in (tmp_path / "server.log").read_text(),
                SHORT,
                "the accepter ran out of descriptors",
            )
            during = targets.lease_latencies(pool, 200)
            # CPU over a quiet window while still out of descriptors (300 silent connections,
            # ~50 at a time, each held for the 1 s deadline): spinning would be ~100%
            start_cpu, start = targets.cpu_seconds(proc.pid), time.monotonic()
            threading.Event().wait(0.5)  # the measuring window, not synchronisation
            cpu = (targets.cpu_seconds(proc.pid) - start_cpu) / (time.monotonic() - start)
            during += targets.lease_latencies(pool, 50)
        # the flood is gone: a new client gets in (its connects need descriptors again)
        wait_until(lambda: _connects(address, authkey), LONG, "a new client connects")
        assert proc.poll() is None
    assert targets.p99(during) < 1.0, targets.p99(during)
    assert cpu < 0.5, f"the server used {cpu:.0%} of a core while out of descriptors"


def _connects(address: object, authkey: bytes) -> bool:
    try:
        with connect_pool(address, authkey=authkey).lease(timeout=SHORT):
            return True
    except Exception:
        return False
