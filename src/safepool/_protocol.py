"""The request/reply protocol between safepool clients and a manager server, in one place.

Framing is ``multiprocessing.connection``'s: a 4-byte big-endian signed length (``-1`` then an
8-byte length for messages over 2 GiB), then the payload. Payloads are pickled with the plain
:mod:`pickle` module (see :mod:`safepool._server` for why). On a client thread's connection
(a :class:`Channel`) the exchanges are:

=====================  =================================  =====================================
direction              payload                            meaning
=====================  =================================  =====================================
client -> server       ``(ident, method, args, kwds)``    call ``method`` of hosted object
server -> client       ``(kind, value)``                  the reply; ``kind`` is one of
                                                          :data:`RETURN`, :data:`ERROR`,
                                                          :data:`PROXY`
client -> server       :data:`ABORT` + request number     "I did not keep the reply to my
                       (8 bytes, big-endian)              request number N, if it arrived"
=====================  =================================  =====================================

A client sends a request only after it has read the reply to the previous one, so a new request
also tells the server that the previous reply was taken. Both sides number the requests on a
channel from 1 (``Channel.sent``; the server counts those it has read). The number in ABORT says
which reply not to keep: a call cut short *before its request left* (an interruption at its very
start) must not give back what the previous reply granted -- a lease the caller holds -- so the
server takes a grant back only when the ABORT names the last request it has read.

**Interrupted calls.** A call cut short for any reason before its reply is taken (a signal
handler raising, ``KeyboardInterrupt``, ``SystemExit``, an error while decoding the reply) never
leaves a reply behind for a later call to read: the channel is *aborted* -- it sends
:data:`ABORT` if it can, and is closed and never used again; the thread's next call opens a new
one. On the server, an aborted channel (or one that reaches end-of-file while a call runs)
cancels the call if it is still waiting for an item, and a lease granted by the call whose reply
was not taken goes straight back to its pool. Dropping the connection was measured against
tagging requests with sequence numbers and discarding stale replies: tagging costs every call a
larger message and a comparison, and makes the next call wait behind the interrupted one (an
``acquire`` may wait for its whole timeout); a dropped connection costs nothing until a call is
interrupted, then one reconnect (~0.5 ms over a Unix socket).

Server-level requests (``create``, ``incref``, ``open_session``, ...) each use a connection of
their own, opened, authenticated and closed per request.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import threading
from collections.abc import Iterator
from multiprocessing import AuthenticationError, current_process
from multiprocessing.managers import RemoteError
from typing import Any

from ._handshake import client_handshake
from ._transport import connect, open_connection
from .errors import AuthkeyError, ManagerUnavailable, SafePoolError

__all__ = [
    "ABORT",
    "CHANNEL_REQUESTS",
    "ERROR",
    "POOL_METHODS",
    "PROXY",
    "RETURN",
    "SERVER_REQUESTS",
    "UNPROBED",
    "Channel",
    "MessageReader",
    "abort_message",
    "aborted_request",
    "error_from_reply",
    "frame",
    "open_channel",
    "open_channel_with",
    "request",
    "transport",
    "transport_error",
]

#: Reply kinds (the stdlib's names, so either side may be a stdlib peer).
RETURN = "#RETURN"
ERROR = "#ERROR"
PROXY = "#PROXY"
_STDLIB_TRACEBACK = ("#TRACEBACK", "#UNSERIALIZABLE")  # what a stdlib server sends instead

#: The client did not keep the reply to the request it names (never a valid pickle).
ABORT = b"#ABORT"
_NUMBER = struct.Struct("!Q")

#: In a ``create_probed`` reply: the server could not tell the pool's ``fast_path()``.
UNPROBED = "#UNPROBED"

#: The methods a client may call on a hosted pool (HostedPool.EXPOSED, PoolProxy._exposed_).
POOL_METHODS = (
    "acquire", "release", "call", "call_leased", "stats", "leases", "close", "describe",
    "fast_path", "fill", "release_slot", "value", "revoke",
)  # fmt: skip

#: Requests the server answers on a connection of their own.
SERVER_REQUESTS = (
    "shutdown", "create", "create_for", "accept_connection", "open_session", "get_methods",
    "number_of_objects", "dummy", "incref", "decref", "pools", "revoke_lease",
)  # fmt: skip
#: The server-level requests a client may also send on its thread's open channel, with ident
#: None, saving a connection and its handshake: creating a pool for its session (with
#: ``create_probed``, the reply also carries the pool's ``fast_path()``, which a proxy's first
#: lease would otherwise ask for). The server names them in its reply to ``accept_connection``
#: (so a client knows what an older one lacks).
CHANNEL_REQUESTS = frozenset({"create_for", "create_probed"})

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_CHUNK = 65536


def frame(payload: bytes) -> bytes:
    """One message as it travels: its length prefix, then ``payload``."""
    if len(payload) > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(len(payload)) + payload
    return _SHORT.pack(len(payload)) + payload


class MessageReader:
    """Reads whole messages from one connection's file descriptor, keeping any excess.

    ``Connection.recv_bytes`` reads a header and a payload with two ``read()`` calls; on the
    request/reply path a whole message nearly always arrives at once, so this asks for it in one.
    """

    __slots__ = ("_buffer", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()  # appends in amortised O(1): a big message is not re-copied

    def _fill(self, need: int) -> None:
        while len(self._buffer) < need:
            chunk = os.read(self._fd, max(_CHUNK, need - len(self._buffer)))
            if not chunk:
                raise EOFError
            self._buffer += chunk

    def read(self) -> bytes:
        """The next message's payload. Raises EOFError at end of stream."""
        self._fill(4)
        (size,) = _SHORT.unpack_from(self._buffer)
        start = 4
        if size == -1:
            self._fill(12)
            (size,) = _LONG.unpack_from(self._buffer, 4)
            start = 12
        elif size < 0:
            raise OSError(f"bad message length {size}")
        end = start + size
        self._fill(end)
        message = bytes(self._buffer[start:end])
        del self._buffer[:end]
        return message


