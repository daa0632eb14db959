"""Serve a pool to other hosts, and connect to one: ``python -m safepool serve``.

Safe defaults:

* The default address is loopback. Listening on any other interface needs an authkey, from an
  environment variable or a file that only its owner can read; never from the command line,
  where every user of the machine can read it in the process list.
* A wrong authkey is refused at connect; a client that connects and does not authenticate is
  dropped after ``handshake_timeout`` seconds.
* The server is a :class:`~safepool._server.SafeServer`: no copies of hosted objects, exposed
  methods only, no file descriptors in replies.
* SIGTERM and Ctrl+C stop it cleanly: the pools are closed, and with them their items.

What the authkey does and does not do is in the README ("Remote pools and their security").
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import secrets
import signal
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _hosted
from .manager import PoolManager, register_pool
from .proxy import PoolProxy

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


def parse_address(text: str) -> tuple[str, int] | str:
    """``"HOST:PORT"``, ``"[::1]:PORT"`` or ``"unix:/path/to/socket"`` as a manager address."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"address must be HOST:PORT or unix:PATH, got {text!r}")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("a unix: address needs a socket path, e.g. unix:/run/safepool.sock")
        return path
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be HOST:PORT (e.g. 127.0.0.1:5500), got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"the port in {text!r} must be a number, got {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"the port in {text!r} must be 0-65535, got {number}")
    return host, number


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
        raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    factory: Callable[[], Any] = obj
    return factory


def serve_pool(
    address: tuple[str, int] | str,
    factory: Callable[[], Any],
    *,
    typeid: str = "pool",
    authkey: bytes | None,
    share: str = "hosted",
    handshake_timeout: float = 5.0,
    on_ready: Callable[[Any], None] | None = None,
    **options: Any,
) -> None:
    """Serve one named pool at ``address`` until SIGTERM or Ctrl+C; then close it.

    ``on_ready(address)`` is called once the server listens (with the real port, if 0 was
    asked for). Refuses a non-local address without an ``authkey``.
    """
    if authkey is None and not is_local(address):
        raise ValueError(
            f"refusing to serve {address!r} to other hosts without an authkey: anyone who can "
            f"reach it could run code in the server. Set ${AUTHKEY_ENV} or --authkey-file, or "
            "listen on 127.0.0.1"
        )
    if authkey is None:
        authkey = secrets.token_bytes(32)  # nothing reaches a loopback server without it

    served = type("ServedPoolManager", (PoolManager,), {})
    register_pool(served, typeid, factory, share=share, **options)
    server = served(address=address, authkey=authkey).get_server()
    server.handshake_timeout = handshake_timeout

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # ends serve_forever() in the main thread

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if on_ready is not None:
            on_ready(server.address)
        logger.info("safepool: serving pool %r at %r", typeid, server.address)
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _hosted.close_all()
        logger.info("safepool: pool %r closed, server stopped", typeid)


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
    if isinstance(address, str) and not address.startswith("/") and ":" in address:
        address = parse_address(address)
    key = authkey if authkey is not None else load_authkey(env=authkey_env, file=authkey_file)
    if key is None:
        raise ValueError(
            f"no authkey to connect to {address!r}: pass authkey=..., authkey_file=..., or set "
            f"${AUTHKEY_ENV}"
        )
    client = type("PoolClient", (PoolManager,), {})
    register_pool(client, typeid)
    manager = client(address=address, authkey=key)
    manager.connect()
    proxy: PoolProxy[Any] = getattr(manager, typeid)()
    return proxy
