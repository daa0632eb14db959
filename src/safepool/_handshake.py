"""The server's side of a new connection before it is trusted: authentication, then the one
request it makes, all within one absolute deadline.

The deadline is set when the connection is accepted, and every read -- a whole message or one
byte of it -- waits only for the time that is left (``poll()`` on the socket, then one ``read()``
of what is there). A client that trickles a byte at a time therefore gets no more time than a
silent one. (Before: each partial read had a fresh ``SO_RCVTIMEO``, so a byte every 0.8 s kept a
connection and its thread for minutes.)

Nothing is unpickled here. Before the client has proved it knows the authkey, the server reads
only the HMAC exchange of :mod:`multiprocessing.connection`, whose messages are at most 256
bytes: a longer length prefix (up to the 8-byte form's 16 EiB) ends the connection before any
buffer is allocated. The request is read only after authentication, and unpickled by the caller.
"""

from __future__ import annotations

import math
import os
import select
import struct
import time
from multiprocessing import connection
from typing import Any

__all__ = ["HandshakeTimeout", "authenticate"]

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_CHUNK = 1 << 20


class HandshakeTimeout(Exception):
    """The connection did not finish its handshake before the deadline."""


class _DeadlineConnection:
    """The connection as the handshake sees it: sends pass through; every read is bounded by
    what is left of one deadline (``time.monotonic()`` seconds)."""

    def __init__(self, conn: Any, deadline: float) -> None:
        self._conn = conn
        self._fd: int = conn.fileno()
        self._deadline = deadline
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)

    def send_bytes(self, data: bytes) -> None:
        self._conn.send_bytes(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        (size,) = _SHORT.unpack(self._read(4))
        if size == -1:
            (size,) = _LONG.unpack(self._read(8))
        if size < 0 or (maxlength is not None and size > maxlength):
            raise OSError(f"bad message length {size} (at most {maxlength} expected)")
        return self._read(size)

    def _read(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            left = self._deadline - time.monotonic()
            if left <= 0 or not self._poller.poll(math.ceil(left * 1000)):
                raise HandshakeTimeout
            chunk = os.read(self._fd, min(count - len(data), _CHUNK))
            if not chunk:
                raise EOFError("the client closed the connection during the handshake")
            data += chunk
        return bytes(data)


def authenticate(conn: Any, authkey: bytes, deadline: float) -> bytes:
    """Run the stdlib's mutual HMAC challenge on ``conn``, then read the client's first request
    (pickled; not unpickled here), all before ``deadline``.

    Raises :class:`HandshakeTimeout`, ``AuthenticationError``, ``EOFError`` or ``OSError``.
    """
    guarded: Any = _DeadlineConnection(conn, deadline)  # the stdlib only sends and receives
    connection.deliver_challenge(guarded, authkey)
    connection.answer_challenge(guarded, authkey)
    return guarded.recv_bytes()  # type: ignore[no-any-return]