# -- the one mapping of transport failures to safepool errors ----------------------------------


def transport_error(address: Any, exc: BaseException) -> SafePoolError:
    """The safepool error for a failure to reach or talk to the server at ``address``."""
    if isinstance(exc, AuthenticationError):
        return AuthkeyError(f"the manager at {address!r} refused this authkey ({exc})")
    return ManagerUnavailable(
        f"the manager server at {address!r} is unreachable ({type(exc).__name__}: {exc}); "
        "it died or was shut down"
    )


@contextlib.contextmanager
def transport(address: Any) -> Iterator[None]:
    """Map failures to reach or talk to the server at ``address`` to safepool errors."""
    try:
        yield
    except (AuthenticationError, EOFError, OSError) as exc:
        raise transport_error(address, exc) from exc


def error_from_reply(kind: str, value: Any) -> BaseException:
    """The exception a non-``RETURN`` reply stands for."""
    if kind == ERROR and isinstance(value, BaseException):
        return value
    if kind in _STDLIB_TRACEBACK:
        return RemoteError(value)
    return SafePoolError(f"the server sent an unknown reply kind {kind!r}")


def request(
    address: Any,
    authkey: bytes,
    funcname: str,
    args: tuple[Any, ...] = (),
    kwds: dict[str, Any] | None = None,
) -> Any:
    """One server-level request, on a connection of its own (opened, authenticated, closed).
    Transport failures become safepool errors; an error the server raised keeps its type."""
    message = pickle.dumps((None, funcname, args, kwds or {}), pickle.HIGHEST_PROTOCOL)
    with transport(address):
        conn = connect(address, authkey, frame(message))
        try:
            kind, value = pickle.loads(conn.recv_bytes())
        finally:
            conn.close()
    if kind == RETURN:
        return value
    raise error_from_reply(kind, value)


