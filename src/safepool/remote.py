"""Serve a pool to other hosts, and connect to one: ``python -m safepool serve``.

Safe defaults:

* The default address is loopback. Listening on any other interface needs an authkey, from an
  environment variable or a file that only its owner can read; never from the command line,
  where every user of the machine can read it in the process list.
* A wrong authkey is refused at connect; a new connection has ``handshake_timeout`` seconds in
  all to authenticate, and at most ``max_unauthenticated`` may be authenticating at once.
* Addresses: ``HOST:PORT``, ``[::1]:PORT`` or ``unix:/path``, the same for every entry point
  (:func:`parse_address`).
* The server is a :class:`~safepool._server.SafeServer`: no copies of hosted objects, exposed
  methods only, no file descriptors in replies.
* Ctrl+C (and SIGTERM, with ``handle_signals=True`` as the CLI does) stops it cleanly: the pools
  are closed, and with them their items. :class:`~safepool.PoolServer` is the same server,
  started and stopped from your code, in any thread.

What the authkey does and does not do is in docs/guides/remote.md ("What the authkey protects").
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._connections import DEFAULT_MAX_UNAUTHENTICATED
from ._transport import check_address, is_local, parse_address
from .manager import PoolManager, check_typeid, new_proxy
from .poolserver import PoolServer
from .proxy import PoolProxy, remember_authkey

__all__ = [
    "AUTHKEY_ENV",
    "connect_pool",
    "import_factory",
    "is_local",
    "load_authkey",
    "parse_address",
    "serve_pool",
    "write_local_authkey",
]

logger = logging.getLogger(__name__)

AUTHKEY_ENV = "SAFEPOOL_AUTHKEY"
MIN_AUTHKEY_BYTES = 16


def load_authkey(
    *, env: str | None = AUTHKEY_ENV, file: str | os.PathLike[str] | None = None
) -> bytes | None:
    """The authkey from ``file`` (which only its owner may read), else from the environment
    variable ``env``; None if neither is set."""
    if file is not None:
        path = Path(file)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the authkey file {str(path)!r}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(
                f"the authkey file {str(path)!r} can be read by other users "
                f"(mode {stat.filemode(mode)}); run: chmod 600 {path}"
            )
        key = data.strip()
        source = f"the authkey file {str(path)!r}"
    elif env and os.environ.get(env):
        key = os.environ[env].strip().encode()
        source = f"${env}"
    else:
        return None
    if len(key) < MIN_AUTHKEY_BYTES:
        raise ValueError(
            f"{source} holds a {len(key)}-byte authkey; use at least {MIN_AUTHKEY_BYTES} random "
            'bytes, e.g. python -c "import secrets; print(secrets.token_hex(32))"'
        )
    return key


def import_factory(spec: str) -> Callable[[], Any]:
    """``"package.module:callable"`` (or ``module:Class.method``) -> the callable."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"factory must be module:callable (e.g. myapp.db:connect), got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the factory's module {module_name!r}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {attr_path!r}") from None
    if not callable(obj):
        raise ValueError(f"{spec!r} names an object of type {type(obj).__name__}, not a callable")
    factory: Callable[[], Any] = obj
    return factory


def serve_pool(
    address: Any,
    factory: Callable[[], Any],
    *,
    typeid: str = "pool",
    authkey: bytes | None,
    share: str = "hosted",
    handshake_timeout: float = 5.0,
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
    on_ready: Callable[[Any], None] | None = None,
    handle_signals: bool = False,
    **options: Any,
) -> None:
    """Serve one named pool at ``address`` until stopped; then close it. Blocking: the
    convenience built on :class:`~safepool.PoolServer`.

    It returns on Ctrl+C (``KeyboardInterrupt``) or a client's ``shutdown``; with
    ``handle_signals=True`` (main thread only) also on SIGTERM, and a second SIGINT or SIGTERM
    while it shuts down ends the process at once (status 128 + the signal number).
    ``on_ready(address)`` is called once the server listens (with the real port, if 0 was asked
    for). Refuses a non-local address without an ``authkey``.
    """
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "handle_signals=True works only in the main thread (Python runs signal handlers "
            "there); from another thread, use PoolServer and call stop() yourself"
        )
    server = PoolServer(
        address,
        factory,
        typeid=typeid,
        authkey=authkey,
        share=share,
        handshake_timeout=handshake_timeout,
        max_unauthenticated=max_unauthenticated,
        **options,
    )
    with _StopOnSignals(handle_signals) as signals:
        try:
            server.start()
            bound = server._server.address  # the manager address, as on_ready always got it
            if on_ready is not None:
                on_ready(bound)
            level = logging.DEBUG if on_ready is not None else logging.INFO
            logger.log(level, "safepool: serving pool %r at %s", typeid, server.address)
            while True:
                if server.wait(_SIGNAL_CHECK):
                    break
        except (KeyboardInterrupt, SystemExit, _Stop):
            pass
        finally:
            signals.stopping = True
            server.stop()
            logger.info("safepool: pool %r closed, server stopped", typeid)


# How often the waiting main thread wakes up: a signal that the kernel hands to another thread
# only sets a flag, which the main thread sees when it next runs Python code (a wait with no
# timeout would never return to it).
_SIGNAL_CHECK = 0.2


class _Stop(BaseException):
    """SIGTERM or SIGINT, in serve_pool(handle_signals=True)."""


class _StopOnSignals:
    """While active (and ``enabled``): SIGTERM and SIGINT raise :class:`_Stop` in the main
    thread; once ``stopping``, a second one ends the process at once, without a traceback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stopping:
            os.write(2, b"safepool: interrupted again while stopping; exiting now\n")
            os._exit(128 + signum)
        self.stopping = True
        raise _Stop

    def __enter__(self) -> _StopOnSignals:
        if self.enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def write_local_authkey() -> tuple[bytes, Path]:
    """A random authkey for a loopback server, in a new file only its owner can read."""
    key = secrets.token_hex(32).encode()
    fd, name = tempfile.mkstemp(prefix="safepool-", suffix=".key")
    with os.fdopen(fd, "wb") as f:  # mkstemp makes it 0600
        f.write(key + b"\n")
    return key, Path(name)


def connect_pool(
    address: tuple[str, int] | str,
    typeid: str = "pool",
    *,
    authkey: bytes | None = None,
    authkey_file: str | os.PathLike[str] | None = None,
    authkey_env: str | None = AUTHKEY_ENV,
) -> PoolProxy[Any]:
    """A proxy to the pool ``typeid`` served at ``address`` (by ``python -m safepool serve``).

    The authkey is ``authkey``, else read from ``authkey_file``, else from ``$SAFEPOOL_AUTHKEY``.
    """
    address = check_address(address)
    key = authkey if authkey is not None else load_authkey(env=authkey_env, file=authkey_file)
    if key is None:
        raise ValueError(
            f"no authkey to connect to {address!r}: pass authkey=..., authkey_file=..., or set "
            f"${AUTHKEY_ENV}"
        )
    check_typeid(PoolManager, typeid)
    # No manager object (the proxy needs none): the pool's first request reaches the server, or
    # says why not.
    remember_authkey(address, key)
    return new_proxy(address, key, typeid)
