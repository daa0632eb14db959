"""Private PostgreSQL and Redis instances, and a TCP proxy, for the budget engines' fault tests.

Tests that stop, restart or partition an engine use these, never the shared instances. Each
instance runs on a free port in a directory of its own and is stopped by the fixture that made
it. PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user
(``runuser``) in a directory under /tmp that user owns.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from helpers import LONG, SHORT, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """``redis-server`` without persistence on a free port (``--save "" --appendonly no``)."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="safepool-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.ping, LONG, "private redis-server answers")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: Redis loses everything, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(LONG)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return Path(found[-1]).parent


class PrivateCluster:
    """A throwaway PostgreSQL cluster (initdb) on a free port, trust authentication."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="safepool-pg-")
        self.data = os.path.join(self.root, "data")
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres"

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=LONG, cwd=self.root)

    def pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "log"), "-w",
                 "-t", str(int(LONG)), "-o", options, *extra, action)  # fmt: skip

    def start(self) -> None:
        self.pg_ctl("start")

    def stop(self) -> None:
        self.pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self.pg_ctl("restart", "-m", "fast")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Proxy:
    """A TCP proxy to ``127.0.0.1:target`` that can be frozen (bytes stop flowing, sockets stay
    open: a hung server or a silent network) and cut (every connection closed)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.frozen = threading.Event()
        self.thawed = threading.Event()
        self.thawed.set()
        self.lock = threading.Lock()  # guards pairs
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.stopping = False
        self.cuts: collections.deque[threading.Event] = collections.deque()  # asked of _run
        self.thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            while self.cuts:  # here, in the one thread that selects: no socket closes under it
                self._cut_all()
                self.cuts.popleft().set()
            if self.frozen.is_set():
                # Frozen: neither forward nor select (the ready sockets would make select()
                # return at once: a busy loop starving the test's threads), nor accept (the
                # kernel's backlog takes new connections, which then hang: a silent server).
                self.thawed.wait(0.05)
                continue
            for key, _ in self.selector.select(0.05):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif not self.frozen.is_set():  # (frozen while select() was waiting)
                    self._forward(sock, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=SHORT)
        except OSError:
            client.close()
            return
        with self.lock:
            self.pairs.append((client, upstream))
        self.selector.register(client, selectors.EVENT_READ, upstream)
        self.selector.register(upstream, selectors.EVENT_READ, client)

    def _forward(self, sock: socket.socket, other: socket.socket) -> None:
        try:
            data = sock.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        self._close_pair(sock)

    def _close_pair(self, sock: socket.socket) -> None:
        with self.lock:
            pairs = [p for p in self.pairs if sock in p]
            self.pairs = [p for p in self.pairs if sock not in p]
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(s)
                s.close()

    def freeze(self) -> None:
        self.thawed.clear()
        self.frozen.set()

    def thaw(self) -> None:
        self.frozen.clear()
        self.thawed.set()

    def cut(self) -> None:
        """Close every proxied connection (both ends see it at once); new ones still work."""
        done = threading.Event()
        self.cuts.append(done)
        assert done.wait(SHORT), "the proxy thread did not cut its connections"

    def _cut_all(self) -> None:
        with self.lock:
            socks = [s for pair in self.pairs for s in pair]
        for s in socks[::2]:
            self._close_pair(s)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(SHORT)
        self._cut_all()  # (the proxy thread has ended)
        self.listener.close()