def abort_message(number: int) -> bytes:
    """ABORT for request ``number`` of a channel (0: none of them), unframed."""
    return ABORT + _NUMBER.pack(number)


def aborted_request(message: bytes) -> int | None:
    """The request number an ABORT ``message`` names; None if ``message`` is no ABORT. A bare
    ABORT (from an older client, which aborted only for its last request) names ``-1``."""
    if not message.startswith(ABORT):
        return None
    if len(message) == len(ABORT) + _NUMBER.size:
        return int(_NUMBER.unpack_from(message, len(ABORT))[0])
    return -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- the client side of one thread's connection -------------------------------------------------


class Channel:
    """One client thread's connection to a server: a request, then its reply, strictly in turn.

    ``home`` is the thread-local namespace that holds the channel as ``home.channel`` once it is
    open (:func:`open_channel` puts it there); an aborted or broken channel removes itself from
    it, so the thread's next call opens another.
    """

    __slots__ = ("_conn", "_fd", "_home", "_read", "address", "authkey", "requests", "sent")

    def __init__(self, conn: Any, address: Any, home: Any) -> None:
        self._conn = conn
        self._fd: int = conn.fileno()
        self._read = MessageReader(self._fd).read
        self._home = home
        self.address = address
        self.requests: frozenset[str] = frozenset()  # server-level ones it carries
        self.authkey = b""  # the key it was opened with (by open_channel)
        self.sent = 0  # requests begun on it (numbered from 1; accept_connection not counted)

    def exchange(self, request: bytes, *, must_arrive: bool = False) -> tuple[str, Any]:
        """Send one pickled request and return its reply ``(kind, value)``.

        A transport failure drops the channel and raises the mapped safepool error; any other
        exception (an interruption) aborts the channel, then propagates. ``must_arrive``: a
        request that must reach the server even if the call is cut short (a release). The
        request's number is ``self.sent + 1``: a caller that may abort after this returned
        (it could not keep what the reply granted) takes it first, and aborts with it.
        """
        number = self.sent + 1
        try:
            self.sent = number
            self._conn.send_bytes(request)
            reply: tuple[str, Any] = pickle.loads(self._read())
        except (EOFError, OSError) as exc:
            self.abort(number)
            raise transport_error(self.address, exc) from exc
        except BaseException:
            self.abort(number, resend=request if must_arrive else None)
            raise
        return reply

    def read_pair(self) -> tuple[tuple[str, Any], tuple[str, Any] | None]:
        """The replies to two requests sent at once (see :func:`_open`), as :meth:`exchange`
        takes one. The second's reply is None if the first was refused: the server then ends
        the connection without reading the second."""
        try:
            reply: tuple[str, Any] = pickle.loads(self._read())
            if reply[0] != RETURN:
                return reply, None
            return reply, pickle.loads(self._read())
        except (EOFError, OSError) as exc:
            self.abort(self.sent)
            raise transport_error(self.address, exc) from exc
        except BaseException:
            self.abort(self.sent)
            raise

    def call_sent(self) -> Any:
        """The value of the reply to a request already sent (see :func:`_open`), or its error
        raised; a transport failure drops the channel, as :meth:`exchange` does."""
        try:
            kind, value = pickle.loads(self._read())
        except (EOFError, OSError) as exc:
            self.abort(self.sent)
            raise transport_error(self.address, exc) from exc
        if kind == RETURN:
            return value
        raise error_from_reply(kind, value)

    def call(self, request: bytes) -> Any:
        """:meth:`exchange`, then the reply's value, or its error raised."""
        kind, value = self.exchange(request)
        if kind == RETURN:
            return value
        raise error_from_reply(kind, value)

    def abort(self, number: int, resend: bytes | None = None) -> None:
        """Give up on this channel: the server undoes what its reply to request ``number``
        granted, if that request reached it (0: no request's).

        ``resend``: a request that must reach the server even so (a release cut short before
        or while it was sent); the server ignores a duplicate. Idempotent (only the first call
        writes); never raises.
        """
        if getattr(self._home, "channel", None) is self:
            with contextlib.suppress(AttributeError):
                del self._home.channel
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        data = frame(abort_message(number))
        if resend is not None:
            data = frame(resend) + data
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)  # never block here: the buffer is empty, or we give up
            os.write(fd, data)
        with contextlib.suppress(OSError):
            self._conn.close()

    def close(self) -> None:
        """Close normally: replies so far were all taken."""
        if getattr(self._home, "channel", None) is self:
            with contextlib.suppress(AttributeError):
                del self._home.channel
        if self._fd >= 0:
            self._fd = -1
            with contextlib.suppress(OSError):
                self._conn.close()

    def detach_after_fork(self) -> Any:
        """In a forked child: forget the parent's connection without touching the socket.

        Returns the connection object, for the caller to keep alive (never closed here)."""
        self._fd = -1
        return self._conn


