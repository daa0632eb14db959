"""A new connection before it is trusted: the server's side (authentication, then the one request
it makes, all within one absolute deadline), and the client's (:func:`client_handshake`).

The deadline is set when the connection is accepted, and every read -- a whole message or one
byte of it -- waits only for the time that is left (``poll()`` on the socket, then one ``read()``
of what is there). A client that trickles a byte at a time therefore gets no more time than a
silent one. (Before: each partial read had a fresh ``SO_RCVTIMEO``, so a byte every 0.8 s kept a
connection and its thread for minutes.)

Nothing is unpickled here. Before the client has proved it knows the authkey, the server reads
only the HMAC exchange of :mod:`multiprocessing.connection`, whose messages are at most 256
bytes: a longer length prefix (up to the 8-byte form's 16 EiB) ends the connection before any
buffer is allocated. The request is read only after authentication, and unpickled by the caller.

**Round trips.** The exchange is the stdlib's, message for message (so stdlib clients and servers
keep working with safepool's), but neither side waits when it need not: the client sends its
answer to the server's challenge and its own challenge in one write (the stdlib client waits for
the server's verdict on its answer first), and the server sends its verdict and its answer to the
client's challenge in one write when that challenge is already there. A client's connect takes
one round trip fewer. What each side sends before it has verified the other is what the stdlib
sends then too, plus the client's random challenge; the client sends its request only after it
has verified the server, and the server unpickles nothing before it has verified the client.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import struct
import time
from multiprocessing import AuthenticationError, connection
from typing import Any

__all__ = ["HandshakeTimeout", "authenticate", "client_handshake"]

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
        self._out = bytearray()  # messages sent, not yet written (see flush)

    def send_bytes(self, data: bytes) -> None:
        self._out += _SHORT.pack(len(data)) + data  # the handshake's are at most 256 bytes

    def flush(self) -> None:
        """Write what was sent: before any wait for the client, so one write carries the
        messages sent since the last wait (a verdict and an answer)."""
        out, self._out = bytes(self._out), bytearray()
        if out:
            _write_all(self._fd, out)

    def drain(self) -> None:
        """Read what the client sent and nobody will read (its challenge, after a wrong answer):
        a socket closed with unread data is reset, and the reset could overtake the verdict."""
        with contextlib.suppress(OSError):
            if self._poller.poll(0):
                os.read(self._fd, 4096)

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
            if self._out and not self._poller.poll(0):
                self.flush()
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
    guarded = _DeadlineConnection(conn, deadline)
    stand_in: Any = guarded  # the stdlib only sends and receives
    try:
        connection.deliver_challenge(stand_in, authkey)
    except AuthenticationError:
        guarded.flush()  # the verdict
        guarded.drain()
        raise
    connection.answer_challenge(stand_in, authkey)
    return guarded.recv_bytes()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the client's side ---------------------------------------------------------------------------


class _Paused(Exception):
    """A scripted handshake function asked for a message that has not come yet."""


class _Script:
    """A stand-in connection for one of the stdlib's handshake functions: it receives the given
    messages, then pauses the function (raising :class:`_Paused`); what it sends is kept."""

    def __init__(self, *messages: bytes) -> None:
        self._messages = list(messages)
        self.sent: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if not self._messages:
            raise _Paused
        return self._messages.pop(0)


def _answer(authkey: bytes, *messages: bytes) -> list[bytes]:
    """``connection.answer_challenge`` fed ``messages`` (the challenge, then perhaps the
    server's verdict, which it checks): what it sends."""
    script = _Script(*messages)
    stand_in: Any = script
    with contextlib.suppress(_Paused):
        connection.answer_challenge(stand_in, authkey)
    return script.sent


class _AnswerAhead:
    """The connection ``connection.deliver_challenge`` sees on the client: its challenge goes
    out in one write with the answer to the server's ``challenge``; the server's verdict on that
    answer is read and checked before the server's answer to ours is. Our verdict on that is
    kept in ``verdict``, for the caller to send (with the first request, once it is WELCOME)."""

    def __init__(self, conn: Any, authkey: bytes, challenge: bytes) -> None:
        self._conn = conn
        self._authkey = authkey
        self._challenge: bytes | None = challenge
        self.verdict = b""

    def send_bytes(self, data: bytes) -> None:
        challenge, self._challenge = self._challenge, None
        if challenge is None:  # our verdict on the server's answer
            self.verdict = _SHORT.pack(len(data)) + data
            return
        answer = b"".join(_SHORT.pack(len(m)) + m for m in _answer(self._authkey, challenge))
        _write_all(self._conn.fileno(), answer + _SHORT.pack(len(data)) + data)  # + ours
        _answer(self._authkey, challenge, self._conn.recv_bytes(256))  # raises if rejected

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        return self._conn.recv_bytes(maxlength)  # type: ignore[no-any-return]


def client_handshake(conn: Any, authkey: bytes, then: bytes = b"") -> None:
    """Authenticate a new client connection both ways: ``answer_challenge`` then
    ``deliver_challenge``, as ``multiprocessing.connection.Client`` does, one round trip shorter
    (see the module docstring); then send ``then`` (framed messages: the first request) in the
    same write as the last handshake message, so the server wakes up once for both. Raises
    ``AuthenticationError``, ``EOFError`` or ``OSError``."""
    ahead = _AnswerAhead(conn, authkey, conn.recv_bytes(256))
    stand_in: Any = ahead
    try:
        connection.deliver_challenge(stand_in, authkey)
    except AuthenticationError:
        with contextlib.suppress(OSError):
            _write_all(conn.fileno(), ahead.verdict)  # FAILURE, and nothing else
        raise
    _write_all(conn.fileno(), ahead.verdict + then)
