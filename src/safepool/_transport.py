"""Sockets for the manager server and its clients: the one address grammar, a listener that
absorbs bursts, and connections with ``TCP_NODELAY`` on both ends.

**Addresses.** Every entry point (the CLI, :func:`~safepool.serve_pool`,
:func:`~safepool.connect_pool`, :class:`~safepool.PoolServer`, ``PoolManager(address=...)``) reads
a string the same way (:func:`parse_address`): ``HOST:PORT`` is TCP (``[::1]:PORT`` for IPv6),
``unix:/path`` a Unix socket. An absolute path (``/run/pool.sock``) is also a Unix socket: it is
how the stdlib spells one, and what ``manager.address`` returns. Anything else is a
``ValueError``. A ``(host, port)`` tuple is TCP, as in the stdlib.

**Why NODELAY.** The handshake is a few small messages each way; with Nagle's algorithm on one
end and delayed ACKs on the other, each round waited for the peer's ACK timer (~40 ms per
connect on Linux).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from multiprocessing import connection
from typing import Any

from ._handshake import client_handshake

__all__ = [
    "BACKLOG",
    "Listener",
    "check_address",
    "connect",
    "format_address",
    "is_local",
    "open_connection",
    "parse_address",
]

#: The listen backlog: a burst of connects waits in the kernel, not in SYN retries (the stdlib's
#: 16 stalled a burst for 1 s every ~17 connects). The kernel caps it at net.core.somaxconn.
BACKLOG = 1024


def parse_address(text: str) -> tuple[str, int] | str:
    """``"HOST:PORT"``, ``"[::1]:PORT"``, ``"unix:/path"`` (or ``"/path"``) as a manager address:
    a ``(host, port)`` tuple, or a Unix socket path."""
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"address must be HOST:PORT, [IPv6]:PORT or unix:/path/to/socket, got {text!r}"
        )
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("a unix: address needs a socket path, e.g. unix:/run/safepool.sock")
        return path
    if text.startswith("/"):
        return text  # the stdlib's own spelling of a Unix socket (what manager.address returns)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f"address must be HOST:PORT (e.g. 127.0.0.1:5500), [IPv6]:PORT or unix:/path, "
            f"got {text!r}"
        )
    if host.startswith("["):
        if not host.endswith("]") or len(host) == 2:
            raise ValueError(f"an IPv6 address is written [ADDRESS]:PORT, got {text!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}, got {text!r}")
    return host, _port(port, text)


def _port(port: Any, text: object) -> int:
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"the port in {text!r} must be a number, got {port!r}") from None
    if isinstance(port, bool) or not 0 <= number <= 65535:
        raise ValueError(f"the port in {text!r} must be 0-65535, got {port!r}")
    return number


def check_address(address: Any) -> tuple[str, int] | str:
    """Any address an entry point takes (a string in the grammar, ``(host, port)``, a path-like
    for a Unix socket) as a manager address; a clear ``ValueError`` for anything else."""
    if isinstance(address, str):
        return parse_address(address)
    if isinstance(address, os.PathLike):
        path: str = os.fsdecode(address)
        return path
    if (
        isinstance(address, tuple)
        and len(address) == 2
        and isinstance(address[0], str)
        and isinstance(address[1], int)
    ):
        host = address[0].removeprefix("[").removesuffix("]")
        if host:
            return host, _port(address[1], address)
    raise ValueError(
        f"address must be 'HOST:PORT', '[IPv6]:PORT', 'unix:/path' or a (host, port) tuple, "
        f"got {address!r}"
    )


def is_local(address: tuple[str, int] | str) -> bool:
    """True for a Unix socket or a loopback host: nothing outside this machine can connect."""
    if isinstance(address, str):
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def format_address(address: tuple[str, int] | str) -> str:
    """The address in the grammar :func:`parse_address` reads."""
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcp_family(host: str, port: int, passive: bool = False) -> tuple[int, Any]:
    """The socket family and address for ``host``: an IP literal directly (no resolver call,
    which costs milliseconds on a process's first use), a name through ``getaddrinfo``."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if ip.version == 4:
            return socket.AF_INET, (host, port)
        if "%" not in host:  # a scoped address needs getaddrinfo for its scope id
            return socket.AF_INET6, (host, port, 0, 0)
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(address: Any, authkey: bytes, then: bytes = b"") -> Any:
    """An authenticated connection to a manager server (``connection.Client``, with NODELAY set
    before the handshake, IPv6, and one round trip fewer: see safepool._handshake). ``then``:
    framed messages (a first request) to send in the same write as the handshake's last one;
    only for a request whose connection is simply closed if the caller is cut short."""
    conn = open_connection(address)
    try:
        client_handshake(conn, authkey, then)
    except BaseException:
        conn.close()
        raise
    return conn


def open_connection(address: Any) -> Any:
    """A connection to a manager server, not yet authenticated (see :func:`connect`): the
    server starts its side of the handshake at once, and the caller may prepare its first
    request meanwhile."""
    family: int
    target: Any
    if isinstance(address, str):
        family, target = socket.AF_UNIX, address
    else:
        family, target = _tcp_family(address[0], address[1])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:  # cut short anywhere from here (a signal handler raising), the socket is closed
        if family != socket.AF_UNIX:
            _nodelay(sock)
        sock.connect(target)
        return connection.Connection(sock.detach())
    except BaseException:
        sock.close()  # (after detach(): nothing to close)
        raise


class Listener:
    """The server's listening socket. ``accept()`` returns a new connected socket (NODELAY set);
    ``close()`` is idempotent and removes a Unix socket's file."""

    def __init__(self, address: Any, backlog: int = BACKLOG) -> None:
        if address is None:
            address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        address = check_address(address)
        self._path: str | None = None
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(address)
            except BaseException:
                sock.close()
                raise
            self._path = address
            self.address: tuple[str, int] | str = address
        else:
            family, sockaddr = _tcp_family(address[0], address[1], passive=True)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _nodelay(sock)
                sock.bind(sockaddr)
            except BaseException:
                sock.close()
                raise
            bound = sock.getsockname()
            self.address = (bound[0], bound[1])
        try:
            sock.listen(backlog)
        except BaseException:
            self._close(sock)
            raise
        self._sock = sock
        self.fileno = sock.fileno

    def accept(self) -> socket.socket:
        sock, _ = self._sock.accept()
        sock.setblocking(True)
        _nodelay(sock)
        return sock

    def close(self) -> None:
        self._close(self._sock)

    def close_after_fork(self) -> None:
        """In a forked child: close this process's copy of the socket; never remove the file
        (the parent's server still listens on it)."""
        self._path = None
        with contextlib.suppress(OSError):
            os.close(self._sock.detach())

    def _close(self, sock: socket.socket) -> None:
        sock.close()
        path, self._path = self._path, None
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