def open_channel(address: Any, authkey: bytes, home: Any, session: str | None) -> Channel:
    """Open this thread's channel to the server at ``address``, bound to this process's
    ``session``, and keep it in ``home.channel`` once the server has accepted it (a channel cut
    short before that is never used: the server would take its next request for the first,
    server-level one). A failure to connect or authenticate raises the transport's own
    exception (callers map it: a proxy names its authkey's origin)."""
    channel = _open(address, authkey, home, session, [])
    try:
        _accepted(channel, channel.call_sent())
        home.channel = channel
    except BaseException:  # (3.10 may run a signal handler as a call returns)
        channel.abort(0)
        raise
    return channel


def open_channel_with(
    address: Any,
    authkey: bytes,
    home: Any,
    session: str | None,
    *,
    then: bytes,
    used: list[tuple[Channel, int]],
) -> tuple[Channel, tuple[str, Any] | None]:
    """:func:`open_channel`, with the server-level request ``then`` (pickled) sent in the same
    write as ``accept_connection``, not after its reply: one round trip fewer. Returns the
    channel and the reply to ``then``; that reply means something only if ``then`` is in the
    channel's ``requests`` (an older server answers it with an error, and keeps the channel).
    The channel is added to ``used``, with the number of ``then`` (1), before anything is sent
    on it (to abort it if the caller is cut short after this returns: the server then undoes
    what ``then`` did)."""
    channel = _open(address, authkey, home, session, used, then=then)
    (kind, value), reply = channel.read_pair()
    if kind != RETURN:
        channel.close()  # the server ended it, unread
        raise error_from_reply(kind, value)
    _accepted(channel, value)
    home.channel = channel
    return channel, reply


def _open(
    address: Any,
    authkey: bytes,
    home: Any,
    session: str | None,
    used: list[tuple[Channel, int]],
    *,
    then: bytes = b"",
) -> Channel:
    """A new channel, authenticated, with its ``accept_connection`` request (then ``then``, a
    pickled request, number 1) sent in the same write as the handshake's last message. It is
    added to ``used`` before anything but the handshake is sent, and aborted if this is cut
    short (the server then undoes what ``then`` did)."""
    channel = Channel(open_connection(address), address, home)
    channel.authkey = authkey
    channel.sent = 1 if then else 0
    used.append((channel, channel.sent))
    try:  # the server starts its side at once: the request is made meanwhile
        requests = frame(_accept_request(session)) + (frame(then) if then else b"")
        client_handshake(channel._conn, authkey, requests)
    except BaseException:
        channel.abort(channel.sent)
        raise
    return channel


def _accept_request(session: str | None) -> bytes:
    name = current_process().name
    thread = threading.current_thread()
    if thread is not threading.main_thread():
        name += "|" + thread.name
    args: tuple[Any, ...] = (name,) if session is None else (name, session)
    return pickle.dumps((None, "accept_connection", args, {}), pickle.HIGHEST_PROTOCOL)


def _accepted(channel: Channel, accepted: Any) -> None:
    if isinstance(accepted, tuple):  # an older server replies None: it carries none
        channel.requests = CHANNEL_REQUESTS.intersection(accepted)
