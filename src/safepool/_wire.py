"""The ``multiprocessing.connection`` wire format, read in as few system calls as possible.

A message is a 4-byte big-endian signed length (``-1`` then an 8-byte length for messages over
2 GiB) followed by the payload. ``Connection.recv_bytes`` reads the header and the payload with
separate ``read()`` calls; on the manager's request/response path a whole message nearly always
arrives at once, so :class:`MessageReader` asks for it in one call. The format on the wire is
the stdlib's, so either side may be a stdlib ``Connection``.
"""

from __future__ import annotations

import os
import struct

__all__ = ["MessageReader"]

_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
_CHUNK = 65536


class MessageReader:
    """Reads whole messages from one connection's file descriptor, keeping any excess."""

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
