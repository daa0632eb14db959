"""Helpers for the server tests: a server in a subprocess (with its own RLIMIT_NOFILE), hostile
connections of every kind, a legitimate client's lease latencies, factories for the CLI tests."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers import LONG

TESTS = Path(__file__).resolve().parent

HOSTILE_KINDS = ("silent", "trickle", "garbage", "huge")


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to ``wanted`` (or the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


@contextlib.contextmanager
def server_process(
    log: Path, *args: str, nofile: int = 4096, authkey: bytes
) -> Iterator[tuple[Any, subprocess.Popen[str]]]:
    """``python -m safepool serve ARGS`` with RLIMIT_NOFILE ``nofile``; yields (address, proc)
    once it listens. Its stderr goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SAFEPOOL_AUTHKEY": authkey.decode()}
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "limited_serve.py"), str(nofile), *args],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], LONG)
        line = proc.stdout.readline() if ready else ""
        if " at " not in line:
            raise AssertionError(f"the server did not start: {line!r} {log.read_text()!r}")
        host, port = line.rsplit(" at ", 1)[1].strip().rsplit(":", 1)
        yield (host, int(port)), proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(LONG)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Hostile:
    """Hostile connections to one server, of the given kinds in turn, driven by one thread:
    ``trickle`` ones send one byte every 0.2 s (a plausible header, then junk), ``garbage``
    ones junk of the right size, ``huge`` ones a length prefix of 2**63 - 1, ``silent`` ones
    nothing. ``closed_after[i]``: seconds from connect until the server closed connection i."""

    def __init__(self, address: Any, count: int, kinds: tuple[str, ...] = HOSTILE_KINDS) -> None:
        self.address = address
        self.kinds = [kinds[i % len(kinds)] for i in range(count)]
        self.socks: list[socket.socket | None] = []
        self.opened: list[float] = []
        self.closed_after: dict[int, float] = {}
        self.refused = 0  # connects the server did not accept (backlog full, reset)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drive, daemon=True)

    def __enter__(self) -> Hostile:
        for kind in self.kinds:
            try:
                sock = socket.create_connection(self.address, timeout=LONG)
            except OSError:
                self.refused += 1
                self.socks.append(None)
                self.opened.append(time.monotonic())
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                if kind == "garbage":
                    sock.send(struct.pack("!i", 32) + os.urandom(32))
                elif kind == "huge":
                    sock.send(struct.pack("!iQ", -1, 2**63 - 1) + b"x" * 64)
            self.socks.append(sock)
            self.opened.append(time.monotonic())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(LONG)
        for sock in self.socks:
            if sock is not None:
                sock.close()

    def open_count(self) -> int:
        return sum(1 for i, s in enumerate(self.socks) if s is not None) - len(self.closed_after)

    def _drive(self) -> None:
        trickle = b"\x00\x00\x00\x20" + b"t" * 64
        sent = 0
        while not self._stop.is_set():
            now = time.monotonic()
            for i, sock in enumerate(self.socks):
                if sock is None or i in self.closed_after:
                    continue
                if self._server_closed(sock):
                    self.closed_after[i] = now - self.opened[i]
                elif self.kinds[i] == "trickle" and sent < len(trickle):
                    with contextlib.suppress(OSError):
                        sock.send(trickle[sent : sent + 1])
            sent += 1
            self._stop.wait(0.2)  # the trickle's pace (the workload, not synchronisation)

    @staticmethod
    def _server_closed(sock: socket.socket) -> bool:
        try:
            while True:  # drain the challenge; b"" is the server's close
                if not sock.recv(4096):
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True


def lease_latencies(pool: Any, count: int) -> list[float]:
    """Seconds each of ``count`` lease-and-release round trips took."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        with pool.lease(timeout=LONG):
            pass
        times.append(time.perf_counter() - start)
    return times


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class SlowClosing:
    """Items whose close() records that shutdown began, then blocks (a hung driver)."""

    def __call__(self) -> SlowItem:
        return SlowItem()


class SlowItem:
    def close(self) -> None:
        marker = os.environ.get("SAFEPOOL_TEST_CLOSING")
        if marker:
            Path(marker).write_text("closing")
        time.sleep(LONG)  # the hang the second Ctrl+C cuts short


slow_closing = SlowClosing()


def needs_argument(dsn: str) -> str:
    return dsn


not_callable = 42
